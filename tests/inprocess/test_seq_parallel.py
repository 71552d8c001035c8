"""Sequence parallelism on torch.distributed, two processes on gloo (a file store, one thread each):
the all-to-all primitives round trip uneven token counts; tiny SkyReels-V2-DF, MAGI-1 and causal Wan
videos made with their tokens split across two ranks equal the one-process videos (uncached, FlowCache
with compression, MotionCache), with the same decisions, heat and counts and half the K/V per rank;
bad input and a failing rank stop every rank with a named error."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.multiprocessing as mp

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)

sp_run = __import__("tools.sp_run", fromlist=["run_rank"])
seq_parallel = pack("cache_core.seq_parallel")


def test_primitives_round_trip_uneven_token_counts(tmp_path):
    mp.spawn(sp_run.probe_primitives, args=(2, f"file://{tmp_path / 'store'}", str(tmp_path / 'res')), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"res.{rank}")
        assert results and all(results.values()), (rank, results)


def _args(model: str, out: str, **kw):
    base = dict(model=model, width=64, height=64, length=4 * 11 + 1, seed=5, cfg=1.0, chunk_frames=3,
                attention_frames=6, sink_frames=3, cond=None, cond_value=0.3, out=out, timeout_s=60.0, progress=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_two_ranks_make_the_one_process_video(tiny_models, tmp_path, cfg):
    """The tiny Self-Forcing-layout checkpoint (2 heads) over 2 ranks, LongLive's window + sink, with
    and without guidance: the video equals the one-process run (the same arithmetic per token, attention
    over the same keys), the report's counts agree, and each rank holds half the K/V."""
    model = str(tiny_models["self_forcing"])
    one, report1 = sp_run.generate(_args(model, "", cfg=cfg), world=1)
    out = str(tmp_path / "video.safetensors")
    mp.spawn(sp_run.run_rank, args=(2, f"file://{tmp_path / 'store'}", _args(model, out, cfg=cfg)), nprocs=2, join=True)
    from safetensors.torch import load_file
    two = load_file(out)["samples"]
    report2 = json.loads((tmp_path / "video.json").read_text())
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)
    assert report2["model_calls"] == report1["model_calls"]
    spr = report2["sequence_parallel"]
    assert spr["world"] == 2 and spr["comm_bytes_sent"]["sum"] > 0
    assert spr["kv_bytes_peak"]["this_rank"] * 2 == report1["kv_bytes_peak"] == spr["kv_bytes_peak"]["sum"]


FC = dict(rel_l1_thresh=1.0, warmup_steps=1, coefficients="none")          # skips on the tiny random models
MC = dict(threshold=0.8, warmup_steps=1, phase1_updates=1, vote=0.0, min_update_ratio=0.0, coefficients="none")
COMPRESS = dict(kv_compress=True, kv_budget_chunks=1, max_score_queries=32)
JOBS = [dict(name="df/uncached", family="df"),
        dict(name="df/flowcache+compress", family="df", cache="flowcache", settings=dict(FC, **COMPRESS)),
        dict(name="df/motioncache", family="df", cache="motioncache", settings=MC),
        dict(name="df/flowcache/bidirectional", family="df", cache="flowcache", settings=FC, attention="bidirectional"),
        dict(name="magi/uncached", family="magi"),
        dict(name="magi/flowcache", family="magi", cache="flowcache", settings=dict(FC, rel_l1_thresh=0.1)),
        dict(name="magi/motioncache", family="magi", cache="motioncache", settings=dict(MC, threshold=0.1)),
        dict(name="magi/flowcache+compress", family="magi", cache="flowcache",
             settings=dict(FC, rel_l1_thresh=0.1, **COMPRESS), schedule=dict(kv_range=()))]


def _integers(report: dict) -> dict:
    cache = report.get("cache") or {}
    return {"model_calls": report["model_calls"], "latent_frames": report["latent_frames"],
            **{k: v for k, v in cache.items() if isinstance(v, int) and "bytes" not in k}}


@pytest.fixture(scope="module")
def two_rank_jobs(tiny_models, tmp_path_factory):
    """Every job of JOBS on 2 ranks (one spawn), and on one process here."""
    tmp = tmp_path_factory.mktemp("sp_jobs")
    tiny = {k: str(v) for k, v in tiny_models.items()}
    mp.spawn(sp_run.probe_jobs, args=(2, f"file://{tmp / 'store'}", JOBS, tiny, str(tmp / "res")), nprocs=2, join=True)
    ranks = [torch.load(tmp / f"res.{r}", weights_only=False) for r in range(2)]
    return {job["name"]: (sp_run.video_job(job, tiny), ranks[0][job["name"]], ranks[1][job["name"]]) for job in JOBS}


@pytest.mark.parametrize("name", [job["name"] for job in JOBS])
def test_every_family_and_cache_over_two_ranks_equals_one_process(two_rank_jobs, name):
    """SkyReels-V2-DF (chunk-causal and bidirectional) and MAGI-1 (its key ranges and 3-pass guidance),
    uncached, FlowCache (with K/V compression) and MotionCache: the 2-rank video is the one-process video
    within 1e-5, both ranks hold the same bits, the cache made the same decisions (its counts and heat
    equal), and each rank held half the K/V bytes."""
    (one, one_report, one_heat), zero, first = two_rank_jobs[name]
    assert not isinstance(zero, str), zero
    video, report, heat = zero
    torch.testing.assert_close(video, one, rtol=1e-5, atol=1e-5 * float(one.abs().max()))
    assert torch.equal(video, first[0])
    if one_report.get("cache"):
        assert _integers(report) == _integers(one_report)
    else:                           # uncached DF under SP runs through the executor: its counts say all computed
        assert _integers(report)["model_calls"] == one_report["model_calls"]
        assert report["latent_frames"] == one_report["latent_frames"]
    if one_heat is not None:
        assert torch.equal(heat, one_heat)
    if not name.endswith("uncached"):
        assert report["cache"]["chunk_steps_skipped"] + report["cache"]["chunk_steps_subset"] > 0, "nothing skipped"
    spr = report["sequence_parallel"]
    assert spr["world"] == 2 and spr["comm_bytes_sent"]["this_rank"] > 0
    one_kv = one_report.get("kv_bytes_peak") or (one_report.get("cache") or {}).get("kv_bytes_peak")
    if one_kv:                      # the uncached DF model in one process attends without a store
        assert spr["kv_bytes_peak"]["this_rank"] * 2 == one_kv == spr["kv_bytes_peak"]["sum"]


def test_world_sizes_that_do_not_divide_the_heads_are_refused():
    sp = seq_parallel.SeqParallel()
    sp.world = 3                                         # a stand-in: only the check is asked
    with pytest.raises(pack("cache_core.errors").InputError, match="do not divide the 2 attention heads"):
        sp.check(2, 100)
    with pytest.raises(pack("cache_core.errors").InputError, match="at most 2 ranks"):
        sp.check(3, 2)


@pytest.mark.parametrize("diverge,message", [
    ("prompt", "sequence parallel: the ranks were started with different settings or pack versions"),
    ("settings", "sequence parallel: the ranks were started with different settings or pack versions")])
def test_a_diverged_rank_stops_every_rank_with_a_named_error(tiny_models, tmp_path, diverge, message):
    """Rank 1 with another prompt or another seed: caught before any work (the gather would otherwise
    make both ranks agree on a wrong video), both ranks stop with the named error."""
    out = str(tmp_path / "video.safetensors")
    args = _args(str(tiny_models["self_forcing"]), out, diverge=diverge)
    mp.spawn(sp_run.probe_divergence, args=(2, f"file://{tmp_path / 'store'}", args), nprocs=2, join=True)
    for rank in range(2):
        text = (tmp_path / f"video.safetensors.rank{rank}.err").read_text()
        assert message in text, text


def test_a_killed_rank_stops_the_others_within_the_timeout(tiny_models, tmp_path):
    """Rank 1 is killed after the first chunk: rank 0, waiting in a collective, stops with an error that
    says a rank stopped, well within the timeout, and nothing is written."""
    import os
    import signal
    import time
    out = str(tmp_path / "video.safetensors")
    progress = tmp_path / "progress.txt"
    args = _args(str(tiny_models["self_forcing"]), out, length=4 * 299 + 1, progress=str(progress), timeout_s=30.0)
    ctx = mp.start_processes(sp_run.run_rank, args=(2, f"file://{tmp_path / 'store'}", args), nprocs=2, join=False,
                             start_method="spawn")
    t0 = time.monotonic()
    while not (progress.exists() and progress.read_text()):
        assert time.monotonic() - t0 < 120, "no chunk finished"
        time.sleep(0.05)
    os.kill(ctx.processes[1].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    ctx.processes[0].join(timeout=60)
    assert not ctx.processes[0].is_alive(), "rank 0 hangs"
    assert time.monotonic() - t_kill < 35 and ctx.processes[0].exitcode != 0
    text = (tmp_path / "video.safetensors.rank0.err").read_text()
    assert "sequence parallel: rank 0 of 2 stopped" in text and "another rank stopped" in text, text
    assert not os.path.exists(out)


def _stand_in(world: int):
    """A SeqParallel that says `world` ranks without a process group: only what runs before any
    collective (the checks) can be asked of it."""
    sp = seq_parallel.SeqParallel()
    sp.world = world
    return sp


def test_magi_ranks_must_divide_the_key_value_heads(tiny_models):
    """MAGI-1's grouped-query attention: 4 query heads share 2 KV heads, so 4 ranks are refused by name
    before any work (a rank cannot hold half a KV head)."""
    job = dict(name="magi", family="magi")
    with pytest.raises(pack("cache_core.errors").InputError, match="4 ranks do not divide the 2 key/value heads of "
                                                                   "MAGI-1 .grouped-query attention"):
        sp_run.video_job(job, {k: str(v) for k, v in tiny_models.items()}, _stand_in(4))


def test_core_multigpu_cfg_split_with_sequence_parallel_is_refused(tiny_models):
    """Core's MultiGPU CFG split (its GPU clones as the model's additional models) on top of our ranks:
    a named error before any work."""
    import comfy.sd
    model = comfy.sd.load_diffusion_model(str(tiny_models["14b"]))
    model.set_additional_models("multigpu", [model.clone()])
    model.model_options.setdefault("transformer_options", {})[seq_parallel.SP_KEY] = _stand_in(2)
    req = pack("model_patches.video_run").VideoRequest(
        width=64, height=64, length=17, seed=0, steps=2, cfg=1.0, schedule=pack("cache_core.df_schedule").DFSchedule(),
        positives=[[[torch.zeros(1, 512, 4096), {}]]], negative=[[torch.zeros(1, 512, 4096), {}]])
    with pytest.raises(pack("cache_core.errors").ModelFamilyError, match="remove that node"):
        pack("model_patches.families").new_video_run(model, req)
