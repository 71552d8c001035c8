#!/usr/bin/env python3
"""`make demo`: run a shipped workflow headless, end to end, and print the video's path.

It boots a private ComfyUI (out/demo/), writes the models it needs itself, converts
workflows/skyreels_df_t2v_long_async.json to an API prompt, points it at those models, shrinks
it to CPU size and runs it. The model is the trained toy world model when its weights are in
the repo (toy_world/weights/), otherwise tiny random weights (noise, but the whole path runs).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_tiny_checkpoints import write_all  # noqa: E402
from tools.comfy_server import ComfyServer  # noqa: E402
from tools.workflow import retarget, to_api  # noqa: E402

WORKFLOW = REPO / "workflows" / "skyreels_df_t2v_long_async.json"
TOY_WEIGHTS = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"


def main() -> int:
    out = REPO / "out" / "demo"
    shutil.rmtree(out / "comfy", ignore_errors=True)
    models = write_all(str(out / "models"), seed=0)
    unet = Path(TOY_WEIGHTS if TOY_WEIGHTS.exists() else models["1.3b"])
    server = ComfyServer(out / "comfy").prepare()
    server.add_model(unet, "diffusion_models")
    server.add_model(models["vae"], "vae")
    with server:
        prompt = retarget(to_api(json.loads(WORKFLOW.read_text()), server.object_info()),
                          unet=unet.name, vae=Path(models["vae"]).name, length=33, steps=4, seed=1)
        entry = server.run(prompt, timeout=1200)
        save = next(k for k, v in prompt.items() if v["class_type"] == "SaveVideo")
        video = server.output_path(entry["outputs"][save]["images"][0])
        report = next(json.loads(v["text"][0]) for v in entry["outputs"].values() if "text" in v)
    final = out / "arcache_demo.mp4"
    shutil.copy2(video, final)
    print(f"model: {unet.name}  windows: {report['windows']}  model calls: {report['model_calls']}  "
          f"time: {report['seconds']:.1f} s")
    print(f"video: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
