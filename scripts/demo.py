#!/usr/bin/env python3
"""`make demo`: one long video from the shipped workflows, uncached and cached, side by side.

It boots a private headless ComfyUI (out/demo/), converts workflows/skyreels_df_t2v_long_async.json
(uncached) and the cache's shipped workflow to API prompts, points them at the toy world model
(toy_world/weights/: a small SkyReels-V2-DF-layout model trained on sprites crossing textured
backgrounds, both bidirectional and block-causal) at 192 px, and runs them in the order uncached, cached,
cached, uncached, so machine load hits both alike (each round loads the model under its own file
name, which makes ComfyUI run the whole graph again instead of answering from its cache).

It writes out/demo/demo_side_by_side.mp4 (uncached left, cached right), demo_contact_sheet.png,
both workflows' own mp4s, and prints wall ratio, FLOP ratio and fidelity to the uncached video
(PSNR, SSIM, ST-LPIPS, flicker ratio; tools/metrics.py). The toy world lives in Wan 2.1's latent
preview colours, so frames come from ARCacheLatentPreview instead of a VAE (the real Wan VAE is
250 MB and not downloadable here); it draws one image per latent frame, so the videos play at
fps / 4 to keep their real duration. Without the toy weights it falls back to tiny random weights:
the whole path runs, but the video is noise and the numbers mean nothing.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from make_tiny_checkpoints import write_all  # noqa: E402
from tools.comfy_server import ComfyServer  # noqa: E402
from tools.workflow import retarget, to_api  # noqa: E402

TOY_WEIGHTS = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"
UNCACHED = REPO / "workflows" / "skyreels_df_t2v_long_async.json"
# The cache setting and the scale. At 128 px the toy's calls are so small that Python and
# gather/scatter overhead eat a third of the saving (FlowCache at 0.6 of the FLOPs took 0.75-0.85 of
# the wall time); at 192 px compute dominates and the wall ratio follows the FLOP ratio. On this
# job FlowCache bidirectional at 0.12 with first-order prediction keeps the video (PSNR 35 dB,
# ST-LPIPS 0.01 to the uncached one) at 0.66 of the FLOPs; from 0.15 on the toy's sprites take
# another path (21-22 dB, with or without prediction). README "Predicting skipped steps".
CACHED = REPO / "workflows" / "skyreels_df_t2v_flowcache.json"
CACHE_NODE = "ARCacheFlowCache"
CACHE_SETTINGS = {"preset": "custom", "rel_l1_thresh": 0.12, "attention": "bidirectional", "predict_order": 1,
                  "reuse_thresh": 0.0}
CACHE_LABEL = "FlowCache bidir. 0.12, predicting"
WINDOWS, STEPS, SIZE, FPS = 6, 30, 192, 24    # 6 windows of 29 frames with 5 of history: 149 frames
ORDER = ("uncached", "cached", "cached", "uncached")
SECONDS_PER_WINDOW_STEP = 0.31                 # measured: uncached, 192 px, 2 idle CPU cores


def demo_prompt(workflow: Path, info: dict, unet: str, vae: str, toy: bool, round_: int,
                windows: int = WINDOWS, steps: int = STEPS) -> dict:
    """The shipped workflow as an API prompt for the demo: toy model, preview frames, fps / 4."""
    size = SIZE if toy else 64
    length = 4 * (8 + (windows - 1) * 6 - 1) + 1
    prompt = retarget(to_api(json.loads(workflow.read_text()), info), unet=unet, vae=vae, width=size, height=size,
                      length=length, steps=steps, window_frames=29, overlap_frames=5, seed=3)
    keep = _main_video_path(prompt)
    for nid, node in list(prompt.items()):
        kind, inp = node["class_type"], node["inputs"]
        if kind == "ARCacheComputeHeatmap" or (kind in ("SaveVideo", "CreateVideo") and nid not in keep):
            del prompt[nid]                                # the heatmap branch is not part of the demo
        elif kind == "ARCacheDFSchedule":
            inp.update(causal_block_size=2, ar_step=2, prefix_mode="latent")
        elif kind == CACHE_NODE:
            inp.update(CACHE_SETTINGS)
        elif toy and kind == "VAEDecode":                  # the toy world is drawn in preview colours
            prompt[nid] = {"class_type": "ARCacheLatentPreview",
                           "inputs": {"samples": inp["samples"], "family": "wan21", "upscale": 8}}
        elif toy and kind == "ARCacheStreamingSampler":
            inp.pop("vae", None)
            inp["cfg"] = 1.0                               # the toy world has no text: one pass per step
        elif kind == "SaveVideo":
            inp["filename_prefix"] = f"demo/{workflow.stem}_round{round_}"
        elif kind == "CreateVideo":                        # one image per latent frame: 4 video frames long
            inp["fps"] = FPS / 4 if toy else FPS
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "ARCacheStreamingSampler")
    prompt["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                                   "filename_prefix": f"latents/demo_round{round_}"}}
    return prompt


def _main_video_path(prompt: dict) -> set:
    """The SaveVideo (and its CreateVideo) fed by the sampler's decoded frames, not the heatmap."""
    keep = set()
    for nid, node in prompt.items():
        if node["class_type"] == "SaveVideo":
            src = node["inputs"]["video"][0]
            frames = prompt[src]["inputs"].get("images", [None])[0]
            if frames in prompt and prompt[frames]["class_type"] != "ARCacheComputeHeatmap":
                keep |= {nid, src}
    return keep


def labelled(frames, label: str):
    """frames [T, 3, H, W] in 0..1 -> uint8 [T, H + 24, W, 3] with a caption strip on top."""
    import numpy as np
    from PIL import Image, ImageDraw
    arr = (frames.movedim(1, -1).clamp(0, 1) * 255).round().byte().numpy()
    strip = Image.new("RGB", (arr.shape[2], 24), "white")
    ImageDraw.Draw(strip).text((6, 6), label, fill="black")
    top = np.broadcast_to(np.asarray(strip), (arr.shape[0], 24, arr.shape[2], 3))
    return np.concatenate([top, arr], axis=1)


def write_side_by_side(panels: list, out: Path, fps: float) -> None:
    import av
    import numpy as np
    from fractions import Fraction
    gap = np.full((panels[0].shape[0], panels[0].shape[1], 8, 3), 255, np.uint8)
    joined = np.concatenate([panels[0], gap, panels[1]], axis=2)
    with av.open(str(out), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        s.height, s.width = joined.shape[1] // 2 * 2, joined.shape[2] // 2 * 2
        s.pix_fmt = "yuv420p"
        for f in joined:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[:s.height, :s.width]), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_contact_sheet(panels: list, out: Path, columns: int = 10) -> None:
    """Every k-th frame of each video in one row per video (uncached on top); the first column
    keeps the video's caption, the others say which image they are."""
    import numpy as np
    from PIL import Image, ImageDraw
    n = panels[0].shape[0]
    picks = [round(i * (n - 1) / (columns - 1)) for i in range(columns)]
    rows = []
    for p in panels:
        cells = []
        for j, i in enumerate(picks):
            cell = Image.fromarray(np.ascontiguousarray(p[i]))
            if j:
                draw = ImageDraw.Draw(cell)
                draw.rectangle([0, 0, cell.width, 23], fill="white")
                draw.text((6, 6), f"image {i + 1}/{n}", fill="black")
            cells.append(np.asarray(cell))
        rows.append(np.concatenate(cells, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(out)


def expected_seconds(kind: str, measured_uncached: float | None) -> float:
    base = measured_uncached or SECONDS_PER_WINDOW_STEP * WINDOWS * STEPS
    return base * (0.66 if kind == "cached" else 1.0)


def main() -> int:
    import safetensors.torch
    t_start = time.perf_counter()
    out = REPO / "out" / "demo"
    shutil.rmtree(out / "comfy", ignore_errors=True)
    toy = TOY_WEIGHTS.exists()
    models = write_all(str(out / "models"), seed=0)
    source = Path(TOY_WEIGHTS if toy else models["1.3b"])
    server = ComfyServer(out / "comfy").prepare()
    unets = {}
    for r in (1, 2):                                      # same weights, two names: each round runs in full
        copy = out / "models" / f"{source.stem}_round{r}.safetensors"
        shutil.copy2(source, copy)
        unets[r] = server.add_model(copy, "diffusion_models")
    server.add_model(models["vae"], "vae")
    workflows = {"uncached": UNCACHED, "cached": CACHED}
    runs: dict = {"uncached": [], "cached": []}
    print(f"make demo: {WINDOWS * 24 + 5}-frame video, {SIZE if toy else 64}px, {STEPS} steps, uncached and "
          f"{CACHE_LABEL}, run {' / '.join(ORDER)}; expect about "
          f"{sum(expected_seconds(k, None) for k in ORDER) / 60 + 0.3:.1f} min on 2 idle cores", flush=True)
    with server:
        info = server.object_info()
        print(f"  ComfyUI up after {time.perf_counter() - t_start:.0f} s", flush=True)
        counts = {"uncached": 0, "cached": 0}
        for i, kind in enumerate(ORDER):
            counts[kind] += 1
            r = counts[kind]
            prompt = demo_prompt(workflows[kind], info, unets[r], Path(models["vae"]).name, toy, r)
            measured = runs["uncached"][0]["report"]["seconds"] if runs["uncached"] else None
            print(f"  [{i + 1}/{len(ORDER)}] {kind:8s} (expect ~{expected_seconds(kind, measured):.0f} s) ...",
                  end="", flush=True)
            entry = server.run(prompt, timeout=1800)
            report = next(json.loads(v["text"][0]) for v in entry["outputs"].values() if "text" in v)
            latent = safetensors.torch.load_file(str(server.output_path(
                entry["outputs"]["latent_out"]["latents"][0])))["latent_tensor"]
            save = next(k for k, v in prompt.items() if v["class_type"] == "SaveVideo")
            video = out / f"demo_{kind}.mp4"
            shutil.copy2(server.output_path(entry["outputs"][save]["images"][0]), video)
            runs[kind].append({"report": report, "latent": latent, "video": video})
            print(f" {report['seconds']:.1f} s", flush=True)

    from tools.inprocess import load_comfy
    load_comfy(cpu=True)
    from tools.metrics import PSNR_CAP_DB, fidelity, preview_frames
    u, c = runs["uncached"], runs["cached"]
    repeatable = all(r[0]["latent"].equal(r[1]["latent"]) for r in (u, c))
    ref, cached = preview_frames(u[0]["latent"]), preview_frames(c[0]["latent"])
    fid = fidelity(cached, ref)
    wall_u, wall_c = (sum(r["report"]["seconds"] for r in runs[k]) for k in ("uncached", "cached"))
    flops = c[0]["report"]["transformer_flops"] / u[0]["report"]["transformer_flops"]
    panels = [labelled(ref, "uncached"), labelled(cached, CACHE_LABEL)]
    fps = FPS / 4                                         # one preview image per latent frame
    write_side_by_side(panels, out / "demo_side_by_side.mp4", fps)
    write_contact_sheet(panels, out / "demo_contact_sheet.png")

    base = u[0]["report"]
    print(f"\nmodel: {source.name} ({'toy world' if toy else 'tiny random weights: expect noise'}); "
          f"{base['windows']} windows, {base['latent_frames']} latent frames, {ref.shape[0]} images at {fps:g} fps "
          f"({ref.shape[0] / fps:.1f} s of video)\n")
    print("| run | wall s (2 runs) | wall vs uncached | transformer FLOPs vs uncached | PSNR dB | SSIM | ST-LPIPS | "
          "flicker ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| uncached | {wall_u:.1f} | 1.000 | 1.000 | reference | reference | reference | reference |")
    psnr = "identical" if fid["psnr_db"] == PSNR_CAP_DB else f"{fid['psnr_db']:.2f}"
    print(f"| {CACHE_LABEL} | {wall_c:.1f} | {wall_c / wall_u:.3f} | {flops:.3f} | {psnr} | {fid['ssim']:.3f} | "
          f"{fid['st_lpips']:.3f} | {fid['flicker_ratio'] or 0:.3f} |")
    print(f"\n{'cached run faster' if wall_c < wall_u else 'CACHED RUN NOT FASTER'} in wall time "
          f"({wall_u / wall_c:.2f}x, runs interleaved {' / '.join(ORDER)}); both rounds "
          f"{'bit-identical' if repeatable else 'DIFFERED'} per setting.")
    print(f"side by side: {out / 'demo_side_by_side.mp4'}\ncontact sheet: {out / 'demo_contact_sheet.png'}\n"
          f"workflow videos: {u[0]['video']}\n                 {c[0]['video']}\n"
          f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
