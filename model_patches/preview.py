"""Latent -> RGB without a VAE, through a latent format's linear preview factors."""
from __future__ import annotations

import torch

from .families import FAMILIES


def latent_to_rgb(raw: torch.Tensor, family: str = "wan21") -> torch.Tensor:
    """Raw latent [B, C, F, h, w] -> frames [B*F, h, w, 3] in 0..1 (the sampler preview's colours)."""
    fmt = FAMILIES[family].latent_format()
    x = fmt.process_in(raw.float())
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=x.dtype)          # [C, 3]
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=x.dtype)
    rgb = torch.einsum("bcfhw,cr->bfhwr", x, factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1).reshape(-1, *rgb.shape[2:])
