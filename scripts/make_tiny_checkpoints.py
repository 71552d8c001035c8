#!/usr/bin/env python3
"""Write tiny, randomly initialised checkpoints in the real key layouts.

Real SkyReels-V2 / Wan weights cannot be downloaded here (and are gigabytes), so tests and the
demo run on these. ComfyUI's UNETLoader / VAELoader detect them exactly as the real files:

  diffusion_models/tiny_skyreels_df_1.3b_layout.safetensors  Wan 2.1 T2V DiT + the fps_embedding /
                                                         fps_projection keys of SkyReels-V2-DF-1.3B
  diffusion_models/tiny_skyreels_df_14b_layout.safetensors   the same without fps keys (14B layout)
  vae/tiny_wan21_vae.safetensors                          Wan 2.1 VAE (base dim 8)

ComfyUI reads the DiT's sizes from tensor shapes and fixes the head dim at 128, so the smallest
DiT is dim 128; we use dim 256 (2 heads). The VAE layout is taken from ComfyUI's own WanVAE class
(the class that loads the real Wan 2.1 VAE file), so ComfyUI must be importable for it.

usage: python scripts/make_tiny_checkpoints.py --out MODELS_DIR [--comfyui PATH] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from safetensors.torch import save_file

DIT_FILES = {
    "1.3b": "tiny_skyreels_df_1.3b_layout.safetensors",
    "14b": "tiny_skyreels_df_14b_layout.safetensors",
}
VAE_FILE = "tiny_wan21_vae.safetensors"
TEXT_DIM, FREQ_DIM, LATENT_CHANNELS, PATCH = 4096, 256, 16, (1, 2, 2)


def wan21_dit_shapes(dim=256, ffn_dim=512, num_layers=2, fps_keys=True, channels=LATENT_CHANNELS) -> dict[str, tuple]:
    """Key -> shape of a Wan 2.1 T2V DiT as the official checkpoints name them."""
    s = {
        "patch_embedding.weight": (dim, channels, *PATCH),
        "patch_embedding.bias": (dim,),
        "text_embedding.0.weight": (dim, TEXT_DIM), "text_embedding.0.bias": (dim,),
        "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
        "time_embedding.0.weight": (dim, FREQ_DIM), "time_embedding.0.bias": (dim,),
        "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
        "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
        "head.head.weight": (math.prod(PATCH) * channels, dim),
        "head.head.bias": (math.prod(PATCH) * channels,),
        "head.modulation": (1, 2, dim),
    }
    for i in range(num_layers):
        p = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                s[f"{p}{attn}.{lin}.weight"] = (dim, dim)
                s[f"{p}{attn}.{lin}.bias"] = (dim,)
            s[f"{p}{attn}.norm_q.weight"] = (dim,)
            s[f"{p}{attn}.norm_k.weight"] = (dim,)
        s[f"{p}norm3.weight"] = (dim,)
        s[f"{p}norm3.bias"] = (dim,)
        s[f"{p}ffn.0.weight"] = (ffn_dim, dim)
        s[f"{p}ffn.0.bias"] = (ffn_dim,)
        s[f"{p}ffn.2.weight"] = (dim, ffn_dim)
        s[f"{p}ffn.2.bias"] = (dim,)
        s[f"{p}modulation"] = (1, 6, dim)
    if fps_keys:  # SkyReels-V2-DF-1.3B only: fps index embedding added to the 6-way modulation
        s["fps_embedding.weight"] = (2, dim)
        s["fps_projection.0.weight"] = (dim, dim)
        s["fps_projection.0.bias"] = (dim,)
        s["fps_projection.2.weight"] = (6 * dim, dim)
        s["fps_projection.2.bias"] = (6 * dim,)
    return s


def random_tensors(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Variance-preserving random weights: outputs stay O(1) through the tiny stack."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".bias"):
            t = torch.randn(shape, generator=g) * 0.02
        elif "norm" in name or name.endswith("gamma"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        elif name.endswith("modulation") or name == "fps_embedding.weight":
            t = torch.randn(shape, generator=g) * 0.1
        else:
            t = torch.randn(shape, generator=g) * math.prod(shape[1:]) ** -0.5
        out[name] = t.contiguous()
    return out


def import_comfy(comfyui: str | None):
    root = comfyui or os.environ.get("COMFYUI_PATH") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", ".host", "ComfyUI")
    if not os.path.isfile(os.path.join(root, "comfy", "ldm", "wan", "vae.py")):
        sys.exit(f"ComfyUI not found at {root}: pass --comfyui PATH (needed for the VAE layout)")
    sys.path.insert(0, os.path.abspath(root))
    import comfy.cli_args  # noqa: E402
    if not __import__("torch").cuda.is_available():
        comfy.cli_args.args.cpu = True  # model_management probes the GPU at import time
    import comfy.ldm.wan.vae as wan_vae  # noqa: E402
    return wan_vae


def tiny_vae_tensors(comfyui: str | None, seed: int, base_dim: int = 8) -> dict[str, torch.Tensor]:
    wan_vae = import_comfy(comfyui)
    with torch.device("meta"):  # only the key layout is taken from ComfyUI; ComfyUI's ops skip init
        vae = wan_vae.WanVAE(dim=base_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                             attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)
    return random_tensors({k: tuple(v.shape) for k, v in vae.state_dict().items()}, seed)


def write_all(out_dir: str, seed: int = 0, comfyui: str | None = None) -> dict[str, str]:
    paths = {}
    os.makedirs(os.path.join(out_dir, "diffusion_models"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "vae"), exist_ok=True)
    for i, (layout, name) in enumerate(DIT_FILES.items()):  # distinct weights, like distinct models
        sd = random_tensors(wan21_dit_shapes(fps_keys=(layout == "1.3b")), seed + 2 * i)
        paths[layout] = os.path.join(out_dir, "diffusion_models", name)
        save_file(sd, paths[layout])
    paths["vae"] = os.path.join(out_dir, "vae", VAE_FILE)
    save_file(tiny_vae_tensors(comfyui, seed + 1), paths["vae"])
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="ComfyUI models folder to write into")
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: $COMFYUI_PATH or .host/ComfyUI)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for kind, path in write_all(a.out, a.seed, a.comfyui).items():
        print(f"{kind}: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
