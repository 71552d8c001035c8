"""Chunk-causal execution of ComfyUI's WanModel, with FlowCache skipping (specs/flowcache.md A1-A3, 7).

`forward_chunked` replaces one call of `WanModel._forward` (it is meant to be called from a
DIFFUSION_MODEL wrapper instead of `executor(...)`). It uses only the model's own modules:

1. embed the whole window: patch_embedding, per-frame time_embedding/time_projection
   (e [B, F, dim], e0 [B, F, 6, dim]), text_embedding;
2. split the tokens into chunks of `chunk_frames` latent frames (the last may be shorter) and,
   per CFG branch, walk the chunks in ascending order up to the last active one:
   - an ACTIVE chunk asks the FlowCache policy (its indicator, the chunk's first active frame's
     modulation, built in float32 like the reference's); "skip" sets h = x + residual (no block runs,
     its K/V stay as last written), "compute" runs the model's blocks on the chunk alone with
     RoPE from `rope_encode(..., t_start=first frame of the chunk)` and its own e0 slice;
   - an inactive chunk never written in this segment (the history prefix) is computed once,
     without a residual, so later chunks can attend to it;
   - an inactive chunk already written is finished: frozen, not forwarded again. An active
     chunk is frozen right after its last step, so the next chunk of the same call already
     attends to its (possibly compressed) final K/V, as in the reference; a history chunk is
     frozen from the call after the one that wrote it;
   - chunks after the last active one (not started) are not forwarded;
3. head on all tokens with per-frame e, unpatchify. Frames of chunks that were not forwarded
   are returned as exact zeros (velocity 0: a frame that is not stepped does not move); the
   sampler only reads active frames.

Self-attention is hooked through `transformer_options["optimized_attention_override"]` (no
copied block forward): inside a block the self-attention call comes first, so the hook treats
the first attention call after `begin_block` as self-attention. It writes the chunk's post-RoPE
K/V into the KV store, optionally squeezes the frozen history, and attends the chunk's queries
to the visible K/V (history + chunks up to this one). Every other call (text cross-attention)
passes through unchanged; an override already installed by someone else is chained.
K/V memory: a chunk's slots are allocated when it starts (`store.plan` lets the chunks that
start in one call share one allocation); with compression the squeeze of a finished chunk
frees the tail the next chunk takes, so in asynchronous schedules the store holds budget +
active chunks, while in synchronous ones (all chunks active) it holds the window (kv_store).

Branches: batch rows follow `transformer_options["cond_or_uncond"]` (0 cond, 1 uncond), each
entry repeated B/len times; state (K/V, residuals, counters) is keyed by that id, so cond and
uncond batched together or called separately behave the same.

All state lives in a `WanChunkedState` passed in; nothing is stored on the diffusion model.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

import comfy.ldm.common_dit
import comfy.ops
import comfy.ldm.wan.model as wan_model

from ..cache_core import flops as flop_count
from ..cache_core.flowcache_policy import FlowCacheConfig, FlowCachePolicy
from ..cache_core.kv_store import ChunkLayout, CompressSettings, KVStore
from ..cache_core.record import RECORD_KEY, StepRecord
from ..cache_core.record import REPORT_KEY

OVERRIDE_KEY = "optimized_attention_override"


def supports(diffusion_model) -> bool:
    """True for a plain Wan 2.1-style WanModel whose forward we can run chunk by chunk."""
    return (isinstance(diffusion_model, wan_model.WanModel)
            and type(diffusion_model).forward_orig is wan_model.WanModel.forward_orig
            and tuple(diffusion_model.patch_size)[0] == 1)


class WanChunkedState:
    """What the chunk-causal run keeps between model calls of one sampling run.

    config: FlowCache settings (threshold, warm-up, chunk size without a record, KV budget).
    skip: False runs the chunk-causal restructure only (every active chunk computed, no
        decisions, no residuals kept): the "restructure" baseline.
    Reset happens by itself at a new AR window (record.window_index changes or row goes back),
    on a new latent shape, and (without a record) when the timestep rises again; call
    `reset()` at the end of a sampling run to free the K/V buffers.
    """

    def __init__(self, config: Optional[FlowCacheConfig] = None, skip: bool = True):
        self.config = config or FlowCacheConfig()
        self.skip = skip
        self.policy: Optional[FlowCachePolicy] = None
        self.store: Optional[KVStore] = None
        self._segment = None
        self._last_row = -1
        self._last_t: Optional[float] = None
        self._shape: Optional[flop_count.DiTShape] = None
        self.stats = self._new_stats()
        self._reported: dict = {}        # what has already been added to the sampler's report

    @property
    def method(self) -> str:
        return "flowcache" if self.skip else "chunk_causal"

    @staticmethod
    def _new_stats() -> dict:
        return {"calls": 0, "segments": 0, "chunks_computed": 0, "chunks_skipped": 0,
                "chunks_history": 0, "chunks_frozen": 0, "transformer_flops": 0.0,
                "transformer_flops_chunk_causal": 0.0, "transformer_flops_vanilla": 0.0, "kv_bytes_peak": 0}

    def reset(self) -> None:
        """Forget everything (buffers freed); statistics restart too."""
        self.policy = None
        self.store = None
        self._segment = None
        self._last_row = -1
        self._last_t = None
        self.stats = self._new_stats()
        self._reported = {}

    def _begin_call(self, dm, x_shape, layout: ChunkLayout, record: Optional[StepRecord], t_max: Optional[float]) -> None:
        if self.policy is None:
            self.policy = FlowCachePolicy(self.config, model_dim=dm.dim)
            self._shape = flop_count.DiTShape.from_model(dm)
        key = (None if record is None else record.window_index, tuple(x_shape[1:]), layout)
        new = key != self._segment
        if record is not None:
            new = new or record.row < self._last_row
            self._last_row = record.row
        else:  # a plain sampler: a rising timestep means a new run through the same shapes
            new = new or (self._last_t is not None and t_max > self._last_t + 1e-3)
            self._last_t = t_max
        if new:
            self._segment = key
            self.policy.reset()
            compress = None
            if self.config.kv_compress:
                compress = CompressSettings(
                    budget_tokens=self.config.kv_budget_chunks * max(layout.chunk_tokens),
                    lam=self.config.kv_lambda, kernel=self.config.kv_pool_kernel,
                    max_queries=self.config.max_score_queries)
            if self.store is not None:
                self.stats["kv_bytes_peak"] = max(self.stats["kv_bytes_peak"], self.store.peak_bytes)
                self.store.reset()
            self.store = KVStore(layout, num_layers=len(dm.blocks), compress=compress)
            self.stats["segments"] += 1

    def _reset_branch(self, branch: int) -> None:
        self.store.reset_branch(branch)
        self.policy.reset_branch(branch)

    def summary(self) -> dict:
        """Statistics so far, with the K/V peak."""
        out = dict(self.stats)
        if self.store is not None:
            out["kv_bytes_peak"] = max(out["kv_bytes_peak"], self.store.peak_bytes)
        return out


class _ChunkAttention:
    """optimized_attention_override for one chunk forward: self-attention through the KV store."""

    def __init__(self, store: KVStore, branch: int, chunk: int, previous=None):
        self.store, self.branch, self.chunk, self.previous = store, branch, chunk, previous
        self.layer = -1
        self.expect_self = False
        self.key_len: Optional[int] = None   # keys seen at layer 0 (for FLOPs)

    def begin_block(self, index: int) -> None:
        self.layer = index
        self.expect_self = True

    def _attend(self, func, q, k, v, args, kwargs):
        if self.previous is not None:
            return self.previous(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)

    def __call__(self, func, q, k, v, *args, **kwargs):
        if not self.expect_self:      # cross-attention (or anything after self-attention)
            return self._attend(func, q, k, v, args, kwargs)
        self.expect_self = False
        if kwargs.get("skip_reshape", False) or kwargs.get("mask") is not None:
            raise RuntimeError("chunked Wan: unexpected self-attention layout (skip_reshape/mask)")
        heads = kwargs["heads"] if "heads" in kwargs else args[0]
        self.store.maybe_compress(self.branch, self.layer, q, heads)
        self.store.write(self.branch, self.layer, self.chunk, k, v)
        k, v = self.store.visible(self.branch, self.layer, self.chunk)
        if self.layer == 0:
            self.key_len = k.shape[1]
        return self._attend(func, q, k, v, args, kwargs)


def _branch_rows(transformer_options: dict, batch: int) -> dict:
    """{branch id: rows} from cond_or_uncond (each entry covers batch/len consecutive rows)."""
    cou = transformer_options.get("cond_or_uncond")
    if not cou:
        return {0: slice(0, batch)}
    if batch % len(cou):
        raise ValueError(f"batch {batch} is not a multiple of cond_or_uncond {cou}")
    per = batch // len(cou)
    rows: dict = {}
    for i, b in enumerate(cou):
        rows.setdefault(int(b), []).extend(range(i * per, (i + 1) * per))
    out = {}
    for b, r in rows.items():   # contiguous rows index as a view
        out[b] = slice(r[0], r[-1] + 1) if r == list(range(r[0], r[-1] + 1)) else torch.tensor(r)
    return out


def _frame_timesteps(timestep: torch.Tensor, record: Optional[StepRecord], batch: int, frames: int) -> torch.Tensor:
    """Per-frame timesteps [B, F]: as given, from the record, or the scalar repeated."""
    if timestep.ndim == 2:
        if timestep.shape[1] != frames:
            raise RuntimeError(f"timestep has {timestep.shape[1]} frames, latent has {frames}")
        return timestep
    if record is not None:
        if record.num_frames != frames:
            raise RuntimeError(f"record has {record.num_frames} frames, latent has {frames}")
        t = record.frame_timesteps().to(device=timestep.device, dtype=timestep.dtype)
        return t.unsqueeze(0).expand(batch, -1)
    return timestep.reshape(batch, 1).expand(batch, frames)


def _steps_per_chunk(record: Optional[StepRecord], transformer_options: dict) -> int:
    if record is not None:
        return int(record.steps)
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is not None and len(sigmas) > 1:
        return len(sigmas) - 1
    return 1 << 30   # unknown: no forced final step


def _linear_fp32(layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) computed in float32 whatever the stored dtype (weights cast through comfy.ops,
    so lowvram offload and LoRA weight functions apply as in the model's own forward)."""
    if hasattr(layer, "comfy_cast_weights"):
        weight, bias = comfy.ops.cast_bias_weight(layer, x, dtype=torch.float32, device=x.device)[:2]
    else:
        weight = layer.weight.to(x.device, torch.float32)
        bias = None if layer.bias is None else layer.bias.to(x.device, torch.float32)
    return torch.nn.functional.linear(x, weight, bias)


def _indicators_fp32(dm, t: torch.Tensor) -> torch.Tensor:
    """FlowCache's indicator, the 6-way modulation e0 of the given timesteps [B, n], built in
    float32 from a float64 sinusoid as the reference does (its time embedding runs under fp32
    autocast); the model's own e0 is in its dtype, and bf16 rounding can move the accumulated
    distance across the threshold. Returns [B, n, 6, dim]."""
    half = dm.freq_dim // 2      # Wan's [cos, sin] sinusoid, in float64 (ComfyUI's is float32)
    angles = torch.outer(t.flatten().double(), torch.pow(10000.0, -torch.arange(half, device=t.device,
                                                                            dtype=torch.float64) / half))
    h = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()
    for layer in (*dm.time_embedding, *dm.time_projection):
        h = _linear_fp32(layer, h) if isinstance(layer, torch.nn.Linear) else layer(h)
    return h.reshape(*t.shape, 6, dm.dim)


def _run_blocks(dm, h, e0, freqs, context, context_img_len, opts, hook: _ChunkAttention):
    """The model's own blocks on one chunk (block-replace patches are honoured)."""
    blocks_replace = opts.get("patches_replace", {}).get("dit", {})
    for i, block in enumerate(dm.blocks):
        hook.begin_block(i)
        if ("double_block", i) in blocks_replace:
            def block_wrap(args, block=block):
                return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                     context_img_len=context_img_len, transformer_options=args["transformer_options"])}
            h = blocks_replace[("double_block", i)](
                {"img": h, "txt": context, "vec": e0, "pe": freqs, "transformer_options": opts},
                {"original_block": block_wrap})["img"]
        else:
            h = block(h, e=e0, freqs=freqs, context=context, context_img_len=context_img_len,
                      transformer_options=opts)
    return h


def forward_chunked(dm, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                    transformer_options: dict, state: WanChunkedState,
                    record: Optional[StepRecord] = None, clip_fea: Optional[torch.Tensor] = None,
                    time_dim_concat=None, **kwargs) -> torch.Tensor:
    """One chunk-causal call of `dm` (a ComfyUI WanModel): same inputs/outputs as `dm._forward`.

    timestep: [B] or per-frame [B, F]; with a [B] timestep the record's per-frame timesteps
    are used. record: defaults to transformer_options[RECORD_KEY]; without one every chunk is
    active and chunks have `state.config.chunk_frames` frames.
    """
    if not supports(dm):
        raise TypeError(f"chunked execution supports Wan 2.1 WanModel only, got {type(dm).__name__}")
    if time_dim_concat is not None or kwargs.get("reference_latent") is not None:
        raise NotImplementedError("chunked Wan: time_dim_concat / reference_latent are not supported")
    if record is None:
        record = transformer_options.get(RECORD_KEY)

    bs, _, f, h, w = x.shape
    x = comfy.ldm.common_dit.pad_to_patch_size(x, dm.patch_size)
    t = _frame_timesteps(timestep, record, bs, f)
    chunk_frames = int(record.chunk_frames) if record is not None else state.config.chunk_frames

    # 1. embeddings of the whole window, with the model's own modules
    xe = dm.patch_embedding(x.float()).to(x.dtype)
    grid = xe.shape[2:]
    xe = xe.flatten(2).transpose(1, 2)                                   # [B, L, dim]
    tpf = grid[1] * grid[2]
    e = dm.time_embedding(wan_model.sinusoidal_embedding_1d(dm.freq_dim, t.flatten()).to(dtype=xe.dtype))
    e = e.reshape(bs, f, -1)                                             # [B, F, dim]
    e0 = dm.time_projection(e).unflatten(2, (6, dm.dim))                 # [B, F, 6, dim]
    ctx = dm.text_embedding(context)
    context_img_len = None
    if clip_fea is not None:
        if dm.img_emb is not None:
            ctx = torch.concat([dm.img_emb(clip_fea), ctx], dim=1)
        context_img_len = clip_fea.shape[-2]

    layout = ChunkLayout.from_frames(f, chunk_frames, tpf)
    n_chunks = layout.num_chunks
    act = record.active.detach().bool().cpu().tolist() if record is not None else [True] * f
    active = [any(act[g * chunk_frames:(g + 1) * chunk_frames]) for g in range(n_chunks)]
    # the indicator frame of a chunk is its first active one: a chunk that starts with
    # history frames (prefix not a multiple of the chunk) must not measure their constant t
    probe = [next((i for i in range(g * chunk_frames, min((g + 1) * chunk_frames, f)) if act[i]),
                  g * chunk_frames) for g in range(n_chunks)]
    indicators = _indicators_fp32(dm, t[:, probe]) if state.skip else None   # [B, chunks, 6, dim]
    state._begin_call(dm, x.shape, layout, record, None if record is not None else float(t.max()))
    store, policy = state.store, state.policy
    steps = _steps_per_chunk(record, transformer_options)

    out_h = torch.zeros_like(xe)
    forwarded = {}                       # branch -> (rows, chunks forwarded this call)
    freqs_cache = {}
    call_flops = noskip_flops = 0.0
    previous_override = transformer_options.get(OVERRIDE_KEY)

    # 2. per branch, chunk by chunk
    for branch, rows in _branch_rows(transformer_options, bs).items():
        n_rows = len(range(bs)[rows]) if isinstance(rows, slice) else len(rows)
        if store.rows(branch) not in (None, n_rows) or any(
                active[g] and store.is_frozen(branch, g) for g in range(n_chunks)):
            logging.debug("ARCache: branch %d restarts (rows or activity changed)", branch)
            state._reset_branch(branch)
        for g in range(n_chunks):        # finished chunks are never written again
            if not active[g] and store.is_written(branch, g) and not store.is_frozen(branch, g):
                store.freeze(branch, g)
        last = max((g for g in range(n_chunks) if active[g]), default=-1)
        store.plan(branch, last)         # chunks <= last are all written below: grow K/V once
        done, computed, skipped, key_lengths = set(), [], [], {}
        for g in range(last + 1):
            s, e_tok = layout.start(g), layout.end(g)
            f0, f1 = g * chunk_frames, min((g + 1) * chunk_frames, f)
            h_in = xe[rows, s:e_tok]
            if active[g]:
                st = policy.state(branch, g)
                compute = True
                if state.skip:
                    compute = policy.decide(branch, g, indicators[rows, g], st.local_step, steps)
            elif not store.is_written(branch, g):
                compute, st = True, None           # history chunk: K/V once per segment
            else:
                state.stats["chunks_frozen"] += 1
                continue
            if compute:
                if f0 not in freqs_cache:
                    freqs_cache[f0] = dm.rope_encode(f1 - f0, h, w, t_start=f0, device=xe.device, dtype=xe.dtype,
                                                     transformer_options=transformer_options)
                hook = _ChunkAttention(store, branch, g, previous_override)
                opts = dict(transformer_options)
                opts[OVERRIDE_KEY] = hook
                h_out = _run_blocks(dm, h_in, e0[rows, f0:f1], freqs_cache[f0], ctx[rows],
                                    context_img_len, opts, hook)
                computed.append(g)
                key_lengths[g] = hook.key_len if hook.key_len is not None else layout.end(g)
                if st is not None:
                    policy.record_step(branch, g, True, (h_out - h_in) if state.skip else None)
                    state.stats["chunks_computed"] += 1
                else:
                    state.stats["chunks_history"] += 1
            else:
                h_out = h_in + st.residual
                skipped.append(g)
                policy.record_step(branch, g, False)
                state.stats["chunks_skipped"] += 1
            if st is not None and st.local_step >= steps:
                # its last step: frozen (and compressible) before the next chunk of this call
                # attends to it, as the reference's clean list does
                store.freeze(branch, g)
            out_h[rows, s:e_tok] = h_out
            done.add(g)
        forwarded[branch] = (rows, done)
        call_flops += flop_count.chunk_causal_flops(state._shape, layout.chunk_tokens, computed,
                                                    key_lengths, frames=f, batch=n_rows)
        noskip_flops += flop_count.chunk_causal_flops(state._shape, layout.chunk_tokens, computed + skipped,
                                                      key_lengths, frames=f, batch=n_rows)

    # 3. head on all tokens, zeros for chunks that were not forwarded, unpatchify
    out = dm.head(out_h, e)
    for rows, done in forwarded.values():
        for g in range(n_chunks):
            if g not in done:
                out[rows, layout.start(g):layout.end(g)] = 0
    out = dm.unpatchify(out, grid)[:, :, :f, :h, :w]

    _account(state, transformer_options, call_flops, noskip_flops, layout.total, f, bs)
    return out


def _account(state: WanChunkedState, transformer_options: dict, call_flops: float, noskip_flops: float,
             tokens: int, frames: int, batch: int) -> None:
    """Add this call's FLOPs to the state, and to the sampler's report when one is running.

    The report spans the whole sampler run while a state may be replaced per window, so only
    what is new since the last report is added (peaks are maxed)."""
    state.stats["calls"] += 1
    state.stats["transformer_flops"] += call_flops
    state.stats["transformer_flops_chunk_causal"] += noskip_flops
    state.stats["transformer_flops_vanilla"] += flop_count.window_flops(state._shape, tokens, frames, batch)
    run_report = transformer_options.get(REPORT_KEY)
    if run_report is not None:
        report = run_report.data
        report["transformer_flops"] = report.get("transformer_flops", 0.0) + call_flops
        cache = report.get("cache")
        if not isinstance(cache, dict):
            cache = report["cache"] = {"method": state.method}
        summary = state.summary()
        for key, value in summary.items():
            if key == "kv_bytes_peak":
                cache[key] = max(cache.get(key, 0), value)
            else:
                cache[key] = cache.get(key, 0) + value - state._reported.get(key, 0)
        state._reported = summary
        # where the time went: the chunk-causal restructuring vs skipping redundant chunk steps
        cache["chunk_steps_computed"] = cache["chunks_computed"]
        cache["chunk_steps_skipped"] = cache["chunks_skipped"]
        cache["flops_saved_restructure"] = cache["transformer_flops_vanilla"] - cache["transformer_flops_chunk_causal"]
        cache["flops_saved_skipping"] = cache["transformer_flops_chunk_causal"] - cache["transformer_flops"]


__all__ = ["WanChunkedState", "forward_chunked", "supports", "FlowCacheConfig"]
