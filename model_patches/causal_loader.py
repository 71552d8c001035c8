"""Loading few-step causal Wan checkpoints in the layouts they are published in, through ComfyUI's loaders.

Layouts (read from the public code; the weights are not downloadable here, tests use tiny files
written in the same layouts by scripts/make_tiny_checkpoints.py):
- training files of Self-Forcing / CausVid / LongLive (`.pt`): a dict {"generator", "generator_ema",
  "critic", ...} or one of them alone, keys "model." + the Wan 2.1 names (their wrapper's only module
  is `.model`: Self-Forcing utils/wan_wrapper.py, trainer/distillation.py:182-207; LongLive v1.0
  inference.py:72-131 also strips FSDP's "_fsdp_wrapped_module."); Self-Forcing's inference loads
  generator_ema (--use_ema), LongLive's base takes generator, then its LoRA;
- ComfyUI repackages (`.safetensors`, bare Wan names), and newer core's causal files, which say
  so in their metadata ({"config": '{"transformer": {"causal_ar": true}}'}, comfy/model_detection.py);
- LongLive's LoRA (`lora.pt`): {"generator_lora": PEFT state dict}, keys
  "base_model.model.blocks.N.<module>.lora_A.weight" [rank, in] / "...lora_B.weight" [out, rank] on
  every Linear of every block, alpha = rank (LongLive utils/lora_utils.py:19-75), which core's
  LoRA key map does not know for Wan (comfy/lora.py model_lora_keys_unet).
The state dict then goes through ComfyUI's own `load_diffusion_model_state_dict` (model detection,
dtype, memory management) and LoRAs through `load_lora_for_models`.
"""
from __future__ import annotations

import json
import os

import torch

import comfy.sd
import comfy.utils
import folder_paths

from ..cache_core.errors import InputError, ModelFamilyError
from . import families, wan
from .causal_sampling import CausalRun

WEIGHT_CHOICES = ("auto", "generator_ema", "generator")
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")     # UNETLoader's
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_PEFT_PREFIX = "base_model.model."
_REQUIRED = ("patch_embedding.weight", "head.modulation", "blocks.0.self_attn.q.weight")


def _read(path: str, name: str, what: str) -> tuple[dict, dict | None]:
    """(top-level dict, safetensors metadata or None), or a named error; a .pt is memory-mapped where it
    can be (a training file holds the critic and optimizer states too, several times the generator)."""
    try:
        if path.lower().endswith((".safetensors", ".sft")):
            top, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        else:
            try:
                top, metadata = torch.load(path, map_location="cpu", weights_only=True, mmap=True), None
            except RuntimeError:      # not in the zip format mmap needs
                top, metadata = torch.load(path, map_location="cpu", weights_only=True), None
    except Exception as e:            # truncated, not a checkpoint, or pickled objects beyond tensors
        raise InputError(what, f"{name} cannot be read as a checkpoint ({type(e).__name__}: {str(e)[:200]}): "
                         "download it again, or convert it to .safetensors") from None
    if not isinstance(top, dict):
        raise InputError(what, f"{name} holds a {type(top).__name__}, not a state dict")
    return top, metadata


def pick_weights(top: dict, weights: str, file: str) -> tuple[dict, str]:
    """The generator's state dict out of a training file (or the file itself when it is flat)."""
    if weights not in WEIGHT_CHOICES:
        raise InputError("weights", f"{weights!r}: choose one of {', '.join(WEIGHT_CHOICES)}")
    nested = {k for k, v in top.items() if isinstance(v, dict)}
    if not nested or any(torch.is_tensor(v) for v in top.values()):
        return top, "flat"
    order = {"auto": ("generator_ema", "generator", "model", "state_dict"), "generator_ema": ("generator_ema",),
             "generator": ("generator",)}[weights]
    for key in order:
        if key in top:
            return top[key], key
    raise InputError("weights", f"{weights}: {file} holds {', '.join(sorted(nested))}, no "
                     f"{' or '.join(order)}: choose weights auto, or another file")


def _unwrapped(key: str) -> str:
    """A key without FSDP / activation-checkpointing / torch.compile wrapper names."""
    for w in _WRAPPERS:
        key = key.replace(w, "")
    return key


def strip_prefixes(sd: dict) -> dict:
    """Bare Wan names: the training wrapper's "model." and FSDP / checkpointing / compile wrappers dropped."""
    out = {_unwrapped(k): v for k, v in sd.items()}
    if all(k.startswith("model.") for k in out if "blocks." in k) and any("blocks." in k for k in out):
        out = {k[len("model."):] if k.startswith("model.") else k: v for k, v in out.items()}
    return out


def causal_metadata(metadata: dict | None) -> bool:
    try:
        return bool(json.loads((metadata or {}).get("config", "{}")).get("transformer", {}).get("causal_ar"))
    except (ValueError, AttributeError):
        return False


def load_causal_wan(ckpt_name: str, weights: str = "auto", weight_dtype: str = "default"):
    """A ModelPatcher of a causal Wan 2.1 checkpoint, marked causal (wan.CAUSAL_MARK)."""
    path = folder_paths.get_full_path_or_raise("diffusion_models", ckpt_name)
    if weight_dtype not in WEIGHT_DTYPES:
        raise InputError("weight_dtype", f"{weight_dtype!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
    top, metadata = _read(path, ckpt_name, "ckpt_name")
    sd, picked = pick_weights(top, weights, ckpt_name)
    sd = strip_prefixes(sd)
    missing = [k for k in _REQUIRED if k not in sd]
    if missing:
        some = ", ".join(sorted(sd)[:4])
        raise InputError("ckpt_name", f"{ckpt_name} is not a Wan transformer (no {missing[0]}; its keys start "
                         f"{some} ...): pick a Self-Forcing / LongLive / CausVid checkpoint or a Wan 2.1 repackage")
    options = {}
    if weight_dtype != "default":
        options["dtype"] = getattr(torch, weight_dtype.replace("_fast", ""))
        options["fp8_optimizations"] = weight_dtype.endswith("_fast")
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options, metadata=metadata)
    if model is None:
        raise InputError("ckpt_name", f"ComfyUI does not recognise {ckpt_name} as a diffusion model")
    layout = "core's causal_ar metadata" if causal_metadata(metadata) else \
        f"{os.path.splitext(ckpt_name)[1]} {picked} weights"
    setattr(model.model, wan.CAUSAL_MARK, f"Causal Wan Loader: {os.path.basename(ckpt_name)} ({layout})")
    try:
        family, _ = families.detect(model)
    except ModelFamilyError:
        family = None
    if family is None or family.run is not CausalRun:
        raise InputError("ckpt_name", f"{ckpt_name} is {wan.describe_model(model.model)}: the causal families are Wan "
                         "2.1 text-to-video (16 latent channels: Self-Forcing, CausVid, Causal Forcing, LongLive 1.0, "
                         "Krea) and Wan2.2-TI2V-5B (48: LongLive 2.0)")
    return model


# --- LoRA ---------------------------------------------------------------------------------------------

def lora_to_core(sd: dict, model_sd_shapes: dict, lora_name: str) -> dict:
    """LongLive's PEFT LoRA as core's "diffusion_model.<module>.lora_A/B.weight" keys, every one checked
    against the model's weight (module present, shapes [rank, in] / [out, rank])."""
    if "generator_lora" in sd and isinstance(sd["generator_lora"], dict):
        sd = sd["generator_lora"]
    out, seen = {}, 0
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        name = k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k
        name = _unwrapped(name[len("diffusion_model."):] if name.startswith("diffusion_model.") else name)
        module, _, part = name.partition(".lora_")
        if not part:
            continue
        side = part.split(".")[0]                  # A or B; PEFT may keep the adapter's name: lora_A.default.weight
        if side not in ("A", "B") or not part.endswith("weight") or v.ndim != 2:
            raise InputError("lora_name", f"{lora_name}: {k} is not a plain LoRA matrix (DoRA magnitudes, biases and "
                             "other adapter kinds are not supported)")
        weight = model_sd_shapes.get(f"diffusion_model.{module}.weight")
        if weight is None:
            raise InputError("lora_name", f"{lora_name}: {module} is not a weight of this model (a LoRA for another "
                             "base, or not a LongLive/PEFT LoRA)")
        want = (v.shape[0], weight[1]) if side == "A" else (weight[0], v.shape[1])
        if tuple(v.shape) != want:
            raise InputError("lora_name", f"{lora_name}: {module} is {weight[0]}x{weight[1]} in this model, the LoRA's "
                             f"lora_{side} is {tuple(v.shape)}: a LoRA for another base model")
        out[f"diffusion_model.{module}.lora_{side}.weight"] = v
        seen += 1
    if not seen:
        raise InputError("lora_name", f"{lora_name} holds no lora_A/lora_B weights (keys start "
                         f"{', '.join(sorted(map(str, sd))[:3])})")
    return out


def apply_lora(model, lora_name: str, strength: float):
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    sd, _ = _read(path, lora_name, "lora_name")
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    core = lora_to_core(sd, shapes, lora_name)
    patched, _ = comfy.sd.load_lora_for_models(model, None, core, strength, 0)
    layers = {k[:-len(".lora_A.weight")] + ".weight" for k in core if k.endswith(".lora_A.weight")}
    missing = [k for k in layers if len(patched.patches.get(k, ())) <= len(model.patches.get(k, ()))]
    if missing:
        raise InputError("lora_name", f"{lora_name}: ComfyUI applied {len(layers) - len(missing)} of its {len(layers)} "
                         f"LoRA layers (not {missing[0]}); the rest did not map onto this model")
    return patched
