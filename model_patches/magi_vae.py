"""MAGI-1's ViT VAE (Sand AI, "ViTVAE") in plain PyTorch, and a ComfyUI VAE around it.

The network (read from SandAI-org/MAGI-1 inference/model/vae/vae_module.py; written anew here):
- Encoder: Conv3d patch embed (4 frames x 8 x 8 px per token), a cls token, a learned position
  table for the reference grid (video_length/4, video_size/8, video_size/8) that is resized
  trilinearly to other grids, ViT blocks, LayerNorm, Linear -> 2*z (mean, logvar); cls dropped.
- Decoder: Linear z -> dim, cls token, position table, ViT blocks, LayerNorm, cls dropped, each
  token unfolded into a 4x8x8 block of dim/256 channels, Conv3d 3x3x3 -> RGB.
- Block ("ln_in_attn"): no norm before attention; q, k and v are each normalised per head by a
  parameter-free (x - mean) / (std + 1e-5) with the biased std; MLP (GELU) after LayerNorm norm2.

Not causal: 4k frames <-> k latent frames; an image is encoded as 4 copies of itself. Latents
here are raw (posterior mean); the DiT's latents are raw * 0.18215 (magi_loader.MagiLatentFormat applies it).
MAGI decodes and encodes in tiles (infra/parallelism/tile_parallel.py); `tiled_apply` is that
tiling. Parameter names equal the official diffusers-format checkpoint's (`expected_vae_keys`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils

from ..cache_core.errors import InputError

ops = comfy.ops.disable_weight_init   # no init at build time; ComfyUI casts weights when offloading
INPUT = "vae_name"                    # the loader input every checkpoint problem is blamed on
WORKING_DTYPES = [torch.bfloat16, torch.float32]   # MAGI runs the VAE in bf16; fp32 where bf16 is slow
PATCH_KEY = "encoder.patch_embed.proj.weight"

# MAGI's tiles (video_process.py:278-303, 347-387): decode 32x32 latents x 3 latent frames, encode
# 256x256 px x 12 frames, 25% spatial overlap, none in time. Upstream's temporal tile is fps // 2
# pixel frames (so it depends on the fps setting); we fix it at 12 frames, the 24-fps value.
DECODE_TILE = (3, 32, 32)      # latent (t, h, w)
DECODE_OVERLAP = (8, 8)        # latent (h, w): 32 * 0.25
ENCODE_TILE = (12, 256, 256)   # pixel (frames, h, w)
ENCODE_OVERLAP = (64, 64)      # pixel (h, w): 256 * 0.25


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class MagiVAEConfig:
    embed_dim: int = 1024
    depth: int = 24            # encoder and decoder alike (one ddconfig builds both upstream)
    num_heads: int = 16
    mlp_hidden: int = 4096     # int(embed_dim * mlp_ratio)
    z_channels: int = 16
    patch_size: int = 8
    patch_length: int = 4
    video_size: int = 256      # reference grid of the position tables, in pixels / frames
    video_length: int = 16
    in_channels: int = 3
    eps: float = 1e-5          # ManualLayerNorm's eps and nn.LayerNorm's default

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.embed_dim % self.patch_volume or self.unpatch_channels < 1:
            raise ValueError(f"embed_dim {self.embed_dim} is not a positive multiple of the patch volume "
                             f"{self.patch_volume} (the decoder unfolds each token into it)")
        if min(self.ref_grid) < 1:
            raise ValueError(f"reference grid {self.ref_grid} is empty")

    @property
    def patch_volume(self) -> int:
        return self.patch_length * self.patch_size * self.patch_size

    @property
    def unpatch_channels(self) -> int:
        return self.embed_dim // self.patch_volume      # 1024 / 256 = 4 for the real VAE

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ref_grid(self) -> tuple[int, int, int]:
        s = self.video_size // self.patch_size
        return (self.video_length // self.patch_length, s, s)


def tiny_vae_config() -> MagiVAEConfig:
    """Small random-weight VAE for tests. embed_dim 256, not 64: the decoder unfolds each token into
    4*8*8 = 256 values, so dim 64 would leave 0 channels. 4 heads = 256 // 64, so a tiny file needs
    no config.json. Reference grid (4, 8, 8): other sizes exercise the position-table resize."""
    return MagiVAEConfig(embed_dim=256, depth=2, num_heads=4, mlp_hidden=1024, z_channels=16,
                         patch_size=8, patch_length=4, video_size=64, video_length=16)


def vae_config_json(cfg: MagiVAEConfig) -> dict:
    """The config.json the official loader reads (diffusers ConfigMixin of vae_model.py's ViTVAE)."""
    return {"_class_name": "ViTVAE", "model_type": "vit", "ddconfig": {
        "video_size": cfg.video_size, "video_length": cfg.video_length, "patch_size": cfg.patch_size,
        "patch_length": cfg.patch_length, "in_chans": cfg.in_channels, "z_chans": cfg.z_channels,
        "double_z": True, "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_hidden / cfg.embed_dim, "qkv_bias": True, "ln_in_attn": True,
        "conv_last_layer": True, "with_cls_token": True}}


def _describe_keys(sd: dict) -> str:
    keys = sorted(sd)
    if not keys:
        return "the file holds no tensors"
    hint = ""
    if "decoder.conv_in.conv.weight" in sd or "decoder.conv1.weight" in sd:
        hint = " (that looks like a causal-conv video VAE such as Wan's, not MAGI-1's ViT VAE)"
    elif "decoder.conv_in.weight" in sd:
        hint = " (that looks like a convolutional image/video VAE, not MAGI-1's ViT VAE)"
    return f"{len(keys)} keys starting with {', '.join(keys[:3])}{hint}"


def _count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.blocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(ids) + 1 if ids else 0


def vae_config_from_state_dict(sd: dict, config: dict | None = None) -> MagiVAEConfig:
    """Sizes from tensor shapes; heads (not visible in shapes) from config.json when given, else
    dim // 64 (the real VAE: 1024 / 16). `config` is config.json's dict or its "ddconfig"."""
    if PATCH_KEY not in sd:
        raise InputError(INPUT, f"not a MAGI-1 ViT VAE: no {PATCH_KEY}; {_describe_keys(sd)}")
    config = dict(config or {})
    if config.get("_class_name", "ViTVAE") != "ViTVAE":
        # a config.json beside the weights may belong to something else (a DiT, T5): not ours
        logging.warning("MAGI-1 VAE: ignoring a config.json for %s", config["_class_name"])
        config = {}
    if config.get("model_type", "vit") != "vit" and "ddconfig" in config:
        raise InputError(INPUT, f"config.json model_type {config['model_type']!r} is not supported (only 'vit')")
    dd = dict(config.get("ddconfig", config))
    for flag, ok in (("use_rope", False), ("use_final_proj", False), ("norm_code", False),
                     ("ln_in_attn", True), ("with_cls_token", True), ("double_z", True)):
        if flag in dd and bool(dd[flag]) != ok:
            raise InputError(INPUT, f"config.json sets {flag}={dd[flag]}; only MAGI-1's released "
                                    f"layout ({flag}={ok}) is supported")
    for key, what in (("encoder.blocks.0.norm1.weight", "a pre-attention norm1 (ln_in_attn off)"),
                      ("decoder.final_proj.weight", "a decoder final_proj (use_final_proj on)")):
        if key in sd:
            raise InputError(INPUT, f"this ViT VAE has {what}; only MAGI-1's released layout is supported")
    w = sd[PATCH_KEY]
    if w.ndim != 5 or w.shape[3] != w.shape[4]:
        raise InputError(INPUT, f"{PATCH_KEY} has shape {tuple(w.shape)}; expected "
                                f"(dim, 3, patch_length, patch, patch)")
    dim, cin, pl, ps = int(w.shape[0]), int(w.shape[1]), int(w.shape[2]), int(w.shape[3])
    depth, dec_depth = _count_blocks(sd, "encoder"), _count_blocks(sd, "decoder")
    if depth != dec_depth:
        raise InputError(INPUT, f"the encoder has {depth} blocks and the decoder {dec_depth}; "
                                f"MAGI-1's VAE has the same number in both")
    needed = ("decoder.proj_in.weight", "encoder.pos_embed", "encoder.blocks.0.mlp.fc1.weight")
    for key in needed:
        if key not in sd:
            raise InputError(INPUT, f"not a complete MAGI-1 ViT VAE: no {key}; {_describe_keys(sd)}")
    z = int(sd["decoder.proj_in.weight"].shape[1])
    mlp_hidden = int(sd["encoder.blocks.0.mlp.fc1.weight"].shape[0])
    # The position table covers the reference grid (+1 cls row). Its length alone does not fix the
    # (t, s, s) split: take video_length from config.json (upstream default 16), solve for s.
    tokens = int(sd["encoder.pos_embed"].shape[1]) - 1
    video_length = int(dd.get("video_length", 16))
    t_ref = max(1, video_length // pl)
    if "video_size" in dd:
        video_size = int(dd["video_size"])
    else:
        s = math.isqrt(max(0, tokens // t_ref))
        if t_ref * s * s != tokens:
            raise InputError(INPUT, f"encoder.pos_embed has {tokens} grid rows, not {t_ref} x s x s; "
                                    f"put the VAE's config.json (video_size, video_length) beside it")
        video_size = s * ps
    heads = int(dd.get("num_heads", max(1, dim // 64)))
    for key, have in (("embed_dim", dim), ("z_chans", z), ("patch_size", ps), ("patch_length", pl),
                      ("depth", depth), ("in_chans", cin)):
        if key in dd and int(dd[key]) != have:
            raise InputError(INPUT, f"config.json says {key}={dd[key]} but the weights have {have}")
    try:
        return MagiVAEConfig(embed_dim=dim, depth=depth, num_heads=heads, mlp_hidden=mlp_hidden,
                             z_channels=z, patch_size=ps, patch_length=pl, video_size=video_size,
                             video_length=video_length, in_channels=cin)
    except ValueError as e:
        raise InputError(INPUT, f"not a usable MAGI-1 ViT VAE: {e}") from None


def expected_vae_keys(cfg: MagiVAEConfig) -> dict[str, tuple]:
    """Key -> shape of the official checkpoint (module names of vae_model.py's ViTVAE)."""
    d, h, z = cfg.embed_dim, cfg.mlp_hidden, cfg.z_channels
    rows = 1 + math.prod(cfg.ref_grid)            # cls row + reference grid
    s: dict[str, tuple] = {
        "encoder.patch_embed.proj.weight": (d, cfg.in_channels, cfg.patch_length, cfg.patch_size, cfg.patch_size),
        "encoder.patch_embed.proj.bias": (d,),
        "encoder.cls_token": (1, 1, d),
        "encoder.pos_embed": (1, rows, d),
    }
    for part in ("encoder", "decoder"):
        if part == "decoder":
            s.update({"decoder.proj_in.weight": (d, z), "decoder.proj_in.bias": (d,),
                      "decoder.cls_token": (1, 1, d), "decoder.pos_embed": (1, rows, d)})
        for i in range(cfg.depth):
            p = f"{part}.blocks.{i}."
            s.update({p + "attn.qkv.weight": (3 * d, d), p + "attn.qkv.bias": (3 * d,),
                      p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                      p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                      p + "mlp.fc1.weight": (h, d), p + "mlp.fc1.bias": (h,),
                      p + "mlp.fc2.weight": (d, h), p + "mlp.fc2.bias": (d,)})
        s.update({f"{part}.norm.weight": (d,), f"{part}.norm.bias": (d,)})
    s.update({"encoder.last_layer.weight": (2 * z, d), "encoder.last_layer.bias": (2 * z,),
              "decoder.last_layer.weight": (cfg.in_channels, cfg.unpatch_channels, 3, 3, 3),
              "decoder.last_layer.bias": (cfg.in_channels,)})
    return s


def check_vae_keys(sd: dict, cfg: MagiVAEConfig) -> None:
    """Strict check against the schema: names and shapes must match exactly."""
    want = expected_vae_keys(cfg)
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shaped = [f"{k} {tuple(sd[k].shape)} (expected {want[k]})"
              for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or unexpected or shaped:
        def few(items):
            return ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
        parts = [f"{len(v)} {name}: {few(v)}" for name, v in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if v]
        raise InputError(INPUT, f"does not match MAGI-1's ViT VAE layout (dim {cfg.embed_dim}, depth "
                                f"{cfg.depth}, z {cfg.z_channels}): " + "; ".join(parts))


# ----------------------------------------------------------------------------- network

def manual_layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MAGI's ManualLayerNorm over the last dim: (x - mean) / (std + eps), biased std. The eps is
    added to the std, outside the sqrt, so this is not F.layer_norm. Computed in fp32 at least."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = xf.mean(-1, keepdim=True)
    std = xf.std(-1, keepdim=True, correction=0)
    return ((xf - mean) / (std + eps)).to(x.dtype)


def resize_pos_embed(pos: torch.Tensor, src_grid, dst_grid) -> torch.Tensor:
    """[1, 1+N, D] table (cls row first) for src_grid -> the same for dst_grid: the grid rows are
    resized trilinearly with align_corners=False, the cls row is kept (vae_module.py:401-407)."""
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos
    d = pos.shape[-1]
    grid = pos[:, 1:].float().reshape(1, *src_grid, d).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=dst_grid, mode="trilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 4, 1).reshape(1, -1, d).to(pos.dtype)
    return torch.cat([pos[:, :1], grid], dim=1)


def unpatchify(x: torch.Tensor, grid, patch, channels: int) -> torch.Tensor:
    """[B, t*h*w, pT*pH*pW*C] tokens, features ordered (pT, pH, pW, C) with C fastest ->
    [B, C, t*pT, h*pH, w*pW] (vae_module.py:713-714)."""
    (t, h, w), (pt, ph, pw) = grid, patch
    b = x.shape[0]
    x = x.reshape(b, t, h, w, pt, ph, pw, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, channels, t * pt, h * ph, w * pw)


def attention(q, k, v):
    """Full (non-causal) attention, scale 1/sqrt(head_dim) as flash_attn's default. [B, H, N, d]."""
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__()
        d, self.heads, self.eps = cfg.embed_dim, cfg.num_heads, cfg.eps
        self.qkv = ops.Linear(d, 3 * d, bias=True, dtype=dtype, device=device)
        self.proj = ops.Linear(d, d, bias=True, dtype=dtype, device=device)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads)
        qkv = manual_layer_norm(qkv, self.eps)            # per head, and V too (vae_module.py:281-284)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)    # [B, H, N, d] each
        out = attention(q, k, v).transpose(1, 2).reshape(b, n, c)   # heads then head_dim, as upstream
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__()
        self.fc1 = ops.Linear(cfg.embed_dim, cfg.mlp_hidden, dtype=dtype, device=device)
        self.fc2 = ops.Linear(cfg.mlp_hidden, cfg.embed_dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))              # nn.GELU(): exact erf form


class Block(nn.Module):
    """ln_in_attn block: the attention input is not normalised (norm1 is Identity upstream)."""

    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__()
        self.attn = Attention(cfg, dtype, device)
        self.norm2 = ops.LayerNorm(cfg.embed_dim, eps=cfg.eps, dtype=dtype, device=device)
        self.mlp = Mlp(cfg, dtype, device)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(self.norm2(x))


class _Trunk(nn.Module):
    """What encoder and decoder share: cls token, position table, blocks, final LayerNorm."""

    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        d, rows = cfg.embed_dim, 1 + math.prod(cfg.ref_grid)
        self.cls_token = nn.Parameter(torch.empty(1, 1, d, dtype=dtype, device=device))
        self.pos_embed = nn.Parameter(torch.empty(1, rows, d, dtype=dtype, device=device))
        self.blocks = nn.ModuleList([Block(cfg, dtype, device) for _ in range(cfg.depth)])
        self.norm = ops.LayerNorm(d, eps=cfg.eps, dtype=dtype, device=device)

    def run(self, x, grid):
        """[B, N, D] tokens on `grid` -> normed tokens, cls dropped."""
        # .to(x): plain parameters are not cast by comfy.ops, so follow the input's device/dtype
        cls = self.cls_token.to(x).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + resize_pos_embed(self.pos_embed.to(x), self.cfg.ref_grid, grid)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__()
        k = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = ops.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=k, stride=k, dtype=dtype, device=device)


class ViTEncoder(_Trunk):
    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__(cfg, dtype, device)
        self.patch_embed = _PatchEmbed(cfg, dtype, device)
        self.last_layer = ops.Linear(cfg.embed_dim, 2 * cfg.z_channels, dtype=dtype, device=device)

    def forward(self, x):
        """[B, 3, T, H, W] -> moments [B, 2z, T/4, H/8, W/8] (mean first, then logvar)."""
        x = self.patch_embed.proj(x)
        b, _, t, h, w = x.shape
        x = self.last_layer(self.run(x.flatten(2).transpose(1, 2), (t, h, w)))
        return x.reshape(b, t, h, w, -1).permute(0, 4, 1, 2, 3)


class ViTDecoder(_Trunk):
    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__(cfg, dtype, device)
        self.proj_in = ops.Linear(cfg.z_channels, cfg.embed_dim, dtype=dtype, device=device)
        self.last_layer = ops.Conv3d(cfg.unpatch_channels, cfg.in_channels, kernel_size=3, padding=1,
                                     dtype=dtype, device=device)

    def forward(self, z):
        """[B, z, t, h, w] -> pixels [B, 3, 4t, 8h, 8w] (unclamped, about [-1, 1])."""
        b, c, t, h, w = z.shape
        x = self.run(self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)), (t, h, w))
        cfg = self.cfg
        x = unpatchify(x, (t, h, w), (cfg.patch_length, cfg.patch_size, cfg.patch_size), cfg.unpatch_channels)
        return self.last_layer(x)


# ----------------------------------------------------------------------------- tiling

def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins as tile_parallel.py lays them: ceil(size / stride) tiles, `stride` apart. The
    last one may lie wholly inside its predecessor (e.g. size 32, tile 32, stride 24 -> 0, 24);
    kept, so the result equals the official pipeline's."""
    return [i * stride for i in range(max(1, -(-size // stride)))]


def blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """In place on b: its first e entries along `dim` fade from a's last e entries to b's own,
    b[y] = a[-e + y] * (1 - y/e) + b[y] * (y/e), e = min(extent, both lengths)
    (tile_parallel.py:230-252). Done in fp32."""
    e = min(extent, a.shape[dim], b.shape[dim])
    if e <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = e
    w = (torch.arange(e, device=b.device, dtype=torch.float32) / e).reshape(shape)
    head = b.narrow(dim, 0, e)
    tail = a.narrow(dim, a.shape[dim] - e, e).to(b.device)
    head.copy_(tail.float() * (1 - w) + head.float() * w)
    return b


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile, overlap,
                out_len: Callable[[int, int], int], blend_blended: bool, device=None, dtype=None,
                output_device=None, on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """MAGI's tiled encode/decode (tile_parallel.py:254-448) for x [B, C, T, H, W].

    tile = (t, h, w) and overlap = (h, w) in input units; no temporal overlap (MAGI uses none, so
    temporal tiles are simply concatenated, and each slab of `t` frames is finished and moved to
    `output_device` before the next). Tiles start (tile - overlap) apart; each tile's output is
    cut to out_len(tile - overlap) except at the far edge, and its first out_len(overlap) rows and
    columns are blended with its upper and left neighbours. out_len(n, axis) maps an input length
    to an output length (axis 0 time, 1-2 space). Upstream's encode blends against neighbours that
    were already blended (it writes in place), its decode against raw ones (it clones):
    `blend_blended` picks which.
    """
    tt, th, tw = tile
    oh, ow = overlap
    if not (0 <= oh < th and 0 <= ow < tw and tt > 0):
        raise ValueError(f"tile {tuple(tile)} with overlap {tuple(overlap)}: need 0 <= overlap < tile")
    eh, ew = out_len(oh, 1), out_len(ow, 2)                    # blend extents in output units
    lh, lw = out_len(th - oh, 1), out_len(tw - ow, 2)          # kept rows / columns per tile
    hs, ws = _starts(x.shape[3], th, th - oh), _starts(x.shape[4], tw, tw - ow)
    slabs = []
    for t0 in range(0, x.shape[2], tt):
        above: list[torch.Tensor] = []                         # neighbours from the previous row
        rows = []
        for i, h0 in enumerate(hs):
            current, pieces = [], []
            for j, w0 in enumerate(ws):
                part = x[:, :, t0:t0 + tt, h0:h0 + th, w0:w0 + tw].to(device=device, dtype=dtype)
                raw = fn(part)
                out = raw if blend_blended else raw.clone()
                if i > 0:
                    blend(above[j], out, eh, dim=3)
                if j > 0:
                    blend(current[j - 1], out, ew, dim=4)
                current.append(out if blend_blended else raw)
                pieces.append(out[:, :, :, :lh, :lw])
                if on_tile is not None:
                    on_tile()
            above = current
            rows.append(torch.cat(pieces, dim=4))
        slab = torch.cat(rows, dim=3)
        slabs.append(slab if output_device is None else slab.to(output_device))
        del above, rows
    return torch.cat(slabs, dim=2)


def tile_count(shape, tile, overlap) -> int:
    """How many tiles tiled_apply runs for an input of `shape` (for progress bars)."""
    tt, th, tw = tile
    return (-(-shape[2] // tt)) * len(_starts(shape[3], th, th - overlap[0])) * len(_starts(shape[4], tw, tw - overlap[1]))


class MagiViTVAE(nn.Module):
    """The network, with upstream's module names (`encoder`, `decoder`)."""

    def __init__(self, cfg: MagiVAEConfig, dtype=None, device=None):
        super().__init__()
        self.config = cfg
        self.encoder = ViTEncoder(cfg, dtype, device)
        self.decoder = ViTDecoder(cfg, dtype, device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, T, H, W] in [-1, 1], T a multiple of 4 (or 1: an image, encoded as 4
        copies as upstream does) -> raw posterior mean [B, z, T/4, H/8, W/8], not scaled."""
        cfg = self.config
        t, h, w = x.shape[2:]
        if t == 1:
            x = x.expand(-1, -1, cfg.patch_length, -1, -1)
        elif t % cfg.patch_length:
            raise ValueError(f"{t} frames: MAGI's VAE encodes multiples of {cfg.patch_length} (or 1)")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"{h}x{w} pixels: height and width must be multiples of {cfg.patch_size}")
        return self.encoder(x)[:, :cfg.z_channels]                  # posterior mode = mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent [B, z, t, h, w] -> pixels [B, 3, 4t, 8h, 8w], about [-1, 1] (not clamped)."""
        return self.decoder(z)

    def _out_len(self, decode: bool):
        pl, ps = self.config.patch_length, self.config.patch_size
        if decode:
            return lambda n, axis: n * (pl if axis == 0 else ps)
        return lambda n, axis: n // (pl if axis == 0 else ps)

    def decode_tiled(self, z: torch.Tensor, tile=DECODE_TILE, overlap=DECODE_OVERLAP, device=None,
                     dtype=None, output_device=None, on_tile=None) -> torch.Tensor:
        """decode() tile by tile, as MAGI decodes (latent tiles, default 3 x 32 x 32, 8 overlap)."""
        return tiled_apply(self.decode, z, tile, overlap, self._out_len(True), blend_blended=False,
                           device=device, dtype=dtype, output_device=output_device, on_tile=on_tile)

    def encode_tiled(self, x: torch.Tensor, tile=ENCODE_TILE, overlap=ENCODE_OVERLAP, device=None,
                     dtype=None, output_device=None, on_tile=None) -> torch.Tensor:
        """encode() tile by tile, as MAGI encodes (pixel tiles, default 12 x 256 x 256, 64 overlap)."""
        cfg = self.config
        if tile[0] % cfg.patch_length or any(v % cfg.patch_size for v in (*tile[1:], *overlap)):
            raise ValueError(f"encode tile {tuple(tile)} / overlap {tuple(overlap)}: frames must be a multiple "
                             f"of {cfg.patch_length} and pixels of {cfg.patch_size}")
        if x.shape[2] == 1:
            x = x.expand(-1, -1, cfg.patch_length, -1, -1)          # an image: 4 copies, one latent frame
        return tiled_apply(self.encode, x, tile, overlap, self._out_len(False), blend_blended=True,
                           device=device, dtype=dtype, output_device=output_device, on_tile=on_tile)


# ----------------------------------------------------------------------------- ComfyUI VAE

class MagiVAE(comfy.sd.VAE):
    """MAGI-1's VAE as a ComfyUI VAE: stock VAEDecode / VAEEncode (and the tiled ones) work.

    decode: raw latent [B, 16, t, h, w] -> IMAGE frames [B, 4t, 8h, 8w, 3] in [0, 1] (5-D, like
    ComfyUI's Wan VAE; VAEDecode folds it to [B*4t, H, W, 3]). encode: IMAGE [N, H, W, 3] in
    [0, 1] -> raw latent [1, 16, ceil(N/4), H/8, W/8]; N is padded to a multiple of 4 with the
    last frame, so one image is encoded as 4 copies (MAGI's i2v prefix). Both always tile the way
    MAGI does (DECODE_TILE / ENCODE_TILE) unless given other tiles by the *_tiled calls.
    """

    def __init__(self, model: MagiViTVAE, device=None, dtype=None):
        # comfy.sd.VAE.__init__ is not called: it detects a layout from the state dict. Set what
        # its other methods and ComfyUI nodes read (checked against 0.3.75 and the newest core).
        cfg = model.config
        self.config = cfg
        self.latent_channels, self.latent_dim, self.output_channels = cfg.z_channels, 3, cfg.in_channels
        pl, ps = cfg.patch_length, cfg.patch_size
        # (frame formula, h, w) as ComfyUI's video VAEs; MAGI is not causal: 4k frames <-> k latents
        self.upscale_ratio = (lambda a: a * pl, ps, ps)
        self.downscale_ratio = (lambda a: -(-a // pl), ps, ps)     # ceil: encode pads to 4k frames
        self.upscale_index_formula = self.downscale_index_formula = (pl, ps, ps)
        # in place (the newest core's nodes ignore the return value) and returned (0.3.75's use it)
        self.process_input = lambda image: image * 2.0 - 1.0
        self.process_output = lambda image: image.add_(1.0).div_(2.0).clamp_(0.0, 1.0)
        self.working_dtypes = list(WORKING_DTYPES)
        self.disable_offload = False
        self.not_video = False
        self.crop_input = True
        self.extra_1d_channel = None
        self.pad_channel_value = None
        self.handles_tiling = False        # no code path of the base class runs: we override them
        self.format_encoded = None
        self.size = None
        self.memory_used_decode = lambda shape, dtype: self._memory(shape, dtype, DECODE_TILE, True)
        self.memory_used_encode = lambda shape, dtype: self._memory(shape, dtype, ENCODE_TILE, False)

        self.device = device if device is not None else mm.vae_device()
        offload_device = mm.vae_offload_device()
        self.vae_dtype = dtype if dtype is not None else mm.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model = model.eval().to(self.vae_dtype)
        if hasattr(mm, "archive_model_dtypes"):                      # newest core only
            mm.archive_model_dtypes(self.first_stage_model)
        self.output_device = mm.intermediate_device()
        self.patcher = comfy.model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device,
                                                        offload_device=offload_device)
        logging.info("MAGI-1 VAE load device: %s, offload device: %s, dtype: %s",
                     self.device, offload_device, self.vae_dtype)
        self.model_size()

    # --- sizes ComfyUI nodes ask for
    def spacial_compression_decode(self):
        return self.config.patch_size

    def spacial_compression_encode(self):
        return self.config.patch_size

    def temporal_compression_decode(self):
        return self.config.patch_length

    def vae_output_dtype(self):
        # newest core: model_management.intermediate_dtype(); 0.3.75 returns float32
        return getattr(mm, "intermediate_dtype", lambda: torch.float32)()

    def _memory(self, shape, dtype, tile, decode: bool) -> float:
        """Device bytes for one tile plus one finished slab of output (tiles run one at a time)."""
        cfg = self.config
        if decode:
            t, h, w = (min(s, ts) for s, ts in zip(shape[2:5], tile))
            full_h, full_w, frames = shape[3] * cfg.patch_size, shape[4] * cfg.patch_size, t * cfg.patch_length
        else:
            t, h, w = (max(1, min(s, ts) // p) for s, ts, p in
                       zip(shape[2:5], tile, (cfg.patch_length, cfg.patch_size, cfg.patch_size)))
            full_h, full_w, frames = shape[3], shape[4], 0
        tokens = t * h * w + 1
        acts = tokens * (12 * cfg.embed_dim + 2 * cfg.mlp_hidden) * mm.dtype_size(dtype)
        pixels = t * h * w * cfg.patch_volume * (cfg.unpatch_channels + 2 * cfg.in_channels) * 4
        slab = frames * full_h * full_w * cfg.in_channels * 4 * 2   # blended rows + the slab itself
        return acts + pixels + slab + 64 * 1024 ** 2

    def _device_context(self):
        ctx = getattr(mm, "cuda_device_context", None)                # newest core only
        return ctx(self.device) if ctx is not None else contextlib.nullcontext()

    def _progress(self, total: int):
        pbar = comfy.utils.ProgressBar(total)

        def step():
            mm.throw_exception_if_processing_interrupted()
            pbar.update(1)
        return step

    # --- decode
    @torch.no_grad()
    def _decode(self, samples, tile, overlap):
        self.throw_exception_if_invalid()
        if samples.ndim == 4:                                          # an image latent [B, z, h, w]
            samples = samples.unsqueeze(2)
        if samples.ndim != 5 or samples.shape[1] != self.latent_channels:
            raise InputError("samples", f"latent of shape {tuple(samples.shape)}; MAGI-1's VAE decodes "
                                        f"[B, {self.latent_channels}, frames, h, w]")
        mem = self._memory(samples.shape, self.vae_dtype, tile, True)
        mm.load_models_gpu([self.patcher], memory_required=mem, force_full_load=self.disable_offload)
        step = self._progress(samples.shape[0] * tile_count(samples.shape, tile, overlap))
        out = []
        with self._device_context():
            for b in range(samples.shape[0]):
                px = self.first_stage_model.decode_tiled(samples[b:b + 1], tile=tile, overlap=overlap,
                                                         device=self.device, dtype=self.vae_dtype,
                                                         output_device=self.output_device, on_tile=step)
                out.append(self.process_output(px.to(dtype=self.vae_output_dtype())))
        return torch.cat(out).movedim(1, -1)                           # [B, 4t, H, W, 3]

    def decode(self, samples_in, vae_options={}):
        return self._decode(samples_in, DECODE_TILE, DECODE_OVERLAP)

    def decode_tiled(self, samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        """VAEDecodeTiled passes latent units. No temporal overlap (MAGI has none): overlap_t is ignored."""
        th = tile_y or tile_x or DECODE_TILE[1]
        tw = tile_x or tile_y or DECODE_TILE[2]
        o = DECODE_OVERLAP[0] if overlap is None else overlap
        o = min(o, th - 1, tw - 1)
        return self._decode(samples, (max(1, tile_t or DECODE_TILE[0]), th, tw), (o, o))

    # --- encode
    @torch.no_grad()
    def _encode(self, pixel_samples, tile, overlap):
        self.throw_exception_if_invalid()
        cfg = self.config
        px = pixel_samples[..., :cfg.in_channels]
        if px.ndim == 4:                                               # IMAGE [N, H, W, C]: one video
            px = px.unsqueeze(0)
        px = _crop_to_patches(px, cfg.patch_size)                      # [B, T, H, W, C]
        pad = -px.shape[1] % cfg.patch_length
        if pad:                                                        # repeat the last frame
            px = torch.cat([px, px[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        x = px.movedim(-1, 1)                                          # [B, 3, T, H, W]
        mem = self._memory(x.shape, self.vae_dtype, tile, False)
        mm.load_models_gpu([self.patcher], memory_required=mem, force_full_load=self.disable_offload)
        step = self._progress(x.shape[0] * tile_count(x.shape, tile, overlap))
        out = []
        with self._device_context():
            for b in range(x.shape[0]):
                lat = self.first_stage_model.encode_tiled(self.process_input(x[b:b + 1]), tile=tile,
                                                          overlap=overlap, device=self.device,
                                                          dtype=self.vae_dtype,
                                                          output_device=self.output_device, on_tile=step)
                out.append(lat.to(dtype=self.vae_output_dtype()))
        return torch.cat(out)

    def encode(self, pixel_samples, not_video=None):
        return self._encode(pixel_samples, ENCODE_TILE, ENCODE_OVERLAP)

    def encode_tiled(self, pixel_samples, tile_x=None, tile_y=None, overlap=None, tile_t=None,
                     overlap_t=None, not_video=None):
        """VAEEncodeTiled passes pixels and frames; sizes are rounded down to the patch grid."""
        ps, pl = self.config.patch_size, self.config.patch_length

        def snap(v, p):
            return max(p, v // p * p)
        th = snap(tile_y or tile_x or ENCODE_TILE[1], ps)
        tw = snap(tile_x or tile_y or ENCODE_TILE[2], ps)
        o = ENCODE_OVERLAP[0] if overlap is None else overlap // ps * ps
        o = min(o, th - ps, tw - ps)
        return self._encode(pixel_samples, (snap(tile_t or ENCODE_TILE[0], pl), th, tw), (o, o))


def _crop_to_patches(px: torch.Tensor, p: int) -> torch.Tensor:
    """Centre-crop H and W of [B, T, H, W, C] to multiples of p, as ComfyUI's VAEs crop (its own
    helper would also crop T of a 5-D input)."""
    for dim in (2, 3):
        keep = px.shape[dim] // p * p
        if keep != px.shape[dim]:
            px = px.narrow(dim, (px.shape[dim] % p) // 2, keep)
    return px


def load_magi_vae(sd: dict, config: dict | None = None, device=None, dtype=None) -> MagiVAE:
    """State dict (+ optional config.json dict) -> MagiVAE, after the strict key and shape check."""
    cfg = vae_config_from_state_dict(sd, config)
    check_vae_keys(sd, cfg)
    device = device if device is not None else mm.vae_device()
    dtype = dtype if dtype is not None else mm.vae_dtype(device, WORKING_DTYPES)
    model = MagiViTVAE(cfg, dtype=dtype)                 # built on the CPU; the patcher moves it
    model.load_state_dict(sd, strict=True)
    return MagiVAE(model, device=device, dtype=dtype)
