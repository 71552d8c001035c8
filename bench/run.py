#!/usr/bin/env python3
"""`make bench`: speed against fidelity of every cache on the same long-video job, in one process.

- curves (bench/curves.py): the toy SkyReels-V2-DF model, every method over its thresholds at
  10, 20, 30 and 50 steps, uncached runs interleaved through the sequence; the headline table
  (fastest setting at or above 30 and 25 dB) and the figures (bench/plots.py);
- the toy MAGI-1 (bench/magi.py): FlowCache and MotionCache over their thresholds;
- a tiny random-weights model in the SkyReels-V2-DF layout: a table of numbers only;
- the streaming sampler alone: peak memory of a short and a 4x longer video.

Writes bench/results/latest.json, latest.md, latest.png and curves_*.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
from tools.inprocess import pack  # noqa: E402
from tools.metrics import video_fidelity  # noqa: E402
import methods  # noqa: E402  (loads ComfyUI)
import curves  # noqa: E402
import overhead  # noqa: E402
import plots  # noqa: E402
from methods import PeakRSS, generate, load_unet, with_method  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

streaming = pack("model_patches.video_run")
ar = pack("model_patches.df_sampling")

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
# the random-weights model: a table only (its "fidelity" says nothing about a real model)
METHODS = [("uncached", None), ("chunk_causal", None),
           *[("flowcache", t) for t in (0.05, 0.1, 0.2)],
           *[("flowcache_bidir", t) for t in (0.1, 0.2)],
           *[("motioncache", t) for t in (0.1, 0.2)],
           *[("motioncache_bidir", t) for t in (0.1, 0.2)],
           *[("easycache", t) for t in (0.05, 0.2)],
           *[("teacache_window", t) for t in (0.1, 0.4)]]


def bench_model(name: str, model, job: dict, repeats: int, settings=METHODS) -> list[dict]:
    rows = []
    ref, ref_report, _, _ = generate(model, job)         # warm-up + the reference video
    causal = None                                         # the chunk-causal run without skipping
    for method, thr in settings:
        patched = with_method(model, method, thr)
        walls, base_walls = [], []
        for _ in range(repeats):                          # interleaved: uncached, method, ...
            _, _, w0, _ = generate(model, job)
            video, report, w1, rss = generate(patched, job)
            base_walls.append(w0)
            walls.append(w1)
        psnr, ssim = video_fidelity(video, ref)
        # long AR rollouts amplify any early difference; the first window shows per-window fidelity
        first = job["first_window_frames"]
        psnr_first = video_fidelity(video[:, :, :first], ref[:, :, :first])[0]
        if method == "chunk_causal":
            causal = video
        # FlowCache's skipping alone, apart from the chunk-causal restructuring it runs on
        psnr_causal = (video_fidelity(video, causal)[0] if method in ("flowcache", "motioncache") and causal is not None
                       else None)
        cache = report["cache"] or {}
        rows.append({
            "model": name, "method": method, "setting": "-" if thr is None else f"thr={thr}",
            "flops_ratio": report["transformer_flops"] / ref_report["transformer_flops"],
            "wall_ratio": statistics.median(w / b for w, b in zip(walls, base_walls)),
            "psnr_db": psnr, "ssim": ssim, "psnr_first_window_db": psnr_first,
            "psnr_vs_chunk_causal_db": psnr_causal, "peak_rss_mb": rss,
            "ttff_s": report["ttff_s"], "wall_s": statistics.median(walls),
            "chunk_steps_skipped": cache.get("chunk_steps_skipped"), "kv_bytes_peak": cache.get("kv_bytes_peak"),
            "token_fraction": cache.get("token_fraction_computed"),
            "model_calls": report["model_calls"], "windows": report["windows"],
        })
        print(f"{name:8s} {method:16s} {rows[-1]['setting']:9s} flops {rows[-1]['flops_ratio']:.3f} "
              f"wall {rows[-1]['wall_ratio']:.3f} psnr {psnr:6.2f} ssim {ssim:.3f}", flush=True)
    return rows


def bench_streaming(unet: Path, vae_path: Path, out_dir: Path) -> list[dict]:
    """The sampler alone: a short and a 4x longer video streamed to an mp4 as windows finish.
    Peak memory should stay flat: only the (small) latents grow with length."""
    import comfy.sd
    writer_mod = pack("nodes.video_stream")
    model = load_unet(unet)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))
    sched = ar.DFSchedule(window_frames=29, overlap_frames=5, ar_step=0, causal_block_size=1, fps=0,
                          prefix_mode="reencode_pixels")
    cond = [[torch.zeros(1, 512, 4096), {}]]
    rows = []
    for windows in (3, 12, 3):                        # the first short run warms up; the second is reported
        length = 4 * (8 + (windows - 1) * 6 - 1) + 1
        req = streaming.VideoRequest(width=64, height=64, length=length, seed=1, steps=3, cfg=1.0, schedule=sched,
                                     positives=[cond], negative=cond, vae=vae)
        writer = writer_mod.StreamingVideoWriter(str(out_dir / f"stream_{windows}.mp4"), 24)
        rss0 = psutil.Process().memory_info().rss / 2**20
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            _, report = pack("model_patches.families").new_video_run(model, req, sink=lambda f, i: writer.write(f)).run()
            wall = time.perf_counter() - t0
        writer.close()
        rows.append({"windows": windows, "frames": writer.frames, "model_calls": report["model_calls"],
                     "wall_s": wall, "ttff_s": report["ttff_s"],
                     "rss_before_mb": rss0, "peak_rss_mb": mem.peak / 2**20, "peak_rss_growth_mb": mem.peak / 2**20 - rss0})
    return rows[1:]


def stall_note(curve_rows: list[dict]) -> str:
    cached = curves.flag_stalled_cached(curve_rows)
    note = "" if not cached else (
        f" A cached run whose wall/FLOP ratio is over {curves.STALL_FACTOR:g}x its step count's median stalled too; "
        "its wall figures read `stalled` (its FLOPs and fidelity stand): " + ", ".join(
            f"{r['steps']} steps {r['method']} {r['threshold']:g}" for r in cached) + ".")
    stalls = {r["steps"]: r.get("stalled_uncached_s") for r in curve_rows if r["method"] == "uncached"}
    if any(v is None for v in stalls.values()):
        return "these results predate stall detection." + note
    found = {k: v for k, v in stalls.items() if v}
    if not found:
        return "none stalled in this run." + note
    return note + " Uncached runs stalled and re-timed: " + "; ".join(f"{k} steps: " + ", ".join(f"{w:.1f} s" for w in v)
                                                 for k, v in sorted(found.items())) + "."


def write_outputs(random_rows: list[dict], curve_rows: list[dict], magi_rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    curves.flag_stalled_cached(curve_rows)          # before anything shows a wall figure
    heads = {f"{f:g}dB": curves.headline(curve_rows, f) for f in curves.FLOORS_DB}
    (out / "latest.json").write_text(json.dumps({"meta": meta, "curves": curve_rows, "headline": heads,
                                                 "guide": curves.guide(curve_rows, meta["headline_steps"]),
                                                 "magi_guide": curves.magi_guide(magi_rows),
                                                 "magi": magi_rows, "random_model": random_rows}, indent=1) + "\n")
    cols = ["model", "method", "setting", "flops_ratio", "wall_ratio", "psnr_db", "ssim", "psnr_first_window_db",
            "token_fraction", "psnr_vs_chunk_causal_db", "kv_bytes_peak", "peak_rss_mb", "ttff_s"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    random_lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    random_lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in random_rows]
    main_steps = meta["headline_steps"]
    (out / "latest.md").write_text(
        f"# make bench ({meta['date']})\n\n{meta['job']}\n\n"
        "Ratios are cached / uncached. Uncached runs are interleaved through each step count's sequence (one "
        "after every two cached runs) and every cached run's wall ratio divides by the mean of the two uncached "
        "runs that bracket its pair (the spread: against each of the two). An uncached run over "
        f"{curves.STALL_FACTOR:g}x its step count's median stalled (the machine is shared) and is replaced by the "
        "median; " + stall_note(curve_rows) + " The headline rows and the presets are chosen by FLOPs at the "
        "fidelity floor (then fidelity, then the lower threshold), never by wall time, so a rerun of the same "
        "commit chooses the same. "
        "Fidelity: PSNR (all frames at once), SSIM (11x11 Gaussian), ST-LPIPS (AlexNet, stlpips-pytorch) and "
        "flicker ratio on the displayed frames (preview RGB, 8x), against the uncached run of the same attention "
        "mode (`same`) and against the uncached bidirectional video (`bidir`); 99 dB = identical.\n\n"
        "## Headline: the largest speed-up each method reaches above a fidelity floor\n\n"
        + curves.headline_table(curve_rows)
        + f"\n## Which cache, which threshold: the presets ({main_steps} steps; toy SkyReels-V2-DF)\n\n"
        + curves.guide_table(curves.guide(curve_rows, main_steps))
        + "\n\nToy MAGI-1:\n\n" + curves.guide_table(curves.magi_guide(magi_rows))
        + f"\n\nFigures: latest.png ({main_steps} steps), curves_psnr_db.png, curves_ssim.png, curves_st_lpips.png, "
          "curves_flicker_ratio.png, curves_steps.png.\n\n## Every curve point (toy SkyReels-V2-DF)\n\n"
        + curves.curve_table(curve_rows)
        + "\n\n## Executor overhead (FlowCache 0.1 runs under cProfile, reusing and predicting, toy SkyReels-V2-DF)\n\n"
        + "\n\n".join(f"{k}:\n\n" + overhead.table(v) for k, v in meta.get("executor_overhead", {}).items())
        + "\n\n## Toy MAGI-1\n\n" + meta.get("magi_job", "") + "\n\n" + magi_table(magi_rows)
        + "\n\n## Tiny random-weights model (numbers only: random weights say nothing about quality)\n\n"
        + "\n".join(random_lines) + "\n" + streaming_table(meta.get("streaming_sampler", [])))
    toy = {m: curves.series_of(curve_rows, m, main_steps) for m in curves.SERIES}
    panels = {f"toy SkyReels-V2-DF, {main_steps} steps": toy}
    if magi_rows:
        panels[meta.get("magi_title", "toy MAGI-1")] = {f"magi_{m}": sorted(
            (r for r in magi_rows if r["method"] in (m, "restructure")), key=lambda r: r["threshold"])
                                                         for m in ("flowcache", "motioncache", "flowcache_predict",
                                                                   "motioncache_predict")}
    plots.measure_figures(panels, out)
    steps_list = sorted({r["steps"] for r in curve_rows})
    plots.steps_figure({s: {m: curves.series_of(curve_rows, m, s) for m in curves.SERIES} for s in steps_list}, out)
    plots.headline_figure(toy, main_steps, out)


def magi_table(rows: list[dict]) -> str:
    if not rows:
        return "(no toy MAGI-1 weights)"
    out = ["| method | threshold | FLOP ratio | wall ratio | PSNR dB | SSIM | ST-LPIPS | flicker ratio | tokens computed |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = r["same"]
        out.append(f"| {r['method']} | {r['threshold']:g} | {r['flops_ratio']:.3f} | {r['wall_ratio']:.3f} | "
                   f"{f['psnr_db']:.2f} | {f['ssim']:.3f} | {f['st_lpips']:.3f} | {f['flicker_ratio'] or 0:.3f} | "
                   f"{r['token_fraction']:.2f} |")
    return "\n".join(out)


def streaming_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "## Streaming sampler (tiny random model, 64x64, decoded and written to mp4 per window)", "",
             "| windows | frames | model calls | wall s | first window s | peak RSS MB | growth during run MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['windows']} | {r['frames']} | {r['model_calls']} | {r['wall_s']:.1f} | {r['ttff_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_growth_mb']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def df_schedule():
    # 8-latent windows with 2 of history, blocks of 2 latent frames starting 2 rows apart: the
    # same shape as SkyReels' 25/5 with blocks of 5, scaled down.
    return ar.DFSchedule(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2,
                         addnoise_condition=20, solver="unipc", fps=0, prefix_mode="latent")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the random-model table")
    ap.add_argument("--steps", default=",".join(str(s) for s in curves.STEPS), help="step counts of the curves")
    ap.add_argument("--headline-steps", type=int, default=30, help="steps of latest.png and the guide (the "
                    "shipped workflows' default)")
    ap.add_argument("--quick", action="store_true", help="a short job (for a smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the numbers in the README use 2)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite latest.md and the figures from the --out folder's latest.json")
    a = ap.parse_args()
    if a.render:
        data = json.loads((Path(a.out) / "latest.json").read_text())
        meta = dict(data["meta"], headline_steps=a.headline_steps)
        write_outputs(data["random_model"], data["curves"], data["magi"], meta, Path(a.out))
        print(f"rewrote {a.out}/latest.md, latest.png and curves_*.png from latest.json")
        return 0
    torch.set_num_threads(a.threads)
    from make_tiny_checkpoints import write_all
    tiny = write_all(str(REPO / "out" / "bench_models"), seed=0)
    windows = 2 if a.quick else 3
    length = 4 * (8 + (windows - 1) * 6 - 1) + 1
    cond = [[torch.zeros(1, 512, 4096), {}]]
    steps_list = [6] if a.quick else [int(s) for s in a.steps.split(",")]
    headline_steps = steps_list[0] if a.quick else a.headline_steps
    if headline_steps not in steps_list:
        ap.error(f"--headline-steps {headline_steps} is not among --steps {a.steps}")

    def job_for(steps, size=128):
        return {"cond": cond, "first_window_frames": 8,
                "video": dict(width=size, height=size, length=length, seed=7, steps=steps, cfg=1.0,
                              schedule=df_schedule())}

    t0 = time.perf_counter()
    stream_rows = bench_streaming(Path(tiny["1.3b"]), Path(tiny["vae"]), REPO / "out")
    for r in stream_rows:
        print(f"streaming {r['windows']:2d} windows: {r['frames']} frames, {r['model_calls']} calls, "
              f"{r['wall_s']:.1f} s, first window {r['ttff_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_growth_mb']:.0f})", flush=True)
    random_rows = bench_model("random", load_unet(Path(tiny["14b"])), job_for(6 if a.quick else 12, 64),
                              1 if a.quick else a.repeats, METHODS[:4] if a.quick else METHODS)
    curve_rows = curves.sweep(load_unet(TOY), job_for, steps_list, log=lambda m: print(m, flush=True),
                              per_method=2 if a.quick else None) if TOY.exists() else []
    over = {}
    if TOY.exists():
        toy = load_unet(TOY)
        for size in ((128,) if a.quick else (128, 192)):
            for method in ("flowcache", "flowcache_predict"):
                key = f"{size}px" + (", predicting" if method.endswith("_predict") else "")
                over[key] = overhead.measure(generate, with_method(toy, method, 0.1), job_for(headline_steps, size))
                print(f"executor overhead, {key}:\n" + overhead.table(over[key]), flush=True)
    import magi as magi_bench                               # bench/magi.py: the caches on the toy MAGI-1
    magi_rows, magi_meta = magi_bench.bench(quick=a.quick) if magi_bench.TOY_MAGI.exists() else ([], {})
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": 1 if a.quick else a.repeats,
            "toy_weights": TOY.exists(), "headline_steps": headline_steps, "steps": steps_list,
            "job": f"Toy SkyReels-V2-DF: {length} frames ({windows} windows of 29 frames, 5 of history), async "
                   f"ar_step 2, blocks of 2 latent frames, {', '.join(map(str, steps_list))} steps, cfg 1, UniPC, "
                   f"128x128, 2 CPU threads; every cache at its node defaults (warm-up 5 / final 1 for FlowCache "
                   f"and TeaCache, warm-up 4 and 6 chunk-wise updates for MotionCache, EasyCache 0.15-0.95), only "
                   f"the threshold varies.",
            "magi_job": magi_meta.get("job", ""), "magi_title": magi_meta.get("title", "toy MAGI-1"),
            "streaming_sampler": stream_rows, "executor_overhead": over, "seconds": round(time.perf_counter() - t0)}
    write_outputs(random_rows, curve_rows, magi_rows, meta, Path(a.out))
    print(f"wrote {a.out}/latest.json, latest.md, latest.png and curves_*.png in {meta['seconds']} s")
    import drift as drift_bench                             # bench/drift.py: long rollouts, drift per method
    drift_bench.bench(quick=a.quick, out=Path(a.out))
    print(f"wrote {a.out}/drift.md, drift.json, drift.png and drift_sheet.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
