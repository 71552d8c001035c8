"""MAGI-1 as a new user meets it: broken downloads, the wrong companions, a NaN checkpoint, a broken
paste in the prompt. Every bad file or input is refused with its input, file, cause and fix; nothing
is silently wrong; a failed run leaves the next one bit-identical."""
from __future__ import annotations

import json
import shutil
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.graphs import magi_graph, streaming_graph

SMALL = dict(variant="distill", seed=3, length=48, steps=8)
WAN_VAE = "tiny_wan21_vae.safetensors"


def run(comfy, **kw):
    g, sid = magi_graph(save_prefix=f"latents/{uuid.uuid4().hex[:8]}", **{**SMALL, **kw})
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save)


def refused(comfy, graph) -> str:
    with pytest.raises(ComfyError) as e:
        comfy.run(graph.prompt)
    return str(e.value)


def magi(comfy, **kw):
    return magi_graph(save_prefix=f"latents/{uuid.uuid4().hex[:8]}", **{**SMALL, **kw})[0]


@pytest.fixture(scope="module")
def broken(comfy):
    """Broken downloads beside the good files in models/magi1 (new files: the good ones are hard links)."""
    root = comfy.base_dir / "models" / "magi1"
    good = root / "tiny_magi1_24b_layout.safetensors"
    data = good.read_bytes()
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    (root / "broken" / "empty.safetensors").write_bytes(b"")
    (root / "broken" / "login_page.safetensors").write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title>")
    src = root / "tiny_magi1_4.5b_layout" / "inference_weight"
    for name, index in (("html_index", "<html><body>Access to this repository is restricted</body></html>"),
                        ("cut_index", '{"metadata": {}, "weight_map": {"x_embedder.weight": "model-0'),
                        ("escaping_index", None), ("absolute_index", None)):
        folder = root / "broken" / name
        shutil.copytree(src, folder, dirs_exist_ok=True)
        if index is None:
            good_index = json.loads((src / "model.safetensors.index.json").read_text())
            outside = "../../tiny_magi1_24b_layout.safetensors" if name == "escaping_index" else str(good)
            good_index["weight_map"] = {k: outside for k in good_index["weight_map"]}
            index = json.dumps(good_index)
        (folder / "model.safetensors.index.json").unlink()
        (folder / "model.safetensors.index.json").write_text(index)
    vae = root / "broken_vae"
    vae.mkdir(exist_ok=True)
    vae_data = (root / "tiny_magi1_vae.safetensors").read_bytes()
    (vae / "tiny_magi1_vae.safetensors").write_bytes(vae_data)
    (vae / "config.json").write_text('{"patch_size": 4, "ref_lat')
    cut = root / "broken_vae_cut"
    cut.mkdir(exist_ok=True)
    (cut / "tiny_magi1_vae.safetensors").write_bytes(vae_data[:-100])
    (root / "broken_special_tokens.npz").write_bytes(b"")
    return root


@pytest.mark.parametrize("model,cause", [
    ("broken/truncated.safetensors", "is truncated"),
    ("broken/empty.safetensors", "is empty (0 bytes)"),
    ("broken/login_page.safetensors", "is an HTML page"),
    ("broken/html_index/model.safetensors.index.json", "is an HTML page"),
    ("broken/cut_index/model.safetensors.index.json", "is not valid JSON"),
    ("broken/escaping_index/model.safetensors.index.json", "outside its own folder"),
    ("broken/absolute_index/model.safetensors.index.json", "outside its own folder"),
])
def test_a_broken_checkpoint_is_named_with_its_cause_and_the_next_run_is_unchanged(comfy, broken, model, cause):
    before = run(comfy)
    msg = refused(comfy, magi(comfy, model=model))
    assert "MAGI-1 Model Loader, model_name:" in msg and cause in msg, msg
    assert model.split("/")[-1] in msg and "download" in msg
    assert torch.equal(run(comfy), before)


@pytest.mark.parametrize("vae,cause", [("broken_vae/tiny_magi1_vae.safetensors", "config.json"),
                                       ("broken_vae_cut/tiny_magi1_vae.safetensors", "is truncated")])
def test_a_broken_vae_download_is_named(comfy, broken, vae, cause):
    msg = refused(comfy, magi(comfy, vae=vae))
    assert "MAGI-1 VAE Loader, vae_name:" in msg and cause in msg and "download" in msg, msg


def test_a_broken_special_tokens_file_is_named(comfy, broken):
    g = magi(comfy)
    enc = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiTextEncode")
    g.prompt[enc]["inputs"]["special_tokens"] = "broken_special_tokens.npz"
    msg = refused(comfy, g)
    assert "special_tokens:" in msg and "is empty" in msg and "MAGI-1 repository" in msg, msg


def test_wans_umt5_is_refused_as_magis_text_encoder(comfy):
    g = magi(comfy)
    loader = next(k for k, v in g.prompt.items() if v["class_type"] == "TestkitTinyT5Loader")
    g.prompt[loader]["inputs"]["name"] = "umt5xxl"
    msg = refused(comfy, g)
    assert "MAGI-1 Text Encode, clip: is UMT5-XXL" in msg and "type pixart" in msg, msg


def test_a_vae_of_the_other_family_is_refused_both_ways(comfy):
    g = magi(comfy, vae="tiny_magi1_vae.safetensors", sampler_extra={"save_video": True})
    vae = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiVAELoader")
    g.prompt[vae] = {"class_type": "VAELoader", "inputs": {"vae_name": WAN_VAE}}
    msg = refused(comfy, g)
    assert "Streaming AR Sampler, vae: is not the MAGI-1 VAE" in msg and "MAGI-1 VAE Loader" in msg, msg
    g, sid = streaming_graph("tiny_skyreels_df_1.3b_layout.safetensors", vae=WAN_VAE, length=17, steps=2)
    vae = next(k for k, v in g.prompt.items() if v["class_type"] == "VAELoader")
    g.prompt[vae] = {"class_type": "ARCacheMagiVAELoader", "inputs": {"vae_name": "tiny_magi1_vae.safetensors"}}
    msg = refused(comfy, g)
    assert "Streaming AR Sampler, vae: is the MAGI-1 VAE" in msg and "Wan 2.1 VAE" in msg, msg


def test_nan_weights_stop_the_run_naming_the_chunk(comfy):
    from safetensors.torch import load_file, save_file
    root = comfy.base_dir / "models" / "magi1"
    sd = load_file(root / "tiny_magi1_24b_layout.safetensors")
    sd["final_linear.linear.weight"][0, 0] = float("nan")
    save_file(sd, root / "nan_weights.safetensors")
    before = run(comfy, model="tiny_magi1_24b_layout.safetensors")
    msg = refused(comfy, magi(comfy, model="nan_weights.safetensors"))
    assert "model: chunk 1 of 2 came out NaN or infinite" in msg and "weight_dtype" in msg, msg
    assert torch.equal(run(comfy, model="tiny_magi1_24b_layout.safetensors"), before)


def test_a_lone_surrogate_in_the_prompt_is_cleaned_out(comfy):
    broken_paste = run(comfy, text="a red ball \ud83d rolls")
    assert torch.equal(broken_paste, run(comfy, text="a red ball rolls"))
