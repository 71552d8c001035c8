#!/usr/bin/env python3
"""FlowCache and MotionCache on the toy MAGI-1, beside uncached, in one interleaved run.

    .host/venv/bin/python bench/magi.py [--quick]      (make bench runs it too)

The toy MAGI-1 (toy_world/weights/toy_magi1.safetensors, toy_world/train_magi.py) is a 4-layer
MAGI-layout DiT trained on toy-world videos with MAGI's chunk-wise objective and no text (its
caption is the null caption, both adaLN rows equal). It runs as a base model with text and
history scale 1, so each step needs one guidance pass (the others have weight 0).

Per setting: FLOP ratio (transformer FLOPs of the run / the uncached run's), wall ratio (uncached
runs interleaved through the sequence), PSNR, SSIM, ST-LPIPS and flicker ratio of the cached video
against the uncached one (tools/metrics.py) in the toy's preview RGB
(toy_world.scenes.latents_to_rgb, 8x), and the fraction of tokens computed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.inprocess import load_comfy, pack  # noqa: E402
sys.path.insert(0, str(REPO / "bench"))
from curves import interleaved, predict_order  # noqa: E402
from tools.metrics import DISPLAY_SCALE, fidelity  # noqa: E402

TOY_MAGI = REPO / "toy_world" / "weights" / "toy_magi1.safetensors"

# (method, threshold): the references' MAGI thresholds (0.01-0.015) and looser ones for the toy's
# larger step-to-step changes at 16 steps; "restructure" is FlowCache's chunk-wise run without
# skipping, the threshold-0 point of both curves.
SETTINGS = [("restructure", None), *[("flowcache", t) for t in (0.01, 0.02, 0.05, 0.1, 0.2)],
            *[("motioncache", t) for t in (0.01, 0.02, 0.05, 0.1, 0.2)],
            *[("flowcache_predict", t) for t in (0.05, 0.1, 0.2)], *[("motioncache_predict", t) for t in (0.05, 0.1, 0.2)]]


def magi_frames(video: torch.Tensor, scale: float) -> torch.Tensor:
    """Raw toy MAGI latents -> displayed frames [T, 3, 8h, 8w] in 0..1 (the toy's preview RGB)."""
    from toy_world.scenes import latents_to_rgb
    rgb = latents_to_rgb(video * scale).float().div(255)[0].movedim(-1, 1)
    return torch.nn.functional.interpolate(rgb, scale_factor=DISPLAY_SCALE, mode="nearest")


def patched(model, method: str, thr):
    arc, fc, mc = pack("model_patches.ar_cache"), pack("cache_core.flowcache_policy"), pack("cache_core.motioncache_policy")
    if method == "uncached":
        return model
    if method == "restructure":
        return arc.apply_flowcache(model, fc.FlowCacheConfig(rel_l1_thresh=0.0, warmup_steps=2, coefficients="none"),
                                   skip=False)
    order = predict_order(method)
    if method.startswith("flowcache"):
        return arc.apply_flowcache(model, fc.FlowCacheConfig(rel_l1_thresh=thr, warmup_steps=2, coefficients="none",
                                                             predict_order=order))
    return arc.apply_motioncache(model, mc.MotionCacheConfig(threshold=thr, warmup_steps=2, phase1_updates=2, vote=0.0,
                                                             min_update_ratio=0.0, motion_source="latents",
                                                             coefficients="none", predict_order=order))


def run_once(model, job: dict):
    streaming, sampling = pack("model_patches.video_run"), pack("model_patches.magi_sampling")
    req = streaming.VideoRequest(positives=[job["cond"]], negative=job["cond"], **job["video"])
    t0 = time.perf_counter()
    video, report = pack("model_patches.families").new_video_run(model, req).run()
    return video, report, time.perf_counter() - t0


def bench(quick: bool = False, weights: Path = TOY_MAGI) -> tuple[list[dict], dict]:
    """Every setting once, uncached runs interleaved (bench/curves.py `interleaved`)."""
    load_comfy()
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
    run_once(model, job)                                          # warm-up
    ref, ref_report, w = run_once(model, job)
    ref_frames = magi_frames(ref, scale)
    settings = SETTINGS[:2] + SETTINGS[6:7] if quick else SETTINGS

    def run_cached(setting):
        video, report, wall = run_once(patched(model, *setting), job)
        return (report, magi_frames(video, scale)), wall

    done, _ = interleaved(settings, run_cached, lambda: run_once(model, job)[2], w)
    rows = []
    for (method, thr), (report, frames), wall, bracket in done:
        base = sum(bracket) / len(bracket)
        cache = report["cache"] or {}
        same = fidelity(frames, ref_frames)
        rows.append({"model": "toy_magi1", "method": method, "threshold": 0.0 if thr is None else thr,
                     "flops_ratio": report["transformer_flops"] / ref_report["transformer_flops"],
                     "wall_ratio": wall / base, "same": same,
                     "token_fraction": cache.get("token_fraction_computed", 1.0)})
        r = rows[-1]
        print(f"toy_magi1 {method:12s} {r['threshold']:<5g} flops {r['flops_ratio']:.3f} wall {r['wall_ratio']:.3f} "
              f"psnr {same['psnr_db']:6.2f} ssim {same['ssim']:.3f} lpips {same['st_lpips']:.3f} "
              f"tokens {r['token_fraction']:.2f}", flush=True)
    meta = {"job": f"toy MAGI-1, 128x128, {chunks} chunks of 24 frames, {steps} steps, window 4, kv_range 5,4,3,2, "
                   f"base passes with text and history scale 1, 2 CPU threads; fidelity against the uncached run "
                   f"(MAGI-1 has one attention mode)", "title": f"toy MAGI-1, {steps} steps"}
    return rows, meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--weights", default=str(TOY_MAGI))
    a = ap.parse_args()
    torch.set_num_threads(2)
    rows, meta = bench(quick=a.quick, weights=Path(a.weights))
    print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
