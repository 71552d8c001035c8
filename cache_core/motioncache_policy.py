"""MotionCache: token-wise, motion-weighted reuse for chunk-wise AR video (specs/motioncache.md).

A policy of the chunk executor. Per (CFG branch, chunk), in the chunk's own denoising steps:

1. warm-up: the first `warmup_steps` + 1 local steps compute the whole chunk (the last of
   them resets the accumulators: the reference's n < W, then n == W);
2. phase 1 (chunk-wise): every token accumulates the chunk's rescaled indicator change d with
   weight 1, so the chunk is recomputed whole (or reused whole) as in FlowCache;
3. phase 2 (token-wise): after `phase1_updates` post-warm-up steps in which the chunk was
   recomputed, token i accumulates d * w_i, where w_i in [weight_floor, 1] is its motion weight:
   the min-max normalised (per frame) inter-frame difference at its position. Tokens whose sum
   reaches `threshold` are recomputed (SUBSET: query-side pruning, the others keep their last
   K/V and residual) and their sums reset.

Each step (spec 4A): A_i += d * w_i; u_i = A_i >= threshold; column voting (a spatial position is
recomputed in all frames of the chunk when more than `vote` of its frames want it); if fewer
than `min_update_ratio` of the tokens (but some) would update, nothing is and no sum resets;
else the updated tokens' sums reset. The indicator is the chunk's timestep modulation (as in
FlowCache), d = P(rho) with the family's rescaling polynomial.

Motion weights (spec 2A / 2B), recomputed after every step once phase 2 is reached:
- "hidden" (SkyReels reference): D_f(p) = mean_c |h_f - h_{f-1}| / (mean_c |h_{f-1}| + 1e-8) on
  the chunk's final hidden states; frame 0 compares with the previous chunk's last frame (the
  same branch), the first chunk copies frame 1;
- "latents" (MAGI reference): D_f(p) = mean over channels and the patch of |x_f - x_{f-1}| on
  the model's input latent, patchified to the token grid; frame 0 compares with the window's
  previous frame, and the window's first frame has weight 1.

Deliberate differences from the reference (spec section 8): modulation is gathered per token by
the adapter (the reference slices it), branch identity comes from the caller (never call
parity), every state is keyed by (branch, chunk) and cleared per segment (the previous-chunk
frame reference too), P(d) is clamped at 0 as in our FlowCache, and batch rows of one branch
share one token mask with weights averaged over them (the reference assumes batch 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .chunk_step import COMPUTE, ChunkPolicy, ChunkView, Decision, skip, subset
from .errors import InputError, require_finite
from .flowcache_policy import IDENTITY, parse_coefficients, polyval
from .predict import check_prediction

MOTION_SOURCES = ("hidden", "latents")


@dataclass
class MotionCacheConfig:
    """MotionCache settings; defaults are the SkyReels-V2 run script's (spec 6A).

    threshold: a token is recomputed once its weighted accumulated change reaches this (0.1).
    warmup_steps: W; a chunk's first W+1 local steps are always computed (4).
    phase1_updates: P; chunk-wise recomputes before the token-wise phase (6).
    weight_floor: motion weights span [floor, 1] (0.6).
    min_update_ratio: below this fraction of a chunk's tokens, none is updated (0.4).
    vote: column voting share of a position's frames (0.5; 0 switches voting off).
    motion_source: "hidden" (SkyReels reference) or "latents" (MAGI reference).
    coefficients: the rescaling polynomial, resolved by the model family (auto | 1.3B | 14B | none).
    chunk_frames: latent frames per chunk when the sampler publishes no record.
    predict_order: 0 tokens left out reuse their last residual; 1 or 2 those whose sum reached
        reuse_thresh extrapolate it over the noise level (linear / quadratic).
    reuse_thresh: below it a left-out token reuses, from it to threshold it predicts (<= threshold).
    """
    threshold: float = 0.1
    warmup_steps: int = 4
    phase1_updates: int = 6
    weight_floor: float = 0.6
    min_update_ratio: float = 0.4
    vote: float = 0.5
    motion_source: str = "hidden"
    coefficients: object = "auto"
    chunk_frames: int = 5
    predict_order: int = 0
    reuse_thresh: float = 0.0

    def __post_init__(self):
        require_finite("threshold", self.threshold)
        if not self.threshold >= 0:
            raise InputError("threshold", f"must be >= 0, got {self.threshold}")
        check_prediction(self.predict_order, self.reuse_thresh, self.threshold, "threshold")
        if self.warmup_steps < 0:
            raise InputError("warmup_steps", "must be >= 0")
        if self.phase1_updates < 0:
            raise InputError("phase1_updates", "must be >= 0")
        if not 0.0 <= self.weight_floor <= 1.0:
            raise InputError("weight_floor", f"must be in [0, 1], got {self.weight_floor}")
        if not 0.0 <= self.min_update_ratio < 1.0:
            raise InputError("min_update_ratio", f"must be in [0, 1), got {self.min_update_ratio}")
        if not 0.0 <= self.vote < 1.0:
            raise InputError("vote", f"must be in [0, 1), got {self.vote}")
        if self.motion_source not in MOTION_SOURCES:
            raise InputError("motion_source", f"{self.motion_source!r}: choose hidden or latents")
        if self.chunk_frames < 1:
            raise InputError("chunk_frames", "must be >= 1")


@dataclass
class TokenState:
    """What MotionCache remembers about one chunk in one branch, within one AR segment."""
    prev: Optional[torch.Tensor] = None       # previous indicator (the family's dtype)
    acc: Optional[torch.Tensor] = None        # [L] accumulated weighted change
    weights: Optional[torch.Tensor] = None    # [L] motion weights (None: phase 1, all 1)
    computed: bool = False                    # observed computed since the segment began
    phase1_count: int = 0
    phase1_done: bool = False
    frames: int = 1


def frame_weights(diff: torch.Tensor, floor: float, flat_is_one: bool = False) -> torch.Tensor:
    """Per-frame min-max normalised motion [F, HW] -> weights in [floor, 1]. A flat frame gets the
    floor (SkyReels reference) or, with flat_is_one, weight 1 (MAGI reference)."""
    lo = diff.amin(dim=1, keepdim=True)
    hi = diff.amax(dim=1, keepdim=True)
    w = floor + (1.0 - floor) * (diff - lo) / (hi - lo + 1e-8)
    if flat_is_one:
        w = torch.where(hi > lo, w, torch.ones_like(w))
    return w


def hidden_motion(h: torch.Tensor, frames: int, previous_last: Optional[torch.Tensor], first_chunk: bool):
    """D [F, HW] from final hidden states h [rows, F*HW, C] (spec 2A); also the chunk's last frame."""
    rows, n, c = h.shape
    x = h.float().reshape(rows, frames, n // frames, c)
    d = torch.ones(frames, n // frames, device=h.device)
    if frames > 1:
        num = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 3))
        den = x[:, :-1].abs().mean(dim=(0, 3)) + 1e-8
        d[1:] = num / den
    if first_chunk:
        d[0] = d[1] if frames > 1 else 1.0
    elif previous_last is not None and previous_last.shape == x[:, 0].shape:
        d[0] = (x[:, 0] - previous_last).abs().mean(dim=(0, 2)) / (previous_last.abs().mean(dim=(0, 2)) + 1e-8)
    return d, x[:, -1].clone()


def latent_motion(latents: torch.Tensor, frames: int, before: Optional[torch.Tensor]) -> torch.Tensor:
    """D [F, HW] from patchified input latents [rows, F*HW, C*p] (spec 2B: absolute, channel and
    patch mean); `before`: the window's frame ahead of the chunk [rows, HW, C*p] or None."""
    rows, n, c = latents.shape
    x = latents.float().reshape(rows, frames, n // frames, c)
    d = torch.ones(frames, n // frames, device=latents.device)
    if frames > 1:
        d[1:] = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(0, 3))
    if before is not None:
        d[0] = (x[:, 0] - before.float()).abs().mean(dim=(0, 2))
    return d


class MotionCachePolicy(ChunkPolicy):
    """Token-wise MotionCache decisions (see the module docstring)."""

    method = "motioncache"
    needs_indicator = True
    reuses = True
    needs_view = True

    def __init__(self, config: MotionCacheConfig, coefficients: Sequence[float] = IDENTITY):
        self.config = config
        self.coeffs = parse_coefficients(coefficients)
        self.order = config.predict_order
        self.states: dict = {}
        self.last_frames: dict = {}      # (branch, chunk) -> its last frame's hidden state
        self.views: dict = {}

    def reset(self) -> None:
        self.states.clear()
        self.last_frames.clear()
        self.views.clear()

    def reset_branch(self, branch: int) -> None:
        for d in (self.states, self.last_frames, self.views):
            for key in [k for k in d if k[0] == int(branch)]:
                del d[key]

    def forget(self, branch: int, chunk: int) -> None:
        """A finished chunk; its last frame stays until the next chunk has measured its motion."""
        for d in (self.states, self.views):
            d.pop((int(branch), int(chunk)), None)
        self.last_frames.pop((int(branch), int(chunk) - 1), None)

    def state(self, branch: int, chunk: int) -> TokenState:
        return self.states.setdefault((int(branch), int(chunk)), TokenState())

    def see(self, branch: int, chunk: int, view: ChunkView) -> None:
        self.views[(branch, chunk)] = view

    @torch.compiler.disable
    def decide(self, branch: int, chunk: int, indicator, local_step: int, steps: int) -> Decision:
        cfg, st = self.config, self.state(branch, chunk)
        view = self.views[(branch, chunk)]
        n_tok = view.tokens
        ind = indicator.detach()             # in the family's dtype (MAGI-1's reference: bf16)
        prev, st.prev = st.prev, ind.clone()
        st.frames = view.frames[1] - view.frames[0]
        if local_step <= cfg.warmup_steps or prev is None or not st.computed or st.acc is None \
                or st.acc.numel() != n_tok:
            st.acc = torch.zeros(n_tok, device=ind.device)
            if local_step >= cfg.warmup_steps:       # the warm-up's last step: phase 1 starts
                st.phase1_count, st.phase1_done, st.weights = 0, cfg.phase1_updates == 0, None
            return COMPUTE
        denom = (prev.abs().mean() + 1e-8).clamp_min(torch.finfo(prev.dtype).tiny)   # 1e-8 is 0 in fp16
        rho = ((ind - prev).abs().mean() / denom).item()   # one host sync
        d = max(polyval(self.coeffs, rho), 0.0)
        st.acc += d if st.weights is None else d * st.weights
        update = st.acc >= cfg.threshold
        if cfg.vote > 0 and st.frames > 1:           # column voting over the chunk's frames
            cols = update.view(st.frames, -1).float().mean(dim=0) > cfg.vote
            update = cols.repeat(st.frames)
        share = float(update.float().mean())
        if share == 0.0 or (cfg.min_update_ratio > 0 and share < cfg.min_update_ratio):
            return skip(self._predicted(st.acc))     # nothing updates, no sum resets
        predicted = self._predicted(st.acc, update)
        st.acc[update] = 0.0
        if share == 1.0:
            return COMPUTE
        return subset(update.nonzero().flatten(), predicted)

    def _predicted(self, acc: torch.Tensor, update: Optional[torch.Tensor] = None):
        """The left-out tokens to extrapolate (those whose sum reached reuse_thresh): None, True or a mask."""
        if not self.order:
            return None
        mask = acc >= self.config.reuse_thresh
        if update is not None:
            mask &= ~update
        if not bool(mask.any()):
            return None
        return True if update is None and bool(mask.all()) else mask

    def observe(self, branch: int, chunk: int, h_in, h_out, tokens=None) -> None:
        st = self.state(branch, chunk)
        st.computed = True
        if st.acc is not None and st.prev is not None and not st.phase1_done and st.acc.numel() == h_in.shape[1]:
            if self._post_warmup(branch, chunk):
                st.phase1_count += 1
                st.phase1_done = st.phase1_count >= self.config.phase1_updates
        self._update_weights(branch, chunk, h_out)

    def reused(self, branch: int, chunk: int, h_out) -> None:
        self._update_weights(branch, chunk, h_out)

    def _post_warmup(self, branch, chunk) -> bool:
        view = self.views.get((branch, chunk))
        return view is not None and view.local_step > self.config.warmup_steps

    def _update_weights(self, branch: int, chunk: int, h_out) -> None:
        """Motion weights from this step's output (or latents), once phase 2 is reached."""
        st, view = self.state(branch, chunk), self.views.get((branch, chunk))
        if view is None or not st.phase1_done or view.local_step < self.config.warmup_steps:
            return
        frames = view.frames[1] - view.frames[0]
        latents = self.config.motion_source == "latents" and view.latents is not None
        if latents:
            d = latent_motion(view.latents, frames, view.latents_before)
        else:
            d, last = hidden_motion(h_out, frames, self.last_frames.get((branch, chunk - 1)), chunk == 0)
            self.last_frames[(branch, chunk)] = last
        st.weights = frame_weights(d, self.config.weight_floor, flat_is_one=latents).flatten().to(h_out.device)
