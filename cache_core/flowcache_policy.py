"""FlowCache skip/compute rule for chunk-wise AR video diffusion (specs/flowcache.md A2).

Every (CFG branch, chunk) pair runs its own TeaCache in the chunk's own time frame: the
relative L1 change of the chunk's timestep modulation, rescaled by a polynomial fitted for the
model size, is accumulated; the chunk is recomputed when the sum reaches the threshold and
otherwise reuses its last block-stack residual. The first `warmup_steps` and the last
`final_steps` local steps of every chunk are always computed.

The indicator is the [6, dim] modulation of ONE frame of the chunk (the timestep is uniform
within a chunk, so the mean ratio equals the per-token one) instead of the reference's
per-token [6, T, dim] copy (~376 MB per chunk per branch at 540P).

Differences from the reference, on purpose (spec section 6):
- P(d) is clamped at 0: the 1.3B polynomial is negative for tiny d, which would make the
  accumulator shrink on near-identical steps.
- An unknown model size falls back to the identity (no NameError); a zero previous indicator
  cannot divide by zero.
- State is keyed by the CFG branch id the caller passes, never by call parity.

A policy of the chunk executor (chunk_executor.ChunkPolicy); the polynomial is the model
family's (model_patches), passed in already resolved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .chunk_step import COMPUTE, PREDICT, SKIP, ChunkPolicy, Decision
from .errors import InputError, require_finite
from .predict import check_prediction

IDENTITY = (1.0, 0.0)   # P(d) = d: for a model without a fitted polynomial


def parse_coefficients(values: Sequence[float]) -> tuple[float, ...]:
    """An explicit coefficient list, highest power first."""
    coeffs = tuple(float(c) for c in values)
    if not coeffs:
        raise InputError("coefficients", "the coefficient list is empty")
    return coeffs


def polyval(coeffs: Sequence[float], d: float) -> float:
    """Horner evaluation, highest power first (numpy.poly1d order)."""
    out = 0.0
    for c in coeffs:
        out = out * d + c
    return out


@dataclass
class FlowCacheConfig:
    """Settings of FlowCache for a Wan-family (SkyReels-V2-DF) model.

    rel_l1_thresh: recompute a chunk once its accumulated rescaled change reaches this
        (0.1 = the reference "slow", 0.15 = "fast"; 0 computes every step).
    warmup_steps: a chunk's first local steps that are always computed (reference: 5).
    final_steps: a chunk's last local steps that are always computed (reference: 1).
    coefficients: rescaling polynomial: a name the model family resolves (Wan: auto | 1.3B |
        14B | none) or explicit values, highest power first.
    chunk_frames: latent frames per chunk when the sampler publishes no record.
    kv_compress: squeeze finished chunks' K/V to `kv_budget_chunks` chunks of tokens.
    kv_budget_chunks: history budget, in chunks' worth of tokens per head.
    kv_lambda: importance weight in score = lambda * importance - (1 - lambda) * redundancy.
    kv_pool_kernel: max-pool width smoothing the importance along the token axis.
    max_score_queries: at most this many (evenly spaced) queries score the history.
    predict_order: 0 a skipped step reuses the chunk's last residual; 1 or 2 it extrapolates
        (linear / quadratic over the noise level) once the accumulated change reaches reuse_thresh.
    reuse_thresh: below it a skipped step reuses, from it to rel_l1_thresh it predicts (<= rel_l1_thresh).
    """
    rel_l1_thresh: float = 0.1
    warmup_steps: int = 5
    final_steps: int = 1
    coefficients: Union[str, Sequence[float]] = "auto"
    chunk_frames: int = 5
    kv_compress: bool = False
    kv_budget_chunks: int = 1
    kv_lambda: float = 0.07
    kv_pool_kernel: int = 7
    max_score_queries: int = 256
    predict_order: int = 0
    reuse_thresh: float = 0.0

    def __post_init__(self):
        require_finite("rel_l1_thresh", self.rel_l1_thresh)
        if self.rel_l1_thresh < 0:
            raise InputError("rel_l1_thresh", f"must be >= 0, got {self.rel_l1_thresh}")
        check_prediction(self.predict_order, self.reuse_thresh, self.rel_l1_thresh, "rel_l1_thresh")
        if self.warmup_steps < 0 or self.final_steps < 0:
            raise InputError("warmup_steps", "warmup_steps and final_steps must be >= 0")
        if self.chunk_frames < 1:
            raise InputError("chunk_frames", "must be >= 1")
        if self.kv_budget_chunks < 1:
            raise InputError("kv_budget_chunks", "must be >= 1")
        if not 0.0 <= self.kv_lambda <= 1.0:
            raise InputError("kv_lambda", f"must be in [0, 1], got {self.kv_lambda}")
        if self.max_score_queries < 1:
            raise InputError("max_score_queries", "must be >= 1")


@dataclass
class ChunkState:
    """What FlowCache remembers about one chunk in one CFG branch, within one AR segment."""
    acc: float = 0.0                          # accumulated rescaled distance since last compute
    prev: Optional[torch.Tensor] = None       # previous indicator ([6, dim] per row, fp32)
    computed: bool = False                    # observed computed since the segment began


class FlowCachePolicy(ChunkPolicy):
    """Per-(branch, chunk) decision state; `reset()` at every new AR segment.

    coefficients: the rescaling polynomial P (highest power first), resolved by the family."""

    method = "flowcache"
    needs_indicator = True
    reuses = True

    def __init__(self, config: FlowCacheConfig, coefficients: Sequence[float] = IDENTITY):
        self.config = config
        self.coeffs = parse_coefficients(coefficients)
        self.order = config.predict_order
        self.states: dict = {}

    def reset(self) -> None:
        self.states.clear()

    def reset_branch(self, branch: int) -> None:
        for key in [k for k in self.states if k[0] == int(branch)]:
            del self.states[key]

    def forget(self, branch: int, chunk: int) -> None:
        self.states.pop((int(branch), int(chunk)), None)

    def state(self, branch: int, chunk: int) -> ChunkState:
        key = (int(branch), int(chunk))
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = ChunkState()
        return st

    def rescale(self, d: float) -> float:
        """P(d), clamped at 0 so the accumulator never decreases."""
        return max(polyval(self.coeffs, d), 0.0)

    @torch.compiler.disable
    def decide(self, branch: int, chunk: int, indicator: torch.Tensor, local_step: int, steps: int) -> Decision:
        """COMPUTE the chunk, or SKIP it (reuse its residual) or PREDICT it. Always records `indicator`.

        local_step counts from 0 in the chunk's own denoising steps; `steps` is their total.
        """
        cfg = self.config
        st = self.state(branch, chunk)
        ind = indicator.detach()             # in the family's dtype: MAGI-1's reference compares bf16
        prev, st.prev = st.prev, ind.clone()
        forced = (local_step < cfg.warmup_steps or local_step >= steps - cfg.final_steps
                  or prev is None or prev.shape != ind.shape or not st.computed)
        if forced:
            st.acc = 0.0
            return COMPUTE
        # one host sync per decision: the spec's single `.item()`
        d = ((ind - prev).abs().mean() / prev.abs().mean().clamp_min(max(1e-12, torch.finfo(prev.dtype).tiny))).item()
        st.acc += self.rescale(d)
        if st.acc >= cfg.rel_l1_thresh:
            st.acc = 0.0
            return COMPUTE
        return PREDICT if self.order and st.acc >= cfg.reuse_thresh else SKIP

    def observe(self, branch: int, chunk: int, h_in: torch.Tensor, h_out: torch.Tensor, tokens=None) -> None:
        self.state(branch, chunk).computed = True
