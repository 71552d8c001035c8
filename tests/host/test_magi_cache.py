"""FlowCache and MotionCache on MAGI-1 inside a real ComfyUI, on the tiny MAGI-1 checkpoint."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.graphs import magi_graph
from tools.media import write_test_video

FC = dict(class_type="ARCacheFlowCache", warmup_steps=2, coefficients="none")
MC = dict(class_type="ARCacheMotionCache", warmup_steps=1, phase1_updates=1, vote=0.0, min_update_ratio=0.0,
          coefficients="none")


def run(comfy, cache=None, **kw):
    kw.setdefault("save_prefix", f"latents/{uuid.uuid4().hex[:8]}")
    g, sid = magi_graph(**kw)
    if cache:
        cache = dict(cache)
        loader = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiModelLoader")
        g.prompt["cache"] = {"class_type": cache.pop("class_type"), "inputs": {"model": [loader, 0], **cache}}
        g.prompt[sid]["inputs"]["model"] = ["cache", 0]
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


@pytest.mark.parametrize("variant", ["distill", "base"])
def test_loose_threshold_spends_fewer_flops(comfy, variant):
    kw = dict(variant=variant, seed=2, length=72, steps=16)
    tight, rt = run(comfy, dict(FC, rel_l1_thresh=0.0), **kw)
    loose, rl = run(comfy, dict(FC, rel_l1_thresh=1.0), **kw)
    assert rl["transformer_flops"] < rt["transformer_flops"]
    assert rl["cache"]["chunk_steps_skipped"] > 0 and torch.isfinite(loose).all() and not torch.equal(tight, loose)
    if variant == "base":     # every guidance pass keeps its own K/V cache
        chunks = rl["cache"]["kv_cache_chunks"]
        assert chunks["text"] and chunks["history"] and chunks["alone"]


def test_motioncache_runs_token_subsets(comfy):
    kw = dict(variant="distill", seed=3, length=72, steps=16)
    out, r = run(comfy, dict(MC, threshold=0.05), **kw)
    c = r["cache"]
    assert c["chunk_steps_subset"] > 0 and 0 < c["token_fraction_computed"] < 1
    assert torch.isfinite(out).all()


def test_kv_cache_stays_within_its_bound(comfy):
    _, r = run(comfy, dict(FC, rel_l1_thresh=0.3), variant="distill", seed=4, length=6 * 24, steps=8)
    # save-every-forward: window 4 and key ranges of at most 5 chunks reach 7 chunks behind the newest write
    chunks = r["cache"]["kv_cache_chunks"]["text"]
    assert chunks == list(range(chunks[0], 6)) and len(chunks) <= 8


def test_cached_v2v_keeps_the_prefix(comfy):
    path = write_test_video(comfy.base_dir / "input" / "magi_cache_prefix.mp4")
    plain, _ = run(comfy, None, variant="distill", seed=6, prefix_video=path.name)
    cached, r = run(comfy, dict(FC, rel_l1_thresh=0.3), variant="distill", seed=6, prefix_video=path.name)
    assert torch.equal(cached[:, :, :6], plain[:, :, :6]) and cached.shape == plain.shape
    assert r["cache"] is not None


def test_heatmap_counts_reach_the_latent(comfy):
    g, sid = magi_graph(variant="distill", seed=7, length=72, steps=16, vae="tiny_magi1_vae.safetensors")
    loader = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiModelLoader")
    g.prompt["cache"] = {"class_type": "ARCacheMotionCache", "inputs": {"model": [loader, 0], "threshold": 0.05,
                                                                        "warmup_steps": 1, "phase1_updates": 1,
                                                                        "vote": 0.0, "min_update_ratio": 0.0}}
    g.prompt[sid]["inputs"]["model"] = ["cache", 0]
    vae = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiVAELoader")
    g.prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [sid, 0], "vae": [vae, 0]}}
    g.prompt["heat"] = {"class_type": "ARCacheComputeHeatmap", "inputs": {"samples": [sid, 0], "images": ["decode", 0],
                                                                          "opacity": 0.6}}
    g.prompt["save_heat"] = {"class_type": "SaveImage", "inputs": {"images": ["heat", 0], "filename_prefix": "magi_heat"}}
    entry = comfy.run(g.prompt)
    assert entry["outputs"]["save_heat"]["images"]


def test_compressed_store_keeps_exactly_the_budget(comfy):
    kw = dict(variant="distill", seed=8, length=6 * 24, steps=8, schedule={"kv_range": "all"})
    full, rf = run(comfy, dict(FC, rel_l1_thresh=0.0), **kw)
    small, rs = run(comfy, dict(FC, rel_l1_thresh=0.0, kv_compress=True, kv_budget_chunks=1), **kw)
    two, r2 = run(comfy, dict(FC, rel_l1_thresh=0.0, kv_compress=True, kv_budget_chunks=2), **kw)
    tokens = 6 * 4 * 4                                      # a tiny chunk: 6 frames of 4 x 4 tokens
    assert rs["cache"]["kv_budget_tokens"] == tokens and rs["cache"]["kv_history_tokens"] == tokens
    assert r2["cache"]["kv_history_tokens"] == 2 * tokens
    # history budget + the window's 4 active chunks bound the store, per guidance pass
    per_chunk = rf["cache"]["kv_bytes_peak"] / 6
    assert rs["cache"]["kv_bytes_peak"] <= (1 + 4 + 1) * per_chunk + 1
    assert rs["cache"]["kv_bytes_peak"] < rf["cache"]["kv_bytes_peak"]
    assert rs["transformer_flops"] < rf["transformer_flops"]          # shorter attention over the history
    assert torch.isfinite(small).all() and not torch.equal(small, full) and not torch.equal(small, two)
    with pytest.raises(ComfyError) as e:
        run(comfy, dict(FC, rel_l1_thresh=0.0, kv_compress=True), variant="distill", seed=8)
    assert "kv_range to all" in str(e.value)


def test_settings_that_cannot_apply_are_refused(comfy):
    with pytest.raises(ComfyError) as e:
        run(comfy, dict(FC, rel_l1_thresh=0.1, attention="bidirectional"))
    assert "chunk-causally" in str(e.value)
    with pytest.raises(ComfyError) as e:
        run(comfy, dict(FC, rel_l1_thresh=0.1, coefficients="1.3B"))
    assert "MAGI-1 takes auto or none" in str(e.value)


@pytest.mark.parametrize("node", ["EasyCache", "LazyCache"])
def test_core_step_caches_are_refused_by_name(comfy, node):
    """Core's step caches hook ComfyUI's sampler and model call, which MAGI-1's chunk-wise run never
    makes: refused by name (they used to do nothing, silently), alone or under the pack's cache."""
    with pytest.raises(ComfyError, match=f"{node.lower()}.*use the pack's FlowCache or MotionCache"):
        run(comfy, dict(class_type=node, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False))
    g, sid = magi_graph(variant="distill", seed=1, length=48, steps=8, save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    loader = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiModelLoader")
    g.prompt["core"] = {"class_type": node, "inputs": {"model": [loader, 0], "reuse_threshold": 0.2,
                                                       "start_percent": 0.15, "end_percent": 0.95, "verbose": False}}
    fc = {k: v for k, v in FC.items() if k != "class_type"}
    g.prompt["cache"] = {"class_type": "ARCacheFlowCache", "inputs": {"model": ["core", 0], "rel_l1_thresh": 0.1, **fc}}
    g.prompt[sid]["inputs"]["model"] = ["cache", 0]
    with pytest.raises(ComfyError, match=node.lower()):
        comfy.run(g.prompt)
