"""Drift: how a long video degrades along its own length, and an anchor against colour drift.

Plain torch, no ComfyUI. Frames are [N, 3, H, W] in 0..1, cut into the video's segments (DF
windows, MAGI-1 chunks: what the sampler emits one at a time).

Per segment (`segment_stats`):
- brightness: mean luma (Rec. 601);
- colour: mean R, G, B;
- saturation: mean of (max - min) / max over RGB (HSV saturation; 0 where max is 0);
- contrast: standard deviation of luma over the segment's pixels;
- sharpness: variance of the 3x3 Laplacian of luma (blur lowers it);
- flicker: mean absolute change between consecutive frames inside the segment;
- histogram: 32-bin histogram per channel, for the distance to the first segment
  (total variation: half the L1 distance; 0 = same colour distribution, 1 = disjoint).
`drift` compares the last segment with the first (last - first; the histogram distance as is),
the measure 2026's long-video papers report as first-vs-last quality. `seam_ratio` is the mean
frame change across segment seams divided by the mean change inside segments: 1 means a seam is
a frame step like any other, above 1 a visible jump where windows meet.

The anchor (`anchor_latent`) pulls a new segment's latent statistics (per-channel mean and
standard deviation) towards an anchor's: x <- x + s * ((x - mean) / std * std_a + mean_a - x).
Strength 0 returns x itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BINS = 32
MEASURES = ("brightness", "saturation", "contrast", "sharpness", "flicker", "red", "green", "blue")
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def luma(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, H, W]."""
    return 0.299 * frames[:, 0] + 0.587 * frames[:, 1] + 0.114 * frames[:, 2]


def histogram(frames: torch.Tensor) -> torch.Tensor:
    """[3, BINS] normalised per channel."""
    h = torch.stack([torch.histc(frames[:, c].float(), bins=BINS, min=0.0, max=1.0) for c in range(3)])
    return h / h.sum(dim=1, keepdim=True).clamp_min(1)


def segment_stats(frames: torch.Tensor) -> dict:
    """The measures of one segment (see the module docstring); `histogram` is a tensor."""
    frames = frames.float().clamp(0, 1)
    y = luma(frames)
    mx, mn = frames.max(dim=1).values, frames.min(dim=1).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx))
    lap = F.conv2d(y[:, None], _LAPLACE.to(y), padding=0) if min(y.shape[-2:]) >= 3 else y[:, None] * 0
    colour = frames.mean(dim=(0, 2, 3))
    return {"brightness": float(y.mean()), "saturation": float(sat.mean()), "contrast": float(y.std()),
            "sharpness": float(lap.var()), "flicker": float((frames[1:] - frames[:-1]).abs().mean()) if len(frames) > 1
            else 0.0, "red": float(colour[0]), "green": float(colour[1]), "blue": float(colour[2]),
            "histogram": histogram(frames)}


def histogram_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation between two [3, BINS] histograms, averaged over channels (0..1)."""
    return float(0.5 * (a - b).abs().sum(dim=1).mean())


class DriftMeter:
    """Collects segment statistics as segments are emitted (no second decode) and the frames that
    meet at each seam; `summary()` gives the per-segment table, first-vs-last drift and seam ratio."""

    def __init__(self):
        self.segments: list[dict] = []
        self._last_frame = None
        self._seam_changes: list[float] = []

    def add(self, frames: torch.Tensor) -> None:
        """One emitted segment's frames [N, 3, H, W] in 0..1."""
        if not len(frames):
            return
        frames = frames.float().clamp(0, 1)
        if self._last_frame is not None and self._last_frame.shape == frames[0].shape:
            self._seam_changes.append(float((frames[0] - self._last_frame).abs().mean()))
        self._last_frame = frames[-1].clone()
        self.segments.append(segment_stats(frames))

    def summary(self) -> dict | None:
        if not self.segments:
            return None
        first = self.segments[0]
        table = [{k: v for k, v in s.items() if k != "histogram"} | {
            "histogram_distance": histogram_distance(s["histogram"], first["histogram"])} for s in self.segments]
        last = table[-1]
        inside = [s["flicker"] for s in table if s["flicker"] > 0]
        seam = sum(self._seam_changes) / len(self._seam_changes) if self._seam_changes else None
        return {"segments": table,
                "drift": {k: last[k] - table[0][k] for k in MEASURES} | {"histogram_distance": last["histogram_distance"]},
                "seam_ratio": None if seam is None or not inside else seam / (sum(inside) / len(inside))}


def latent_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of a video latent [B, C, F, h, w] -> [C], [C]."""
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.std(dim=1)


def anchor_latent(x: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor], strength: float) -> torch.Tensor:
    """x [B, C, F, h, w] with its per-channel statistics pulled towards `target` (mean, std)."""
    if strength == 0:
        return x
    mean, std = latent_stats(x)
    t_mean, t_std = (t.to(x.device, torch.float32) for t in target)
    view = (1, -1, 1, 1, 1)
    moved = (x.float() - mean.view(view)) / std.clamp_min(1e-6).view(view) * t_std.view(view) + t_mean.view(view)
    return (x.float() + strength * (moved - x.float())).to(x.dtype)


class DriftAnchor:
    """What the Drift Anchor node asks for: `strength` in [0, 1]; `image` (an IMAGE [1, H, W, 3]) to
    anchor to, or None for the first emitted window/chunk of each prompt."""

    def __init__(self, strength: float, image=None):
        self.strength, self.image = float(strength), image
