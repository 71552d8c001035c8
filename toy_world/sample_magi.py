"""Roll out the toy MAGI-1 chunk by chunk and write a contact sheet (CPU, about a minute).

    .host/venv/bin/python -m toy_world.sample_magi --weights toy_world/weights/toy_magi1.safetensors \
        --out toy_world/weights/toy_magi1_rollout.png

The weights are loaded the way ComfyUI loads them (`model_patches/magi_loader.load_magi_model`:
strict key check, a ComfyUI BaseModel on comfy.ops), and the loop is the pack's MAGI-1 window
sampler (`model_patches/magi_sampling.MagiRun.run`, base branch) restated without the node
plumbing: `cache_core.magi_schedule.plan_steps` / `time_grid` / `first_key_chunk` /
`cached_chunks_needed`, window 4, kv_range (5, 4, 3, 2), shift 3, Euler x += v (t_next - t); a
finished chunk is re-run at clean_t = 0.9999 attending to itself only at the next stage's first
step, and its K/V go into the pack's K/V store (`magi_model.kv_store`). Text: the null caption on every chunk (the pass
MagiRun calls "history"; null_row=True, which the trainer made equal to row -2). With
--history-scale s != 1 the history-free pass (each chunk alone) is run too while a chunk's
t < 0.3, and v = C + s (B - C), MagiRun's base-model guidance with text scale 0.
A continuation row starts from a ground-truth prefix chunk written into the K/V cache first
(MagiRun's v2v path, whole prefix chunks).

Contact sheet (--out): blocks side by side, separated by a grey bar; inside a block a row is a
chunk (oldest at the top) and the columns are its latent frames, each latent pixel drawn as a
--scale x --scale block of its toy-world preview colour (scenes.latents_to_rgb); a dimmed row is
given (prefix), not generated. The block order and per-block metrics go to a json beside the PNG
(same stem): sprite_px (share of sprite-coloured pixels; data about 0.1-0.2, about 0 when the
video dissolves), bg_flicker (temporal std of never-sprite pixels; 0 in the data), and
within / seam (mean absolute change between consecutive frames inside chunks / across chunk
boundaries; in the data they are equal, a seam much larger than within means chunks do not join).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from tools.inprocess import load_comfy, pack  # noqa: E402

load_comfy(cpu=True)
magi = pack("model_patches.magi_model")
magi_loader = pack("model_patches.magi_loader")
ms = pack("cache_core.magi_schedule")
from toy_world import scenes  # noqa: E402
from toy_world.sample_check import clip_metrics, grid, write_png  # noqa: E402


def load(path: str, direct: bool = False):
    """The DiT module: through ComfyUI's loader path (default) or built directly (--direct)."""
    if direct:
        sd = magi_loader.read_state_dict(path)
        cfg = magi_loader.check_magi(sd)
        import comfy.ops
        dm = magi.MagiDiT(config=cfg, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
        dm.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        return dm.eval()
    patcher = magi_loader.load_magi_model(path, dtype=torch.float32)
    return patcher.model.diffusion_model.eval()


@torch.no_grad()
def rollout(dm, num_chunks: int, cw: int, steps: int = 16, seed: int = 0, prefix: torch.Tensor | None = None,
            history_scale: float = 1.0, sch: "ms.MagiSchedule | None" = None, size=(16, 16)) -> dict:
    """-> {"video": latents [1, 16, num_chunks*cw, H, W], "prefix_chunks", "forwards", "seconds"}."""
    sch = sch or ms.MagiSchedule(chunk_width=cw)
    cfg = dm.config
    dev = torch.device("cpu")
    P = 0 if prefix is None else prefix.shape[2]
    assert P % cw == 0, "whole prefix chunks only"
    pc = P // cw
    S, W = steps, sch.window_size
    plan = ms.plan_steps(num_chunks, pc, W, S)
    tgrid = ms.time_grid(S, sch.shift).tolist()
    cache = magi.kv_store(cfg, num_chunks, cw * (size[0] // 2) * (size[1] // 2),
                          keep=ms.cached_chunks_needed(plan, S, sch.kv_range))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((1, cfg.latent_channels, num_chunks * cw, *size), generator=gen)
    null = dm.null_text(dev)
    n_fwd = 0
    t0 = time.perf_counter()

    def forward(x_in, call):
        nonlocal n_fwd
        n_fwd += 1
        return dm.forward_chunks(x_in.float(), call, cache).float()

    if pc:
        x[:, :, :P] = prefix
        forward(prefix, magi.ChunkForward(start=0, t=[sch.clean_t] * pc, texts=[null] * pc, first=list(range(pc)),
                                       null_row=True, write=tuple(range(pc))))
    for step in plan:
        lo = step.start if step.refresh is None else step.refresh
        x_in = x[:, :, lo * cw: step.end * cw].clone()
        t_call = ([sch.clean_t] if step.refresh is not None else []) + [tgrid[j] for j in step.step_of]
        steps_call = ([S] if step.refresh is not None else []) + list(step.step_of)
        chunks = list(range(lo, step.end))
        first = [ms.first_key_chunk(c, j, S, sch.kv_range) for c, j in zip(chunks, steps_call)]
        write = (step.refresh,) if step.refresh is not None else ()
        off = 1 if step.refresh is not None else 0
        a = off * cw
        v = forward(x_in, magi.ChunkForward(lo, t_call, [null] * len(chunks), first, null_row=True, write=write))[:, :, a:]
        scales = [history_scale if t < sch.guidance_until - 1e-7 else 1.0 for t in t_call[off:]]
        if any(s != 1.0 for s in scales):
            n = len(step.step_of)
            C = forward(x_in[:, :, a:], magi.ChunkForward(step.start, t_call[off:], [null] * n,
                                                       list(range(step.start, step.end)), null_row=True))
            v = torch.cat([C[:, :, i * cw:(i + 1) * cw] + s * (v - C)[:, :, i * cw:(i + 1) * cw]
                           for i, s in enumerate(scales)], dim=2)
        dts = torch.tensor([tgrid[j + 1] - tgrid[j] for j in step.step_of], dtype=torch.float32)
        x[:, :, step.start * cw: step.end * cw] = x_in[:, :, a:] + v * dts.repeat_interleave(cw).view(1, 1, -1, 1, 1)
    return {"video": x, "prefix_chunks": pc, "forwards": n_fwd, "seconds": round(time.perf_counter() - t0, 2)}


def pack_sampler_check(weights: str, ours: torch.Tensor, cw: int, steps: int, seed: int, history_scale: float) -> dict:
    """The same rollout through the pack's own MagiRun (ComfyUI model, text scale 0, null text):
    the toy loop above must give the same latents (MagiRun returns raw latents, x / 0.18215)."""
    sampling = pack("model_patches.magi_sampling")
    streaming = pack("model_patches.video_run")
    text = pack("model_patches.magi_text")
    patcher = magi_loader.load_magi_model(weights, dtype=torch.float32)
    c = patcher.model.diffusion_model.config.caption_channels
    special = {"hq": torch.zeros(c), "duration": torch.zeros(8, c)}
    positive = [[torch.zeros(1, 4, c), {text.SPECIAL_KEY: special}]]
    T = ours.shape[2]
    req = streaming.VideoRequest(width=8 * ours.shape[-1], height=8 * ours.shape[-2], length=4 * T, seed=seed,
                                 steps=steps, cfg=0.0, schedule=ms.MagiSchedule(chunk_width=cw, history_scale=history_scale),
                                 positives=[positive], negative=None)
    video, report = pack("model_patches.families").new_video_run(patcher, req).run()
    theirs = patcher.model.latent_format.process_in(video.float())
    diff = (theirs - ours).abs().max().item()
    return {"max_abs_diff": diff, "ok": diff < 1e-4, "chunk_width": cw, "steps": steps, "seed": seed,
            "history_scale": history_scale, "passes_run": report["passes_run"], "model_calls": report["model_calls"]}


def video_metrics(z: torch.Tensor, cw: int, skip_chunks: int = 0) -> dict:
    """Per-chunk clip metrics and the within-chunk vs chunk-seam frame change (preview RGB)."""
    per_chunk = [clip_metrics(z[:, :, c * cw:(c + 1) * cw]) for c in range(skip_chunks, z.shape[2] // cw)]
    rgb = scenes.latent_map().project(z[0].movedim(0, -1).float())            # [T, H, W, 3]
    d = (rgb[1:] - rgb[:-1]).abs().mean((1, 2, 3))                             # change from frame i to i+1
    idx = torch.arange(d.shape[0])
    seam_mask = (idx + 1) % cw == 0
    keep = idx >= max(0, skip_chunks * cw - 1)
    within = d[~seam_mask & keep]
    seam = d[seam_mask & keep]
    return {"sprite_px": [m["sprite_px"] for m in per_chunk], "bg_flicker": [m["bg_flicker"] for m in per_chunk],
            "within": round(within.mean().item(), 4) if within.numel() else None,
            "seam": round(seam.mean().item(), 4) if seam.numel() else None}


def block(z: torch.Tensor, cw: int, scale: int, dim_chunks: int = 0) -> torch.Tensor:
    """Latents [1, 16, N*cw, H, W] -> uint8 image, one row per chunk."""
    rgb = scenes.latents_to_rgb(z[0])                                          # [T, H, W, 3]
    rows = [rgb[c * cw:(c + 1) * cw] for c in range(z.shape[2] // cw)]
    return grid(rows, scale=scale, pad=2, dim_cols=[cw if c < dim_chunks else 0 for c in range(len(rows))])


def hconcat(images: list, gap: int = 8) -> torch.Tensor:
    h = max(im.shape[0] for im in images)
    parts = []
    for i, im in enumerate(images):
        if im.shape[0] < h:
            im = torch.cat([im, torch.full((h - im.shape[0], im.shape[1], 3), 96, dtype=torch.uint8)], 0)
        parts.append(im)
        if i < len(images) - 1:
            parts.append(torch.full((h, gap, 3), 200, dtype=torch.uint8))
    return torch.cat(parts, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=os.path.join(REPO, "toy_world/weights/toy_magi1.safetensors"))
    ap.add_argument("--out", default=os.path.join(REPO, "toy_world/weights/toy_magi1_rollout.png"))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16, help="per chunk (multiple of 4)")
    ap.add_argument("--seeds", default="0,1", help="seeds of the plain text-free rollouts")
    ap.add_argument("--widths", default="6,3", help="chunk widths to roll out")
    ap.add_argument("--history-scale", type=float, default=1.5,
                    help="extra cw-6 rollout (first seed) with MagiRun's history guidance (1: skip)")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--direct", action="store_true", help="build the DiT directly instead of ComfyUI's loader")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-pack-check", action="store_true",
                    help="skip re-running the history-guided rollout through the pack's MagiRun")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    dm = load(a.weights, a.direct)
    seeds = [int(s) for s in a.seeds.split(",")]
    widths = [int(w) for w in a.widths.split(",")]
    blocks, layout = [], []

    # ground truth for reference (one clip of the widest chunking), also the continuation's prefix
    cw0 = widths[0]
    g = torch.Generator().manual_seed(4242)
    data = scenes.make_latents(1, a.chunks * cw0, g)
    blocks.append(block(data, cw0, a.scale))
    layout.append({"block": "data (ground truth clip)", "chunk_width": cw0, **video_metrics(data, cw0)})

    pack_check = None

    def add(name, cw, **kw):
        nonlocal pack_check
        r = rollout(dm, a.chunks, cw, a.steps, **kw)
        if kw.get("history_scale", 1.0) != 1.0 and not a.no_pack_check and pack_check is None:
            pack_check = pack_sampler_check(a.weights, r["video"], cw, a.steps, kw["seed"], kw["history_scale"])
            print(f"[sample_magi] pack MagiRun check: {pack_check}", flush=True)
        pc = r["prefix_chunks"]
        blocks.append(block(r["video"], cw, a.scale, dim_chunks=pc))
        layout.append({"block": name, "chunk_width": cw, "forwards": r["forwards"], "seconds": r["seconds"],
                       **video_metrics(r["video"], cw, skip_chunks=pc)})
        print(f"[sample_magi] {name}: {r['forwards']} forwards, {r['seconds']}s, {layout[-1]}", flush=True)

    for cw in widths:
        for s in seeds:
            add(f"t2v cw{cw} seed {s}", cw, seed=s)
        if cw == cw0:
            if a.history_scale != 1.0:
                add(f"t2v cw{cw} seed {seeds[0]} history_scale {a.history_scale}", cw, seed=seeds[0],
                    history_scale=a.history_scale)
            add(f"continuation cw{cw} of the data clip's first chunk (dimmed) seed {seeds[0]}", cw, seed=seeds[0],
                prefix=data[:, :, :cw])
    img = hconcat(blocks)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_png(a.out, img)
    info = {"weights": os.path.relpath(os.path.abspath(a.weights), REPO), "png": os.path.relpath(os.path.abspath(a.out), REPO),
            "command": "python -m toy_world.sample_magi " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
            "steps": a.steps, "chunks": a.chunks, "schedule": "window 4, kv_range (5,4,3,2), shift 3, clean_t 0.9999",
            "loaded_with": "direct MagiDiT" if a.direct else "magi_loader.load_magi_model (ComfyUI model)",
            "layout": "blocks left to right as listed; rows = chunks (top = first), columns = latent frames; "
                      "dimmed rows are a given prefix",
            "image_px": [int(img.shape[1]), int(img.shape[0])], "pack_sampler_check": pack_check, "blocks": layout,
            "seconds": round(time.time() - t_start, 1)}
    with open(os.path.splitext(a.out)[0] + ".json", "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"[sample_magi] wrote {a.out} ({img.shape[1]}x{img.shape[0]}) in {info['seconds']}s", flush=True)
    return info


if __name__ == "__main__":
    main()
