#!/usr/bin/env python3
"""`make demo`: a long video from a shipped workflow, uncached and with FlowCache, headless.

It boots a private ComfyUI (out/demo/), writes the models it needs itself, converts
workflows/skyreels_df_t2v_long_async.json and workflows/skyreels_df_t2v_flowcache.json to API
prompts, points them at local models, shrinks them to CPU size and runs both. It writes both
videos, a side-by-side, and prints a table of wall time, transformer FLOPs and fidelity to the
uncached video.

The model is the toy world model (toy_world/weights/) when its weights are in the repo: a tiny
SkyReels-V2-DF-layout model trained on sprites moving over textured backgrounds. Its world lives
in Wan 2.1's latent preview colours, so frames are made with ARCacheLatentPreview instead of a
VAE (the real Wan VAE is 250 MB and not downloadable here). Without the toy weights it falls back
to tiny random weights: the whole path runs, but the video is noise.
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

WORKFLOWS = {"uncached": REPO / "workflows" / "skyreels_df_t2v_long_async.json",
             "flowcache": REPO / "workflows" / "skyreels_df_t2v_flowcache.json"}
TOY_WEIGHTS = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
WINDOWS = 8


def demo_prompt(workflow: Path, info: dict, unet: str, vae: str, toy: bool) -> dict:
    size = 128 if toy else 64
    length = 4 * (8 + (WINDOWS - 1) * 6 - 1) + 1           # 8 windows of 29 frames, 5 of history
    prompt = retarget(to_api(json.loads(workflow.read_text()), info), unet=unet, vae=vae, width=size, height=size,
                      length=length, steps=12, window_frames=29, overlap_frames=5, seed=3)
    for nid, node in list(prompt.items()):
        kind, inp = node["class_type"], node["inputs"]
        if kind == "ARCacheDFSchedule":
            inp.update(causal_block_size=2, ar_step=2, prefix_mode="latent")
        if kind == "ARCacheFlowCache":
            inp.update(rel_l1_thresh=0.1, warmup_steps=2)
        if toy and kind == "VAEDecode":                  # the toy world is drawn in preview colours
            prompt[nid] = {"class_type": "ARCacheLatentPreview",
                           "inputs": {"samples": inp["samples"], "family": "wan21", "upscale": 8}}
        if toy and kind == "ARCacheStreamingSampler":
            inp.pop("vae", None)
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "ARCacheStreamingSampler")
    prompt["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                                   "filename_prefix": "latents/demo"}}
    return prompt


def read_frames(path: Path):
    import av
    import numpy as np
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def write_side_by_side(videos: list[Path], out: Path, fps: int = 24) -> None:
    import av
    import numpy as np
    frames = [read_frames(v) for v in videos]
    n = min(len(f) for f in frames)
    joined = np.concatenate([f[:n] for f in frames], axis=2)
    with av.open(str(out), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.height, s.width = joined.shape[1] // 2 * 2, joined.shape[2] // 2 * 2
        s.pix_fmt = "yuv420p"
        for f in joined:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:s.height, :s.width]), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def main() -> int:
    import safetensors.torch
    from tools.inprocess import load_comfy
    out = REPO / "out" / "demo"
    shutil.rmtree(out / "comfy", ignore_errors=True)
    models = write_all(str(out / "models"), seed=0)
    toy = TOY_WEIGHTS.exists()
    unet = Path(TOY_WEIGHTS if toy else models["1.3b"])
    server = ComfyServer(out / "comfy").prepare()
    server.add_model(unet, "diffusion_models")
    server.add_model(models["vae"], "vae")
    results = {}
    with server:
        info = server.object_info()
        for name, wf in WORKFLOWS.items():
            prompt = demo_prompt(wf, info, unet.name, Path(models["vae"]).name, toy)
            entry = server.run(prompt, timeout=1800)
            save = next(k for k, v in prompt.items() if v["class_type"] == "SaveVideo")
            video = out / f"demo_{name}.mp4"
            shutil.copy2(server.output_path(entry["outputs"][save]["images"][0]), video)
            latent = safetensors.torch.load_file(str(server.output_path(
                entry["outputs"]["latent_out"]["latents"][0])))["latent_tensor"]
            report = next(json.loads(v["text"][0]) for v in entry["outputs"].values() if "text" in v)
            results[name] = (video, latent, report)
    write_side_by_side([results["uncached"][0], results["flowcache"][0]], out / "demo_side_by_side.mp4")

    load_comfy(cpu=True)
    from tools.metrics import PSNR_CAP_DB, video_fidelity
    ref = results["uncached"][1]
    base = results["uncached"][2]
    print(f"\nmodel: {unet.name} ({'toy world' if toy else 'tiny random weights: expect noise'}); "
          f"{base['windows']} windows, {base['latent_frames']} latent frames\n")
    print("| run | wall s | first window s | transformer PFLOP | FLOPs vs uncached | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|---|")
    for name, (video, latent, r) in results.items():
        psnr, ssim = video_fidelity(latent, ref)
        fid = "reference | reference" if psnr == PSNR_CAP_DB else f"{psnr:.2f} | {ssim:.3f}"
        print(f"| {name} | {r['seconds']:.1f} | {r['first_window_seconds']:.1f} | {r['transformer_flops'] / 1e15:.4f} | "
              f"{r['transformer_flops'] / base['transformer_flops']:.3f} | {fid} |")
    print(f"\nvideos: {results['uncached'][0]}\n        {results['flowcache'][0]}\n"
          f"side by side: {out / 'demo_side_by_side.mp4'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
