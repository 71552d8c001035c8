"""The per-chunk cache step: decide -> run | reuse -> observe, and the one set of counts.

Plain torch, no ComfyUI. Every loop that runs a model chunk by chunk calls it, whatever the
family and the schedule: the DF window executor (chunk-causal and bidirectional, chunk_executor)
and MAGI-1's staggered chunk-wise forward (model_patches/magi_cache). A caching method is a
`ChunkPolicy` (one file per method); it is checked against this one driver.

Per active chunk and call:
1. `decide`: the policy sees the chunk (`ChunkView`, for policies that want it) and its
   indicator, and answers COMPUTE, SKIP or SUBSET(tokens);
2. `apply`: COMPUTE runs the loop's `run(None)` (its blocks on the chunk, against its K/V);
   SKIP takes the chunk's output from its cached outputs (cache_core/predict: the newest
   residual, or, where the decision says `predict`, an extrapolation over the noise level from
   the chunk's last computed ones); SUBSET runs `run(tokens)` and takes the others the same way;
   then the policy `observe`s what was computed (or is told what was `reused`).
A history chunk (one the loop must forward but that is not being denoised) just runs.

`counts` is the run's one vocabulary (COUNT_KEYS), merged into the sampler's RunReport. Chunk
steps and tokens are counted here; transformer FLOPs are counted by the loop that ran the
forward, through its family's FLOP model (`add_flops`), as spent, what the same chunk-wise run
would have spent without skipping (`noskip`), and what the family's vanilla sampler spends.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .predict import CachedOutputs


@dataclass(frozen=True)
class Decision:
    kind: str                               # "compute" | "skip" | "subset"
    tokens: Optional[torch.Tensor] = None   # SUBSET: token indices within the chunk (int64)
    predict: object = None                  # what is not computed: None reused, True predicted, or a
                                            # bool tensor over the chunk's tokens (those predicted)


COMPUTE = Decision("compute")
SKIP = Decision("skip")
PREDICT = Decision("skip", predict=True)


def subset(tokens: torch.Tensor, predict=None) -> Decision:
    return Decision("subset", tokens.to(torch.int64), predict)


def skip(predict=None) -> Decision:
    """SKIP, with what of the chunk is predicted rather than reused (None: nothing)."""
    if predict is None or predict is False:
        return SKIP
    return PREDICT if predict is True else Decision("skip", predict=predict)


@dataclass
class ChunkView:
    """What a policy may look at for one active chunk in one call (given to `see` first)."""
    frames: tuple                       # (f0, f1) latent frames of the chunk in the model call's input
    tokens: int                         # its tokens
    local_step: int                     # its denoising steps so far
    latents: Optional[torch.Tensor] = None          # [rows, tokens, C*p] patchified input latent
    latents_before: Optional[torch.Tensor] = None   # [rows, HW, C*p] the latent frame before f0


class ChunkPolicy:
    """A caching method, asked once per active chunk and call. This base computes everything:
    the chunk-wise restructuring alone ("chunk_causal")."""

    method = "chunk_causal"
    needs_indicator = False     # True: decide() gets the family's indicator of the chunk
    needs_view = False          # True: see() gets the chunk's ChunkView before decide()
    reuses = False              # True: it may answer SKIP or SUBSET (outputs and K/V of earlier steps kept)
    order = 0                   # extrapolation order of its predicted steps (0: it never predicts)

    def reset(self) -> None:
        """A new segment (AR window) starts."""

    def reset_branch(self, branch: int) -> None:
        """One branch restarts (its rows or its chunks' activity changed)."""

    def forget(self, branch: int, chunk: int) -> None:
        """The chunk is finished and will not be asked about again: drop what is kept for it."""

    def see(self, branch: int, chunk: int, view: ChunkView) -> None:
        """Before `decide`: the chunk's frames, tokens and latents (for policies that want them)."""

    def decide(self, branch: int, chunk: int, indicator, local_step: int, steps: int) -> Decision:
        return COMPUTE

    def observe(self, branch: int, chunk: int, h_in: torch.Tensor, h_out: torch.Tensor, tokens=None) -> None:
        """After COMPUTE or SUBSET (`tokens`) of an active chunk: its input and output."""

    def reused(self, branch: int, chunk: int, h_out: torch.Tensor) -> None:
        """After SKIP: the output the step reused or predicted."""


# The run's counts, one vocabulary for every family (README "The run report").
COUNT_KEYS = (
    "calls",                  # model calls (DF) or chunk-wise forward steps (MAGI-1) the cache served
    "segments",               # AR segments (DF windows; one per MAGI-1 run)
    "chunk_steps_computed",   # active chunk steps whose blocks ran (all tokens, or a subset)
    "chunk_steps_subset",     # ... of which on a token subset only
    "chunk_steps_skipped",    # active chunk steps reused without running a block
    "chunk_steps_predicted",  # ... skipped or subset steps where some tokens' output was extrapolated
    "chunk_steps_history",    # inactive chunks forwarded so later chunks can attend to them
    "chunk_steps_frozen",     # finished chunks not forwarded (their K/V kept)
    "tokens_active",          # token-steps of active chunks
    "tokens_computed",        # ... that ran the blocks
    "tokens_predicted",       # ... whose output was extrapolated, not reused
    "transformer_flops",      # spent
    "transformer_flops_noskip",   # the same chunk-wise run with nothing skipped
    "transformer_flops_vanilla",  # the family's uncached sampler
)


def new_counts() -> dict:
    return {key: 0.0 if key.startswith("transformer_flops") else 0 for key in COUNT_KEYS}


class ChunkStep:
    """One policy's decisions applied, counted and observed (see the module docstring).

    One object per sampling run: `counts` span the run; `reset_segment()` restarts the policy and
    drops the cached outputs."""

    def __init__(self, policy: ChunkPolicy):
        self.policy = policy
        self.counts = new_counts()
        self.outputs = CachedOutputs(policy.order)

    @property
    def predicts(self) -> bool:
        """Whether `apply` needs the chunks' noise levels."""
        return self.outputs.order > 0

    @property
    def method(self) -> str:
        return self.policy.method

    def fingerprint(self) -> list[int]:
        """The integer counts so far: what ranks that made the same decisions agree on."""
        return [int(v) for k, v in self.counts.items() if not k.startswith("transformer_flops")]

    def reset_segment(self) -> None:
        self.policy.reset()
        self.outputs.reset()

    def reset_branch(self, branch: int) -> None:
        self.policy.reset_branch(branch)
        self.outputs.reset_branch(branch)

    def forget(self, branch: int, chunk: int) -> None:
        self.policy.forget(branch, chunk)
        self.outputs.forget(branch, chunk)

    def decide(self, branch: int, chunk: int, local_step: int, steps: int,
               view: Callable[[], ChunkView] = None, indicator: Callable[[], torch.Tensor] = None,
               force: bool = False) -> Decision:
        """The policy's decision for an active chunk. `view` and `indicator` are built only if the
        policy asks for them. `force`: the loop needs this step computed (MAGI-1's reference always
        computes the run's last step); the policy still sees it, its answer is overridden."""
        policy = self.policy
        if policy.needs_view:
            policy.see(branch, chunk, view())
        ind = indicator() if policy.needs_indicator else None
        decision = policy.decide(branch, chunk, ind, local_step, steps)
        if force or (decision.kind != "compute" and not self.outputs.has(branch, chunk)):
            return COMPUTE          # nothing cached to reuse: a policy's skip cannot be served
        return decision

    def apply(self, branch: int, chunk: int, decision: Decision, h_in: torch.Tensor,
              run: Callable[[Optional[torch.Tensor]], torch.Tensor], active: bool = True,
              heat: Optional[torch.Tensor] = None, level: float = 0.0) -> torch.Tensor:
        """The chunk's output: `run(tokens)` gives the blocks' output of all (None) or some of its
        tokens; `h_in` is what the cached residuals are taken against. `heat` (a 1-D view over
        the chunk's tokens) counts where blocks ran. `level`: the chunk's noise level at this step
        (what predictions extrapolate over; read only when the policy predicts). An inactive
        (history) chunk just runs."""
        c = self.counts
        if not active:
            c["chunk_steps_history"] += 1
            return run(None)
        n = h_in.shape[1]
        c["tokens_active"] += n
        policy, outputs = self.policy, self.outputs
        if decision.kind == "skip":
            c["chunk_steps_skipped"] += 1
            h_out = h_in + self._estimate(branch, chunk, level, decision.predict)
            policy.reused(branch, chunk, h_out)
            return h_out
        c["chunk_steps_computed"] += 1
        tokens = decision.tokens if decision.kind == "subset" else None
        fresh = run(tokens)
        if tokens is None:
            h_out = fresh
            c["tokens_computed"] += n
            if heat is not None:
                heat += 1
            outputs.push(branch, chunk, h_out - h_in, level)
        else:                               # the others from the cache, the selected ones fresh
            h_out = h_in + self._estimate(branch, chunk, level, decision.predict)
            h_out[:, tokens] = fresh
            c["chunk_steps_subset"] += 1
            c["tokens_computed"] += int(tokens.numel())
            if heat is not None:
                heat[tokens.cpu()] += 1
            outputs.push(branch, chunk, h_out[:, tokens] - h_in[:, tokens], level, tokens)
        policy.observe(branch, chunk, h_in, h_out, tokens)
        return h_out

    def _estimate(self, branch: int, chunk: int, level: float, predict) -> torch.Tensor:
        residual, predicted = self.outputs.estimate(branch, chunk, level, predict)
        if predicted:
            self.counts["chunk_steps_predicted"] += 1
            self.counts["tokens_predicted"] += predicted
        return residual

    def frozen(self) -> None:
        """A finished chunk the loop does not forward."""
        self.counts["chunk_steps_frozen"] += 1

    def add_flops(self, spent: float, noskip: float, vanilla: float) -> None:
        """One model call's (or forward step's) transformer FLOPs, counted where it ran."""
        c = self.counts
        c["calls"] += 1
        c["transformer_flops"] += spent
        c["transformer_flops_noskip"] += noskip
        c["transformer_flops_vanilla"] += vanilla
