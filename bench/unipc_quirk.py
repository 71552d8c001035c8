#!/usr/bin/env python3
"""Textbook UniPC or SkyReels-V2's aliased one? A measurement on the toy world model.

SkyReels-V2 hands each frame's UniPC scheduler a view of its latents and overwrites it, so at a
frame's first corrector step the "previous sample" is the current one (cache_core.frame_solver,
`upstream_exact`). This runs the same synchronous toy-world window with both solvers at several
step counts and compares each with a 200-step Euler solution of the same flow ODE (the "truth"),
in preview RGB. Writes bench/results/unipc_quirk.json.

    .host/venv/bin/python bench/unipc_quirk.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.inprocess import load_comfy, pack  # noqa: E402
from tools.metrics import video_fidelity  # noqa: E402

load_comfy()
import torch  # noqa: E402

import comfy.sd  # noqa: E402

streaming = pack("model_patches.video_run")
ar = pack("model_patches.df_sampling")
TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"


def window(model, solver: str, steps: int, seed: int) -> torch.Tensor:
    sched = ar.DFSchedule(window_frames=29, overlap_frames=0, ar_step=0, causal_block_size=1, solver=solver,
                          fps=0, prefix_mode="latent")
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = streaming.VideoRequest(width=128, height=128, length=29, seed=seed, steps=steps, cfg=1.0,
                                 schedule=sched, positives=[cond], negative=cond)
    return pack("model_patches.families").new_video_run(model, req).run()[0]


def main() -> int:
    torch.set_num_threads(2)
    model = comfy.sd.load_diffusion_model(str(TOY))
    rows = []
    for seed in (1, 2):
        truth = window(model, "euler", 200, seed)
        for steps in (10, 20, 30):
            out = {s: window(model, s, steps, seed) for s in ("unipc", "unipc_upstream")}
            row = {"seed": seed, "steps": steps,
                   "psnr_vs_truth_db": {s: video_fidelity(v, truth)[0] for s, v in out.items()},
                   "psnr_between_db": video_fidelity(out["unipc"], out["unipc_upstream"])[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": "toy world (toy_world_df.safetensors)",
              "job": "one synchronous 29-frame window (8 latent), 128x128, cfg 1; truth: Euler, 200 steps",
              "rows": rows}
    out = REPO / "bench" / "results" / "unipc_quirk.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
