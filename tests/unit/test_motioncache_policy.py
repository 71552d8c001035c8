"""MotionCache's decisions and motion weights against hand-made traces (specs/motioncache.md 2-4)."""
import pytest
import torch

from cache_core.chunk_step import COMPUTE, SKIP, ChunkView
from cache_core.motioncache_policy import (MotionCacheConfig, MotionCachePolicy, frame_weights, hidden_motion,
                                           latent_motion)

F, HW, C = 3, 16, 4          # a chunk of 3 frames of 4x4 tokens


def moving_blob(step=0):
    """Hidden states [1, F*HW, C]: a static textured background, a bright blob one token to the
    right each frame (tokens 5, 6, 7 of frames 0, 1, 2)."""
    g = torch.Generator().manual_seed(0)
    bg = 1.0 + 0.1 * torch.rand(HW, C, generator=g)
    h = bg.repeat(F, 1, 1)
    for f in range(F):
        h[f, 5 + f] += 4.0
    return (h + 0.001 * step).reshape(1, F * HW, C)


def view(step, frames=(0, F)):
    return ChunkView(frames=frames, tokens=(frames[1] - frames[0]) * HW, local_step=step)


def ind(v):
    return torch.full((6, 8), float(v))


def test_hidden_motion_is_high_where_the_blob_moves():
    d, last = hidden_motion(moving_blob(), F, None, first_chunk=True)
    w = frame_weights(d, 0.6)
    assert d.shape == (F, HW) and torch.equal(last, moving_blob().reshape(1, F, HW, C)[:, -1])
    # frame f differs from f-1 where the blob came (relative change 4/1.05) and where it left (4/5)
    arrived, left = {(1, 6), (2, 7)}, {(1, 5), (2, 6)}
    for f in (1, 2):
        for p in range(HW):
            w_fp = float(w[f, p])
            assert w_fp > 0.99 if (f, p) in arrived else w_fp > 0.65 if (f, p) in left else w_fp < 0.61
    assert torch.equal(d[0], d[1])                 # the first chunk copies frame 1 into frame 0
    assert float(w.min()) >= 0.6 and float(w.max()) <= 1.0 + 1e-6


def test_frame_zero_compares_with_the_previous_chunk_and_latents_are_absolute():
    h = moving_blob()
    prev_last = h.reshape(1, F, HW, C)[:, 0] * 0 + 1.05    # a flat previous frame
    d, _ = hidden_motion(h, F, prev_last, first_chunk=False)
    assert d[0, 5] > 1.0 and d[0, 0] < 0.1                    # the blob appears against it
    lat = torch.zeros(1, F * HW, 2)
    lat[0, HW + 3] = 2.0                                       # frame 1, token 3
    dl = latent_motion(lat, F, None)
    assert dl[1, 3] == 2.0 and dl[2, 3] == 2.0 and dl[1, 0] == 0.0          # mean |x_f - x_f-1|, no division
    wl = frame_weights(dl, 0.6, flat_is_one=True)
    assert torch.all(wl[0] == 1.0) and wl[1, 3] == 1.0 and wl[1, 0] == pytest.approx(0.6)   # flat frame 0: 1


def run_policy(cfg, steps, rho=0.12, h=moving_blob):
    """Drive one chunk as the executor does: a 'step' of indicator growth rho per call."""
    p = MotionCachePolicy(cfg)
    decisions, counts = [], torch.zeros(F * HW)
    for k in range(steps):
        p.see(0, 0, view(k))
        d = p.decide(0, 0, ind((1 + rho) ** k), k, steps)
        decisions.append(d.kind)
        h_in = torch.zeros(1, F * HW, C)
        if d is SKIP:                           # the step re-adds the residual it keeps
            p.reused(0, 0, h_in + res)
        else:
            res = h(k) if d.tokens is None else res.index_copy(1, d.tokens, h(k)[:, d.tokens])
            p.observe(0, 0, h_in, h(k), d.tokens)
            counts[d.tokens if d.tokens is not None else slice(None)] += 1
    return p, decisions, counts


def test_warmup_then_chunk_wise_then_token_wise():
    cfg = MotionCacheConfig(threshold=0.2, warmup_steps=2, phase1_updates=1, vote=0.0, min_update_ratio=0.0)
    p, decisions, counts = run_policy(cfg, 24)
    # k0..2 warm-up (k2 resets the sums); phase 1: d = .12 per step -> k3 .12 skip, k4 .24 compute
    assert decisions[:5] == ["compute", "compute", "compute", "skip", "compute"]
    assert p.state(0, 0).phase1_done and p.state(0, 0).weights is not None
    assert "subset" in decisions[5:]                   # token-wise from then on
    arrived = [HW + 6, 2 * HW + 7]                 # where the blob moved to: weight 1
    static = [i for i in range(F * HW) if i % HW not in (5, 6, 7)]   # weight 0.6
    assert counts[arrived].min() > counts[static].max()     # moving tokens recomputed more often


def test_min_update_ratio_reuses_the_chunk_and_keeps_the_sums():
    cfg = MotionCacheConfig(threshold=0.2, warmup_steps=0, phase1_updates=0, vote=0.0, min_update_ratio=0.9)
    p, decisions, _ = run_policy(cfg, 6)
    assert "subset" not in decisions                  # never fewer than 90% updated: all or nothing
    cfg = MotionCacheConfig(threshold=0.2, warmup_steps=0, phase1_updates=0, vote=0.0, min_update_ratio=0.0)
    _, decisions, _ = run_policy(cfg, 6)
    assert "subset" in decisions


def test_column_voting_updates_whole_columns():
    cfg = MotionCacheConfig(threshold=0.2, warmup_steps=0, phase1_updates=0, vote=0.5, min_update_ratio=0.0)
    p, _, counts = run_policy(cfg, 10)
    per_frame = counts.view(F, HW)
    assert torch.all(per_frame == per_frame[:1])       # every frame of a position alike


def test_threshold_zero_computes_everything_and_reset_clears():
    p, decisions, counts = run_policy(MotionCacheConfig(threshold=0.0), 8)
    assert set(decisions) == {"compute"} and torch.all(counts == 8)
    p.reset()
    assert p.states == {} and p.last_frames == {}


def test_config_is_validated():
    for bad in (dict(threshold=-1.0), dict(weight_floor=1.5), dict(motion_source="pixels"), dict(vote=1.0)):
        with pytest.raises(ValueError):
            MotionCacheConfig(**bad)
    assert COMPUTE.kind == "compute"


def test_a_finished_chunk_is_forgotten_but_its_last_frame_serves_the_next():
    p = MotionCachePolicy(MotionCacheConfig(threshold=0.1, warmup_steps=0, phase1_updates=0, coefficients="none"))
    for chunk in (0, 1):
        p.see(0, chunk, view(0))
        p.decide(0, chunk, ind(1.0), 0, 10)
        p.observe(0, chunk, moving_blob(), moving_blob())
        p.last_frames[(0, chunk)] = moving_blob()[:, -HW:]      # as hidden motion leaves it
    p.forget(0, 1)
    assert (0, 1) not in p.states and (0, 1) not in p.views
    assert (0, 1) in p.last_frames and (0, 0) not in p.last_frames   # chunk 2 still needs chunk 1's last frame


def test_predicted_tokens_are_those_left_out_above_reuse_thresh():
    """Three-way per token: updated tokens run, the others predict from reuse_thresh on, else reuse."""
    cfg = MotionCacheConfig(threshold=0.3, warmup_steps=0, phase1_updates=0, vote=0.0, min_update_ratio=0.0,
                            predict_order=1, reuse_thresh=0.1)
    p = MotionCachePolicy(cfg)
    acc = torch.linspace(0.0, 0.5, F * HW)
    mask = p._predicted(acc.clone(), acc >= 0.3)
    assert torch.equal(mask, (acc >= 0.1) & (acc < 0.3))
    assert p._predicted(acc.clone()) is not True and torch.equal(p._predicted(acc.clone()), acc >= 0.1)
    assert p._predicted(torch.full((F * HW,), 0.2)) is True
    assert p._predicted(torch.full((F * HW,), 0.05)) is None
    assert MotionCachePolicy(MotionCacheConfig(threshold=0.3))._predicted(acc) is None   # order 0: never
