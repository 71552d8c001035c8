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
                attention_frames=6, sink_frames=3, cond=None, cond_value=0.3, out=out, timeout_s=60.0)
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
