#!/usr/bin/env python3
"""Fingerprints of the caches' outputs, to prove a refactor changed nothing.

Runs a fixed set of jobs in one process (the bench job, shortened, on the toy model and the
tiny random model; FlowCache chunk-causal, skipping, compression, batched CFG; a plain
KSampler run through a cache) and writes, per job, the SHA-256 of the output latent's bytes and
the report's numbers. Run it before and after a change and compare:

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

streaming = pack("model_patches.streaming")
ar = pack("model_patches.ar_sampling")
flowcache_patch = pack("model_patches.ar_cache")
FlowCacheConfig = pack("cache_core.flowcache_policy").FlowCacheConfig

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
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
}


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def cached(model, name):
    spec = CACHES[name]
    if spec is None:
        return model
    kw, skip = spec
    return flowcache_patch.apply_flowcache(model, FlowCacheConfig(**kw), skip=skip)


def sampler_job(model, size, cfg, schedule, length, steps):
    cond = [[torch.zeros(1, 512, 4096), {}]]
    neg = [[torch.full((1, 512, 4096), 0.1), {}]]
    req = streaming.VideoRequest(width=size, height=size, length=length, seed=7, steps=steps, cfg=cfg,
                                 schedule=ar.DFSchedule(**schedule), positives=[cond], negative=neg)
    video, report = streaming.StreamingRun(model, req).run()
    numbers = {k: v for k, v in report.items() if isinstance(v, (int, float)) and k not in ("seconds", "first_window_seconds")}
    cache = {k: v for k, v in (report["cache"] or {}).items() if isinstance(v, (int, float, str))}
    return {"latent": digest(video), "report": numbers, "cache": cache}


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
