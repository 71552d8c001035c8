"""MAGI-1 nodes: loaders for the DiT and the VAE, text encoding with MAGI's tokens, and the schedule."""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

import folder_paths

from ..cache_core.magi_schedule import MagiSchedule
from ..model_patches.magi_loader import SHARD, load_magi_model
from ..model_patches.magi_text import SPECIAL_KEY, clean_caption, load_special_tokens, t5_states
from .errors import InputError, named_errors
from .schedules import ARSchedule

MAGI_FOLDER = "magi1"      # models/magi1/: sharded DiT folders, special_tokens.npz, the VAE with its config.json
WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp32": torch.float32, "fp8_e4m3fn": torch.float8_e4m3fn}


def register_folder() -> None:
    if MAGI_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[MAGI_FOLDER] = (
            [os.path.join(folder_paths.models_dir, MAGI_FOLDER)], {".safetensors", ".json", ".npz"})


register_folder()


def _files(folder: str, keep) -> list[str]:
    try:
        return [f for f in folder_paths.get_filename_list(folder) if keep(f)]
    except Exception:     # an unregistered or missing folder lists nothing
        return []


def dit_files() -> list[str]:
    """Single files and shard indexes (one entry per sharded checkpoint), MAGI folder first."""
    def keep(f):
        base = os.path.basename(f)
        if base.endswith(".index.json"):
            return True
        return base.endswith(".safetensors") and not SHARD.match(base) and "vae" not in f.lower()
    return _files(MAGI_FOLDER, keep) + _files("diffusion_models", lambda f: f.endswith(".safetensors"))


def full_path(name: str, folders: tuple, input_name: str) -> str:
    for folder in folders:
        try:
            path = folder_paths.get_full_path(folder, name)
        except Exception:
            path = None
        if path:
            return path
    raise InputError(input_name, f"{name!r} is not in ComfyUI's models/{'/ or models/'.join(folders)}/ folder")


class MagiModelLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheMagiModelLoader",
            display_name="MAGI-1 Model Loader",
            category="ARCache/MAGI-1",
            description=(
                "Loads an official MAGI-1 DiT (4.5B or 24B, base or distill) as a ComfyUI MODEL in plain "
                "PyTorch: ComfyUI's casting, offload and LoRA machinery apply, no flash-attn or custom kernels. "
                "Put upstream's inference_weight folder (index JSON + shards) under models/magi1/, or a single "
                "safetensors file under models/magi1/ or models/diffusion_models/. The key set is checked "
                "strictly. Connect the MODEL to the Streaming AR Sampler with a MAGI-1 Schedule."),
            inputs=[
                io.Combo.Input("model_name", options=dit_files(),
                               tooltip="model.safetensors.index.json of a sharded checkpoint, or a single .safetensors (models/magi1, models/diffusion_models)."),
                io.Combo.Input("variant", options=["auto", "base", "distill"], default="auto",
                               tooltip="auto: distilled when the path says 'distill' (upstream's inference_weight.distill folders). Distilled models take the step-size embedding and one guidance pass."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="default",
                               tooltip="Storage dtype. default: ComfyUI's choice (bf16 on GPUs that support it). fp8_e4m3fn halves the memory of the 24B model (computes in bf16)."),
            ],
            outputs=[io.Model.Output(tooltip="The MAGI-1 DiT, for the Streaming AR Sampler (optionally through a cache node).")],
        )

    @classmethod
    @named_errors("MAGI-1 Model Loader")
    def execute(cls, model_name, variant, weight_dtype) -> io.NodeOutput:
        path = full_path(model_name, (MAGI_FOLDER, "diffusion_models"), "model_name")
        return io.NodeOutput(load_magi_model(path, distill=variant, dtype=WEIGHT_DTYPES[weight_dtype]))


class MagiVAELoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheMagiVAELoader",
            display_name="MAGI-1 VAE Loader",
            category="ARCache/MAGI-1",
            description=(
                "Loads MAGI-1's ViT VAE (ckpt/vae/diffusion_pytorch_model.safetensors, with its config.json "
                "beside it when present). The VAE works with ComfyUI's VAEDecode/VAEEncode (4 video frames "
                "per latent frame) and with the Streaming AR Sampler's per-chunk decode, in tiles."),
            inputs=[
                io.Combo.Input("vae_name", options=_files(MAGI_FOLDER, lambda f: f.endswith(".safetensors") and "vae" in f.lower())
                               + _files("vae", lambda f: f.endswith(".safetensors")),
                               tooltip="The MAGI-1 VAE weights (models/magi1 or models/vae)."),
            ],
            outputs=[io.Vae.Output(tooltip="MAGI-1's VAE.")],
        )

    @classmethod
    @named_errors("MAGI-1 VAE Loader")
    def execute(cls, vae_name) -> io.NodeOutput:
        from ..model_patches.files import load_json, load_safetensors
        from ..model_patches.magi_vae import load_magi_vae
        path = full_path(vae_name, (MAGI_FOLDER, "vae"), "vae_name")
        config_path = os.path.join(os.path.dirname(path), "config.json")
        fix = "download MAGI-1's ckpt/vae folder again (diffusion_pytorch_model.safetensors and config.json)"
        config = load_json(config_path, "vae_name", fix) if os.path.isfile(config_path) else None
        if config is not None and not isinstance(config, dict):
            raise InputError("vae_name", f"{config_path} is not a VAE config (a JSON object): {fix}")
        return io.NodeOutput(load_magi_vae(load_safetensors(path, "vae_name", fix), config))


class MagiTextEncodeNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheMagiTextEncode",
            display_name="MAGI-1 Text Encode",
            category="ARCache/MAGI-1",
            description=(
                "Encodes a prompt for MAGI-1: the caption is cleaned (lower case, no URLs or HTML) and run "
                "through the T5-XXL from CLIPLoader (t5xxl, type pixart); the sampler then prepends "
                "MAGI's learned HQ and per-chunk DURATION embeddings from special_tokens.npz and cuts "
                "the text to the model's 800 tokens."),
            inputs=[
                io.Clip.Input("clip", tooltip="T5-XXL v1.1 (e.g. t5xxl_fp16.safetensors) from CLIPLoader. MAGI-1 ran it in fp32; fp16 is close."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The prompt."),
                io.Combo.Input("special_tokens", options=_files(MAGI_FOLDER, lambda f: f.endswith(".npz")),
                               tooltip="special_tokens.npz from the MAGI-1 repository (example/assets), placed in models/magi1/."),
            ],
            outputs=[io.Conditioning.Output(tooltip="MAGI-1 text conditioning for the Streaming AR Sampler's positive input.")],
        )

    @classmethod
    @named_errors("MAGI-1 Text Encode")
    def execute(cls, clip, text, special_tokens) -> io.NodeOutput:
        if clip is None:
            raise InputError("clip", "is empty: load T5-XXL with CLIPLoader")
        path = full_path(special_tokens, (MAGI_FOLDER,), "special_tokens") if special_tokens else None
        if path is None:
            raise InputError("special_tokens", "no file chosen: put special_tokens.npz in models/magi1/")
        states = t5_states(clip, clean_caption(text))
        special = load_special_tokens(path, width=states.shape[-1])
        return io.NodeOutput([[states[None], {SPECIAL_KEY: special}]])


def parse_kv_range(text: str) -> tuple:
    text = text.strip().lower()
    if text in ("", "all", "full"):
        return ()
    try:
        r = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise InputError("kv_range", f"{text!r}: give chunk counts like 5,4,3,2 (or 'all' for full history)") from None
    if any(v < 1 for v in r):
        raise InputError("kv_range", f"{text!r}: every entry must be at least 1 (the chunk itself)")
    return r


class MagiScheduleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = MagiSchedule()
        return io.Schema(
            node_id="ARCacheMagiSchedule",
            display_name="MAGI-1 Schedule",
            category="ARCache/schedules",
            description=(
                "How the Streaming AR Sampler runs a MAGI-1 model: chunks of 24 video frames, up to "
                "window_size chunks denoised at once with staggered noise levels, each finished chunk "
                "committed to the K/V cache. The sampler's steps are every chunk's steps (a multiple of 4 "
                "and of window_size), its cfg the text guidance scale (7.5 upstream; distilled models ignore it)."),
            inputs=[
                io.Int.Input("chunk_width", default=d.chunk_width, min=1, max=24,
                             tooltip="Latent frames per chunk (6 = 24 video frames upstream; the released models were trained with 6)."),
                io.Int.Input("window_size", default=d.window_size, min=1, max=16,
                             tooltip="Chunks denoised together (4 upstream). 1 = one chunk at a time: least memory."),
                io.Float.Input("shift", default=d.shift, min=1.0, max=20.0, step=0.1,
                               tooltip="SD3 shift of the t^2 time grid (3 upstream)."),
                io.Combo.Input("distill", options=["auto", "on", "off"], default=d.distill,
                               tooltip="auto: as the loader found the model. on: step-size embedding and one pass (distilled weights). off: three guidance passes (base weights)."),
                io.Float.Input("history_scale", default=d.history_scale, min=0.0, max=10.0, step=0.05,
                               tooltip="Guidance towards the previous chunks while a chunk is early in its schedule (1.5 upstream; 1 turns it off). Base models only."),
                io.Float.Input("guidance_until", default=d.guidance_until, min=0.0, max=1.0, step=0.01,
                               tooltip="Text and history guidance apply while a chunk's t (0 = noise, 1 = clean) is below this (0.3 upstream, about 75% of its steps); later steps run history-only."),
                io.Float.Input("nearly_clean_threshold", default=d.nearly_clean_threshold, min=0.0, max=1.0, step=0.01,
                               tooltip="Distilled models: once the oldest chunk in the window is past this t, its velocity mixes in a pass of it alone (0.3 upstream; 1 disables)."),
                io.Float.Input("nearly_clean_weight", default=d.nearly_clean_weight, min=0.0, max=1.0, step=0.01,
                               tooltip="Weight of the with-history velocity in that mix (0.7 upstream)."),
                io.String.Input("kv_range", default="5,4,3,2",
                                tooltip="How many chunks (itself included) a chunk attends to in each quarter of its schedule (5,4,3,2 upstream). 'all' = the whole history (FlowCache's setting); then the K/V cache is not bounded."),
                io.Boolean.Input("kv_on_cpu", default=d.kv_on_cpu,
                                 tooltip="Keep finished chunks' K/V in CPU memory between uses (upstream's kv_offload): less GPU memory, some copying."),
                io.Int.Input("fps", default=d.fps, min=1, max=120, tooltip="Frame rate of the saved video (24 upstream)."),
            ],
            outputs=[ARSchedule.Output(tooltip="MAGI-1 schedule for the Streaming AR Sampler.")],
        )

    @classmethod
    @named_errors("MAGI-1 Schedule")
    def execute(cls, window_size, shift, distill, history_scale, guidance_until, nearly_clean_threshold,
                nearly_clean_weight, kv_range, kv_on_cpu, fps, chunk_width=6) -> io.NodeOutput:
        return io.NodeOutput(MagiSchedule(chunk_width=chunk_width, window_size=window_size, shift=shift, distill=distill,
                                          history_scale=history_scale, guidance_until=guidance_until,
                                          nearly_clean_threshold=nearly_clean_threshold,
                                          nearly_clean_weight=nearly_clean_weight, kv_range=parse_kv_range(kv_range),
                                          kv_on_cpu=kv_on_cpu, fps=fps))
