"""The chunk executor: one AR window run chunk by chunk, for any model family and any cache.

Plain torch, no ComfyUI. It knows chunks, CFG branches, K/V and accounting, and no model:
a *family adapter* (model_patches/) provides the model operations and a *policy* (one file per
caching method) answers, per chunk and call, COMPUTE, SKIP or SUBSET(tokens).

One call (`ChunkExecutor.forward`):

- the adapter has embedded the whole window (`ChunkCall`: tokens [B, L, dim], per-frame
  timesteps, what its blocks and head need);
- the window is split into chunks of `chunk_frames` latent frames (the last may be shorter).
  A chunk is *active* when the sampler steps any of its frames in this call. Per CFG branch,
  chunks are walked in ascending order up to the last active one:
  - an active chunk asks the policy: COMPUTE runs the blocks on the chunk, SKIP reuses the
    policy's residual (no block runs; its K/V stay as last written), SUBSET runs the blocks on
    some of its tokens only (their K/V are rewritten, the others' kept);
  - an inactive chunk never written in this segment (history) is computed once, so later
    chunks can attend to it; an inactive written chunk is finished: frozen, not forwarded;
  - chunks after the last active one have not started and are not forwarded;
- a chunk is frozen right after its last step (its `steps`-th active call), so the next chunk
  of the same call already attends to its final, possibly compressed, K/V; a history chunk is
  frozen from the call after the one that wrote it;
- the head runs on all tokens; tokens of chunks that were not forwarded come back as exact
  zeros (velocity 0: a frame that is not stepped does not move).

Self-attention goes through `KVAttention`: each chunk writes its K/V into the KV store and
attends to the keys of chunks first..last (chunk-causal: 0..itself). Branch rows follow the
caller's `branches` ({branch id: rows}), so cond and uncond batched together or called
separately behave the same. The executor is also the run state: one object per sampling run,
`reset()` at its end; a new AR window (or a new shape) starts a new segment by itself.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from .chunk_step import COMPUTE, ChunkPolicy, ChunkStep, ChunkView
from .errors import InputError
from .flops import FlopModel
from .kv_store import ChunkLayout, CompressConfig, KVStore
from .record import StepRecord
from .seq_parallel import NO_SP, SeqParallel

# chunk_causal: the papers' restructuring, chunk g attends to chunks 0..g, finished chunks frozen.
# bidirectional: the window attends as in the uncached model (every chunk forwarded each call);
# a skipped chunk's or reused token's K/V are the last ones computed.
ATTENTION_MODES = ("chunk_causal", "bidirectional")


# --- what a model family provides -------------------------------------------------------------

@dataclass
class ChunkCall:
    """One model call, embedded by the adapter. `extra` is the adapter's own (modulation,
    context, RoPE cache, ...); the executor never looks inside."""
    tokens: torch.Tensor          # [B, L, dim] embedded input tokens, frame-major
    timesteps: torch.Tensor       # [B, F] per-frame model timesteps
    tokens_per_frame: int
    shape_key: tuple              # changes when the latent's shape changes (a new segment)
    extra: dict = field(default_factory=dict)
    make_latents: Optional[Callable] = None  # () -> [B, L, C*p] the input latent on the token grid

    @property
    def frames(self) -> int:
        return int(self.timesteps.shape[1])

    @functools.cached_property
    def latents(self) -> Optional[torch.Tensor]:
        """Built on first use only: most policies never look at the latent."""
        return None if self.make_latents is None else self.make_latents()


class ChunkAdapter(Protocol):
    """The few model operations the executor needs (one implementation per model family)."""
    flops: FlopModel           # the family's FLOP model
    num_layers: int

    def indicators(self, call: ChunkCall, frames: Sequence[int]) -> torch.Tensor:
        """Policy indicators [B, len(frames), ...] (float32) of the given frames."""

    def run_blocks(self, call: ChunkCall, rows, frames: tuple[int, int], h: torch.Tensor,
                   attention: "KVAttention", tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The blocks on the tokens of frames [f0, f1) (or their subset `tokens`), with
        self-attention through `attention(layer, q, k, v, heads, attend)`."""

    def head(self, call: ChunkCall, h: torch.Tensor) -> torch.Tensor:
        """Head on all tokens: [B, L, dim] -> [B, L, out] (token space)."""

    def finish(self, call: ChunkCall, out: torch.Tensor) -> torch.Tensor:
        """Token-space output -> the model's output tensor."""


class KVAttention:
    """Self-attention of one chunk forward through the KV store: squeeze the finished history
    (with compression on), write this chunk's K/V (all its tokens or `tokens`), attend to the
    keys of chunks first..last."""

    def __init__(self, store: KVStore, branch: int, chunk: int, first: int = 0, last: Optional[int] = None,
                 tokens: Optional[torch.Tensor] = None):
        self.store, self.branch, self.chunk, self.tokens = store, branch, chunk, tokens
        self.first, self.last = first, chunk if last is None else last
        self.key_len: Optional[int] = None   # keys seen at layer 0 (for FLOPs)

    def __call__(self, layer: int, q, k, v, heads: int, attend):
        self.store.maybe_compress(self.branch, layer, q, heads)
        self.store.write(self.branch, layer, self.chunk, k, v, self.tokens)
        k, v = self.store.visible(self.branch, layer, self.last, self.first)
        if layer == 0:
            self.key_len = k.shape[1]
        return attend(q, k, v)


class PassAttention:
    """Self-attention of a pass that computes every token it attends to (a bidirectional window whose
    policy never reuses): nothing is stored, as in the uncached model."""
    key_len: Optional[int] = None

    def __call__(self, layer: int, q, k, v, heads: int, attend):
        if layer == 0:
            self.key_len = k.shape[1]
        return attend(q, k, v)


def branch_rows(cond_or_uncond: Optional[Sequence[int]], batch: int) -> dict:
    """{branch id: rows} from ComfyUI's cond_or_uncond (each entry covers batch/len rows)."""
    if not cond_or_uncond:
        return {0: slice(0, batch)}
    if batch % len(cond_or_uncond):
        raise ValueError(f"batch {batch} is not a multiple of cond_or_uncond {list(cond_or_uncond)}")
    per = batch // len(cond_or_uncond)
    rows: dict = {}
    for i, b in enumerate(cond_or_uncond):
        rows.setdefault(int(b), []).extend(range(i * per, (i + 1) * per))
    out = {}
    for b, r in rows.items():   # contiguous rows index as a view
        out[b] = slice(r[0], r[-1] + 1) if r == list(range(r[0], r[-1] + 1)) else torch.tensor(r)
    return out


# --- the executor, which is also the run state -------------------------------------------------------

class ChunkExecutor:
    """Chunk-by-chunk execution of one sampling run, with a policy and a KV store.

    chunk_frames: latent frames per chunk when the sampler publishes no record (with one, the
        record's causal block size). compress: squeeze finished chunks' K/V to a budget.
    """

    def __init__(self, policy: ChunkPolicy, chunk_frames: int = 5, compress: Optional[CompressConfig] = None,
                 attention: str = "chunk_causal"):
        check_attention(attention, compress)
        self.chunk_frames, self.compress = int(chunk_frames), compress
        self.bidirectional = attention == "bidirectional"
        self.step = ChunkStep(policy)
        self.reset()

    @property
    def method(self) -> str:
        return self.step.method

    @property
    def counts(self) -> dict:
        return self.step.counts

    def reset(self) -> None:
        """Forget everything (K/V buffers freed); the counts restart too."""
        self.step = ChunkStep(self.step.policy)
        self.step.reset_segment()
        self.store: Optional[KVStore] = None
        self._kv_peak = 0
        self._segment = None
        self._last_call = -1
        self._last_t: Optional[float] = None
        self._local_steps: dict = {}      # (branch, chunk) -> active calls so far in this segment
        self._reported: dict = {}         # summary at the last merge into the run report

    def summary(self) -> dict:
        """The counts so far, with the K/V peak."""
        out = dict(self.counts)
        out["kv_bytes_peak"] = max(self._kv_peak, 0 if self.store is None else self.store.peak_bytes)
        out["cached_outputs_bytes_peak"] = self.step.outputs.peak_bytes
        return out

    # -- segments ----------------------------------------------------------------------------------
    def _begin_call(self, call: ChunkCall, layout: ChunkLayout, record: Optional[StepRecord], num_layers: int):
        key = (None if record is None else (record.window_index, record.prompt_switches), call.shape_key, layout)
        new = key != self._segment
        if record is not None:
            new = new or record.call < self._last_call
            self._last_call = record.call
        else:  # a plain sampler: a rising timestep means a new run through the same shapes
            t_max = float(call.timesteps.max())
            new = new or (self._last_t is not None and t_max > self._last_t + 1e-3)
            self._last_t = t_max
        if not new:
            return
        self._segment = key
        self.step.reset_segment()
        self._local_steps.clear()
        if self.store is not None:
            self._kv_peak = max(self._kv_peak, self.store.peak_bytes)
            self.store.reset()
        # bidirectional: one slot for the whole window, written token by token
        store_layout = ChunkLayout((layout.total,)) if self.bidirectional else layout
        budget = None if self.compress is None else self.compress.budget_chunks * max(layout.chunk_tokens)
        self.store = KVStore(store_layout, num_layers=num_layers, compress=self.compress, budget_tokens=budget)
        self.counts["segments"] += 1

    def _reset_branch(self, branch: int) -> None:
        self.store.reset_branch(branch)
        self.step.reset_branch(branch)
        for key in [k for k in self._local_steps if k[0] == branch]:
            del self._local_steps[key]

    def _view(self, call: ChunkCall, rows, layout: ChunkLayout, g: int, frames, local: int) -> ChunkView:
        s, e = layout.start(g), layout.end(g)
        lat = before = None
        if call.latents is not None:
            lat = call.latents[rows, s:e]
            if s > 0:
                before = call.latents[rows, s - call.tokens_per_frame:s]
        return ChunkView(frames=frames, tokens=e - s, local_step=local, latents=lat, latents_before=before)

    def _decide(self, call, rows, branch: int, g: int, active: bool, layout, frames, indicators, steps):
        """(decision, local step) for chunk g, or (None, None) when it is finished and frozen."""
        if active:
            local = self._local_steps.get((branch, g), 0)
            decision = self.step.decide(branch, g, local, steps,
                                        view=lambda: self._view(call, rows, layout, g, frames, local),
                                        indicator=lambda: indicators[rows, g])
            return decision, local
        if self.bidirectional or not self.store.is_written(branch, g):
            return COMPUTE, None   # history (chunk-causal: once per segment); bidirectional: every call
        return None, None

    def _stepped(self, branch: int, g: int, local: Optional[int], steps: int) -> None:
        """After an active chunk's call: one more local step; its last one freezes it (chunk-causal:
        before the next chunk of the same call attends to it)."""
        if local is None:
            return
        self._local_steps[(branch, g)] = local + 1
        if local + 1 >= steps:               # finished: never asked again, its cached outputs go
            self.step.outputs.forget(branch, g)
            if not self.bidirectional:
                self.store.freeze(branch, g)

    # -- one model call ------------------------------------------------------------------------------
    def forward(self, adapter: ChunkAdapter, call: ChunkCall, record: Optional[StepRecord], branches: dict,
                steps: int, report=None, sp: SeqParallel = NO_SP) -> torch.Tensor:
        """One chunk-wise call: the model's output for `call` (see the module docstring).

        record: the sampler's StepRecord (None: every chunk active, chunks of chunk_frames);
        branches: {branch id: batch rows}; steps: denoising steps every chunk walks (its last one
        freezes it); report: the sampler's RunReport, if one is running; sp: the ranks this call's
        tokens are split across (each block pass sharded, everything else replicated, the decisions
        checked equal on every rank after the call)."""
        bs, f = call.tokens.shape[0], call.frames
        chunk_frames = int(record.chunk_frames) if record is not None else self.chunk_frames
        layout = ChunkLayout.from_frames(f, chunk_frames, call.tokens_per_frame)
        n_chunks = layout.num_chunks
        act = record.active.detach().bool().cpu().tolist() if record is not None else [True] * f
        active = [any(act[g * chunk_frames:(g + 1) * chunk_frames]) for g in range(n_chunks)]
        # a chunk's indicator frame is its first active one: a chunk that starts with history
        # frames (a prefix that is not a multiple of the chunk) must not measure their constant t
        probe = [next((i for i in range(g * chunk_frames, min((g + 1) * chunk_frames, f)) if act[i]),
                      g * chunk_frames) for g in range(n_chunks)]
        indicators = adapter.indicators(call, probe) if self.step.policy.needs_indicator else None
        levels = call.timesteps.detach().float().cpu() if self.step.predicts else None   # one sync per call

        def level(rows, g: int) -> float:      # chunk g's noise level: its indicator frame's timestep
            return 0.0 if levels is None else float(levels[range(bs)[rows][0] if isinstance(rows, slice)
                                                           else rows[0], probe[g]])
        self._begin_call(call, layout, record, adapter.num_layers)
        store, flops = self.store, adapter.flops

        out_h = torch.zeros_like(call.tokens)
        heat = torch.zeros(layout.total) if report is not None else None   # token-steps computed, per token
        forwarded = {}                       # branch -> (rows, chunks forwarded this call)
        call_flops = noskip_flops = 0.0
        for branch, rows in branches.items():
            n_rows = len(range(bs)[rows]) if isinstance(rows, slice) else len(rows)
            if self.bidirectional:
                if store.batch_rows(branch) not in (None, n_rows):
                    self._reset_branch(branch)
                spent, noskip = self._window_pass(adapter, call, rows, branch, layout, chunk_frames, active,
                                                  indicators, steps, out_h, n_rows, heat,
                                                  lambda g, rows=rows: level(rows, g), sp)
                call_flops, noskip_flops = call_flops + spent, noskip_flops + noskip
                forwarded[branch] = (rows, set(range(n_chunks)))
                continue
            if store.batch_rows(branch) not in (None, n_rows) or any(
                    active[g] and store.is_frozen(branch, g) for g in range(n_chunks)):
                self._reset_branch(branch)
            for g in range(n_chunks):        # finished chunks are never written again
                if not active[g] and store.is_written(branch, g) and not store.is_frozen(branch, g):
                    store.freeze(branch, g)
            last = max((g for g in range(n_chunks) if active[g]), default=-1)
            store.plan(branch, last)         # chunks <= last are all written below: grow K/V once
            done, computed, skipped, key_lengths, query_tokens = set(), [], [], {}, {}
            for g in range(last + 1):
                s, e_tok = layout.start(g), layout.end(g)
                f0, f1 = g * chunk_frames, min((g + 1) * chunk_frames, f)
                h_in = call.tokens[rows, s:e_tok]
                decision, local = self._decide(call, rows, branch, g, active[g], layout, (f0, f1), indicators, steps)
                if decision is None:
                    self.step.frozen()
                    continue

                def run(tokens, g=g, f0=f0, f1=f1, h_in=h_in):
                    attention = KVAttention(store, branch, g, tokens=tokens)
                    h_new = sp.run_blocks(adapter, call, rows, (f0, f1), h_in if tokens is None else h_in[:, tokens],
                                          attention, tokens)
                    computed.append(g)
                    key_lengths[g] = attention.key_len if attention.key_len is not None else layout.end(g)
                    if tokens is not None:
                        query_tokens[g] = int(tokens.numel())
                    return h_new

                if decision.kind == "skip":
                    skipped.append(g)
                out_h[rows, s:e_tok] = self.step.apply(branch, g, decision, h_in, run, active=local is not None,
                                                       heat=None if heat is None else heat[s:e_tok],
                                                       level=level(rows, g))
                self._stepped(branch, g, local, steps)
                done.add(g)
            forwarded[branch] = (rows, done)
            call_flops += flops.chunk_causal(layout.chunk_tokens, computed, key_lengths, frames=f, batch=n_rows,
                                             query_tokens=query_tokens)
            noskip_flops += flops.chunk_causal(layout.chunk_tokens, computed + skipped, key_lengths, frames=f,
                                               batch=n_rows)

        out = adapter.head(call, out_h)
        for rows, done in forwarded.values():
            for g in range(n_chunks):
                if g not in done:
                    out[rows, layout.start(g):layout.end(g)] = 0
        out = adapter.finish(call, out)
        self.step.add_flops(call_flops, noskip_flops, flops.window(layout.total, f, bs))
        if sp.active:
            sp.agree(self.step.fingerprint(), "a model call's cache decisions")
        if report is not None:
            report.add_forward(call_flops)
            self._reported = report.merge_cache(self.method, self.summary(), self._reported)
            report.add_heat(0 if record is None else record.window_index, heat, call.tokens_per_frame)
        return out

    def _window_pass(self, adapter, call, rows, branch, layout, chunk_frames, active, indicators, steps,
                     out_h, n_rows, heat, level, sp) -> tuple[float, float]:
        """Bidirectional attention: every token the decisions select runs through the blocks in one
        pass over the window, attending to all of it (the others through their last K/V)."""
        f, total = call.frames, layout.total
        decisions, parts = {}, []
        for g in range(layout.num_chunks):
            frames = (g * chunk_frames, min((g + 1) * chunk_frames, f))
            decisions[g] = self._decide(call, rows, branch, g, active[g], layout, frames, indicators, steps)
            d, s = decisions[g][0], layout.start(g)
            if d.kind == "compute":
                parts.append(torch.arange(s, layout.end(g)))
            elif d.kind == "subset":
                parts.append(s + d.tokens.cpu())
            if d.kind != "compute" and not self.step.policy.reuses:
                raise ValueError(f"{type(self.step.policy).__name__} answered {d.kind} but does not say it reuses "
                                 "(set reuses = True): the window's K/V would not have been kept")
        tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        h_all = call.tokens[rows]
        new = None
        if tokens.numel():
            whole = tokens.numel() == total
            index = None if whole else tokens.to(h_all.device)
            attention = KVAttention(self.store, branch, 0, tokens=index) if self.step.policy.reuses else \
                PassAttention()
            h_sel = sp.run_blocks(adapter, call, rows, (0, f), h_all if whole else h_all[:, index], attention, index)
            new = h_sel if whole else h_all.new_zeros(h_all.shape).index_copy_(1, index, h_sel)
        for g, (d, local) in decisions.items():
            s, e = layout.start(g), layout.end(g)

            def run(tokens, s=s, e=e):       # this chunk's part of the window pass
                return new[:, s:e] if tokens is None else new[:, s:e][:, tokens]

            out_h[rows, s:e] = self.step.apply(branch, g, d, h_all[:, s:e], run, active=local is not None,
                                               heat=None if heat is None else heat[s:e], level=level(g))
            self._stepped(branch, g, local, steps)
        flops = adapter.flops
        spent = flops.chunk_causal((total,), [0] if tokens.numel() else [], {0: total}, frames=f, batch=n_rows,
                                   query_tokens={0: int(tokens.numel())})
        noskip = flops.chunk_causal((total,), [0], {0: total}, frames=f, batch=n_rows)
        return spent, noskip


def check_attention(attention: str, compress: Optional[CompressConfig]) -> None:
    """Settings a DF window cannot run, refused by name before any work."""
    if attention not in ATTENTION_MODES:
        raise InputError("attention", f"{attention!r}: choose one of {', '.join(ATTENTION_MODES)}")
    if attention == "bidirectional" and compress is not None:
        raise InputError("kv_compress", "compresses finished chunks' K/V, which exist only with attention "
                                        "chunk_causal: switch kv_compress off or use chunk_causal")
