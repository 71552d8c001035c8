#!/usr/bin/env python3
"""One video across several processes (sequence parallel), headless, under torchrun: a workflow's sampler.

    torchrun --nproc_per_node 2 tools/sp_run.py --workflow video_api.json [--comfy /path/to/ComfyUI] \
        [--output-directory out/] [--timeout-s 600]

Every rank loads ComfyUI in-process (the install at --comfy, or $COMFYUI_PATH, with its models,
custom nodes and extra_model_paths), this pack, and runs the workflow (API format: ComfyUI's
"Export (API)") through ComfyUI's own executor. The pack's Streaming AR Sampler sees the environment
this entry sets and splits each model call's tokens across the ranks (cache_core/seq_parallel.py:
Ulysses all-to-all, head-sharded K/V; every family, every cache). Every rank runs the whole graph
(loaders, text encoders and the VAE are replicated); rank 0 writes into the output directory, with the
sampler's run report as arcache_report_<node id>.json (its "sequence_parallel" part combined across
ranks), the others into a scratch folder. NCCL on GPUs, gloo on CPU. Ctrl-C (or SIGTERM) stops every rank at the
next model call as ComfyUI's Cancel does; a rank that fails stops the others with a named error, within
--timeout-s at worst. Exit status: 0 finished, 1 error, 130 interrupted; each rank's error is written
beside the output as rank<N>.err.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workflow", required=True, help="a workflow in ComfyUI's API format (Export (API))")
    ap.add_argument("--comfy", default=None, help="the ComfyUI folder (default: $COMFYUI_PATH, else the test host)")
    ap.add_argument("--base-directory", default=None, help="ComfyUI's --base-directory (models, custom_nodes, output)")
    ap.add_argument("--output-directory", default=None, help="where rank 0's outputs go (default: ComfyUI's)")
    ap.add_argument("--model-dir", action="append", default=[], metavar="KIND=DIR",
                    help="an extra model folder, e.g. diffusion_models=/data/models (repeatable)")
    ap.add_argument("--custom-node", action="append", default=[], metavar="DIR",
                    help="an extra custom node folder to load (repeatable)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="a collective waiting longer fails every rank")
    ap.add_argument("--progress", default=None, help="a file rank 0 appends the sampler's progress to ('value/total')")
    ap.add_argument("--init", default="env://", help="torch.distributed's init_method (default: torchrun's environment)")
    ap.add_argument("--errors", default=None, help="where each rank writes rank<N>.err (default: the output directory)")
    return ap.parse_args(argv)


def init_ranks(rank: int, world: int, init: str, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=init, rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def load_prompt(path: str) -> dict:
    """The workflow's API prompt, or a named error for the UI format."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise SystemExit(f"{path} is a UI workflow; save it with Workflow > Export (API) and pass that file")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise SystemExit(f"{path} is not a ComfyUI API prompt ({{node id: {{class_type, inputs}}}})")
    if not any(v["class_type"] == "ARCacheStreamingSampler" for v in data.values()):
        raise SystemExit(f"{path} has no Streaming AR Sampler (ARCacheStreamingSampler): nothing to split across ranks")
    return data


def execute_workflow(prompt: dict, rank: int, args) -> tuple[str, list]:
    """ComfyUI's executor on `prompt` in this process: (status "finished" | "interrupted" | "error",
    the error messages)."""
    import asyncio
    from tools.inprocess import load_comfy
    root = str(load_comfy(args.comfy))
    if args.base_directory:                    # read by folder_paths when it is first imported
        import comfy.cli_args
        comfy.cli_args.args.base_directory = str(Path(args.base_directory).resolve())
    sys.path.remove(root)
    sys.path.insert(0, root)                   # ComfyUI's nodes.py, not the pack's nodes/, is `nodes` here
    import utils.extra_config                  # first, as main.py: later imports shadow this package
    import folder_paths
    if (Path(root) / "extra_model_paths.yaml").exists():           # the install's model folders, as main.py
        utils.extra_config.load_extra_path_config(str(Path(root) / "extra_model_paths.yaml"))
    for spec in args.model_dir:
        kind, _, folder = spec.partition("=")
        folder_paths.add_model_folder_path(kind, str(Path(folder).resolve()))
    if args.output_directory and rank == 0:
        folder_paths.set_output_directory(str(Path(args.output_directory).resolve()))
    elif rank:                                 # the others' outputs are copies: out of the user's way, then gone
        scratch = tempfile.mkdtemp(prefix=f"arcache_rank{rank}_")
        atexit.register(shutil.rmtree, scratch, True)
        folder_paths.set_output_directory(scratch)
    import server
    import execution
    import nodes
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    prompt_server = server.PromptServer(loop)        # nodes register routes and send events through it
    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    for folder in [*args.custom_node] + ([] if "ARCacheStreamingSampler" in nodes.NODE_CLASS_MAPPINGS else [REPO]):
        loop.run_until_complete(nodes.load_custom_node(str(Path(folder).resolve())))
    if args.progress and rank == 0:
        import comfy.utils

        def note(value, total, preview, node_id=None):
            with open(args.progress, "a") as f:
                f.write(f"{value}/{total}\n")
        comfy.utils.set_progress_bar_global_hook(note)
    prompt_id = str(uuid.uuid4())
    valid = loop.run_until_complete(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        return "error", [json.dumps(valid[1]), json.dumps(valid[3])]
    import inspect                             # its cache settings moved between releases: ask, do not assume
    takes = inspect.signature(execution.PromptExecutor).parameters
    cache = {"cache_args": {"lru": 0, "ram": 0}} if "cache_args" in takes else {}
    executor = execution.PromptExecutor(prompt_server, cache_type=execution.CacheType.CLASSIC, **cache)
    executor.execute(prompt, prompt_id, {}, valid[2])
    errors = [data for event, data in executor.status_messages if event in ("execution_error", "execution_interrupted")]
    if executor.success:
        if rank == 0:                      # the sampler's run report (combined across ranks) beside the outputs
            for node_id, node in prompt.items():
                text = executor.history_result.get("outputs", {}).get(node_id, {}).get("text")
                if node["class_type"] == "ARCacheStreamingSampler" and text:
                    Path(folder_paths.get_output_directory(), f"arcache_report_{node_id}.json").write_text(text[0])
        return "finished", []
    interrupted = any(event == "execution_interrupted" for event, _ in executor.status_messages)
    return ("interrupted" if interrupted else "error"), [e.get("exception_message", json.dumps(e, default=str))
                                                           for e in errors]


def run_rank(rank: int, world: int, init: str, args) -> int:
    """One rank: the workflow with the sampler's tokens split across `world` ranks. `init`: a
    torch.distributed init_method (file:// in tests, env:// under torchrun)."""
    from tools.inprocess import pack
    os.environ[pack("cache_core.seq_parallel").RANKS_ENV] = "1"
    interrupt_on_signals()
    prompt = load_prompt(args.workflow)
    init_ranks(rank, world, init, args.timeout_s)
    import torch.distributed as dist
    status, errors = "error", []
    try:
        status, errors = execute_workflow(prompt, rank, args)
        if status == "finished":
            dist.barrier()       # leave together: a rank tearing gloo down while a peer still talks aborts
    except BaseException as e:
        errors = [f"{type(e).__name__}: {e}"]
        raise
    finally:
        if errors:
            where = Path(args.errors or args.output_directory or ".")
            where.mkdir(parents=True, exist_ok=True)
            (where / f"rank{rank}.err").write_text(f"{status}: " + "\n".join(errors))
            print(f"rank {rank}: {status}: " + "\n".join(errors), file=sys.stderr)
        dist.destroy_process_group()
    return {"finished": 0, "interrupted": 130}.get(status, 1)


def spawned_rank(rank: int, world: int, init: str, args) -> None:
    """run_rank as a torch.multiprocessing target (tests): its status becomes the exit code."""
    sys.exit(run_rank(rank, world, init, args))


def interrupt_on_signals() -> None:
    """Ctrl-C / SIGTERM before the sampler runs (loading, encoding): ComfyUI's interrupt, as its Cancel; a
    second one stops this process at once. While the sampler runs, its own handler makes every rank stop
    at the same model call (SeqParallel.stop_on_signals)."""
    def stop(signum, frame):
        import comfy.model_management
        comfy.model_management.interrupt_current_processing(True)
        signal.signal(signum, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


# -- every family and cache over the ranks (tests/inprocess/test_seq_parallel.py) ------------------------
DF_ASYNC = dict(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2, addnoise_condition=20,
                solver="unipc", fps=0, prefix_mode="latent")


def video_job(job: dict, tiny: dict, sp=None):
    """(video, report, heat) of one tiny run: `job` names the family ("df", "magi", "causal"), the cache
    ("flowcache", "motioncache" or None) with its settings, the attention mode and the guidance; `sp`:
    the ranks (None: one process). Test knobs: "diverge" gives rank r another "seed" or "prompt", or
    rank 1 another "pack" (its sources' checksum, as another installed version would have);
    "progress" is a file the run appends "chunk k/n" to."""
    import torch
    from tools.inprocess import load_comfy, pack
    load_comfy()
    import comfy.sd
    seq_parallel = pack("cache_core.seq_parallel")
    video_run = pack("model_patches.video_run")
    families = pack("model_patches.families")
    ar_cache = pack("model_patches.ar_cache")
    rank = 0 if sp is None else sp.rank
    g = torch.Generator().manual_seed(1)
    cond = torch.full((1, 512, 4096), 0.3 + (0.5 * rank if job.get("diverge") == "prompt" else 0.0))
    pos, neg = [[cond, {}]], [[torch.full((1, 512, 4096), 0.1), {}]]
    if job["family"] == "df":
        model = comfy.sd.load_diffusion_model(tiny["14b"])
        schedule = pack("cache_core.df_schedule").DFSchedule(**DF_ASYNC)
        size, length, steps = 64, 4 * 13 + 1, job.get("steps", 6)
    elif job["family"] == "causal":
        import folder_paths
        folder_paths.add_model_folder_path("diffusion_models", str(Path(tiny["self_forcing"]).parent))
        model = pack("model_patches.causal_loader").load_causal_wan(Path(tiny["self_forcing"]).name)
        schedule = pack("cache_core.causal_schedule").CausalSchedule(chunk_frames=3, attention_frames=6, sink_frames=3)
        size, length, steps = 64, job.get("length", 4 * 11 + 1), 4
    else:
        loader = pack("model_patches.magi_loader")
        model = loader.load_magi_model(str(tiny["magi_4.5b"]), distill="base", dtype=torch.float32)
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
    seed = job.get("seed", 7) + (rank if job.get("diverge") == "seed" else 0)
    req = video_run.VideoRequest(width=size, height=size, length=length, seed=seed, steps=steps,
                                 cfg=job.get("cfg", 2.0), schedule=schedule, positives=[pos], negative=neg)
    if job.get("diverge") == "pack" and rank == 1:
        video_run.pack_fingerprint = lambda: 0x0BAD0BAD
    run = families.new_video_run(model, req)
    if job.get("progress") and rank == 0:
        def note(plan, n, last_latent, path=job["progress"]):
            with open(path, "a") as f:
                f.write(f"chunk {plan.index + 1}/{n}\n")
        run.on_window = note
    video, report = run.run()
    return video, report, run.heat


def probe_jobs(rank: int, world: int, init: str, jobs: list, tiny: dict, out: str, timeout_s: float = 60.0) -> None:
    """`jobs` one after another over the ranks; each rank saves {name: (video, report, heat) or the error}."""
    import torch
    import torch.distributed as dist
    from tools.inprocess import load_comfy, pack
    load_comfy(cpu=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        sp = pack("cache_core.seq_parallel").SeqParallel(dist.group.WORLD)
        results = {}
        for job in jobs:
            sp.reset_counters()
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
    return run_rank(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), args.init, args)


if __name__ == "__main__":
    sys.exit(main())
