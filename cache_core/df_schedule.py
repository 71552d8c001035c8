"""Diffusion-forcing schedules: frame arithmetic, the flow template, windows, the step matrix.

Pure torch/numpy, no ComfyUI. The algorithm follows SkyReels-V2's diffusion forcing
(specs/skyreels_df.md section 1):

- every latent frame walks the same sigma template (``flow_template``) with its own solver;
- a *step matrix* says, for each model call ("row"), which step every frame is at and which
  frames take a step; in async mode each block of ``causal_block_size`` frames starts
  ``ar_step`` rows after the previous one;
- long videos are made of windows that start with a few frames of history (``plan_windows``).

Two deliberate differences from upstream:

- The step matrix is built over the generated frames only; history ("prefix") frames are held
  at "done" and never stepped, whatever their number (upstream rounds the prefix down to whole
  blocks and silently treats the remainder as noise, spec 1.7). When the prefix length
  divides by ``causal_block_size`` the result equals upstream's ``generate_timestep_matrix``.
- A ragged last window whose length does not divide by ``causal_block_size`` is padded up to
  a whole block (``WindowPlan.pad_frames``); the sampler generates those frames and drops them.
  Upstream instead requires every window length to divide by the block size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .errors import InputError

# Sigma shown to the model for frames that have not started (upstream timestep 999).
SIGMA_WAIT = 0.999

# Upstream builds its template from the float32 training sigmas, so its sigma_max is
# float32(0.999), not 0.999. Using the same value keeps int(1000*sigma) identical to upstream
# (with float64 0.999, shift 1 gives 665 where upstream gives 666).
TEMPLATE_SIGMA_MAX = float(np.float32(0.999))


def latent_frames(pixel_frames: int, stride: int = 4) -> int:
    """Latent frames of a causal-VAE video with ``pixel_frames`` frames: (n-1)//stride + 1 (the
    first frame alone, then ``stride`` frames per latent; the family gives the stride)."""
    if pixel_frames < 1:
        raise ValueError(f"pixel_frames must be >= 1, got {pixel_frames}")
    return (int(pixel_frames) - 1) // stride + 1


def pixel_frames(latent: int, stride: int = 4) -> int:
    """Pixel frames decoded from ``latent`` latent frames: stride*(l-1) + 1."""
    if latent < 1:
        raise ValueError(f"latent frames must be >= 1, got {latent}")
    return stride * (int(latent) - 1) + 1


def flow_shift(sigma, shift: float):
    """The flow-matching time shift s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_template(steps: int, shift: float) -> torch.Tensor:
    """The per-frame sigma schedule, float64, length ``steps + 1``, ending in 0.

    sigma_k = shift(linspace(sigma_max, 0, steps+1)[:-1]), then 0 appended (spec 1.2).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    base = np.linspace(TEMPLATE_SIGMA_MAX, 0.0, steps + 1)[:-1]
    sig = np.concatenate([flow_shift(base, float(shift)), [0.0]])
    return torch.from_numpy(sig.astype(np.float64))


def template_timesteps(template: torch.Tensor) -> torch.Tensor:
    """Upstream's integer model timesteps for a template: int64(1000*sigma) (truncation)."""
    return (template.to(torch.float64) * 1000.0).to(torch.int64)


@dataclass(frozen=True)
class DFSchedule:
    """The diffusion-forcing knobs (ARCacheDFSchedule); defaults are SkyReels-V2's. The
    streaming sampler dispatches on the schedule's type."""
    node_title: ClassVar[str] = "Diffusion Forcing Schedule (ARCacheDFSchedule)"  # what users connect
    window_frames: int = 97          # pixel frames per window, history included
    overlap_frames: int = 17         # pixel frames of history carried into the next window
    ar_step: int = 0                 # 0: synchronous; >0: block b starts ar_step rows after b-1
    causal_block_size: int = 1       # latent frames per block (and per cache chunk)
    addnoise_condition: int = 20     # history frames are re-noised to sigma = value/1000
    solver: str = "unipc"            # unipc | unipc_upstream | euler
    shift: float = 0.0               # 0: the model's own shift
    fps: int = 24                    # fps conditioning (SkyReels-V2-DF-1.3B only)
    prefix_mode: str = "auto"        # auto | reencode_pixels | latent
    sigmas: torch.Tensor | None = None   # optional custom template (overrides steps/shift)


# ---------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowPlan:
    """One window of a long video, in latent frames.

    The window holds ``prefix_frames`` of history followed by ``new_frames + pad_frames``
    generated frames. ``new_frames`` are kept and land at ``start ... start+new_frames-1`` of
    the generated output; ``pad_frames`` (only ever non-zero in the last window) exist so the
    generated part is a whole number of causal blocks, and are dropped.
    """
    index: int
    prefix_frames: int
    new_frames: int
    start: int
    pad_frames: int = 0

    @property
    def generated_frames(self) -> int:
        """Frames the solver steps in this window (kept + padding)."""
        return self.new_frames + self.pad_frames

    @property
    def total_frames(self) -> int:
        """Frames the model sees in this window (history + generated)."""
        return self.prefix_frames + self.new_frames + self.pad_frames


def plan_windows(total_latent: int, window_latent: int, overlap_latent: int,
                 causal_block_size: int = 1, initial_prefix: int = 0) -> list[WindowPlan]:
    """Split ``total_latent`` frames to generate into windows of at most ``window_latent``.

    Window 0 starts with ``initial_prefix`` history frames (0 for text-to-video, the input
    video's tail for extension); every later window starts with ``overlap_latent`` frames of
    history taken from the previous output. The last window may be shorter; if its new part is
    not a whole number of causal blocks it is padded (``pad_frames``).

    Window 0 generates the largest whole number of blocks that fits after its prefix (a start
    image leaves 24 of 25 frames: 20 with blocks of 5; the rest goes to later windows). Raises
    ValueError when no block fits there, or when ``window_latent - overlap_latent`` (every later
    window) does not divide by ``causal_block_size``.
    """
    total_latent, window_latent = int(total_latent), int(window_latent)
    overlap_latent, initial_prefix = int(overlap_latent), int(initial_prefix)
    cbs = int(causal_block_size)
    if total_latent < 1:
        raise InputError("length", f"needs at least 1 latent frame to generate, got {total_latent}")
    if cbs < 1:
        raise InputError("schedule.causal_block_size", f"must be >= 1, got {cbs}")
    if window_latent < 1:
        raise InputError("schedule.window_frames", f"a window needs at least 1 latent frame, got {window_latent}")
    if not 0 <= initial_prefix < window_latent:
        raise InputError(
            "schedule.window_frames", f"the history prefix ({initial_prefix} latent frames) must be shorter "
            f"than the window ({window_latent} latent frames); raise window_frames or lower overlap_frames")

    first_cap = (window_latent - initial_prefix) // cbs * cbs
    if first_cap == 0:
        raise InputError(
            "schedule.causal_block_size", f"window_frames ({window_latent} latent) minus the prefix "
            f"({initial_prefix} latent) leaves no room for one block of {cbs} frames; lower it or raise window_frames")

    plans: list[WindowPlan] = []
    done, prefix, cap = 0, initial_prefix, first_cap
    while done < total_latent:
        if plans:  # a later window: history is the overlap
            if not 0 <= overlap_latent < window_latent:
                raise InputError(
                    "schedule.overlap_frames", f"({overlap_latent} latent) must be shorter than "
                    f"window_frames ({window_latent} latent)")
            prefix, cap = overlap_latent, window_latent - overlap_latent
            if cap % cbs:
                raise InputError(
                    "schedule.causal_block_size", f"window_frames - overlap_frames = {window_latent} - "
                    f"{overlap_latent} = {cap} latent frames per window, which does not divide by "
                    f"causal_block_size={cbs}; pick window_frames/overlap_frames so it does")
        new = min(cap, total_latent - done)
        pad = (-new) % cbs  # only the ragged last window can need it, and pad <= cap - new
        plans.append(WindowPlan(index=len(plans), prefix_frames=prefix, new_frames=new,
                                start=done, pad_frames=pad))
        done += new
    return plans


# ---------------------------------------------------------------------------------------------
# Step matrix
# ---------------------------------------------------------------------------------------------

@dataclass
class StepMatrix:
    """Which step every frame of a window is at, per model call.

    ``counters[r, f]`` follows upstream's counter (spec 1.3), over all frames of the window,
    prefix included: 0 = waiting (pure noise, shown at sigma 0.999), k in 1..N = taking step
    k-1 (from template[k-1] to template[k]), N+1 = done (sigma 0). ``update[r, f]`` says whether
    frame f's solver steps after row r.
    """
    counters: torch.Tensor   # int64 [rows, F]
    update: torch.Tensor     # bool  [rows, F]
    steps: int
    prefix_frames: int = 0

    @property
    def rows(self) -> int:
        return int(self.counters.shape[0])

    @property
    def frames(self) -> int:
        return int(self.counters.shape[1])

    @property
    def step_index(self) -> torch.Tensor:
        """Solver step index per row and frame (counter-1, clamped to [0, N]); use where update."""
        return (self.counters - 1).clamp(0, self.steps)

    def _lookup(self, template: torch.Tensor, wait, done) -> torch.Tensor:
        if template.ndim != 1 or template.shape[0] != self.steps + 1:
            raise ValueError(f"template must have steps+1 = {self.steps + 1} entries, "
                             f"got shape {tuple(template.shape)}")
        # index k of the table is counter k: [wait, template[0..N-1], done]
        table = torch.cat([torch.tensor([wait], dtype=template.dtype), template.cpu()[:-1],
                           torch.tensor([done], dtype=template.dtype)])
        return table[self.counters]

    def sigmas(self, template: torch.Tensor) -> torch.Tensor:
        """Per-row, per-frame sigma the model sees (float64 [rows, F]); prefix frames give 0."""
        return self._lookup(template.to(torch.float64), SIGMA_WAIT, 0.0)

    def timesteps(self, template: torch.Tensor) -> torch.Tensor:
        """Upstream's integer timesteps (int64 [rows, F]): 999 waiting, int(1000*sigma), 0 done."""
        return self._lookup(template_timesteps(template), 999, 0)


def block_start_rows(num_blocks: int, steps: int, ar_step: int) -> list[int]:
    """Row at which each generated block takes its first step.

    Block b follows block b-1 by ``ar_step`` rows, but never waits longer than until block b-1
    is done (N rows), which is what upstream's counter recursion gives for ar_step > N.
    """
    lag = min(int(ar_step), int(steps))
    return [b * lag for b in range(num_blocks)]


def step_matrix(new_frames: int, steps: int, ar_step: int = 0, causal_block_size: int = 1,
                prefix_frames: int = 0) -> StepMatrix:
    """The diffusion-forcing step matrix for one window (spec 1.3).

    Built over the ``new_frames`` generated frames in blocks of ``causal_block_size``; the
    ``prefix_frames`` history columns come first and stay at N+1 ("done", never updated).
    The first generated block starts at row 0, exactly as upstream's block after a ready
    prefix. Sync (ar_step 0) gives ``steps`` rows; async gives steps + (blocks-1)*min(ar, N).
    """
    new_frames, steps, ar_step = int(new_frames), int(steps), int(ar_step)
    cbs, prefix_frames = int(causal_block_size), int(prefix_frames)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if ar_step < 0:
        raise ValueError(f"ar_step must be >= 0, got {ar_step}")
    if cbs < 1:
        raise ValueError(f"causal_block_size must be >= 1, got {cbs}")
    if prefix_frames < 0:
        raise ValueError(f"prefix_frames must be >= 0, got {prefix_frames}")
    if new_frames < 1 or new_frames % cbs:
        raise ValueError(f"the generated frames of a window ({new_frames}) must be a positive "
                         f"multiple of causal_block_size={cbs}")

    blocks = new_frames // cbs
    starts = torch.tensor(block_start_rows(blocks, steps, ar_step), dtype=torch.int64)
    rows = int(starts[-1]) + steps  # the last block needs N rows from its start
    r = torch.arange(rows, dtype=torch.int64)[:, None]
    # Each block's counter rises by one per row from its start row: 1 at the start, N on its
    # last step, then N+1 (done).
    block_counters = (r - starts[None, :] + 1).clamp(0, steps + 1)       # [rows, blocks]
    gen = block_counters.repeat_interleave(cbs, dim=1)                     # [rows, new_frames]
    prefix = torch.full((rows, prefix_frames), steps + 1, dtype=torch.int64)
    counters = torch.cat([prefix, gen], dim=1)
    # A frame steps exactly while 1 <= counter <= N (its counter changes every such row).
    update = (counters >= 1) & (counters <= steps)
    return StepMatrix(counters=counters, update=update, steps=steps, prefix_frames=prefix_frames)


def window_rows(new_frames: int, steps: int, ar_step: int = 0, causal_block_size: int = 1) -> int:
    """Number of model calls of a window, without building the matrix (for progress totals)."""
    blocks = int(new_frames) // int(causal_block_size)
    return int(steps) + (blocks - 1) * min(int(ar_step), int(steps))
