"""The bench's and demo's fidelity measures on known images: identical is best, noise is worse,
more noise is worse still, and the temporal measure tells frozen from flickering video."""
import math

import pytest
import torch

from toy_world import scenes
from tools import metrics


def _video(seed=0, T=6):
    rgb, _ = scenes.render(1, T, torch.Generator().manual_seed(seed))           # [1, T, 16, 16, 3] in -1..1
    frames = ((rgb[0] + 1) / 2).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(frames, scale_factor=8, mode="nearest")


def _noisy(v, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (v + std * torch.randn(v.shape, generator=g)).clamp(0, 1)


def test_identical_videos_score_best():
    v = _video()
    m = metrics.fidelity(v, v)
    assert m["psnr_db"] == metrics.PSNR_CAP_DB
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert m["st_lpips"] == pytest.approx(0.0, abs=1e-7)
    assert m["flicker_ratio"] == pytest.approx(1.0)


def test_psnr_matches_its_closed_form():
    v = _video() * 0.5                                # room for an offset without clipping
    assert metrics.psnr(v + 0.1, v) == pytest.approx(20.0, abs=1e-6)        # -10 log10(0.01)
    assert metrics.psnr(v + 0.01, v) == pytest.approx(40.0, abs=1e-6)


def test_more_noise_scores_worse_on_every_measure():
    v = _video()
    light, heavy = metrics.fidelity(_noisy(v, 0.03), v), metrics.fidelity(_noisy(v, 0.15), v)
    assert 15 < heavy["psnr_db"] < light["psnr_db"] < 35
    assert heavy["ssim"] < light["ssim"] < 1.0
    assert 0.0 < light["st_lpips"] < heavy["st_lpips"]
    assert heavy["flicker_ratio"] > light["flicker_ratio"] > 1.0             # per-frame noise flickers


def test_perceptual_distance_ranks_a_different_scene_above_a_small_error():
    v, other = _video(0), _video(7)
    assert metrics.st_lpips(_noisy(v, 0.03), v) < 0.5 * metrics.st_lpips(other, v)


def test_flicker_ratio_tells_frozen_from_moving_video():
    v = _video()
    frozen = v[:1].expand_as(v).clone()
    assert metrics.flicker(frozen) == 0.0
    assert metrics.fidelity(frozen, v)["flicker_ratio"] == 0.0
    assert metrics.flicker(v) > 0.0


def test_shape_mismatch_is_refused():
    v = _video()
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.fidelity(v[:-1], v)


def test_ssim_of_a_constant_shift_is_below_one_and_finite():
    v = _video() * 0.5
    s = metrics.ssim(v + 0.2, v)
    assert math.isfinite(s) and 0.0 < s < 0.999
