"""The pack beside the ComfyUI features users combine it with: a LoRA on the model, and the pack
installed by copy instead of a link (a signed-node policy refuses linked packs).

(--lowvram / --novram cannot be tested here: ComfyUI refuses them together with --cpu, and this
host has no GPU.)
"""
from __future__ import annotations

import uuid

import pytest
import safetensors.torch
import torch

from tools.comfy_server import ComfyServer
from tools.graphs import streaming_graph

UNET = "tiny_skyreels_df_1.3b_layout.safetensors"
LORA = "tiny_wan_lora.safetensors"
ASYNC = dict(window_frames=21, overlap_frames=9, ar_step=1, causal_block_size=3)
FC = dict(class_type="ARCacheFlowCache", rel_l1_thresh=0.3, warmup_steps=2, coefficients="none")


def write_lora(path, dim=256, rank=4, seed=0):
    """A rank-4 LoRA on every attention projection of the tiny DiT, in ComfyUI's generic key form."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        for attn in ("self_attn", "cross_attn"):
            for lin in ("q", "k", "v", "o"):
                key = f"diffusion_model.blocks.{i}.{attn}.{lin}"
                sd[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.2
                sd[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.2
    safetensors.torch.save_file(sd, str(path))


def run(server, cache=None, lora_strength=None, seed=3, length=33, steps=5):
    g, sid = streaming_graph(UNET, length=length, steps=steps, cfg=2.0, seed=seed, schedule=ASYNC, cache=cache,
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    if lora_strength is not None:              # UNETLoader -> LoraLoaderModelOnly -> (cache ->) sampler
        unet = next(k for k, v in g.prompt.items() if v["class_type"] == "UNETLoader")
        lora = g.add("LoraLoaderModelOnly", model=g.out(unet), lora_name=LORA, strength_model=lora_strength)
        for node in g.prompt.values():
            if node["class_type"] != "LoraLoaderModelOnly" and node["inputs"].get("model") == g.out(unet):
                node["inputs"]["model"] = g.out(lora)
    entry = server.run(g.prompt)
    return server.saved_latent(entry, next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent"))


@pytest.fixture(scope="module")
def lora(comfy, tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / LORA
    write_lora(path)
    comfy.add_model(path, "loras")
    return path


def test_flowcache_on_a_lora_model(comfy, lora):
    plain = run(comfy, FC)
    with_lora = run(comfy, FC, lora_strength=1.0)
    assert not torch.allclose(plain, with_lora, atol=1e-3)              # the LoRA reaches the chunk-wise run
    assert torch.equal(run(comfy, FC, lora_strength=0.0), plain)          # strength 0 is the model itself
    uncached_lora = run(comfy, None, lora_strength=1.0)
    # the cache on top of the LoRA keeps the same restructure-vs-skip relation as without it
    restructured = run(comfy, dict(FC, rel_l1_thresh=0.0, skip_redundant_steps=False), lora_strength=1.0)
    assert torch.equal(run(comfy, dict(FC, rel_l1_thresh=0.0), lora_strength=1.0), restructured)
    assert not torch.equal(restructured, uncached_lora)
    assert "lora key not loaded" not in comfy.log_path.read_text(errors="replace")


def test_the_pack_installed_by_copy_gives_the_same_video(comfy, tiny_models, tmp_path_factory):
    reference = run(comfy, FC)
    server = ComfyServer(tmp_path_factory.mktemp("compat_copy"), install="copy").prepare()
    pack_dir = server.base_dir / "custom_nodes" / "ComfyUI-ARCache"
    assert pack_dir.is_dir() and not pack_dir.is_symlink() and (pack_dir / "nodes" / "sampler.py").is_file()
    assert not (pack_dir / ".host").exists()
    server.add_model(tiny_models["1.3b"], "diffusion_models")
    with server:
        assert torch.equal(run(server, FC), reference)


def test_torch_compile_model_with_a_cache(comfy):
    """Core TorchCompileModel compiles the diffusion model's blocks; under a cache the chunk loop
    calls the same (compiled) blocks, so the video matches the uncompiled one. One short window:
    inductor compiles every chunk shape on the CPU, which is most of this test's time."""
    reference = run(comfy, FC, seed=4, length=17, steps=3)
    g, sid = streaming_graph(UNET, length=17, steps=3, cfg=2.0, seed=4, schedule=ASYNC, cache=FC,
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    unet = next(k for k, v in g.prompt.items() if v["class_type"] == "UNETLoader")
    compiled = g.add("TorchCompileModel", model=g.out(unet), backend="inductor")
    cache = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheFlowCache")
    g.prompt[cache]["inputs"]["model"] = g.out(compiled)
    entry = comfy.run(g.prompt, timeout=900)
    out = comfy.saved_latent(entry, next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent"))
    torch.testing.assert_close(out, reference, atol=1e-3, rtol=1e-3)
