#!/usr/bin/env python3
"""Fingerprints of the caches' outputs, to prove a refactor changed nothing.

Runs a fixed set of jobs in one process and writes, per job, the SHA-256 of the output latent's
bytes, of the compute heatmap, and the report's numbers:
- SkyReels-V2-DF (the toy model and the tiny random model): uncached, FlowCache chunk-causal and
  bidirectional, skipping, compression, MotionCache in both attention modes, cfg 1 and batched
  CFG, sync and async, and a plain KSampler run through a cache;
- MAGI-1 (the tiny random 4.5B-layout checkpoint, base and distilled, and the toy MAGI-1):
  uncached, the restructuring alone, FlowCache, MotionCache, compression over the full history,
  K/V on the CPU, image-to-video and video-to-video. Run it before and after a change and compare:

    .host/venv/bin/python bench/fingerprint.py --out /tmp/before.json
    ... change ...
    .host/venv/bin/python bench/fingerprint.py --out /tmp/after.json --compare /tmp/before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from tools.inprocess import load_comfy, pack  # noqa: E402

load_comfy()
import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

streaming = pack("model_patches.video_run")
ar = pack("model_patches.df_sampling")
flowcache_patch = pack("model_patches.ar_cache")
FlowCacheConfig = pack("cache_core.flowcache_policy").FlowCacheConfig
MotionCacheConfig = pack("cache_core.motioncache_policy").MotionCacheConfig
MagiSchedule = pack("cache_core.magi_schedule").MagiSchedule

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
TOY_MAGI = REPO / "toy_world" / "weights" / "toy_magi1.safetensors"
ASYNC = dict(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2, addnoise_condition=20,
             solver="unipc", fps=0, prefix_mode="latent")
CACHES = {
    "uncached": None,
    "chunk_causal": (dict(rel_l1_thresh=0.0, warmup_steps=2, coefficients="none"), False),
    "flowcache_0.1": (dict(rel_l1_thresh=0.1, warmup_steps=2, coefficients="none"), True),
    "flowcache_0.4": (dict(rel_l1_thresh=0.4, warmup_steps=2, coefficients="none"), True),
    "flowcache_auto_coeffs": (dict(rel_l1_thresh=0.2, warmup_steps=1), True),
    "flowcache_compress": (dict(rel_l1_thresh=0.2, warmup_steps=2, coefficients="none", kv_compress=True,
                                kv_budget_chunks=1, max_score_queries=32), True),
    "flowcache_bidirectional": (dict(rel_l1_thresh=0.2, warmup_steps=2, coefficients="none"), True, "bidirectional"),
    "motioncache_0.1": (dict(threshold=0.1, warmup_steps=1, phase1_updates=1, vote=0.0, min_update_ratio=0.0,
                             coefficients="none"), "motion"),
    "motioncache_bidirectional": (dict(threshold=0.1, warmup_steps=1, phase1_updates=1, vote=0.0,
                                       min_update_ratio=0.0, coefficients="none"), "motion", "bidirectional"),
}
MAGI_CACHES = ["uncached", "chunk_causal", "flowcache_0.1", "flowcache_0.4", "motioncache_0.1"]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def cached(model, name, extra=None):
    spec = CACHES[name]
    if spec is None:
        return model
    kw, skip, attention = (*spec, "chunk_causal")[:3]
    kw = dict(kw, **(extra or {}))
    if skip == "motion":
        return flowcache_patch.apply_motioncache(model, MotionCacheConfig(**kw), attention=attention)
    return flowcache_patch.apply_flowcache(model, FlowCacheConfig(**kw), skip=skip, attention=attention)


TIMES = ("seconds", "ttff_s", "ttff_queue_s", "stream_seconds", "sustained_fps", "realtime_factor", "startup_delay_s")


def numbers(report: dict) -> dict:
    """The report's deterministic fields (times left out), nested dicts and lists included."""
    def keep(v):
        if isinstance(v, dict):
            return {k: keep(x) for k, x in v.items() if k not in TIMES}
        return v
    out = {k: keep(v) for k, v in report.items() if k not in TIMES
           and isinstance(v, (int, float, str, list, dict, type(None)))}
    if "emissions" in out:              # [piece, first frame, frames, seconds]: the seconds vary
        out["emissions"] = [e[:3] for e in out["emissions"]]
    return out


def run_video(model, req):
    """(video, report, heat) of one Streaming AR Sampler run, whichever family."""
    run = pack("model_patches.families").new_video_run(model, req)
    video, report = run.run()
    return video, report, run.heat


def sampler_job(model, size, cfg, schedule, length, steps):
    cond = [[torch.zeros(1, 512, 4096), {}]]
    neg = [[torch.full((1, 512, 4096), 0.1), {}]]
    req = streaming.VideoRequest(width=size, height=size, length=length, seed=7, steps=steps, cfg=cfg,
                                 schedule=ar.DFSchedule(**schedule), positives=[cond], negative=neg)
    video, report, heat = run_video(model, req)
    return {"latent": digest(video), "heat": None if heat is None else digest(heat), "report": numbers(report)}


def magi_job(model, size, length, steps, cfg, schedule=None, vae=None, start_image=None, prefix_latent=None,
             special=None, seed=5):
    g = torch.Generator().manual_seed(1)
    dm = model.model.diffusion_model
    caption = torch.randn(7, dm.config.caption_channels, generator=g)
    cond = [[caption[None], {"magi_special_tokens": special}]]
    req = streaming.VideoRequest(width=size, height=size, length=length, seed=seed, steps=steps, cfg=cfg,
                                 schedule=schedule or MagiSchedule(), positives=[cond], negative=cond, vae=vae,
                                 start_image=start_image, prefix_latent=prefix_latent)
    video, report, heat = run_video(model, req)
    return {"latent": digest(video), "heat": None if heat is None else digest(heat), "report": numbers(report)}


def magi_jobs(tiny: dict) -> dict:
    loader = pack("model_patches.magi_loader")
    magi_vae = pack("model_patches.magi_vae")
    import safetensors.torch
    from pathlib import Path as P
    special = {"hq": torch.randn(32, generator=torch.Generator().manual_seed(2)),
               "duration": torch.randn(8, 32, generator=torch.Generator().manual_seed(3))}
    vae_sd = safetensors.torch.load_file(tiny["magi_vae"])
    vae_cfg = json.loads((P(tiny["magi_vae"]).parent / "config.json").read_text())
    vae = magi_vae.load_magi_vae(vae_sd, vae_cfg, device=torch.device("cpu"), dtype=torch.float32)
    index = next(P(tiny["magi_4.5b"]).parent.glob("*.json")) if P(tiny["magi_4.5b"]).is_dir() else tiny["magi_4.5b"]
    out = {}
    for variant in ("base", "distill"):
        model = loader.load_magi_model(str(index), distill=variant, dtype=torch.float32)
        steps = 8 if variant == "base" else 8
        for cname in MAGI_CACHES:
            m = cached(model, cname)
            out[f"magi_{variant}/{cname}"] = magi_job(m, 64, 72, steps, 7.5, special=special)
            print(f"magi_{variant}", cname, out[f"magi_{variant}/{cname}"]["latent"], flush=True)
        full = MagiSchedule(kv_range=())
        for cname in ("uncached", "flowcache_compress"):
            m = cached(model, cname, {"kv_budget_chunks": 1} if cname != "uncached" else None)
            out[f"magi_{variant}/{cname}/full_history"] = magi_job(m, 64, 96, 8, 7.5, full, special=special)
        cpu = MagiSchedule(kv_on_cpu=True)
        for cname in ("uncached", "flowcache_0.1"):
            out[f"magi_{variant}/{cname}/kv_on_cpu"] = magi_job(cached(model, cname), 64, 72, 8, 7.5, cpu,
                                                               special=special)
        if variant == "base":
            image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
            prefix = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(5))
            for cname in ("uncached", "flowcache_0.1", "motioncache_0.1"):
                out[f"magi_base/{cname}/i2v"] = magi_job(cached(model, cname), 64, 72, 8, 7.5, vae=vae,
                                                         start_image=image, special=special)
                out[f"magi_base/{cname}/v2v"] = magi_job(cached(model, cname), 64, 72, 8, 7.5, vae=vae,
                                                         prefix_latent=prefix, special=special)
    if TOY_MAGI.exists():
        model = loader.load_magi_model(str(TOY_MAGI), distill="base", dtype=torch.float32)
        sch = MagiSchedule(history_scale=1.0)
        for cname in ("uncached", "flowcache_0.1", "motioncache_0.1"):
            dm = model.model.diffusion_model
            null = dm.null_text("cpu")
            cond = [[null[None], {"magi_special_tokens": None}]]
            req = streaming.VideoRequest(width=128, height=128, length=72, seed=11, steps=16, cfg=1.0, schedule=sch,
                                         positives=[cond], negative=cond)
            video, report, heat = run_video(cached(model, cname), req)
            out[f"toy_magi/{cname}"] = {"latent": digest(video), "heat": None if heat is None else digest(heat),
                                        "report": numbers(report)}
            print("toy_magi", cname, out[f"toy_magi/{cname}"]["latent"], flush=True)
    return out


def ksampler_job(model):
    """A plain KSampler through the cache: no record, every chunk active."""
    latent = torch.zeros(1, 16, 6, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    cond = [[torch.zeros(1, 512, 4096), {}]]
    neg = [[torch.full((1, 512, 4096), 0.1), {}]]
    out = comfy.sample.sample(model, noise, 6, 2.0, "euler", "simple", cond, neg, latent, seed=3, disable_pbar=True)
    return {"latent": digest(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="an earlier fingerprint file: exit 1 unless every entry is equal")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from make_tiny_checkpoints import write_all
    tiny = write_all(str(REPO / "out" / "fingerprint_models"), seed=0)
    models = {"random14b": comfy.sd.load_diffusion_model(tiny["14b"])}
    if TOY.exists():
        models["toy"] = comfy.sd.load_diffusion_model(str(TOY))
    result = {}
    for mname, model in models.items():
        size = 128 if mname == "toy" else 64
        for cname in CACHES:
            m = cached(model, cname)
            result[f"{mname}/{cname}/async_cfg1"] = sampler_job(m, size, 1.0, ASYNC, 53, 6)
            if mname == "random14b":
                result[f"{mname}/{cname}/async_cfg2"] = sampler_job(m, size, 2.0, ASYNC, 53, 6)
                sync = dict(ASYNC, ar_step=0, causal_block_size=1, addnoise_condition=0)
                result[f"{mname}/{cname}/sync_cfg2"] = sampler_job(m, size, 2.0, sync, 29, 4)
                result[f"{mname}/{cname}/ksampler_cfg2"] = ksampler_job(m)
            print(mname, cname, result[f"{mname}/{cname}/async_cfg1"]["latent"], flush=True)
    result.update(magi_jobs(tiny))
    Path(a.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out}: {len(result)} jobs")
    if a.compare:
        before = json.loads(Path(a.compare).read_text())
        diff = [k for k in sorted(set(before) | set(result)) if before.get(k) != result.get(k)]
        for k in diff:
            print(f"DIFFERS {k}:\n  before {before.get(k)}\n  after  {result.get(k)}")
        print("identical" if not diff else f"{len(diff)} of {len(result)} jobs differ")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
