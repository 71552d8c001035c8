#!/usr/bin/env python3
"""`make bench-stream`: what a viewer of a live run waits for, on the toy SkyReels-V2-DF model (CPU).

1. Schedule arithmetic (deterministic): model calls before the first frame is final, with chunk
   emission (a block at its last step) against window emission (a whole window), for the shipped
   long async schedule and its sync counterpart.
2. Measured, one interleaved run (toy model at 128x128 with the shipped window geometry, 30
   steps, the tiny random Wan 2.1 VAE decoding every emitted piece into a fragmented mp4 and the
   live view's JPEGs): TTFF, the time the first window is complete (what window emission would
   give), the emission timeline, sustained frames/s, real-time factor and stall-free start-up
   delay; uncached and FlowCache; and the same jobs without a sink, for the streaming overhead.
   Wall times on a shared 2-core machine: the ratios within one round are what to read.
3. Peak memory of a process streaming 5 and 10 windows (flat in length); `--memory-only` re-measures it.

Writes bench/results/stream.json and stream.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from tools.inprocess import load_comfy, pack  # noqa: E402

load_comfy()
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

import methods  # noqa: E402  (ComfyUI loaded)

df_schedule = pack("cache_core.df_schedule")
df = pack("model_patches.df_sampling")
video_run = pack("model_patches.video_run")
families = pack("model_patches.families")
writer_mod = pack("nodes.video_stream")
live = pack("nodes.live")

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
SHIPPED = dict(window_frames=97, overlap_frames=17, ar_step=5, causal_block_size=5)   # skyreels_df_t2v_long_async
SYNC = dict(window_frames=97, overlap_frames=17, ar_step=0, causal_block_size=1)


H100_BF16 = 989e12               # dense bf16 peak, FLOP/s
MFU = 0.4                        # the share of it a well-tuned DiT forward reaches (an assumption, said so)


def realtime_rows() -> list[dict]:
    """Computed (no GPU here): uncached transformer FLOPs per second of video and the real-time
    factor on one H100 at MFU, from the pack's FLOP model and the shipped schedules. MAGI-1: each
    chunk walks its steps against about 4.5 chunks of keys (the default key ranges) and 800 text
    tokens; base models ~2 guidance passes on average."""
    fl = pack("cache_core.flops")

    def df_flops(shape, w, h, steps=30, branches=2, seconds=60, fps=24):
        fam, sch = families.WAN21, SHIPPED
        wl, ol = fam.latent_frames(sch["window_frames"]), fam.latent_frames(sch["overlap_frames"])
        plans = df_schedule.plan_windows(fam.latent_frames(seconds * fps - 3), wl, ol, sch["causal_block_size"])
        tpf, total = fl.tokens_per_frame(h, w), 0
        for p in plans:
            frames = (0 if p.index == 0 else ol) + p.new_frames + p.pad_frames
            rows = df_schedule.window_rows(p.new_frames + p.pad_frames, steps, sch["ar_step"], sch["causal_block_size"])
            total += rows * fl.window_flops(shape, frames * tpf, frames, batch=branches)
        return total / seconds

    def magi_flops(shape, w, h, steps=16, passes=1, seconds=60):
        lq, chunks = fl.tokens_per_frame(h, w) * 6, seconds          # a chunk: 6 latents, 24 frames = 1 s
        return chunks * steps * passes * fl.magi_chunk_flops(shape, lq, int(lq * 4.5), 800) / seconds

    rows = [("SkyReels-V2-DF-1.3B 960x544, 30 steps, cfg 6", df_flops(fl.DiTShape.wan_1_3b(), 960, 544)),
            ("SkyReels-V2-DF-1.3B 832x480, 30 steps, cfg 6", df_flops(fl.DiTShape.wan_1_3b(), 832, 480)),
            ("SkyReels-V2-DF-14B 960x544, 30 steps, cfg 6", df_flops(fl.DiTShape.wan_14b(), 960, 544)),
            ("SkyReels-V2-DF-14B 1280x720, 30 steps, cfg 6", df_flops(fl.DiTShape.wan_14b(), 1280, 720)),
            ("MAGI-1 4.5B distill 720x720, 16 steps", magi_flops(fl.MagiShape.magi_4_5b(), 720, 720)),
            ("MAGI-1 24B distill 720x720, 16 steps", magi_flops(fl.MagiShape.magi_24b(), 720, 720)),
            ("MAGI-1 4.5B base 720x720, 64 steps", magi_flops(fl.MagiShape.magi_4_5b(), 720, 720, 64, 2))]
    return [{"model": m, "pflop_per_video_second": f / 1e15, "realtime_factor_h100": f / (H100_BF16 * MFU)}
            for m, f in rows]


def first_frame_calls(sch: dict, steps: int, length: int) -> dict:
    """Model calls until the first generated frame is final: chunk emission vs window emission."""
    fam = families.WAN21
    schedule = df.DFSchedule(**sch)
    plans = df_schedule.plan_windows(fam.latent_frames(length), fam.latent_frames(sch["window_frames"]),
                                     fam.latent_frames(sch["overlap_frames"]), sch["causal_block_size"])
    per_window = df.calls_per_window(plans, steps, schedule)
    first = plans[0]
    matrix = df_schedule.step_matrix(first.new_frames + first.pad_frames, steps, sch["ar_step"],
                                     sch["causal_block_size"])
    final_rows = (matrix.counters[:, 0] >= steps).nonzero().flatten()
    chunk = int(final_rows[0]) + 1
    return {"window_calls": per_window[0], "chunk_calls": chunk, "ratio": chunk / per_window[0],
            "windows": len(plans), "calls": sum(per_window)}


def job(cache: str, sink: bool, vae, out: Path, steps: int, length: int, after_piece=None):
    """One run; returns its report (and wall) with or without the file + live-view sink."""
    model = methods.with_method(JOB["model"], "flowcache" if cache == "flowcache" else "uncached",
                                0.1 if cache == "flowcache" else None)
    sch = df.DFSchedule(**SHIPPED, addnoise_condition=20, solver="unipc", fps=24, prefix_mode="latent")
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = video_run.VideoRequest(width=128, height=128, length=length, seed=3, steps=steps, cfg=1.0,
                                 schedule=sch, positives=[cond], negative=cond, vae=vae if sink else None)
    writer = writer_mod.StreamingVideoWriter(str(out / f"stream_{cache}.mp4"), 24) if sink else None
    session = live.LiveSession(live.LiveSettings(prompts=None), [cond], "bench", 24, None) if sink else None

    def both(frames, piece):
        writer.write(frames)
        session.frames(frames, piece)
        if after_piece is not None:
            after_piece(piece)
    t0 = time.perf_counter()
    try:
        run = families.new_video_run(model, req, sink=both if sink else None, t_start=t0)
        _, report = run.run()
    finally:
        if session is not None:
            session.close("finished")
    wall = time.perf_counter() - t0
    if writer is not None:
        writer.close()
    return report, wall


JOB: dict = {}


def memory() -> list[dict]:
    """Resident memory of a whole process that streams one run (file + live view, uncached, 3 steps:
    decode-heavy) of 5 and of 10 windows, each in a fresh process (the allocator's history of other
    jobs does not count): the level after each emitted piece (first and last window) and the peak.
    The level is what grows if anything is kept per frame; the peak moves by the allocator's
    transients."""
    import subprocess
    rows = []
    for length in (417, 817):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(length)], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"memory {length} frames: {rows[-1]}", flush=True)
    return rows


def memory_child(length: int) -> None:
    import resource
    from make_tiny_checkpoints import write_all
    tiny = write_all(tempfile.mkdtemp(prefix="arcache_stream_"), seed=0)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(tiny["vae"]))
    JOB["model"] = methods.load_unet(TOY)
    levels: dict = {}
    proc = psutil.Process()
    report, wall = job("uncached", True, vae, Path(tempfile.mkdtemp(prefix="arcache_stream_out_")), 3, length,
                       after_piece=lambda piece: levels.setdefault(piece, []).append(proc.memory_info().rss / 2**20))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # KiB on Linux
    windows = sorted(levels)
    print(json.dumps({"frames": length, "windows": report["windows"], "wall_s": wall, "peak_rss_mb": peak,
                      "rss_first_window_mb": statistics.median(levels[windows[0]]),
                      "rss_last_window_mb": statistics.median(levels[windows[-1]])}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--length", type=int, default=177, help="pixel frames (177: 2 windows of the shipped geometry)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory-only", action="store_true", help="re-measure only the memory rows of stream.json")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    results = REPO / "bench" / "results"
    if a.memory_child is not None:
        memory_child(a.memory_child)
        return 0
    if a.memory_only:
        result = json.loads((results / "stream.json").read_text())
        result["memory"] = memory()
        (results / "stream.json").write_text(json.dumps(result, indent=1) + "\n")
        (results / "stream.md").write_text(markdown(result))
        return 0
    torch.manual_seed(0)
    from make_tiny_checkpoints import write_all
    tiny = write_all(tempfile.mkdtemp(prefix="arcache_stream_"), seed=0)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(tiny["vae"]))
    JOB["model"] = methods.load_unet(TOY)
    out = Path(tempfile.mkdtemp(prefix="arcache_stream_out_"))

    arithmetic = {name: first_frame_calls(sch, a.steps, 737) for name, sch in (("async 5/5 (shipped)", SHIPPED),
                                                                              ("sync", SYNC))}
    for name, r in arithmetic.items():
        print(f"{name}: first frame final after {r['chunk_calls']} of the first window's {r['window_calls']} calls "
              f"({r['ratio']:.2f})", flush=True)

    job("uncached", True, vae, out, 4, 97)                    # warm-up
    runs: dict = {}
    for rnd in range(a.rounds):                                # interleaved: each round runs every job once
        for cache in ("uncached", "flowcache"):
            for sink in (True, False):
                report, wall = job(cache, sink, vae, out, a.steps, a.length)
                runs.setdefault((cache, sink), []).append((report, wall))
                print(f"round {rnd} {cache:9s} sink={sink!s:5s} wall {wall:6.2f} s ttff {report['ttff_s']:.2f} s",
                      flush=True)
    rows = []
    for cache in ("uncached", "flowcache"):
        streamed, plain = runs[(cache, True)], runs[(cache, False)]
        rep = streamed[-1][0]
        window0_end = max(e[3] for e in rep["emissions"] if e[0] == 0)
        rows.append({
            "cache": cache, "ttff_s": statistics.median(r["ttff_s"] for r, _ in streamed),
            "first_window_complete_s": window0_end, "ttff_calls": rep["ttff_calls"],
            "first_window_calls": rep["calls_per_window"][0],
            "ttff_over_window": statistics.median(r["ttff_s"] / max(e[3] for e in r["emissions"] if e[0] == 0)
                                                  for r, _ in streamed),
            "sustained_fps": rep["sustained_fps"], "realtime_factor": rep["realtime_factor"],
            "startup_delay_s": rep["startup_delay_s"], "emissions": rep["emissions"],
            "stream_decode": rep["stream_decode"],
            "overhead": statistics.median(w / p for (_, w), (_, p) in zip(streamed, plain)),
            "wall_s": statistics.median(w for _, w in streamed), "frames": sum(e[2] for e in rep["emissions"]),
            "stream_share": statistics.median(r["stream_seconds"] / w for r, w in streamed),
        })
    result = {"arithmetic": arithmetic, "realtime": realtime_rows(), "measured": rows, "memory": memory(),
              "setup": {"model": "toy_world_df (128x128)", "schedule": SHIPPED, "steps": a.steps, "length": a.length,
                        "rounds": a.rounds, "vae": "tiny random Wan 2.1 VAE", "device": "cpu",
                        "threads": torch.get_num_threads()}}
    (results / "stream.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / "stream.md").write_text(markdown(result))
    print((results / "stream.md").read_text())
    return 0


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = ["# Streaming: time to first frame and the emission timeline", "",
             "`make bench-stream` (bench/stream.py). Schedule arithmetic is exact; the measured part is the toy "
             f"SkyReels-V2-DF model at 128x128 on CPU ({s['threads']} threads), the shipped long async window "
             f"geometry (97 frames, 17 of history, blocks of 5 latents, ar_step 5), {s['steps']} steps, "
             f"{s['length']} frames, the tiny random Wan 2.1 VAE decoding every piece into a fragmented mp4 and the "
             f"live view's JPEGs; {s['rounds']} interleaved rounds, medians.", "",
             "## Model calls before the first frame is final (shipped long workflow, 30 steps)", "",
             "| schedule | chunk emission | window emission | ratio |", "|---|---|---|---|"]
    for name, r in result["arithmetic"].items():
        lines.append(f"| {name} | {r['chunk_calls']} | {r['window_calls']} | {r['ratio']:.2f} |")
    lines += ["", f"## Real-time factor on one H100, computed ({MFU:.0%} of the dense bf16 peak; uncached)", "",
              "| model, setting | PFLOP per video second | real-time factor |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['pflop_per_video_second']:.1f} | {r['realtime_factor_h100']:.0f} |"
              for r in result["realtime"]]
    lines += ["", "## Measured (toy, CPU)", "",
              "| cache | TTFF s | first window complete s | TTFF / window | calls before first frame | sustained frames/s "
              "| real-time factor | stall-free start-up delay s | streaming overhead (wall with / without sink) "
              "| share of wall in decode + sinks |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["measured"]:
        lines.append(f"| {r['cache']} | {r['ttff_s']:.2f} | {r['first_window_complete_s']:.2f} | "
                     f"{r['ttff_over_window']:.2f} | {r['ttff_calls']} of {r['first_window_calls']} | "
                     f"{r['sustained_fps']:.2f} | {r['realtime_factor']:.1f} | {r['startup_delay_s']:.2f} | "
                     f"{r['overhead']:.3f} | {r['stream_share']:.2f} |")
    lines += ["", "Resident memory of a fresh process streaming one run (uncached, 3 steps, file + live view), "
              "after each emitted piece in the first / last window, and its peak: " + "; ".join(
                  f"{m['frames']} frames ({m['windows']} windows): {m['rss_first_window_mb']:.0f} / "
                  f"{m['rss_last_window_mb']:.0f} MB, peak {m['peak_rss_mb']:.0f} MB" for m in result["memory"]) + "."]
    r = result["measured"][0]
    lines += ["", f"Emission timeline, uncached ([piece, first frame, frames, seconds from start]): "
              + ", ".join(str(e) for e in r["emissions"]), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
