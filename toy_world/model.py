"""A self-contained, tiny Wan 2.1 T2V diffusion transformer (the SkyReels-V2-DF layout).

`ToyWan` has exactly the parameter names and shapes of the Wan 2.1 checkpoint layout that
ComfyUI's UNETLoader detects as WAN21_T2V (``comfy.model_detection``: ``head.modulation``
present, ``num_heads = dim // 128``, ``cross_attn_norm`` forced on, patch (1, 2, 2),
freq_dim 256, eps 1e-6), and it computes the same function as
``comfy.ldm.wan.model.WanModel`` (tests/host/test_toy_model_matches_comfy.py checks this):

* patch embedding = Conv3d(16, dim, (1,2,2)); output un-patchified in Wan's (p, q, r, c) order;
* sinusoidal timestep embedding in float32 (cos first), time MLP with SiLU, 6-way adaLN
  modulation per block, 2-way in the head (the head uses the time embedding before the
  projection, like Wan);
* self-attention with RMSNorm over the full width on q and k, 3-axis RoPE on interleaved
  pairs with the head dim split like Wan (d - 4*(d//6), 2*(d//6), 2*(d//6)), theta 10000;
* cross-attention to the text context through ``text_embedding`` (Linear, tanh-GELU, Linear);
* tanh-GELU FFN; LayerNorms without affine except ``norm3``.

Timesteps may be a scalar per sample ``[B]`` or per latent frame ``[B, F]`` (diffusion
forcing).  It depends only on torch so the trainer runs on a bare GPU machine.

Zero-context shortcut: the toy is only ever conditioned on an all-zero text context.  With
identical key/value rows the softmax weights are uniform, so cross-attention returns the value
row whatever the query: ``cross_attn(x, 0) = o(v(text_embedding(0)))``, a constant per block.
``context=None`` uses that closed form (exact, and much cheaper in training); passing a real
context tensor runs the full attention like ComfyUI does.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ToyWanConfig", "ToyWan", "save_safetensors", "load_safetensors", "load_toy_wan",
           "comfy_wan_model", "TEXT_DIM", "TEXT_LEN"]

TEXT_DIM = 4096  # umt5-xxl width: fixed by ComfyUI's Wan detection
TEXT_LEN = 512   # what ComfyUI's zero conditioning usually carries
HEAD_DIM = 128   # ComfyUI derives num_heads = dim // 128


@dataclass
class ToyWanConfig:
    dim: int = 256
    ffn_dim: int = 1024
    num_layers: int = 6
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    eps: float = 1e-6

    def __post_init__(self):
        if self.dim % HEAD_DIM:
            raise ValueError(f"dim must be a multiple of {HEAD_DIM} (ComfyUI sets num_heads = dim // 128)")

    @property
    def num_heads(self):
        return self.dim // HEAD_DIM

    def comfy_kwargs(self):
        """Constructor arguments for comfy.ldm.wan.model.WanModel, as ComfyUI's detection sets them."""
        return dict(model_type="t2v", patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=self.in_dim, dim=self.dim,
                    ffn_dim=self.ffn_dim, freq_dim=self.freq_dim, text_dim=TEXT_DIM, out_dim=self.out_dim,
                    num_heads=self.num_heads, num_layers=self.num_layers, window_size=(-1, -1), qk_norm=True,
                    cross_attn_norm=True, eps=self.eps, image_model="wan2.1")

    @classmethod
    def from_state_dict(cls, sd):
        """Infer the config the way ComfyUI's model detection does."""
        dim = sd["head.modulation"].shape[-1]
        layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        return cls(dim=dim, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0], num_layers=layers,
                   in_dim=sd["patch_embedding.weight"].shape[1], out_dim=sd["head.head.weight"].shape[0] // 4)


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight (torch-version independent)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def timestep_embedding(t, dim):
    """Wan's sinusoidal embedding, float32, [cos | sin]."""
    half = dim // 2
    t = t.float()
    freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=torch.float32).div(half))
    arg = torch.outer(t, freqs)
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


_ROPE_CACHE = {}


def rope_tables(f, h, w, head_dim, device, theta=10000.0):
    """cos/sin tables [f*h*w, 1, head_dim/2] (float32) for 3-axis RoPE on interleaved pairs."""
    key = (f, h, w, head_dim, str(device), theta)
    hit = _ROPE_CACHE.get(key)
    if hit is not None:
        return hit
    d = head_dim
    axes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    grid = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    pos = grid.reshape(-1, 3).double()
    angles = []
    for i, ad in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, ad, 2, dtype=torch.float64) / ad)
        angles.append(pos[:, i, None] * omega[None])
    ang = torch.cat(angles, 1)[:, None, :]  # [L, 1, d/2]
    out = (torch.cos(ang).float().to(device), torch.sin(ang).float().to(device))
    if len(_ROPE_CACHE) > 64:
        _ROPE_CACHE.clear()
    _ROPE_CACHE[key] = out
    return out


def apply_rope(x, cos, sin):
    """x [B, L, n, d]; rotate pairs (x[2i], x[2i+1]) by the tabulated angles (in float32)."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], -1)
    return out.flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, cos, sin, mask=None):
        n = self.heads
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (n, -1)), cos, sin)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (n, -1)), cos, sin)
        v = self.v(x).unflatten(-1, (n, -1))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.o(y.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, ctx):
        n = self.heads
        q = self.norm_q(self.q(x)).unflatten(-1, (n, -1)).transpose(1, 2)
        k = self.norm_k(self.k(ctx)).unflatten(-1, (n, -1)).transpose(1, 2)
        v = self.v(ctx).unflatten(-1, (n, -1)).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def zero_context(self, c):
        """Exact output for a context whose rows are all equal to c ([1, 1, dim] embedded)."""
        return self.o(self.v(c))


class Block(nn.Module):
    def __init__(self, dim, ffn_dim, heads, eps):
        super().__init__()
        self.eps = eps
        self.self_attn = SelfAttention(dim, heads, eps)
        self.norm3 = nn.LayerNorm(dim, eps=eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, heads, eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e0, cos, sin, ctx, ctx_const, grid, mask=None):
        # x [B, L, C]; e0 [B, Ft, 6, C] with Ft == 1 or Ft == frames; tokens are frame-major
        B, L, C = x.shape
        f = grid[0] if e0.shape[1] > 1 else 1
        mod = (self.modulation.to(e0.dtype).unsqueeze(0) + e0).unsqueeze(3)  # [B, Ft, 6, 1, C]
        sh1, sc1, g1, sh2, sc2, g2 = mod.unbind(2)  # each [B, Ft, 1, C]

        def modulate(h, shift, scale):
            h = h.view(B, f, L // f, C)
            return torch.addcmul(shift, h, 1 + scale).view(B, L, C)

        def gate(h, g):
            return (h.view(B, f, L // f, C) * g).view(B, L, C)

        y = self.self_attn(modulate(F.layer_norm(x, (C,), eps=self.eps), sh1, sc1), cos, sin, mask)
        x = x + gate(y, g1)
        if ctx is None:
            x = x + self.cross_attn.zero_context(ctx_const)
        else:
            x = x + self.cross_attn(self.norm3(x), ctx)
        y = self.ffn(modulate(F.layer_norm(x, (C,), eps=self.eps), sh2, sc2))
        return x + gate(y, g2)


class Head(nn.Module):
    def __init__(self, dim, out_features, eps):
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e, grid):
        B, L, C = x.shape
        f = grid[0] if e.shape[1] > 1 else 1
        mod = (self.modulation.to(e.dtype).unsqueeze(0) + e.unsqueeze(2)).unsqueeze(3)  # [B, Ft, 2, 1, C]
        shift, scale = mod.unbind(2)
        h = F.layer_norm(x, (C,), eps=self.eps).view(B, f, L // f, C)
        return self.head(torch.addcmul(shift, h, 1 + scale).view(B, L, C))


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
class ToyWan(nn.Module):
    """Wan 2.1 T2V backbone, parameter-for-parameter compatible with comfy.ldm.wan.model.WanModel."""

    patch = (1, 2, 2)

    def __init__(self, cfg: ToyWanConfig | None = None, **kw):
        super().__init__()
        cfg = cfg or ToyWanConfig(**kw)
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=self.patch, stride=self.patch)
        self.text_embedding = nn.Sequential(nn.Linear(TEXT_DIM, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(dim, cfg.ffn_dim, cfg.num_heads, cfg.eps) for _ in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim * math.prod(self.patch), cfg.eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, zero_head=True):
        """Wan reference init: xavier Linear/patch weights, N(0, .02) text/time embeddings,
        modulation randn/sqrt(dim), zero head (so an untrained model predicts v = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.xavier_uniform_(self.patch_embedding.weight.view(self.cfg.dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        d = self.cfg.dim
        for blk in self.blocks:
            blk.modulation.copy_(torch.randn(1, 6, d) / d ** 0.5)
        self.head.modulation.copy_(torch.randn(1, 2, d) / d ** 0.5)
        if zero_head:
            nn.init.zeros_(self.head.head.weight)

    # -- helpers --------------------------------------------------------------------------
    def zero_context_embedding(self):
        """text_embedding(zeros(4096)) without touching the 4096-wide weight: [1, 1, dim]."""
        te0, te2 = self.text_embedding[0], self.text_embedding[2]
        return te2(F.gelu(te0.bias, approximate="tanh"))[None, None]

    def _patchify(self, x):
        B, C, f, H, W = x.shape
        h, w = H // 2, W // 2
        p = x.view(B, C, f, h, 2, w, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, f * h * w, C * 4)
        wt = self.patch_embedding.weight.view(self.cfg.dim, C * 4)
        return F.linear(p, wt.to(p.dtype), self.patch_embedding.bias.to(p.dtype)), (f, h, w)

    def _unpatchify(self, y, grid):
        f, h, w = grid
        B, c = y.shape[0], self.cfg.out_dim
        y = y.view(B, f, h, w, 1, 2, 2, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return y.reshape(B, c, f, h * 2, w * 2)

    # -- forward --------------------------------------------------------------------------
    def forward(self, x, t, context=None, frame_blocks=None):
        """x [B, 16, F, H, W] (H, W even), t [B] or [B, F] timesteps (= 1000 * sigma),
        context None (zero text context, closed form) or [B, L, 4096].  Returns v, like x.
        frame_blocks [B, F] (block index of every latent frame) makes self-attention block-causal:
        a token sees the tokens of its own block and of earlier blocks, the way the caches run a
        window chunk by chunk (None: bidirectional, ComfyUI's WanModel)."""
        B, _, f, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError("latent height and width must be even")
        if t.ndim == 0:
            t = t.expand(B)
        if t.ndim == 1:
            t = t[:, None]
        if t.shape[1] not in (1, f):
            raise ValueError(f"timesteps {tuple(t.shape)} do not match {f} frames")
        tok, grid = self._patchify(x)
        if self.patch_embedding.weight.dtype == torch.float32:
            tok = tok.float()  # fp32 residual stream, also under autocast
        e = self.time_embedding(timestep_embedding(t.reshape(-1), self.cfg.freq_dim).to(tok.dtype))
        e = e.view(B, t.shape[1], -1)  # [B, Ft, C]
        e0 = self.time_projection(e).unflatten(2, (6, self.cfg.dim))  # [B, Ft, 6, C]
        cos, sin = rope_tables(*grid, HEAD_DIM, x.device)
        if context is None:
            ctx, ctx_const = None, self.zero_context_embedding()
        else:
            ctx, ctx_const = self.text_embedding(context.to(tok.dtype)), None
        mask = None
        if frame_blocks is not None:
            tb = frame_blocks.to(x.device).repeat_interleave(grid[1] * grid[2], dim=1)  # [B, L]
            mask = (tb[:, None, :] <= tb[:, :, None])[:, None]  # [B, 1, Lq, Lk]
        for blk in self.blocks:
            tok = blk(tok, e0, cos, sin, ctx, ctx_const, grid, mask)
        return self._unpatchify(self.head(tok, e, grid), grid)


# ---------------------------------------------------------------------------------------------
# safetensors I/O (own minimal implementation: the GPU trainer must not need extra packages)
# ---------------------------------------------------------------------------------------------
_DT = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
_TD = {v: k for k, v in _DT.items()}


def tensor_bytes(t):
    """Raw little-endian bytes of a tensor, without numpy (a bare GPU box may lack it)."""
    t = t.detach().contiguous().cpu()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None):
    """Write a .safetensors file (sorted keys, 8-byte aligned header), atomically."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = tensor_bytes(t)
        header[name] = {"dtype": _DT[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for raw in blobs:
            fh.write(raw)
    os.replace(tmp, path)


def load_safetensors(path: str):
    """-> (dict name -> tensor, metadata dict)."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        data = fh.read()
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        buf = bytearray(data[a:b])
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(_TD[h["dtype"]]).reshape(h["shape"]).clone()
    return out, meta


def load_toy_wan(path: str, device="cpu", dtype=torch.float32):
    """Build a ToyWan from a checkpoint (config inferred like ComfyUI does)."""
    sd, meta = load_safetensors(path)
    model = ToyWan(ToyWanConfig.from_state_dict(sd))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval(), meta


def comfy_wan_model(cfg: ToyWanConfig, state_dict=None):
    """ComfyUI's own WanModel with this config (needs ComfyUI importable), optionally loaded."""
    import comfy.ldm.wan.model as wan
    import comfy.ops

    m = wan.WanModel(operations=comfy.ops.disable_weight_init, **cfg.comfy_kwargs())
    if state_dict is not None:
        m.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return m


def config_dict(cfg: ToyWanConfig):
    d = asdict(cfg)
    d["num_heads"] = cfg.num_heads
    return d
