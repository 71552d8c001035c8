"""Diffusion-forcing flow-matching training of the tiny toy-world Wan 2.1 (SkyReels-V2-DF layout).

    python -m toy_world.train --out toy_world/weights/toy_world_df.safetensors --minutes 5 --device auto --seed 0

Objective (ComfyUI's CONST / flow conventions): x_t = (1 - s) x0 + s eps, target v = eps - x0,
timestep = 1000 s given *per latent frame* ([B, F]), zero text context.  Each clip gets its own
noise pattern over frame blocks (1-4 frames per block):
  * sync: one level for the whole clip;
  * independent: an i.i.d. level per block;
  * async: a pipelined DF schedule - block b lags block b-1 by a random progress gap, so leading
    blocks are often finished (s = 0) and trailing ones still pure noise (s = 1), exactly the
    states an ar_step sampler produces;
levels are warped with the inference shift (8) for most clips and left uniform for the rest,
and half of the clips start with 1-6 history frames that are clean or lightly noised
(s <= 0.1, like SkyReels' addnoise_condition) and excluded from the loss, as are finished
(s = 0) frames.  Data is rendered on the fly on the training device (no dataset).

Wall clock: --minutes bounds the whole process (start-up, training, evaluation and saving).
Unless --steps is given, the trainer times the first (warm-up) steps, then fixes the total step
count that fits and runs a cosine schedule over it; the json written next to the weights holds
the exact command, the step count reached and a `reproduce` command with --steps.
Checkpoints (EMA) are written every --ckpt-every-s seconds, so a crash still leaves weights.
"""
from __future__ import annotations

import time

_T_START = time.time()  # the wall-clock budget counts from here (before torch is imported)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from toy_world import scenes  # noqa: E402
from toy_world.model import ToyWan, ToyWanConfig, config_dict, load_safetensors, save_safetensors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="diffusion-forcing training of the toy-world Wan 2.1")
    p.add_argument("--out", required=True, help="output .safetensors (a .json with the same stem is written too)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget for the whole process")
    p.add_argument("--steps", type=int, default=0, help="fixed number of steps (0: as many as fit in --minutes)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end after this many steps of the --steps schedule (replays a run cut by the clock)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="", help="start from these weights (continue training; same sizes)")
    # model
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    # data / batch
    p.add_argument("--batch", type=int, default=0, help="clips per step (0: 128 on cuda, 8 on cpu)")
    p.add_argument("--frames", default="8,12,16", help="latent frames per clip, one drawn per step")
    p.add_argument("--p-still", type=float, default=0.2)
    p.add_argument("--sizes", default="16", help="latent height = width per step, one drawn per step (16: 128 px)")
    p.add_argument("--p-cross", type=float, default=0.0, help="moving sprites that cross the frame")
    p.add_argument("--speed", default="0.4,1.1", help="bouncing sprite speed range, latent px per frame")
    p.add_argument("--p-causal", type=float, default=0.0,
                   help="steps trained block-causal (attention blocks = the clip's noise blocks, as "
                        "diffusion forcing with causal blocks); the rest bidirectional")
    # optimisation
    p.add_argument("--lr", type=float, default=0.0, help="peak lr (0: 1e-3 for batch >= 64, else 6e-4)")
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.999)
    # noise levels
    p.add_argument("--shift", type=float, default=8.0)
    p.add_argument("--p-shifted", type=float, default=0.6, help="clips whose levels use the shift warp")
    p.add_argument("--p-sync", type=float, default=0.25)
    p.add_argument("--p-indep", type=float, default=0.25, help="rest: async pipelined schedule")
    p.add_argument("--max-gap", type=float, default=0.5, help="max progress gap between async blocks")
    p.add_argument("--blocks", default="1,2,3,4", help="frames per block, one drawn per clip")
    p.add_argument("--p-history", type=float, default=0.5)
    p.add_argument("--max-history", type=int, default=6)
    p.add_argument("--p-history-clean", type=float, default=0.5)
    p.add_argument("--history-sigma", type=float, default=0.1, help="max noise level of noised history")
    # runtime
    p.add_argument("--amp", default="auto", help="auto (bf16 on cuda) | bf16 | off")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--val-every", type=int, default=1000)
    p.add_argument("--ckpt-every-s", type=float, default=60.0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# noise levels
# ---------------------------------------------------------------------------------------------
def sample_levels(B, T, gen, dev, a):
    """-> sigma [B, T] in [0, 1], loss mask [B, T] (bool)."""
    def rand(*s):
        return torch.rand(*s, generator=gen, device=dev)

    def pick(values, n):
        v = torch.tensor(values, device=dev)
        return v[torch.randint(0, len(values), (n,), generator=gen, device=dev)]

    ar = torch.arange(T, device=dev)
    max_h = max(0, min(a.max_history, T - 2))
    if max_h:
        hist = pick(list(range(1, max_h + 1)), B) * (rand(B) < a.p_history)
    else:
        hist = torch.zeros(B, dtype=torch.long, device=dev)
    is_hist = ar[None] < hist[:, None]
    bsz = pick(a.block_sizes, B)
    blk = (ar[None] - hist[:, None]).clamp(min=0) // bsz[:, None]  # block index of every frame
    nblk = (T - hist + bsz - 1) // bsz
    # progress per block in [0, 1] (1 = clean)
    mode = rand(B, 1)
    prog_sync = rand(B, 1).expand(B, T)
    prog_ind = rand(B, T)
    gap = rand(B, 1) * a.max_gap
    start = rand(B, 1) * (1 + (nblk[:, None] - 1) * gap)
    prog_async = (start - ar[None] * gap).clamp(0, 1)
    prog = torch.where(mode < a.p_sync, prog_sync, torch.where(mode < a.p_sync + a.p_indep, prog_ind, prog_async))
    s = 1 - prog.gather(1, blk)
    shift = torch.where(rand(B, 1) < a.p_shifted, torch.full_like(s[:, :1], a.shift), torch.ones_like(s[:, :1]))
    sigma = shift * s / (1 + (shift - 1) * s)
    h_sig = torch.where(rand(B, 1) < a.p_history_clean, torch.zeros_like(s[:, :1]), rand(B, 1) * a.history_sigma)
    sigma = torch.where(is_hist, h_sig.expand(B, T), sigma)
    mask = ~is_hist & (sigma > 1e-3)
    return sigma, mask, ar[None] // bsz[:, None]


def flow_batch(x0, sigma, gen):
    eps = torch.randn(x0.shape, generator=gen, device=x0.device)
    s = sigma[:, None, :, None, None]
    return (1 - s) * x0 + s * eps, eps - x0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def autocast(dev, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=amp_dtype)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_validation(frames, device, scene_cfg, n=24, seed=12345):
    """Fixed held-out clips (drawn on the CPU, identical on every machine): sync levels and a
    fixed set of per-frame levels."""
    g = torch.Generator().manual_seed(seed)
    z = scenes.make_latents(n, frames, g, scene_cfg)
    eps = torch.randn(z.shape, generator=g)
    mixed = torch.rand(n, frames, generator=g)
    sets = {f"sync{s:g}": torch.full((n, frames), s) for s in (0.1, 0.3, 0.5, 0.7, 0.9)}
    sets["per_frame"] = mixed
    out = {k: (z.to(device), eps.to(device), v.to(device), None) for k, v in sets.items()}
    # the caches' chunk-causal mode: blocks of 2 frames, levels rising block by block
    stair = (torch.arange(frames) // 2).float() / max(1, (frames - 1) // 2)
    out["causal_async"] = (z.to(device), eps.to(device), (0.1 + 0.85 * stair).expand(n, frames).to(device),
                           (torch.arange(frames, device=device) // 2).expand(n, frames))
    return out


@torch.no_grad()
def validate(model, val, amp_dtype):
    out = {}
    model.eval()
    for name, (z, eps, sig, blocks) in val.items():
        s = sig[:, None, :, None, None]
        x = (1 - s) * z + s * eps
        with autocast(z.device, amp_dtype):
            v = model(x, sig * 1000.0, frame_blocks=blocks)
        out[name] = round(F.mse_loss(v.float(), eps - z).item(), 5)
    out["mean"] = round(sum(out.values()) / len(out), 5)
    return out


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def source_hashes():
    """sha256 of the toy_world sources (the GPU box may get the tree without .git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return {f: sha256(os.path.join(here, f))[:16] for f in ("scenes.py", "model.py", "train.py")}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        ema_p = list(self.model.parameters())
        src = [p.detach() for p in model.parameters()]
        try:
            torch._foreach_lerp_(ema_p, src, 1 - d)
        except Exception:
            for e, s in zip(ema_p, src):
                e.lerp_(s, 1 - d)


# ---------------------------------------------------------------------------------------------
def _train(a, argv, t_start):
    budget = a.minutes * 60.0
    deadline = t_start + budget
    reserve = 3.0 + 0.04 * budget  # final evaluation + saving
    dev = pick_device(a.device)
    cuda = dev.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    a.block_sizes = [int(b) for b in a.blocks.split(",")]
    frame_choices = [int(f) for f in a.frames.split(",")]
    batch = a.batch or (128 if cuda else 8)
    lr_peak = a.lr or (1e-3 if batch >= 64 else 6e-4)
    amp_dtype = None
    if a.amp == "bf16" or (a.amp == "auto" and cuda):
        amp_dtype = torch.bfloat16
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))
    out_json = os.path.splitext(a.out)[0] + ".json"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    # -- model, optimiser, data -------------------------------------------------------------
    torch.manual_seed(a.seed)
    cfg = ToyWanConfig(dim=a.dim, ffn_dim=a.ffn, num_layers=a.layers)
    model = ToyWan(cfg).to(dev)
    if a.init:   # continue from earlier weights: the json's `init` records which ones
        init_sd, _ = load_safetensors(a.init)
        model.load_state_dict({k: v.float() for k, v in init_sd.items()})
    n_params = sum(p.numel() for p in model.parameters())
    ema = EMA(model, a.ema)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "modulation" in n else decay).append(p)
    groups = [{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=lr_peak, betas=(0.9, 0.99), fused=cuda)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(groups, lr=lr_peak, betas=(0.9, 0.99))
    fwd = torch.compile(model) if a.compile else model
    scene_cfg = scenes.SceneConfig(p_still=a.p_still, p_cross=a.p_cross,
                                   speed=tuple(float(v) for v in a.speed.split(",")))
    causal_rng = random.Random(a.seed + 3)
    size_choices = [int(v) for v in a.sizes.split(",")]
    size_cfgs = {n: dataclasses.replace(scene_cfg, height=n, width=n) for n in size_choices}
    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    frame_rng = random.Random(a.seed + 2)
    val = make_validation(12, dev, scene_cfg, n=24 if cuda else 2)
    log(f"[toy_world.train] device={dev} ({torch.cuda.get_device_name(dev) if cuda else 'cpu'}) "
        f"params={n_params / 1e6:.2f}M batch={batch} frames={frame_choices} lr={lr_peak} amp={amp_dtype} "
        f"budget={budget:.0f}s")

    meta = {
        "what": "toy-world diffusion-forcing Wan 2.1 T2V (SkyReels-V2-DF layout), ComfyUI WAN21_T2V",
        "model": config_dict(cfg), "params": n_params,
        "scene": asdict(scene_cfg), "latent_map": scenes.latent_map().info(),
        "space": "Wan 2.1 processed (model-space) latents; preview = latent_rgb_factors^T z + bias",
        "objective": "flow matching: x_t=(1-s)x0+s*eps, v=eps-x0, timestep=1000*s per latent frame; zero text context",
        "train_args": {k: v for k, v in vars(a).items() if k != "block_sizes"},
        "batch": batch, "lr_peak": lr_peak, "amp": str(amp_dtype), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "torch": torch.__version__, "git_commit": git_commit(), "source_sha256": source_hashes(),
        "command": "python -m toy_world.train " + " ".join(shlex.quote(x) for x in argv),
        "init": {"path": a.init, "sha256": sha256(a.init)} if a.init else None,
    }

    def save(which, step, status, extra=None):
        src = ema.model if which == "ema" else model
        sd = {k: v.detach().to("cpu", torch.float16) for k, v in src.state_dict().items()}
        info = dict(meta, weights=which, steps_done=step, status=status, wall_s=round(time.time() - t_start, 1))
        info.update(extra or {})
        save_safetensors(sd, a.out, {"toy_world": json.dumps({k: info[k] for k in (
            "what", "model", "latent_map", "objective", "weights", "steps_done", "command")})})
        info["file_bytes"] = os.path.getsize(a.out)
        info["sha256"] = sha256(a.out)
        with open(out_json + ".tmp", "w") as fh:
            json.dump(info, fh, indent=1)
        os.replace(out_json + ".tmp", out_json)
        return info

    # -- loop ---------------------------------------------------------------------------------
    total = a.steps or 0
    calib_lo, calib_hi = (20, min(a.warmup, 200)) if cuda else (2, min(a.warmup, 8))
    calib_hi = max(calib_hi, calib_lo + 2)
    t_calib, per_step, t_val, last_step_s = None, 0.0, None, 0.0
    loss_acc = torch.zeros((), device=dev)
    acc_n, step = 0, 0
    curve, vals = [], []
    stop_reason = "steps"
    last_ckpt = time.time()
    t_loop = time.time()

    def lr_at(i):
        if i < a.warmup:
            return lr_peak * (i + 1) / a.warmup
        if not total:
            return lr_peak
        frac = min(1.0, (i - a.warmup) / max(1, total - a.warmup))
        return lr_peak * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    while True:
        if (total and step >= total) or (a.stop_after and step >= a.stop_after):
            break
        if time.time() + (per_step or last_step_s) > deadline - reserve:
            stop_reason = "wall clock"
            break
        t_step = time.time()
        for gp in opt.param_groups:
            gp["lr"] = lr_at(step)
        T = frame_rng.choice(frame_choices)
        with torch.no_grad():
            x0 = scenes.make_latents(batch, T, gen, size_cfgs[frame_rng.choice(size_choices)] if len(size_choices) > 1
                                     else size_cfgs[size_choices[0]], dev)
            sigma, mask, blocks = sample_levels(batch, T, gen, dev, a)
            xt, target = flow_batch(x0, sigma, gen)
            causal = causal_rng.random() < a.p_causal
        with autocast(dev, amp_dtype):
            v = fwd(xt, sigma * 1000.0, frame_blocks=blocks if causal else None)
        per_frame = (v.float() - target).pow(2).mean((1, 3, 4))  # [B, T]
        m = mask.float()
        loss = (per_frame * m).sum() / m.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        ema.update(model)
        loss_acc += loss.detach()
        acc_n += 1
        step += 1

        # -- fix the step budget from the measured speed (lr is still in warm-up) ------------
        if not a.steps and not total:
            if step == calib_lo:
                if cuda:
                    torch.cuda.synchronize(dev)
                t_calib = time.time()
            elif step == calib_hi:
                if cuda:
                    torch.cuda.synchronize(dev)
                per_step = (time.time() - t_calib) / (calib_hi - calib_lo)
                if deadline - time.time() > reserve + 20 * per_step:
                    t0 = time.time()
                    vals.append({"step": step, **validate(ema.model, val, amp_dtype)})
                    t_val = time.time() - t0
                    # final evaluation (ema + raw) and saving, plus the periodic evaluations
                    reserve = 2.0 + 0.02 * budget + 3 * t_val
                per_step_all = per_step * 1.05 + (t_val / a.val_every if a.val_every and t_val else 0.0)
                left = deadline - reserve - time.time()
                total = step + max(0, int(left / per_step_all))
                log(f"[toy_world.train] {per_step * 1000:.1f} ms/step, validation {t_val or 0:.2f}s "
                    f"-> {total} steps in total")
        last_step_s = time.time() - t_step  # guard for the clock check until calibrated

        if step % a.log_every == 0 or (total and step == total):
            mean_loss = (loss_acc / max(1, acc_n)).item()
            loss_acc.zero_()
            acc_n = 0
            el = time.time() - t_start
            curve.append([step, round(mean_loss, 5), round(el, 1)])
            log(f"step {step:6d}/{total or '?'}  loss {mean_loss:.4f}  lr {lr_at(step - 1):.2e}  "
                f"{step / max(1e-9, time.time() - t_loop):.1f} it/s  {el:.0f}s")
        if a.val_every and step % a.val_every == 0 and time.time() + (t_val or 0) < deadline - reserve:
            t0 = time.time()
            vals.append({"step": step, **validate(ema.model, val, amp_dtype)})
            t_val = time.time() - t0
            log(f"  val(ema) {vals[-1]}")
        if time.time() - last_ckpt > a.ckpt_every_s:
            save("ema", step, "partial", {"loss_curve": curve, "val": vals})
            last_ckpt = time.time()

    if acc_n:
        curve.append([step, round((loss_acc / acc_n).item(), 5), round(time.time() - t_start, 1)])
    # -- final: keep the better of EMA and raw weights on the held-out set -----------------
    left = deadline - time.time()
    if (t_val is not None and left > 2 * t_val + 1.5) or (t_val is None and left > 0.25 * budget):
        final_val = {"ema": validate(ema.model, val, amp_dtype), "raw": validate(model, val, amp_dtype)}
        which = "ema" if final_val["ema"]["mean"] <= final_val["raw"]["mean"] else "raw"
    else:  # no time left to compare: keep the EMA
        final_val, which = None, "ema"
    reproduce = list(argv)
    if not a.steps:  # same run with the step count fixed; the wall clock then only guards
        for flag in ("--minutes", "--steps", "--stop-after"):
            while flag in reproduce:
                i = reproduce.index(flag)
                del reproduce[i:i + 2]
            reproduce = [x for x in reproduce if not x.startswith(flag + "=")]
        reproduce += ["--steps", str(total or step)]
        if total and step < total:
            reproduce += ["--stop-after", str(step)]
        reproduce += ["--minutes", str(max(a.minutes, 60.0))]
    info = save(which, step, "done", {
        "steps_planned": total, "stop_reason": stop_reason, "loss_curve": curve, "val": vals,
        "final_val": final_val,
        "train_seconds": round(time.time() - t_loop, 1),
        "reproduce": "python -m toy_world.train " + " ".join(shlex.quote(x) for x in reproduce)})
    log(f"[toy_world.train] saved {which} weights after {step} steps ({stop_reason}) -> {a.out} "
        f"({info['file_bytes'] / 1e6:.2f} MB), "
        f"val {final_val and {k: v['mean'] for k, v in final_val.items()}}, "
        f"total {time.time() - t_start:.1f}s")
    return info


def main(argv=None):
    """CLI entry; called in-process with a list, the budget counts from the call."""
    t_start = _T_START if argv is None else time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    return _train(parse_args(argv), argv, t_start)


if __name__ == "__main__":
    main()
