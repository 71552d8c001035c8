"""Fidelity of a generated video to a reference, in the preview RGB the toy world lives in.

Every measure works on frames as the user sees them: the Wan 2.1 latent -> RGB preview factors,
upscaled 8x nearest (ARCacheLatentPreview's `upscale 8`, 128 px for the toy's 16x16 latents).

- PSNR over all frames at once (the papers' definition: -10 log10 of one MSE, not a frame mean);
- SSIM with a Gaussian 11x11 window, sigma 1.5 (torchmetrics' defaults, which the papers use);
- ST-LPIPS (shift-tolerant LPIPS, AlexNet trunk) from the `stlpips-pytorch` wheel, which ships
  the whole backbone and the linear heads (weights/vST0.0/alex_shift_tolerant.pth), so nothing
  is downloaded at run time. Its numbers are LPIPS-like (0 = identical) but not equal to the
  papers' `lpips` AlexNet values, whose backbone torchvision would have to download;
- flicker: the mean absolute change between consecutive frames; `flicker_ratio` divides the
  video's by the reference's (1 = as much temporal change as the reference, above 1 = flicker
  the reference does not have, below 1 = motion lost or frozen).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .inprocess import pack

PSNR_CAP_DB = 99.0   # identical videos: reported as 99 dB so every figure stays finite (and valid JSON)
DISPLAY_SCALE = 8    # one latent pixel = 8x8 screen pixels, as the toy world is shown


def preview_frames(latent: torch.Tensor, family: str = "wan21") -> torch.Tensor:
    """Raw latent video [B, C, F, h, w] -> displayed frames [B*F, 3, 8h, 8w] in 0..1."""
    rgb = pack("model_patches.preview").latent_to_rgb(latent, family).movedim(-1, 1)
    return F.interpolate(rgb, scale_factor=DISPLAY_SCALE, mode="nearest")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, -10.0 * torch.log10(torch.tensor(mse)).item())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    import kornia
    # "valid": average over windows inside the frame only, as torchmetrics does (no padded borders)
    return kornia.metrics.ssim(a.float(), b.float(), window_size=11, max_val=1.0, padding="valid").mean().item()


@functools.lru_cache(maxsize=1)
def _st_lpips():
    from stlpips_pytorch import stlpips
    return stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()


@torch.no_grad()
def st_lpips(a: torch.Tensor, b: torch.Tensor, batch: int = 32) -> float:
    """Mean ST-LPIPS (AlexNet) over frames; inputs in 0..1."""
    net = _st_lpips()
    total = 0.0
    for i in range(0, a.shape[0], batch):
        total += net(a[i:i + batch].float() * 2 - 1, b[i:i + batch].float() * 2 - 1).sum().item()
    return total / a.shape[0]


def flicker(frames: torch.Tensor) -> float:
    """Mean |frame_t - frame_(t-1)| over the video (0 for a still video)."""
    if frames.shape[0] < 2:
        return 0.0
    return (frames[1:].float() - frames[:-1].float()).abs().mean().item()


def fidelity(frames: torch.Tensor, ref: torch.Tensor) -> dict:
    """All measures of a displayed video against a reference of the same shape."""
    if frames.shape != ref.shape:
        raise ValueError(f"video {tuple(frames.shape)} and reference {tuple(ref.shape)} differ in shape")
    ref_flicker = flicker(ref)
    return {"psnr_db": psnr(frames, ref), "ssim": ssim(frames, ref), "st_lpips": st_lpips(frames, ref),
            "flicker_ratio": flicker(frames) / ref_flicker if ref_flicker > 0 else None}


def latent_fidelity(latent: torch.Tensor, ref: torch.Tensor) -> dict:
    """fidelity() of two raw Wan 2.1 latent videos."""
    return fidelity(preview_frames(latent), preview_frames(ref))


def video_fidelity(latent: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(PSNR dB, SSIM) between two raw Wan 2.1 latent videos."""
    a, b = preview_frames(latent), preview_frames(ref)
    return psnr(a, b), ssim(a, b)
