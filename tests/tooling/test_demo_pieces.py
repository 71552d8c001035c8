"""make demo's scripted pieces: its prompts (built from the shipped workflows) run in a real
ComfyUI, each round re-runs in full under its own model name with identical output, the video
plays at fps / 4 (one image per latent frame), and the side-by-side and contact sheet come out
with the right frames."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import demo

TINY = "tiny_skyreels_df_1.3b_layout.safetensors"


@pytest.fixture(scope="module")
def round_models(comfy, tiny_models, tmp_path_factory):
    names = {}
    for r in (1, 2):
        copy = tmp_path_factory.mktemp(f"round{r}") / f"demo_tiny_round{r}.safetensors"
        shutil.copy2(tiny_models["1.3b"], copy)
        names[r] = comfy.add_model(copy, "diffusion_models")
    yield names
    for name in names.values():      # same weights as the tiny 1.3B: other tests look models up by content
        (comfy.base_dir / "models" / "diffusion_models" / name).unlink()


def _run(comfy, kind, round_, names, toy=True):
    info = comfy.object_info()
    wf = demo.UNCACHED if kind == "uncached" else demo.CACHED
    prompt = demo.demo_prompt(wf, info, names[round_], "tiny_wan21_vae.safetensors", toy, round_, windows=2, steps=3)
    for node in prompt.values():                       # the tiny model runs at 64x64
        if node["class_type"] == "ARCacheStreamingSampler":
            node["inputs"].update(width=64, height=64)
    entry = comfy.run(prompt)
    report = next(json.loads(v["text"][0]) for v in entry["outputs"].values() if "text" in v)
    return prompt, entry, report, comfy.saved_latent(entry, "latent_out")


def test_prompts_keep_one_video_at_a_quarter_of_the_fps_and_the_cache_preset(comfy, round_models):
    prompt, entry, report, _ = _run(comfy, "cached", 1, round_models)
    kinds = [n["class_type"] for n in prompt.values()]
    assert kinds.count("SaveVideo") == 1 and "ARCacheComputeHeatmap" not in kinds and "VAEDecode" not in kinds
    assert "ARCacheLatentPreview" in kinds
    create = next(n for n in prompt.values() if n["class_type"] == "CreateVideo")
    assert create["inputs"]["fps"] == demo.FPS / 4
    cache = next(n for n in prompt.values() if n["class_type"] == demo.CACHE_NODE)
    assert cache["inputs"]["preset"] == demo.CACHE_SETTINGS["preset"]
    assert cache["inputs"]["predict_order"] == demo.CACHE_SETTINGS["predict_order"] == 1   # the demo predicts
    assert report["cache"]["method"] == "flowcache"
    import av
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveVideo")
    with av.open(str(comfy.output_path(entry["outputs"][save]["images"][0]))) as c:
        stream = c.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(demo.FPS / 4)
        assert sum(1 for _ in c.decode(video=0)) == report["latent_frames"]


def test_rounds_rerun_in_full_and_agree_bit_for_bit(comfy, round_models):
    _, _, r1, a = _run(comfy, "uncached", 1, round_models)
    _, _, r2, b = _run(comfy, "uncached", 2, round_models)
    assert r1["model_calls"] > 0 and r2["model_calls"] == r1["model_calls"]      # not answered from cache
    assert torch.equal(a, b)


def test_side_by_side_and_contact_sheet(tmp_path):
    import av
    from PIL import Image
    frames = torch.rand(7, 3, 32, 40)
    panels = [demo.labelled(frames, "uncached"), demo.labelled(frames.flip(0), "cached")]
    assert panels[0].shape == (7, 32 + 24, 40, 3)
    demo.write_side_by_side(panels, tmp_path / "sbs.mp4", fps=6)
    with av.open(str(tmp_path / "sbs.mp4")) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (88, 56) and float(s.average_rate) == 6.0
        assert sum(1 for _ in c.decode(video=0)) == 7
    demo.write_contact_sheet(panels, tmp_path / "sheet.png", columns=4)
    assert Image.open(tmp_path / "sheet.png").size == (4 * 40, 2 * 56)
