#!/usr/bin/env python3
"""`make bench-causal`: the few-step causal Wan schedule against diffusion forcing on the same Wan.

1. Measured, one interleaved run (CPU, the toy Wan 2.1 at 128x128, 81 frames = 21 latent frames,
   no VAE): the Causal Schedule (Self-Forcing's 4 steps, chunks of 3; full history and LongLive's
   12-frame window with a 3-frame sink) against SkyReels-V2-DF's schedule (one 81-frame window,
   30 steps, synchronous and asynchronous): wall seconds, time to first frame (TTFF), latent frames
   (and chunks) per second, model calls, transformer FLOPs. The toy was trained for diffusion
   forcing, not causally, so the causal videos are not meaningful pictures: the timing is.
2. Measured: seconds per chunk over a long run, full history against the window (the window's
   cost per chunk stays flat, the full history's grows with the keys).
3. Computed (no GPU here, said so): transformer FLOPs per video second and the real-time factor
   on one H100 at 40% of the bf16 peak for Self-Forcing-1.3B and Krea-14B at 832x480 and LongLive
   2.0 (5B) at 1280x704, and K/V memory per length: the whole video held (core preallocates it)
   against the rolling window.

Writes bench/results/causal.json and causal.md. Wall times on a shared 2-core machine: read the
ratios within one round.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.inprocess import load_comfy, pack  # noqa: E402

load_comfy()
import comfy.sd  # noqa: E402

cs = pack("cache_core.causal_schedule")
df_schedule = pack("cache_core.df_schedule")
fl = pack("cache_core.flops")
video_run = pack("model_patches.video_run")
families = pack("model_patches.families")

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
OUT = REPO / "bench" / "results"
H100_BF16, MFU = 989e12, 0.4
LONGLIVE = dict(attention_frames=12, sink_frames=3)


def schedules() -> dict:
    return {
        "causal, Self-Forcing (4 steps, full history)": (cs.CausalSchedule(), 4),
        "causal, LongLive window 12 + sink 3": (cs.CausalSchedule(**LONGLIVE), 4),
        "DF sync (one window, 30 steps)": (df_schedule.DFSchedule(window_frames=81, overlap_frames=0, fps=0,
                                                                  prefix_mode="latent"), 30),
        "DF async (blocks of 3, ar_step 5, 30 steps)": (df_schedule.DFSchedule(
            window_frames=81, overlap_frames=0, ar_step=5, causal_block_size=3, fps=0, prefix_mode="latent"), 30),
    }


def run(model, sched, steps, length=81, size=128):
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = video_run.VideoRequest(width=size, height=size, length=length, seed=0, steps=steps, cfg=1.0,
                                 schedule=sched, positives=[cond], negative=cond)
    t = time.perf_counter()
    emitted = []
    video, report = families.new_video_run(model, req, sink=lambda frames, piece: emitted.append(piece)).run()
    return time.perf_counter() - t, report


def per_chunk(model, sched, chunks=60, size=64) -> list[float]:
    """Seconds between consecutive emitted chunks of one long run."""
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = video_run.VideoRequest(width=size, height=size, length=4 * (3 * chunks - 1) + 1, seed=0, steps=4, cfg=1.0,
                                 schedule=sched, positives=[cond], negative=cond)
    _, report = families.new_video_run(model, req, sink=lambda frames, piece: None).run()
    t = [e[3] for e in report["emissions"]]
    return [b - a for a, b in zip(t, t[1:])], report["kv_bytes_peak"]


def computed() -> dict:
    rows = []
    for name, shape in (("Self-Forcing / LongLive 1.3B", fl.DiTShape.wan_1_3b()), ("Krea Realtime 14B", fl.DiTShape.wan_14b())):
        tpf = fl.tokens_per_frame(480, 832)                 # 1560 tokens a latent frame
        for window in (None, 12):
            chunks, flops = 20, 0                           # 60 latent frames = 237 frames, ~15 s at 16 fps
            for g in range(chunks):
                keys = 3 * (g + 1) if window is None else min(window, 3 * (g + 1))
                flops += 5 * shape.chunk_causal((3 * tpf,), [0], {0: keys * tpf}, frames=3)
            seconds = (4 * 3 * chunks - 3) / 16
            rows.append({"model": name, "attention": "all" if window is None else f"{window} frames",
                         "pflop_per_video_second": flops / seconds / 1e15,
                         "realtime_factor_h100": flops / seconds / (H100_BF16 * MFU),
                         "fps_h100": 16 * (H100_BF16 * MFU) / (flops / seconds)})
    shape_5b = fl.DiTShape(dim=3072, ffn_dim=14336, num_layers=30, in_dim=48, out_dim=48)
    tpf = fl.tokens_per_frame(704, 1280, vae_stride=16)                   # 880 tokens a latent frame
    for window in (None, 32):                                             # LongLive 2.0: 16 chunks of 8 (509 frames)
        chunks, flops = 16, 0
        for g in range(chunks):
            keys = 8 * (g + 1) if window is None else min(window, 8 * (g + 1))
            flops += 5 * shape_5b.chunk_causal((8 * tpf,), [0], {0: keys * tpf}, frames=8)
        seconds = (4 * 8 * chunks - 3) / 24
        rows.append({"model": "LongLive 2.0 5B, 1280x704, 24 fps", "attention": "all" if window is None else f"{window} frames",
                     "pflop_per_video_second": flops / seconds / 1e15,
                     "realtime_factor_h100": flops / seconds / (H100_BF16 * MFU),
                     "fps_h100": 24 * (H100_BF16 * MFU) / (flops / seconds)})
    kv = []
    for name, shape, tpf, fps, window in (("1.3B, 832x480", fl.DiTShape.wan_1_3b(), fl.tokens_per_frame(480, 832), 16, 12),
                                          ("14B, 832x480", fl.DiTShape.wan_14b(), fl.tokens_per_frame(480, 832), 16, 12),
                                          ("5B (LongLive 2.0), 1280x704", shape_5b, tpf, 24, 32)):
        per_frame = 2 * shape.num_layers * tpf * shape.dim * 2                # K and V, bf16
        for seconds in (5, 60, 600):
            frames = (fps * seconds - 1) // 4 + 1
            kv.append({"model": name, "seconds": seconds, "window_frames": window,
                       "core_prealloc_gb": frames * per_frame / 1e9, "window_gb": min(frames, window) * per_frame / 1e9})
    return {"realtime": rows, "kv_memory": kv}


def main() -> int:
    model = comfy.sd.load_diffusion_model(str(TOY))
    jobs = schedules()
    rounds = {name: [] for name in jobs}
    for _ in range(2):                                           # interleaved
        for name, (sched, steps) in jobs.items():
            wall, rep = run(model, sched, steps)
            rounds[name].append(dict(wall_s=wall, ttff_s=rep["ttff_s"], calls=rep["model_calls"],
                                     flops=rep["transformer_flops"], latent_frames=rep["latent_frames"],
                                     pieces=len(rep["emissions"])))
    measured = []
    for name, rs in rounds.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        measured.append(dict(schedule=name, wall_s=wall, ttff_s=statistics.median(r["ttff_s"] for r in rs),
                             latent_frames_per_s=rs[0]["latent_frames"] / wall, model_calls=rs[0]["calls"],
                             tflops=rs[0]["flops"] / 1e12, pieces=rs[0]["pieces"]))
    full, full_kv = per_chunk(model, cs.CausalSchedule())
    win, win_kv = per_chunk(model, cs.CausalSchedule(**LONGLIVE))
    growth = {"full history": {"first10_s": statistics.mean(full[:10]), "last10_s": statistics.mean(full[-10:]),
                               "kv_peak_mb": full_kv / 1e6},
              "window 12 + sink 3": {"first10_s": statistics.mean(win[:10]), "last10_s": statistics.mean(win[-10:]),
                                     "kv_peak_mb": win_kv / 1e6}}
    result = {"measured": measured, "per_chunk_60": growth, **computed()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "causal.json").write_text(json.dumps(result, indent=1))
    (OUT / "causal.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = ["# Causal schedule vs diffusion forcing (`make bench-causal`)", "",
             "## Measured: toy Wan 2.1, 128x128, 81 frames, CPU, median of 2 interleaved rounds", "",
             "| schedule | wall s | TTFF s | latent frames/s | model calls | TFLOPs | pieces |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {m['schedule']} | {m['wall_s']:.2f} | {m['ttff_s']:.2f} | {m['latent_frames_per_s']:.2f} | "
              f"{m['model_calls']} | {m['tflops']:.3f} | {m['pieces']} |" for m in r["measured"]]
    lines += ["", "## Measured: seconds per chunk over 60 chunks (64x64), first 10 vs last 10", "",
              "| attention | first 10 | last 10 | K/V peak MB |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['first10_s']:.3f} | {v['last10_s']:.3f} | {v['kv_peak_mb']:.1f} |"
              for k, v in r["per_chunk_60"].items()]
    lines += ["", f"## Computed: one H100 at {MFU:.0%} of the bf16 peak, uncached (no GPU here): Wan 2.1 at 832x480, a 15 s "
              "video (20 chunks of 3), 16 fps; LongLive 2.0 at 1280x704, 509 frames (16 chunks of 8), 24 fps", "",
              "| model | attention | PFLOP per video second | real-time factor | frames/s |", "|---|---|---|---|---|"]
    lines += [f"| {x['model']} | {x['attention']} | {x['pflop_per_video_second']:.2f} | {x['realtime_factor_h100']:.2f} | "
              f"{x['fps_h100']:.1f} |" for x in r["realtime"]]
    lines += ["", "## Computed: K/V memory (bf16): the whole video held (core preallocates it) vs a rolling window", "",
              "| model | video | whole video GB | window | window GB |", "|---|---|---|---|---|"]
    lines += [f"| {k['model']} | {k['seconds']} s | {k['core_prealloc_gb']:.1f} | {k['window_frames']} frames | "
              f"{k['window_gb']:.1f} |" for k in r["kv_memory"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
