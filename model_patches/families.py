"""The model-family registry: `detect(model)` says what a MODEL is and how the pack serves it.

The sampler, the cache nodes, the presets and the preview ask the family instead of comparing
kind strings: latent geometry and frame rules, CFG branches, FLOP model, preview format, the
run that generates its videos (and with it the schedule it takes), the chunk adapter, the cache
run a cache node gets per sampling run and the cache settings it refuses. A new family is one
file (or folder) in model_patches/ plus one entry in FAMILIES.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import comfy.latent_formats
import comfy.ldm.wan.vae
import comfy.ldm.wan.vae2_2

from ..cache_core import causal_schedule, df_schedule
from ..cache_core.chunk_executor import ChunkExecutor, check_attention
from ..cache_core.errors import InputError, ModelFamilyError
from ..cache_core.flowcache_policy import IDENTITY
from . import wan
from .causal_sampling import CausalRun
from .df_sampling import DFRun
from .magi_cache import MagiCacheRun, check_spec as magi_check_spec
from .magi_loader import MagiLatentFormat
from .magi_model import MagiDiT
from .magi_sampling import MagiRun
from .magi_vae import DECODE_TILE, MagiVAE
from .vae_stream import CheckedStreamDecoder, RedecodeStreamDecoder, SlabStreamDecoder, WanStreamDecoder


@dataclass(frozen=True)
class Family:
    name: str                        # e.g. "wan21"
    title: str                       # what users read in messages
    latent_channels: int
    spatial_stride: int              # pixels per latent pixel
    temporal_stride: int             # pixel frames per latent frame after the first (causal VAE)
    latent_format: type              # ComfyUI latent format (preview factors, process_in/out)
    run: type                        # its VideoRun: the schedule it takes, request checks, the sampling loop
    transformer: Callable            # model_patcher -> its diffusion model, or ModelFamilyError
    chunk_adapter: Optional[Callable]  # diffusion model -> adapter for the chunk executor (None: the
                                     # family's run drives its own chunk-wise forward)
    supports_chunks: Callable        # diffusion model -> bool (a cache can run it chunk-wise)
    flops: Callable                  # diffusion model -> its FLOP model (cache_core.flops)
    coefficients: Callable           # (name or list, diffusion model) -> FlowCache polynomial
    prepare_sampling: Callable       # (model clone, schedule) -> report notes; per-frame timesteps etc.
    new_cache_run: Callable          # CacheSpec -> the cache's state for one sampling run
    check_cache_spec: Callable       # CacheSpec -> None, or an InputError naming the setting it cannot run
    indicator_scale: Callable        # (diffusion model, coefficients) -> the presets' table: fitted | raw | magi
    check_vae: Callable              # a VAE -> None, or an InputError when it is another family's
    stream_decoder: Callable         # its VAE -> a stream decoder (model_patches/vae_stream.py)
    causal_vae: bool = True          # 4k+1 pixel frames per k+1 latents (Wan); else 4k per k (MAGI-1)
    piece: str = "window"            # what users read for one emitted piece of its runs
    patch: int = 2                   # latent pixels per transformer token, each way
    default_schedule: Optional[Callable] = None   # () -> the schedule when none is connected (None: the run's type's defaults)
    shard_heads: Callable = lambda dm: (dm.num_heads, "attention heads of this Wan model")   # diffusion model ->
    # (the heads sequence-parallel ranks split, what they are)

    def token_grid(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        """(token rows, token columns) of a latent frame (a partial patch is padded, as Wan does)."""
        return -(-latent_h // self.patch), -(-latent_w // self.patch)

    def latent_frames(self, pixel_frames: int) -> int:
        if not self.causal_vae:
            return pixel_frames // self.temporal_stride
        return df_schedule.latent_frames(pixel_frames, self.temporal_stride)

    def pixel_frames(self, latent_frames: int) -> int:
        if not self.causal_vae:
            return latent_frames * self.temporal_stride
        return df_schedule.pixel_frames(latent_frames, self.temporal_stride)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        """Transformer tokens per latent frame: the one token count (FLOPs, heat, chunks)."""
        return math.prod(self.token_grid(latent_h, latent_w))

    @staticmethod
    def cfg_branches(cfg: float) -> int:
        """Model rows per call: cond and uncond, or cond alone at cfg 1."""
        return 1 if cfg == 1.0 else 2


def describe_vae(vae) -> str:
    inner = getattr(vae, "first_stage_model", None)
    what = f"{type(vae).__name__} over {type(inner).__module__}.{type(inner).__name__}" if inner is not None else \
        type(vae).__name__
    channels = getattr(vae, "latent_channels", None)
    return what + (f", {channels} latent channels" if channels else "")


# --- SkyReels-V2-DF: ComfyUI's Wan 2.1 transformer, diffusion-forcing windows ---------------------

def _wan_prepare(model_patcher, schedule) -> dict:
    wan.install_per_frame_timesteps(model_patcher)
    fps = schedule.fps
    return {"fps_conditioning": wan.apply_fps_conditioning(model_patcher, fps) if fps else None}


def _wan_cache_run(spec) -> ChunkExecutor:
    return ChunkExecutor(spec.make_policy(), spec.chunk_frames, spec.compress, spec.attention)


def _wan_check_vae(vae) -> None:
    fix = "load the Wan 2.1 VAE (wan_2.1_vae.safetensors) with Load VAE (VAELoader)"
    if isinstance(vae, MagiVAE):
        raise InputError("vae", f"is the MAGI-1 VAE; SkyReels-V2-DF latents are Wan 2.1's: {fix}")
    if not isinstance(getattr(vae, "first_stage_model", None), comfy.ldm.wan.vae.WanVAE) or \
            getattr(vae, "latent_channels", 16) != 16:
        raise InputError("vae", f"is not the Wan 2.1 VAE ({describe_vae(vae)}): {fix}")


def _wan_stream_decoder(vae):
    """Core's Wan 2.1 decode loop with its cache carried across pieces, checked on the first piece."""
    return CheckedStreamDecoder(WanStreamDecoder(vae), vae, lambda: RedecodeStreamDecoder(vae))


def _wan_indicator_scale(dm, coefficients) -> str:
    fitted = tuple(wan.resolve_coefficients(coefficients, dm.dim)) != tuple(wan.COEFFICIENTS["none"])
    return "fitted" if fitted else "raw"


WAN21 = Family(
    name="wan21", title="SkyReels-V2-DF (Wan 2.1)", latent_channels=16, spatial_stride=8, temporal_stride=4,
    latent_format=comfy.latent_formats.Wan21, run=DFRun,
    transformer=wan.wan_transformer, chunk_adapter=wan.WanChunkAdapter, supports_chunks=wan.supports_chunks,
    flops=wan.flop_shape,
    coefficients=lambda name, dm: wan.resolve_coefficients(name, dm.dim), prepare_sampling=_wan_prepare,
    new_cache_run=_wan_cache_run, check_cache_spec=lambda spec: check_attention(spec.attention, spec.compress),
    indicator_scale=_wan_indicator_scale, check_vae=_wan_check_vae, stream_decoder=_wan_stream_decoder)


# --- MAGI-1: the pack's own DiT, chunk-wise stages ------------------------------------------------

def magi_transformer(model_patcher) -> MagiDiT:
    dm = getattr(model_patcher.model, "diffusion_model", None)
    if not isinstance(dm, MagiDiT):
        raise ModelFamilyError(f"this is {wan.describe_model(model_patcher.model)}, not MAGI-1")
    return dm


def _magi_check_vae(vae) -> None:
    if not isinstance(vae, MagiVAE):
        raise InputError("vae", f"is not the MAGI-1 VAE ({describe_vae(vae)}); MAGI-1 latents decode only with "
                         "MAGI-1's own VAE: load ckpt/vae with MAGI-1 VAE Loader (ARCacheMagiVAELoader)")


def _magi_coefficients(name, dm):
    """MAGI-1's caches use the plain relative change (the references fit no polynomial)."""
    if isinstance(name, str):
        if name not in ("auto", "none"):
            raise ModelFamilyError(f"coefficients {name!r} are fitted for Wan models; MAGI-1 takes auto or none "
                                   "(the plain relative change) or an explicit list")
        return IDENTITY
    return tuple(name)


MAGI1 = Family(
    name="magi1", title="MAGI-1", latent_channels=16, spatial_stride=8, temporal_stride=4,
    latent_format=MagiLatentFormat, run=MagiRun, transformer=magi_transformer,
    chunk_adapter=None, supports_chunks=lambda dm: isinstance(dm, MagiDiT), flops=lambda dm: dm.config.flop_shape(),
    coefficients=_magi_coefficients,
    prepare_sampling=lambda model_patcher, schedule: {}, new_cache_run=MagiCacheRun, check_cache_spec=magi_check_spec,
    indicator_scale=lambda dm, coefficients: "magi", check_vae=_magi_check_vae,
    stream_decoder=lambda vae: SlabStreamDecoder(vae, DECODE_TILE[0]), causal_vae=False, piece="chunk",
    shard_heads=lambda dm: (dm.config.kv_heads, "key/value heads of MAGI-1 (grouped-query attention: each rank "
                                                "takes whole KV heads with their query heads)"))

# --- few-step causal Wan (Self-Forcing class): ComfyUI's Wan 2.1 transformer, the causal schedule -----

def _causal_cache_refused(spec) -> None:
    """Step-skipping caches have no room in a few-step chunk: FlowCache computes a chunk's first
    warmup_steps (5) and its last step, MotionCache its first warmup_steps + 1 (5) and needs more than
    25 steps for its token phase (specs/motioncache.md pitfall 22); a causal chunk has 3-4 steps, the
    last of which must run. The K/V bound of this family is the schedule's rolling window."""
    raise InputError("model", "is a few-step causal Wan, and the AR caches (FlowCache, MotionCache) skip steps of a "
                     "chunk's denoising: with 3-4 steps per chunk, all inside the caches' warm-up and final steps, "
                     "there is nothing to skip. Connect the loader's MODEL to the sampler directly; to bound K/V "
                     "memory, set the Causal Schedule's attention_frames (a rolling window)")


CAUSAL_WAN = Family(
    name="causal_wan", title="causal Wan (Self-Forcing class)", latent_channels=16, spatial_stride=8,
    temporal_stride=4, latent_format=comfy.latent_formats.Wan21, run=CausalRun,
    transformer=wan.causal_wan_transformer, chunk_adapter=wan.WanChunkAdapter, supports_chunks=wan.supports_chunks,
    flops=wan.flop_shape, coefficients=lambda name, dm: wan.resolve_coefficients(name, dm.dim),
    prepare_sampling=lambda model_patcher, schedule: {}, new_cache_run=_causal_cache_refused,
    check_cache_spec=_causal_cache_refused, indicator_scale=_wan_indicator_scale, check_vae=_wan_check_vae,
    stream_decoder=_wan_stream_decoder, piece="chunk")

def _wan22_check_vae(vae) -> None:
    fix = "load the Wan 2.2 VAE (wan2.2_vae.safetensors) with Load VAE (VAELoader)"
    if not isinstance(getattr(vae, "first_stage_model", None), comfy.ldm.wan.vae2_2.WanVAE) or \
            getattr(vae, "latent_channels", None) != 48:
        raise InputError("vae", f"is not the Wan 2.2 VAE ({describe_vae(vae)}); LongLive 2.0 latents have 48 "
                         f"channels: {fix}")


CAUSAL_WAN22 = dataclasses.replace(
    CAUSAL_WAN, name="causal_wan22", title="causal Wan 2.2 TI2V-5B (LongLive 2.0)", latent_channels=48,
    spatial_stride=16, latent_format=comfy.latent_formats.Wan22, transformer=wan.causal_wan22_transformer,
    check_vae=_wan22_check_vae, default_schedule=lambda: causal_schedule.LONGLIVE2,
    # Wan 2.2's VAE decodes its first latent frame apart (first_chunk): the stream re-decodes each
    # piece with a few latents of context instead of carrying the cache (reported approximate)
    stream_decoder=RedecodeStreamDecoder)

FAMILIES: dict[str, Family] = {WAN21.name: WAN21, MAGI1.name: MAGI1, CAUSAL_WAN.name: CAUSAL_WAN,
                               CAUSAL_WAN22.name: CAUSAL_WAN22}


def detect(model_patcher, schedule=None) -> tuple[Family, object]:
    """(family, diffusion model) of a MODEL, or a ModelFamilyError that says what it is instead.

    One transformer may serve two families (a plain Wan 2.1: diffusion forcing or the causal
    schedule): the schedule picks among those that accept the model, else the first one does.
    A model one family nearly serves (a Wan 2.2) gets that family's own message.
    Only the messages are kept: a caught exception kept past its handler holds its traceback's
    frames, and with them the model patcher, in a reference cycle."""
    problems, found = {}, []
    for family in FAMILIES.values():
        try:
            found.append((family, family.transformer(model_patcher)))
        except ModelFamilyError as e:
            problems[family.name] = e.problem
    if found:
        return next(((f, dm) for f, dm in found if isinstance(schedule, f.run.schedule)), found[0])
    dm = getattr(model_patcher.model, "diffusion_model", None)
    if type(dm).__module__.startswith("comfy.ldm.wan"):
        raise ModelFamilyError(problems[WAN21.name])
    raise ModelFamilyError(f"this is {wan.describe_model(model_patcher.model)}; the pack serves: "
                           + ", ".join(f.title for f in FAMILIES.values()))


def family_of(diffusion_model) -> Optional[Family]:
    """The family whose chunk-wise forward runs this diffusion model, or None."""
    return next((f for f in FAMILIES.values() if f.supports_chunks(diffusion_model)), None)


def new_video_run(model_patcher, req, on_window=None, sink=None, t_start=None):
    """The sampler run for a request on this MODEL: its family's run (the node and the bench use it)."""
    family, dm = detect(model_patcher, req.schedule)
    return family.run(model_patcher, req, family, dm, on_window=on_window, sink=sink, t_start=t_start)
