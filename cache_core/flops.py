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
from typing import Iterable, Optional, Sequence


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
    """Sizes that fix the FLOPs of a MAGI-1 DiT (parallel self/cross attention, GQA)."""
    hidden: int
    ffn: int
    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool = False
    caption_channels: int = 4096
    in_channels: int = 16
    patch: int = 2

    @classmethod
    def magi_4_5b(cls) -> "MagiShape":
        return cls(hidden=3072, ffn=12288, num_layers=34, heads=24, kv_heads=8, head_dim=128)

    @classmethod
    def magi_24b(cls) -> "MagiShape":
        return cls(hidden=6144, ffn=16384, num_layers=48, heads=48, kv_heads=8, head_dim=128, gated=True, in_channels=32)


def magi_chunk_flops(s: MagiShape, lq: int, lk: int, lt: int) -> int:
    """One chunk through every layer: lq queries, lk self-attention keys, lt text tokens.

    Per query token and layer: q and qx (2 * 2 d hq), k and v (2 * 2 d hk), the output
    projection from both halves (2 * 2 hq d), the MLP (2 * d f * (2 if gated) + 2 * f d);
    per chunk: the text's cross-attention k/v (2 * lt * d * 2 hk) and its projection into the
    model (2 * lt * c * d); attention scores and sums 4 lq lk hq and 4 lq lt hq.
    """
    d, hq, hk = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_token = 2 * (2 * d * hq + 2 * d * hk + 2 * hq * d + d * s.ffn * (2 if s.gated else 1) + s.ffn * d)
    per_layer = lq * per_token + 2 * lt * d * 2 * hk + 4 * lq * lk * hq + 4 * lq * lt * hq
    embed_head = 2 * lq * s.in_channels * s.patch ** 2 * d * 2 + 2 * lt * s.caption_channels * d
    return s.num_layers * per_layer + embed_head


def magi_call_flops(s: MagiShape, chunk_tokens: int, key_tokens: Sequence[int], text_tokens: Sequence[int]) -> int:
    """One chunk-wise forward: every chunk has chunk_tokens queries and its own key and text lengths."""
    return sum(magi_chunk_flops(s, chunk_tokens, lk, lt) for lk, lt in zip(key_tokens, text_tokens))
