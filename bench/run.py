#!/usr/bin/env python3
"""`make bench`: speed vs fidelity of every cache on the same long-video job, in one process.

For each model (the trained toy world model when its weights exist, and a tiny random model in
the SkyReels-V2-DF layout) it generates one asynchronous multi-window video per method and
setting, each right after an uncached run of the same job, so wall-clock ratios come from
interleaved runs on a shared machine. Fidelity (PSNR/SSIM) is measured against the uncached
video in preview RGB (the Wan 2.1 latent -> RGB factors), which is where the toy world lives.

Writes bench/results/latest.json, latest.md and latest.png (speed vs fidelity).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from tools.inprocess import load_comfy, pack  # noqa: E402
from tools.metrics import video_fidelity  # noqa: E402

load_comfy()
import psutil  # noqa: E402
import torch  # noqa: E402

import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode  # noqa: E402

streaming = pack("model_patches.streaming")
ar = pack("model_patches.ar_sampling")
flowcache_patch = pack("model_patches.ar_cache")
policy_mod = pack("cache_core.flowcache_policy")
motion_mod = pack("cache_core.motioncache_policy")
record_mod = pack("cache_core.record")

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
METHODS = [("uncached", None), ("chunk_causal", None),
           *[("flowcache", t) for t in (0.05, 0.1, 0.2, 0.4)],
           *[("flowcache_bidir", t) for t in (0.1, 0.2, 0.4)],
           *[("motioncache", t) for t in (0.1, 0.2, 0.4)],
           *[("motioncache_bidir", t) for t in (0.1, 0.2, 0.4)],
           *[("easycache", t) for t in (0.05, 0.1, 0.2)],
           *[("teacache_window", t) for t in (0.1, 0.2, 0.4)]]


# --- the baseline both papers beat: one TeaCache decision per whole window -----------------------
def window_record_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                          transformer_options={}, **kwargs):
    """Make the whole window one chunk whose local steps are the window's rows."""
    rec = transformer_options.get(record_mod.RECORD_KEY)
    if rec is not None:
        transformer_options = dict(transformer_options)
        transformer_options[record_mod.RECORD_KEY] = dataclasses.replace(rec, chunk_frames=rec.num_frames, steps=rec.rows)
    return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)


def with_method(model, method: str, thr: float | None):
    if method == "uncached":
        return model
    if method == "easycache":
        return EasyCacheNode.execute(model, thr, 0.15, 0.95, False).result[0]
    attention = "bidirectional" if method.endswith("_bidir") else "chunk_causal"
    if method.startswith("motioncache"):      # 12 steps: warm-up and phase 1 scaled down from 50
        cfg = motion_mod.MotionCacheConfig(threshold=thr, warmup_steps=1, phase1_updates=2, coefficients="none")
        return flowcache_patch.apply_motioncache(model, cfg, attention)
    if method == "flowcache_bidir":
        cfg = policy_mod.FlowCacheConfig(rel_l1_thresh=thr, warmup_steps=2, coefficients="none")
        return flowcache_patch.apply_flowcache(model, cfg, attention=attention)
    cfg = policy_mod.FlowCacheConfig(rel_l1_thresh=thr or 0.0, warmup_steps=2 if method != "teacache_window" else 4,
                                     coefficients="none")
    m = flowcache_patch.apply_flowcache(model, cfg, skip=method != "chunk_causal")
    if method == "teacache_window":   # our wrapper must run outside FlowCache's
        dm_type = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
        m.wrappers[dm_type] = {"bench_window": [window_record_wrapper], **m.wrappers[dm_type]}
    return m


# --- measurement -----------------------------------------------------------------------------
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def generate(model, job: dict):
    req = streaming.VideoRequest(positives=[job["cond"]], negative=job["cond"], **job["video"])
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        video, report = streaming.StreamingRun(model, req).run()
        wall = time.perf_counter() - t0
    return video, report, wall, mem.peak / 2**20


def bench_model(name: str, model, job: dict, repeats: int) -> list[dict]:
    rows = []
    ref, ref_report, _, _ = generate(model, job)         # warm-up + the reference video
    causal = None                                         # the chunk-causal run without skipping
    for method, thr in METHODS:
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
            "first_window_s": report["first_window_seconds"], "wall_s": statistics.median(walls),
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
            _, report = streaming.StreamingRun(model, req, sink=lambda f, i: writer.write(f)).run()
            wall = time.perf_counter() - t0
        writer.close()
        rows.append({"windows": windows, "frames": writer.frames, "model_calls": report["model_calls"],
                     "wall_s": wall, "first_window_s": report["first_window_seconds"],
                     "rss_before_mb": rss0, "peak_rss_mb": mem.peak / 2**20, "peak_rss_growth_mb": mem.peak / 2**20 - rss0})
    return rows[1:]


def load_unet(path: Path):
    return comfy.sd.load_diffusion_model(str(path))


def write_outputs(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    cols = ["model", "method", "setting", "flops_ratio", "wall_ratio", "psnr_db", "ssim", "psnr_first_window_db",
            "token_fraction",
            "psnr_vs_chunk_causal_db", "kv_bytes_peak", "peak_rss_mb", "first_window_s"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "latest.md").write_text(
        f"# make bench ({meta['date']})\n\n{meta['job']}\n\nRatios are cached / uncached, wall times interleaved "
        f"in one run (median of {meta['repeats']}). PSNR/SSIM against the uncached video in preview RGB "
        f"(99 dB = identical); "
        f"psnr_first_window_db compares the first window only (later windows continue from slightly different "
        f"history, and an autoregressive rollout amplifies that); psnr_vs_chunk_causal_db isolates FlowCache's "
        f"skipping from the chunk-causal restructuring.\n\n"
        + "\n".join(lines) + "\n" + streaming_table(meta.get("streaming_sampler", [])))
    plot(rows, out / "latest.png")


def streaming_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", "## Streaming sampler (tiny random model, 64x64, decoded and written to mp4 per window)", "",
             "| windows | frames | model calls | wall s | first window s | peak RSS MB | growth during run MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['windows']} | {r['frames']} | {r['model_calls']} | {r['wall_s']:.1f} | {r['first_window_s']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_growth_mb']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Speed (1 / FLOP ratio) against first-window PSNR (identical outputs drawn at 40 dB), one
    colour per method, one panel per model."""
    from PIL import Image, ImageDraw
    colours = {"uncached": (0, 0, 0), "chunk_causal": (120, 120, 120), "flowcache": (220, 40, 40),
               "flowcache_bidir": (240, 150, 40), "motioncache": (150, 40, 200), "motioncache_bidir": (230, 90, 200),
               "easycache": (40, 90, 220), "teacache_window": (40, 160, 60)}
    models = sorted({r["model"] for r in rows})
    W, H, pad = 420, 320, 40
    img = Image.new("RGB", (W * len(models), H + 50), "white")
    d = ImageDraw.Draw(img)
    for i, m in enumerate(models):
        pts = [(1 / r["flops_ratio"], min(r["psnr_first_window_db"], 40.0), r["method"]) for r in rows if r["model"] == m]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs + [1.0]), max(xs) * 1.05, min(ys) - 1, max(ys) + 1
        ox = i * W
        d.rectangle([ox + pad, pad, ox + W - 10, H - pad], outline="black")
        d.text((ox + pad, 10), f"{m}: speed-up (FLOPs) vs first-window PSNR dB", fill="black")
        d.text((ox + pad, H - pad + 5), f"{x0:.2f}x", fill="black")
        d.text((ox + W - 60, H - pad + 5), f"{x1:.2f}x", fill="black")
        d.text((ox + 2, pad), f"{y1:.0f}", fill="black")
        d.text((ox + 2, H - pad - 10), f"{y0:.0f}", fill="black")
        for x, y, meth in pts:
            px = ox + pad + (x - x0) / max(x1 - x0, 1e-9) * (W - pad - 10)
            py = H - pad - (y - y0) / max(y1 - y0, 1e-9) * (H - 2 * pad)
            d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colours[meth])
    for j, (meth, c) in enumerate(colours.items()):
        x, y = 10 + 200 * (j % 4), H + 8 + 18 * (j // 4)
        d.rectangle([x, y + 2, x + 10, y + 12], fill=c)
        d.text((x + 14, y), meth, fill="black")
    img.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a short job (for a smoke run)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from make_tiny_checkpoints import write_all
    tiny = write_all(str(REPO / "out" / "bench_models"), seed=0)
    # 8-latent windows with 2 of history, blocks of 2 latent frames starting 2 rows apart: the
    # same shape as SkyReels' 25/5 with blocks of 5, scaled down.
    sched = ar.DFSchedule(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2,
                          addnoise_condition=20, solver="unipc", fps=0, prefix_mode="latent")
    windows = 2 if a.quick else 4
    length = 4 * (8 + (windows - 1) * 6 - 1) + 1
    steps = 6 if a.quick else 12
    cond = [[torch.zeros(1, 512, 4096), {}]]
    models = [("toy", TOY, 128)] if TOY.exists() else []      # the toy world is 128x128
    models.append(("random", Path(tiny["14b"]), 64))
    stream_rows = bench_streaming(Path(tiny["1.3b"]), Path(tiny["vae"]), REPO / "out")
    for r in stream_rows:
        print(f"streaming {r['windows']:2d} windows: {r['frames']} frames, {r['model_calls']} calls, "
              f"{r['wall_s']:.1f} s, first window {r['first_window_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_growth_mb']:.0f})", flush=True)
    rows = []
    for name, path, size in models:
        job = {"cond": cond, "first_window_frames": 8, "video": dict(width=size, height=size, length=length, seed=7, steps=steps, cfg=1.0,
                                           schedule=sched)}
        rows += bench_model(name, load_unet(path), job, 1 if a.quick else a.repeats)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "repeats": 1 if a.quick else a.repeats,
            "toy_weights": TOY.exists(),
            "job": f"{length} frames ({windows} windows of 29 frames, 5 of history), async ar_step 2, blocks of 2 "
                   f"latent frames, {steps} steps, cfg 1, UniPC; toy 128x128, random 64x64; 2 CPU threads"}
    meta["streaming_sampler"] = stream_rows
    write_outputs(rows, meta, Path(a.out))
    print(f"wrote {a.out}/latest.json, latest.md, latest.png")
    import magi as magi_bench                               # bench/magi.py: the caches on the toy MAGI-1
    if magi_bench.TOY_MAGI.exists():
        magi_bench.write(*magi_bench.bench(quick=a.quick), Path(a.out))
        print(f"wrote {a.out}/magi.json, magi.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
