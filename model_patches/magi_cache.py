"""FlowCache and MotionCache on MAGI-1: the cache nodes' policies driving MAGI's chunk-wise forward.

How the references run MAGI-1 (specs/flowcache.md B1, specs/motioncache.md 1B), and so do we:
every active chunk of the window is forwarded on its own, in ascending order, and writes its
K/V into the pass's cache on every forward (no clean re-run of finished chunks: a finished
chunk keeps the K/V of its last computed step); a reused chunk keeps its stale K/V. The policy
(cache_core, the same classes as on SkyReels-V2-DF) decides per chunk and step from the
chunk's patch-embedded input: COMPUTE, SKIP (reuse its last velocity) or SUBSET (MotionCache:
only some tokens run, the others keep their K/V and velocity).

Beyond the references:
- the cached quantity is the chunk's velocity, integrated with the current step size (the
  references re-add the last latent increment, which is wrong where step sizes differ: the
  t^2 + shift grid is far from uniform);
- base models' three guidance passes each have their own policy state and K/V cache (branch
  0 text + history, 1 history only, 2 the chunk alone); the references serve distilled models only;
- any step count, i2v/v2v prefixes, the heatmap and the report fields of SkyReels.
Like both references, cached runs drop the distilled models' nearly-clean mix.
"""
from __future__ import annotations

import torch

from ..cache_core.chunk_step import ChunkStep, ChunkView
from ..cache_core.errors import InputError
from ..cache_core.magi_schedule import ForwardStep, first_key_chunk
from ..cache_core.run_report import derive_savings
from .magi_model import ChunkForward, kv_store, tokens_to_video, video_to_tokens

TEXT, HISTORY, ALONE = 0, 1, 2          # branch ids: the base models' guidance passes (distilled: TEXT)


def check_spec(spec) -> None:
    """What of a cache node's settings cannot apply to MAGI-1, refused by name."""
    if spec.attention != "chunk_causal":
        raise InputError("attention", "MAGI-1 attends chunk-causally by design (each chunk to the chunks before "
                         "it), so bidirectional does not apply: choose chunk_causal")


def cached_keep(plan: list[ForwardStep], steps: int, kv_range: tuple) -> int | None:
    """Chunks behind the newest write a cached run reads: every active chunk writes each step,
    and chunk c reads [first_c, c) plus its own rows (token subsets)."""
    if not kv_range:
        return None
    return max(step.end - 1 - min(first_key_chunk(c, j, steps, kv_range) for c, j in zip(step.chunks, step.step_of))
               for step in plan)


class MagiCacheRun:
    """The cache state of one MAGI-1 sampling run: the policy's chunk step, a K/V cache per
    guidance pass. Made by the cache's OUTER_SAMPLE wrapper (`new_run`), bound to the run's plan
    by the sampler (`bind`), dropped by the wrapper in `finally` (`reset`)."""

    def __init__(self, spec):
        check_spec(spec)
        self.spec, self.compress = spec, spec.compress
        self.step = ChunkStep(spec.make_policy())
        self.caches: dict = {}

    @property
    def method(self) -> str:
        return self.step.method

    def bind(self, dm, plan, steps: int, kv_range: tuple, offload: bool, grid_hw: tuple, chunk_frames: int,
             total_frames: int, dtype: torch.dtype, ranks: int = 1) -> None:
        """`ranks`: sequence-parallel ranks, each holding its share of the KV heads."""
        if self.compress is not None and kv_range:
            raise InputError("schedule.kv_range", "is bounded, but the cache node's kv_compress compresses the full "
                             "history, as the MAGI-1 reference does: set the MAGI-1 Schedule's kv_range to all, or "
                             "switch kv_compress off (with 5,4,3,2 the cache is bounded already)")
        self.dm, self.steps, self.kv_range, self.dtype = dm, steps, kv_range, dtype
        self.kv_heads = dm.config.kv_heads // ranks
        self.ht, self.wt = grid_hw
        self.cw = chunk_frames
        self.tokens = chunk_frames * self.ht * self.wt
        keep, chunks = cached_keep(plan, steps, kv_range), total_frames // chunk_frames
        window = max(len(s.step_of) for s in plan)
        self.caches = {b: kv_store(dm.config, chunks, self.tokens, keep=keep, offload=offload, compress=self.compress,
                                   window=window) for b in (TEXT, HISTORY)}
        self.caches[ALONE] = kv_store(dm.config, chunks, self.tokens, keep=window, offload=offload)
        self.heat = torch.zeros(total_frames, self.ht * self.wt)
        self.step.counts["segments"] += 1

    def reset(self) -> None:
        """Free the K/V caches and the policy's state (the cache wrapper's `finally`)."""
        self.caches = {}
        self.step.reset_segment()

    def write_prefix(self, forward, prefix, n: int, t: float, null, null_row: bool, dt) -> None:
        """Whole prefix chunks into every pass's cache that attends to history (clean, self-only)."""
        for b in (TEXT, HISTORY):
            forward(prefix[:, :, :n * self.cw], ChunkForward(0, [t] * n, [null] * n, list(range(n)),
                                                             null_row=null_row, write=tuple(range(n)), dt=dt),
                    self.caches[b])

    def chunk_velocity(self, forward, flops, branch: int, x, c: int, j: int, call: ChunkForward,
                       last: bool = False) -> tuple[torch.Tensor, float]:
        """Velocity [1, C, cw, h, w] of chunk c (absolute) at its step j, for one guidance pass.

        x: the run's whole latent state (model space, prefix written in), chunk c at its input;
        call: the chunk's forward (its time, text, key range); flops(call, cache): its FLOPs;
        last: the run's last forward step, always computed (as the references do).
        Returns the velocity and the FLOPs the chunk would cost computed in full.

        The indicator is the chunk's patch embedding, computed in fp32 and cast to the model's
        dtype before the policy measures its change (the references' rule: bf16 for bf16 weights)."""
        cw, p = self.cw, self.dm.config.patch
        xc = x[:, :, c * cw:(c + 1) * cw]
        cache = self.caches[branch]

        def view() -> ChunkView:
            before = video_to_tokens(x[:, :, c * cw - 1:c * cw], p) if c > 0 else None
            return ChunkView(frames=(0, cw), tokens=self.tokens, local_step=j, latents=video_to_tokens(xc, p),
                             latents_before=before)

        decision = self.step.decide(branch, c, j, self.steps, view=view, force=last,
                                    indicator=lambda: self.dm.embed(xc)[0].to(self.dtype))
        zeros = torch.zeros(1, self.tokens, p * p * xc.shape[1], device=x.device)
        noskip = flops(call, cache)

        def run(tokens):
            return forward(xc, call if tokens is None else call.with_tokens(tokens.to(x.device)), cache)

        v = self.step.apply(branch, c, decision, zeros, run, heat=self.heat[c * cw:(c + 1) * cw].view(-1),
                            level=float(call.t[0]))
        return tokens_to_video(v, cw, self.ht, self.wt, p, xc.shape[1]), noskip

    def chunk_finished(self, chunk: int) -> None:
        """A chunk is finished: its policy state is dropped (a run is one segment, so nothing else
        frees it); with compression (FlowCache B3) finished chunks' K/V squeeze to the budget."""
        for branch in (TEXT, HISTORY, ALONE):
            self.step.forget(branch, chunk)
        if self.compress is None:
            return
        for b in (TEXT, HISTORY):
            self.caches[b].compress_finished(0, chunk, self.kv_heads)

    def summary(self) -> dict:
        s = dict(self.step.counts, method=self.method)
        derive_savings(s)
        s["kv_bytes"] = sum(cache.bytes_allocated() for cache in self.caches.values())
        s["kv_bytes_peak"] = sum(cache.peak_bytes for cache in self.caches.values())
        s["cached_outputs_bytes_peak"] = self.step.outputs.peak_bytes
        s["kv_history_tokens"] = self.caches[TEXT].history_tokens() or self.caches[HISTORY].history_tokens()
        s["kv_budget_tokens"] = None if self.compress is None else self.compress.budget_chunks * self.tokens
        s["kv_cache_chunks"] = {name: self.caches[b].chunks() for name, b in
                                (("text", TEXT), ("history", HISTORY), ("alone", ALONE))}
        return s
