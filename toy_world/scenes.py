"""Procedural toy-world videos, defined directly in Wan 2.1 *processed* (model-space) latents.

Why processed space: ComfyUI feeds the diffusion model ``Wan21.process_in(raw)`` and its
Latent2RGB preview projects the model-space ``denoised`` with ``latent_rgb_factors`` (+ bias).
So a toy video is a preview-RGB video ``v`` in [-1, 1] lifted to 16 channels by
``LatentMap``:

    z = M (v - b) + alpha * N W (sin(A v + c) - mu)

* ``M = F (F^T F)^-1`` is the min-norm right inverse of ``F^T`` (F = the 16x3 Wan 2.1 preview
  factors), so ``F^T z + b == v`` exactly: ComfyUI's preview shows the scene as rendered.
* ``N`` (16x13) spans null(F^T); the invisible channels carry a fixed, mildly curved, partially
  whitened function of the colour.  It is deterministic (so learnable) and moves with the
  sprites, and it lifts the per-channel variance to ~1 like real processed Wan latents (the
  visible part alone has variance ~0.1, which would silently change the SNR schedule).
* Nothing here depends on ComfyUI or on torch's RNG for the mapping itself: the random
  matrices come from Python's ``random.Random`` and the calibration uses a fixed synthetic
  colour sample, so the mapping is identical on every machine and torch version.
  (A raw ComfyUI LATENT is ``Wan21().process_out(z)``; VAE-decoding toy latents is meaningless.)

Scenes (``render``): a static textured background (checker, stripes, smooth blobs or a ramp in
two muted colours) and 1-3 saturated discs/squares moving at constant, different speeds and
bouncing off the borders; a fraction of clips (``p_still``) and of single sprites are still.
Everything is drawn with torch on any device from an explicit ``torch.Generator`` (fixed seed
=> identical clips on that device).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

def wan21_preview_factors() -> tuple[list, list]:
    """Wan 2.1's latent -> RGB preview factors [16][3] and bias [3], read from ComfyUI's own
    latent format (not copied here): its preview is what defines the toy world's colours."""
    import os
    import sys
    root = os.environ.get("COMFYUI_PATH") or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                          ".host", "ComfyUI")
    if root not in sys.path:
        sys.path.append(root)
    try:
        from comfy.latent_formats import Wan21
    except ImportError as e:
        raise ImportError(f"toy_world needs a ComfyUI tree for Wan 2.1's preview factors; set COMFYUI_PATH "
                          f"(looked in {root})") from e
    return Wan21.latent_rgb_factors, Wan21.latent_rgb_factors_bias


# saturated sprite colours, preview RGB in [-1, 1]
PALETTE = (
    (0.90, -0.65, -0.65),  # red
    (-0.65, 0.85, -0.65),  # green
    (-0.55, -0.45, 0.95),  # blue
    (0.90, 0.85, -0.65),   # yellow
    (-0.65, 0.85, 0.90),   # cyan
    (0.90, -0.65, 0.90),   # magenta
    (0.95, 0.95, 0.95),    # white
    (0.95, 0.15, -0.75),   # orange
)
BG_LO, BG_HI = -0.80, -0.20      # first background colour, per channel
BG_DELTA = 0.35                  # second colour = first + U(-delta, delta), clamped
BG_CLAMP = (-0.95, 0.15)

LATENT_MAP_VERSION = "toyworld-latent-v1 (curv 0.5, whiten floor 0.01, seed 1234)"


@dataclass
class SceneConfig:
    height: int = 16                      # latent pixels (x8 = 128 px video)
    width: int = 16
    p_still: float = 0.2                  # whole clip still
    p_sprite_still: float = 0.15          # one sprite still inside a moving clip
    sprite_counts: tuple = (1, 2, 2, 3)   # drawn uniformly from this tuple
    radius: tuple = (2.2, 3.4)            # latent px
    speed: tuple = (0.4, 1.1)             # latent px per latent frame
    checker_cell: tuple = (4, 6)          # integer cell size range (inclusive)
    stripe_period: tuple = (5.0, 9.0)
    blob_sigma: tuple = (2.5, 4.5)
    p_cross: float = 0.0                  # a moving sprite crosses the frame (enters/leaves) instead of bouncing
    cross_speed: tuple = (0.9, 1.8)       # latent px per latent frame for crossing sprites


# ---------------------------------------------------------------------------------------------
# latent <-> preview RGB
# ---------------------------------------------------------------------------------------------
def _calibration_colours(n=20000, seed=999):
    """A fixed synthetic colour sample shaped like the scenes: ~85 % background mixtures, ~15 % palette."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.15:
            out.append(PALETTE[rng.randrange(len(PALETTE))])
        else:
            c1 = [rng.uniform(BG_LO, BG_HI) for _ in range(3)]
            c2 = [min(max(a + rng.uniform(-BG_DELTA, BG_DELTA), BG_CLAMP[0]), BG_CLAMP[1]) for a in c1]
            m = rng.random()
            out.append(tuple(a * (1 - m) + b * m for a, b in zip(c1, c2)))
    return torch.tensor(out, dtype=torch.float64)


class LatentMap:
    """Preview RGB [..., 3] <-> processed Wan 2.1 latent [..., 16] (see module docstring)."""

    def __init__(self, curv=0.5, whiten_floor=0.01, seed=1234):
        factors, bias = wan21_preview_factors()
        F = torch.tensor(factors, dtype=torch.float64)  # [16, 3]
        b = torch.tensor(bias, dtype=torch.float64)
        M = F @ torch.linalg.inv(F.T @ F)  # [16, 3], F^T M = I
        U, _, _ = torch.linalg.svd(F, full_matrices=True)
        N = U[:, 3:].contiguous()  # [16, 13], F^T N = 0
        rng = random.Random(seed)
        A = torch.tensor([[rng.gauss(0.0, curv) for _ in range(3)] for _ in range(13)], dtype=torch.float64)
        c = torch.tensor([rng.uniform(0.0, 2 * math.pi) for _ in range(13)], dtype=torch.float64)
        # calibration: centre, partially whiten (eigenvalue floor), scale to mean channel variance 1
        v = _calibration_colours()
        h = torch.sin(v @ A.T + c)
        mu = h.mean(0)
        cov = (h - mu).T @ (h - mu) / len(h)
        e, Q = torch.linalg.eigh(cov)
        W = Q @ torch.diag((e + whiten_floor * e.max()) ** -0.5) @ Q.T
        vis = (v - b) @ M.T
        nul = (h - mu) @ W.T @ N.T
        alpha = math.sqrt(max(1e-6, (1.0 - vis.var(0).mean().item()) / nul.var(0).mean().item()))
        self.F, self.b, self.M, self.N = F, b, M, N
        self.A, self.c, self.mu, self.W, self.alpha = A, c, mu, W, alpha
        self._dev = {}

    def _t(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._dev:
            cv = lambda t: t.to(device=device, dtype=dtype)
            self._dev[key] = dict(F=cv(self.F), b=cv(self.b), Mt=cv(self.M.T), At=cv(self.A.T), c=cv(self.c),
                                  mu=cv(self.mu), WtNt=cv(self.alpha * (self.W.T @ self.N.T)))
        return self._dev[key]

    def lift(self, v):
        """preview RGB [..., 3] -> latent [..., 16]"""
        k = self._t(v.device, v.dtype)
        return (v - k["b"]) @ k["Mt"] + (torch.sin(v @ k["At"] + k["c"]) - k["mu"]) @ k["WtNt"]

    def project(self, z):
        """latent [..., 16] -> preview RGB [..., 3] (ComfyUI's Latent2RGB formula, before (v+1)/2)"""
        k = self._t(z.device, z.dtype)
        return z @ k["F"] + k["b"]

    def info(self):
        return {"version": LATENT_MAP_VERSION, "alpha": self.alpha}


_MAP = None


def latent_map() -> LatentMap:
    global _MAP
    if _MAP is None:
        _MAP = LatentMap()
    return _MAP


def latents_to_rgb(z):
    """processed latents [B, 16, T, H, W] (or [16, T, H, W]) -> uint8 preview RGB [..., T, H, W, 3]"""
    v = latent_map().project(z.movedim(-4, -1).float())
    return ((v + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# scenes
# ---------------------------------------------------------------------------------------------
def _bounce(p0, vel, lo, hi, t):
    """positions [B, T] of a point moving at vel inside [lo, hi] with specular reflection"""
    span = (hi - lo)[:, None]
    u = torch.remainder(p0[:, None] - lo[:, None] + vel[:, None] * t[None], 2 * span)
    return lo[:, None] + span - (u - span).abs()


def render(B, T, gen=None, cfg: SceneConfig | None = None, device="cpu"):
    """-> (rgb [B, T, H, W, 3] in [-1, 1], info).  info: still [B], sprites [B] (count), active [B, K],
    centers [B, K, T, 2] (x, y), speed [B, K], cover [B, T, H, W] (union sprite coverage),
    background [B, H, W, 3]."""
    cfg = cfg or SceneConfig()
    dev = torch.device(device)
    H, W = cfg.height, cfg.width
    K = max(cfg.sprite_counts)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    def uni(lo, hi, *shape):
        return lo + (hi - lo) * rand(*shape)

    def randint(lo, hi, *shape):  # inclusive lo, exclusive hi
        return torch.randint(lo, hi, shape, generator=gen, device=dev)

    Y, X = torch.meshgrid(torch.arange(H, device=dev) + 0.5, torch.arange(W, device=dev) + 0.5, indexing="ij")
    X, Y = X[None], Y[None]  # [1, H, W]

    # ---- static background: two muted colours mixed by a texture in [0, 1]
    c1 = uni(BG_LO, BG_HI, B, 3)
    c2 = (c1 + uni(-BG_DELTA, BG_DELTA, B, 3)).clamp(*BG_CLAMP)
    kind = randint(0, 4, B)
    ang = uni(0, math.pi, B)[:, None, None]
    along = X * torch.cos(ang) + Y * torch.sin(ang)  # [B, H, W]
    period = uni(*cfg.stripe_period, B)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * along / period + uni(0, 2 * math.pi, B)[:, None, None])
    cell = randint(cfg.checker_cell[0], cfg.checker_cell[1] + 1, B).float()[:, None, None]
    off = uni(0, 8, B, 2)
    checker = (torch.floor((X + off[:, 0, None, None]) / cell) + torch.floor((Y + off[:, 1, None, None]) / cell)) % 2
    checker = 0.1 + 0.8 * checker
    bc = rand(B, 3, 2) * torch.tensor([W, H], device=dev, dtype=torch.float32)
    bsig = uni(*cfg.blob_sigma, B, 3)
    d2 = (X[:, None] - bc[..., 0, None, None]) ** 2 + (Y[:, None] - bc[..., 1, None, None]) ** 2  # [B, 3, H, W]
    blobs = torch.exp(-d2 / (2 * bsig[..., None, None] ** 2)).sum(1).clamp(0, 1)
    ramp = ((along - along.amin((1, 2), keepdim=True)) / (along.amax((1, 2), keepdim=True)
                                                         - along.amin((1, 2), keepdim=True)).clamp_min(1e-6))
    tex = torch.stack([checker, stripes, blobs, ramp], 1).gather(1, kind[:, None, None, None].expand(B, 1, H, W))[:, 0]
    bg = torch.lerp(c1[:, None, None, :], c2[:, None, None, :], tex[..., None])  # [B, H, W, 3]
    video = bg[:, None].expand(B, T, H, W, 3).clone()

    # ---- sprites (painter's order)
    counts = torch.tensor(cfg.sprite_counts, device=dev)[randint(0, len(cfg.sprite_counts), B)]
    still = rand(B) < cfg.p_still
    t = torch.arange(T, device=dev, dtype=torch.float32)
    cover = torch.zeros(B, T, H, W, device=dev)
    pal = torch.tensor(PALETTE, device=dev)
    centers, speeds, actives = [], [], []
    for k in range(K):
        on = (counts > k).float()
        rad = uni(*cfg.radius, B)
        square = rand(B) < 0.5
        col = pal[randint(0, len(PALETTE), B)]
        spd = uni(*cfg.speed, B) * (~still & (rand(B) >= cfg.p_sprite_still)).float()
        th = uni(0, 2 * math.pi, B)
        lo_x, hi_x, lo_y, hi_y = rad, W - rad, rad, H - rad
        px = _bounce(uni(0, 1, B) * (hi_x - lo_x) + lo_x, spd * torch.cos(th), lo_x, hi_x, t)  # [B, T]
        py = _bounce(uni(0, 1, B) * (hi_y - lo_y) + lo_y, spd * torch.sin(th), lo_y, hi_y, t)
        if cfg.p_cross > 0:  # straight through the frame, inside it at mid-clip (no draws when off)
            cross = (rand(B) < cfg.p_cross) & (spd > 0)
            cs = uni(*cfg.cross_speed, B)
            mid = rand(B, 2) * torch.tensor([W, H], device=dev, dtype=torch.float32)
            tc = t[None] - (T - 1) / 2
            px = torch.where(cross[:, None], mid[:, :1] + (cs * torch.cos(th))[:, None] * tc, px)
            py = torch.where(cross[:, None], mid[:, 1:] + (cs * torch.sin(th))[:, None] * tc, py)
            spd = torch.where(cross, cs, spd)
        dx = X[:, None] - px[..., None, None]  # [B, T, H, W]
        dy = Y[:, None] - py[..., None, None]
        r = rad[:, None, None, None]
        sdf = torch.where(square[:, None, None, None], torch.maximum(dx.abs(), dy.abs()) - 0.88 * r,
                          torch.sqrt(dx * dx + dy * dy) - r)
        a = (0.5 - sdf).clamp(0, 1) * on[:, None, None, None]  # 1-px anti-aliased edge
        video = torch.lerp(video, col[:, None, None, None, :].expand_as(video), a[..., None])
        cover = torch.maximum(cover, a)
        centers.append(torch.stack([px, py], -1))
        speeds.append(spd * on)
        actives.append(on > 0)
    info = dict(still=still, sprites=counts, active=torch.stack(actives, 1), centers=torch.stack(centers, 1),
                speed=torch.stack(speeds, 1), cover=cover, background=bg)
    return video, info


def make_latents(B, T, gen=None, cfg: SceneConfig | None = None, device="cpu", return_info=False):
    """processed latents [B, 16, T, H, W] (the model's space); optionally also (rgb, info)."""
    rgb, info = render(B, T, gen, cfg, device)
    z = latent_map().lift(rgb).permute(0, 4, 1, 2, 3).contiguous()
    return (z, rgb, info) if return_info else z
