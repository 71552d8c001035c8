"""Drift measures on synthetic videos with known drift, and the anchor's arithmetic (cache_core/drift.py)."""
import pytest
import torch
import torch.nn.functional as F

from cache_core.drift import DriftMeter, anchor_latent, histogram_distance, latent_stats, segment_stats


def video(segments, frames=4, size=16, fn=None):
    """`segments` segments of `frames` frames [N, 3, H, W]; fn(segment, frame) -> a frame."""
    return [torch.stack([fn(s, f) for f in range(frames)]) for s in range(segments)]


def meter(segs):
    m = DriftMeter()
    for s in segs:
        m.add(s)
    return m.summary()


def test_a_steady_video_has_no_drift_and_seams_like_any_frame_step():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(3, 16, 16, generator=g) * 0.5 + 0.25
    # a small steady motion: every frame step (seams included) shifts by one pixel
    segs = video(5, fn=lambda s, f: torch.roll(base, shifts=4 * s + f, dims=2))
    out = meter(segs)
    assert all(abs(v) < 1e-6 for k, v in out["drift"].items() if k not in ("histogram_distance", "sharpness", "flicker"))
    assert out["drift"]["histogram_distance"] == pytest.approx(0.0, abs=1e-6)   # rolling keeps the colours
    assert out["seam_ratio"] == pytest.approx(1.0, rel=0.05)


def test_a_colour_ramp_shows_in_colour_brightness_and_histogram():
    # the red channel climbs by 0.1 per segment: drift = 0.4 in red after 5 segments
    segs = video(5, fn=lambda s, f: torch.stack([torch.full((16, 16), 0.3 + 0.1 * s), torch.full((16, 16), 0.3),
                                                  torch.full((16, 16), 0.3)]))
    out = meter(segs)
    assert out["drift"]["red"] == pytest.approx(0.4, abs=1e-5)
    assert out["drift"]["green"] == pytest.approx(0.0, abs=1e-6)
    assert out["drift"]["brightness"] == pytest.approx(0.299 * 0.4, abs=1e-5)   # Rec. 601 luma
    assert out["drift"]["saturation"] > 0.3                                     # (0.7 - 0.3) / 0.7 at the end
    assert out["drift"]["histogram_distance"] == pytest.approx(1 / 3, abs=1e-6)  # red's mass moved wholly, 1 of 3
    assert [round(s["histogram_distance"], 4) for s in out["segments"]][:2] == [0.0, round(1 / 3, 4)]


def test_growing_blur_lowers_sharpness():
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(3, 16, 16)

    def frame(s, f):
        x = checker[None]
        for _ in range(s):                              # one more 3x3 box blur per segment
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return x[0]
    out = meter(video(4, fn=frame))
    sharp = [s["sharpness"] for s in out["segments"]]
    assert sharp == sorted(sharp, reverse=True) and sharp[-1] < 0.05 * sharp[0]
    assert out["drift"]["sharpness"] < 0
    assert out["drift"]["contrast"] < 0                 # blur also flattens the spread


def test_a_jump_at_every_seam_is_found():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(3, 16, 16, generator=g) * 0.3
    # inside a segment the frames brighten by 0.01 per frame; each segment starts 0.1 brighter
    segs = video(4, fn=lambda s, f: base + 0.1 * s + 0.01 * f)
    out = meter(segs)
    assert out["seam_ratio"] == pytest.approx((0.1 - 0.03) / 0.01, rel=1e-3)


def test_one_segment_has_zero_drift_and_no_seam():
    out = meter([torch.rand(3, 3, 8, 8)])
    assert out["drift"]["red"] == 0 and out["seam_ratio"] is None and len(out["segments"]) == 1
    assert DriftMeter().summary() is None


def test_histogram_distance_is_total_variation():
    a = segment_stats(torch.zeros(1, 3, 4, 4))["histogram"]
    b = segment_stats(torch.ones(1, 3, 4, 4))["histogram"]
    assert histogram_distance(a, a) == 0 and histogram_distance(a, b) == pytest.approx(1.0)


def test_the_anchor_moves_the_statistics_by_its_strength():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 3, 5, 5, generator=g) * 2 + 1
    target = (torch.tensor([0.0, 1.0, -1.0, 3.0]), torch.tensor([1.0, 0.5, 2.0, 1.0]))
    assert anchor_latent(x, target, 0.0) is x                    # strength 0: the very same tensor
    full = latent_stats(anchor_latent(x, target, 1.0))
    torch.testing.assert_close(full[0], target[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(full[1], target[1], atol=1e-5, rtol=1e-5)
    mean0 = latent_stats(x)[0]
    half = latent_stats(anchor_latent(x, target, 0.5))[0]
    torch.testing.assert_close(half, (mean0 + target[0]) / 2, atol=1e-5, rtol=0)   # the mean moves linearly
