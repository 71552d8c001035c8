"""FlowCache decision rule against hand-computed traces (specs/flowcache.md A2)."""
import pytest
import torch

from cache_core.chunk_step import COMPUTE, SKIP
from cache_core.flowcache_policy import IDENTITY, FlowCacheConfig, FlowCachePolicy, polyval

H = torch.zeros(1)  # any block input/output: the policy only needs to know the chunk was computed
# TeaCache-Wan2.1 1.3B (use_ret_steps), as printed in specs/flowcache.md A2; the Wan family
# resolves the names (tests/host/test_families.py)
WAN_1_3B = (-5.21862437e+04, 9.23041404e+03, -5.28275948e+02, 1.36987616e+01, -4.99875664e-02)


def step(policy, branch, chunk, indicator, k, steps) -> bool:
    """One decision as the executor takes it; True when computed."""
    decision = policy.decide(branch, chunk, indicator, k, steps)
    if decision is COMPUTE:
        policy.observe(branch, chunk, H, H)
    return decision is COMPUTE


def ind(value: float) -> torch.Tensor:
    """A [6, dim] indicator with every entry = value (mean ratios are then exact)."""
    return torch.full((6, 4), float(value))


def run_trace(policy, values, steps, branch=0, chunk=0):
    out = []
    for k, v in enumerate(values):
        out.append(step(policy, branch, chunk, ind(v), k, steps))
    return out


def test_polynomial_1_3b_by_hand():
    # -5.21862437 + 9.23041404 - 5.28275948 + 1.36987616 - 0.0499875664
    assert polyval(WAN_1_3B, 0.1) == pytest.approx(0.0489187836, abs=1e-9)
    assert polyval(WAN_1_3B, 0.0) == pytest.approx(-0.0499875664)
    # negative P(d) must not shrink the accumulator
    p = FlowCachePolicy(FlowCacheConfig(), WAN_1_3B)
    assert p.rescale(0.0) == 0.0
    assert polyval(IDENTITY, 0.37) == pytest.approx(0.37)
    with pytest.raises(ValueError):
        FlowCachePolicy(FlowCacheConfig(), ())


def test_accumulator_warmup_and_final_identity():
    # warm-up 2, final 1, 8 steps, threshold 0.25, P = identity, values grow 10% a step:
    # k0,k1 warm-up | k2 acc .1 skip | k3 .2 skip | k4 .3 compute | k5 .1 skip | k6 .2 skip | k7 final
    cfg = FlowCacheConfig(rel_l1_thresh=0.25, warmup_steps=2, final_steps=1, coefficients="none")
    values = [1.0, 2.0] + [2.0 * 1.1 ** i for i in range(1, 7)]
    got = run_trace(FlowCachePolicy(cfg), values, steps=8)
    assert got == [True, True, False, False, True, False, False, True]


def test_accumulator_with_1_3b_polynomial():
    # d = 0.1 every step -> P = 0.04892 per step; threshold 0.1 reached on the 3rd step after
    # each compute: acc .0489 skip, .0978 skip, .1468 compute.
    cfg = FlowCacheConfig(rel_l1_thresh=0.1, warmup_steps=1, final_steps=0, coefficients="1.3B")
    values = [1.1 ** i for i in range(8)]
    got = run_trace(FlowCachePolicy(cfg, WAN_1_3B), values, steps=100)
    assert got == [True, False, False, True, False, False, True, False]


def test_threshold_zero_always_computes():
    cfg = FlowCacheConfig(rel_l1_thresh=0.0, warmup_steps=1, final_steps=0, coefficients="1.3B")
    assert all(run_trace(FlowCachePolicy(cfg, WAN_1_3B), [1.0] * 6, steps=6))


def test_final_steps_reset_accumulator():
    cfg = FlowCacheConfig(rel_l1_thresh=0.25, warmup_steps=1, final_steps=2, coefficients="none")
    p = FlowCachePolicy(cfg)
    values = [1.0, 1.1, 1.21, 1.331, 1.4641]
    got = run_trace(p, values, steps=5)
    # k1 .1 skip, k2 .2 skip, k3,k4 are the final 2 steps
    assert got == [True, False, False, True, True]
    assert p.state(0, 0).acc == 0.0


def test_per_branch_and_per_chunk_state_is_independent():
    cfg = FlowCacheConfig(rel_l1_thresh=0.25, warmup_steps=1, final_steps=0, coefficients="none")
    p = FlowCachePolicy(cfg)
    slow = [1.1 ** i for i in range(5)]          # d = .1: skip, skip, compute, skip
    fast = [2.0 ** i for i in range(5)]          # d = 1: always compute
    trace = {(0, 0): [], (1, 0): [], (0, 1): []}
    for k in range(5):
        for (b, g), vals in (((0, 0), slow), ((1, 0), fast), ((0, 1), fast)):
            trace[(b, g)].append(step(p, b, g, ind(vals[k]), k, 100))
    assert trace[(0, 0)] == [True, False, False, True, False]
    assert trace[(1, 0)] == [True] * 5
    assert trace[(0, 1)] == [True] * 5
    assert sum(sum(t) for t in trace.values()) == 12          # computed; the other 3 skipped
    p.reset()
    assert p.states == {}


def test_prev_is_updated_on_skips_too():
    # After a skip, the next distance is measured from the skipped step's indicator.
    cfg = FlowCacheConfig(rel_l1_thresh=0.5, warmup_steps=1, final_steps=0, coefficients="none")
    p = FlowCachePolicy(cfg)
    run_trace(p, [1.0, 1.2], steps=100)          # k1: d=.2, skip
    assert torch.equal(p.state(0, 0).prev, ind(1.2))
    assert p.decide(0, 0, ind(1.44), 2, 100) is SKIP    # d=.2 from 1.2 -> acc .4
    assert p.state(0, 0).acc == pytest.approx(0.4)


def test_no_residual_forces_compute():
    cfg = FlowCacheConfig(rel_l1_thresh=10.0, warmup_steps=0, final_steps=0, coefficients="none")
    p = FlowCachePolicy(cfg)
    assert p.decide(0, 0, ind(1.0), 0, 10) is COMPUTE    # no prev
    assert p.decide(0, 0, ind(1.0), 1, 10) is COMPUTE    # no residual observed yet
    p.observe(0, 0, H, H)
    assert p.decide(0, 0, ind(1.0), 2, 10) is SKIP


def test_zero_previous_indicator_does_not_divide_by_zero():
    cfg = FlowCacheConfig(rel_l1_thresh=0.5, warmup_steps=1, final_steps=0, coefficients="none")
    p = FlowCachePolicy(cfg)
    run_trace(p, [0.0], steps=10)
    assert p.decide(0, 0, ind(0.0), 1, 10) is SKIP       # d = 0/eps = 0


def test_config_validation():
    with pytest.raises(ValueError):
        FlowCacheConfig(rel_l1_thresh=-1)
    with pytest.raises(ValueError):
        FlowCacheConfig(chunk_frames=0)
    with pytest.raises(ValueError):
        FlowCacheConfig(kv_lambda=2.0)


def test_a_bf16_indicator_is_measured_in_bf16_as_magis_reference_does():
    """MAGI-1's reference casts the patch embedding to bf16 and takes the relative L1 change in bf16.
    Worked by hand: prev = [1, 1, 1], now = [1, 1, 1.0078125] (one bf16 step above 1).
    fp32: mean|diff| = 0.0078125 / 3 = 0.00260416..; bf16 rounds that mean to 171/128 * 2**-9 =
    0.002609252..; mean|prev| = 1. A threshold between the two separates the dtypes."""
    thr = 0.0026065
    for dtype, computed in ((torch.bfloat16, True), (torch.float32, False)):
        p = FlowCachePolicy(FlowCacheConfig(rel_l1_thresh=thr, warmup_steps=1, final_steps=0, coefficients="none"))
        prev = torch.tensor([1.0, 1.0, 1.0], dtype=dtype)
        now = torch.tensor([1.0, 1.0, 1.0078125], dtype=dtype)
        assert step(p, 0, 0, prev, 0, 10) is True                # first step: computed, indicator kept
        assert step(p, 0, 0, now, 1, 10) is computed, dtype
        assert p.state(0, 0).prev.dtype == dtype
    assert 171 / 128 * 2 ** -9 > thr > 0.0078125 / 3


def test_a_finished_chunk_is_forgotten():
    """MAGI-1 runs one segment per video: finished chunks' state must not pile up."""
    p = FlowCachePolicy(FlowCacheConfig(rel_l1_thresh=0.1, coefficients="none"))
    for chunk in (0, 1):
        step(p, 0, chunk, ind(1.0), 0, 10)
    p.forget(0, 0)
    assert set(p.states) == {(0, 1)}
