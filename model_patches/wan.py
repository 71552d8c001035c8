"""SkyReels-V2-DF as ComfyUI sees it: a Wan 2.1 text-to-video transformer.

What the streaming sampler needs from the family: recognise the model, feed it per-frame
timesteps, and restore the 1.3B model's fps conditioning that ComfyUI's loader drops.
"""
from __future__ import annotations

import logging
import os
import weakref

import torch

import comfy.ldm.wan.model
import comfy.model_base
import comfy.patcher_extension
import folder_paths
from safetensors import safe_open

from ..cache_core import flops as flop_count
from ..cache_core.errors import InputError
from ..cache_core.record import RECORD_KEY, REPORT_KEY, RunReport, StepRecord

PER_FRAME_KEY = "arcache_per_frame_t"
FPS_KEYS = ("fps_embedding.weight", "fps_projection.0.weight", "fps_projection.0.bias",
            "fps_projection.2.weight", "fps_projection.2.bias")


class ModelFamilyError(InputError):
    """The MODEL input is not one the pack can serve; the message says what it is instead."""

    def __init__(self, problem: str):
        super().__init__("model", problem)


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


def wan_transformer(model_patcher) -> comfy.ldm.wan.model.WanModel:
    """The WanModel inside a MODEL, or a clear error saying what the model is instead."""
    base = model_patcher.model
    dm = getattr(base, "diffusion_model", None)
    serves = ("the pack serves SkyReels-V2-DF: Wan 2.1 text-to-video transformers with 16 latent "
              "channels, loaded with UNETLoader. Load a SkyReels-V2-DF checkpoint, or use KSampler "
              "for other models.")
    if (not isinstance(base, comfy.model_base.WAN21) or type(dm) is not comfy.ldm.wan.model.WanModel
            or getattr(dm, "model_type", "t2v") != "t2v" or base.latent_format.latent_channels != 16):
        raise ModelFamilyError(f"this is {describe_model(base)}; {serves}")
    return dm


def per_frame_timestep_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                               transformer_options={}, **kwargs):
    """Replace the sampler's scalar timestep with the record's per-frame timesteps [B, F], and
    count the full-window forward that really runs (a cache outside may have skipped the call)."""
    record: StepRecord | None = transformer_options.get(RECORD_KEY)
    run_report: RunReport | None = transformer_options.get(REPORT_KEY)
    if run_report is not None:
        shape = flop_count.DiTShape.from_model(executor.class_obj)
        tokens = x.shape[2] * -(-x.shape[3] // 2) * -(-x.shape[4] // 2)
        run_report.data["transformer_flops"] += flop_count.window_flops(shape, tokens, x.shape[2], batch=x.shape[0])
    if record is not None and timestep.ndim == 1:
        if x.shape[2] != record.num_frames:  # WanModel would silently misalign a wrong length
            raise RuntimeError(f"per-frame timesteps for {record.num_frames} frames, latent has {x.shape[2]}")
        t = record.frame_timesteps().to(device=timestep.device, dtype=timestep.dtype)
        timestep = t.unsqueeze(0).expand(x.shape[0], -1)
    return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


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
