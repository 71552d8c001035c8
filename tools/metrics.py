"""Fidelity of a generated video to a reference, in the preview RGB the toy world lives in."""
from __future__ import annotations

import torch

from .inprocess import pack

PSNR_CAP_DB = 99.0   # identical videos: reported as 99 dB so every figure stays finite (and valid JSON)


def video_fidelity(latent: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) between two raw Wan 2.1 latent videos, frame by frame in preview RGB."""
    import kornia
    to_rgb = pack("model_patches.preview").latent_to_rgb
    a, b = to_rgb(latent).movedim(-1, 1), to_rgb(ref).movedim(-1, 1)
    mse = torch.mean((a - b) ** 2).item()
    psnr = PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * torch.log10(torch.tensor(1.0 / mse)).item())
    return psnr, kornia.metrics.ssim(a, b, window_size=5).mean().item()
