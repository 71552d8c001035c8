"""Diffusion-forcing schedule: frame arithmetic, template, windows, step matrix (spec 1.1-1.5)."""
import numpy as np
import pytest
import torch

from cache_core.df_schedule import (
    SIGMA_WAIT, StepMatrix, WindowPlan, flow_template, latent_frames, pixel_frames,
    plan_windows, step_matrix, template_timesteps, window_rows,
)


# ---------------------------------------------------------------------------------------------
# An independent port of upstream's generate_timestep_matrix, written from the spec (1.3) as a
# plain row-by-row recursion in numpy. The prefix is counted as ready blocks, as upstream does.
# ---------------------------------------------------------------------------------------------

def upstream_matrix(num_frames, timesteps, ar_step, num_pre_ready, cbs):
    n = len(timesteps)
    table = np.concatenate([[999], np.asarray(timesteps, dtype=np.int64), [0]])
    nb = num_frames // cbs
    prev = np.zeros(nb, dtype=np.int64)
    prev[: num_pre_ready // cbs] = n + 1
    ts_rows, upd_rows, ctr_rows = [], [], []
    while not np.all(prev >= n):
        new = np.zeros(nb, dtype=np.int64)
        for b in range(nb):
            if b == 0 or prev[b - 1] >= n:
                new[b] = prev[b] + 1
            else:
                new[b] = new[b - 1] - ar_step
        new = np.clip(new, 0, n + 1)
        upd_rows.append((new != prev) & (new != n + 1))
        ctr_rows.append(new)
        ts_rows.append(table[new])
        prev = new
    rep = lambda a: np.repeat(np.stack(a), cbs, axis=1)  # noqa: E731
    return rep(ts_rows), rep(upd_rows), rep(ctr_rows)


T30 = template_timesteps(flow_template(30, 8.0))[:-1].numpy()


# -- frames and template ----------------------------------------------------------------------

@pytest.mark.parametrize("pix,lat", [(97, 25), (121, 31), (17, 5), (37, 10), (1, 1), (257, 65)])
def test_latent_frame_arithmetic(pix, lat):
    assert latent_frames(pix) == lat
    assert pixel_frames(lat) == pix


def test_flow_template_matches_spec_values():
    t = flow_template(30, 8.0)
    assert t.dtype == torch.float64 and t.shape == (31,)
    assert t[-1] == 0.0 and bool((t[1:] < t[:-1]).all())
    ts = template_timesteps(t)[:-1].tolist()
    assert ts[:5] == [999, 995, 991, 986, 980]
    assert ts[-6:] == [666, 615, 551, 470, 363, 216]
    # formula check: shift(linspace(0.999, 0, N+1)[:-1]) within float32 rounding of 0.999
    base = np.linspace(0.999, 0, 31)[:-1]
    np.testing.assert_allclose(t[:-1].numpy(), 8 * base / (1 + 7 * base), rtol=0, atol=1e-7)


def test_flow_template_shift1_keeps_upstream_integer_timesteps():
    # upstream's sigma_max is float32(0.999): 1000*sigma for k=10 of 30 is 666, not 665
    ts = template_timesteps(flow_template(30, 1.0))
    assert ts[10] == 666 and ts[20] == 333


# -- step matrix: the spec's worked examples ---------------------------------------------------

def test_sync_has_n_rows_all_frames_together():
    m = step_matrix(25, 30, ar_step=0, causal_block_size=1)
    assert m.rows == 30 and m.frames == 25
    assert bool(m.update.all())
    assert (m.counters == torch.arange(1, 31)[:, None]).all()


def test_async_rows_no_prefix():
    assert step_matrix(25, 30, ar_step=5, causal_block_size=5).rows == 50
    assert step_matrix(25, 30, ar_step=5, causal_block_size=1).rows == 150
    assert window_rows(25, 30, 5, 5) == 50 and window_rows(25, 30, 5, 1) == 150


def test_worked_example_rows_with_prefix():
    m = step_matrix(20, 30, ar_step=5, causal_block_size=5, prefix_frames=5)
    assert m.rows == 45 and m.frames == 25
    ts = m.timesteps(flow_template(30, 8.0))[:, ::5]  # one value per block
    assert ts[0].tolist() == [0, 999, 999, 999, 999]
    assert ts[5].tolist() == [0, 975, 999, 999, 999]
    assert ts[29].tolist() == [0, 216, 666, 822, 901]
    assert ts[30].tolist() == [0, 0, 615, 799, 888]
    assert ts[44].tolist() == [0, 0, 0, 0, 216]
    upd = m.update[:, ::5]
    assert upd[0].tolist() == [False, True, False, False, False]  # only block 1 steps
    assert upd[5].tolist() == [False, True, True, False, False]   # block 2 starts
    assert upd[44].tolist() == [False, False, False, False, True]
    assert not bool(m.update[:, :5].any())                         # prefix never steps


def test_async_start_offsets_and_each_frame_walks_every_step_once():
    steps, ar, cbs = 30, 5, 5
    m = step_matrix(25, steps, ar_step=ar, causal_block_size=cbs)
    for f in range(25):
        rows = torch.nonzero(m.update[:, f]).flatten()
        b = f // cbs
        assert rows[0].item() == b * ar                          # block b starts ar*b rows later
        assert rows.tolist() == list(range(b * ar, b * ar + steps))  # then steps every row
        assert m.step_index[rows, f].tolist() == list(range(steps))


def test_ar_step_longer_than_steps_runs_blocks_one_after_another():
    m = step_matrix(3, 4, ar_step=9, causal_block_size=1)
    assert m.rows == 12
    starts = [torch.nonzero(m.update[:, f]).flatten()[0].item() for f in range(3)]
    assert starts == [0, 4, 8]


def test_sigmas_waiting_and_done_values():
    tmpl = flow_template(10, 8.0)
    m = step_matrix(4, 10, ar_step=3, causal_block_size=2, prefix_frames=1)
    sig = m.sigmas(tmpl)
    assert sig.dtype == torch.float64 and sig.shape == (m.rows, 5)
    assert (sig[:, 0] == 0).all()                       # prefix is clean
    assert sig[0, 3].item() == SIGMA_WAIT                # second block is still waiting
    assert sig[0, 1].item() == tmpl[0].item()            # first block on its first step
    assert sig[-1, 1].item() == 0.0                      # finished
    upd = m.update
    # a frame that steps is shown at the sigma its step starts from
    assert torch.equal(sig[upd], tmpl[m.step_index[upd]])


@pytest.mark.parametrize("steps", [1, 2, 7, 30])
@pytest.mark.parametrize("ar", [0, 1, 3, 5, 31])
@pytest.mark.parametrize("cbs,new,prefix", [(1, 5, 0), (1, 7, 3), (5, 20, 5), (5, 25, 0),
                                            (2, 6, 4), (3, 9, 6)])
def test_prefix_held_apart_equals_upstream_when_divisible(steps, ar, cbs, new, prefix):
    tmpl = flow_template(steps, 8.0)
    ts_ref, upd_ref, ctr_ref = upstream_matrix(prefix + new, template_timesteps(tmpl)[:-1].numpy(),
                                               ar, prefix, cbs)
    m = step_matrix(new, steps, ar_step=ar, causal_block_size=cbs, prefix_frames=prefix)
    assert m.rows == ts_ref.shape[0]
    assert np.array_equal(m.counters.numpy(), ctr_ref)
    assert np.array_equal(m.update.numpy(), upd_ref)
    assert np.array_equal(m.timesteps(tmpl).numpy(), ts_ref)


def test_prefix_not_divisible_is_still_held_clean():
    # upstream would treat frame 0 (the image) as noise here (spec 1.7); we keep it done
    m = step_matrix(5, 30, ar_step=5, causal_block_size=5, prefix_frames=1)
    assert not bool(m.update[:, 0].any()) and (m.counters[:, 0] == 31).all()
    assert m.rows == 30 and bool(m.update[0, 1:].all())


def test_step_matrix_rejects_partial_blocks():
    with pytest.raises(ValueError, match="causal_block_size"):
        step_matrix(7, 30, ar_step=5, causal_block_size=5)


# -- windows -----------------------------------------------------------------------------------

def upstream_n_iter(total, base, ov):
    return 1 if total <= base else 1 + (total - base - 1) // (base - ov) + 1


def _check_plans(plans, total, window):
    assert sum(p.new_frames for p in plans) == total
    assert [p.index for p in plans] == list(range(len(plans)))
    start = 0
    for p in plans:
        assert p.start == start and p.total_frames <= window
        start += p.new_frames


def test_windows_97_frames_single_window():
    plans = plan_windows(latent_frames(97), 25, 5)
    assert plans == [WindowPlan(0, 0, 25, 0, 0)]


def test_windows_257_frames_three_windows():
    total = latent_frames(257)
    plans = plan_windows(total, 25, 5, causal_block_size=5)
    _check_plans(plans, total, 25)
    assert [(p.prefix_frames, p.new_frames) for p in plans] == [(0, 25), (5, 20), (5, 20)]
    assert len(plans) == upstream_n_iter(total, 25, 5) == 3
    assert [p.start for p in plans] == [0, 25, 45]


def test_windows_377_frames_ragged_last_window():
    total = latent_frames(377)   # 95 latent frames
    plans = plan_windows(total, 25, 5)
    _check_plans(plans, total, 25)
    assert len(plans) == upstream_n_iter(total, 25, 5) == 5
    assert plans[-1].total_frames == 15 and plans[-1].new_frames == 10  # spec 1.5
    assert all(p.pad_frames == 0 for p in plans)


def test_windows_737_frames():
    total = latent_frames(737)
    plans = plan_windows(total, 25, 5, causal_block_size=5)
    assert len(plans) == upstream_n_iter(total, 25, 5) == 9


def test_ragged_last_window_is_padded_to_whole_blocks():
    plans = plan_windows(57, 25, 5, causal_block_size=5)   # 25 + 20 + 12
    last = plans[-1]
    assert (last.new_frames, last.pad_frames, last.generated_frames) == (12, 3, 15)
    assert last.total_frames == 20 <= 25
    assert all(p.pad_frames == 0 for p in plans[:-1])
    _check_plans(plans, 57, 25)


def test_video_extension_starts_with_history():
    plans = plan_windows(40, 25, 5, causal_block_size=5, initial_prefix=5)
    assert [(p.prefix_frames, p.new_frames, p.start) for p in plans] == [(5, 20, 0), (5, 20, 20)]


def test_windows_reject_blocks_that_do_not_fit():
    with pytest.raises(ValueError, match="causal_block_size"):
        plan_windows(65, 25, 4, causal_block_size=5)      # 21 per later window
    with pytest.raises(ValueError, match="window_frames"):
        plan_windows(65, 25, 25)                           # no room for new frames
    with pytest.raises(ValueError, match="causal_block_size"):
        plan_windows(10, 6, 5, causal_block_size=5, initial_prefix=2)   # 4 frames: no block fits


def test_first_window_after_a_start_image_takes_whole_blocks():
    """SkyReels i2v with blocks of 5: the image leaves 24 of 25 frames; window 0 makes 20 and
    the later windows carry on with 20 each (upstream silently lost the image here)."""
    plans = plan_windows(24 + 40, 25, 5, causal_block_size=5, initial_prefix=1)
    assert [(p.prefix_frames, p.new_frames, p.pad_frames) for p in plans] == [(1, 20, 0), (5, 20, 0), (5, 20, 0), (5, 4, 1)]
    assert sum(p.new_frames for p in plans) == 64


def test_short_video_fits_one_padded_window():
    plans = plan_windows(7, 25, 5, causal_block_size=5)
    assert plans == [WindowPlan(0, 0, 7, 0, 3)]


def test_stepmatrix_template_length_is_checked():
    m = step_matrix(2, 5)
    with pytest.raises(ValueError):
        m.sigmas(flow_template(4, 8.0))
    assert isinstance(m, StepMatrix)
