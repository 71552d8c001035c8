"""The MAGI-1 DiT port (model_patches/magi_model.py) against an independent plain-torch
reference written from a reading of the official code, SandAI-org/MAGI-1 @ 6ff822e:

  inference/model/dit/dit_module.py
    TimestepEmbedder (:50-100): t*1000 sinusoid, [cos, sin], rounded to bf16 before the MLP
    CaptionEmbedder (:106-154): y_proj_xattn = SiLU(Linear) on the caption; the adaLN term is
        y_proj_adaln of null_caption_embedding[-2] (conditional) / [-1] (caption dropped)
    FusedLayerNorm (:323-357): weight + 1 (apply_layernorm_1p); CustomLayerNormLinear /
        CustomMLP pre-norms are plain torch.nn.LayerNorm (:401, :517)
    softcap (:360) with cap 1 -> tanh; bias_modulate_add (:292-307): gate, post-norm, + residual
    build_fourier_pos_embed (:599-667, in_pixels=False): integer grid, H/W centred, rescaled
        by (ref-1)/(n-1); get_embed returns cat[sin, cos]; split at :1147
    flash_attn apply_rotary_emb (non-interleaved) on q/k after the fp32 "+1" QK norms (:953-980)
    get_xqkv (:1005-1021): linear_kv_xattn output viewed (tokens, kv_heads, 2*hd), split [k | v]
    core_attention (:1023-1066): flash_attn_func per chunk over its key range (GQA)
    attn_linear_proj (:1332-1346): concat[self, cross], "(n hn hd) -> (hn n hd)", n=2, hn=8
    CustomMLP (:542-551): GELU or flashinfer silu_and_mul (silu(first half) * second half)
    TransformerBlock (:1437-1439): final "+1" LayerNorm
  inference/model/dit/dit_model.py
    get_embedding_and_meta (:145-261): Conv3d patch embed, rope for T_total = T + cached frames
        (last T*H*W rows), distill dt embedding, condition = t_emb + y_adaln, condition_map
    forward_pre_process / forward_post_process (:264-360): x_rescale, half-channel duplication,
        final_linear, unpatchify "(T H W) N (pT pH pW C) -> N C (T pT) (H pH) (W pW)"

The reference runs the whole call as ONE dense forward: self-attention with a boolean [L, L]
block mask built from the per-chunk key ranges, cross-attention with a block-diagonal
[L, text tokens] mask (upstream's varlen packing). MagiDiT.forward_chunks (per-chunk SDPA, K/V
cache) must agree in fp32.

Test timesteps are powers of two (or 0): for those the sinusoid's arguments are exact under
either multiplication order, see test_timestep_sinusoid_matches_upstream_bitwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)
import comfy.ops  # noqa: E402

magi = pack("model_patches.magi_model")
errors = pack("cache_core.errors")

EPS = 1e-6
LAT_H, LAT_W, CHUNK_FRAMES = 8, 10, 3      # tokens 4 x 5 per frame; 60 tokens per chunk
TINY = dict(num_layers=3, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=16, in_channels=16, cond_dim=16,
            caption_channels=32, caption_max_length=64, gated=False)
BIG = dict(TINY, gated=True, in_channels=32)   # 24B-like: SwiGLU, half-channel, x_rescale 0.1

ZC_NORMS = ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn", "self_attn_post_norm",
            "mlp_post_norm", "final_layernorm")


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# Model with seeded random weights
# ----------------------------------------------------------------------------------------------

def _init(name, shape, g, zero_norms):
    def randn(*s):
        return torch.randn(*s, generator=g)
    is_zc = any(f".{n}." in f".{name}" for n in ZC_NORMS)
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        if is_zc:
            return torch.zeros(shape) if zero_norms else 0.2 * randn(*shape)   # "+1" convention: near 0
        return 1 + 0.2 * randn(*shape)                                           # plain pre-norms
    if name.endswith("norm.bias") or name.endswith("layernorm.bias"):
        return torch.zeros(shape) if (zero_norms and is_zc) else 0.1 * randn(*shape)
    if name == "rope.bands":
        return 0.05 + 1.2 * torch.rand(*shape, generator=g)
    if name == "y_embedder.null_caption_embedding":
        return randn(*shape)
    if name.endswith(".bias"):
        return 0.1 * randn(*shape)
    fan_in = math.prod(shape[1:])
    return randn(*shape) / math.sqrt(fan_in)


def build(variant=TINY, seed=0, zero_norms=False):
    cfg = magi.MagiConfig(**variant)
    model = magi.MagiDiT(config=cfg, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_init(name, tuple(p.shape), g, zero_norms))
    model.eval()
    sd = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    return model, sd, cfg


_CACHE = {}


def model_for(variant_name):
    if variant_name not in _CACHE:
        _CACHE[variant_name] = build({"tiny": TINY, "big": BIG}[variant_name], seed=len(_CACHE) + 1)
    return _CACHE[variant_name]


def latents(n_chunks, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(1, 16, n_chunks * CHUNK_FRAMES, LAT_H, LAT_W, generator=g)


def texts(lengths, seed, channels=32):
    g = torch.Generator().manual_seed(2000 + seed)
    return [torch.randn(n, channels, generator=g) for n in lengths]


def store(cfg, frames=CHUNK_FRAMES, chunks=8, **kw):
    """The pack's K/V store for one guidance pass, chunks of `frames` latent frames."""
    return magi.kv_store(cfg, chunks, frames * (LAT_H // 2) * (LAT_W // 2), **kw)


def run_pack(model, x, **call):
    with torch.no_grad():
        cache = call.pop("cache", None)
        return model.forward_chunks(x, magi.ChunkForward(**call), cache)


def assert_close(got, want, atol=1e-5):
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert got.shape == want.shape
    assert err <= atol * scale, f"max abs diff {err:.3e} > {atol * scale:.3e} (output scale {scale:.3f})"


def assert_far(a, b, min_diff=1e-3):
    err = (a - b).abs().max().item()
    assert err > min_diff, f"expected a material difference, got max abs diff {err:.3e}"


# ----------------------------------------------------------------------------------------------
# Reference (plain torch, own code)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Quirks:
    """Each field is upstream's convention; the alternative is the 'conventional' way."""
    plus_one: bool = True            # zero-centred gamma (weight + 1) in FusedLayerNorm
    kv_split: str = "per_head"       # linear_kv_xattn rows [k_h, v_h] per KV head; "blocked": [all k | all v]
    interleave: bool = True          # (n hn hd) -> (hn n hd) with hn = 8 before linear_proj
    rope: str = "half"               # flash non-interleaved; "pairs": (2i, 2i+1) pairs
    sincos: str = "cos_sin"          # timestep sinusoid order
    gqa: str = "flash"               # query head h -> KV head h // (Hq / Hkv); "tile": h % Hkv


UP = Quirks()


def ref_ln(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def ref_ln1p(x, w, b, q=UP):
    return F.layer_norm(x, (x.shape[-1],), w + 1 if q.plus_one else w, b, EPS)


def ref_sinusoid(t, q=UP):
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None] * 1000            # upstream's order: (t * f) * 1000
    parts = [torch.cos(args), torch.sin(args)] if q.sincos == "cos_sin" else [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=-1).to(torch.bfloat16)


def ref_t_embed(sd, t, q=UP):
    e = ref_sinusoid(t, q).float()
    h = F.linear(e, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])
    return F.linear(F.silu(h), sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])


def ref_fourier(bands, feat_shape, ref_shape):
    """build_fourier_pos_embed (in_pixels=False) + build_rotary_pos_embed + cat: [sin | cos]."""
    axes = [torch.arange(s, dtype=torch.int64).to(torch.float32) for s in feat_shape]
    axes[1] = axes[1] - (feat_shape[1] - 1) / 2
    axes[2] = axes[2] - (feat_shape[2] - 1) / 2
    scaled = []
    for a, f, r in zip(axes, feat_shape, ref_shape):
        scaled.append(a if f == 1 else a / (f - 1) * (r - 1))
    grid = torch.stack(torch.meshgrid(*scaled, indexing="ij"), dim=-1).unsqueeze(-1)   # T H W 3 1
    pos = grid * bands
    n = math.prod(feat_shape)
    return torch.cat([pos.sin().reshape(n, -1), pos.cos().reshape(n, -1)], dim=-1)


def ref_rope_rows(bands, T, frame_offset, Ht, Wt):
    T_total = T + frame_offset
    rf = math.sqrt(Ht * Wt / (16 * 16))
    rope = ref_fourier(bands, [T_total, Ht, Wt], [T_total, Ht / rf, Wt / rf])
    rope = rope[-(T * Ht * Wt):]
    sin, cos = rope.tensor_split(2, -1)
    return sin, cos


def ref_rotate(x, sin, cos, q=UP):
    """x [L, heads, hd]; sin/cos [L, r]; rotary on the first 2r dims."""
    r = cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    if q.rope == "half":
        x1, x2 = x[..., :r], x[..., r:2 * r]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, x[..., 2 * r:]], dim=-1)
    pairs = x[..., :2 * r].unflatten(-1, (r, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    return torch.cat([rot, x[..., 2 * r:]], dim=-1)


def ref_attention(q_, k, v, allowed, q=UP):
    """q_ [Lq, Hq, d], k/v [Lk, Hk, d], allowed [Lq, Lk] -> [Lq, Hq, d] (scale 1/sqrt(d))."""
    Hq, Hk = q_.shape[1], k.shape[1]
    idx = torch.arange(Hq) // (Hq // Hk) if q.gqa == "flash" else torch.arange(Hq) % Hk
    k, v = k[:, idx], v[:, idx]
    s = torch.einsum("qhd,khd->hqk", q_, k) / math.sqrt(q_.shape[-1])
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def ref_layer(sd, i, cfg, x, gate_tok, sin, cos, y_flat, self_allowed, cross_allowed, q=UP):
    p = f"videodit_blocks.layers.{i}."
    a = p + "self_attention."
    L, hd, H, Hk = x.shape[0], cfg.head_dim, cfg.heads, cfg.kv_heads
    residual = x
    h = ref_ln(x, sd[a + "linear_qkv.layer_norm.weight"], sd[a + "linear_qkv.layer_norm.bias"])
    # self-attention: q/k heads -> fp32 "+1" LN -> RoPE; v plain
    qq = (h @ sd[a + "linear_qkv.q.weight"].T).view(L, H, hd).float()
    qq = ref_rotate(ref_ln1p(qq, sd[a + "q_layernorm.weight"], sd[a + "q_layernorm.bias"], q), sin, cos, q)
    kk = (h @ sd[a + "linear_qkv.k.weight"].T).view(L, Hk, hd).float()
    kk = ref_rotate(ref_ln1p(kk, sd[a + "k_layernorm.weight"], sd[a + "k_layernorm.bias"], q), sin, cos, q)
    vv = (h @ sd[a + "linear_qkv.v.weight"].T).view(L, Hk, hd)
    core = ref_attention(qq, kk, vv, self_allowed, q).reshape(L, H * hd)
    # cross-attention to the packed text tokens
    qx = (h @ sd[a + "linear_qkv.qx.weight"].T).view(L, H, hd)
    qx = ref_ln1p(qx, sd[a + "q_layernorm_xattn.weight"], sd[a + "q_layernorm_xattn.bias"], q)
    kv = y_flat @ sd[a + "linear_kv_xattn.weight"].T                       # [Ly, 2 * Hk * hd]
    if q.kv_split == "per_head":
        kv = kv.view(-1, Hk, 2 * hd)
        kx, vx = kv[..., :hd], kv[..., hd:]
    else:
        kx, vx = kv[:, :Hk * hd].reshape(-1, Hk, hd), kv[:, Hk * hd:].reshape(-1, Hk, hd)
    kx = ref_ln1p(kx, sd[a + "k_layernorm_xattn.weight"], sd[a + "k_layernorm_xattn.bias"], q)
    cross = ref_attention(qx, kx, vx, cross_allowed, q).reshape(L, H * hd)
    joined = torch.cat([core, cross], dim=-1)                              # (n hn hd), n = 2
    if q.interleave:
        joined = joined.view(L, 2, 8, -1).permute(0, 2, 1, 3).reshape(L, -1)   # (hn n hd), hn = 8
    attn = joined @ sd[a + "linear_proj.weight"].T
    g_msa, g_mlp = gate_tok[i].chunk(2, dim=-1)
    x = residual + ref_ln1p(attn * g_msa, sd[p + "self_attn_post_norm.weight"], sd[p + "self_attn_post_norm.bias"], q)
    residual = x
    m = ref_ln(x, sd[p + "mlp.layer_norm.weight"], sd[p + "mlp.layer_norm.bias"]) @ sd[p + "mlp.linear_fc1.weight"].T
    if cfg.gated:
        u, w = m.chunk(2, dim=-1)
        m = F.silu(u) * w
    else:
        m = F.gelu(m)
    m = m @ sd[p + "mlp.linear_fc2.weight"].T
    return residual + ref_ln1p(m * g_mlp, sd[p + "mlp_post_norm.weight"], sd[p + "mlp_post_norm.bias"], q)


def ref_forward(sd, cfg, x, t, texts, first, start=0, null_row=False, dt=None, q=UP):
    """Dense forward of consecutive chunks start.. (all of them in x, none cached)."""
    n = len(t)
    half = cfg.in_channels == 32
    rescale = 0.1 if half else 1.0
    x = x.float() * rescale
    if half:
        x = torch.cat([x, x], dim=1)
    e = F.conv3d(x, sd["x_embedder.weight"], stride=(1, 2, 2))             # [1, d, T, Ht, Wt]
    _, d, T, Ht, Wt = e.shape
    tok = e[0].permute(1, 2, 3, 0).reshape(T * Ht * Wt, d)                # (T H W) d
    L = tok.shape[0]
    per_chunk, frames = L // n, T // n
    sin, cos = ref_rope_rows(sd["rope.bands"], T, frames * start, Ht, Wt)
    # condition per chunk
    tt = torch.tensor(t, dtype=torch.float32)
    cond = ref_t_embed(sd, tt, q)
    if dt is not None:
        cond = cond + ref_t_embed(sd, torch.full_like(tt, float(dt)), q)
    row = sd["y_embedder.null_caption_embedding"][-1 if null_row else -2]
    cond = cond + F.linear(row, sd["y_embedder.y_proj_adaln.0.weight"], sd["y_embedder.y_proj_adaln.0.bias"])
    cmap = torch.arange(n).repeat_interleave(per_chunk)                     # token -> its chunk
    gates = []
    for i in range(cfg.num_layers):
        ap = f"videodit_blocks.layers.{i}.ada_modulate_layer.proj.0."
        g = torch.tanh(F.linear(F.silu(cond), sd[ap + "weight"], sd[ap + "bias"]))
        gates.append(g[cmap])
    # text: SiLU(Linear), packed, block-diagonal cross mask
    ys = [F.silu(F.linear(s.float(), sd["y_embedder.y_proj_xattn.0.weight"], sd["y_embedder.y_proj_xattn.0.bias"]))
          for s in texts]
    y_flat = torch.cat(ys, dim=0)
    ymap = torch.cat([torch.full((len(s),), i) for i, s in enumerate(texts)])
    cross_allowed = ymap[None, :] == cmap[:, None]
    # block-causal self mask from the per-chunk key ranges
    rel_first = torch.tensor(first) - start
    assert (rel_first >= 0).all(), "dense reference: every key range must lie in the call"
    self_allowed = (cmap[None, :] >= rel_first[cmap][:, None]) & (cmap[None, :] <= cmap[:, None])
    h = tok
    for i in range(cfg.num_layers):
        h = ref_layer(sd, i, cfg, h, gates, sin, cos, y_flat, self_allowed, cross_allowed, q)
    h = ref_ln1p(h, sd["videodit_blocks.final_layernorm.weight"], sd["videodit_blocks.final_layernorm.bias"], q)
    out = h @ sd["final_linear.linear.weight"].T                           # [L, pT pH pW C]
    C = cfg.in_channels
    out = out.view(T, Ht, Wt, 1, 2, 2, C).permute(6, 0, 3, 1, 4, 2, 5).reshape(1, C, T, Ht * 2, Wt * 2)
    if half:
        out = out[:, :16]
    return out / rescale


# ----------------------------------------------------------------------------------------------
# Whole-model comparisons
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny", "big"])
@pytest.mark.parametrize("start", [0, 2])
def test_single_chunk(variant, start):
    model, sd, cfg = model_for(variant)
    x = latents(1, 0)
    call = dict(start=start, t=[0.25], texts=texts([7], 0), first=[start])
    got = run_pack(model, x, **call)
    want = ref_forward(sd, cfg, x, **call)
    assert got.shape == x.shape
    assert want.abs().max() > 0.1
    assert_close(got, want)


@pytest.mark.parametrize("variant", ["tiny", "big"])
@pytest.mark.parametrize("dt", [None, 8.0])
def test_window_of_three_chunks(variant, dt):
    model, sd, cfg = model_for(variant)
    x = latents(3, 1)
    call = dict(start=1, t=[0.5, 0.125, 0.0], texts=texts([5, 9, 3], 1), first=[1, 1, 2], dt=dt)
    got = run_pack(model, x, **call)
    want = ref_forward(sd, cfg, x, **call)
    assert_close(got, want)


def test_window_ranges_and_texts_matter():
    """The reference is sensitive to what the window test varies (so agreement means something)."""
    model, sd, cfg = model_for("tiny")
    x = latents(3, 1)
    base = dict(start=1, t=[0.5, 0.125, 0.0], texts=texts([5, 9, 3], 1), first=[1, 1, 2])
    want = run_pack(model, x, **base)
    other_ranges = run_pack(model, x, **dict(base, first=[1, 2, 3]))
    assert_far(want[:, :, 2 * CHUNK_FRAMES:], other_ranges[:, :, 2 * CHUNK_FRAMES:])    # chunk 3: own range
    assert_close(want[:, :, :CHUNK_FRAMES], other_ranges[:, :, :CHUNK_FRAMES])          # chunk 1 unchanged
    t2 = texts([5, 9, 3], 1)
    t2[1] = torch.randn(9, 32, generator=torch.Generator().manual_seed(77))
    other_text = run_pack(model, x, **dict(base, texts=t2))
    # chunk 2's own text changed; chunk 1 does not see it (cross-attention is per chunk, keys are causal)
    assert_far(want[:, :, CHUNK_FRAMES:2 * CHUNK_FRAMES], other_text[:, :, CHUNK_FRAMES:2 * CHUNK_FRAMES])
    assert_close(want[:, :, :CHUNK_FRAMES], other_text[:, :, :CHUNK_FRAMES])
    # per-chunk t: changing chunk 3's t changes only chunk 3 (nobody attends to it)
    other_t = run_pack(model, x, **dict(base, t=[0.5, 0.125, 0.25]))
    assert_far(want[:, :, 2 * CHUNK_FRAMES:], other_t[:, :, 2 * CHUNK_FRAMES:])
    assert_close(want[:, :, :2 * CHUNK_FRAMES], other_t[:, :, :2 * CHUNK_FRAMES])


@pytest.mark.parametrize("variant", ["tiny", "big"])
@pytest.mark.parametrize("scenario", ["prefix_pair", "refresh"])
@pytest.mark.parametrize("offload", [False, True])
def test_cached_chunks_equal_one_dense_forward(variant, scenario, offload):
    """An earlier call writes its chunks' K/V; a later call whose key ranges reach back into them
    equals one full forward over all chunks under the same ranges (dense block mask)."""
    model, sd, cfg = model_for(variant)
    if scenario == "prefix_pair":          # chunks 0, 1 written, then a window 2..4
        a = dict(start=0, t=[0.5, 0.25], texts=texts([4, 6], 2), first=[0, 0], write=(0, 1))
        b = dict(start=2, t=[0.125, 0.0625, 0.0], texts=texts([8, 3, 5], 3), first=[0, 1, 3])
    else:                                  # a clean refresh of chunk 1 alone (self-only), then 2..4
        a = dict(start=1, t=[1.0], texts=texts([6], 4), first=[1], write=(1,))
        b = dict(start=2, t=[0.5, 0.25, 0.125], texts=texts([2, 7, 4], 5), first=[1, 1, 3])
    na, nb = len(a["t"]), len(b["t"])
    x = latents(na + nb, 3)
    xa, xb = x[:, :, :na * CHUNK_FRAMES], x[:, :, na * CHUNK_FRAMES:]
    cache = store(cfg, offload=offload)
    out_a = run_pack(model, xa, cache=cache, **a)
    assert cache.chunks() == list(a["write"])
    out_b = run_pack(model, xb, cache=cache, **b)
    full = dict(start=a["start"], t=a["t"] + b["t"], texts=a["texts"] + b["texts"], first=a["first"] + b["first"])
    want = ref_forward(sd, cfg, x, **full)
    assert_close(out_a, want[:, :, :na * CHUNK_FRAMES])
    assert_close(out_b, want[:, :, na * CHUNK_FRAMES:])
    # and the pack's own one-call forward over everything agrees too
    assert_close(run_pack(model, x, **full), want)
    # the cached chunks really are read: without them chunk 2 (range from chunk a's first) differs
    alone = run_pack(model, xb, **dict(b, first=[2, 2, 3]))
    assert_far(alone[:, :, :CHUNK_FRAMES], out_b[:, :, :CHUNK_FRAMES])


def test_cache_read_of_unwritten_chunk_raises():
    model, sd, cfg = model_for("tiny")
    cache = store(cfg)
    with pytest.raises(RuntimeError, match="chunks 0..0"):
        run_pack(model, latents(1, 0), cache=cache, start=1, t=[0.5], texts=texts([3], 0), first=[0])


@pytest.mark.parametrize("variant", ["tiny", "big"])
def test_null_row_selects_the_unconditional_adaln_row(variant):
    model, sd, cfg = model_for(variant)
    x = latents(2, 4)
    call = dict(start=0, t=[0.5, 0.25], texts=texts([5, 5], 6), first=[0, 0])
    cond = run_pack(model, x, null_row=False, **call)
    uncond = run_pack(model, x, null_row=True, **call)
    assert_close(cond, ref_forward(sd, cfg, x, null_row=False, **call))
    assert_close(uncond, ref_forward(sd, cfg, x, null_row=True, **call))
    assert_far(cond, uncond)


def test_null_text_is_first_50_rows():
    model, sd, cfg = model_for("tiny")
    nt = model.null_text(torch.device("cpu"))
    assert torch.equal(nt, sd["y_embedder.null_caption_embedding"][:50])


def test_forward_refuses_plain_samplers():
    model, sd, cfg = model_for("tiny")
    with pytest.raises(errors.InputError):
        model(torch.zeros(1, 16, 3, 8, 8), torch.zeros(1))


# ----------------------------------------------------------------------------------------------
# Quirks, each pinned: the pack matches upstream's way and would not match the conventional way
# ----------------------------------------------------------------------------------------------

QUIRK_CALL = dict(start=1, t=[0.5, 0.125], texts=texts([6, 4], 9), first=[1, 1])


@pytest.mark.parametrize("alt", [Quirks(kv_split="blocked"), Quirks(interleave=False), Quirks(rope="pairs"),
                                 Quirks(sincos="sin_cos"), Quirks(plus_one=False), Quirks(gqa="tile")],
                         ids=["kv_split", "interleave", "rope_pairs", "sinusoid_order", "plus_one", "gqa_mapping"])
def test_model_quirk_is_upstreams(alt):
    model, sd, cfg = model_for("tiny")
    x = latents(2, 9)
    got = run_pack(model, x, **QUIRK_CALL)
    assert_close(got, ref_forward(sd, cfg, x, **QUIRK_CALL))
    assert_far(got, ref_forward(sd, cfg, x, q=alt, **QUIRK_CALL))


def test_zero_centred_layernorm_uses_w_plus_1():
    ln = magi.ZeroCenteredLayerNorm(24, eps=EPS, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ln.weight.copy_(0.1 * torch.randn(24, generator=g))
        ln.bias.copy_(0.1 * torch.randn(24, generator=g))
    x = torch.randn(5, 24, generator=g)
    with torch.no_grad():
        y = ln(x)
    assert_close(y, F.layer_norm(x, (24,), ln.weight + 1, ln.bias, EPS), atol=1e-6)
    assert_far(y, F.layer_norm(x, (24,), ln.weight, ln.bias, EPS), min_diff=0.5)


def test_model_with_zero_norm_weights_is_not_trivial():
    """All "+1" norms with weight 0 and bias 0 are plain normalisations, not zeros."""
    model, sd, cfg = build(TINY, seed=11, zero_norms=True)
    x = latents(2, 5)
    call = dict(start=0, t=[0.5, 0.25], texts=texts([4, 4], 7), first=[0, 0])
    got = run_pack(model, x, **call)
    assert got.std() > 0.1
    assert_close(got, ref_forward(sd, cfg, x, **call))
    assert ref_forward(sd, cfg, x, q=Quirks(plus_one=False), **call).abs().max() < 1e-6


def test_plain_pre_norms_have_no_plus_one():
    model, sd, cfg = model_for("tiny")
    layer = model.videodit_blocks.layers[0]
    assert type(layer.self_attention.linear_qkv.layer_norm) is not magi.ZeroCenteredLayerNorm
    assert type(layer.mlp.layer_norm) is not magi.ZeroCenteredLayerNorm
    for name in ("q_layernorm", "k_layernorm", "q_layernorm_xattn", "k_layernorm_xattn"):
        assert isinstance(getattr(layer.self_attention, name), magi.ZeroCenteredLayerNorm)
    assert isinstance(layer.self_attn_post_norm, magi.ZeroCenteredLayerNorm)
    assert isinstance(layer.mlp_post_norm, magi.ZeroCenteredLayerNorm)
    assert isinstance(model.videodit_blocks.final_layernorm, magi.ZeroCenteredLayerNorm)


def test_timestep_sinusoid_cos_then_sin_bf16():
    t = torch.tensor([0.0, 0.0625, 0.25, 0.5, 1.0, 8.0, 32.0])       # exact t*1000 in either order
    got = magi.timestep_sinusoid(t)
    assert got.shape == (7, 256)
    assert torch.equal(got, ref_sinusoid(t).float())
    assert torch.equal(got, got.to(torch.bfloat16).float())           # rounded to bf16
    assert torch.equal(got[0], torch.cat([torch.ones(128), torch.zeros(128)]))   # t = 0: cos = 1 first
    assert not torch.allclose(got, ref_sinusoid(t, Quirks(sincos="sin_cos")).float(), atol=1e-2)


def test_timestep_sinusoid_matches_upstream_bitwise():
    """Upstream computes args = t[:, None] * freqs[None] * 1000, i.e. (t * f) * 1000, then rounds the
    cos/sin to bf16 (dit_module.py:88-99). Any other fp32 order flips some bf16 roundings."""
    t = torch.linspace(0.0, 1.0, 4001)[1:]
    got = magi.timestep_sinusoid(t)
    want = ref_sinusoid(t).float()
    bad = (got != want).any(-1)
    assert not bad.any(), (f"{int(bad.sum())} of {len(t)} timesteps differ from upstream's bf16 sinusoid, "
                           f"e.g. t={t[bad][:3].tolist()} (max diff {(got - want).abs().max().item():.2e})")


def test_apply_rope_first_half_second_half():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 10, 16, generator=g)                       # [B, heads, L, hd]
    ang = torch.randn(10, 6, generator=g)
    cos, sin = ang.cos(), ang.sin()
    got = magi.apply_rope(x, cos, sin)
    flat = x.transpose(1, 2).reshape(-1, 3, 16)                       # [B*L, heads, hd]
    rep = lambda a: a.repeat(2, 1)                                    # noqa: E731 (rows of both batches)
    want = ref_rotate(flat, rep(sin), rep(cos)).reshape(2, 10, 3, 16).transpose(1, 2)
    alt = ref_rotate(flat, rep(sin), rep(cos), Quirks(rope="pairs")).reshape(2, 10, 3, 16).transpose(1, 2)
    assert_close(got, want, atol=1e-6)
    assert_far(got, alt, min_diff=0.1)
    assert torch.equal(got[..., 12:], x[..., 12:])                   # dims past 2 * 6 untouched


@pytest.mark.parametrize("frames,offset,h,w", [(3, 0, 4, 5), (6, 6, 4, 5), (2, 10, 6, 9), (1, 0, 16, 16),
                                               (6, 42, 45, 45), (1, 0, 4, 5)])
def test_rope_table_equals_build_fourier_pos_embed(frames, offset, h, w):
    bands = 0.05 + torch.rand(4, generator=torch.Generator().manual_seed(5))
    cos, sin = magi.rope_table(bands, frames, offset, h, w)
    want_sin, want_cos = ref_rope_rows(bands, frames, offset, h, w)
    assert cos.shape == (frames * h * w, 12)
    assert_close(cos, want_cos, atol=1e-5)
    assert_close(sin, want_sin, atol=1e-5)


@pytest.mark.parametrize("frames,offset,h,w", [(4, 0, 4, 5), (3, 2, 4, 5), (6, 24, 30, 52), (30, 0, 30, 52)],
                         ids=["T4_h4", "T5_w5", "480x832_T30", "480x832_T30_one_call"])
def test_rope_table_when_total_frames_equal_a_token_side(frames, offset, h, w):
    """H/W must be centred even when T_total happens to equal the token height or width
    (e.g. 480x832 -> 30x52 tokens with 5 chunks of 6 latent frames: T_total = 30)."""
    bands = 0.05 + torch.rand(4, generator=torch.Generator().manual_seed(5))
    cos, sin = magi.rope_table(bands, frames, offset, h, w)
    want_sin, want_cos = ref_rope_rows(bands, frames, offset, h, w)
    assert_close(cos, want_cos, atol=1e-5)
    assert_close(sin, want_sin, atol=1e-5)


def test_cached_chunk_read_by_a_call_whose_frames_equal_the_token_height():
    """Within one call a constant shift of all H positions cancels in q.k (RoPE is relative), but K/V
    cached by a call with other T_total were rotated with centred H positions: both calls must use
    the same grid. Chunks of 2 latent frames, tokens 4 x 5: call B has T_total = 4 = token height."""
    model, sd, cfg = model_for("tiny")
    x = torch.randn(1, 16, 4, LAT_H, LAT_W, generator=torch.Generator().manual_seed(12))
    cache = store(cfg, frames=2)
    a = dict(start=0, t=[0.5], texts=texts([5], 12), first=[0], write=(0,))
    b = dict(start=1, t=[0.25], texts=texts([6], 13), first=[0])
    out_a = run_pack(model, x[:, :, :2], cache=cache, **a)
    out_b = run_pack(model, x[:, :, 2:], cache=cache, **b)
    want = ref_forward(sd, cfg, x, start=0, t=a["t"] + b["t"], texts=a["texts"] + b["texts"], first=[0, 0])
    assert_close(out_a, want[:, :, :2])
    assert_close(out_b, want[:, :, 2:])


def test_rope_uses_absolute_frames_of_cached_chunks():
    bands = 0.05 + torch.rand(4, generator=torch.Generator().manual_seed(6))
    c_all, s_all = magi.rope_table(bands, 9, 0, 4, 5)
    c_tail, s_tail = magi.rope_table(bands, 3, 6, 4, 5)
    assert_close(c_tail, c_all[-60:], atol=1e-6)
    assert_close(s_tail, s_all[-60:], atol=1e-6)
    c_zero, _ = magi.rope_table(bands, 3, 0, 4, 5)
    assert_far(c_tail, c_zero, min_diff=0.1)


def test_attend_gqa_flash_mapping():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 7, 16, generator=g)
    k = torch.randn(1, 2, 9, 16, generator=g)
    v = torch.randn(1, 2, 9, 16, generator=g)
    got = magi.attend(q, k, v)
    allowed = torch.ones(7, 9, dtype=torch.bool)
    want = ref_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), allowed)
    alt = ref_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), allowed, Quirks(gqa="tile"))
    assert_close(got[0].transpose(0, 1), want, atol=1e-6)
    assert_far(got[0].transpose(0, 1), alt, min_diff=0.05)


# ----------------------------------------------------------------------------------------------
# Strict checkpoint schema
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["tiny", "big"])
def test_expected_keys_equal_the_module_tree(variant):
    model, sd, cfg = model_for(variant)
    want = magi.expected_keys(cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    magi.check_keys(sd, cfg)
    assert magi.MagiConfig.from_state_dict(sd) == cfg
    # shapes that follow from upstream's modules
    p = "videodit_blocks.layers.0."
    hk = cfg.kv_heads * cfg.head_dim
    assert want[p + "self_attention.linear_kv_xattn.weight"] == (2 * hk, cfg.hidden)
    assert want[p + "self_attention.linear_proj.weight"] == (cfg.hidden, 2 * cfg.heads * cfg.head_dim)
    assert want[p + "mlp.linear_fc1.weight"] == ((2 if cfg.gated else 1) * cfg.ffn, cfg.hidden)
    assert want["rope.bands"] == (cfg.head_dim // 8,)
    assert want["final_linear.linear.weight"] == (4 * cfg.in_channels, cfg.hidden)


def _ref_param_count(L, d, ffn, hq, hk, hd, cin, cond, cap, cap_len, gated):
    """Own count from upstream's module shapes (dit_module.py / dit_model.py)."""
    q, k = hq * hd, hk * hd
    block = (2 * d * cond + 2 * d                    # ada_modulate_layer
             + 2 * d                                 # pre-norm
             + 2 * q * d + 2 * k * d                 # q, qx, k, v
             + 2 * k * d + d * 2 * q                 # kv_xattn, proj
             + 4 * 2 * hd                            # 4 QK norms
             + 2 * 2 * d + 2 * d                     # 2 post norms, mlp pre-norm
             + (2 if gated else 1) * ffn * d + d * ffn)
    emb = (d * cin * 4 + 256 * cond + cond + cond * cond + cond + cap * d + d + cap * cond + cond
           + cap_len * cap + hd // 8 + 2 * d + 4 * cin * d)
    return L * block + emb


@pytest.mark.parametrize("args,approx", [((34, 3072, 12288, 24, 8, 128, 16, 768, 4096, 800, False), 4.46e9),
                                         ((48, 6144, 16384, 48, 8, 128, 32, 1536, 4096, 800, True), 23.9e9)],
                         ids=["4.5B", "24B"])
def test_real_config_parameter_counts(args, approx):
    L, d, ffn, hq, hk, hd, cin, cond, cap, cap_len, gated = args
    cfg = magi.MagiConfig(num_layers=L, hidden=d, ffn=ffn, heads=hq, kv_heads=hk, head_dim=hd, in_channels=cin,
                          cond_dim=cond, caption_channels=cap, caption_max_length=cap_len, gated=gated)
    count = sum(math.prod(s) for s in magi.expected_keys(cfg).values())
    assert count == _ref_param_count(*args)
    assert abs(count / approx - 1) < 0.01
    assert cfg.size_name == ("4.5B" if L == 34 else "24B")
    assert cfg.half_channel == (cin == 32) and cfg.x_rescale == (0.1 if cin == 32 else 1.0)


def _check_fails(sd, cfg):
    with pytest.raises(errors.InputError) as e:
        magi.check_keys(sd, cfg)
    return str(e.value)


def test_check_keys_names_missing_unexpected_and_wrong_shape():
    model, sd, cfg = model_for("tiny")
    key = "videodit_blocks.layers.1.self_attention.linear_kv_xattn.weight"
    missing = dict(sd)
    del missing[key]
    msg = _check_fails(missing, cfg)
    assert key in msg and "missing" in msg

    extra_key = "videodit_blocks.layers.1.self_attention.linear_qkv.weight"       # a packed QKV: not MAGI-1
    extra = dict(sd, **{extra_key: torch.zeros(3)})
    msg = _check_fails(extra, cfg)
    assert extra_key in msg and "unexpected" in msg

    shape_key = "videodit_blocks.layers.2.mlp.linear_fc1.weight"
    wrong = dict(sd, **{shape_key: torch.zeros(cfg.ffn * 2, cfg.hidden)})
    msg = _check_fails(wrong, cfg)
    assert shape_key in msg and str((cfg.ffn * 2, cfg.hidden)) in msg and str((cfg.ffn, cfg.hidden)) in msg

    both = dict(missing, **{extra_key: torch.zeros(3)})
    msg = _check_fails(both, cfg)
    assert key in msg and extra_key in msg

    with pytest.raises(errors.InputError) as e:
        magi.check_keys(missing, cfg, input_name="dit_file")
    assert e.value.input_name == "dit_file"


def test_blocked_attention_and_mlp_equal_the_unblocked_forward(monkeypatch):
    """Query row blocks (large score matrices) and MLP token blocks change nothing but memory."""
    model = model_for("tiny")[0]
    x = latents(3, 7)
    call = dict(start=0, t=[0.2, 0.5, 0.8], texts=texts([5, 6, 7], 7), first=[0, 0, 1])
    whole = run_pack(model, x, **call)
    monkeypatch.setattr(magi, "WORK_ELEMENTS", 1000)      # forces many query and token blocks
    blocked = run_pack(model, x, **call)
    assert_close(blocked, whole, atol=1e-6)


def test_token_subset_equals_the_matching_rows_of_the_full_forward():
    """MotionCache's SUBSET on MAGI-1: only some tokens run; the chunk's other rows attend through
    their cached K/V, so with the same input the subset's outputs are the full forward's rows."""
    model = model_for("tiny")[0]
    x = latents(2, 11)
    tx = texts([5, 6], 11)
    cache = store(model.config)
    run_pack(model, x[:, :, :CHUNK_FRAMES], start=0, t=[0.4], texts=tx[:1], first=[0], write=(0,), cache=cache)
    second = dict(start=1, t=[0.6], texts=tx[1:], first=[0], write=(1,), cache=cache, token_major=True)
    full = run_pack(model, x[:, :, CHUNK_FRAMES:], **second)
    n = CHUNK_FRAMES * (LAT_H // 2) * (LAT_W // 2)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(3))[: n // 3].sort().values
    sub = run_pack(model, x[:, :, CHUNK_FRAMES:], **dict(second, tokens=idx))
    assert sub.shape == (1, len(idx), full.shape[-1])
    assert_close(sub, full[:, idx], atol=1e-5)
    # the same rows without the chunk's cached K/V (its other tokens missing) would differ
    alone = store(model.config)
    run_pack(model, x[:, :, :CHUNK_FRAMES], start=0, t=[0.4], texts=tx[:1], first=[0], write=(0,), cache=alone)
    for layer in range(model.config.num_layers):
        zero = torch.zeros_like(cache.visible(0, layer, 1, 1)[0])
        alone.write(0, layer, 1, zero, zero)
    assert_far(run_pack(model, x[:, :, CHUNK_FRAMES:], **dict(second, cache=alone, tokens=idx)), full[:, idx])


def test_token_major_output_is_the_patchified_video():
    model = model_for("big")[0]
    x = latents(1, 12)
    call = dict(start=0, t=[0.5], texts=texts([4], 12), first=[0])
    video = run_pack(model, x, **call)
    tok = run_pack(model, x, **dict(call, token_major=True))
    assert_close(magi.tokens_to_video(tok, CHUNK_FRAMES, LAT_H // 2, LAT_W // 2, 2, 16), video, atol=1e-6)
    assert torch.equal(magi.video_to_tokens(magi.tokens_to_video(tok, CHUNK_FRAMES, LAT_H // 2, LAT_W // 2, 2, 16), 2), tok)


def test_flowcache_decisions_on_magi_match_the_reference_rule():
    """FlowCache B2 on MAGI-1, by hand: d = mean|E(x) - E(x_prev)| / mean|E(x_prev)| on the patch
    embedding; compute while local step < warm-up, else reuse while acc + d < thr (acc += d),
    otherwise compute and acc = 0. The policy the cache node builds must decide the same."""
    fcp = pack("cache_core.flowcache_policy")
    model = model_for("tiny")[0]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, CHUNK_FRAMES, LAT_H, LAT_W, generator=g)
    inputs = [x + 0.04 * k * torch.randn(x.shape, generator=g) for k in range(12)]
    thr, warmup, steps = 0.12, 2, 12
    policy = fcp.FlowCachePolicy(fcp.FlowCacheConfig(rel_l1_thresh=thr, warmup_steps=warmup, final_steps=0,
                                                     coefficients="none"))
    got, want, acc, prev = [], [], 0.0, None
    for j, xi in enumerate(inputs):
        with torch.no_grad():
            e = model.embed(xi)[0]
        got.append(policy.decide(0, 7, e, j, steps).kind)
        if j < warmup or prev is None:
            want.append("compute")
            acc = 0.0
        else:
            d = ((e - prev).abs().mean() / prev.abs().mean()).item()
            if acc + d < thr:
                acc += d
                want.append("skip")
            else:
                acc = 0.0
                want.append("compute")
        prev = e
        if got[-1] == "compute":
            policy.observe(0, 7, torch.zeros(1, 4, 2), torch.ones(1, 4, 2))
    assert got == want and "skip" in got and got.count("compute") > warmup


def test_the_cache_measures_the_patch_embedding_in_the_models_dtype():
    """MAGI-1's FlowCache reference embeds the chunk in fp32, casts the embedding to the model's
    dtype (bf16) and measures its change in that dtype: the indicator the policy keeps is exactly
    that tensor, for a bf16 run as for an fp32 one."""
    from types import SimpleNamespace
    magi_cache = pack("model_patches.magi_cache")
    fc = pack("cache_core.flowcache_policy")
    schedule = pack("cache_core.magi_schedule")
    model = model_for("tiny")[0]
    x = latents(2, 21)
    plan = schedule.plan_steps(2, 0, 4, 8)
    for dtype in (torch.bfloat16, torch.float32):
        spec = SimpleNamespace(attention="chunk_causal", compress=None,
                               make_policy=lambda: fc.FlowCachePolicy(fc.FlowCacheConfig(rel_l1_thresh=0.1,
                                                                                       coefficients="none")))
        run = magi_cache.MagiCacheRun(spec)
        run.bind(model, plan, 8, (5, 4, 3, 2), False, (LAT_H // 2, LAT_W // 2), CHUNK_FRAMES, 2 * CHUNK_FRAMES, dtype)
        call = magi.ChunkForward(0, [0.1], texts([4], 21), [0], write=(0,), token_major=True)
        with torch.no_grad():
            run.chunk_velocity(lambda xc, c, kv: model.forward_chunks(xc, c, kv), lambda c, kv: 0.0,
                               magi_cache.TEXT, x, 0, 0, call)
            want = model.embed(x[:, :, :CHUNK_FRAMES])[0].to(dtype)
        kept = run.step.policy.state(magi_cache.TEXT, 0).prev
        assert kept.dtype == dtype and torch.equal(kept, want)
