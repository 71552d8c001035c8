"""The model-family registry: `detect(model)` says what a MODEL is and how the pack serves it.

The sampler, the cache nodes and the preview ask the family instead of hard-coding Wan: latent
geometry and frame rules, CFG branches, FLOP shape, preview format, chunk adapter, sampler kind.
A new family is one file in model_patches/ plus one entry in FAMILIES.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import comfy.latent_formats

from ..cache_core import df_schedule
from ..cache_core import flops as flop_count
from ..cache_core.flowcache_policy import IDENTITY
from . import wan
from .magi_loader import MagiLatentFormat
from .magi_model import MagiDiT
from .wan import ModelFamilyError


@dataclass(frozen=True)
class Family:
    name: str                        # e.g. "wan21"
    title: str                       # what users read in messages
    latent_channels: int
    spatial_stride: int              # pixels per latent pixel
    temporal_stride: int             # pixel frames per latent frame after the first (causal VAE)
    latent_format: type              # ComfyUI latent format (preview factors, process_in/out)
    sampler_kind: str                # the schedule type its AR sampler runs ("df" or "magi")
    transformer: Callable            # model_patcher -> its diffusion model, or ModelFamilyError
    chunk_adapter: Callable          # diffusion model -> chunk adapter for the executor
    supports_chunks: Callable        # diffusion model -> bool (a cache can run it chunk-wise)
    flop_shape: Callable             # diffusion model -> DiTShape
    tokens_per_frame: Callable       # (latent h, latent w) -> transformer tokens per latent frame
    token_grid: Callable             # (latent h, latent w) -> (token rows, token columns) of a frame
    coefficients: Callable           # (name or list, diffusion model) -> FlowCache polynomial
    prepare_sampling: Callable       # (model clone, schedule) -> report notes; per-frame timesteps etc.
    causal_vae: bool = True          # 4k+1 pixel frames per k+1 latents (Wan); else 4k per k (MAGI-1)

    def latent_frames(self, pixel_frames: int) -> int:
        if not self.causal_vae:
            return pixel_frames // self.temporal_stride
        return df_schedule.latent_frames(pixel_frames, self.temporal_stride)

    def pixel_frames(self, latent_frames: int) -> int:
        if not self.causal_vae:
            return latent_frames * self.temporal_stride
        return df_schedule.pixel_frames(latent_frames, self.temporal_stride)

    @staticmethod
    def cfg_branches(cfg: float) -> int:
        """Model rows per call: cond and uncond, or cond alone at cfg 1."""
        return 1 if cfg == 1.0 else 2


def _wan_prepare(model_patcher, schedule) -> dict:
    wan.install_per_frame_timesteps(model_patcher)
    fps = schedule.fps
    return {"fps_conditioning": wan.apply_fps_conditioning(model_patcher, fps) if fps else None}


WAN21 = Family(
    name="wan21", title="SkyReels-V2-DF (Wan 2.1)", latent_channels=16, spatial_stride=8, temporal_stride=4,
    latent_format=comfy.latent_formats.Wan21, sampler_kind="df",
    transformer=wan.wan_transformer, chunk_adapter=wan.WanChunkAdapter, supports_chunks=wan.supports_chunks,
    flop_shape=wan.flop_shape, tokens_per_frame=wan.tokens_per_frame,
    token_grid=lambda h, w: (-(-h // 2), -(-w // 2)),
    coefficients=lambda name, dm: wan.resolve_coefficients(name, dm.dim), prepare_sampling=_wan_prepare)

def magi_transformer(model_patcher) -> MagiDiT:
    dm = getattr(model_patcher.model, "diffusion_model", None)
    if not isinstance(dm, MagiDiT):
        raise ModelFamilyError(f"this is {wan.describe_model(model_patcher.model)}, not MAGI-1")
    return dm


def _magi_flop_shape(dm) -> flop_count.MagiShape:
    return dm.config.flop_shape()


def _magi_coefficients(name, dm):
    """MAGI-1's caches use the plain relative change (the references fit no polynomial)."""
    if isinstance(name, str):
        if name not in ("auto", "none"):
            raise ModelFamilyError(f"coefficients {name!r} are fitted for Wan models; MAGI-1 takes auto or none "
                                   "(the plain relative change) or an explicit list")
        return IDENTITY
    return tuple(name)


def _magi_chunk_adapter(dm):
    raise ModelFamilyError("MAGI-1 runs chunk by chunk in the Streaming AR Sampler only")


MAGI1 = Family(
    name="magi1", title="MAGI-1", latent_channels=16, spatial_stride=8, temporal_stride=4,
    latent_format=MagiLatentFormat, sampler_kind="magi", transformer=magi_transformer,
    chunk_adapter=_magi_chunk_adapter, supports_chunks=lambda dm: isinstance(dm, MagiDiT), flop_shape=_magi_flop_shape,
    tokens_per_frame=lambda h, w: (h // 2) * (w // 2), token_grid=lambda h, w: (h // 2, w // 2),
    coefficients=_magi_coefficients, prepare_sampling=lambda model_patcher, schedule: {},
    causal_vae=False)

FAMILIES: dict[str, Family] = {WAN21.name: WAN21, MAGI1.name: MAGI1}


def detect(model_patcher) -> tuple[Family, object]:
    """(family, diffusion model) of a MODEL, or a ModelFamilyError that says what it is instead.

    A model one family nearly serves (a causal Wan, a Wan 2.2) gets that family's own message."""
    errors = {}
    for family in FAMILIES.values():
        try:
            return family, family.transformer(model_patcher)
        except ModelFamilyError as e:
            errors[family.name] = e
    dm = getattr(model_patcher.model, "diffusion_model", None)
    if type(dm).__module__.startswith("comfy.ldm.wan"):
        raise errors[WAN21.name]
    raise ModelFamilyError(f"this is {wan.describe_model(model_patcher.model)}; the pack serves: "
                           + ", ".join(f.title for f in FAMILIES.values()))


def family_of(diffusion_model):
    """The family whose chunk adapter runs this diffusion model, or None."""
    return next((f for f in FAMILIES.values() if f.supports_chunks(diffusion_model)), None)
