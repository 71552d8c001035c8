"""MAGI-1's chunk-wise window schedule (cache_core/magi_schedule.py) against an independent
re-implementation of the official sampler loop.

The reference below is written from a reading of SandAI-org/MAGI-1 @ 6ff822e,
inference/pipeline/video_generate.py:
  generate_sequences (window bounds per stage), init_t (time grid incl. the 12-step grid),
  init_intervel (12-step intervals), SampleTransport.get_timestep /
  get_denoise_step_of_each_chunk (per-chunk step index, newest chunk last), forward_velocity
  (the "fwd_extra_1st_chunk" clean refresh), generate_noise2clean_kvrange /
  generate_default_kvrange (key ranges), integrate_velocity (chunk_denoise_count -> a chunk
  is emitted when its count reaches num_steps), total_forward_step;
and inference/model/dit/dit_model.py get_embedding_and_meta (distill dt factor).
It simulates the upstream driver step by step and every ForwardStep of plan_steps must agree.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from cache_core.errors import InputError
from cache_core.magi_schedule import (ForwardStep, MagiSchedule, cached_chunks_needed, distill_dt, first_key_chunk,
                                      latent_length, plan_steps, time_grid)

CLEAN_T = 0.9999
KV_RANGE = (5, 4, 3, 2)          # runtime_config.noise2clean_kvrange
CLEAN_KV = 1                     # runtime_config.clean_chunk_kvrange


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ----------------------------------------------------------------------------------------------
# Reference: the upstream sampler, re-written from reading video_generate.py
# ----------------------------------------------------------------------------------------------

def ref_window_sequences(chunk_num, window_size, chunk_offset):
    """Per stage i (offset .. chunk_num+window-2): chunk window [clip_start, clip_end) and the
    noise-level window [t_start, t_end) (levels 0 = newest .. window-1 = oldest)."""
    stages = list(range(chunk_offset, chunk_num + window_size - 1))
    clip_start, clip_end, t_start, t_end = [], [], [], []
    for i in stages:
        clip_start.append(max(chunk_offset, i - window_size + 1))
        clip_end.append(min(chunk_num, i + 1))
        t_start.append(max(0, i - chunk_num + 1))
        t_end.append(window_size if i - chunk_offset >= window_size else min(window_size, i - chunk_offset + 1))
    return clip_start, clip_end, t_start, t_end


def ref_init_t(num_steps, shift=3.0):
    """Time grid (float32 like upstream): t^2 then the SD3 shift in the 0 = noise orientation."""
    if num_steps == 12:
        quarter = torch.linspace(0, 1, 5) / 4                       # [0, 1/16, 2/16, 3/16, 4/16]
        base = torch.stack([quarter[0], quarter[2], quarter[3]])   # shortcut_mode "8,16,16"
        pieces = [base + a for a in torch.linspace(0, 1, 5)]
        u = torch.cat(pieces)[:num_steps + 1]
    else:
        u = torch.linspace(0, 1, num_steps + 1)
    x = u ** 2
    inv = 1.0 / shift
    return inv * x / (1 + (inv - 1) * x)


def ref_intervals(num_steps):
    """init_intervel with shortcut_mode "8,16,16": [2, 1, 1] repeated when num_steps % 3 == 0."""
    if num_steps % 3 == 0:
        return [2, 1, 1] * (num_steps // 3)
    return [1] * num_steps


def ref_distill_dt(num_steps, interval):
    """dit_model.py get_embedding_and_meta: distill_dt_factor."""
    if num_steps == 12:
        return 4 / interval * 2
    return num_steps / 4 * 2


def ref_step_of_each_chunk(per_stage, t_start, t_end, denoise_idx, num_steps, has_clean_t):
    steps = [lvl * per_stage + denoise_idx for lvl in range(t_start, t_end)]
    steps = steps[::-1]                                     # oldest chunk (highest level) first
    return ([num_steps] if has_clean_t else []) + steps


def ref_kv_first(slice_point, step_list, num_steps, kv_range=KV_RANGE, clean_kv=CLEAN_KV):
    """First key chunk (absolute) of each chunk of the forward (chunks slice_point + j)."""
    out = []
    for j, s in enumerate(step_list):
        k_end = slice_point + j + 1
        if not kv_range:                                     # generate_default_kvrange
            out.append(0)
            continue
        assert num_steps % len(kv_range) == 0
        r = clean_kv if s == num_steps else kv_range[s // (num_steps // len(kv_range))]
        out.append(max(0, k_end - r))
    return out


def ref_walk(chunk_num, window, offset, num_steps, kv_range=KV_RANGE):
    """Simulate SampleTransport.walk: one dict per forward step."""
    per_stage = num_steps // window
    grid = ref_init_t(num_steps).tolist()
    cs, ce, ts, te = ref_window_sequences(chunk_num, window, offset)
    total = per_stage * (chunk_num + window - 1 - offset)
    counts = Counter()
    out = []
    for step in range(total):
        stage, d = step // per_stage, step % per_stage
        start, end = cs[stage], ce[stage]
        extra = start > offset and d == 0
        steps_each = ref_step_of_each_chunk(per_stage, ts[stage], te[stage], d, num_steps, extra)
        slice_point = start - 1 if extra else start
        firsts = ref_kv_first(slice_point, steps_each, num_steps, kv_range)
        # get_timestep: grid[index] reversed, clean_t in front for the refresh chunk
        t = [grid[i * per_stage + d] for i in range(ts[stage], te[stage])][::-1]
        if extra:
            t = [CLEAN_T] + t
        for c in range(start, end):                          # integrate_velocity step 10
            counts[c] += 1
        finished = start if counts[start] == num_steps else None
        out.append(dict(stage=stage, inner=d, start=start, end=end, extra=extra, steps=steps_each,
                        firsts=firsts, t=t, finished=finished, slice_point=slice_point, counts=dict(counts)))
    return out


def combos():
    for window in (1, 2, 3, 4, 5):
        for steps in (4, 8, 12, 16, 20, 24, 32, 64):
            if steps % window or steps % 4:
                continue
            yield window, steps


# ----------------------------------------------------------------------------------------------
# The reference itself reproduces the worked examples upstream writes above generate_sequences
# ----------------------------------------------------------------------------------------------

WORKED = [  # (chunk_num, window, offset, clip_start, clip_end, t_start, t_end), video_generate.py comments
    (8, 8, 0,
     [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7],
     [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8, 8],
     [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7],
     [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8, 8]),
    (8, 4, 0,
     [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7],
     [1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 8],
     [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3],
     [1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4]),
    (8, 4, 2,
     [2, 2, 2, 2, 3, 4, 5, 6, 7],
     [3, 4, 5, 6, 7, 8, 8, 8, 8],
     [0, 0, 0, 0, 0, 0, 1, 2, 3],
     [1, 2, 3, 4, 4, 4, 4, 4, 4]),
    (8, 1, 0,
     [0, 1, 2, 3, 4, 5, 6, 7],
     [1, 2, 3, 4, 5, 6, 7, 8],
     [0, 0, 0, 0, 0, 0, 0, 0],
     [1, 1, 1, 1, 1, 1, 1, 1]),
]


@pytest.mark.parametrize("n,w,off,cs,ce,ts,te", WORKED)
def test_reference_reproduces_upstream_worked_examples(n, w, off, cs, ce, ts, te):
    assert ref_window_sequences(n, w, off) == (cs, ce, ts, te)


@pytest.mark.parametrize("n,w,off,cs,ce,ts,te", WORKED)
def test_plan_steps_matches_worked_examples(n, w, off, cs, ce, ts, te):
    steps = 8 * w                      # any multiple of the window; 8 steps per stage
    per_stage = steps // w
    plan = plan_steps(n, off, w, steps)
    assert len(plan) == per_stage * len(cs)
    for stage in range(len(cs)):
        for d in range(per_stage):
            fs = plan[stage * per_stage + d]
            assert (fs.start, fs.end) == (cs[stage], ce[stage])
            assert fs.inner == d
            # levels of the active chunks, oldest first: t_end - 1 down to t_start
            assert [s // per_stage for s in fs.step_of] == list(range(te[stage] - 1, ts[stage] - 1, -1))
            assert all(s % per_stage == d for s in fs.step_of)


# ----------------------------------------------------------------------------------------------
# plan_steps / first_key_chunk / time_grid against the simulated upstream driver
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,steps", list(combos()))
def test_plan_steps_equals_upstream_driver(window, steps):
    grid = time_grid(steps).tolist()
    for n in range(1, 9):
        for off in range(0, min(n, 4)):
            ref = ref_walk(n, window, off, steps)
            plan = plan_steps(n, off, window, steps)
            assert len(plan) == len(ref), (n, window, off, steps)
            for k, (fs, r) in enumerate(zip(plan, ref)):
                where = (n, window, off, steps, k)
                assert isinstance(fs, ForwardStep)
                assert fs.index == k, where
                assert fs.inner == r["inner"], where
                assert (fs.start, fs.end) == (r["start"], r["end"]), where
                assert list(fs.chunks) == list(range(r["start"], r["end"])), where
                noisy_steps = r["steps"][1:] if r["extra"] else r["steps"]
                assert list(fs.step_of) == noisy_steps, where
                assert fs.refresh == (r["start"] - 1 if r["extra"] else None), where
                assert fs.finished == r["finished"], where
                # each active chunk's step index == how many forwards it has had before this one
                for c, s in zip(fs.chunks, fs.step_of):
                    assert r["counts"][c] == s + 1, where
                # key ranges: refresh chunk (step == steps) first, then the window
                chunks = ([fs.refresh] if fs.refresh is not None else []) + list(fs.chunks)
                all_steps = ([steps] if fs.refresh is not None else []) + list(fs.step_of)
                assert chunks == list(range(r["slice_point"], r["end"])), where
                got = [first_key_chunk(c, s, steps, KV_RANGE) for c, s in zip(chunks, all_steps)]
                assert got == r["firsts"], where
                # timesteps
                t = [grid[s] for s in fs.step_of]
                if fs.refresh is not None:
                    t = [CLEAN_T] + t
                assert t == pytest.approx(r["t"], abs=1e-6), where


def test_first_key_chunk_empty_kv_range_is_all_history():
    for steps in (8, 16):
        ref = ref_walk(6, 4, 1, steps, kv_range=())
        plan = plan_steps(6, 1, 4, steps)
        for fs, r in zip(plan, ref):
            chunks = ([fs.refresh] if fs.refresh is not None else []) + list(fs.chunks)
            all_steps = ([steps] if fs.refresh is not None else []) + list(fs.step_of)
            got = [first_key_chunk(c, s, steps, ()) for c, s in zip(chunks, all_steps)]
            assert got == r["firsts"] == [0] * len(chunks)


def test_first_key_chunk_quarters_and_clean():
    S = 16
    # quarters of the schedule: 5, 4, 3, 2 chunks (itself included); clean refresh: itself only
    assert [first_key_chunk(10, s, S, KV_RANGE) for s in range(S)] == [6] * 4 + [7] * 4 + [8] * 4 + [9] * 4
    assert first_key_chunk(10, S, S, KV_RANGE) == 10
    assert first_key_chunk(1, 0, S, KV_RANGE) == 0          # clamped at chunk 0
    assert first_key_chunk(0, 15, S, KV_RANGE) == 0


# ----------------------------------------------------------------------------------------------
# The spec's 96-frame example, refresh and finish rules
# ----------------------------------------------------------------------------------------------

def test_spec_96_frame_example():
    T = latent_length(96, 0, 6)
    assert T == 24
    N = T // 6
    assert N == 4
    plan = plan_steps(N, 0, 4, 16)
    assert len(plan) == 28
    sizes = [len(fs.chunks) for fs in plan]
    assert sizes == sum(([k] * 4 for k in (1, 2, 3, 4, 3, 2, 1)), [])
    # chunks finish in order at the last inner step of stages 3..6
    assert [(fs.index, fs.finished) for fs in plan if fs.finished is not None] == [(15, 0), (19, 1), (23, 2), (27, 3)]
    assert [(fs.index, fs.refresh) for fs in plan if fs.refresh is not None] == [(16, 0), (20, 1), (24, 2)]
    # the first window: chunk 0 alone at steps 0..3; the full window at step 12: levels 3,2,1,0
    assert [fs.step_of for fs in plan[:4]] == [(0,), (1,), (2,), (3,)]
    assert plan[12].step_of == (12, 8, 4, 0)
    assert plan[27].step_of == (15,)


def test_latent_length_and_prefix_offsets():
    assert latent_length(96, 1, 6) == 30        # i2v: 24 + 1 frame -> 5 chunks
    assert latent_length(96, 8, 6) == 36        # v2v default prefix (8 latent frames)
    assert latent_length(97, 0, 6) == 24        # floor(97 / 4) = 24
    assert latent_length(100, 0, 6) == 30
    # upstream infer_chunk_num: ceil((num_frames // 4 + prefix latent frames) / chunk_width)
    for frames in (1, 24, 95, 96, 97, 121, 240):
        for prefix in (0, 1, 8):
            assert latent_length(frames, prefix, 6) == 6 * math.ceil((frames // 4 + prefix) / 6)


@pytest.mark.parametrize("window,steps", [(4, 16), (4, 64), (2, 8), (1, 4), (3, 12), (5, 20)])
def test_refresh_exactly_when_start_beyond_offset_at_inner_zero(window, steps):
    for n in range(1, 8):
        for off in range(0, n):
            for fs in plan_steps(n, off, window, steps):
                if fs.start > off and fs.inner == 0:
                    assert fs.refresh == fs.start - 1
                else:
                    assert fs.refresh is None


@pytest.mark.parametrize("window,steps", [(4, 16), (4, 32), (2, 8), (1, 4), (3, 12), (5, 20)])
def test_finished_chunk_is_start_when_its_step_is_last(window, steps):
    for n in range(1, 8):
        for off in range(0, n):
            plan = plan_steps(n, off, window, steps)
            done = []
            for fs in plan:
                if fs.step_of[0] == steps - 1:
                    assert fs.finished == fs.start
                    done.append(fs.finished)
                else:
                    assert fs.finished is None
                # only the oldest chunk can be at the last step
                assert all(s < steps - 1 for s in fs.step_of[1:])
            assert done == list(range(off, n))             # every generated chunk once, in order
            # every chunk that is refreshed was finished at an earlier step
            fin_at = {fs.finished: fs.index for fs in plan if fs.finished is not None}
            for fs in plan:
                if fs.refresh is not None:
                    assert fin_at[fs.refresh] < fs.index


# ----------------------------------------------------------------------------------------------
# Time grid and the distilled step-size embedding
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [4, 8, 12, 16, 24, 32, 64])
def test_time_grid_matches_upstream_init_t(steps):
    g = time_grid(steps)
    assert g.shape == (steps + 1,)
    assert g.dtype == torch.float64
    assert torch.allclose(g, ref_init_t(steps).double(), atol=1e-6, rtol=0)
    assert g[0] == 0 and abs(g[-1].item() - 1) < 1e-12
    assert torch.all(g[1:] > g[:-1])


def test_time_grid_shift_form():
    u = torch.linspace(0, 1, 17, dtype=torch.float64)
    x = u ** 2
    assert torch.allclose(time_grid(16), x / (3 - 2 * x), atol=1e-12)     # spec: t <- t / (3 - 2t)
    assert torch.allclose(time_grid(16, shift=1.0), x, atol=1e-12)
    x = torch.linspace(0, 1, 9, dtype=torch.float64) ** 2
    assert torch.allclose(time_grid(8, shift=5.0), 0.2 * x / (1 - 0.8 * x), atol=1e-12)


def test_time_grid_12_steps_literal():
    # u for 12 steps: four stages of [0, 1/2, 3/4] quarter steps, then 1
    u = [0, 0.125, 0.1875, 0.25, 0.375, 0.4375, 0.5, 0.625, 0.6875, 0.75, 0.875, 0.9375, 1.0]
    x = torch.tensor(u, dtype=torch.float64) ** 2
    assert torch.allclose(time_grid(12), x / (3 - 2 * x), atol=1e-12)


@pytest.mark.parametrize("steps", [4, 8, 16, 32, 64, 24, 20])
def test_distill_dt_is_half_the_steps(steps):
    for inner in range(4):
        assert distill_dt(steps, inner) == steps / 2
        assert distill_dt(steps, inner) == ref_distill_dt(steps, ref_intervals(steps)[inner])


@pytest.mark.parametrize("window", [1, 2, 3, 4, 6, 12])
def test_distill_dt_12_step_intervals(window):
    steps = 12
    per_stage = steps // window
    iv = ref_intervals(steps)
    assert iv == [2, 1, 1] * 4
    # upstream: distill_interval = time_interval[denoise_idx] (the step within the stage)
    got = [distill_dt(steps, d) for d in range(per_stage)]
    assert got == [ref_distill_dt(steps, iv[d]) for d in range(per_stage)]
    assert got == ([4.0, 8.0, 8.0] * 4)[:per_stage]


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,steps", [(3, 16), (4, 10), (5, 16), (8, 12)])
def test_steps_not_divisible_by_window_raises(window, steps):
    with pytest.raises(InputError) as e:
        plan_steps(4, 0, window, steps)
    assert e.value.input_name == "steps"
    assert str(window) in str(e.value) and str(steps) in str(e.value)


def test_steps_not_divisible_by_kv_range_raises():
    with pytest.raises(InputError):
        first_key_chunk(3, 0, 6, KV_RANGE)


# ----------------------------------------------------------------------------------------------
# Schedule dataclass helpers
# ----------------------------------------------------------------------------------------------

def ref_cfg_scales(t, text_scale=7.5):
    """dit_model.py get_cfg_scale with the shipped tables (searchsorted(range - 1e-7, t) - 1)."""
    rng = torch.tensor([0, 0.0217, 0.1, 0.3, 0.999])
    prev = [1.5, 1.5, 1.5, 1, 1]
    text = [text_scale, text_scale, text_scale, 0, 0]
    i = int(torch.searchsorted(rng - 1e-7, torch.tensor(t, dtype=torch.float32))) - 1
    return prev[i], text[i]


def test_scales_match_upstream_cfg_table():
    s = MagiSchedule()
    ts = [0.0, 1e-4, 0.02, 0.05, 0.15, 0.29, 0.31, 0.5, 0.9, 0.9999, 1.0] + time_grid(64).tolist()
    for t in ts:
        if abs(t - 0.3) < 1e-5:
            continue                                       # float32 vs float64 boundary
        assert s.scales(t, 7.5) == ref_cfg_scales(t), t


@pytest.mark.parametrize("chunks,prefix,window,steps,kv", [
    (6, 0, 4, 16, (5, 4, 3, 2)), (6, 1, 4, 8, (5, 4, 3, 2)), (7, 0, 1, 4, (5, 4, 3, 2)), (7, 0, 2, 8, (5, 4, 3, 2)),
    (8, 2, 3, 12, (3, 2)), (5, 0, 4, 16, (8,)), (6, 0, 4, 16, ())])
def test_cached_chunks_needed_covers_every_read_and_no_more(chunks, prefix, window, steps, kv):
    plan = plan_steps(chunks, prefix, window, steps)
    need = cached_chunks_needed(plan, steps, kv)
    # Every cached read (chunks [first, lo) of each forward) against a cache that keeps its newest
    # write and `need` chunks behind it: the prefix chunks first, then each refreshed chunk.
    held, reach = set(), 0
    for c in range(prefix):
        held = {h for h in held | {c} if need is None or h >= c - need}
    for st in plan:
        if st.refresh is not None:
            held = {h for h in held | {st.refresh} if need is None or h >= st.refresh - need}
        lo = st.start if st.refresh is None else st.refresh
        for c, j in zip(st.chunks, st.step_of):
            first = first_key_chunk(c, j, steps, kv)
            reach = max(reach, lo - first)
            assert set(range(first, lo)) <= held, (st, c, first, held)
    assert need is None if not kv else need == reach


def test_upstream_defaults_need_one_cached_chunk():
    assert cached_chunks_needed(plan_steps(10, 0, 4, 16), 16, (5, 4, 3, 2)) == 1
    assert cached_chunks_needed(plan_steps(10, 0, 1, 16), 16, (5, 4, 3, 2)) == 4
