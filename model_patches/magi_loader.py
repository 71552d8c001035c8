"""Loading official MAGI-1 DiT weights into a ComfyUI model (ModelPatcher over a BaseModel).

Files: one `model.safetensors`, or the sharded `model.safetensors.index.json` with its shards
(upstream's `inference_weight[.fp8][.distill]/` folders). The key set is checked strictly
against the schema of the sizes read from the tensors; nothing is renamed.
"""
from __future__ import annotations

import os
import re

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import comfy.utils

from ..cache_core.errors import InputError
from .files import load_json, load_safetensors
from .magi_model import MagiConfig, MagiDiT, check_keys

SHARD = re.compile(r"^(.*)-\d{5}-of-\d{5}\.safetensors$")


class MagiLatentFormat(comfy.latent_formats.LatentFormat):
    """MAGI-1's ViT VAE latents: 16 channels, scale 0.18215, no shift (video_process.py:304)."""
    latent_channels = 16
    latent_dimensions = 3
    scale_factor = 0.18215
    latent_rgb_factors = None     # no published preview factors; the pack's Latent Preview node still works


class MagiModelConfig(comfy.supported_models_base.BASE):
    latent_format = MagiLatentFormat
    sampling_settings = {"shift": 3.0, "multiplier": 1.0}
    supported_inference_dtypes = [torch.bfloat16, torch.float32]    # fp16 overflows (upstream runs bf16)
    memory_usage_factor = 2.0

    def __init__(self, config: MagiConfig):
        super().__init__({"config": config})

    def get_model(self, state_dict, prefix="", device=None):
        return MagiModel(self, device=device)


class MagiModel(comfy.model_base.BaseModel):
    """A ComfyUI BaseModel whose diffusion_model is the MAGI-1 DiT (t = 1 - sigma, velocity out)."""

    def __init__(self, model_config, device=None):
        super().__init__(model_config, model_type=comfy.model_base.ModelType.FLOW, device=device, unet_model=MagiDiT)
        self.magi_distill = False     # set by the loader: distilled weights (step-size embedding, 1 pass)


def describe_state_dict(sd: dict) -> str:
    """What a non-MAGI checkpoint looks like, for the error message."""
    keys = list(sd)
    if any(k.startswith("blocks.0.self_attn") or ".blocks.0.self_attn" in k for k in keys):
        return "a Wan 2.1 / SkyReels-V2 DiT (blocks.N.self_attn...): load it with ComfyUI's Load Diffusion Model (UNETLoader)"
    if any("encoder.block.0.layer" in k for k in keys):
        return "a T5 text encoder: load it with CLIPLoader and connect it to MAGI-1 Text Encode"
    if any(k.startswith("encoder.patch_embed") for k in keys):
        return "the MAGI-1 VAE: load it with MAGI-1 VAE Loader"
    return "an unknown model (first keys: " + ", ".join(keys[:4]) + ")"


def inside(folder: str, name) -> bool:
    """A shard name that resolves to a file in `folder` itself (no absolute path, no ../, no link out)."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        return False
    root = os.path.realpath(folder)
    return os.path.dirname(os.path.realpath(os.path.join(root, name))) == root


def read_state_dict(path: str, input_name: str = "model_name") -> dict:
    """All tensors of a single file or of an index JSON's shards (a picked shard means its index)."""
    m = SHARD.match(os.path.basename(path))
    if m and not path.endswith(".json"):
        index = os.path.join(os.path.dirname(path), m.group(1) + ".safetensors.index.json")
        if not os.path.isfile(index):
            raise InputError(input_name, f"{os.path.basename(path)} is one shard of a sharded checkpoint, but "
                             f"{os.path.basename(index)} is not beside it: copy the whole inference_weight folder")
        path = index
    if path.endswith(".zst"):
        raise InputError(input_name, "is zstd-compressed: decompress it first (zstd -d FILE)")
    fix = "download it again (the whole inference_weight folder for a sharded checkpoint)"
    if not path.endswith(".json"):
        return load_safetensors(path, input_name, fix)
    index = load_json(path, input_name, fix)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(input_name, f"{os.path.basename(path)} has no weight_map: not a safetensors index")
    folder, sd = os.path.dirname(path), {}
    shards = sorted(set(weight_map.values()))
    outside = [s for s in shards if not inside(folder, s)]
    if outside:
        raise InputError(input_name, f"{os.path.basename(path)} ({path}) names shard(s) outside its own folder "
                         f"({', '.join(map(repr, outside[:3]))}): an index may only name files beside it. This one is "
                         "damaged or not from MAGI-1: download the inference_weight folder again")
    absent = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if absent:
        raise InputError(input_name, f"the index names {len(absent)} shard(s) that are not in {folder}: "
                         f"{', '.join(absent[:4])}; download every shard of the folder")
    for shard in shards:
        part = load_safetensors(os.path.join(folder, shard), input_name, fix)
        sd.update({k: v for k, v in part.items() if weight_map.get(k) == shard or k not in weight_map})
    missing_from_shards = sorted(set(weight_map) - set(sd))
    if missing_from_shards:
        raise InputError(input_name, f"the index lists {len(missing_from_shards)} tensor(s) its shards lack, e.g. "
                         f"{missing_from_shards[0]}: a shard is incomplete or from another download")
    return sd


def check_magi(sd: dict, input_name: str = "model_name") -> MagiConfig:
    if "videodit_blocks.layers.0.mlp.linear_fc2.weight" not in sd or "x_embedder.weight" not in sd:
        raise InputError(input_name, f"is not a MAGI-1 DiT: it looks like {describe_state_dict(sd)}")
    fp8 = [k for k, v in sd.items() if k.endswith(("weight_scale", "input_scale", "smooth_scale"))
           or str(v.dtype).startswith("torch.float8")]
    if fp8:
        raise InputError(input_name, "is an fp8 (distill_quant) checkpoint. Its scales' meaning could not be "
                         "established without the flashinfer kernels it was made for, so it is refused rather than "
                         "guessed. Use the bf16 4.5B_distill / 24B_distill weights; ComfyUI can still store them in "
                         "fp8 (weight_dtype).")
    config = MagiConfig.from_state_dict(sd)
    check_keys(sd, config, input_name)
    return config


def load_magi_model(path: str, distill: str = "auto", dtype: torch.dtype | None = None,
                    input_name: str = "model_name") -> comfy.model_patcher.ModelPatcher:
    """The MODEL for a MAGI-1 checkpoint. distill: "auto" reads it from the path (upstream's
    `inference_weight.distill` folders and `*_distill` model folders), or "base"/"distill"."""
    sd = read_state_dict(path, input_name)
    config = check_magi(sd, input_name)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model_config = MagiModelConfig(config)
    if dtype is None:
        dtype = comfy.model_management.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                                                  supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model(sd).to(offload_device)
    model.load_model_weights(sd, "")
    model.magi_distill = ("distill" in path.replace("\\", "/").lower()) if distill == "auto" else distill == "distill"
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
