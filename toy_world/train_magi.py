"""Chunk-wise flow-matching training of a tiny MAGI-1 ("toy MAGI-1") on toy-world videos (CPU).

    .host/venv/bin/python -m toy_world.train_magi --out toy_world/weights/toy_magi1.safetensors --minutes 70 --seed 0

The model is the pack's own MAGI-1 DiT (`model_patches/magi_model.py`, `MagiDiT`), built on
`comfy.ops.disable_weight_init` in fp32 with every parameter initialised here, and trained with
autograd straight through `MagiDiT.forward_chunks` (per-chunk SDPA over key ranges, the code the
sampler runs). The file is saved in the official MAGI-1 key layout and re-read with the pack's
strict loader (`magi_loader.read_state_dict` + `check_magi`) before the run ends.

Conventions (specs/magi1.md sections 1-3): t = 0 is noise, t = 1 clean; x_t = t x1 + (1 - t) eps;
the model predicts the velocity v = x1 - eps; a video is cut into chunks of `chunk_width` latent
frames; every chunk has one t, and its queries attend to one contiguous key range of chunks
ending at itself. Data: toy_world.scenes latents ([1, 16, T, 16, 16], 8x8 tokens per frame).

Objective (one training sample = one `forward_chunks` call over h + n chunks, B = 1):
  * chunk width: 6 (the pack's MagiSchedule default) with probability --p-cw6, else 3, so the
    weights work with both (6 matches the schedule node; 3 is the cheap CPU setting);
  * h in {0, 1, 2} clean history chunks first (MAGI's clean re-run of a finished chunk): x = x1,
    model time clean_t = 0.9999, key range itself only, no loss (their output is discarded at
    inference, and their target, the noise, is not in their input);
  * n in {1..4} window chunks at staggered levels as in MAGI's window (window_size W = 4): a
    base f ~ U(0, 1); window chunk i (0 = oldest) at level L_i (oldest level W-1 for a full or
    shrinking window, n-1 for a growing one), progress p_i = (L_i + f) / W, so the oldest chunk
    is nearly clean and the newest nearly noise; with --p-indep the p_i are i.i.d. U(0, 1)
    instead (diffusion-forcing robustness);
  * t_i = MAGI's grid transform of the progress: u^2, then SD3 shift 3 in 0=noise form
    (cache_core.magi_schedule.time_grid on a continuous u; checked against it at start-up), so
    the t distribution is exactly the one the 4-chunk window sampler visits;
  * key ranges per window chunk: MAGI's kv_range (5, 4, 3, 2 chunks by quarter of the chunk's
    progress, cache_core.magi_schedule.first_key_chunk) with --p-kv, the full history otherwise,
    or (--p-alone) every window chunk alone (the history-free pass C of 3-pass guidance);
  * text: the model's null caption (the first 50 rows of null_caption_embedding) for every
    chunk, null_row=False (adaLN row -2), no distill dt. On save, row -1 is set equal to row -2,
    so the base sampler's null_row=True passes compute the same thing;
  * loss: MSE of v over all window chunks (every element), averaged over the step's samples.
AdamW (0.9, 0.99), weight decay on matrices, gradient clip 1, linear warm-up then cosine to
--min-lr-frac; EMA of the weights; at the end the EMA and raw weights are compared on the fixed
held-out set and the better one is saved. Held-out validation: fixed clips and noise, all window
chunks at t in {0.05, 0.1, 0.3, 0.6, 0.9} behind one clean chunk, plus MAGI-window levels at
chunk widths 6 and 3.

Wall clock: --minutes bounds the whole process. Without --steps the trainer times its early steps,
fixes the step count that fits, and runs the cosine over it; the json beside the weights records
the exact command, every setting, the loss curve, the validation losses, the sha256, and a
`reproduce` command with --steps fixed (plus --stop-after if the clock cut the run short).
"""
from __future__ import annotations

import time

_T_START = time.time()

import argparse  # noqa: E402
import copy  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from tools.inprocess import load_comfy, pack  # noqa: E402

load_comfy(cpu=True)
import comfy.ops  # noqa: E402

magi = pack("model_patches.magi_model")
magi_loader = pack("model_patches.magi_loader")
magi_schedule = pack("cache_core.magi_schedule")
from toy_world import scenes  # noqa: E402
from toy_world.model import load_safetensors, save_safetensors  # noqa: E402

CLEAN_T = magi_schedule.MagiSchedule().clean_t     # 0.9999: MAGI's clean re-run time
KV_RANGE = magi_schedule.MagiSchedule().kv_range   # (5, 4, 3, 2)
WINDOW = magi_schedule.MagiSchedule().window_size  # 4
SHIFT = magi_schedule.MagiSchedule().shift         # 3
KV_STEPS = 64                                      # step resolution used to read kv_range off a progress


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="chunk-wise flow-matching training of the toy MAGI-1")
    p.add_argument("--out", required=True, help="output .safetensors (a .json with the same stem is written too)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget for the whole process")
    p.add_argument("--steps", type=int, default=0, help="fixed number of steps (0: as many as fit in --minutes)")
    p.add_argument("--stop-after", type=int, default=0, help="end after this many steps of the --steps schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="", help="start from these MAGI-1-layout weights (same sizes)")
    p.add_argument("--threads", type=int, default=1)
    # model
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--cond-dim", type=int, default=32)
    p.add_argument("--caption-channels", type=int, default=32)
    p.add_argument("--caption-max-length", type=int, default=64)
    # samples
    p.add_argument("--batch", type=int, default=4, help="samples (forward_chunks calls) per step")
    p.add_argument("--p-cw6", type=float, default=0.6, help="samples with chunk width 6 (else 3)")
    p.add_argument("--history", default="0.3,0.5,0.2", help="P(h = 0, 1, 2 clean history chunks)")
    p.add_argument("--window", default="0.1,0.15,0.25,0.5", help="P(n = 1, 2, 3, 4 window chunks)")
    p.add_argument("--max-chunks", type=int, default=5, help="h + n at most (h is reduced)")
    p.add_argument("--p-shrinking", type=float, default=0.5,
                   help="with history and n < 4: the window's oldest levels (end of a video) instead of its newest")
    p.add_argument("--p-indep", type=float, default=0.15, help="i.i.d. progress per chunk instead of the window")
    p.add_argument("--p-kv", type=float, default=0.6, help="key ranges from kv_range (5,4,3,2)")
    p.add_argument("--p-alone", type=float, default=0.12, help="every window chunk attends to itself only")
    # optimisation
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--lr-schedule", default="cosine", choices=("cosine", "constant"),
                   help="after warm-up; a --minutes run that ends before its step count is calibrated "
                        "ran constant (its reproduce command says so)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.998)
    # runtime
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-clips", type=int, default=6)
    p.add_argument("--ckpt-every-s", type=float, default=300.0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
def make_config(a) -> "magi.MagiConfig":
    return magi.MagiConfig(num_layers=a.layers, hidden=a.hidden, ffn=a.ffn, heads=a.heads, kv_heads=a.kv_heads,
                           head_dim=a.head_dim, in_channels=16, cond_dim=a.cond_dim,
                           caption_channels=a.caption_channels, caption_max_length=a.caption_max_length,
                           gated=False)


def rope_bands(n: int) -> torch.Tensor:
    """Fixed RoPE bands, geometric from 1 to 0.05 rad per (rescaled) position: head_dim 32 has only
    4 bands per axis, and upstream's 1/10000^(k/n) would spend two of them on near-constant angles."""
    return torch.logspace(0, math.log10(0.05), n)


def build_model(cfg) -> torch.nn.Module:
    return magi.MagiDiT(config=cfg, dtype=torch.float32, operations=comfy.ops.disable_weight_init)


ZC_NORMS = ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn", "self_attn_post_norm",
            "mlp_post_norm", "final_layernorm")


@torch.no_grad()
def init_params(model, seed: int) -> None:
    """Every parameter (disable_weight_init leaves torch.empty): linears/conv N(0, 1/fan_in), the
    "+1" norms at gamma 0 (= 1), plain pre-norms at 1, biases 0, adaLN gate biases 1 (tanh(1):
    open gates), the output projection 0 (an untrained model predicts v = 0), null caption N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "rope.bands":
            p.copy_(rope_bands(p.shape[0]))
        elif name == "final_linear.linear.weight":
            p.zero_()
        elif name == "y_embedder.null_caption_embedding":
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("ada_modulate_layer.proj.0.bias"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif p.ndim == 1:   # norm weights
            is_zc = any(f".{n}." in f".{name}" for n in ZC_NORMS)
            p.fill_(0.0 if is_zc else 1.0)
        else:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def export_state_dict(model) -> dict:
    """fp32 CPU copy in the official key layout; null_caption_embedding row -1 := row -2."""
    sd = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in model.state_dict().items()}
    nce = sd["y_embedder.null_caption_embedding"]
    nce[magi.ADALN_NULL_ROW] = nce[magi.ADALN_COND_ROW]
    return sd


# ---------------------------------------------------------------------------------------------
# training states
# ---------------------------------------------------------------------------------------------
def magi_t(p: float, shift: float = SHIFT) -> float:
    """MAGI's time grid as a function of schedule progress p in [0, 1]: u^2, then shift (0 = noise)."""
    t = p * p
    s = 1.0 / shift
    return s * t / (1 + (s - 1) * t)


def check_time_map():
    grid = magi_schedule.time_grid(16, SHIFT).tolist()
    for j, want in enumerate(grid):
        assert abs(magi_t(j / 16) - want) < 1e-12, (j, magi_t(j / 16), want)


def _pick(rng: random.Random, probs: list) -> int:
    return rng.choices(range(len(probs)), weights=probs)[0]


def sample_state(rng: random.Random, a) -> dict:
    """One training sample's structure: chunk width, history, window levels, t and key ranges."""
    cw = 6 if rng.random() < a.p_cw6 else 3
    n = 1 + _pick(rng, a.window_p)
    h = min(_pick(rng, a.history_p), a.max_chunks - n)
    if rng.random() < a.p_indep:
        kind = "indep"
        prog = [rng.random() for _ in range(n)]
    else:
        shrinking = h > 0 and n < WINDOW and rng.random() < a.p_shrinking
        top = WINDOW - 1 if (n == WINDOW or shrinking) else n - 1
        f = rng.random()
        prog = [(top - i + f) / WINDOW for i in range(n)]
        kind = "window-shrinking" if shrinking else "window"
    r = rng.random()
    keys = "alone" if r < a.p_alone else ("kv" if r < a.p_alone + a.p_kv else "full")
    t = [CLEAN_T] * h + [magi_t(p) for p in prog]
    first = list(range(h))                                   # clean history: itself only
    for i, p in enumerate(prog):
        c = h + i
        if keys == "alone":
            first.append(c)
        elif keys == "kv":
            first.append(magi_schedule.first_key_chunk(c, min(KV_STEPS - 1, int(p * KV_STEPS)), KV_STEPS, KV_RANGE))
        else:
            first.append(0)
    return dict(cw=cw, h=h, n=n, t=t, first=first, kind=kind, keys=keys)


def noised(z: torch.Tensor, eps: torch.Tensor, st: dict) -> torch.Tensor:
    """x_t per chunk (history chunks clean), z/eps [B, 16, (h+n)*cw, H, W]."""
    cw, h = st["cw"], st["h"]
    tt = torch.tensor([1.0] * h + st["t"][h:], dtype=z.dtype).repeat_interleave(cw).view(1, 1, -1, 1, 1)
    return tt * z + (1 - tt) * eps


def chunk_call(model, st: dict) -> "magi.ChunkForward":
    k = st["h"] + st["n"]
    null = model.null_text(torch.device("cpu"))
    return magi.ChunkForward(start=0, t=list(st["t"]), texts=[null] * k, first=list(st["first"]))


def sample_loss(model, z, eps, st) -> torch.Tensor:
    x = noised(z, eps, st)
    v = model.forward_chunks(x, chunk_call(model, st), None)
    a = st["h"] * st["cw"]
    return (v[:, :, a:] - (z - eps)[:, :, a:]).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _fixed_state(cw, h, t_window, keys):
    n = len(t_window)
    t = [CLEAN_T] * h + list(t_window)
    first = list(range(h))
    for i in range(n):
        c = h + i
        if keys == "kv":
            p = math.sqrt(max(0.0, 3 * t_window[i] / (1 + 2 * t_window[i])))   # inverse of magi_t
            first.append(magi_schedule.first_key_chunk(c, min(KV_STEPS - 1, int(p * KV_STEPS)), KV_STEPS, KV_RANGE))
        else:
            first.append(0)
    return dict(cw=cw, h=h, n=n, t=t, first=first, kind="val", keys=keys)


def make_validation(n_clips: int, scene_cfg, seed: int = 12345) -> dict:
    """Fixed held-out clips and noise (CPU generator): name -> (state, [(z, eps)] per clip)."""
    window_t = [magi_t((WINDOW - 1 - i + 0.5) / WINDOW) for i in range(WINDOW)]
    states = {f"t{t:g}": _fixed_state(6, 1, [t] * WINDOW, "full") for t in (0.05, 0.1, 0.3, 0.6, 0.9)}
    states["window_cw6"] = _fixed_state(6, 1, window_t, "kv")
    states["window_cw3"] = _fixed_state(3, 1, window_t, "kv")
    g = torch.Generator().manual_seed(seed)
    clips = {}
    for cw in (6, 3):
        frames = (1 + WINDOW) * cw
        zs = scenes.make_latents(n_clips, frames, g, scene_cfg)
        es = torch.randn(zs.shape, generator=g)
        clips[cw] = [(zs[i:i + 1], es[i:i + 1]) for i in range(n_clips)]
    return {name: (st, clips[st["cw"]]) for name, st in states.items()}


@torch.no_grad()
def validate(model, val) -> dict:
    model.eval()
    out = {name: round(sum(sample_loss(model, z, e, st).item() for z, e in clips) / len(clips), 5)
           for name, (st, clips) in val.items()}
    model.train()
    out["mean"] = round(sum(out.values()) / len(out), 5)
    return out


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def gradient_check(model, scene_cfg, a) -> dict:
    """Autograd through forward_chunks reaches every trainable parameter: a copy with a random
    output layer (the real one starts at 0, which blocks the gradient for one step), one sample
    with history, kv ranges and a full window; every parameter but rope.bands (fixed) must get a
    finite, non-zero gradient, and null_caption_embedding its text rows and adaLN row -2."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        w = m.final_linear.linear.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(7)) / math.sqrt(w.shape[1]))
    g = torch.Generator().manual_seed(99)
    st = _fixed_state(3, 1, [magi_t((3 - i + 0.5) / 4) for i in range(4)], "kv")
    z = scenes.make_latents(1, 15, g, scene_cfg)
    loss = sample_loss(m, z, torch.randn(z.shape, generator=g), st)
    loss.backward()
    bad = []
    for name, p in m.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0:
            bad.append(name)
    nce = m.y_embedder.null_caption_embedding.grad
    rows = (nce.abs().sum(1) > 0).nonzero().flatten().tolist()
    want_rows = list(range(magi.NULL_TEXT_TOKENS)) + [a.caption_max_length + magi.ADALN_COND_ROW]
    ok = not bad and rows == want_rows
    return {"ok": ok, "params_without_gradient": bad, "null_caption_rows_with_gradient": f"{rows[:3]}..{rows[-2:]}",
            "trainable": sum(1 for p in m.parameters() if p.requires_grad)}


def load_check(path: str, cfg, model, val) -> dict:
    """The saved file through the pack's strict loader, then the same outputs in a fresh model."""
    sd = magi_loader.read_state_dict(path)
    cfg2 = magi_loader.check_magi(sd)
    assert cfg2 == cfg, (cfg2, cfg)
    fresh = build_model(cfg2)
    fresh.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    st, clips = val["window_cw6"]
    z, e = clips[0]
    with torch.no_grad():
        x = noised(z, e, st)
        a = fresh.forward_chunks(x, chunk_call(fresh, st))
        b = model.forward_chunks(x, chunk_call(model, st))
        st_alone = dict(st, first=list(range(st["h"] + st["n"])))
        null_row = fresh.forward_chunks(x, magi.ChunkForward(0, st["t"], chunk_call(fresh, st).texts,
                                                          st_alone["first"], null_row=True))
        cond_row = fresh.forward_chunks(x, magi.ChunkForward(0, st["t"], chunk_call(fresh, st).texts, st_alone["first"]))
    diff = (a - b).abs().max().item()
    row_diff = (null_row - cond_row).abs().max().item()
    assert diff < 1e-4, diff
    assert row_diff == 0.0, row_diff
    return {"ok": True, "config": asdict(cfg2), "max_abs_diff_vs_trained": diff,
            "null_row_true_vs_false_max_abs_diff": row_diff, "keys": len(sd)}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit():
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def source_hashes():
    files = ("toy_world/train_magi.py", "toy_world/scenes.py", "model_patches/magi_model.py",
             "cache_core/magi_schedule.py")
    return {f: sha256(os.path.join(REPO, f))[:16] for f in files}


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.n = 0

    @torch.no_grad()
    def update(self, model):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for e, s in zip(self.model.parameters(), model.parameters()):
            e.lerp_(s.detach(), 1 - d)


# ---------------------------------------------------------------------------------------------
def _train(a, argv, t_start):
    budget = a.minutes * 60.0
    deadline = t_start + budget
    torch.set_num_threads(a.threads)
    a.history_p = [float(x) for x in a.history.split(",")]
    a.window_p = [float(x) for x in a.window.split(",")]
    assert len(a.window_p) == WINDOW
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))
    out_json = os.path.splitext(a.out)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    check_time_map()

    torch.manual_seed(a.seed)
    cfg = make_config(a)
    model = build_model(cfg)
    init_params(model, a.seed)
    if a.init:
        sd, _ = load_safetensors(a.init)
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    model.rope.bands.requires_grad_(False)
    want = magi.expected_keys(cfg)
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert have == want, "state dict differs from the official MAGI-1 layout"
    n_params = sum(p.numel() for p in model.parameters())
    scene_cfg = scenes.SceneConfig()
    grad_check = gradient_check(model, scene_cfg, a)
    log(f"[train_magi] gradient check: {grad_check}")
    if not grad_check["ok"]:
        raise SystemExit("gradient check failed")
    model.train()
    ema = EMA(model, a.ema)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "null_caption" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(a.seed + 1)
    rng = random.Random(a.seed + 2)
    t0 = time.time()
    val = make_validation(a.val_clips, scene_cfg)
    log(f"[train_magi] params={n_params / 1e6:.3f}M config={asdict(cfg)} batch={a.batch} lr={a.lr} "
        f"budget={budget:.0f}s threads={torch.get_num_threads()} (validation set built in {time.time() - t0:.1f}s)")

    meta = {
        "what": "toy MAGI-1: a tiny MAGI-1 DiT (official key layout) trained on toy_world procedural videos",
        "model": asdict(cfg), "params": n_params, "rope_bands": rope_bands(cfg.head_dim // 8).tolist(),
        "scene": asdict(scene_cfg), "latent_map": scenes.latent_map().info(),
        "space": "toy_world latents (Wan 2.1 processed space, 16 channels, 16x16 latents = 8x8 tokens per frame); "
                 "no VAE: scenes.latents_to_rgb is the preview",
        "chunk_width": {"trained": {"6": a.p_cw6, "3": round(1 - a.p_cw6, 4)},
                        "note": "each sample draws its chunk width; 6 is the MagiSchedule default"},
        "window_size": WINDOW, "kv_range": list(KV_RANGE), "clean_t": CLEAN_T, "shift": SHIFT,
        "objective": (
            "MAGI-1 chunk-wise flow matching (t=0 noise, t=1 clean): x_t = t*x1 + (1-t)*eps, target v = x1 - eps. "
            "One sample = one forward_chunks call (B=1) over h clean history chunks (x=x1, t=clean_t 0.9999, self-only "
            "keys, no loss: MAGI's clean re-run) and n window chunks at staggered levels: progress p_i = (L_i + f)/4, "
            "f~U(0,1), L_i = 3..0 oldest..newest (full or shrinking window) or n-1..0 (growing), or i.i.d. U(0,1) "
            "with p_indep; t_i = MAGI grid transform of p_i (u^2 then shift 3). Key ranges: MAGI kv_range (5,4,3,2 "
            "by quarter of progress) with p_kv, each window chunk alone with p_alone (pass C), else full history. "
            "Text: null caption (first 50 rows of null_caption_embedding), null_row=False, no distill dt. Loss: MSE "
            "over every element of the window chunks. null_caption_embedding row -1 is set to row -2 on save."),
        "sample_mix": {k: getattr(a, k) for k in ("p_cw6", "history", "window", "max_chunks", "p_shrinking",
                                                   "p_indep", "p_kv", "p_alone")},
        "train_args": {k: v for k, v in vars(a).items() if k not in ("history_p", "window_p")},
        "gradient_check": grad_check,
        "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "git_commit": git_commit(), "source_sha256": source_hashes(),
        "command": "python -m toy_world.train_magi " + " ".join(shlex.quote(x) for x in argv),
        "init": {"path": a.init, "sha256": sha256(a.init)} if a.init else None,
    }

    def save(which, step, status, extra=None):
        src = ema.model if which == "ema" else model
        sd = export_state_dict(src)
        info = dict(meta, weights=which, steps_done=step, status=status, wall_s=round(time.time() - t_start, 1))
        info.update(extra or {})
        save_safetensors(sd, a.out, {"toy_magi1": json.dumps({k: info[k] for k in (
            "what", "model", "chunk_width", "objective", "weights", "steps_done", "command")})})
        info["file_bytes"] = os.path.getsize(a.out)
        info["sha256"] = sha256(a.out)
        with open(out_json + ".tmp", "w") as fh:
            json.dump(info, fh, indent=1)
        os.replace(out_json + ".tmp", out_json)
        return info

    total = a.steps or 0
    calib_lo, calib_hi = (10, 50) if budget >= 600 else (3, 13)
    per_step, t_calib = 0.0, None
    loss_acc, acc_n, step = 0.0, 0, 0
    curve, vals, step_times = [], [], []
    t0 = time.time()
    vals.append({"step": 0, **validate(ema.model, val)})      # the initial model (predicts v = 0)
    t_val = time.time() - t0
    reserve = 10.0 + 2.2 * t_val                               # final EMA + raw validation, save, load check
    log(f"  val(init) {vals[-1]} ({t_val:.1f}s)")
    stop_reason = "steps"
    last_ckpt = time.time()
    t_loop = time.time()
    counts = {"cw6": 0, "cw3": 0, "chunks": 0}

    def lr_at(i):
        if i < a.warmup:
            return a.lr * (i + 1) / a.warmup
        if not total or a.lr_schedule == "constant":
            return a.lr
        frac = min(1.0, (i - a.warmup) / max(1, total - a.warmup))
        return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    while True:
        if (total and step >= total) or (a.stop_after and step >= a.stop_after):
            break
        guard = per_step or (step_times[-1] if step_times else 0.0)
        if time.time() + guard > deadline - reserve:
            stop_reason = "wall clock"
            break
        ts = time.time()
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(a.batch):
            st = sample_state(rng, a)
            with torch.no_grad():
                z = scenes.make_latents(1, (st["h"] + st["n"]) * st["cw"], gen, scene_cfg)
                eps = torch.randn(z.shape, generator=gen)
            loss = sample_loss(model, z, eps, st) / a.batch
            loss.backward()
            step_loss += loss.item()
            counts[f"cw{st['cw']}"] += 1
            counts["chunks"] += st["h"] + st["n"]
        if a.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        ema.update(model)
        loss_acc += step_loss
        acc_n += 1
        step += 1
        step_times.append(time.time() - ts)

        if not a.steps and not total:
            if step == calib_lo:
                t_calib = time.time()
            elif step == calib_hi:
                per_step = (time.time() - t_calib) / (calib_hi - calib_lo)
                per_step_all = per_step * 1.08 + (t_val / a.val_every if a.val_every else 0.0)
                total = step + max(0, int((deadline - reserve - time.time()) / per_step_all))
                log(f"[train_magi] {per_step:.3f} s/step, validation {t_val:.1f}s -> {total} steps in total")
        if step % a.log_every == 0 or (total and step == total):
            el = time.time() - t_start
            curve.append([step, round(loss_acc / max(1, acc_n), 5), round(el, 1)])
            log(f"step {step:6d}/{total or '?'}  loss {loss_acc / max(1, acc_n):.4f}  lr {lr_at(step - 1):.2e}  "
                f"{(time.time() - t_loop) / step:.3f} s/step  {el:.0f}s")
            loss_acc, acc_n = 0.0, 0
        if a.val_every and step % a.val_every == 0 and time.time() + (t_val or 0) < deadline - reserve:
            t0 = time.time()
            vals.append({"step": step, **validate(ema.model, val)})
            t_val = time.time() - t0
            log(f"  val(ema) {vals[-1]}")
        if time.time() - last_ckpt > a.ckpt_every_s:
            save("ema", step, "partial", {"loss_curve": curve, "val": vals})
            last_ckpt = time.time()

    if acc_n:
        curve.append([step, round(loss_acc / acc_n, 5), round(time.time() - t_start, 1)])
    final_val = {"ema": validate(ema.model, val), "raw": validate(model, val)}
    which = "ema" if final_val["ema"]["mean"] <= final_val["raw"]["mean"] else "raw"
    reproduce = list(argv)
    if not a.steps:
        for flag in ("--minutes", "--steps", "--stop-after"):
            while flag in reproduce:
                i = reproduce.index(flag)
                del reproduce[i:i + 2]
            reproduce = [x for x in reproduce if not x.startswith(flag + "=")]
        reproduce += ["--steps", str(total or step)]
        if total and step < total:
            reproduce += ["--stop-after", str(step)]
        if not total and a.lr_schedule != "constant":   # never calibrated: the lr stayed constant after warm-up
            reproduce += ["--lr-schedule", "constant"]
        reproduce += ["--minutes", str(max(a.minutes * 2, 60.0))]
    st_sorted = sorted(step_times)
    extra = {"steps_planned": total, "stop_reason": stop_reason, "loss_curve": curve, "val": vals,
             "final_val": final_val, "samples_seen": counts,
             "train_seconds": round(time.time() - t_loop, 1),
             "step_seconds": {"mean": round(sum(step_times) / max(1, len(step_times)), 4),
                              "median": round(st_sorted[len(st_sorted) // 2], 4) if st_sorted else None},
             "reproduce": "python -m toy_world.train_magi " + " ".join(shlex.quote(x) for x in reproduce)}
    info = save(which, step, "done", extra)
    src = ema.model if which == "ema" else model
    info["load_check"] = load_check(a.out, cfg, src, val)
    with open(out_json, "w") as fh:
        json.dump(info, fh, indent=1)
    log(f"[train_magi] saved {which} weights after {step} steps ({stop_reason}) -> {a.out} "
        f"({info['file_bytes'] / 1e6:.2f} MB), val ema {final_val['ema']['mean']} raw {final_val['raw']['mean']}, "
        f"load check ok, total {time.time() - t_start:.1f}s")
    return info


def main(argv=None):
    t_start = _T_START if argv is None else time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    return _train(parse_args(argv), argv, t_start)


if __name__ == "__main__":
    main()
