"""Latent -> RGB without a VAE, through a latent format's linear preview factors."""
from __future__ import annotations

import torch

from .families import FAMILIES
from .vae_stream import rgb_preview


def latent_to_rgb(raw: torch.Tensor, family: str = "wan21") -> torch.Tensor:
    """Raw latent [B, C, F, h, w] -> frames [B*F, h, w, 3] in 0..1 (the sampler preview's colours)."""
    return rgb_preview(raw, FAMILIES[family].latent_format())
