#!/usr/bin/env python3
"""Write tiny, randomly initialised checkpoints in the real key layouts.

Real SkyReels-V2 / Wan weights cannot be downloaded here (and are gigabytes), so tests and the
demo run on these. ComfyUI's UNETLoader / VAELoader detect them exactly as the real files:

  diffusion_models/tiny_skyreels_df_1.3b_layout.safetensors  Wan 2.1 T2V DiT + the fps_embedding /
                                                         fps_projection keys of SkyReels-V2-DF-1.3B
  diffusion_models/tiny_skyreels_df_14b_layout.safetensors   the same without fps keys (14B layout)
  vae/tiny_wan21_vae.safetensors                          Wan 2.1 VAE (base dim 8)
  magi1/tiny_magi1_4.5b_layout/inference_weight/          MAGI-1 DiT, 4.5B layout (GELU, 16 channels), 3 layers,
        model.safetensors.index.json + 2 shards            sharded with an index JSON as upstream ships it
  magi1/tiny_magi1_24b_layout.safetensors                 MAGI-1 DiT, 24B layout (SwiGLU, 32 input channels)
  magi1/tiny_magi1_vae.safetensors (+ config.json)        MAGI-1 ViT VAE (width 64, 2+2 blocks)
  magi1/special_tokens.npz                                random stand-in for MAGI-1's special_tokens.npz
  diffusion_models/tiny_self_forcing_layout.pt            a Self-Forcing training file: generator, generator_ema
                                                          and critic, "model." prefixed Wan 2.1 keys
  diffusion_models/tiny_causal_wan_comfy_layout.safetensors  bare Wan 2.1 keys, core's causal_ar metadata
  diffusion_models/tiny_longlive_base_layout.pt           LongLive's base: generator only, "model." keys
  diffusion_models/tiny_longlive2_5b_layout.pt            LongLive 2.0's merged generator on Wan2.2-TI2V-5B
                                                          (48-channel latents), "model." keys
  loras/tiny_longlive_lora_layout.pt                      LongLive's LoRA: generator_lora (PEFT keys
                                                          base_model.model.blocks.N.<linear>.lora_A/B) + critic_lora

The MAGI-1 DiT key table is written out here from the spec (specs/magi1.md 1.5), not taken
from the pack's own schema, so strict loading of these files checks the pack's layout.

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
CAUSAL_FILES = {
    "self_forcing": "tiny_self_forcing_layout.pt",
    "causal_comfy": "tiny_causal_wan_comfy_layout.safetensors",
    "longlive_base": "tiny_longlive_base_layout.pt",
    "longlive2": "tiny_longlive2_5b_layout.pt",
}
LORA_FILE = "tiny_longlive_lora_layout.pt"
LORA_MODULES = tuple(f"{a}.{x}" for a in ("self_attn", "cross_attn") for x in "qkvo") + ("ffn.0", "ffn.2")
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


# A MAGI-1 DiT small enough for CPU tests (specs/magi1.md 7.5): hidden = heads * head_dim,
# head_dim % 8 == 0 (RoPE bands = head_dim/8), heads*head_dim % 8 == 0 (the 8-way interleave).
TINY_MAGI = dict(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, cond=16, caption=32, caption_len=64)


def magi_dit_shapes(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, cond=16, caption=32,
                    caption_len=64, gated=False, channels=16) -> dict[str, tuple]:
    """Key -> shape of an official MAGI-1 DiT checkpoint (spec table 1.5; no packed QKV)."""
    hq, hk, out = heads * head_dim, kv_heads * head_dim, 2 * 2 * channels
    s = {"x_embedder.weight": (hidden, channels, 1, 2, 2),
         "t_embedder.mlp.0.weight": (cond, 256), "t_embedder.mlp.0.bias": (cond,),
         "t_embedder.mlp.2.weight": (cond, cond), "t_embedder.mlp.2.bias": (cond,),
         "y_embedder.y_proj_xattn.0.weight": (hidden, caption), "y_embedder.y_proj_xattn.0.bias": (hidden,),
         "y_embedder.y_proj_adaln.0.weight": (cond, caption), "y_embedder.y_proj_adaln.0.bias": (cond,),
         "y_embedder.null_caption_embedding": (caption_len, caption),
         "rope.bands": (head_dim // 8,),
         "videodit_blocks.final_layernorm.weight": (hidden,), "videodit_blocks.final_layernorm.bias": (hidden,),
         "final_linear.linear.weight": (out, hidden)}
    for i in range(layers):
        p = f"videodit_blocks.layers.{i}."
        s[p + "ada_modulate_layer.proj.0.weight"] = (2 * hidden, cond)
        s[p + "ada_modulate_layer.proj.0.bias"] = (2 * hidden,)
        a = p + "self_attention."
        s[a + "linear_qkv.layer_norm.weight"] = s[a + "linear_qkv.layer_norm.bias"] = (hidden,)
        s[a + "linear_qkv.q.weight"] = s[a + "linear_qkv.qx.weight"] = (hq, hidden)
        s[a + "linear_qkv.k.weight"] = s[a + "linear_qkv.v.weight"] = (hk, hidden)
        s[a + "linear_kv_xattn.weight"] = (2 * hk, hidden)
        s[a + "linear_proj.weight"] = (hidden, 2 * hq)
        for n in ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn"):
            s[a + n + ".weight"] = s[a + n + ".bias"] = (head_dim,)
        for n in ("self_attn_post_norm", "mlp_post_norm", "mlp.layer_norm"):
            s[p + n + ".weight"] = s[p + n + ".bias"] = (hidden,)
        s[p + "mlp.linear_fc1.weight"] = ((2 if gated else 1) * ffn, hidden)
        s[p + "mlp.linear_fc2.weight"] = (hidden, ffn)
    return s


def magi_tensors(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random MAGI-1 weights. The "+1" norms (QK, post, final) get gammas near 0, so a loader
    that forgot the +1 gives near-zero outputs; the two plain pre-norms get gammas near 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name == "rope.bands":     # upstream's initial bands 1/10000^(k/n), slightly perturbed (learned)
            n = shape[0]
            t = (1.0 / 10000 ** (torch.arange(n) / n)) * (1 + 0.1 * torch.rand(shape, generator=g))
        elif "layer_norm." in name and ("linear_qkv" in name or "mlp.layer_norm" in name):
            t = (1.0 if name.endswith("weight") else 0.0) + 0.05 * torch.randn(shape, generator=g)
        elif "norm" in name:
            t = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name == "y_embedder.null_caption_embedding":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * math.prod(shape[1:]) ** -0.5
        out[name] = t.contiguous()
    return out


def save_sharded(sd: dict[str, torch.Tensor], folder: str, shards: int = 2) -> str:
    """upstream's layout: model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    import json
    os.makedirs(folder, exist_ok=True)
    names = sorted(sd)
    weight_map = {}
    for k in range(shards):
        part = names[k::shards]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: sd[n] for n in part}, os.path.join(folder, fname))
        weight_map.update({n: fname for n in part})
    index = os.path.join(folder, "model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                   "weight_map": weight_map}, f, indent=1)
    return index


def write_magi(out_dir: str, seed: int = 0, comfyui: str | None = None) -> dict[str, str]:
    import json
    import numpy as np
    magi = os.path.join(out_dir, "magi1")
    os.makedirs(magi, exist_ok=True)
    paths = {"magi_4.5b": save_sharded(magi_tensors(magi_dit_shapes(**TINY_MAGI), seed + 10),
                                       os.path.join(magi, "tiny_magi1_4.5b_layout", "inference_weight"))}
    paths["magi_24b"] = os.path.join(magi, "tiny_magi1_24b_layout.safetensors")
    save_file(magi_tensors(magi_dit_shapes(**TINY_MAGI, gated=True, channels=32), seed + 11), paths["magi_24b"])
    g = np.random.default_rng(seed + 12)
    width = TINY_MAGI["caption"]
    paths["magi_special_tokens"] = os.path.join(magi, "special_tokens.npz")
    np.savez(paths["magi_special_tokens"], caption_token=g.standard_normal((1, width)),
             logo_token=g.standard_normal((1, width)), other_tokens=g.standard_normal((100, width)))
    import_comfy(comfyui)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools.inprocess import pack   # the VAE's key layout is the pack's (checked against upstream's names in its tests)
    magi_vae = pack("model_patches.magi_vae")
    cfg = magi_vae.tiny_vae_config()
    paths["magi_vae"] = os.path.join(magi, "tiny_magi1_vae.safetensors")
    save_file(random_tensors(magi_vae.expected_vae_keys(cfg), seed + 13), paths["magi_vae"])
    with open(os.path.join(magi, "config.json"), "w") as f:
        json.dump(magi_vae.vae_config_json(cfg), f, indent=1)
    return paths


def longlive_lora(shapes: dict[str, tuple], seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """PEFT LoRA keys on every Linear of every block, as LongLive's trainer saves them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        module = key[:-len(".weight")]
        if not key.startswith("blocks.") or module.split(".", 2)[2] not in LORA_MODULES:
            continue
        out[f"base_model.model.{module}.lora_A.weight"] = torch.randn((rank, shape[1]), generator=g) * shape[1] ** -0.5
        out[f"base_model.model.{module}.lora_B.weight"] = torch.randn((shape[0], rank), generator=g) * 0.05
    return out


def write_causal(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Few-step causal Wan checkpoints in the layouts Self-Forcing, core and LongLive publish."""
    import json
    shapes = wan21_dit_shapes(fps_keys=False)
    model = lambda sd: {"model." + k: v for k, v in sd.items()}   # noqa: E731  (the training wrapper's prefix)
    folder = os.path.join(out_dir, "diffusion_models")
    paths = {k: os.path.join(folder, name) for k, name in CAUSAL_FILES.items()}
    critic = random_tensors(wan21_dit_shapes(fps_keys=False, num_layers=1), seed + 12)
    torch.save({"generator": model(random_tensors(shapes, seed + 10)), "generator_ema": model(random_tensors(shapes, seed + 11)),
                "critic": model(critic)}, paths["self_forcing"])
    save_file(random_tensors(shapes, seed + 11), paths["causal_comfy"],
              metadata={"config": json.dumps({"transformer": {"causal_ar": True}})})
    torch.save({"generator": model(random_tensors(shapes, seed + 13))}, paths["longlive_base"])
    torch.save({"generator": model(random_tensors(wan21_dit_shapes(fps_keys=False, channels=48), seed + 16)),
                "merged_lora": True}, paths["longlive2"])
    os.makedirs(os.path.join(out_dir, "loras"), exist_ok=True)
    paths["longlive_lora"] = os.path.join(out_dir, "loras", LORA_FILE)
    torch.save({"generator_lora": longlive_lora(shapes, seed + 14), "critic_lora": longlive_lora(shapes, seed + 15),
                "step": 100}, paths["longlive_lora"])
    return paths


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
    paths.update(write_magi(out_dir, seed, comfyui))
    paths.update(write_causal(out_dir, seed))
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
