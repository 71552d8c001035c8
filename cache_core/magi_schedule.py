"""MAGI-1's chunk-wise window schedule on plain numbers (specs/magi1.md section 3).

A video is cut into chunks of `chunk_width` latent frames. Time runs from t = 0 (noise) to
t = 1 (clean). Up to `window_size` chunks denoise together with staggered noise levels: every
`steps / window_size` forward steps ("a stage") a new chunk enters the window and the oldest
one leaves it, clean. Chunk c's queries attend to one contiguous range of chunks ending at c;
how far back depends on how far c has come (`kv_range`, 5/4/3/2 chunks by quarter of its
schedule; a finished chunk re-run for the K/V cache sees only itself).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import InputError


@dataclass(frozen=True)
class MagiSchedule:
    """What the Streaming AR Sampler needs to run a MAGI-1 model (upstream defaults)."""
    node_title: ClassVar[str] = "MAGI-1 Schedule (ARCacheMagiSchedule)"  # what users connect
    chunk_width: int = 6                  # latent frames per chunk (24 video frames)
    window_size: int = 4                  # chunks denoised at once
    shift: float = 3.0                    # SD3 shift of the t^2 grid
    distill: str = "auto"                 # "auto" (from the model file), "on", "off": step-size embedding, 1 pass
    history_scale: float = 1.5            # guidance towards the history (prev_chunk_scales while t < guidance_until)
    guidance_until: float = 0.3           # text and history guidance only while a chunk's t is below this
    nearly_clean_threshold: float = 0.3   # distilled: mix in a history-free pass for an oldest chunk past this t
    nearly_clean_weight: float = 0.7      # ... as weight * (with history) + (1 - weight) * (alone)
    kv_range: tuple = (5, 4, 3, 2)        # chunks each quarter of a chunk's schedule attends to; () = all history
    clean_t: float = 0.9999               # t at which finished chunks are re-run into the K/V cache
    kv_on_cpu: bool = False               # keep finished chunks' K/V in CPU memory between uses
    fps: int = 24                         # frame rate of the written video

    def scales(self, t: float, text_scale: float) -> tuple[float, float]:
        """(history scale, text scale) of a chunk at time t: upstream's cfg_t_range lookup.

        The shipped tables are 1.5/7.5 on [0, 0.0217, 0.1, 0.3) and 1/0 on [0.3, 0.999]; the
        three early entries are equal, so one breakpoint (guidance_until) states them exactly.
        """
        if t < self.guidance_until - 1e-7:    # upstream: searchsorted(range - 1e-7, t) - 1
            return self.history_scale, text_scale
        return 1.0, 0.0


def time_grid(steps: int, shift: float = 3.0) -> torch.Tensor:
    """t at each of steps+1 points (float64): u^2 on a uniform grid, then SD3's shift in 0=noise form.

    12 steps use upstream's non-uniform grid (4 stages of [0, 1/2, 3/4] quarter steps).
    """
    if steps == 12:
        base = torch.tensor([0.0, 0.5, 0.75], dtype=torch.float64) / 4
        u = torch.cat([base + k / 4 for k in range(5)])[:13]
    else:
        u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    t = u ** 2
    s = 1.0 / shift
    return s * t / (1 + (s - 1) * t)


def distill_dt(steps: int, inner_step: int) -> float:
    """The distilled models' step-size embedding input: steps/2, or for 12 steps 8/interval."""
    if steps == 12:
        return 4 / (2, 1, 1)[inner_step % 3] * 2
    return steps / 4 * 2


@dataclass(frozen=True)
class ForwardStep:
    """One forward step of the whole run: which chunks are in the window and where each stands."""
    index: int                    # 0 .. total-1
    inner: int                    # step within the stage (0 .. steps/window - 1)
    start: int                    # first active chunk (absolute index)
    end: int                      # one past the last active chunk
    step_of: tuple                # per active chunk (oldest first): its step index j in 0 .. steps-1
    refresh: int | None           # finished chunk re-run at clean_t into the K/V cache, or None
    finished: int | None          # chunk that is clean after this step, or None

    @property
    def chunks(self) -> range:
        return range(self.start, self.end)


def plan_steps(num_chunks: int, prefix_chunks: int, window: int, steps: int) -> list[ForwardStep]:
    """Every forward step of a run (upstream's generate_sequences and get_timestep, in one list)."""
    if steps % window:
        raise InputError("steps", f"{steps} is not divisible by the schedule's window_size={window}")
    per_stage = steps // window
    out = []
    for stage in range(num_chunks + window - 1 - prefix_chunks):
        pos = prefix_chunks + stage
        start, end = max(prefix_chunks, pos - window + 1), min(num_chunks, pos + 1)
        for inner in range(per_stage):
            step_of = tuple((pos - c) * per_stage + inner for c in range(start, end))
            refresh = start - 1 if (start > prefix_chunks and inner == 0) else None
            finished = start if step_of[0] == steps - 1 else None
            out.append(ForwardStep(len(out), inner, start, end, step_of, refresh, finished))
    return out


def first_key_chunk(chunk: int, step: int, steps: int, kv_range: tuple) -> int:
    """First chunk in chunk's key range at its step (step == steps: a clean refresh, itself only)."""
    if not kv_range:
        return 0
    if steps % len(kv_range):
        raise InputError("steps", f"{steps} is not divisible by {len(kv_range)} (the schedule's kv_range entries)")
    r = 1 if step >= steps else kv_range[step // (steps // len(kv_range))]
    return max(0, chunk + 1 - r)


def latent_length(pixel_frames: int, prefix_latent_frames: int, chunk_width: int, stride: int = 4) -> int:
    """Latent frames of the whole run, prefix included: whole chunks (upstream's infer_chunk_num)."""
    return chunk_width * math.ceil((pixel_frames // stride + prefix_latent_frames) / chunk_width)


def cached_chunks_needed(plan: list[ForwardStep], steps: int, kv_range: tuple) -> int | None:
    """How many finished chunks before a forward's first chunk any key range of the run reaches
    (None: all of them, for full-history attention). The K/V cache keeps that many behind its
    newest chunk (a refresh writes its chunk before the later chunks of the same forward read).

    Upstream keeps the whole video's K/V (in pinned CPU memory). With its defaults (window 4,
    kv_range 5,4,3,2) every range starts one chunk before the window, so one chunk is enough;
    smaller windows or longer ranges reach further back, up to max(kv_range) - 1 chunks.
    """
    if not kv_range:
        return None
    need = 0
    for step in plan:
        lo = step.start if step.refresh is None else step.refresh
        firsts = [first_key_chunk(c, j, steps, kv_range) for c, j in zip(step.chunks, step.step_of)]
        need = max(need, lo - min(firsts))
    return need
