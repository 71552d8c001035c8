"""Toy world: deterministic scenes, real motion over static backgrounds, a model whose weights
round-trip in the Wan key layout, a working DF sampler, and a short CPU training run that learns."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from toy_world import scenes  # noqa: E402
from toy_world.model import ToyWan, ToyWanConfig, load_safetensors, load_toy_wan, save_safetensors  # noqa: E402


def _render(seed, B=24, T=10):
    return scenes.render(B, T, torch.Generator().manual_seed(seed))


def test_scenes_are_deterministic_per_seed():
    a = scenes.make_latents(6, 8, torch.Generator().manual_seed(5))
    b = scenes.make_latents(6, 8, torch.Generator().manual_seed(5))
    c = scenes.make_latents(6, 8, torch.Generator().manual_seed(6))
    assert a.shape == (6, 16, 8, 16, 16)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_sprites_move_and_backgrounds_stay_static():
    rgb, info = _render(11)
    B, T = rgb.shape[:2]
    cover = info["cover"]  # [B, T, H, W]
    # pixels no sprite ever touches are exactly the background, in every frame
    never = (cover == 0).all(1)  # [B, H, W]
    bg = info["background"][:, None].expand_as(rgb)
    assert never.float().mean() > 0.3
    assert torch.equal(rgb.masked_select(never[:, None, ..., None].expand_as(rgb)),
                       bg.masked_select(never[:, None, ..., None].expand_as(rgb)))
    # still clips are exactly still; moving sprites travel about speed * (T - 1)
    still = info["still"]
    assert still.any() and (~still).any()
    diff = (rgb[:, 1:] - rgb[:, :-1]).abs().amax((1, 2, 3, 4))
    assert (diff[still] == 0).all()
    assert (diff[~still] > 0.1).all()
    centers, speed = info["centers"], info["speed"]  # [B, K, T, 2], [B, K]
    step = (centers[:, :, 1:] - centers[:, :, :-1]).norm(dim=-1)  # [B, K, T-1]
    moving = speed > 0
    assert moving.sum() > 10
    assert (step[info["active"] & ~moving] == 0).all() and (info["active"] & ~moving).any()
    sp = speed[..., None].expand_as(step)[moving]
    st = step[moving]  # a bounce between two frames shortens that one displacement
    assert (st <= sp + 1e-4).all()
    assert ((st - sp).abs() < 1e-4).float().mean() > 0.75
    assert len(set(speed[moving].tolist())) == int(moving.sum())  # different speeds


def test_latent_space_matches_preview_and_is_unit_scale():
    z, rgb, _ = scenes.make_latents(32, 8, torch.Generator().manual_seed(2), return_info=True)
    m = scenes.latent_map()
    assert (m.project(z.movedim(1, -1)) - rgb).abs().max() < 1e-4  # ComfyUI's preview shows the scene
    var = z.var((0, 2, 3, 4))
    assert 0.7 < var.mean() < 1.3 and var.min() > 0.05
    # static pixels stay static in latent space too (what motion-aware caches look for)
    d = (z[:, :, 1:] - z[:, :, :-1]).abs().amax(1)
    assert (d == 0).float().mean() > 0.6


def test_model_io_and_per_frame_timesteps(tmp_path):
    torch.manual_seed(0)
    m = ToyWan(ToyWanConfig(dim=128, ffn_dim=256, num_layers=2))
    m.reset_parameters(zero_head=False)
    sd = m.state_dict()
    for k in ("patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
              "time_projection.1.weight", "blocks.1.self_attn.norm_q.weight", "blocks.0.cross_attn.o.bias",
              "blocks.0.norm3.weight", "blocks.1.ffn.2.weight", "blocks.0.modulation", "head.head.weight",
              "head.modulation"):
        assert k in sd, k
    assert sd["text_embedding.0.weight"].shape == (128, 4096)
    assert sd["patch_embedding.weight"].shape == (128, 16, 1, 2, 2)
    path = str(tmp_path / "m.safetensors")
    save_safetensors({k: v.half() for k, v in sd.items()}, path, {"note": "x"})
    sd2, meta = load_safetensors(path)
    assert meta == {"note": "x"} and set(sd2) == set(sd)
    m2, _ = load_toy_wan(path)
    assert m2.cfg == m.cfg
    x = torch.randn(2, 16, 3, 8, 8)
    with torch.no_grad():
        a = m(x, torch.tensor([400.0, 900.0]))
        b = m(x, torch.tensor([[400.0] * 3, [900.0] * 3]))
        c = m(x, torch.tensor([[400.0, 0.0, 1000.0], [900.0] * 3]))
        zero = m(x, torch.tensor([400.0, 900.0]), torch.zeros(2, 5, 4096))
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a, zero, atol=1e-5)  # closed-form zero context == attention over zeros
    assert not torch.allclose(a[0, :, 1], c[0, :, 1], atol=1e-3)


def test_df_sampler_smoke():
    from toy_world import sample_check as sc
    torch.manual_seed(0)
    m = ToyWan(ToyWanConfig(dim=128, ffn_dim=128, num_layers=1)).eval()
    m.reset_parameters(zero_head=False)
    g = torch.Generator().manual_seed(0)
    calls = []
    new, rows = sc.sample_async(m, torch.randn(1, 16, 5, 8, 8, generator=g), history=torch.zeros(1, 16, 2, 8, 8),
                                block=2, ar_step=2, steps=4, callback=lambda r, x, v, s: calls.append(s.clone()))
    assert new.shape == (1, 16, 5, 8, 8) and rows == 4 + 2 * 2 == len(calls)
    assert torch.all(calls[0][0, :2] == 0) and torch.all(calls[0][0, 2:] == 1)  # history clean, rest noise
    last = calls[-1][0, 2:]
    assert torch.all(last[:4] == 0) and 0 < last[4] < 1  # early blocks finished, last block still running
    video, spans = sc.long_video(m, 1, frames=5, hist=2, windows=3, gen=g, size=(8, 8), block=2, ar_step=1, steps=2)
    assert video.shape[2] == 5 + 2 * 3 and spans == [(0, 5), (3, 8), (6, 11)]


def test_short_cpu_training_decreases_loss(tmp_path):
    from toy_world import train
    out = str(tmp_path / "toy.safetensors")
    info = train.main(["--out", out, "--minutes", str(10 / 60), "--device", "cpu", "--seed", "0", "--dim", "128",
                       "--ffn", "256", "--layers", "1", "--batch", "4", "--frames", "6", "--lr", "2e-3",
                       "--warmup", "5", "--log-every", "5", "--val-every", "0", "--threads", "1", "--quiet"])
    assert info["wall_s"] < 10.5
    curve = [c[1] for c in info["loss_curve"]]
    assert len(curve) >= 2 and min(curve[1:]) < curve[0], curve
    # the held-out loss falls well below the untrained model's (zero head: v = 0)
    val = train.make_validation(12, torch.device("cpu"), scenes.SceneConfig(), n=2)
    untrained = train.validate(ToyWan(ToyWanConfig(dim=128, ffn_dim=256, num_layers=1)), val, None)["mean"]
    trained, _ = load_toy_wan(out)
    assert train.validate(trained, val, None)["mean"] < 0.85 * untrained
    assert os.path.getsize(out) == info["file_bytes"]
    meta = json.load(open(out[:-len(".safetensors")] + ".json"))
    assert meta["command"].startswith("python -m toy_world.train --out") and "--steps" in meta["reproduce"]
    sd, _ = load_safetensors(out)
    assert all(v.dtype == torch.float16 for v in sd.values())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
