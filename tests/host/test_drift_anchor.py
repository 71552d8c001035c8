"""The Drift Anchor and the drift report inside a real ComfyUI, for both families."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.graphs import magi_graph, streaming_graph

UNET, VAE = "tiny_skyreels_df_1.3b_layout.safetensors", "tiny_wan21_vae.safetensors"
# 21-frame windows (6 latent frames) with 5 frames (2 latent) of history
SMALL = dict(window_frames=21, overlap_frames=5, ar_step=0, causal_block_size=1, prefix_mode="latent")
DF_NEW = [6, 4, 4]          # latent frames each window adds (length 53: 14 latent frames)


def df_graph(anchor=None, prompts=None, **kw):
    g, sid = streaming_graph(UNET, length=53, seed=4, steps=3, cfg=1.0, schedule=SMALL,
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}", cond_value=0.3, **kw)
    if anchor is not None:
        g.prompt[sid]["inputs"]["anchor"] = g.out(g.add("ARCacheDriftAnchor", **anchor))
    if prompts:
        conds = {f"prompt_{i + 1}": g.out(g.add("ARCacheEmptyConditioning", value=v)) for i, v in enumerate(prompts)}
        g.prompt[sid]["inputs"]["prompt_schedule"] = g.out(g.add("ARCachePromptSchedule", **conds))
    return g, sid


def magi(anchor=None, **kw):
    g, sid = magi_graph(variant="distill", seed=5, length=72, steps=8, save_prefix=f"latents/{uuid.uuid4().hex[:8]}",
                        **kw)
    if anchor is not None:
        g.prompt[sid]["inputs"]["anchor"] = g.out(g.add("ARCacheDriftAnchor", **anchor))
    return g, sid


def run(comfy, graph):
    g, sid = graph
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


def test_strength_zero_is_bit_identical_and_a_strength_changes_only_what_follows_the_anchor(comfy):
    plain, r = run(comfy, df_graph())
    zero, _ = run(comfy, df_graph(anchor={"strength": 0.0}))
    assert torch.equal(plain, zero)
    held, _ = run(comfy, df_graph(anchor={"strength": 0.8}))
    first = DF_NEW[0]
    assert torch.equal(held[:, :, :first], plain[:, :, :first])         # the first window is the anchor
    assert not torch.allclose(held[:, :, first:], plain[:, :, first:])
    # each later window's per-channel statistics moved towards window 0's
    def stats(x):
        return x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)
    a = stats(plain[:, :, :first])
    last = slice(sum(DF_NEW[:2]), sum(DF_NEW))
    assert (stats(held[:, :, last]) - a).abs().mean() < (stats(plain[:, :, last]) - a).abs().mean()
    assert r["drift"] is None                          # nothing was decoded: no drift numbers


def test_a_prompt_switch_re_anchors_to_its_own_first_window(comfy):
    story, _ = run(comfy, df_graph(prompts=[0.3, -0.4]))
    held, _ = run(comfy, df_graph(prompts=[0.3, -0.4], anchor={"strength": 1.0}))
    switch = DF_NEW[0] + DF_NEW[1]
    assert torch.equal(held[:, :, :switch], story[:, :, :switch])     # window 1 starts prompt 2: its own anchor
    assert not torch.allclose(held[:, :, switch:], story[:, :, switch:])


def test_magi_chunks_after_the_first_are_anchored_and_zero_is_identical(comfy):
    plain, _ = run(comfy, magi())
    assert torch.equal(run(comfy, magi(anchor={"strength": 0.0}))[0], plain)
    held, _ = run(comfy, magi(anchor={"strength": 0.8}))
    assert torch.equal(held[:, :, :6], plain[:, :, :6]) and not torch.allclose(held[:, :, 6:], plain[:, :, 6:])


def test_the_report_measures_drift_from_the_frames_it_decodes(comfy):
    _, r = run(comfy, df_graph(vae=VAE, sampler_extra={"save_video": True, "filename_prefix": "ARCache/drift"}))
    d = r["drift"]
    assert len(d["segments"]) == r["windows"] == 3
    assert set(d["drift"]) >= {"brightness", "saturation", "contrast", "sharpness", "flicker", "histogram_distance"}
    assert d["seam_ratio"] is not None and d["seam_ratio"] > 0
    assert d["segments"][0]["histogram_distance"] == 0


@pytest.fixture(scope="module")
def red_image(comfy):
    """A 96x40 red image in the server's input folder (the video is 64x64)."""
    import numpy as np
    from PIL import Image
    Image.fromarray(np.full((40, 96, 3), (200, 40, 40), np.uint8)).save(comfy.base_dir / "input" / "anchor_red.png")
    return "anchor_red.png"


def test_an_anchor_image_of_another_size_is_encoded_at_the_videos_size(comfy, red_image):
    g, sid = df_graph(vae=VAE)
    anchor = g.add("ARCacheDriftAnchor", strength=1.0, image=g.out(g.add("LoadImage", image="anchor_red.png")))
    g.prompt[sid]["inputs"]["anchor"] = g.out(anchor)
    plain, _ = run(comfy, df_graph(vae=VAE))
    red, _ = run(comfy, (g, sid))
    assert not torch.allclose(red[:, :, :DF_NEW[0]], plain[:, :, :DF_NEW[0]])   # the image anchors window 0 too


def test_bad_anchor_inputs_are_named(comfy, red_image):
    g, sid = df_graph()
    anchor = g.add("ARCacheDriftAnchor", strength=0.5, image=g.out(g.add("LoadImage", image="anchor_red.png")))
    g.prompt[sid]["inputs"]["anchor"] = g.out(anchor)
    with pytest.raises(ComfyError, match="Streaming AR Sampler, anchor: has an image, which the sampler encodes "
                                         "with its vae"):
        comfy.run(g.prompt)
    with pytest.raises(ComfyError, match="Drift Anchor, strength: is nan"):
        comfy.run(df_graph(anchor={"strength": float("nan")})[0].prompt)
