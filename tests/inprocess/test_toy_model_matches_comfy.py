"""The torch-only toy model (toy_world/model.py) must compute exactly what ComfyUI's own Wan 2.1
model computes with the same weights, and a saved checkpoint must load through UNETLoader's
path as WAN21_T2V with no missing or unexpected keys.  This is what makes the weights trained
without ComfyUI mean the same thing inside it.  Runs ComfyUI in-process (CPU)."""
import json
import logging

import pytest
import torch

import comfy.model_management  # noqa: F401
import comfy.latent_formats
import comfy.model_detection
import comfy.sd
import comfy.utils

from toy_world import scenes
from toy_world.model import ToyWan, ToyWanConfig, comfy_wan_model, save_safetensors


def _random_toy(cfg, seed=0):
    """Every parameter non-trivial (norm weights and biases too), so no term can hide."""
    torch.manual_seed(seed)
    m = ToyWan(cfg)
    m.reset_parameters(zero_head=False)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def pair():
    cfg = ToyWanConfig(dim=256, ffn_dim=512, num_layers=2)
    toy = _random_toy(cfg)
    ref = comfy_wan_model(cfg, toy.state_dict()).eval()
    return toy, ref


def _close(a, b, tol=1e-4):
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < tol, err


@pytest.mark.parametrize("per_frame", [False, True])
def test_zero_context_matches_comfy(pair, per_frame):
    toy, ref = pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 5, 8, 12, generator=g)
    t = torch.rand(2, 5, generator=g) * 1000 if per_frame else torch.tensor([250.0, 875.0])
    with torch.no_grad():
        ours = toy(x, t)  # closed-form zero context
        theirs = ref(x, t, torch.zeros(2, 512, 4096))  # what ComfyUI's zero conditioning feeds
    _close(ours, theirs)


@pytest.mark.parametrize("per_frame", [False, True])
def test_real_context_matches_comfy(pair, per_frame):
    toy, ref = pair
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 4, 16, 16, generator=g)
    t = torch.rand(1, 4, generator=g) * 1000 if per_frame else torch.tensor([600.0])
    ctx = torch.randn(1, 9, 4096, generator=g) * 0.5
    with torch.no_grad():
        _close(toy(x, t, ctx), ref(x, t, ctx))


def test_block_causal_training_mode_matches_comfys_masked_forward(pair):
    """The mode toy world v2 is also trained in (frame blocks attend to themselves and earlier
    blocks) is ComfyUI's WanModel with block-causal self-attention: the forward the caches'
    chunk-causal execution equals (tests/host/test_wan_chunked.py)."""
    toy, ref = pair
    g = torch.Generator().manual_seed(3)
    frames, h, w, block = 5, 8, 12, 2
    x = torch.randn(2, 16, frames, h, w, generator=g)
    t = torch.rand(2, frames, generator=g) * 1000
    tokens = frames * (h // 2) * (w // 2)
    block_of = (torch.arange(frames) // block).repeat_interleave((h // 2) * (w // 2))
    mask = torch.zeros(tokens, tokens).masked_fill(block_of[None, :] > block_of[:, None], float("-inf"))

    def override(func, q, k, v, *args, **kwargs):
        if q.shape[1] == tokens and k.shape[1] == tokens:          # self-attention only
            kwargs["mask"] = mask.to(q)
        return func(q, k, v, *args, **kwargs)

    with torch.no_grad():
        ours = toy(x, t, frame_blocks=(torch.arange(frames) // block).expand(2, -1))
        theirs = ref(x, t, torch.zeros(2, 512, 4096), transformer_options={"optimized_attention_override": override})
        bidirectional = toy(x, t)
    _close(ours, theirs)
    assert (ours - bidirectional).abs().max() > 1e-3                 # the mask matters


def test_toy_scenes_render_in_comfys_preview_colours():
    """A toy clip's latents, decoded by ComfyUI's own live previewer, show the rendered scene."""
    import latent_preview
    z, rgb, _ = scenes.make_latents(1, 3, torch.Generator().manual_seed(4), return_info=True)   # processed space
    f = comfy.latent_formats.Wan21
    previewer = latent_preview.Latent2RGBPreviewer(f.latent_rgb_factors, f.latent_rgb_factors_bias)
    shown = torch.from_numpy(__import__("numpy").array(previewer.decode_latent_to_preview_image("PNG", z)[1]))
    expected = ((rgb[0, 0] + 1) / 2 * 255).clamp(0, 255)          # frame 0, what the previewer shows
    assert shown.shape[:2] == expected.shape[:2]
    assert (shown.float() - expected).abs().max() <= 2.0


def test_checkpoint_loads_as_wan21_t2v(tmp_path, caplog):
    cfg = ToyWanConfig(dim=256, ffn_dim=1024, num_layers=2)
    toy = _random_toy(cfg, seed=3)
    path = str(tmp_path / "toy_world_df.safetensors")
    save_safetensors({k: v.half() for k, v in toy.state_dict().items()}, path,
                     {"toy_world": json.dumps({"model": "test"})})
    sd = comfy.utils.load_torch_file(path)
    unet = comfy.model_detection.detect_unet_config(sd, "")
    assert unet["image_model"] == "wan2.1" and unet["model_type"] == "t2v"
    assert (unet["dim"], unet["num_heads"], unet["ffn_dim"], unet["num_layers"]) == (256, 2, 1024, 2)
    assert type(comfy.model_detection.model_config_from_unet(sd, "")).__name__ == "WAN21_T2V"
    with caplog.at_level(logging.INFO):
        patcher = comfy.sd.load_diffusion_model(path)  # what UNETLoader calls
    bad = [r.getMessage() for r in caplog.records if any(w in r.getMessage() for w in ("missing", "unexpected", "left over"))]
    assert not bad, bad
    bm = patcher.model
    assert type(bm).__name__ == "WAN21" and bm.model_sampling.shift == 8.0
    # ComfyUI's denoised (CONST: x - sigma * v) equals ours, in the processed space the model sees
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 16, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.7])
    toy16 = ToyWan(cfg)
    toy16.load_state_dict({k: v.float() for k, v in sd.items()})
    with torch.no_grad():
        den = bm.apply_model(x, sigma, c_crossattn=torch.zeros(1, 512, 4096)).float()
        ours = x - 0.7 * toy16.eval()(x, torch.tensor([700.0]))
    _close(ours, den, tol=5e-3 if bm.get_dtype() != torch.float32 else 1e-4)
