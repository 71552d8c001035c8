"""The few-step causal schedule (Self-Forcing, CausVid, Causal Forcing, LongLive) on plain numbers.

A video is generated chunk after chunk (`chunk_frames` latent frames, 3 upstream). Each chunk
walks a short list of model timesteps (e.g. 1000, 750, 500, 250 warped through the flow
scheduler's shifted grid): at each one the model predicts the flow, the chunk's clean estimate is
x0 = x - sigma * flow, and before the next timestep x0 is re-noised to that timestep's sigma with
fresh noise ((1 - sigma) x0 + sigma eps: not an Euler step). After the last timestep x0 is the
chunk; one more pass at `context_noise` over the clean chunk writes the K/V that later chunks
attend to (its output is not used). Attention is chunk-causal: a chunk sees itself and the K/V of
the chunks before it, all of them (full history) or a rolling window of the newest ones behind a
sink of the first ones (LongLive, StreamDiffusionV2).

LongLive 2.0 (NVlabs/LongLive @7860ad9, Wan2.2-TI2V-5B) walks each chunk with a fresh 4-step UniPC
instead (`solver` unipc: FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=5) per
chunk, pipeline/causal_diffusion_inference.py:566-609 and 892-900: the sigmas of
df_schedule.flow_template, integer timesteps 999, 937, 833, 624), and with an image holds the first
chunk's frame 0 to it at timestep 0 (`first_frame` clamped, utils/i2v_conditioning.py) where
Self-Forcing writes the image into the K/V first as a chunk of its own.

The numbers are upstream's (guandeh17/Self-Forcing @33593df):
- `utils/scheduler.py` FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) with
  set_timesteps(1000, training=True): sigmas = shift s / (1 + (shift - 1) s) over
  s = linspace(1, 0, 1001)[:-1] in float32, timesteps = 1000 sigmas;
- `pipeline/causal_inference.py:27-31` warp: timestep list = [timesteps, 0][1000 - step];
- `add_noise` and the flow-to-x0 conversion look sigma up at the grid point nearest the timestep
  (argmin |timesteps - t|), so t = 0 means sigma = 1/200 of the grid's last point, not 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from .df_schedule import flow_shift, flow_template, template_timesteps
from .errors import InputError

TRAIN_STEPS = 1000
SWITCH_MODES = ("recache", "keep")
SOLVERS = ("renoise", "unipc")
FIRST_FRAME_MODES = ("own_chunk", "clamped")


def flow_grid(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of the flow scheduler's training grid, float32 [1000], as upstream builds it."""
    sigmas = flow_shift(torch.linspace(1.0, 0.0, TRAIN_STEPS + 1)[:-1], shift)
    return sigmas, sigmas * TRAIN_STEPS


def parse_steps(text) -> tuple[int, ...]:
    """'1000, 750, 500, 250' -> (1000, 750, 500, 250), or a named error."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        steps = tuple(int(float(p)) if float(p).is_integer() else float(p) for p in items)
    except ValueError:
        raise InputError("denoising_steps", f"{text!r} is not a list of numbers; write e.g. 1000, 750, 500, 250") from None
    if not steps:
        raise InputError("denoising_steps", "is empty; write the model's timesteps, e.g. 1000, 750, 500, 250")
    return steps


@dataclass(frozen=True)
class CausalSchedule:
    """What the Streaming AR Sampler needs to run a few-step causal Wan model (Self-Forcing's defaults)."""
    node_title: ClassVar[str] = "Causal Schedule (ARCacheCausalSchedule)"   # what users connect
    chunk_frames: int = 3                 # latent frames per chunk (num_frame_per_block)
    denoising_steps: tuple = (1000, 750, 500, 250)
    warp: bool = True                     # map the steps through the shifted grid (warp_denoising_step)
    shift: float = 5.0                    # timestep_shift
    context_noise: float = 0.0            # timestep of the pass that writes a finished chunk's K/V
    attention_frames: int = 0             # latent frames a chunk attends to (sink + window, itself included); 0: all
    sink_frames: int = 0                  # the first latent frames, kept in every window
    switch: str = "recache"               # on a prompt change: recompute the kept K/V under the new prompt, or keep them
    fps: int = 16                         # frame rate of the written video
    solver: str = "renoise"               # renoise: the step list with fresh noise between steps; unipc: LongLive 2.0's
    first_frame: str = "own_chunk"        # a start image: its own chunk in the K/V first, or clamped in the first chunk
    unipc_steps: int = 4                  # UniPC steps per chunk (solver unipc)

    def __post_init__(self):
        steps = parse_steps(self.denoising_steps)
        object.__setattr__(self, "denoising_steps", steps)
        if self.chunk_frames < 1:
            raise InputError("chunk_frames", f"{self.chunk_frames}: a chunk has at least 1 latent frame")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise InputError("denoising_steps", f"{', '.join(map(str, steps))}: must be strictly decreasing (noise "
                             "first, e.g. 1000, 750, 500, 250)")
        top = TRAIN_STEPS
        if self.warp and any(not float(s).is_integer() or not 1 <= s <= top for s in steps):
            raise InputError("denoising_steps", f"{', '.join(map(str, steps))}: with warp on, each step is a whole "
                             f"number in 1..{top} (an index into the shifted grid)")
        if not self.warp and any(not 0 < s <= top for s in steps):
            raise InputError("denoising_steps", f"{', '.join(map(str, steps))}: each is a model timestep in (0, {top}]")
        if not 0 <= self.context_noise <= top:
            raise InputError("context_noise", f"{self.context_noise}: a timestep in 0..{top} (0 upstream)")
        for name, value, options in (("switch", self.switch, SWITCH_MODES), ("solver", self.solver, SOLVERS),
                                     ("first_frame", self.first_frame, FIRST_FRAME_MODES)):
            if value not in options:
                raise InputError(name, f"{value!r}: choose one of {', '.join(options)}")
        if self.shift <= 0:
            raise InputError("shift", f"{self.shift}: must be > 0 (5 for Self-Forcing)")
        b = self.chunk_frames
        for name in ("attention_frames", "sink_frames"):
            if getattr(self, name) < 0:
                raise InputError(name, f"{getattr(self, name)}: latent frames, 0 or more")
        if self.fps < 1:
            raise InputError("fps", f"{self.fps}: at least 1")
        if self.unipc_steps < 1:
            raise InputError("unipc_steps", f"{self.unipc_steps}: UniPC needs at least 1 step per chunk (4 for LongLive 2.0)")
        if self.attention_frames and self.attention_frames < self.sink_frames + b:
            raise InputError("attention_frames", f"{self.attention_frames} must hold the sink ({self.sink_frames}) and "
                             f"the chunk being made ({b}): at least {self.sink_frames + b}")
        if self.sink_frames and not self.attention_frames:
            raise InputError("sink_frames", f"{self.sink_frames}: a sink belongs to a rolling window; set "
                             "attention_frames (e.g. 12 with sink 3, LongLive) or the sink to 0")

    def plan(self) -> tuple[list[float], list[torch.Tensor]]:
        """(model timesteps, sigmas) of one chunk's steps: renoise walks the step list (sigma at the
        grid point nearest each timestep, float32 as upstream); unipc `unipc_steps` UniPC steps on the
        shifted template (float64 sigmas, then 0; integer timesteps)."""
        if self.solver == "unipc":
            template = flow_template(self.unipc_steps, self.shift)
            return [float(t) for t in template_timesteps(template)[:-1]], list(template)
        timesteps = self.timesteps
        return timesteps, [self.sigma(t) for t in timesteps] + [torch.tensor(0.0)]

    @property
    def timesteps(self) -> list[float]:
        """The model timesteps of the step list (float32 values, as upstream feeds them)."""
        if not self.warp:
            return [float(torch.tensor(float(s))) for s in self.denoising_steps]
        _, grid = flow_grid(self.shift)
        grid = torch.cat([grid, torch.zeros(1)])
        return [float(grid[TRAIN_STEPS - int(s)]) for s in self.denoising_steps]

    def sigma(self, t: float) -> torch.Tensor:
        """The float32 sigma upstream uses at timestep t: the grid point nearest to it."""
        sigmas, grid = flow_grid(self.shift)
        return sigmas[torch.argmin((grid - torch.tensor(t, dtype=torch.float32)).abs())]

    def window(self) -> tuple[Optional[int], int]:
        """(keep, sink) in latent frames for the K/V store: a frame sees the sink and the `keep`
        frames before it; (None, 0) for the full history."""
        if not self.attention_frames:
            return None, 0
        return self.attention_frames - self.sink_frames - 1, self.sink_frames

    def check_length(self, generated: int, given: int = 0) -> None:
        """A named error unless the latent frames to generate come in whole chunks (at least one);
        `given`: latent frames of the requested length that are given, not generated (a start image
        written into the K/V first), for the lengths the message suggests. A window or sink longer than
        the video is no error: nothing is evicted, which is the full history (as upstream runs it)."""
        b = self.chunk_frames
        if generated % b or generated < b:
            lo = max(generated - generated % b, b)
            hi = max(generated + b - generated % b, lo + b)
            raise InputError("length", f"gives {generated} latent frames to generate, not a positive multiple of the "
                             f"schedule's chunk_frames={b}: choose a length giving {lo} or {hi} ({_pixels(lo + given)} "
                             f"or {_pixels(hi + given)} frames; each latent frame is 4 video frames)")


# LongLive 2.0 on Wan2.2-TI2V-5B (configs/inference.yaml): chunks of 8, 4 UniPC steps at shift 5, a
# 32-frame window behind an 8-frame sink, 24 fps, an image clamped into the first chunk; no re-cache
LONGLIVE2 = CausalSchedule(chunk_frames=8, solver="unipc", shift=5.0, attention_frames=32, sink_frames=8, switch="keep",
                           fps=24, first_frame="clamped", unipc_steps=4)


def _pixels(latents: int) -> int:
    return 4 * (latents - 1) + 1
