"""Look at a toy-world checkpoint: 20-step sync Euler samples, an asynchronous diffusion-forcing
window, and an N-window asynchronous long video with clean (or lightly noised) history frames.

    python -m toy_world.sample_check --weights toy_world/weights/toy_world_df.safetensors --out-dir /tmp/tw

Writes (under --out-dir): data.png (ground-truth clips for reference; --skip-data), sync.png, async.png,
long.png (one row per window: history frames dimmed, then the new frames), long.gif (needs
Pillow; skipped otherwise) and metrics.json.  Rows of a PNG are samples, columns latent frames,
each latent pixel drawn as a `--scale` x `--scale` block of its ComfyUI preview colour.

The sampler is deliberately plain and self-contained (no ComfyUI):
  * sigmas = shift*u / (1 + (shift-1)*u) on u = linspace(1, 0, steps+1): ComfyUI's `simple`
    schedule for a flow model with that shift; Euler x += (s_next - s) * v;
  * async: blocks of `block` frames; block b runs its own 20-step schedule starting `ar_step`
    model calls after block b-1 (SkyReels-V2 ar_step); waiting blocks sit at sigma 1, finished
    ones at 0, history frames at `hist_sigma` (0 = clean); one model call per row with
    per-frame timesteps [B, F].
Metrics (preview RGB units in [-1, 1]): sprite_px = share of pixels within 0.3 of a palette
colour (sprites: ~0.1-0.2 in the data; drops to ~0 when the video dissolves), bg_flicker =
median temporal std of non-sprite pixels within a window (0 in the data), latent_std.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy_world import scenes  # noqa: E402
from toy_world.model import load_toy_wan, tensor_bytes  # noqa: E402


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def flow_sigmas(steps=20, shift=8.0):
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).float()


def model_timesteps(sigma_frames, integer=False):
    """What the transformer is shown: ComfyUI's 1000*sigma, or SkyReels-V2's whole numbers
    (int64 truncation of 1000*sigma; give float64 sigmas so 0.02 -> 20, not 19)."""
    t = sigma_frames.double() * 1000.0
    return (torch.floor(t) if integer else t).float()


@torch.inference_mode()
def velocity(model, x, sigma_frames, integer_timesteps=False):
    """sigma_frames [B, F] -> v [B, 16, F, H, W] (zero text context)."""
    return model(x, model_timesteps(sigma_frames, integer_timesteps)).float()


@torch.inference_mode()
def sample_sync(model, noise, steps=20, shift=8.0, callback=None):
    sig = flow_sigmas(steps, shift)
    x = noise.clone()
    B, _, F = x.shape[:3]
    for i in range(steps):
        v = velocity(model, x, sig[i].expand(B, F))
        if callback is not None:
            callback(i, x, v, sig[i].expand(B, F))
        x = x + (sig[i + 1] - sig[i]) * v
    return x


@torch.inference_mode()
def sample_async(model, noise, history=None, block=2, ar_step=4, steps=20, shift=8.0, hist_sigma=0.0, gen=None,
                 callback=None, sigmas=None, integer_timesteps=False):
    """Diffusion-forcing rollout of noise.shape[2] new frames after optional history frames.
    sigmas: a template of steps+1 sigmas instead of flow_sigmas(steps, shift); integer_timesteps:
    show the model SkyReels-V2's whole-number timesteps. Returns (new frames [B, 16, Fn, H, W],
    number of model calls)."""
    sig = flow_sigmas(steps, shift) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    B, C, Fn, H, W = noise.shape
    h = 0 if history is None else history.shape[2]
    if h:
        hist = history
        if hist_sigma > 0:
            eps = torch.randn(history.shape, generator=gen, dtype=history.dtype)
            hist = (1 - hist_sigma) * history + hist_sigma * eps
        x = torch.cat([hist, noise], 2)
    else:
        x = noise.clone()
    nb = -(-Fn // block)
    blk = torch.arange(Fn) // block
    rows = steps + (nb - 1) * ar_step
    for r in range(rows):
        idx = (r - blk * ar_step).clamp(0, steps)          # step index of every new frame before this row
        nxt = (r + 1 - blk * ar_step).clamp(0, steps)
        s_now = torch.cat([torch.full((h,), float(hist_sigma), dtype=sig.dtype), sig[idx]])
        s_next = torch.cat([torch.full((h,), float(hist_sigma), dtype=sig.dtype), sig[nxt]])
        v = velocity(model, x, s_now.expand(B, -1), integer_timesteps)
        if callback is not None:
            callback(r, x, v, s_now.expand(B, -1))
        x = x + (s_next - s_now).float().view(1, 1, -1, 1, 1) * v
    return x[:, :, h:], rows


@torch.inference_mode()
def long_video(model, B, frames=12, hist=4, windows=8, gen=None, size=(16, 16), **kw):
    """windows x async DF; every window after the first keeps the last `hist` frames as history."""
    H, W = size
    first = torch.randn(B, 16, frames, H, W, generator=gen)
    video, _ = sample_async(model, first, gen=gen, **kw)
    spans = [(0, frames)]
    for _ in range(windows - 1):
        noise = torch.randn(B, 16, frames - hist, H, W, generator=gen)
        new, _ = sample_async(model, noise, history=video[:, :, -hist:], gen=gen, **kw)
        spans.append((video.shape[2] - hist, video.shape[2] + new.shape[2]))
        video = torch.cat([video, new], 2)
    return video, spans


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def clip_metrics(z):
    """z [B, 16, F, H, W] processed latents -> dict of simple quality numbers."""
    rgb = scenes.latent_map().project(z.movedim(1, -1).float())  # [B, F, H, W, 3]
    pal = torch.tensor(scenes.PALETTE)
    dist = (rgb[..., None, :] - pal).norm(dim=-1).amin(-1)  # [B, F, H, W]
    sprite = dist < 0.3
    bg = ~(sprite.any(1))  # never sprite-coloured in the window
    std = rgb.std(1).mean(-1)  # [B, H, W]
    flick = std[bg].median().item() if bg.any() else float("nan")
    return {"sprite_px": round(sprite.float().mean().item(), 4), "bg_flicker": round(flick, 4),
            "latent_std": round(z.std().item(), 3)}


# ---------------------------------------------------------------------------------------------
# images (PNG without dependencies; GIF through Pillow when present)
# ---------------------------------------------------------------------------------------------
def write_png(path, img):
    """img uint8 tensor [H, W, 3]"""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + tensor_bytes(img[y]) for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                 + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def grid(rows, scale=6, pad=2, dim_cols=None):
    """rows: list of uint8 [F, H, W, 3] videos -> one uint8 image (a row per video).
    dim_cols: optional list (per row) of how many leading frames to draw dimmed (history)."""
    F = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    img = torch.full((len(rows) * (h + pad) + pad, F * (w + pad) + pad, 3), 96, dtype=torch.uint8)
    for i, r in enumerate(rows):
        up = r.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        if dim_cols is not None and dim_cols[i]:
            up = up.clone()
            up[:dim_cols[i]] = (up[:dim_cols[i]].float() * 0.45).to(torch.uint8)
        for f in range(r.shape[0]):
            y0, x0 = pad + i * (h + pad), pad + f * (w + pad)
            img[y0:y0 + h, x0:x0 + w] = up[f]
    return img


def write_gif(path, videos, scale=6, pad=2, ms=120):
    try:
        from PIL import Image
    except ImportError:
        return False
    # one frame of every clip side by side = a one-frame "video" per clip laid out as one row
    frames = []
    for f in range(videos[0].shape[0]):
        img = grid([torch.stack([v[f] for v in videos])], scale, pad)
        frames.append(Image.frombytes("RGB", (img.shape[1], img.shape[0]), tensor_bytes(img)))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms, loop=0)
    return True


def auto_threads():
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > 0.75 * n  # oversubscribed OpenMP threads crawl
    except OSError:
        busy = False
    return 1 if busy else min(4, n)


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out-dir", default="toy_world_check")
    ap.add_argument("--frames", type=int, default=12, help="latent frames per window")
    ap.add_argument("--history", type=int, default=4, help="history frames carried into the next window")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--size", type=int, default=16, help="latent height = width (16: 128 px, 24: 192 px)")
    ap.add_argument("--block", type=int, default=2, help="frames per DF block")
    ap.add_argument("--ar-step", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shift", type=float, default=8.0)
    ap.add_argument("--hist-sigma", type=float, default=0.0, help="noise level put on history frames")
    ap.add_argument("--n-sync", type=int, default=4, help="clips in the sync sample")
    ap.add_argument("--n-async", type=int, default=2, help="clips in the one-window async sample")
    ap.add_argument("--n-long", type=int, default=1, help="long videos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads (0: all cores up to 4, or 1 when the machine is already busy)")
    ap.add_argument("--scale", type=int, default=6)
    ap.add_argument("--skip-data", action="store_true", help="no data.png (ground-truth reference clips)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads or auto_threads())
    os.makedirs(a.out_dir, exist_ok=True)
    model, meta = load_toy_wan(a.weights)
    size = (a.size, a.size)
    kw = dict(block=a.block, ar_step=a.ar_step, steps=a.steps, shift=a.shift, hist_sigma=a.hist_sigma)
    out, t_all = {"weights": a.weights, "args": vars(a)}, time.time()
    g = torch.Generator().manual_seed(a.seed)

    data = scenes.make_latents(a.n_sync, a.frames, torch.Generator().manual_seed(a.seed + 100))
    if not a.skip_data:
        write_png(os.path.join(a.out_dir, "data.png"), grid(list(scenes.latents_to_rgb(data)), a.scale))
    out["data"] = clip_metrics(data)

    t0 = time.time()
    xs = sample_sync(model, torch.randn(a.n_sync, 16, a.frames, *size, generator=g), a.steps, a.shift)
    out["sync"] = dict(clip_metrics(xs), seconds=round(time.time() - t0, 2))
    write_png(os.path.join(a.out_dir, "sync.png"), grid(list(scenes.latents_to_rgb(xs)), a.scale))

    t0 = time.time()
    xa, rows = sample_async(model, torch.randn(a.n_async, 16, a.frames, *size, generator=g), gen=g, **kw)
    out["async"] = dict(clip_metrics(xa), rows=rows, seconds=round(time.time() - t0, 2))
    write_png(os.path.join(a.out_dir, "async.png"), grid(list(scenes.latents_to_rgb(xa)), a.scale))

    if a.windows > 0 and a.n_long > 0:
        t0 = time.time()
        xl, spans = long_video(model, a.n_long, a.frames, a.history, a.windows, gen=g, size=size, **kw)
        out["long"] = {"frames": xl.shape[2], "seconds": round(time.time() - t0, 2),
                       "per_window": [clip_metrics(xl[:, :, s:e]) for s, e in spans]}
        rgb = scenes.latents_to_rgb(xl)  # [n, F, H, W, 3]
        rows, dims = [], []
        for b in range(a.n_long):
            for w, (s, e) in enumerate(spans):
                rows.append(rgb[b, s:e])
                dims.append(0 if w == 0 else a.history)
        write_png(os.path.join(a.out_dir, "long.png"), grid(rows, a.scale, dim_cols=dims))
        out["long"]["gif"] = write_gif(os.path.join(a.out_dir, "long.gif"), list(rgb), a.scale)
    out["total_seconds"] = round(time.time() - t_all, 2)
    with open(os.path.join(a.out_dir, "metrics.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "args"}, indent=1))
    return out


if __name__ == "__main__":
    main()
