"""MotionCache (and both caches' attention modes) inside a real ComfyUI on tiny models."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.graphs import streaming_graph

UNET = "tiny_skyreels_df_1.3b_layout.safetensors"
ASYNC = dict(window_frames=21, overlap_frames=9, ar_step=1, causal_block_size=3)
MC = dict(class_type="ARCacheMotionCache", warmup_steps=1, phase1_updates=1, coefficients="none", vote=0.0,
          min_update_ratio=0.0)
FC = dict(class_type="ARCacheFlowCache", warmup_steps=2, coefficients="none")


def run(comfy, cache=None, seed=1, steps=10, cfg=2.0, length=33, **extra):
    g, sid = streaming_graph(UNET, length=length, steps=steps, cfg=cfg, seed=seed, schedule=ASYNC, cache=cache,
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}", sampler_extra=extra or None)
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


@pytest.mark.parametrize("attention", ["bidirectional"])       # chunk_causal: test_caches_every_family
def test_threshold_zero_equals_the_no_skip_run(comfy, attention):
    mc, rm = run(comfy, dict(MC, threshold=0.0, attention=attention))
    restructured, _ = run(comfy, dict(FC, rel_l1_thresh=0.0, skip_redundant_steps=False, attention=attention))
    assert rm["cache"]["method"] == "motioncache" and rm["cache"]["chunk_steps_skipped"] == 0
    assert rm["cache"]["token_fraction_computed"] == 1.0
    assert torch.equal(mc, restructured)


@pytest.mark.parametrize("cache", [dict(MC, threshold=0.0), dict(FC, rel_l1_thresh=0.0)], ids=["motioncache", "flowcache"])
def test_bidirectional_with_nothing_skipped_equals_the_uncached_sampler(comfy, cache):
    uncached, r0 = run(comfy, None, seed=2)
    cached, r1 = run(comfy, dict(cache, attention="bidirectional"), seed=2)
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    assert r1["cache"]["flops_saved_restructure"] == pytest.approx(0.0, abs=1e-6 * r1["transformer_flops"])


@pytest.mark.parametrize("attention", ["chunk_causal", "bidirectional"])
def test_loose_threshold_spends_fewer_flops_token_wise(comfy, attention):
    tight, rt = run(comfy, dict(MC, threshold=0.0, attention=attention), seed=3)
    loose, rl = run(comfy, dict(MC, threshold=3.0, attention=attention), seed=3)
    assert rl["transformer_flops"] < rt["transformer_flops"]
    assert 0 < rl["cache"]["token_fraction_computed"] < 1
    assert torch.isfinite(loose).all() and not torch.equal(tight, loose)


def test_cfg_one_short_video_and_latent_motion_work(comfy):
    lat, report = run(comfy, dict(MC, threshold=0.3, motion_source="latents"), cfg=1.0, length=17)
    assert torch.isfinite(lat).all() and report["cache"]["method"] == "motioncache"


def test_bad_inputs_are_refused_clearly(comfy):
    with pytest.raises(ComfyError, match="MotionCache, threshold: is nan"):
        run(comfy, dict(MC, threshold=float("nan")))
    with pytest.raises(ComfyError, match="FlowCache, kv_compress: .*chunk_causal"):
        run(comfy, dict(FC, rel_l1_thresh=0.1, kv_compress=True, attention="bidirectional"))
    g, _ = streaming_graph(UNET, length=17, steps=2, schedule=ASYNC, cache=dict(FC, rel_l1_thresh=0.1))
    first = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheFlowCache")
    second = g.add("ARCacheMotionCache", model=g.out(first), threshold=0.1, warmup_steps=2)
    sampler = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheStreamingSampler")
    g.prompt[sampler]["inputs"]["model"] = g.out(second)
    with pytest.raises(ComfyError, match="already applied"):
        comfy.run(g.prompt)


@pytest.mark.parametrize("cache", [dict(MC, threshold=3.0), dict(FC, rel_l1_thresh=0.3)], ids=["motioncache", "flowcache"])
def test_heatmap_renders_and_sums_to_the_reports_counts(comfy, cache):
    g, sid = streaming_graph(UNET, length=33, steps=10, cfg=2.0, seed=5, schedule=ASYNC, cache=cache,
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    heat = g.add("ARCacheComputeHeatmap", samples=g.out(sid), node_id="heat")
    g.add("SaveImage", images=g.out(heat), filename_prefix="ARCache/heat", node_id="img")
    entry = comfy.run(g.prompt)
    report = json.loads(entry["outputs"][sid]["text"][0])
    summary = json.loads(entry["outputs"]["heat"]["text"][0])
    assert summary["token_steps_computed"] == report["cache"]["tokens_computed"]
    assert summary["latent_frames"] == report["latent_frames"] == 9
    images = entry["outputs"]["img"]["images"]
    assert len(images) == 33                      # one per pixel frame (4 per latent frame after the first)
    from PIL import Image
    frames = [Image.open(comfy.output_path(i)) for i in images]
    assert frames[-1].size == (64, 64)
    per_frame = [len(im.getcolors(maxcolors=1 << 16)) for im in frames]
    if cache["class_type"] == "ARCacheFlowCache":
        assert set(per_frame) == {1}              # whole chunks are recomputed or reused
    else:
        assert max(per_frame) > 1                 # single tokens: some recomputed more than others


def test_heatmap_without_a_cache_is_refused(comfy):
    g, sid = streaming_graph(UNET, length=17, steps=2, schedule=ASYNC, save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    g.add("ARCacheComputeHeatmap", samples=g.out(sid))
    with pytest.raises(ComfyError, match="Compute Heatmap, samples: carries no compute heatmap"):
        comfy.run(g.prompt)


def test_heatmap_over_latent_preview_frames(comfy):
    g, sid = streaming_graph(UNET, length=33, steps=6, cfg=1.0, seed=6, schedule=ASYNC, cache=dict(MC, threshold=3.0),
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    preview = g.add("ARCacheLatentPreview", samples=g.out(sid), family="wan21", upscale=8)
    heat = g.add("ARCacheComputeHeatmap", samples=g.out(sid), images=g.out(preview), opacity=0.5)
    g.add("SaveImage", images=g.out(heat), filename_prefix="ARCache/heat_preview", node_id="img")
    assert len(comfy.run(g.prompt)["outputs"]["img"]["images"]) == 9     # one per latent frame


def _preset_values():
    from tools.inprocess import load_comfy, pack
    load_comfy(cpu=True)
    return pack("model_patches.presets").VALUES


@pytest.mark.parametrize("method,cache,knob,coefficients,scale", [("motioncache", MC, "threshold", "none", "raw"),
                                                                  ("flowcache", FC, "rel_l1_thresh", "1.3B", "fitted")])
def test_preset_sets_threshold_and_attention_from_its_table(comfy, method, cache, knob, coefficients, scale):
    fast_setting = _preset_values()[method][scale]["fast"]
    attention = fast_setting.attention
    other = "bidirectional" if attention == "chunk_causal" else "chunk_causal"     # widgets unlike the preset
    base = dict(cache, coefficients=coefficients, attention=other, **{knob: 0.0})
    exact, _ = run(comfy, base, seed=4)
    fast, _ = run(comfy, dict(base, preset="fast"), seed=4)
    same, _ = run(comfy, dict(base, attention=attention, predict_order=fast_setting.predict_order,
                              reuse_thresh=fast_setting.reuse_thresh, **{knob: fast_setting.threshold}), seed=4)
    assert torch.equal(fast, same)                      # the preset's values replace the widgets'
    assert not torch.equal(fast, exact)                 # ... which were threshold 0, the other mode
    custom, _ = run(comfy, dict(base, preset="custom"), seed=4)
    assert torch.equal(custom, exact)
