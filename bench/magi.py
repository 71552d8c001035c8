#!/usr/bin/env python3
"""FlowCache and MotionCache on the toy MAGI-1, beside uncached, in one interleaved run.

    .host/venv/bin/python bench/magi.py [--quick]      (make bench runs it too)

The toy MAGI-1 (toy_world/weights/toy_magi1.safetensors, toy_world/train_magi.py) is a 4-layer
MAGI-layout DiT trained on toy-world videos with MAGI's chunk-wise objective and no text (its
caption is the null caption, both adaLN rows equal). It runs as a base model with text and
history scale 1, so each step needs one guidance pass (the others have weight 0).

Per setting: FLOP ratio (transformer FLOPs of the run / the uncached run's), wall ratio (medians,
uncached and cached runs interleaved), PSNR and SSIM of the cached video against the uncached one
in the toy's preview RGB (toy_world.scenes.latents_to_rgb), and the fraction of tokens computed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.inprocess import load_comfy, pack  # noqa: E402

TOY_MAGI = REPO / "toy_world" / "weights" / "toy_magi1.safetensors"
PSNR_CAP_DB = 99.0

# (method, threshold): the references' MAGI thresholds (0.01-0.015) and looser ones for the toy's
# larger step-to-step changes at 16 steps.
SETTINGS = [("restructure", None), ("flowcache", 0.02), ("flowcache", 0.05), ("flowcache", 0.1),
            ("motioncache", 0.02), ("motioncache", 0.05), ("motioncache", 0.1)]


def fidelity(video: torch.Tensor, ref: torch.Tensor, scale: float) -> tuple[float, float]:
    """(PSNR dB, SSIM) of raw MAGI latents, compared in the toy's preview RGB."""
    import kornia
    to_rgb = pack_module("toy_world.scenes").latents_to_rgb
    a = to_rgb(video * scale).float().div(255)[0].movedim(-1, 1)     # [T, 3, H, W]
    b = to_rgb(ref * scale).float().div(255)[0].movedim(-1, 1)
    mse = torch.mean((a - b) ** 2).item()
    psnr = PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * torch.log10(torch.tensor(1.0 / mse)).item())
    return psnr, kornia.metrics.ssim(a, b, window_size=5).mean().item()


def pack_module(name: str):
    import importlib
    return importlib.import_module(name)


def patched(model, method: str, thr):
    arc, fc, mc = pack("model_patches.ar_cache"), pack("cache_core.flowcache_policy"), pack("cache_core.motioncache_policy")
    if method == "uncached":
        return model
    if method == "restructure":
        return arc.apply_flowcache(model, fc.FlowCacheConfig(rel_l1_thresh=0.0, warmup_steps=2, coefficients="none"),
                                   skip=False)
    if method == "flowcache":
        return arc.apply_flowcache(model, fc.FlowCacheConfig(rel_l1_thresh=thr, warmup_steps=2, coefficients="none"))
    return arc.apply_motioncache(model, mc.MotionCacheConfig(threshold=thr, warmup_steps=2, phase1_updates=2, vote=0.0,
                                                             min_update_ratio=0.0, motion_source="latents",
                                                             coefficients="none"))


def run_once(model, job: dict):
    streaming, sampling = pack("model_patches.streaming"), pack("model_patches.magi_sampling")
    req = streaming.VideoRequest(positives=[job["cond"]], negative=job["cond"], **job["video"])
    t0 = time.perf_counter()
    video, report = sampling.MagiRun(model, req).run()
    return video, report, time.perf_counter() - t0


def bench(repeats: int = 2, quick: bool = False, weights: Path = TOY_MAGI) -> tuple[list[dict], dict]:
    load_comfy()
    torch.set_num_threads(2)
    loader, sched = pack("model_patches.magi_loader"), pack("cache_core.magi_schedule")
    model = loader.load_magi_model(str(weights), distill="base", dtype=torch.float32)
    dm = model.model.diffusion_model
    null = dm.null_text("cpu")
    chunks = 3 if quick else 4
    steps = 8 if quick else 16
    schedule = sched.MagiSchedule(history_scale=1.0, kv_range=(5, 4, 3, 2))
    job = {"cond": [[null[None], {"magi_special_tokens": None}]],
           "video": dict(width=128, height=128, length=24 * chunks, seed=11, steps=steps, cfg=1.0, schedule=schedule)}
    scale = model.model.latent_format.scale_factor
    ref, ref_report, _ = run_once(model, job)                    # warm-up, and the reference video
    rows = []
    for method, thr in SETTINGS:
        m = patched(model, method, thr)
        base_walls, walls = [], []
        for _ in range(1 if quick else repeats):                 # interleaved: uncached, cached, ...
            _, _, w0 = run_once(model, job)
            video, report, w1 = run_once(m, job)
            base_walls.append(w0)
            walls.append(w1)
        psnr, ssim = fidelity(video, ref, scale)
        cache = report["cache"] or {}
        rows.append({"model": "toy_magi1", "method": method, "setting": "-" if thr is None else thr,
                     "flops_ratio": report["transformer_flops"] / ref_report["transformer_flops"],
                     "wall_ratio": statistics.median(walls) / statistics.median(base_walls),
                     "psnr_db": psnr, "ssim": ssim,
                     "token_fraction_computed": cache.get("token_fraction_computed", 1.0)})
        r = rows[-1]
        print(f"toy_magi1 {method:12s} {str(r['setting']):5s} flops {r['flops_ratio']:.3f} wall {r['wall_ratio']:.3f} "
              f"psnr {psnr:6.2f} ssim {ssim:.3f} tokens {r['token_fraction_computed']:.2f}", flush=True)
    meta = {"job": f"toy MAGI-1, 128x128, {chunks} chunks of 24 frames, {steps} steps, window 4, kv_range 5,4,3,2, "
                   f"base passes with text and history scale 1, 2 CPU threads", "repeats": 1 if quick else repeats}
    return rows, meta


def table(rows: list[dict]) -> str:
    out = ["| model | method | threshold | FLOP ratio | wall ratio | PSNR dB | SSIM | tokens computed |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['method']} | {r['setting']} | {r['flops_ratio']:.3f} | {r['wall_ratio']:.3f} | "
                   f"{r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['token_fraction_computed']:.2f} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--weights", default=str(TOY_MAGI))
    a = ap.parse_args()
    write(*bench(quick=a.quick, weights=Path(a.weights)), Path(a.out))
    return 0


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "magi.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (out / "magi.md").write_text(f"{meta['job']}; {meta['repeats']} interleaved repeat(s).\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
