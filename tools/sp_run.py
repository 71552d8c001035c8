#!/usr/bin/env python3
"""One causal Wan video across several processes (sequence parallel), headless, under torchrun.

    torchrun --nproc_per_node 2 tools/sp_run.py --model self_forcing_dmd.pt --width 832 --height 480 \
        --length 81 --out video.safetensors [--attention-frames 12 --sink-frames 3] [--cfg 1]

Every rank loads ComfyUI in-process (tools/inprocess.py) and the checkpoint through the pack's
Causal Wan Loader, runs the Streaming AR Sampler's causal run with its tokens split across the ranks
(cache_core/seq_parallel.py: Ulysses all-to-all, head-sharded K/V), and rank 0 writes the LATENT
(safetensors, key "samples") and the report (JSON beside it). The text conditioning is a constant
(`--cond-value`; a real prompt needs the 5.7B text encoder, whose states can be passed as a
safetensors file with `--cond`). NCCL on GPUs, gloo on CPU. This first entry serves the causal family;
the others and ComfyUI's own executor are the multi-GPU issue's remaining work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a checkpoint file (any path), loaded like Causal Wan Loader")
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--length", type=int, default=81)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--chunk-frames", type=int, default=3)
    ap.add_argument("--attention-frames", type=int, default=0)
    ap.add_argument("--sink-frames", type=int, default=0)
    ap.add_argument("--cond", default=None, help="safetensors with key 'cond' [1, L, 4096] (umt5 states)")
    ap.add_argument("--cond-value", type=float, default=0.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout-s", type=float, default=120.0, help="a collective waiting longer fails every rank")
    ap.add_argument("--progress", default=None, help="a file rank 0 appends 'chunk k/n' to as chunks finish")
    return ap.parse_args(argv)


def run_rank(rank: int, world: int, init: str, args) -> None:
    """One rank's run. `init`: a torch.distributed init_method (file:// in tests, env:// under torchrun)."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1) if not torch.cuda.is_available() else None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=args.timeout_s))
    try:
        video, report = generate(args, world, rank)
        if rank == 0:
            from safetensors.torch import save_file
            save_file({"samples": video.contiguous()}, args.out)
            Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))
        dist.barrier()           # leave together: a rank tearing gloo down while a peer still talks aborts
    except BaseException as e:            # each rank says why it stopped, beside the output
        Path(f"{args.out}.rank{rank}.err").write_text(f"{type(e).__name__}: {e}")
        raise
    finally:
        dist.destroy_process_group()


def generate(args, world: int, rank: int = 0, cond_offset: float = 0.0):
    import torch
    import torch.distributed as dist
    from tools.inprocess import load_comfy, pack
    load_comfy()
    import comfy.sd
    import comfy.utils
    cs = pack("cache_core.causal_schedule")
    seq_parallel = pack("cache_core.seq_parallel")
    video_run = pack("model_patches.video_run")
    families = pack("model_patches.families")
    loader = pack("model_patches.causal_loader")
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", str(Path(args.model).resolve().parent))
    model = loader.load_causal_wan(Path(args.model).name)
    if world > 1:
        model = model.clone()
        model.model_options["transformer_options"][seq_parallel.SP_KEY] = seq_parallel.SeqParallel(dist.group.WORLD)
    cond = comfy.utils.load_torch_file(args.cond)["cond"] if args.cond else \
        torch.full((1, 512, 4096), args.cond_value + cond_offset)
    sched = cs.CausalSchedule(chunk_frames=args.chunk_frames, attention_frames=args.attention_frames,
                              sink_frames=args.sink_frames)
    req = video_run.VideoRequest(width=args.width, height=args.height, length=args.length, seed=args.seed, steps=4,
                                 cfg=args.cfg, schedule=sched, positives=[[[cond, {}]]], negative=[[cond * 0, {}]])
    def note(plan, n, last_latent, path=getattr(args, "progress", None)):
        with open(path, "a") as f:
            f.write(f"chunk {plan.index + 1}/{n}\n")
    on_window = note if getattr(args, "progress", None) and rank == 0 else None
    return families.new_video_run(model, req, on_window=on_window).run()


def probe_divergence(rank: int, world: int, init: str, args) -> None:
    """A rank that computes something else must stop every rank with a named error: `args.diverge`
    "prompt" gives rank 1 another prompt (the same settings), "settings" starts it with another seed
    (tests/inprocess/test_seq_parallel.py)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        if args.diverge == "settings":
            generate(argparse.Namespace(**{**vars(args), "seed": args.seed + rank}), world, rank)
        else:
            generate(args, world, rank, cond_offset=0.5 * rank)
    except RuntimeError as e:
        Path(f"{args.out}.rank{rank}.err").write_text(str(e))
    dist.barrier()               # both ranks stopped by the same named error: leave together
    dist.destroy_process_group()


# -- every family and cache over the ranks (tests/inprocess/test_seq_parallel.py) ------------------------
DF_ASYNC = dict(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2, addnoise_condition=20,
                solver="unipc", fps=0, prefix_mode="latent")


def video_job(job: dict, tiny: dict, sp=None):
    """(video, report, heat) of one tiny run: `job` names the family ("df", "magi"), the cache
    ("flowcache", "motioncache" or None) with its settings, the attention mode and the guidance; `sp`:
    the ranks (None: one process)."""
    import torch
    from tools.inprocess import load_comfy, pack
    load_comfy()
    import comfy.sd
    seq_parallel = pack("cache_core.seq_parallel")
    video_run = pack("model_patches.video_run")
    families = pack("model_patches.families")
    ar_cache = pack("model_patches.ar_cache")
    g = torch.Generator().manual_seed(1)
    if job["family"] == "df":
        model = comfy.sd.load_diffusion_model(tiny["14b"])
        pos, neg = [[torch.zeros(1, 512, 4096), {}]], [[torch.full((1, 512, 4096), 0.1), {}]]
        schedule = pack("cache_core.df_schedule").DFSchedule(**DF_ASYNC)
        size, length, steps = 64, 4 * 13 + 1, job.get("steps", 6)
    else:
        loader = pack("model_patches.magi_loader")
        index = Path(tiny["magi_4.5b"])
        index = next(index.parent.glob("*.json")) if index.is_dir() else index
        model = loader.load_magi_model(str(index), distill="base", dtype=torch.float32)
        caption = torch.randn(7, model.model.diffusion_model.config.caption_channels, generator=g)
        pos = neg = [[caption[None], {"magi_special_tokens": None}]]
        schedule = pack("cache_core.magi_schedule").MagiSchedule(**job.get("schedule", {}))
        size, length, steps = 64, 72, 8
    if job.get("cache") == "flowcache":
        config = pack("cache_core.flowcache_policy").FlowCacheConfig(**job["settings"])
        model = ar_cache.apply_flowcache(model, config, attention=job.get("attention", "chunk_causal"))
    elif job.get("cache") == "motioncache":
        config = pack("cache_core.motioncache_policy").MotionCacheConfig(**job["settings"])
        model = ar_cache.apply_motioncache(model, config, attention=job.get("attention", "chunk_causal"))
    if sp is not None:
        model = model.clone()
        model.model_options["transformer_options"][seq_parallel.SP_KEY] = sp
    req = video_run.VideoRequest(width=size, height=size, length=length, seed=job.get("seed", 7), steps=steps,
                                 cfg=job.get("cfg", 2.0), schedule=schedule, positives=[pos], negative=neg)
    run = families.new_video_run(model, req)
    video, report = run.run()
    return video, report, run.heat


def probe_jobs(rank: int, world: int, init: str, jobs: list, tiny: dict, out: str) -> None:
    """`jobs` one after another over the ranks; each rank saves {name: (video, report, heat) or the error}."""
    import torch
    import torch.distributed as dist
    from tools.inprocess import load_comfy, pack
    load_comfy(cpu=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        sp = pack("cache_core.seq_parallel").SeqParallel(dist.group.WORLD)
        results = {}
        for job in jobs:
            sp.bytes_sent = 0
            try:
                results[job["name"]] = video_job(job, tiny, sp)
            except Exception as e:            # a named refusal (bad input) is a result too
                results[job["name"]] = f"{type(e).__name__}: {e}"
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def probe_primitives(rank: int, world: int, init: str, out: str) -> None:
    """The primitives on known tensors, results saved per rank (tests/inprocess/test_seq_parallel.py)."""
    import torch
    import torch.distributed as dist
    from tools.inprocess import pack
    seq_parallel = pack("cache_core.seq_parallel")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sp = seq_parallel.SeqParallel(dist.group.WORLD)
        results = {}
        for n in (1, 7, 8, 13):                 # uneven and even token counts; 1: a rank with none (a subset)
            g = torch.Generator().manual_seed(n)
            full = torch.randn(2, n, 4, 3, generator=g)        # [B, n, H, D], the same on both ranks
            sizes = sp.splits(n)
            mine = full[:, sp.local(n)]
            heads = sp.seq_to_heads(mine, sizes)
            h = 4 // world
            results[f"heads_{n}"] = torch.equal(heads, full[:, :, rank * h:(rank + 1) * h])
            back = sp.heads_to_seq(heads, sizes)
            results[f"back_{n}"] = torch.equal(back, mine)
            results[f"gather_{n}"] = torch.equal(sp.gather_rows(mine.flatten(2), sizes), full.flatten(2))
        try:
            sp.agree([rank], "a test point")
            results["diverged_raises"] = False
        except RuntimeError as e:
            results["diverged_raises"] = "ranks diverged at a test point" in str(e)
        torch.save(results, f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    run_rank(rank, world, "env://", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
