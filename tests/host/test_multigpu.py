"""ARCache Multi-GPU inside a real ComfyUI: the Streaming AR Sampler's part of the workflow runs in one
process per rank (tools/sp_run.py through ComfyUI's executor, gloo on CPU here) and comes back."""
from __future__ import annotations

import json
import time
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.graphs import streaming_graph

UNET = "tiny_skyreels_df_1.3b_layout.safetensors"                  # 2 attention heads
ASYNC = dict(window_frames=21, overlap_frames=9, ar_step=1, causal_block_size=3)
FC = dict(class_type="ARCacheFlowCache", warmup_steps=2, coefficients="none", rel_l1_thresh=5.0)


def graph(gpus=None, length=33):
    g, sid = streaming_graph(UNET, length=length, steps=6, cfg=2.0, seed=3, schedule=ASYNC, cache=FC,
                             save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    if gpus is not None:
        model = g.prompt[sid]["inputs"]["model"]
        g.prompt[sid]["inputs"]["model"] = g.out(g.add("ARCacheMultiGPU", model=model, gpus=gpus, timeout_s=60))
    return g, sid


def run(comfy, gpus=None):
    g, sid = graph(gpus)
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


def test_the_multi_gpu_node_runs_the_sampler_on_two_ranks(comfy):
    """The same workflow with ARCache Multi-GPU (2) before the sampler: the LATENT equals the one-process
    run's within 1e-5, FlowCache skipped the same steps, the report says 2 ranks held half the K/V each, and
    no scratch file is left in the output folder."""
    one, r1 = run(comfy)
    two, r2 = run(comfy, gpus=2)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    assert r2["sequence_parallel"]["world"] == 2 and "sequence_parallel" not in r1
    assert r2["cache"]["chunk_steps_skipped"] == r1["cache"]["chunk_steps_skipped"] > 0
    assert r2["sequence_parallel"]["kv_bytes_peak"]["this_rank"] * 2 == r1["cache"]["kv_bytes_peak"]
    out = comfy.base_dir / "output"
    assert not list(out.glob("ARCache/multigpu_*")) and not list(out.glob("arcache_report_*"))
    again, _ = run(comfy)                                  # the next one-process run is clean
    assert torch.equal(again, one)


def test_a_gpu_count_that_does_not_divide_the_heads_is_refused_before_any_work(comfy):
    with pytest.raises(ComfyError, match="gpus: 3 ranks do not divide the 2 attention heads"):
        run(comfy, gpus=3)


def test_cancel_stops_every_rank(comfy):
    """ComfyUI's Cancel during a multi-GPU run: the node stops as interrupted, no rank is left running,
    and the next run works."""
    import psutil
    g, _ = graph(2, length=4 * 150 + 1)
    ended = comfy.run_interrupted(g.prompt, after_s=8.0)
    assert "interrupt" in ended.lower(), ended
    time.sleep(1.0)
    ranks = [p for p in psutil.process_iter(["cmdline"]) if any("sp_run.py" in a for a in (p.info["cmdline"] or []))]
    assert not ranks, "a rank is still running"
    one, _ = run(comfy)
    assert torch.isfinite(one).all()
