"""The one record an AR sampler publishes per model call, read by the caches.

The sampler puts a `StepRecord` into `transformer_options[RECORD_KEY]` before every model
call. A cache that finds no record (a plain KSampler) treats the call as one segment in which
every chunk is active.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

RECORD_KEY = "arcache_step"
# The cache's state for one sampling run, put into transformer_options by the cache's OUTER_SAMPLE
# wrapper and taken out in its `finally` (DF: the chunk executor; MAGI-1: its cache run).
CACHE_RUN_KEY = "arcache_cache_run"
CACHE_WRAPPER_KEY = "arcache_ar_cache"   # the key of the cache nodes' wrappers on a model clone


@dataclass
class StepRecord:
    frame_sigmas: torch.Tensor   # [F] per-latent-frame sigma of this call (what the solver uses)
    active: torch.Tensor         # [F] bool: frames the solver steps after this call
    prefix_frames: int           # leading frames that are history (clean or lightly re-noised)
    chunk_frames: int            # latent frames per chunk (the causal block size)
    steps: int                   # solver steps every frame walks (the template length)
    window_index: int            # which window (AR segment) of the video this call belongs to
    call: int                    # index of this model call within the window (0-based): a step-matrix row
    calls: int                   # model calls in this window
    timesteps: torch.Tensor | None = None   # [F] what the model sees; None: 1000 * frame_sigmas
    prompt_switches: int = 0     # prompt switches so far (steering): each starts the caches afresh,
                                 # so nothing computed under the old prompt is reused

    @property
    def num_frames(self) -> int:
        return int(self.frame_sigmas.shape[0])

    def frame_timesteps(self) -> torch.Tensor:
        """Per-frame model timesteps: the sampler's own (SkyReels-V2 gives the transformer
        whole numbers) or ComfyUI's flow scale t = 1000 * sigma."""
        return self.timesteps if self.timesteps is not None else self.frame_sigmas * 1000.0


def frame_timesteps(timestep: torch.Tensor, record: StepRecord | None, frames: int) -> torch.Tensor:
    """Per-frame model timesteps [B, F] for a call: given per frame already, from the sampler's
    record, or (a plain sampler) the call's scalar repeated. The one place they are computed."""
    batch = timestep.shape[0]
    if timestep.ndim == 2:
        if timestep.shape[1] != frames:
            raise RuntimeError(f"timestep has {timestep.shape[1]} frames, latent has {frames}")
        return timestep
    if record is not None:
        if record.num_frames != frames:   # WanModel would silently misalign a wrong length
            raise RuntimeError(f"record has {record.num_frames} frames, latent has {frames}")
        t = record.frame_timesteps().to(device=timestep.device, dtype=timestep.dtype)
        return t.unsqueeze(0).expand(batch, -1)
    return timestep.reshape(batch, 1).expand(batch, frames)
