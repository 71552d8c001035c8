"""Sequence parallelism on torch.distributed, two processes on gloo (a file store, one thread each):
the all-to-all primitives round trip uneven token counts, and a tiny causal Wan video made with its
tokens split across two ranks equals the one-process video, with half the K/V bytes per rank."""
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
