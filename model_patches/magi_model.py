"""The MAGI-1 DiT in plain PyTorch on comfy.ops (specs/magi1.md sections 1-2 and 7.7).

Parameter names equal the official checkpoint's module names, so the official safetensors
load strictly. Every layer is a comfy.ops layer, so ComfyUI's weight casting, LoRA patches
and lowvram offload apply. Attention is torch SDPA, one call per chunk over that chunk's
contiguous key range: the cached clean chunks before the call, then the call's own chunks up
to itself (no mask, no compiled kernels).

Precision follows upstream's map: embedders, RoPE, QK norms of self-attention, the two
post-norms, the output projection and the final layer compute in fp32; the block linears,
the pre-norms and the cross-attention norms in the model dtype; the residual stream between
layers is in the model dtype.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import comfy.ops

from ..cache_core.errors import InputError
from ..cache_core.flops import MagiShape
from ..cache_core.kv_store import ChunkLayout, CompressConfig, KVStore
from ..cache_core.seq_parallel import NO_SP, SeqParallel

PROJ_GROUPS = 8          # upstream's hard-coded 8-way interleave before linear_proj ("TP8 training")
ADALN_COND_ROW, ADALN_NULL_ROW = -2, -1   # null_caption_embedding rows that condition the gates
NULL_TEXT_TOKENS = 50    # the null text: the first 50 rows of null_caption_embedding


@dataclass(frozen=True)
class MagiConfig:
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    in_channels: int              # the model's (32 for 24B: the 16-channel latent is duplicated)
    cond_dim: int
    caption_channels: int
    caption_max_length: int
    gated: bool                   # SwiGLU MLP (24B) instead of GELU
    patch: int = 2
    t_patch: int = 1
    eps: float = 1e-6
    latent_channels: int = 16

    @property
    def half_channel(self) -> bool:
        return self.in_channels == 2 * self.latent_channels

    @property
    def x_rescale(self) -> float:
        # Not stored in the weights: upstream sets 0.1 exactly for the 24B (half-channel) configs.
        return 0.1 if self.half_channel else 1.0

    @property
    def size_name(self) -> str:
        known = {(34, 3072): "4.5B", (48, 6144): "24B"}
        return known.get((self.num_layers, self.hidden), f"custom ({self.num_layers} layers, hidden {self.hidden})")

    def flop_shape(self) -> MagiShape:
        return MagiShape(num_layers=self.num_layers, hidden=self.hidden, ffn=self.ffn, heads=self.heads,
                         groups=self.kv_heads, head_dim=self.head_dim, cond=self.cond_dim, in_channels=self.in_channels,
                         out_channels=self.in_channels, patch=self.patch, caption_dim=self.caption_channels,
                         gated=self.gated)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "MagiConfig":
        """Read every size from tensor shapes (the checkpoint carries no config)."""
        n = 0
        while f"videodit_blocks.layers.{n}.mlp.linear_fc2.weight" in sd:
            n += 1
        p = "videodit_blocks.layers.0."
        hidden, in_ch = sd["x_embedder.weight"].shape[:2]
        head_dim = sd[p + "self_attention.q_layernorm.weight"].shape[0]
        fc1, ffn = sd[p + "mlp.linear_fc1.weight"].shape[0], sd[p + "mlp.linear_fc2.weight"].shape[1]
        return cls(num_layers=n, hidden=hidden, ffn=ffn, heads=sd[p + "self_attention.linear_qkv.q.weight"].shape[0] // head_dim,
                   kv_heads=sd[p + "self_attention.linear_qkv.k.weight"].shape[0] // head_dim, head_dim=head_dim,
                   in_channels=in_ch, cond_dim=sd["t_embedder.mlp.0.weight"].shape[0],
                   caption_channels=sd["y_embedder.null_caption_embedding"].shape[1],
                   caption_max_length=sd["y_embedder.null_caption_embedding"].shape[0], gated=fc1 == 2 * ffn,
                   patch=sd["x_embedder.weight"].shape[-1], t_patch=sd["x_embedder.weight"].shape[2])


def expected_keys(c: MagiConfig) -> dict[str, tuple]:
    """Key -> shape of an official MAGI-1 DiT checkpoint with this config (the strict schema)."""
    d, hq, hk = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim
    s = {"x_embedder.weight": (d, c.in_channels, c.t_patch, c.patch, c.patch),
         "t_embedder.mlp.0.weight": (c.cond_dim, 256), "t_embedder.mlp.0.bias": (c.cond_dim,),
         "t_embedder.mlp.2.weight": (c.cond_dim, c.cond_dim), "t_embedder.mlp.2.bias": (c.cond_dim,),
         "y_embedder.y_proj_xattn.0.weight": (d, c.caption_channels), "y_embedder.y_proj_xattn.0.bias": (d,),
         "y_embedder.y_proj_adaln.0.weight": (c.cond_dim, c.caption_channels), "y_embedder.y_proj_adaln.0.bias": (c.cond_dim,),
         "y_embedder.null_caption_embedding": (c.caption_max_length, c.caption_channels),
         "rope.bands": (c.head_dim // 8,),
         "videodit_blocks.final_layernorm.weight": (d,), "videodit_blocks.final_layernorm.bias": (d,),
         "final_linear.linear.weight": (c.patch * c.patch * c.t_patch * c.in_channels, d)}
    for i in range(c.num_layers):
        p = f"videodit_blocks.layers.{i}."
        a = p + "self_attention."
        s.update({p + "ada_modulate_layer.proj.0.weight": (2 * d, c.cond_dim), p + "ada_modulate_layer.proj.0.bias": (2 * d,),
                  a + "linear_qkv.layer_norm.weight": (d,), a + "linear_qkv.layer_norm.bias": (d,),
                  a + "linear_qkv.q.weight": (hq, d), a + "linear_qkv.qx.weight": (hq, d),
                  a + "linear_qkv.k.weight": (hk, d), a + "linear_qkv.v.weight": (hk, d),
                  a + "linear_kv_xattn.weight": (2 * hk, d), a + "linear_proj.weight": (d, 2 * hq),
                  p + "mlp.layer_norm.weight": (d,), p + "mlp.layer_norm.bias": (d,),
                  p + "mlp.linear_fc1.weight": ((2 if c.gated else 1) * c.ffn, d), p + "mlp.linear_fc2.weight": (d, c.ffn)})
        for norm in ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn"):
            s[a + norm + ".weight"] = (c.head_dim,)
            s[a + norm + ".bias"] = (c.head_dim,)
        for norm in ("self_attn_post_norm", "mlp_post_norm"):
            s[p + norm + ".weight"] = (d,)
            s[p + norm + ".bias"] = (d,)
    return s


def check_keys(sd: dict, c: MagiConfig, input_name: str = "model_name") -> None:
    """Strict: every key present with its shape, nothing extra; the error lists what differs."""
    want = expected_keys(c)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    wrong = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if missing or unexpected or wrong:
        def few(keys, fmt=str):
            return ", ".join(fmt(k) for k in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{len(missing)} missing: {few(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {few(unexpected)}" if unexpected else "",
                 f"{len(wrong)} with other shapes: "
                 + few(wrong, lambda k: f"{k} {tuple(sd[k].shape)} != {want[k]}") if wrong else ""]
        raise InputError(input_name, f"is not a complete MAGI-1 {c.size_name} DiT: "
                         + "; ".join(p for p in parts if p) + ". Use the official inference_weight files unchanged.")


def _cast(module, x, dtype=None):
    w, b = comfy.ops.cast_bias_weight(module, x, dtype=dtype or x.dtype, device=x.device)[:2]
    return w, b


class ZeroCenteredLayerNorm(comfy.ops.disable_weight_init.LayerNorm):
    """Megatron's LayerNorm with apply_layernorm_1p: the stored gamma is centred on 0 (uses w + 1)."""

    def forward(self, x):
        w, b = _cast(self, x)
        return F.layer_norm(x, self.normalized_shape, w + 1, b, self.eps)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Upstream's embedding: t*1000 against exp(-ln(1e4) k/half), [cos, sin], rounded to bf16."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None] * 1000        # upstream's order: (t * f) * 1000, then bf16
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(torch.bfloat16).float()


def rope_table(bands: torch.Tensor, frames: int, frame_offset: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [frames*h*w, 3*len(bands)] for token rows (T, H, W) of absolute frames
    frame_offset.. (RoPE positions count the cached chunks before the call).

    Upstream builds the table for all frames up to the end of the call and keeps the last rows;
    positions are integer indices, H and W centred and rescaled onto a 16x16 reference grid.
    """
    total = frame_offset + frames
    r = math.sqrt(h * w / 256)
    axes = []
    for axis, (n, ref) in enumerate(((total, total), (h, h / r), (w, w / r))):
        x = torch.arange(n, dtype=torch.float32, device=bands.device)
        if axis:                                    # H and W centred, time counted from the first frame
            x = x - (n - 1) / 2
        if n > 1:
            x = x / (n - 1) * (ref - 1)
        axes.append(x)
    axes[0] = axes[0][frame_offset:]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)          # (T, H, W, 3)
    ang = (grid[..., None] * bands.float()).reshape(frames * h * w, -1)      # axis-major: t bands, h bands, w bands
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved rotary on the first 2*cos.shape[-1] dims of x [..., L, head_dim]."""
    n = cos.shape[-1]
    x1, x2, rest = x[..., :n], x[..., n:2 * n], x[..., 2 * n:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


WORK_ELEMENTS = 1 << 28   # largest temporary (attention scores, MLP hidden) per piece: 1 GiB in fp32


def attend(q, k, v):
    """SDPA with GQA: query head h uses KV head h // (Hq/Hkv), as flash-attn maps them.

    Queries go in row blocks when the score matrix would be large (SDPA's math path, e.g. on
    CPU, materialises it: a 720p MAGI-1 chunk against 5 chunks of keys would need 70 GB)."""
    if k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    rows = max(1, WORK_ELEMENTS // (q.shape[-3] * k.shape[-2]))
    if q.shape[-2] <= rows:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(q[..., i:i + rows, :], k, v)
                      for i in range(0, q.shape[-2], rows)], dim=-2)


def kv_store(config: MagiConfig, num_chunks: int, chunk_tokens: int, keep: int | None = None, offload: bool = False,
             compress: CompressConfig | None = None, window: int = 1) -> KVStore:
    """The K/V store of one guidance pass over a whole video: clean chunks' self-attention K/V per
    layer, by absolute chunk index, token-major [1, tokens, kv_heads * head_dim]. `keep`: how far
    behind the newest written chunk a key range can still reach (older chunks are evicted);
    `offload`: held in CPU memory; `compress`: the finished history squeezed to budget_chunks
    chunks' worth of tokens at each chunk's end (full-history attention only); `window`: chunks
    written before one finishes. The buffer is sized once for the most it holds: every chunk (full
    history), the budget and the window (compressed), or keep + the chunk being written."""
    budget = None if compress is None else compress.budget_chunks * chunk_tokens
    most = num_chunks if keep is None and compress is None else \
        compress.budget_chunks + window if compress is not None else keep + 2
    return KVStore(ChunkLayout((chunk_tokens,) * num_chunks), config.num_layers, compress=compress,
                   budget_tokens=budget, keep=keep, offload=offload, reserve=min(most, num_chunks))


@dataclass
class ChunkForward:
    """One forward over consecutive chunks start.. of the run, and what each chunk sees."""
    start: int                    # absolute index of the first chunk in x
    t: list                       # per chunk, 0 = noise .. 1 = clean
    texts: list                   # per chunk: caption states [tokens, caption_channels] (valid rows only)
    first: list                   # per chunk: first chunk of its key range (absolute)
    null_row: bool = False        # gates from the unconditional null-caption row (-1) instead of -2
    write: tuple = ()             # absolute chunks whose K/V go into the cache (clean refresh, prefix)
    dt: float | None = None       # distilled models' step-size embedding input
    tokens: torch.Tensor | None = None   # one-chunk calls: only these of its tokens run (the others'
                                         # K/V come from the cache, where the new rows are written back)
    token_major: bool = False     # return [B, tokens, patch*patch*C] instead of the latent video

    def with_tokens(self, tokens: torch.Tensor) -> "ChunkForward":
        return dataclasses.replace(self, tokens=tokens)


class MagiLayer(nn.Module):
    def __init__(self, c: MagiConfig, ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        d, hq, hk = c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim
        self.c = c
        self.ada_modulate_layer = nn.Module()
        self.ada_modulate_layer.proj = nn.Sequential(ops.Linear(c.cond_dim, 2 * d, **kw))
        sa = self.self_attention = nn.Module()
        sa.linear_qkv = nn.Module()
        sa.linear_qkv.layer_norm = ops.LayerNorm(d, eps=c.eps, **kw)
        sa.linear_qkv.q = ops.Linear(d, hq, bias=False, **kw)
        sa.linear_qkv.qx = ops.Linear(d, hq, bias=False, **kw)
        sa.linear_qkv.k = ops.Linear(d, hk, bias=False, **kw)
        sa.linear_qkv.v = ops.Linear(d, hk, bias=False, **kw)
        sa.linear_kv_xattn = ops.Linear(d, 2 * hk, bias=False, **kw)
        sa.linear_proj = ops.Linear(2 * hq, d, bias=False, **kw)
        for norm in ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn"):
            setattr(sa, norm, ZeroCenteredLayerNorm(c.head_dim, eps=c.eps, **kw))
        self.self_attn_post_norm = ZeroCenteredLayerNorm(d, eps=c.eps, **kw)
        self.mlp = nn.Module()
        self.mlp.layer_norm = ops.LayerNorm(d, eps=c.eps, **kw)
        self.mlp.linear_fc1 = ops.Linear(d, (2 if c.gated else 1) * c.ffn, bias=False, **kw)
        self.mlp.linear_fc2 = ops.Linear(c.ffn, d, bias=False, **kw)
        self.mlp_post_norm = ZeroCenteredLayerNorm(d, eps=c.eps, **kw)

    def heads(self, x, n):           # [B, L, n*hd] -> [B, n, L, hd]
        return x.unflatten(-1, (n, self.c.head_dim)).transpose(1, 2)

    def forward(self, x, cond, text, rope, call: ChunkForward, cache: KVStore | None, layer: int, chunk_tokens: int,
                sp: SeqParallel = NO_SP, sizes: list | None = None):
        """x [B, L, d] (model dtype), cond [n, cond_dim] per chunk, text: per chunk [B, Lt, d] states.
        Under sequence parallelism x holds this rank's share of the call's tokens (`sizes`: every
        rank's share): q/k/v and the cross-attention queries go to all tokens of this rank's heads
        (Ulysses all-to-all), both attentions run as in one process on those heads, and come back."""
        c, sa, n = self.c, self.self_attention, len(call.t)
        hq, hk = c.heads // sp.world, c.kv_heads // sp.world      # this rank's query and KV heads
        B = x.shape[0]
        h = sa.linear_qkv.layer_norm(x)
        cos, sin = rope
        q = apply_rope(sa.q_layernorm(self.heads(sa.linear_qkv.q(h), c.heads).float()), cos, sin).to(x.dtype)
        k = apply_rope(sa.k_layernorm(self.heads(sa.linear_qkv.k(h), c.kv_heads).float()), cos, sin).to(x.dtype)
        v = self.heads(sa.linear_qkv.v(h), c.kv_heads)
        qx = sa.q_layernorm_xattn(self.heads(sa.linear_qkv.qx(h), c.heads))
        if sp.active:                # [B, heads, my tokens, D] -> [B, my heads, all tokens, D]
            q, k, v, qx = (sp.seq_to_heads(t.transpose(1, 2), sizes).transpose(1, 2) for t in (q, k, v, qx))
        L = q.shape[2]                                             # the call's tokens (all ranks')
        if cache is not None and cache.compress is not None:   # the last forwarded chunk's queries score compression
            last = q[:, :, -chunk_tokens:] if call.tokens is None else q
            g = hq // hk                                        # a group's query heads score its KV head
            grouped = last.unflatten(1, (hk, g)).permute(0, 2, 3, 1, 4)      # [B, g, Lq, Hkv, D]
            cache.note_queries(0, layer, grouped.reshape(B, -1, hk * c.head_dim))

        def stored(first: int, last: int):          # K/V of chunks first..last from the store, [B, Hkv, L, D]
            return tuple(t.to(x.device, non_blocking=True).view(B, -1, hk, c.head_dim).transpose(1, 2)
                         .contiguous() for t in cache.visible(0, layer, last, first))

        self_out, cross_out = [], []
        for i in range(n):
            rows = slice(i * chunk_tokens, (i + 1) * chunk_tokens) if call.tokens is None else slice(0, L)
            chunk = call.start + i
            lo = max(call.first[i], call.start) - call.start          # first of the call's own chunks in range
            if chunk in call.write and cache is not None:             # token-major [B, L, Hkv*D], as the store holds them
                cache.write(0, layer, chunk, k[:, :, rows].transpose(1, 2).flatten(2),
                            v[:, :, rows].transpose(1, 2).flatten(2), call.tokens)
            if call.tokens is not None:   # a token subset: the chunk's other rows come from the store
                keys = [stored(call.first[i], chunk)]
            else:
                keys = [(k[:, :, lo * chunk_tokens:rows.stop], v[:, :, lo * chunk_tokens:rows.stop])]
                if call.first[i] < call.start:
                    keys = [stored(call.first[i], call.start - 1)] + keys
            ks = torch.cat([a for a, _ in keys], dim=2) if len(keys) > 1 else keys[0][0]
            vs = torch.cat([b for _, b in keys], dim=2) if len(keys) > 1 else keys[0][1]
            self_out.append(attend(q[:, :, rows], ks, vs))
            # Cross-attention to this chunk's own text; K/V rows are grouped per KV head as [k, v].
            t = text[i]
            if t.shape[1] == 0:
                cross_out.append(torch.zeros_like(self_out[-1]))
                continue
            kv = sa.linear_kv_xattn(t).unflatten(-1, (c.kv_heads, 2 * c.head_dim)).transpose(1, 2)
            kv = kv[:, sp.rank * hk:(sp.rank + 1) * hk]                # this rank's KV heads
            kx, vx = kv[..., :c.head_dim], kv[..., c.head_dim:]
            cross_out.append(attend(qx[:, :, rows], sa.k_layernorm_xattn(kx), vx))
        self_o, cross_o = (torch.cat(o, dim=2).transpose(1, 2) for o in (self_out, cross_out))   # [B, L, hq, D]
        if sp.active:                # back to this rank's tokens, every head
            self_o, cross_o = sp.heads_to_seq(self_o, sizes), sp.heads_to_seq(cross_o, sizes)
        self_o, cross_o = self_o.flatten(2), cross_o.flatten(2)          # [B, L, heads*D]
        # [self | cross] -> 8 groups of [self slice | cross slice] (upstream's TP8 layout).
        joined = torch.stack([self_o, cross_o], dim=2).unflatten(-1, (PROJ_GROUPS, -1)).transpose(2, 3).flatten(2)
        attn = sa.linear_proj(joined.float())
        gate = torch.tanh(self.ada_modulate_layer.proj(F.silu(cond)).float()).to(x.dtype).float()   # softcap 1
        gate = gate.repeat_interleave(chunk_tokens if call.tokens is None else L, dim=0)[None]   # per token: its chunk's
        gate = gate[:, sp.local(L)]
        g_msa, g_mlp = gate.chunk(2, dim=-1)
        x = (x.float() + self.self_attn_post_norm(attn * g_msa)).to(x.dtype)
        rows = max(1, WORK_ELEMENTS // self.mlp.linear_fc1.out_features)   # token blocks bound the MLP hidden
        m = torch.cat([self.feed_forward(x[:, i:i + rows]) for i in range(0, x.shape[1], rows)], dim=1)
        return (x.float() + self.mlp_post_norm(m.float() * g_mlp)).to(x.dtype)

    def feed_forward(self, x):
        m = self.mlp.linear_fc1(self.mlp.layer_norm(x))
        if self.c.gated:
            a, b = m.chunk(2, dim=-1)
            m = F.silu(a) * b
        else:
            m = F.gelu(m)
        return self.mlp.linear_fc2(m)


class MagiDiT(nn.Module):
    """MAGI-1's video DiT. `forward_chunks` is the chunk-wise forward the AR sampler drives."""

    def __init__(self, config: MagiConfig = None, dtype=None, device=None, operations=None, **_):
        super().__init__()
        c, ops = config, operations or comfy.ops.disable_weight_init
        self.config, self.dtype = c, dtype
        kw = dict(dtype=dtype, device=device)
        d = c.hidden
        self.x_embedder = ops.Conv3d(c.in_channels, d, kernel_size=(c.t_patch, c.patch, c.patch),
                                     stride=(c.t_patch, c.patch, c.patch), bias=False, **kw)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(ops.Linear(256, c.cond_dim, **kw), nn.SiLU(), ops.Linear(c.cond_dim, c.cond_dim, **kw))
        self.y_embedder = nn.Module()
        self.y_embedder.y_proj_xattn = nn.Sequential(ops.Linear(c.caption_channels, d, **kw), nn.SiLU())
        self.y_embedder.y_proj_adaln = nn.Sequential(ops.Linear(c.caption_channels, c.cond_dim, **kw))
        self.y_embedder.null_caption_embedding = nn.Parameter(torch.empty(c.caption_max_length, c.caption_channels, **kw))
        self.rope = nn.Module()
        self.rope.bands = nn.Parameter(torch.empty(c.head_dim // 8, **kw))
        self.videodit_blocks = nn.Module()
        self.videodit_blocks.layers = nn.ModuleList([MagiLayer(c, ops, **kw) for _ in range(c.num_layers)])
        self.videodit_blocks.final_layernorm = ZeroCenteredLayerNorm(d, eps=c.eps, **kw)
        self.final_linear = nn.Module()
        self.final_linear.linear = ops.Linear(d, c.patch * c.patch * c.t_patch * c.in_channels, bias=False, **kw)

    def forward(self, *args, **kwargs):
        raise InputError("model", "MAGI-1 generates chunk by chunk with its own schedule: connect it to the "
                         "Streaming AR Sampler (ARCacheStreamingSampler), not to KSampler/SamplerCustom")

    def param(self, p: torch.Tensor, device) -> torch.Tensor:
        """A bare parameter (no module to cast it): to the compute device, fp32."""
        return p.to(device=device, dtype=torch.float32)

    def null_text(self, device) -> torch.Tensor:
        """The unconditional caption: the first 50 rows of the learned null caption."""
        return self.param(self.y_embedder.null_caption_embedding[:NULL_TEXT_TOKENS], device)

    def condition(self, t: torch.Tensor, dt: float | None, null_row: bool) -> torch.Tensor:
        """Per chunk: t embedding (+ step-size embedding) + the null-caption row's projection."""
        mlp = self.t_embedder.mlp
        emb = mlp(timestep_sinusoid(t))
        if dt is not None:
            emb = emb + mlp(timestep_sinusoid(torch.full_like(t, float(dt))))
        # only the one row: converting the whole [800, 4096] table every call would copy 13 MB
        row = self.param(self.y_embedder.null_caption_embedding[ADALN_NULL_ROW if null_row else ADALN_COND_ROW], t.device)
        return emb + self.y_embedder.y_proj_adaln(row[None])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding of model-space latents [B, C, T, h, w] -> [B, (T H W), d] in fp32."""
        c = self.config
        x = x.float() * c.x_rescale
        if c.half_channel:
            x = torch.cat([x, x], dim=1)
        return self.x_embedder(x).flatten(2).transpose(1, 2)

    def forward_chunks(self, x: torch.Tensor, call: ChunkForward, cache: KVStore | None = None,
                       sp: SeqParallel = NO_SP) -> torch.Tensor:
        """Velocity for x [B, C_latent, n*chunk_frames, h, w] (model-space latents, B = 1 per run).
        sp: the ranks the call's tokens are split across (the layers on this rank's share, the
        output gathered: every rank returns all of it)."""
        c = self.config
        B, _, T, H, W = x.shape
        n = len(call.t)
        dtype = x.dtype                                                # the compute dtype the sampler chose
        h = self.embed(x)                                              # fp32
        ht, wt = H // c.patch, W // c.patch
        chunk_frames = T // (n * c.t_patch)
        chunk_tokens = chunk_frames * ht * wt
        h = h.to(dtype)                                                # [B, (T H W), d]
        t = torch.as_tensor(call.t, dtype=torch.float32, device=x.device)
        cond = self.condition(t, call.dt, call.null_row).to(dtype)
        text = [self.y_embedder.y_proj_xattn(s.to(x.device, torch.float32)[None]).to(dtype) for s in call.texts]
        rope = rope_table(self.param(self.rope.bands, x.device), T // c.t_patch, call.start * chunk_frames, ht, wt)
        if call.tokens is not None:
            if n != 1 or cache is None:
                raise ValueError("a token subset runs one chunk against the K/V cache")
            h, rope = h[:, call.tokens], (rope[0][call.tokens], rope[1][call.tokens])
        sizes = sp.splits(h.shape[1])
        if sp.active:
            mine = sp.local(h.shape[1])
            h, rope = h[:, mine], (rope[0][mine], rope[1][mine])
        for i, layer in enumerate(self.videodit_blocks.layers):
            h = layer(h, cond, text, rope, call, cache, i, chunk_tokens, sp, sizes)
        h = self.videodit_blocks.final_layernorm(h.float())
        out = sp.gather_rows(self.final_linear.linear(h), sizes)         # [B, L, pT pH pW C]
        p, pt = c.patch, c.t_patch
        if call.token_major:
            out = out.unflatten(-1, (pt * p * p, c.in_channels))[..., :c.latent_channels]
            return out.flatten(2) / c.x_rescale
        out = out.reshape(B, T // pt, ht, wt, pt, p, p, c.in_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, c.in_channels, T, ht * p, wt * p)
        if c.half_channel:
            out = out[:, :c.latent_channels]
        return out / c.x_rescale


def tokens_to_video(v: torch.Tensor, frames: int, ht: int, wt: int, patch: int, channels: int) -> torch.Tensor:
    """Token-major [B, frames*ht*wt, patch*patch*C] -> [B, C, frames, ht*patch, wt*patch]."""
    B = v.shape[0]
    v = v.reshape(B, frames, ht, wt, patch, patch, channels)
    return v.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, channels, frames, ht * patch, wt * patch)


def video_to_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, F, H, W] -> token-major [B, F*(H/p)*(W/p), p*p*C] (the inverse of tokens_to_video)."""
    B, C, F, H, W = x.shape
    x = x.reshape(B, C, F, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(B, F * (H // patch) * (W // patch), patch * patch * C)
