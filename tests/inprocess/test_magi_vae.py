"""MAGI-1's ViT VAE: layer maths against hand-written formulas, the strict checkpoint schema,
position-table resizing, MAGI's tiling (placement, blend ramps, one tile == untiled) and the
ComfyUI VAE conventions (IMAGE in [0, 1], 5-D decode, an image encoded as 4 copies)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)
import comfy.sd  # noqa: E402
mv = pack("model_patches.magi_vae")
errors = pack("cache_core.errors")


def random_sd(cfg, seed=0):
    """Random weights in the official layout; LayerNorm weights 1 so activations stay sane."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in mv.expected_vae_keys(cfg).items():
        if k.endswith(("norm.weight", "norm2.weight")):
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.05
    return sd


@pytest.fixture(scope="module")
def tiny_sd():
    return random_sd(mv.tiny_vae_config())


@pytest.fixture(scope="module")
def vae(tiny_sd):
    return mv.load_magi_vae(tiny_sd)


@pytest.fixture(scope="module")
def net(vae):
    return vae.first_stage_model


def hand_norm(x, eps=1e-5):
    n = x.shape[-1]
    m = x.sum(-1, keepdim=True) / n
    sd = (((x - m) ** 2).sum(-1, keepdim=True) / n).sqrt()
    return (x - m) / (sd + eps)


# ----------------------------------------------------------------------------- layers

def test_manual_layer_norm_is_biased_std_plus_eps_not_layer_norm():
    x = torch.randn(5, 7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.01 + 3
    got = mv.manual_layer_norm(x)
    torch.testing.assert_close(got, hand_norm(x), rtol=1e-9, atol=1e-9)
    # eps outside the sqrt (std ~0.01, so eps 1e-5 on the variance shows) and the biased std
    assert (got - F.layer_norm(x, (16,), eps=1e-5)).abs().max() > 1e-2
    unbiased = (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + 1e-5)
    assert (got - unbiased).abs().max() > 1e-2


def test_attention_normalises_q_k_and_v_per_head(monkeypatch):
    cfg = mv.MagiVAEConfig(embed_dim=256, num_heads=2, depth=1, mlp_hidden=512)
    attn = mv.Attention(cfg)
    g = torch.Generator().manual_seed(2)
    for p in attn.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    x = torch.randn(2, 9, 256, generator=g)
    got = attn(x)

    def reference(norm_v=True, per_head=True):
        qkv = x @ attn.qkv.weight.T + attn.qkv.bias                        # [B, N, 3*D]
        if per_head:
            qkv = qkv.reshape(2, 9, 3, 2, 128)
            q, k, v = hand_norm(qkv[:, :, 0]), hand_norm(qkv[:, :, 1]), qkv[:, :, 2]
            v = hand_norm(v) if norm_v else v
        else:                                                              # wrong: over the whole dim
            q, k, v = (hand_norm(t).reshape(2, 9, 2, 128) for t in qkv.reshape(2, 9, 3, 256).unbind(2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                  # [B, H, N, d]
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(2, 9, 256)
        return out @ attn.proj.weight.T + attn.proj.bias

    torch.testing.assert_close(got, reference(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, reference(norm_v=False), atol=1e-3)
    assert not torch.allclose(got, reference(per_head=False), atol=1e-3)

    seen = {}
    monkeypatch.setattr(mv, "attention", lambda q, k, v: seen.update(q=q, k=k, v=v) or F.scaled_dot_product_attention(q, k, v))
    attn(x)
    for name in "qkv":
        t = seen[name]
        assert t.shape == (2, 2, 9, 128)
        assert t.mean(-1).abs().max() < 1e-5, name
        torch.testing.assert_close(t.std(-1, correction=0), torch.ones(2, 2, 9), atol=1e-3, rtol=0)


def test_unpatchify_orders_features_pt_ph_pw_then_channel():
    grid, patch, c = (2, 1, 3), (2, 2, 2), 3
    t, h, w = grid
    tokens = torch.arange(t * h * w * 8 * c, dtype=torch.float32).reshape(1, t * h * w, 8 * c)
    out = mv.unpatchify(tokens, grid, patch, c)
    assert out.shape == (1, c, 4, 2, 6)
    for lt in range(t):
        for lw in range(w):
            for pt in range(2):
                for ph in range(2):
                    for pw in range(2):
                        for ch in range(c):
                            feat = ((pt * 2 + ph) * 2 + pw) * c + ch          # C fastest
                            want = tokens[0, lt * w + lw, feat]
                            assert out[0, ch, lt * 2 + pt, ph, lw * 2 + pw] == want


def independent_trilinear(grid, size):
    """align_corners=False linear resize, one axis at a time: src = (i + 0.5) * in/out - 0.5, >= 0."""
    for axis, n_out in zip((1, 2, 3), size):
        n_in = grid.shape[axis]
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        lam = (src - i0).reshape([-1 if a == axis else 1 for a in range(grid.ndim)])
        grid = grid.index_select(axis, i0) * (1 - lam) + grid.index_select(axis, i1) * lam
    return grid


@pytest.mark.parametrize("dst", [(3, 5, 11), (2, 16, 6), (4, 8, 8)])
def test_pos_embed_resize_is_trilinear_align_corners_false(dst):
    src, d = (4, 8, 8), 6
    pos = torch.randn(1, 1 + math.prod(src), d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = mv.resize_pos_embed(pos, src, dst)
    assert got.shape == (1, 1 + math.prod(dst), d)
    assert torch.equal(got[:, 0], pos[:, 0])                                   # cls row kept
    want = independent_trilinear(pos[0, 1:].reshape(1, *src, d), dst).reshape(-1, d)
    torch.testing.assert_close(got[0, 1:], want, rtol=1e-6, atol=1e-6)


def reference_trunk(sd, part, x, grid, heads):
    """cls + position table + blocks + LayerNorm, cls dropped, from the state dict with plain F ops."""
    p = lambda k: sd[f"{part}.{k}"]
    b, n, d = x.shape
    pos = p("pos_embed")
    table = independent_trilinear(pos[0, 1:].reshape(1, 4, 8, 8, d), grid).reshape(1, -1, d).to(x.dtype)
    x = torch.cat([p("cls_token").expand(b, -1, -1), x], 1) + torch.cat([pos[:, :1], table], 1)
    for i in range(2):
        q = lambda k: p(f"blocks.{i}.{k}")
        qkv = F.linear(x, q("attn.qkv.weight"), q("attn.qkv.bias")).reshape(b, n + 1, 3, heads, d // heads)
        qh, kh, vh = (hand_norm(qkv[:, :, j]).transpose(1, 2) for j in range(3))
        w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d // heads), -1)
        a = (w @ vh).transpose(1, 2).reshape(b, n + 1, d)
        x = x + F.linear(a, q("attn.proj.weight"), q("attn.proj.bias"))      # no norm before attention
        hdn = F.layer_norm(x, (d,), q("norm2.weight"), q("norm2.bias"), eps=1e-5)
        hdn = F.linear(F.gelu(F.linear(hdn, q("mlp.fc1.weight"), q("mlp.fc1.bias"))), q("mlp.fc2.weight"), q("mlp.fc2.bias"))
        x = x + hdn
    return F.layer_norm(x, (d,), p("norm.weight"), p("norm.bias"), eps=1e-5)[:, 1:]


def reference_encode(sd, x):
    e = F.conv3d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=(4, 8, 8))
    b, d, t, h, w = e.shape
    tok = reference_trunk(sd, "encoder", e.flatten(2).transpose(1, 2), (t, h, w), heads=4)
    mom = F.linear(tok, sd["encoder.last_layer.weight"], sd["encoder.last_layer.bias"])
    return mom[..., :16].reshape(b, t, h, w, 16).permute(0, 4, 1, 2, 3)        # the mean half


def reference_decode(sd, z):
    b, c, t, h, w = z.shape
    tok = F.linear(z.flatten(2).transpose(1, 2), sd["decoder.proj_in.weight"], sd["decoder.proj_in.bias"])
    tok = reference_trunk(sd, "decoder", tok, (t, h, w), heads=4).reshape(b, t, h, w, 4, 8, 8, 1)
    px = torch.empty(b, 1, 4 * t, 8 * h, 8 * w)
    for pt in range(4):                                                        # token (pt, ph, pw, C) -> pixel
        for ph in range(8):
            for pw in range(8):
                px[:, :, pt::4, ph::8, pw::8] = tok[:, :, :, :, pt, ph, pw, :].permute(0, 4, 1, 2, 3)
    return F.conv3d(px, sd["decoder.last_layer.weight"], sd["decoder.last_layer.bias"], padding=1)


@pytest.mark.parametrize("grid", [(4, 8, 8), (2, 5, 7)])
def test_network_matches_a_functional_reference(tiny_sd, net, grid):
    t, h, w = grid
    g = torch.Generator().manual_seed(11)
    x = torch.rand(1, 3, 4 * t, 8 * h, 8 * w, generator=g) * 2 - 1
    z = torch.randn(1, 16, t, h, w, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(net.encode(x), reference_encode(tiny_sd, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net.decode(z), reference_decode(tiny_sd, z), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- checkpoint schema

def test_real_config_schema_matches_the_module_and_upstream_shapes():
    cfg = mv.MagiVAEConfig()
    keys = mv.expected_vae_keys(cfg)
    model = mv.MagiViTVAE(cfg, device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    assert keys["encoder.patch_embed.proj.weight"] == (1024, 3, 4, 8, 8)
    assert keys["decoder.proj_in.weight"] == (1024, 16)
    assert keys["encoder.last_layer.weight"] == (32, 1024)
    assert keys["decoder.last_layer.weight"] == (3, 4, 3, 3, 3)
    assert keys["encoder.pos_embed"] == (1, 1 + 4 * 32 * 32, 1024)
    assert len([k for k in keys if k.startswith("decoder.blocks.")]) == 24 * 10
    n = sum(math.prod(s) for s in keys.values())
    assert 0.60e9 < n < 0.62e9                                                 # "~0.6B params"
    assert cfg.ref_grid == (4, 32, 32) and cfg.unpatch_channels == 4 and cfg.head_dim == 64


def test_config_is_read_from_shapes(tiny_sd):
    cfg = mv.vae_config_from_state_dict(tiny_sd)
    assert cfg == mv.tiny_vae_config()
    assert cfg.ref_grid == (4, 8, 8) and cfg.num_heads == 4
    assert mv.vae_config_from_state_dict(tiny_sd, {"ddconfig": {"num_heads": 2}}).num_heads == 2
    assert mv.vae_config_from_state_dict(tiny_sd, mv.vae_config_json(cfg)) == cfg
    with pytest.raises(errors.InputError, match="embed_dim=512 but the weights have 256"):
        mv.vae_config_from_state_dict(tiny_sd, {"ddconfig": {"embed_dim": 512}})
    # a config.json beside the weights that belongs to another model is not read
    assert mv.vae_config_from_state_dict(tiny_sd, {"_class_name": "T5", "num_heads": 3}).num_heads == 4
    with pytest.raises(errors.InputError, match="use_rope"):
        mv.vae_config_from_state_dict(tiny_sd, {"ddconfig": {"use_rope": True}})


def test_other_vaes_are_refused_with_what_they_look_like():
    wan = {"decoder.conv1.weight": torch.zeros(1), "encoder.conv1.weight": torch.zeros(1)}
    with pytest.raises(errors.InputError) as e:
        mv.vae_config_from_state_dict(wan)
    assert e.value.input_name == "vae_name"
    assert "no encoder.patch_embed.proj.weight" in str(e.value) and "decoder.conv1.weight" in str(e.value)
    assert "Wan" in str(e.value)


def test_strict_key_check_names_missing_unexpected_and_misshaped(tiny_sd):
    cfg = mv.tiny_vae_config()
    sd = dict(tiny_sd)
    del sd["decoder.blocks.1.mlp.fc2.bias"]
    sd["encoder.blocks.0.attn.q_norm.weight"] = torch.ones(64)
    sd["encoder.norm.bias"] = torch.zeros(7)
    with pytest.raises(errors.InputError) as e:
        mv.check_vae_keys(sd, cfg)
    msg = str(e.value)
    assert e.value.input_name == "vae_name"
    assert "1 missing: decoder.blocks.1.mlp.fc2.bias" in msg
    assert "1 unexpected: encoder.blocks.0.attn.q_norm.weight" in msg
    assert "1 mis-shaped: encoder.norm.bias (7,) (expected (256,))" in msg
    with pytest.raises(errors.InputError, match="fc2.bias"):
        mv.load_magi_vae(sd)
    mv.check_vae_keys(tiny_sd, cfg)                                            # the real layout passes


# ----------------------------------------------------------------------------- network and tiling

def test_round_trip_shapes_at_a_non_reference_grid(net):
    x = torch.rand(1, 3, 8, 40, 56, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z = net.encode(x)                                                      # grid (2, 5, 7), ref (4, 8, 8)
        y = net.decode(z)
        image = net.encode(x[:, :, :1])                                        # an image: 4 copies
    assert z.shape == (1, 16, 2, 5, 7) and y.shape == (1, 3, 8, 40, 56)
    assert image.shape == (1, 16, 1, 5, 7)
    assert torch.isfinite(z).all() and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="multiples of 4"):
        net.encode(x[:, :, :6])


def test_one_tile_equals_untiled(net):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 16, 3, 20, 24, generator=g)                             # <= one 24-latent stride
    x = torch.rand(1, 3, 12, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        assert mv.tile_count(z.shape, mv.DECODE_TILE, mv.DECODE_OVERLAP) == 1
        torch.testing.assert_close(net.decode_tiled(z), net.decode(z), rtol=0, atol=1e-6)
        assert mv.tile_count(x.shape, mv.ENCODE_TILE, mv.ENCODE_OVERLAP) == 1
        torch.testing.assert_close(net.encode_tiled(x), net.encode(x), rtol=0, atol=1e-6)


def test_tile_grid_is_upstreams():
    # ceil(size / stride) tiles per side, so a 32-latent side makes two (the second lies inside the first)
    assert mv.tile_count((1, 16, 3, 32, 32), mv.DECODE_TILE, mv.DECODE_OVERLAP) == 4
    assert mv.tile_count((1, 16, 6, 90, 160), mv.DECODE_TILE, mv.DECODE_OVERLAP) == 2 * 4 * 7
    assert mv.tile_count((1, 3, 24, 720, 1280), mv.ENCODE_TILE, mv.ENCODE_OVERLAP) == 2 * 4 * 7


@pytest.mark.parametrize("blended", [False, True])
def test_tiling_a_local_function_is_seamless(blended):
    """Blend weights sum to 1 and tiles land where they belong: tiling a function that only looks
    at its own pixels changes nothing."""
    g = torch.Generator().manual_seed(6)
    up = lambda a: a.repeat_interleave(4, 2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    z = torch.randn(1, 3, 7, 20, 26, generator=g)
    out = mv.tiled_apply(up, z, (3, 8, 8), (2, 2), lambda n, ax: n * (4 if ax == 0 else 8), blended)
    torch.testing.assert_close(out, up(z), rtol=0, atol=1e-6)
    pool = lambda a: F.avg_pool3d(a, (4, 8, 8))
    x = torch.randn(1, 3, 8, 80, 104, generator=g)
    out = mv.tiled_apply(pool, x, (4, 32, 32), (8, 8), lambda n, ax: n // (4 if ax == 0 else 8), blended)
    torch.testing.assert_close(out, pool(x), rtol=0, atol=1e-6)


def test_blend_is_a_linear_ramp_over_the_overlap():
    # 1-D: tiles of 8 every 4 over 14 columns; each tile outputs its first input value everywhere
    x = torch.arange(14.0).reshape(1, 1, 1, 1, 14)
    const = lambda a: torch.full_like(a, float(a[..., 0, 0, 0, 0, 0]))
    out = mv.tiled_apply(const, x, (1, 1, 8), (0, 4), lambda n, ax: n, blend_blended=False)
    # tile 1 (4) fades in over tile 0 (0): 0 1 2 3; tile 2 (8) over tile 1: 4 5 6 7;
    # the 2-wide last tile (12) over tile 2 with a 2-step ramp: 8, 8/2 + 12/2 = 10
    assert out.flatten().tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 10]


def test_encode_blends_against_blended_neighbours_decode_against_raw():
    # 2 x 2 tiles of 4 every 2 over 4 x 4; tile values: (0,0)=0, (0,1)=2, (1,0)=200, (1,1)=202
    x = (100 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None]).reshape(1, 1, 1, 4, 4)
    const = lambda a: torch.full_like(a, float(a[..., 0, 0, 0, 0, 0]))
    raw = mv.tiled_apply(const, x, (1, 4, 4), (2, 2), lambda n, ax: n, blend_blended=False)[0, 0, 0]
    inp = mv.tiled_apply(const, x, (1, 4, 4), (2, 2), lambda n, ax: n, blend_blended=True)[0, 0, 0]
    # pixel (2, 2), ramp weight 0: the left neighbour's value. Raw (1,0) is 200; blended (1,0)
    # took (0,0)'s value 0 in its first row.
    assert raw[2, 2] == 200 and inp[2, 2] == 0
    # pixel (3, 3), weights 1/2. Raw: up 2, left 200 -> (2 + 202)/2 = 102, (200 + 102)/2 = 151.
    # Blended: up (0,1) at its column 1 is 0/2 + 2/2 = 1, left (1,0) at row 1 is (0 + 200)/2 = 100
    # -> (1 + 202)/2 = 101.5, (100 + 101.5)/2 = 100.75
    assert raw[3, 3] == 151 and inp[3, 3] == 100.75


def test_tiled_decode_with_several_tiles(net):
    z = torch.randn(1, 16, 4, 14, 18, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out = net.decode_tiled(z, tile=(3, 8, 8), overlap=(2, 2))
        assert out.shape == (1, 3, 16, 112, 144) and torch.isfinite(out).all()
        # rows and columns before the first blend come from the first tile alone, per time slab
        first = net.decode(z[:, :, :3, :8, :8])[..., :48, :48]
        last = net.decode(z[:, :, 3:, :8, :8])[..., :48, :48]
    torch.testing.assert_close(out[:, :, :12, :48, :48], first, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 12:, :48, :48], last, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- ComfyUI VAE

def test_comfy_vae_attributes(vae):
    assert isinstance(vae, comfy.sd.VAE)
    assert vae.latent_channels == 16 and vae.latent_dim == 3
    assert vae.spacial_compression_decode() == 8 == vae.spacial_compression_encode()
    assert vae.temporal_compression_decode() == 4
    assert vae.upscale_ratio[0](6) == 24 and vae.downscale_ratio[0](5) == 2
    assert vae.vae_dtype == torch.float32                                     # CPU: fp32
    assert set(vae.get_sd()) == set(mv.expected_vae_keys(mv.tiny_vae_config()))


def test_encode_one_image_is_magis_four_copies(vae, net):
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(8))
    lat = vae.encode(image)
    assert lat.shape == (1, 16, 1, 6, 8)
    x = (image * 2 - 1).movedim(-1, 0).unsqueeze(0).repeat(1, 1, 4, 1, 1)     # [1, 3, 4, H, W]
    with torch.no_grad():
        torch.testing.assert_close(lat, net.encode(x), rtol=0, atol=1e-5)


def test_encode_pads_frames_with_the_last_and_crops_to_patches(vae, net):
    frames = torch.rand(5, 50, 66, 3, generator=torch.Generator().manual_seed(9))
    lat = vae.encode(frames)
    assert lat.shape == (1, 16, 2, 6, 8)                                       # ceil(5/4), 48/8, 64/8
    cropped = frames[:, 1:49, 1:65]
    padded = torch.cat([cropped, cropped[-1:].repeat(3, 1, 1, 1)])
    with torch.no_grad():
        want = net.encode((padded * 2 - 1).movedim(-1, 0).unsqueeze(0))
    torch.testing.assert_close(lat, want, rtol=0, atol=1e-5)


def test_decode_returns_5d_frames_in_unit_range(vae, net):
    z = torch.randn(1, 16, 2, 6, 8, generator=torch.Generator().manual_seed(10)) * 3
    images = vae.decode(z)
    assert images.shape == (1, 8, 48, 64, 3)
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        want = ((net.decode(z) + 1) / 2).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(images, want, rtol=0, atol=1e-6)
    folded = images.reshape(-1, *images.shape[-3:])                            # what VAEDecode does
    assert folded.shape == (8, 48, 64, 3)
    # VAEDecodeTiled's call: tiles of 4 latents, overlap 1, 2 latent frames
    tiled = vae.decode_tiled(z, tile_x=4, tile_y=4, overlap=1, tile_t=2, overlap_t=1)
    assert tiled.shape == (1, 8, 48, 64, 3) and tiled.min() >= 0 and tiled.max() <= 1
    enc = vae.encode_tiled(images[0], tile_x=32, tile_y=32, overlap=8, tile_t=4)
    assert enc.shape == (1, 16, 2, 6, 8)


@pytest.mark.parametrize("pieces", [[6, 6, 6, 6], [4, 4, 4, 4, 4, 4], [1, 5, 7, 11]])
def test_stream_decoder_equals_the_whole_decode(vae, pieces):
    """MAGI-1's stream decoder (whole temporal tiles from the video's first frame, a remainder held
    back) gives VAEDecode's frames bit for bit, however the latents arrive."""
    vae_stream = pack("model_patches.vae_stream")
    z = torch.randn(1, 16, sum(pieces), 6, 8, generator=torch.Generator().manual_seed(3))
    whole = vae.decode(z)
    whole = whole.reshape(-1, *whole.shape[-3:]).float()
    dec = vae_stream.SlabStreamDecoder(vae, mv.DECODE_TILE[0])
    out, at = [], 0
    for n in pieces:
        out.append(dec.push(z[:, :, at:at + n]))
        at += n
    out.append(dec.flush())
    assert torch.equal(torch.cat([o for o in out if o.shape[0]]), whole)      # held-back pieces give no frames
