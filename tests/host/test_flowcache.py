"""FlowCache inside a real ComfyUI with the Streaming AR Sampler and with a plain KSampler."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.graphs import Graph, streaming_graph

UNET = "tiny_skyreels_df_1.3b_layout.safetensors"
# 6-latent windows with 3 of history, blocks (= chunks) of 3 frames, asynchronous.
ASYNC = dict(window_frames=21, overlap_frames=9, ar_step=1, causal_block_size=3)
FC = dict(class_type="ARCacheFlowCache", warmup_steps=2, coefficients="none")


def run(comfy, cache=None, seed=1, steps=8, cfg=2.0, length=33, schedule=ASYNC, **extra):
    g, sid = streaming_graph(UNET, length=length, steps=steps, cfg=cfg, seed=seed, schedule=schedule,
                             cache=cache, save_prefix=f"latents/{uuid.uuid4().hex[:8]}", sampler_extra=extra or None)
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    latent = comfy.saved_latent(entry, save)
    return latent, json.loads(entry["outputs"][sid]["text"][0])


def test_loose_threshold_spends_fewer_flops(comfy):
    tight, rt = run(comfy, dict(FC, rel_l1_thresh=0.0))
    loose, rl = run(comfy, dict(FC, rel_l1_thresh=5.0))
    assert rl["cache"]["chunk_steps_skipped"] > 0
    assert rl["transformer_flops"] < rt["transformer_flops"]
    assert rl["cache"]["flops_saved_skipping"] > 0
    c = rl["cache"]
    assert c["transformer_flops_vanilla"] - c["flops_saved_restructure"] - c["flops_saved_skipping"] == pytest.approx(
        rl["transformer_flops"])
    assert not torch.equal(tight, loose) and torch.isfinite(loose).all()
    # every chunk's first warm-up steps and its last step are computed: 3 of 8 at most skipped... per chunk
    assert c["chunk_steps_skipped"] <= (8 - 2 - 1) / 8 * (c["chunk_steps_computed"] + c["chunk_steps_skipped"])


def test_uncached_run_after_cached_run_is_unchanged(comfy):
    before, r0 = run(comfy, None, seed=5)
    run(comfy, dict(FC, rel_l1_thresh=5.0), seed=5)
    after, r1 = run(comfy, None, seed=5, filename_prefix="again")
    assert r0["cache"] is None and r1["cache"] is None
    assert torch.equal(before, after)


def test_cfg_one_and_sync_schedule_work(comfy):
    lat, r = run(comfy, dict(FC, rel_l1_thresh=5.0), cfg=1.0, schedule=dict(ASYNC, ar_step=0))
    assert r["cache"]["chunk_steps_skipped"] > 0 and torch.isfinite(lat).all()


def test_kv_compression_bounds_kv_memory(comfy):
    """Chunks of 1 frame starting 3 rows apart and lasting 4: at most 2 are active at once, so
    with a 1-chunk history budget the live K/V stays far below the 9-frame window's."""
    sch = dict(window_frames=33, overlap_frames=9, ar_step=3, causal_block_size=1)   # 9-latent windows
    _, full = run(comfy, dict(FC, rel_l1_thresh=0.0), length=57, steps=4, schedule=sch)
    lat, comp = run(comfy, dict(FC, rel_l1_thresh=0.0, kv_compress=True, kv_budget_chunks=1), length=57, steps=4,
                    schedule=sch)
    assert torch.isfinite(lat).all()
    assert comp["cache"]["kv_bytes_peak"] < 0.75 * full["cache"]["kv_bytes_peak"]
    assert comp["transformer_flops"] < full["transformer_flops"]     # shorter attention over the history


def test_flowcache_under_a_plain_ksampler(comfy):
    def ksampler(thr, batch=1):
        g = Graph()
        model = g.out(g.add("UNETLoader", unet_name=UNET, weight_dtype="default"))
        if thr is not None:
            model = g.out(g.add("ARCacheFlowCache", model=model, rel_l1_thresh=thr, warmup_steps=1, chunk_frames=1,
                                coefficients="none"))
        cond = g.out(g.add("ARCacheEmptyConditioning", value=0.0))
        lat = g.out(g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=13, batch_size=batch))
        k = g.add("KSampler", model=model, positive=cond, negative=cond, latent_image=lat, seed=3, steps=6, cfg=2.0,
                  sampler_name="euler", scheduler="simple", denoise=1.0)
        g.add("SaveLatent", samples=g.out(k), filename_prefix=f"latents/{uuid.uuid4().hex[:8]}")
        e = comfy.run(g.prompt)
        save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
        return comfy.saved_latent(e, save)
    plain, zero, loose = ksampler(None), ksampler(0.0), ksampler(5.0)
    assert plain.shape == zero.shape == loose.shape == (1, 16, 4, 8, 8)
    assert torch.isfinite(zero).all() and torch.isfinite(loose).all()
    assert not torch.equal(plain, zero)      # chunk-causal attention differs from bidirectional
    assert not torch.equal(zero, loose)      # and the loose threshold skipped something
    pair = ksampler(5.0, batch=2)            # batch 2, cond and uncond batched: 4 rows per call
    assert pair.shape == (2, 16, 4, 8, 8) and torch.isfinite(pair).all()
    torch.testing.assert_close(pair[:1], loose, rtol=1e-4, atol=1e-4)   # rows do not leak into each other


def test_bad_inputs_are_refused_clearly(comfy, tiny_models):
    with pytest.raises(ComfyError, match="rel_l1_thresh"):
        run(comfy, dict(FC, rel_l1_thresh=-0.1))
    g, _ = streaming_graph(UNET, length=17, steps=2, schedule=ASYNC, cache=dict(FC, rel_l1_thresh=0.1))
    first = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheFlowCache")
    second = g.add("ARCacheFlowCache", model=g.out(first), rel_l1_thresh=0.1, warmup_steps=2)
    sampler = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheStreamingSampler")
    g.prompt[sampler]["inputs"]["model"] = g.out(second)
    with pytest.raises(ComfyError, match="already applied"):
        comfy.run(g.prompt)
