"""Sequence parallelism on torch.distributed, two processes on gloo (a file store, one thread each):
the all-to-all primitives round trip uneven token counts; tiny SkyReels-V2-DF, MAGI-1 and causal Wan
videos made with their tokens split across two ranks equal the one-process videos (uncached, FlowCache
with compression, MotionCache), with the same decisions, heat and counts and half the K/V per rank;
bad input and a failing rank stop every rank with a named error."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

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
             settings=dict(FC, rel_l1_thresh=0.1, **COMPRESS), schedule=dict(kv_range=())),
        dict(name="causal/uncached", family="causal", cfg=1.0),     # LongLive's window behind a sink
        dict(name="causal/cfg3/uncached", family="causal", cfg=3.0)]


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
    """SkyReels-V2-DF (chunk-causal and bidirectional), MAGI-1 (its key ranges and 3-pass guidance) and
    causal Wan (a window behind a sink, with and without guidance), uncached, FlowCache (with K/V
    compression) and MotionCache: the 2-rank video is the one-process video
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
    with pytest.raises(pack("cache_core.errors").InputError, match="do not divide the 2 attention heads"):
        seq_parallel.check_world(3, 2, "attention heads of the model", 100)
    with pytest.raises(pack("cache_core.errors").InputError, match="at most 2 ranks"):
        seq_parallel.check_world(3, 3, "attention heads of the model", 2)


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


def test_a_diverged_rank_stops_every_rank_with_a_named_error(tiny_models, tmp_path):
    """Rank 1 with another prompt, another seed or another pack version: caught before any work (the
    gather would otherwise make both ranks agree on a wrong video), and both ranks stop with the named
    error (one spawn: a refused run leaves the ranks able to run the next)."""
    jobs = [dict(name=diverge, family="causal", cfg=1.0, diverge=diverge) for diverge in ("prompt", "seed", "pack")]
    tiny = {k: str(v) for k, v in tiny_models.items()}
    mp.spawn(sp_run.probe_jobs, args=(2, f"file://{tmp_path / 'store'}", jobs, tiny, str(tmp_path / "res")), nprocs=2,
             join=True)
    for rank in range(2):
        results = torch.load(tmp_path / f"res.{rank}", weights_only=False)
        for job in jobs:
            result = results[job["name"]]
            assert isinstance(result, str) and "the ranks were started with different settings or pack versions" \
                in result, (job["name"], result)


# -- the torchrun entry: a workflow through ComfyUI's own executor on every rank -------------------------

def _workflow(tiny_models, tmp_path, name: str, world: int, length: int = 4 * 13 + 1, timeout_s: float = 60.0):
    """The entry's arguments for a tiny SkyReels-V2-DF workflow with FlowCache (API format, as exported)."""
    from tools.graphs import streaming_graph
    unet = tiny_models["14b"]
    graph, _ = streaming_graph(unet.name, length=length, steps=6, cfg=2.0, cache=dict(
        class_type="ARCacheFlowCache", rel_l1_thresh=1.0, warmup_steps=1), schedule=dict(
        window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2, addnoise_condition=20))
    path = tmp_path / "workflow_api.json"
    path.write_text(json.dumps(graph.prompt))
    out = tmp_path / name
    return sp_run.parse_args(["--workflow", str(path), "--output-directory", str(out), "--timeout-s", str(timeout_s),
                              "--model-dir", f"diffusion_models={unet.parent}", "--progress", str(out) + ".progress"])


def _saved(out) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(next(out.glob("latents/*.latent")))["latent_tensor"]


def test_the_torchrun_entry_runs_a_workflow_over_two_ranks(tiny_models, tmp_path):
    """tools/sp_run.py on an exported workflow: 2 ranks save the 1-rank latents, and the sampler's report
    beside them says the tokens were split (the combined part) and FlowCache skipped the same steps."""
    one, two = _workflow(tiny_models, tmp_path, "one", 1), _workflow(tiny_models, tmp_path, "two", 2)
    mp.spawn(sp_run.spawned_rank, args=(1, f"file://{tmp_path / 'store1'}", one), nprocs=1, join=True)
    mp.spawn(sp_run.spawned_rank, args=(2, f"file://{tmp_path / 'store2'}", two), nprocs=2, join=True)
    torch.testing.assert_close(_saved(tmp_path / "two"), _saved(tmp_path / "one"), rtol=1e-5, atol=1e-5)
    r1 = json.loads(next((tmp_path / "one").glob("arcache_report_*.json")).read_text())
    r2 = json.loads(next((tmp_path / "two").glob("arcache_report_*.json")).read_text())
    assert "sequence_parallel" not in r1 and r2["sequence_parallel"]["world"] == 2
    assert r2["cache"]["chunk_steps_skipped"] == r1["cache"]["chunk_steps_skipped"] > 0
    assert r2["sequence_parallel"]["kv_bytes_peak"]["this_rank"] * 2 == r1["cache"]["kv_bytes_peak"]


def _start(args, tmp_path, world=2):
    ctx = mp.start_processes(sp_run.spawned_rank, args=(world, f"file://{tmp_path / 'store'}", args), nprocs=world,
                             join=False, start_method="spawn")
    progress = Path(args.progress)
    t0 = time.monotonic()
    while not (progress.exists() and progress.read_text().count("\n") >= 2):     # the sampler is running
        assert time.monotonic() - t0 < 120, "the sampler never started"
        time.sleep(0.05)
    return ctx


def test_a_killed_rank_stops_the_others_within_the_timeout(tiny_models, tmp_path):
    """Rank 1 is killed mid-run: rank 0, waiting in a collective, stops with an error that says a rank
    stopped, well within the timeout, and writes no output."""
    args = _workflow(tiny_models, tmp_path, "out", 2, length=4 * 200 + 1, timeout_s=30.0)
    ctx = _start(args, tmp_path)
    os.kill(ctx.processes[1].pid, signal.SIGKILL)
    t_kill = time.monotonic()
    ctx.processes[0].join(timeout=60)
    assert not ctx.processes[0].is_alive(), "rank 0 hangs"
    assert time.monotonic() - t_kill < 35 and ctx.processes[0].exitcode == 1
    text = (tmp_path / "out" / "rank0.err").read_text()
    assert "sequence parallel: rank 0 of 2 stopped" in text and "another rank stopped" in text, text
    assert not list((tmp_path / "out").glob("latents/*"))


def test_an_interrupt_on_one_rank_stops_every_rank(tiny_models, tmp_path):
    """Ctrl-C reaching one rank only (ComfyUI's Cancel there): every rank stops at the same model call as
    interrupted (exit 130), none is left waiting, nothing is written."""
    args = _workflow(tiny_models, tmp_path, "out", 2, length=4 * 200 + 1, timeout_s=30.0)
    ctx = _start(args, tmp_path)
    os.kill(ctx.processes[1].pid, signal.SIGINT)
    for p in ctx.processes:
        p.join(timeout=30)
        assert not p.is_alive(), "a rank hangs"
    assert [p.exitcode for p in ctx.processes] == [130, 130]
    for rank in range(2):
        assert (tmp_path / "out" / f"rank{rank}.err").read_text().startswith("interrupted")
    assert not list((tmp_path / "out").glob("latents/*"))
