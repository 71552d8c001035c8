"""What holds for every model family and cache, written once and run over (family x cache).

The families reach the caches through the same keyed wrappers and the same per-chunk cache step
(cache_core/chunk_step.py), so the same equivalences and the same report vocabulary must hold
for SkyReels-V2-DF and MAGI-1 (base and distilled) alike.
"""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from tools.graphs import magi_graph, streaming_graph

UNET = "tiny_skyreels_df_1.3b_layout.safetensors"
ASYNC = dict(window_frames=21, overlap_frames=9, ar_step=1, causal_block_size=3)
FC = dict(class_type="ARCacheFlowCache", warmup_steps=2, coefficients="none")
MC = dict(class_type="ARCacheMotionCache", warmup_steps=1, phase1_updates=1, vote=0.0, min_update_ratio=0.0,
          coefficients="none")
NO_SKIP = dict(FC, rel_l1_thresh=0.0, skip_redundant_steps=False)      # the chunk-wise run alone
EXACT = {"flowcache": dict(FC, rel_l1_thresh=0.0), "motioncache": dict(MC, threshold=0.0)}
LOOSE = {"flowcache": dict(FC, rel_l1_thresh=1.0), "motioncache": dict(MC, threshold=3.0)}
FAMILIES = ["skyreels", "magi_base", "magi_distill"]
# the run's counts (cache_core.chunk_step.COUNT_KEYS) and what the report derives from them
VOCABULARY = {"calls", "segments", "chunk_steps_computed", "chunk_steps_subset", "chunk_steps_skipped",
              "chunk_steps_history", "chunk_steps_frozen", "tokens_active", "tokens_computed", "transformer_flops",
              "transformer_flops_noskip", "transformer_flops_vanilla", "flops_saved_restructure",
              "flops_saved_skipping", "token_fraction_computed", "kv_bytes_peak", "method", "chunk_steps_predicted",
              "tokens_predicted", "cached_outputs_bytes_peak"}


def graph(family: str, cache: dict | None, seed: int = 1, long: bool = False):
    prefix = f"latents/{uuid.uuid4().hex[:8]}"
    if family == "skyreels":
        g, sid = streaming_graph(UNET, length=401 if long else 33, steps=20 if long else 8, cfg=2.0, seed=seed,
                                 schedule=ASYNC, save_prefix=prefix)
        model = next(k for k, v in g.prompt.items() if v["class_type"] == "UNETLoader")
    else:
        g, sid = magi_graph(variant=family.split("_")[1], seed=seed, length=24 * 40 if long else 72,
                            steps=16 if long else 8, save_prefix=prefix)
        model = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheMagiModelLoader")
    if cache:
        cache = dict(cache)
        g.prompt["cache"] = {"class_type": cache.pop("class_type"), "inputs": {"model": [model, 0], **cache}}
        g.prompt[sid]["inputs"]["model"] = ["cache", 0]
    return g, sid


def run(comfy, family, cache=None, seed=1):
    g, sid = graph(family, cache, seed)
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


@pytest.mark.parametrize("method", ["flowcache", "motioncache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_zero_equals_the_no_skip_run_and_reports_one_vocabulary(comfy, family, method):
    exact, r = run(comfy, family, EXACT[method])
    noskip, rn = run(comfy, family, NO_SKIP)
    assert torch.equal(exact, noskip)
    c = r["cache"]
    assert c["method"] == method and rn["cache"]["method"] == "chunk_causal"
    assert VOCABULARY <= set(c), VOCABULARY - set(c)
    assert c["chunk_steps_skipped"] == 0 and c["chunk_steps_computed"] > 0 and c["token_fraction_computed"] == 1.0
    # counted once, where the work happens: the cache's count is the run's count
    assert c["transformer_flops"] == r["transformer_flops"] == rn["transformer_flops"]
    assert c["flops_saved_skipping"] == 0
    assert c["transformer_flops_vanilla"] == r["transformer_flops_vanilla"]
    # what "nothing skipped" would spend is what the no-skip run really spent
    assert c["transformer_flops_noskip"] == rn["cache"]["transformer_flops_noskip"] == rn["transformer_flops"]
    assert c["flops_saved_restructure"] == c["transformer_flops_vanilla"] - rn["transformer_flops"]


@pytest.mark.parametrize("method", ["flowcache", "motioncache"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_loose_threshold_saves_by_skipping_and_the_savings_add_up(comfy, family, method):
    out, r = run(comfy, family, LOOSE[method], seed=2)
    c = r["cache"]
    assert torch.isfinite(out).all()
    assert c["tokens_computed"] < c["tokens_active"] and c["flops_saved_skipping"] > 0
    assert c["transformer_flops"] == r["transformer_flops"]
    assert c["transformer_flops_vanilla"] - c["flops_saved_restructure"] - c["flops_saved_skipping"] == pytest.approx(
        c["transformer_flops"], rel=1e-12)
    assert c["chunk_steps_subset"] <= c["chunk_steps_computed"]
    if method == "flowcache":              # whole chunks: every computed chunk step ran all its tokens
        assert c["chunk_steps_subset"] == 0


@pytest.mark.parametrize("method", ["flowcache", "motioncache"])
@pytest.mark.parametrize("family", ["skyreels", "magi_distill"])
def test_an_interrupted_cached_run_leaves_the_next_run_clean(comfy, family, method):
    before, _ = run(comfy, family, LOOSE[method], seed=9)
    g, _ = graph(family, LOOSE[method], seed=9, long=True)
    assert "interrupt" in comfy.run_interrupted(g.prompt)
    after, _ = run(comfy, family, LOOSE[method], seed=9)
    assert torch.equal(before, after)
    plain, _ = run(comfy, family, None, seed=9)
    plain_again, _ = run(comfy, family, None, seed=9)
    assert torch.equal(plain, plain_again)


# --- predicted skips (cache_core/predict.py) ---------------------------------------------------

PREDICT = LOOSE


@pytest.mark.parametrize("method", ["flowcache", "motioncache"])
@pytest.mark.parametrize("family", ["skyreels", "magi_base"])     # MAGI-1 base: three guidance branches
def test_predicted_skips_extrapolate_and_equal_thresholds_predict_nothing(comfy, family, method):
    """predict_order 1 extrapolates skipped steps (counted, with the extra history accounted);
    reuse_thresh at the recompute threshold reuses every skip: bit-identical to order 0 (MC has
    voting and min_update_ratio off here; with them, tokens left out at the threshold are predicted)."""
    knob = "rel_l1_thresh" if method == "flowcache" else "threshold"
    reused, r0 = run(comfy, family, PREDICT[method], seed=3)
    predicted, r1 = run(comfy, family, dict(PREDICT[method], predict_order=1), seed=3)
    same, r2 = run(comfy, family, dict(PREDICT[method], predict_order=2, reuse_thresh=PREDICT[method][knob]), seed=3)
    c0, c1 = r0["cache"], r1["cache"]
    assert c0["chunk_steps_skipped"] > 0 and c0["chunk_steps_predicted"] == 0 == c0["tokens_predicted"]
    assert c1["chunk_steps_predicted"] > 0 and c1["tokens_predicted"] > 0
    assert torch.isfinite(predicted).all() and not torch.equal(predicted, reused)
    assert c1["cached_outputs_bytes_peak"] > c0["cached_outputs_bytes_peak"] > 0   # two points kept, not one
    assert torch.equal(same, reused) and r2["cache"]["chunk_steps_predicted"] == 0
    if family == "skyreels" and method == "flowcache":     # the indicator is the schedule's: same decisions
        assert (c1["chunk_steps_skipped"], c1["transformer_flops"]) == (c0["chunk_steps_skipped"], c0["transformer_flops"])


@pytest.mark.parametrize("method", ["flowcache", "motioncache"])
def test_prediction_settings_out_of_order_are_named(comfy, method):
    from tools.comfy_server import ComfyError
    knob = "rel_l1_thresh" if method == "flowcache" else "threshold"
    with pytest.raises(ComfyError) as e:
        run(comfy, "skyreels", dict(PREDICT[method], predict_order=1, reuse_thresh=PREDICT[method][knob] + 0.5))
    assert "reuse_thresh" in str(e.value) and knob in str(e.value)
