#!/usr/bin/env python3
"""Drift over long rollouts on the toy models: does caching make a long video degrade faster, and
does the Drift Anchor hold it?

    .host/venv/bin/python bench/drift.py [--quick]        (make bench runs it too)

Toy SkyReels-V2-DF: 20 windows (8 latent frames, 2 of history: 6 new each, async, blocks of 2),
20 steps, 128x128, cfg 1; toy MAGI-1: 20 chunks, 16 steps, history and text scale 1. Per method:
the drift measures of cache_core/drift.py on the displayed frames (the toy's preview RGB, one
image per latent frame), segment by segment (a window's new frames, a chunk): first-vs-last
drift of each measure, the histogram distance of the last segment to the first, the seam ratio,
and the FLOP ratio to uncached. Every number is deterministic (no wall time), so a rerun of the
same commit gives the same table. Writes bench/results/drift.{json,md,png} and drift_sheet.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from tools.inprocess import load_comfy, pack  # noqa: E402

load_comfy()
from tools.metrics import preview_frames  # noqa: E402

drift = pack("cache_core.drift")
TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
TOY_MAGI = REPO / "toy_world" / "weights" / "toy_magi1.safetensors"
MEASURES = ("brightness", "saturation", "contrast", "sharpness", "flicker")
ANCHOR = 0.5


def df_methods():
    """(label, patch, anchor strength): the presets a user picks (balanced) and the papers' setting."""
    presets = pack("model_patches.presets").VALUES
    ar_cache, fc, mc = pack("model_patches.ar_cache"), pack("cache_core.flowcache_policy"), pack("cache_core.motioncache_policy")
    f = presets["flowcache"]["raw"]["balanced"]
    m_ = presets["motioncache"]["raw"]["balanced"]

    def flow(s):
        return lambda m: ar_cache.apply_flowcache(m, fc.FlowCacheConfig(
            rel_l1_thresh=s.threshold, coefficients="none", predict_order=s.predict_order, reuse_thresh=s.reuse_thresh),
            attention=s.attention)

    def motion(s):
        return lambda m: ar_cache.apply_motioncache(m, mc.MotionCacheConfig(
            threshold=s.threshold, coefficients="none", predict_order=s.predict_order, reuse_thresh=s.reuse_thresh),
            s.attention)
    papers = type(f)(0.1, "chunk_causal")
    return [("uncached", None, 0.0), (f"FlowCache balanced ({label(f)})", flow(f), 0.0),
            (f"MotionCache balanced ({label(m_)})", motion(m_), 0.0),
            ("FlowCache chunk_causal 0.1 (papers')", flow(papers), 0.0),
            (f"uncached + anchor {ANCHOR:g}", None, ANCHOR),
            (f"FlowCache balanced + anchor {ANCHOR:g}", flow(f), ANCHOR)]


def label(setting) -> str:
    """A preset's setting in a row label: attention, threshold and, where it predicts, its order."""
    return f"{setting.attention} {setting.threshold:g}" + (f", predicting {setting.predict_order}"
                                                           if setting.predict_order else "")


def magi_methods():
    presets = pack("model_patches.presets").VALUES
    ar_cache, fc, mc = pack("model_patches.ar_cache"), pack("cache_core.flowcache_policy"), pack("cache_core.motioncache_policy")
    f = presets["flowcache"]["magi"]["quality"]
    m_ = presets["motioncache"]["magi"]["quality"]
    flow = lambda m: ar_cache.apply_flowcache(m, fc.FlowCacheConfig(  # noqa: E731
        rel_l1_thresh=f.threshold, warmup_steps=2, coefficients="none", predict_order=f.predict_order,
        reuse_thresh=f.reuse_thresh))
    motion = lambda m: ar_cache.apply_motioncache(m, mc.MotionCacheConfig(  # noqa: E731
        threshold=m_.threshold, warmup_steps=2, phase1_updates=2, vote=0.0, min_update_ratio=0.0, motion_source="latents",
        coefficients="none", predict_order=m_.predict_order, reuse_thresh=m_.reuse_thresh))
    return [("uncached", None, 0.0), (f"FlowCache quality ({label(f)})", flow, 0.0),
            (f"MotionCache quality ({label(m_)})", motion, 0.0), (f"uncached + anchor {ANCHOR:g}", None, ANCHOR)]


def measure(frames: torch.Tensor, bounds: list[int]) -> dict:
    """Drift of displayed frames [N, 3, H, W] cut at `bounds` (segment sizes)."""
    meter, at = drift.DriftMeter(), 0
    for n in bounds:
        meter.add(frames[at:at + n])
        at += n
    return meter.summary()


def rollout(model, req_fields: dict, cond, anchor: float):
    video_run = pack("model_patches.video_run")
    req = video_run.VideoRequest(positives=[cond], negative=cond, **req_fields,
                                 anchor=drift.DriftAnchor(anchor) if anchor else None)
    return pack("model_patches.families").new_video_run(model, req).run()


def bench_df(quick: bool) -> dict:
    import comfy.sd
    df = pack("cache_core.df_schedule")
    model = comfy.sd.load_diffusion_model(str(TOY))
    windows = 4 if quick else 20
    length = 4 * (8 + (windows - 1) * 6 - 1) + 1
    schedule = df.DFSchedule(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2,
                             addnoise_condition=20, solver="unipc", fps=0, prefix_mode="latent")
    fields = dict(width=128, height=128, length=length, seed=7, steps=6 if quick else 20, cfg=1.0, schedule=schedule)
    cond = [[torch.zeros(1, 512, 4096), {}]]
    bounds = [8] + [6] * (windows - 1)
    rows = []
    for label, patch, anchor in df_methods():
        video, report = rollout(patch(model) if patch else model, fields, cond, anchor)
        frames = preview_frames(video)
        rows.append({"method": label, "flops": report["transformer_flops"], "drift": measure(frames, bounds),
                     "frames": frames})
        print(f"toy SkyReels {label:44s} {summary_line(rows[-1])}", flush=True)
    return {"job": f"toy SkyReels-V2-DF, {windows} windows ({length} frames), {fields['steps']} steps, 128x128",
            "rows": rows}


def bench_magi(quick: bool) -> dict:
    loader, sched = pack("model_patches.magi_loader"), pack("cache_core.magi_schedule")
    sys.path.insert(0, str(REPO / "bench"))
    from magi import magi_frames
    model = loader.load_magi_model(str(TOY_MAGI), distill="base", dtype=torch.float32)
    null = model.model.diffusion_model.null_text("cpu")
    cond = [[null[None], {"magi_special_tokens": None}]]
    chunks = 4 if quick else 20
    fields = dict(width=128, height=128, length=24 * chunks, seed=11, steps=8 if quick else 16, cfg=1.0,
                  schedule=sched.MagiSchedule(history_scale=1.0, kv_range=(5, 4, 3, 2)))
    scale = model.model.latent_format.scale_factor
    rows = []
    for label, patch, anchor in magi_methods():
        video, report = rollout(patch(model) if patch else model, fields, cond, anchor)
        frames = magi_frames(video, scale)
        rows.append({"method": label, "flops": report["transformer_flops"], "drift": measure(frames, [6] * chunks),
                     "frames": frames})
        print(f"toy MAGI-1   {label:44s} {summary_line(rows[-1])}", flush=True)
    return {"job": f"toy MAGI-1, {chunks} chunks of 24 frames, {fields['steps']} steps, 128x128", "rows": rows}


def summary_line(r: dict) -> str:
    d = r["drift"]
    return (" ".join(f"{k} {d['drift'][k]:+.4f}" for k in MEASURES)
            + f" hist {d['drift']['histogram_distance']:.3f} seam {d['seam_ratio']:.2f}")


def table(part: dict) -> str:
    base = part["rows"][0]["flops"]
    head = ["method", "FLOP ratio"] + [f"{k} drift" for k in MEASURES] + ["histogram distance last/first", "seam ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in part["rows"]:
        d = r["drift"]
        lines.append("| " + " | ".join([r["method"], f"{r['flops'] / base:.3f}"]
                                       + [f"{d['drift'][k]:+.4f}" for k in MEASURES]
                                       + [f"{d['drift']['histogram_distance']:.3f}", f"{d['seam_ratio']:.2f}"]) + " |")
    return "\n".join(lines)


def figure(parts: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ("histogram_distance", "saturation", "sharpness", "brightness")
    fig, axes = plt.subplots(len(parts), len(keys), figsize=(4.2 * len(keys), 3.4 * len(parts)), squeeze=False)
    for i, (name, part) in enumerate(parts.items()):
        for j, k in enumerate(keys):
            ax = axes[i][j]
            for r in part["rows"]:
                ax.plot([s[k] for s in r["drift"]["segments"]], label=r["method"], linewidth=1.4)
            ax.set_title(f"{name}: {k.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("segment (window / chunk)", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[i][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def sheet(parts: dict, out: Path, columns: int = 8) -> None:
    """First frame of evenly spaced segments, one row per method (uncached on top), per model."""
    import numpy as np
    from PIL import Image, ImageDraw
    rows = []
    for name, part in parts.items():
        for r in part["rows"]:
            f = (r["frames"].clamp(0, 1) * 255).byte().movedim(1, -1).numpy()
            picks = [round(i * (len(f) - 1) / (columns - 1)) for i in range(columns)]
            row = Image.fromarray(np.concatenate([f[i] for i in picks], axis=1))
            ImageDraw.Draw(row).rectangle([0, 0, row.width, 14], fill="white")
            ImageDraw.Draw(row).text((4, 2), f"{name}: {r['method']}", fill="black")
            rows.append(np.asarray(row))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)


def bench(quick: bool = False, out: Path = REPO / "bench" / "results") -> dict:
    parts = {}
    if TOY.exists():
        parts["toy SkyReels-V2-DF"] = bench_df(quick)
    if TOY_MAGI.exists():
        parts["toy MAGI-1"] = bench_magi(quick)
    out.mkdir(parents=True, exist_ok=True)
    figure(parts, out / "drift.png")
    sheet(parts, out / "drift_sheet.png")
    for part in parts.values():
        for r in part["rows"]:
            r.pop("frames")
    (out / "drift.json").write_text(json.dumps(parts, indent=1) + "\n")
    md = ["# Drift over long rollouts (bench/drift.py)\n",
          "Drift = last segment minus first (segments: a window's new frames, a chunk), on the displayed frames "
          "(preview RGB, one image per latent frame); histogram distance = total variation of the last segment's "
          "colour histogram to the first's (0 = same colours); seam ratio = frame change across segment seams / "
          "frame change inside segments (1 = seams like any frame step). FLOP ratio to the uncached run; no wall "
          "times, so a rerun gives the same table. Figures: drift.png (each measure per segment), drift_sheet.png.\n"]
    for name, part in parts.items():
        md += [f"## {name}\n", part["job"] + "\n", table(part) + "\n"]
    (out / "drift.md").write_text("\n".join(md))
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    bench(a.quick, Path(a.out))
    print(f"wrote {a.out}/drift.md, drift.json, drift.png, drift_sheet.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
