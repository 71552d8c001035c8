"""The Wan 2.1 family (SkyReels-V2-DF) as ComfyUI sees it: a Wan 2.1 text-to-video transformer.

Everything the pack knows about this family lives here: recognising the model (and saying what
it is otherwise), per-frame timesteps for the sampler, the 1.3B model's fps conditioning that
ComfyUI's loader drops, TeaCache-Wan's rescaling polynomials, and the chunk adapter through
which the chunk executor (cache_core) runs ComfyUI's own WanModel modules chunk by chunk.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

import comfy.ldm.common_dit
import comfy.ldm.wan.model
import comfy.model_base
import comfy.ops
import comfy.patcher_extension
import folder_paths
from safetensors import safe_open

from ..cache_core import flops as flop_count
from ..cache_core.chunk_executor import ChunkCall, KVAttention
from ..cache_core.errors import InputError, ModelFamilyError
from ..cache_core.flowcache_policy import IDENTITY, parse_coefficients
from ..cache_core.record import RECORD_KEY, StepRecord, frame_timesteps
from ..cache_core.run_report import REPORT_KEY, RunReport

wan_model = comfy.ldm.wan.model
OVERRIDE_KEY = "optimized_attention_override"

PER_FRAME_KEY = "arcache_per_frame_t"
FPS_KEYS = ("fps_embedding.weight", "fps_projection.0.weight", "fps_projection.0.bias",
            "fps_projection.2.weight", "fps_projection.2.bias")


def describe_model(base) -> str:
    """What a ComfyUI model is, in a user's words: 'a Wan 2.2 model (48 latent channels)'."""
    kind = type(base).__name__
    channels = getattr(getattr(base, "latent_format", None), "latent_channels", None)
    dm = getattr(base, "diffusion_model", None)
    if isinstance(base, comfy.model_base.WAN21) or type(dm).__module__.startswith("comfy.ldm.wan"):
        family = "Wan 2.2" if channels == 48 else "Wan 2.1"
        mtype = getattr(dm, "model_type", None)
        what = f"a {family} {mtype} model" if mtype else f"a {family} model"
        what += f" ({kind}, {type(dm).__name__}"
    else:
        what = f"a {kind} model ({type(dm).__name__}"
    return what + (f", {channels} latent channels)" if channels else ")")


def _core_causal_class():
    """Newer core's own causal Wan (comfy/ldm/wan/ar_model.py, PR #13082), or None (0.3.75 has none)."""
    try:
        from comfy.ldm.wan.ar_model import CausalWanModel
    except ImportError:
        return None
    return CausalWanModel


CAUSAL_MARK = "arcache_causal"    # on a loaded model: where the pack learned its weights are causal (None: not)


def causal_origin(base) -> str | None:
    """How a loaded Wan model is known to be causally trained: the Causal Wan Loader's mark, or newer
    core's causal_ar model type; None when nothing says so (the weights of both kinds look alike)."""
    mark = getattr(base, CAUSAL_MARK, None)
    if mark:
        return mark
    causal = _core_causal_class()
    if causal is not None and isinstance(getattr(base, "diffusion_model", None), causal):
        return "core's causal_ar model type"
    return None


def wan_transformer(model_patcher) -> comfy.ldm.wan.model.WanModel:
    """The WanModel inside a MODEL (SkyReels-V2-DF), or a clear error saying what the model is instead."""
    base = model_patcher.model
    serves = ("the pack serves SkyReels-V2-DF: Wan 2.1 text-to-video transformers with 16 latent "
              "channels, loaded with UNETLoader. Load a SkyReels-V2-DF checkpoint, or use KSampler "
              "for other models.")
    if causal_origin(base):
        raise ModelFamilyError(f"this is {describe_model(base)}, a causal Wan ({causal_origin(base)}): it takes the "
                               "Causal Schedule (ARCacheCausalSchedule), not diffusion forcing")
    dm = _wan_t2v(model_patcher, 16, serves)
    if type(dm) is not comfy.ldm.wan.model.WanModel:
        raise ModelFamilyError(f"this is {describe_model(base)}; {serves}")
    return dm


def causal_wan_transformer(model_patcher) -> comfy.ldm.wan.model.WanModel:
    """The Wan 2.1 t2v transformer inside a MODEL for the causal schedule (a plain WanModel, or newer
    core's CausalWanModel, which has the same weights), or a clear error."""
    serves = ("the Causal Schedule serves few-step causal Wan 2.1 models (Self-Forcing, CausVid, Causal "
                        "Forcing, LongLive 1.0, Krea Realtime): 16 latent channels, text-to-video layout; load one "
                        "with Causal Wan Loader (ARCacheCausalWanLoader) or UNETLoader")
    return _wan_t2v(model_patcher, 16, serves)


def causal_wan22_transformer(model_patcher) -> comfy.ldm.wan.model.WanModel:
    """The Wan2.2-TI2V-5B transformer of a causal model (LongLive 2.0), or a clear error. Only a
    model known to be causal: a plain Wan 2.2 5B is not run chunk by chunk behind the user's back."""
    dm = _wan_t2v(model_patcher, 48, "LongLive 2.0 is a Wan2.2-TI2V-5B model with 48 latent channels")
    if not causal_origin(model_patcher.model):
        raise ModelFamilyError(f"this is {describe_model(model_patcher.model)}: a causal one (LongLive 2.0) "
                               "loads with Causal Wan Loader (ARCacheCausalWanLoader); plain Wan 2.2 models "
                               "are not served")
    return dm


def _wan_t2v(model_patcher, channels: int, serves: str) -> comfy.ldm.wan.model.WanModel:
    base = model_patcher.model
    dm = getattr(base, "diffusion_model", None)
    if (not isinstance(base, comfy.model_base.WAN21) or not isinstance(dm, comfy.ldm.wan.model.WanModel)
            or getattr(dm, "model_type", "t2v") != "t2v" or base.latent_format.latent_channels != channels):
        raise ModelFamilyError(f"this is {describe_model(base)}; {serves}")
    return dm


def flop_shape(dm) -> flop_count.DiTShape:
    """The FLOP shape of a ComfyUI WanModel."""
    return flop_count.DiTShape(dim=dm.dim, ffn_dim=dm.ffn_dim, num_layers=dm.num_layers, text_len=dm.text_len,
                               text_dim=dm.text_dim, freq_dim=dm.freq_dim, in_dim=dm.in_dim, out_dim=dm.out_dim,
                               patch=tuple(dm.patch_size))


def tokens_per_frame(latent_h: int, latent_w: int, patch=(1, 2, 2)) -> int:
    """Transformer tokens per latent frame (the one token count of the FLOP report)."""
    return -(-latent_h // patch[1]) * -(-latent_w // patch[2])


def per_frame_timestep_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                               transformer_options={}, **kwargs):
    """Replace the sampler's scalar timestep with the record's per-frame timesteps [B, F], and
    count the full-window forward when it really runs: a cache outside may have skipped the
    call, and one inside counts its own (chunk-wise) forward, so the count does not depend on
    the order of the wrappers."""
    record: StepRecord | None = transformer_options.get(RECORD_KEY)
    run_report: RunReport | None = transformer_options.get(REPORT_KEY)
    if record is not None and timestep.ndim == 1:
        timestep = frame_timesteps(timestep, record, x.shape[2])
    counted = None if run_report is None else run_report.forwards
    out = executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    if run_report is not None and run_report.forwards == counted:
        dm = executor.class_obj
        tokens = x.shape[2] * tokens_per_frame(x.shape[3], x.shape[4], tuple(dm.patch_size))
        run_report.add_forward(flop_count.window_flops(flop_shape(dm), tokens, x.shape[2], batch=x.shape[0]))
    return out


def install_per_frame_timesteps(model_patcher) -> None:
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PER_FRAME_KEY,
                                       per_frame_timestep_wrapper)


# --- SkyReels-V2-DF-1.3B fps conditioning -------------------------------------------------------
# Upstream adds fps_projection(fps_embedding[idx]) to the 6-way modulation e0 only; in ComfyUI
# e0 = time_projection(e), so the same constant added to time_projection.1.bias is exact.

_fps_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # diffusion_model -> fps tensors


def _find_fps_tensors(dm) -> dict | None:
    """ComfyUI's loader drops the fps keys: find the loaded file among diffusion_models by one
    weight that must match exactly, and read the five fps tensors from it."""
    probe = dm.head.modulation.detach().float().cpu()
    for name in folder_paths.get_filename_list("diffusion_models"):
        if not name.endswith(".safetensors"):
            continue
        path = folder_paths.get_full_path("diffusion_models", name)
        try:
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
                prefix = next((p for p in ("", "model.diffusion_model.") if p + FPS_KEYS[0] in keys), None)
                if prefix is None or prefix + "head.modulation" not in keys:
                    continue
                if not torch.equal(f.get_tensor(prefix + "head.modulation").float(), probe):
                    continue
                return {k: f.get_tensor(prefix + k) for k in FPS_KEYS} | {"file": os.path.basename(path)}
        except Exception as e:  # an unreadable file is not ours to judge here
            logging.debug("ARCache: skipping %s while looking for fps keys: %s", name, e)
    return None


def fps_bias_delta(fps_tensors: dict, fps: int) -> torch.Tensor:
    idx = 0 if fps == 16 else 1  # upstream: index 0 only for 16 fps
    emb = fps_tensors["fps_embedding.weight"].float()[idx]
    h = torch.nn.functional.linear(emb, fps_tensors["fps_projection.0.weight"].float(),
                                   fps_tensors["fps_projection.0.bias"].float())
    return torch.nn.functional.linear(torch.nn.functional.silu(h), fps_tensors["fps_projection.2.weight"].float(),
                                      fps_tensors["fps_projection.2.bias"].float())


def apply_fps_conditioning(model_patcher, fps: int) -> str | None:
    """Restore the 1.3B fps conditioning on a clone as a weight diff; return the source file name."""
    dm = model_patcher.model.diffusion_model
    if dm not in _fps_cache:
        _fps_cache[dm] = _find_fps_tensors(dm)
    tensors = _fps_cache[dm]
    if tensors is None:
        return None
    delta = fps_bias_delta(tensors, fps)
    model_patcher.add_patches({"diffusion_model.time_projection.1.bias": ("diff", (delta,))}, 1.0, 1.0)
    return tensors["file"]


# --- TeaCache-Wan2.1 rescaling polynomials (FlowCache's indicator) --------------------------------
# T2V coefficients with use_ret_steps (the set every FlowCache script uses), highest power first:
# P(d) = c0 d^4 + c1 d^3 + c2 d^2 + c3 d + c4 (specs/flowcache.md A2).
COEFFICIENTS: dict[str, tuple[float, ...]] = {
    "1.3B": (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02),
    "14B": (-3.03318725e+05, 4.90537029e+04, -2.65530556e+03, 5.87365115e+01, -3.15583525e-01),
    "none": IDENTITY,
}
_DIM_TO_SIZE = {1536: "1.3B", 5120: "14B"}   # hidden sizes of the Wan 2.1 family, for "auto"


def resolve_coefficients(name, model_dim: int | None = None) -> tuple[float, ...]:
    """Coefficients for `auto | 1.3B | 14B | none` or an explicit list. `auto` picks by the
    model's hidden size and falls back to the identity where no fitted polynomial exists."""
    if not isinstance(name, str):
        return parse_coefficients(name)
    key = name.strip()
    if key.lower() == "auto":
        key = _DIM_TO_SIZE.get(int(model_dim), "none") if model_dim is not None else "none"
    for known in COEFFICIENTS:
        if known.lower() == key.lower():
            return COEFFICIENTS[known]
    raise InputError("coefficients", f"unknown value {name!r}; expected auto, 1.3B, 14B or none")


# --- the chunk adapter ------------------------------------------------------------------------------

def supports_chunks(dm) -> bool:
    """True for a plain Wan 2.1-style WanModel whose blocks we can run chunk by chunk."""
    return (isinstance(dm, wan_model.WanModel) and type(dm).forward_orig is wan_model.WanModel.forward_orig
            and tuple(dm.patch_size)[0] == 1)


class _SelfAttentionHook:
    """optimized_attention_override for one chunk forward: inside a block the self-attention
    call comes first, so the first attention call after `begin_block` goes through the chunk's
    KVAttention; every other call (text cross-attention) passes through. An override already
    installed by someone else is chained."""

    def __init__(self, attention: KVAttention, previous=None):
        self.attention, self.previous = attention, previous
        self.layer = -1
        self.expect_self = False

    def begin_block(self, index: int) -> None:
        self.layer = index
        self.expect_self = True

    def _attend(self, func, q, k, v, args, kwargs):
        if self.previous is not None:
            return self.previous(func, q, k, v, *args, **kwargs)
        return func(q, k, v, *args, **kwargs)

    def __call__(self, func, q, k, v, *args, **kwargs):
        if not self.expect_self:
            return self._attend(func, q, k, v, args, kwargs)
        self.expect_self = False
        if kwargs.get("skip_reshape", False) or kwargs.get("mask") is not None:
            raise RuntimeError("chunked Wan: unexpected self-attention layout (skip_reshape/mask)")
        heads = kwargs["heads"] if "heads" in kwargs else args[0]

        def attend(q_, k_, v_, heads=heads):       # a sequence-parallel attention attends with its share of heads
            a, kw = args, kwargs
            if "heads" in kwargs:
                kw = dict(kwargs, heads=heads)
            else:
                a = (heads, *args[1:])
            return self._attend(func, q_, k_, v_, a, kw)
        return self.attention(self.layer, q, k, v, heads, attend)


def _linear_fp32(layer, x: torch.Tensor) -> torch.Tensor:
    """layer(x) computed in float32 whatever the stored dtype (weights cast through comfy.ops,
    so lowvram offload and LoRA weight functions apply as in the model's own forward)."""
    if hasattr(layer, "comfy_cast_weights"):
        weight, bias = comfy.ops.cast_bias_weight(layer, x, dtype=torch.float32, device=x.device)[:2]
    else:
        weight = layer.weight.to(x.device, torch.float32)
        bias = None if layer.bias is None else layer.bias.to(x.device, torch.float32)
    return torch.nn.functional.linear(x, weight, bias)


class WanChunkAdapter:
    """ComfyUI's WanModel for the chunk executor, through the model's own modules only."""

    def __init__(self, dm):
        if not supports_chunks(dm):
            raise ModelFamilyError(f"chunk-wise caches serve plain Wan 2.1 transformers, not {type(dm).__name__}")
        self.dm = dm
        self.num_layers = len(dm.blocks)
        self.flops = flop_shape(dm)

    def embed(self, x, timestep, context, transformer_options: dict, record=None, clip_fea=None,
              time_dim_concat=None, **kwargs) -> ChunkCall:
        """The whole window's embeddings: patch embedding, per-frame time embedding e [B, F, dim]
        and modulation e0 [B, F, 6, dim], text embedding."""
        if time_dim_concat is not None or kwargs.get("reference_latent") is not None:
            raise ModelFamilyError("chunk-wise caches cannot serve time_dim_concat / reference_latent inputs; "
                                   "remove the node that adds them, or the cache")
        if kwargs.get("context_latents") is not None:
            raise ModelFamilyError("chunk-wise caches cannot serve in-context reference latents (context_latents, "
                                   "core's reference nodes); remove that node, or the cache")
        dm = self.dm
        bs, _, f, h, w = x.shape
        x = comfy.ldm.common_dit.pad_to_patch_size(x, dm.patch_size)
        t = frame_timesteps(timestep, record, f)
        xe = dm.patch_embedding(x.float()).to(x.dtype)
        grid = xe.shape[2:]
        xe = xe.flatten(2).transpose(1, 2)                                   # [B, L, dim]
        e = dm.time_embedding(wan_model.sinusoidal_embedding_1d(dm.freq_dim, t.flatten()).to(dtype=xe.dtype))
        e = e.reshape(bs, f, -1)                                             # [B, F, dim]
        e0 = dm.time_projection(e).unflatten(2, (6, dm.dim))                 # [B, F, 6, dim]
        ctx = dm.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            if dm.img_emb is not None:
                ctx = torch.concat([dm.img_emb(clip_fea), ctx], dim=1)
            context_img_len = clip_fea.shape[-2]
        p1, p2 = dm.patch_size[1:]

        def token_grid_latents(x=x, c=x.shape[1]):       # the input latent on the token grid
            lat = x.reshape(bs, c, f, grid[1], p1, grid[2], p2).permute(0, 2, 3, 5, 1, 4, 6)
            return lat.reshape(bs, f * grid[1] * grid[2], c * p1 * p2)
        return ChunkCall(tokens=xe, timesteps=t, tokens_per_frame=grid[1] * grid[2], shape_key=tuple(x.shape[1:]),
                         extra=dict(e=e, e0=e0, ctx=ctx, context_img_len=context_img_len, grid=grid, hw=(h, w),
                                    options=transformer_options, freqs={}, frame_offset=0),
                         make_latents=token_grid_latents)

    def indicators(self, call: ChunkCall, frames) -> torch.Tensor:
        """FlowCache's indicator, the 6-way modulation e0 of the given frames [B, n, 6, dim],
        built in float32 from a float64 sinusoid as the reference does (its time embedding runs
        under fp32 autocast); the model's own e0 is in its dtype, and bf16 rounding can move
        the accumulated distance across the threshold."""
        dm, t = self.dm, call.timesteps[:, list(frames)]
        half = dm.freq_dim // 2      # Wan's [cos, sin] sinusoid, in float64 (ComfyUI's is float32)
        angles = torch.outer(t.flatten().double(), torch.pow(10000.0, -torch.arange(
            half, device=t.device, dtype=torch.float64) / half))
        h = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()
        for layer in (*dm.time_embedding, *dm.time_projection):
            h = _linear_fp32(layer, h) if isinstance(layer, torch.nn.Linear) else layer(h)
        return h.reshape(*t.shape, 6, dm.dim)

    def run_blocks(self, call: ChunkCall, rows, frames, h, attention: KVAttention, tokens=None) -> torch.Tensor:
        """The model's blocks on the tokens of frames [f0, f1) (or their subset `tokens`, with
        RoPE and modulation gathered at their true positions). Per block it does what the newest
        core's forward does: block_index/total_blocks/block_type/grid_sizes in
        transformer_options, `patches_replace` double blocks, then `patches["double_block"]`.
        Patches see the chunk's tokens; transformer_options["arcache_chunk_tokens"] gives
        their token range in the window."""
        dm, ex = self.dm, call.extra
        f0, f1 = frames
        xe = call.tokens
        if f0 not in ex["freqs"]:
            ex["freqs"][f0] = dm.rope_encode(f1 - f0, ex["hw"][0], ex["hw"][1], t_start=f0 + ex["frame_offset"],
                                             device=xe.device,
                                             dtype=xe.dtype, transformer_options=ex["options"])
        freqs, e0 = ex["freqs"][f0], ex["e0"][rows, f0:f1]
        if tokens is not None:       # per-token modulation and RoPE of the selected tokens
            freqs = freqs[:, tokens]
            e0 = e0.repeat_interleave(call.tokens_per_frame, dim=1)[:, tokens]
        hook = _SelfAttentionHook(attention, ex["options"].get(OVERRIDE_KEY))
        opts = dict(ex["options"])
        opts[OVERRIDE_KEY] = hook
        opts.update(total_blocks=len(dm.blocks), block_type="double", grid_sizes=(f1 - f0, *ex["grid"][1:]),
                    arcache_chunk_tokens=(f0 * call.tokens_per_frame, f1 * call.tokens_per_frame))
        ctx, context_img_len = ex["ctx"][rows], ex["context_img_len"]
        blocks_replace = opts.get("patches_replace", {}).get("dit", {})
        after_block = opts.get("patches", {}).get("double_block", ())
        h_input = h
        for i, block in enumerate(dm.blocks):
            opts["block_index"] = i
            hook.begin_block(i)
            if ("double_block", i) in blocks_replace:
                def block_wrap(args, block=block):
                    return {"img": block(args["img"], context=args["txt"], e=args["vec"], freqs=args["pe"],
                                         context_img_len=context_img_len, transformer_options=args["transformer_options"])}
                h = blocks_replace[("double_block", i)](
                    {"img": h, "txt": ctx, "vec": e0, "pe": freqs, "transformer_options": opts},
                    {"original_block": block_wrap})["img"]
            else:
                h = block(h, e=e0, freqs=freqs, context=ctx, context_img_len=context_img_len, transformer_options=opts)
            for patch in after_block:
                h = patch({"img": h, "x": h_input, "vec": e0, "block_index": i, "img_offset": 0,
                           "transformer_options": opts})["img"]
        return h

    def head(self, call: ChunkCall, h: torch.Tensor, tokens=None) -> torch.Tensor:
        """The head on all tokens, or on the subset `tokens` (its time embedding gathered per token)."""
        e = call.extra["e"]
        if tokens is not None:
            e = e.repeat_interleave(call.tokens_per_frame, dim=1)[:, tokens]
        return self.dm.head(h, e)

    def finish(self, call: ChunkCall, out: torch.Tensor) -> torch.Tensor:
        f, (h, w) = call.frames, call.extra["hw"]
        return self.dm.unpatchify(out, call.extra["grid"])[:, :, :f, :h, :w]
