"""Analytic FLOP count of a Wan-style DiT forward (multiply-add = 2 FLOPs).

Per transformer block, for Lq query tokens attending to Lk self-attention keys and a text
context of Lt tokens (d = hidden size, f = FFN size):

    self-attention projections q, k, v, o     2 * 4 d^2        per query token
    self-attention scores and weighted sum    2 * 2 Lq Lk d    (QK^T and AV; = 4 Lq Lk d)
    cross-attention projections q, o          2 * 2 d^2        per query token
    cross-attention k, v of the text          2 * 2 Lt d^2     per block call (not per token)
    cross-attention scores and weighted sum   4 Lq Lt d
    FFN (d -> f -> d)                         2 * 2 d f        per query token

so per token and block the linear part is 2*(4d^2 + 2d^2 + 2df) = 12 d^2 + 4 d f, as in
specs/skyreels_df.md section 5. Norms, modulation, softmax, GELU and RoPE are elementwise and
not counted. Outside the blocks (counted, small): patch embedding (2 * tokens * C_in*p * d),
text embedding MLP (2 * Lt * (text_dim*d + d^2)), time embedding + projection per frame
(2 * (freq*d + d^2 + 6 d^2)), head (2 * tokens * d * C_out*p).

The chunk-causal run recomputes the text k/v in every block call, i.e. once per forwarded
chunk; the count includes that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence


class FlopModel(Protocol):
    """A family's FLOP model, as the chunk executor asks it (one per family: DiTShape for Wan)."""

    def chunk_causal(self, chunk_tokens: Sequence[int], computed: Iterable[int], key_lengths: Optional[dict] = None,
                     frames: Optional[int] = None, batch: int = 1, query_tokens: Optional[dict] = None) -> int:
        """One chunk-wise call in which only the chunks in `computed` run the blocks."""

    def window(self, tokens: int, frames: int, batch: int = 1) -> int:
        """One bidirectional forward of the whole window (the uncached sampler's call)."""


@dataclass(frozen=True)
class DiTShape:
    """Sizes that fix the FLOPs of a Wan 2.1-style DiT."""
    dim: int
    ffn_dim: int
    num_layers: int
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    patch: tuple = (1, 2, 2)

    @classmethod
    def wan_1_3b(cls) -> "DiTShape":
        return cls(dim=1536, ffn_dim=8960, num_layers=30)

    @classmethod
    def wan_14b(cls) -> "DiTShape":
        return cls(dim=5120, ffn_dim=13824, num_layers=40)

    def chunk_causal(self, chunk_tokens, computed, key_lengths=None, frames=None, batch=1, query_tokens=None) -> int:
        return chunk_causal_flops(self, chunk_tokens, computed, key_lengths, frames, batch, query_tokens)

    def window(self, tokens: int, frames: int, batch: int = 1) -> int:
        return window_flops(self, tokens, frames, batch)


def _patch_volume(s: DiTShape) -> int:
    return s.patch[0] * s.patch[1] * s.patch[2]


def block_flops(s: DiTShape, lq: int, lk: int, text_len: Optional[int] = None) -> int:
    """One block call: lq query tokens, lk self-attention keys, text of text_len tokens."""
    d, lt = s.dim, s.text_len if text_len is None else text_len
    linear = lq * 2 * (4 * d * d + 2 * d * d + 2 * d * s.ffn_dim)
    self_attn = 4 * lq * lk * d
    cross_kv = 2 * 2 * lt * d * d
    cross_attn = 4 * lq * lt * d
    return linear + self_attn + cross_kv + cross_attn


def embed_head_flops(s: DiTShape, tokens: int, frames: int) -> int:
    """Everything outside the blocks for one sample: patch/text/time embeddings and head."""
    d, p = s.dim, _patch_volume(s)
    patch = 2 * tokens * s.in_dim * p * d
    text = 2 * s.text_len * (s.text_dim * d + d * d)
    time = 2 * frames * (s.freq_dim * d + d * d + 6 * d * d)
    head = 2 * tokens * d * s.out_dim * p
    return patch + text + time + head


def window_flops(s: DiTShape, tokens: int, frames: int, batch: int = 1) -> int:
    """One bidirectional forward of the whole window (every token attends to every token)."""
    per_sample = s.num_layers * block_flops(s, tokens, tokens) + embed_head_flops(s, tokens, frames)
    return batch * per_sample


def chunk_causal_flops(s: DiTShape, chunk_tokens: Sequence[int], computed: Iterable[int],
                       key_lengths: Optional[dict] = None, frames: Optional[int] = None,
                       batch: int = 1, query_tokens: Optional[dict] = None) -> int:
    """One chunk-causal call: only the chunks in `computed` run the blocks.

    Chunk g attends to sum(chunk_tokens[:g+1]) keys unless key_lengths[g] says otherwise
    (a compressed history), with all its tokens as queries unless query_tokens[g] says how many
    (a token subset). Embeddings and head run over the whole window once.
    """
    key_lengths, query_tokens = key_lengths or {}, query_tokens or {}
    tokens = sum(chunk_tokens)
    total = 0
    for g in computed:
        lk = key_lengths.get(g, sum(chunk_tokens[:g + 1]))
        total += s.num_layers * block_flops(s, query_tokens.get(g, chunk_tokens[g]), lk)
    f = frames if frames is not None else len(chunk_tokens)
    return batch * (total + embed_head_flops(s, tokens, f))


def tokens_per_frame(height: int, width: int, patch=(1, 2, 2), vae_stride: int = 8) -> int:
    """Transformer tokens per latent frame for a pixel resolution (VAE 8x, patch 2x2)."""
    h = -(-height // vae_stride)
    w = -(-width // vae_stride)
    return -(-h // patch[1]) * -(-w // patch[2])


@dataclass(frozen=True)
class MagiShape:
    """Sizes that fix the FLOPs of a MAGI-1 DiT (specs/magi1.md 1.1-1.3): a parallel block with
    q, qx (cross-attention query), k, v, linear_proj (2d -> d), the text K/V projection, GQA."""
    num_layers: int = 34
    hidden: int = 3072
    ffn: int = 12288
    heads: int = 24
    groups: int = 8                # KV heads
    head_dim: int = 128
    cond: int = 768                # cond_hidden_ratio 0.25
    in_channels: int = 16
    out_channels: int = 16
    patch: int = 2
    caption_dim: int = 4096
    gated: bool = False            # 4.5B: GELU; 24B: SwiGLU (fc1 doubled)

    @classmethod
    def magi_4_5b(cls) -> "MagiShape":
        return cls()

    @classmethod
    def magi_24b(cls) -> "MagiShape":
        return cls(num_layers=48, hidden=6144, ffn=16384, heads=48, cond=1536, in_channels=32, out_channels=32,
                   gated=True)

    def block_linear_per_token(self) -> int:
        d, qd, kvd = self.hidden, self.heads * self.head_dim, self.groups * self.head_dim
        qkv = 2 * d * (2 * qd + 2 * kvd)                 # q, qx, k, v
        proj = 2 * (2 * qd) * d                          # linear_proj on [self | cross]
        fc1 = 2 * d * self.ffn * (2 if self.gated else 1)
        fc2 = 2 * self.ffn * d
        return qkv + proj + fc1 + fc2

    def params_per_block(self) -> int:
        """Weights of one block (a sanity check against the spec's ~130.6M for 4.5B)."""
        d, qd, kvd = self.hidden, self.heads * self.head_dim, self.groups * self.head_dim
        return (d * (2 * qd + 2 * kvd) + d * 2 * kvd + 2 * qd * d
                + d * self.ffn * (2 if self.gated else 1) + self.ffn * d + self.cond * 2 * d + 2 * d)


def magi_chunk_flops(s: MagiShape, lq: int, lk: int, text_len: int) -> int:
    """One chunk through the model: lq query tokens, lk self-attention keys, text_len text tokens
    (bench/paper_flops.py reproduces the FlowCache and MotionCache papers' MAGI-1 totals with it)."""
    d, qd, kvd = s.hidden, s.heads * s.head_dim, s.groups * s.head_dim
    per_layer = (lq * s.block_linear_per_token()
                 + 4 * lq * lk * qd                        # self-attention QK^T + AV
                 + 2 * text_len * d * 2 * kvd              # linear_kv_xattn on the text
                 + 4 * lq * text_len * qd                  # cross-attention
                 + 2 * s.cond * 2 * d)                     # ada_modulate (per chunk condition)
    p2 = s.patch * s.patch
    outside = (2 * lq * s.in_channels * p2 * d             # x_embedder
               + 2 * lq * d * s.out_channels * p2          # final_linear
               + 2 * text_len * s.caption_dim * d          # y_proj_xattn
               + 2 * s.caption_dim * s.cond                # y_proj_adaln (one null-caption row)
               + 2 * 2 * (256 * s.cond + s.cond * s.cond))  # t and distill dt embedders
    return s.num_layers * per_layer + outside
