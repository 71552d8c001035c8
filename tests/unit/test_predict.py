"""Predicted skips (cache_core/predict.py) through the shared chunk step.

The oracle is independent of the Lagrange code: a synthetic "model" whose block output is a known
polynomial in the noise level, evaluated directly. Extrapolation of order k through k+1 computed
points must reproduce every polynomial of degree <= k exactly (float64) and miss degree k+1.
"""
import pytest
import torch

from cache_core.chunk_step import COMPUTE, PREDICT, SKIP, ChunkPolicy, ChunkStep, skip, subset
from cache_core.errors import InputError
from cache_core.flowcache_policy import FlowCacheConfig, FlowCachePolicy
from cache_core.motioncache_policy import MotionCacheConfig
from cache_core.predict import REACH, CachedOutputs

ROWS, TOKENS, C = 2, 6, 3
G = torch.Generator().manual_seed(0)
COEFFS = torch.randn(4, ROWS, TOKENS, C, generator=G, dtype=torch.float64)   # a_0..a_3 per entry
H_IN = torch.randn(ROWS, TOKENS, C, generator=G, dtype=torch.float64)


def poly(level: float, degree: int) -> torch.Tensor:
    """The synthetic model's residual at this noise level: sum_i a_i (level / 1000)^i."""
    s = level / 1000.0
    return sum(COEFFS[i] * s ** i for i in range(degree + 1))


class Order(ChunkPolicy):
    def __init__(self, order):
        self.order = order


def run_model(degree):
    return lambda level: (lambda tokens: (H_IN + poly(level, degree)) if tokens is None
                          else (H_IN + poly(level, degree))[:, tokens])


def computed(step, levels, degree, chunk=0):
    for level in levels:
        step.apply(0, chunk, COMPUTE, H_IN, run_model(degree)(level), level=level)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_order_k_is_exact_for_polynomials_up_to_degree_k_and_not_beyond(order):
    levels, at = [1000.0, 900.0, 800.0], 700.0
    for degree in range(order + 2):
        step = ChunkStep(Order(order))
        computed(step, levels, degree)
        got = step.apply(0, 0, PREDICT, H_IN, None, level=at)
        want = H_IN + poly(at, degree)
        if degree <= order:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert (got - want).abs().max() > 1e-4
        assert step.counts["tokens_predicted"] == (TOKENS if order else 0)


def test_uneven_levels_and_interpolation_are_exact_too():
    step = ChunkStep(Order(2))
    computed(step, [961.0, 700.5, 433.0], 2)
    for at in (300.0, 500.0):               # past the newest point, and between points
        got = step.apply(0, 0, PREDICT, H_IN, None, level=at)
        torch.testing.assert_close(got, H_IN + poly(at, 2), rtol=1e-11, atol=1e-11)


def test_plain_skip_reuses_the_newest_output_bit_for_bit():
    step = ChunkStep(Order(2))
    computed(step, [1000.0, 900.0, 800.0], 2)
    got = step.apply(0, 0, SKIP, H_IN, None, level=700.0)
    assert torch.equal(got, H_IN + (poly(800.0, 2) + H_IN - H_IN))
    assert step.counts["chunk_steps_predicted"] == 0 and step.counts["chunk_steps_skipped"] == 1


def test_too_few_points_lower_the_order():
    step = ChunkStep(Order(2))
    computed(step, [1000.0], 1)
    one = step.apply(0, 0, PREDICT, H_IN, None, level=900.0)
    assert torch.equal(one, H_IN + (poly(1000.0, 1) + H_IN - H_IN))     # one point: reuse
    assert step.counts["chunk_steps_predicted"] == 0
    computed(step, [900.0], 1)
    two = step.apply(0, 0, PREDICT, H_IN, None, level=800.0)            # two points: linear, exact for degree 1
    torch.testing.assert_close(two, H_IN + poly(800.0, 1), rtol=1e-12, atol=1e-12)


def test_points_at_one_noise_level_are_not_fitted():
    step = ChunkStep(Order(2))
    computed(step, [900.0, 800.0, 800.0], 1)      # a chunk held at one level: the newest two coincide
    got = step.apply(0, 0, PREDICT, H_IN, None, level=700.0)
    assert torch.isfinite(got).all()
    assert torch.equal(got, H_IN + (poly(800.0, 1) + H_IN - H_IN))      # order 0 only


def test_a_repeated_level_two_points_back_lowers_the_order_too():
    step = ChunkStep(Order(2))
    computed(step, [800.0, 900.0, 800.0], 1)      # levels went back up: points 0 and 2 coincide
    got = step.apply(0, 0, PREDICT, H_IN, None, level=700.0)
    assert torch.isfinite(got).all()
    s0, s1 = 800.0, 900.0                          # order 1 through the newest two
    lin = poly(s0, 1) + (poly(s0, 1) - poly(s1, 1)) * (700.0 - s0) / (s0 - s1)
    torch.testing.assert_close(got, H_IN + lin, rtol=1e-12, atol=1e-12)


def test_reach_is_bounded_by_the_span_of_the_points():
    step = ChunkStep(Order(1))
    computed(step, [1000.0, 990.0], 1)            # span 10
    got = step.apply(0, 0, PREDICT, H_IN, None, level=100.0)           # 890 away: clamped
    clamped = 990.0 - REACH * 10.0
    torch.testing.assert_close(got, H_IN + poly(clamped, 1), rtol=1e-12, atol=1e-12)


def test_per_token_histories_from_subsets():
    """Tokens recomputed at different steps each extrapolate from their own points."""
    step = ChunkStep(Order(1))
    computed(step, [1000.0], 1)
    odd = torch.tensor([1, 3, 5])
    step.apply(0, 0, subset(odd), H_IN, run_model(1)(800.0), level=800.0)
    step.apply(0, 0, COMPUTE, H_IN, run_model(1)(700.0), level=700.0)
    step.apply(0, 0, subset(odd), H_IN, run_model(1)(650.0), level=650.0)
    got = step.apply(0, 0, PREDICT, H_IN, None, level=600.0)
    torch.testing.assert_close(got, H_IN + poly(600.0, 1), rtol=1e-12, atol=1e-12)
    # and the points are really per token: a degree-2 model gives different errors per parity
    step2 = ChunkStep(Order(1))
    computed(step2, [1000.0], 2)
    step2.apply(0, 0, subset(odd), H_IN, run_model(2)(800.0), level=800.0)
    step2.apply(0, 0, COMPUTE, H_IN, run_model(2)(700.0), level=700.0)
    got2 = step2.apply(0, 0, PREDICT, H_IN, None, level=600.0)
    even = torch.tensor([0, 2, 4])
    for toks, pts in ((odd, (800.0, 700.0)), (even, (1000.0, 700.0))):
        s0, s1 = pts[1], pts[0]
        lin = poly(s0, 2) + (poly(s0, 2) - poly(s1, 2)) * (600.0 - s0) / (s0 - s1)
        torch.testing.assert_close(got2[:, toks], H_IN[:, toks] + lin[:, toks], rtol=1e-12, atol=1e-12)


def test_a_mask_predicts_only_its_tokens_and_subsets_predict_the_rest():
    step = ChunkStep(Order(1))
    computed(step, [1000.0, 900.0], 1)
    mask = torch.tensor([True, False, True, False, False, False])
    got = step.apply(0, 0, skip(mask), H_IN, None, level=800.0)
    newest = H_IN + (poly(900.0, 1) + H_IN - H_IN)
    torch.testing.assert_close(got[:, mask], (H_IN + poly(800.0, 1))[:, mask], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, ~mask], newest[:, ~mask])
    assert step.counts["tokens_predicted"] == 2
    ran = torch.tensor([1])
    out = step.apply(0, 0, subset(ran, mask), H_IN, run_model(1)(800.0), level=800.0)
    torch.testing.assert_close(out[:, 1], (H_IN + poly(800.0, 1))[:, 1])
    torch.testing.assert_close(out[:, mask], (H_IN + poly(800.0, 1))[:, mask], rtol=1e-12, atol=1e-12)


def test_nothing_crosses_a_segment_branch_or_finished_chunk():
    step = ChunkStep(Order(2))
    computed(step, [1000.0, 900.0], 1)
    computed(step, [1000.0], 1, chunk=1)
    step.forget(0, 1)
    assert step.outputs.has(0, 0) and not step.outputs.has(0, 1)
    step.reset_branch(0)
    assert not step.outputs.has(0, 0)
    computed(step, [1000.0], 1)
    step.reset_segment()
    assert step.outputs.items == {}


def test_history_memory_is_counted_and_bounded_by_the_order():
    for order in (0, 1, 2):
        out = CachedOutputs(order)
        for level in (1000.0, 900.0, 800.0, 700.0):
            out.push(0, 0, torch.zeros(ROWS, TOKENS, C), level)
        assert out.peak_bytes == (order + 1) * (ROWS * TOKENS * C * 4 + TOKENS * 8)


def test_flowcache_three_way_decision():
    """acc < reuse_thresh: reuse; reuse_thresh <= acc < rel_l1_thresh: predict; then recompute."""
    pol = FlowCachePolicy(FlowCacheConfig(rel_l1_thresh=0.35, reuse_thresh=0.15, warmup_steps=1, final_steps=0,
                                          predict_order=1))
    ind = [torch.full((6, 4), 1.1 ** k) for k in range(8)]     # relative change 0.1 per step (identity P)
    got = []
    for k in range(8):
        d = pol.decide(0, 0, ind[k], k, 8)
        if d is COMPUTE:
            pol.observe(0, 0, None, None)
        got.append("compute" if d is COMPUTE else "predict" if d is PREDICT else "reuse" if d is SKIP else "?")
    # acc after k=1: .1 reuse, .2 predict, .3 predict, .4 compute (reset), .1 reuse, .2 predict, .3 predict
    assert got == ["compute", "reuse", "predict", "predict", "compute", "reuse", "predict", "predict"]


def test_prediction_with_equal_thresholds_never_predicts():
    pol = FlowCachePolicy(FlowCacheConfig(rel_l1_thresh=0.25, reuse_thresh=0.25, warmup_steps=1, final_steps=0,
                                          predict_order=2))
    for k in range(10):
        d = pol.decide(0, 0, torch.full((6, 4), 1.1 ** k), k, 10)
        assert d is not PREDICT
        if d is COMPUTE:
            pol.observe(0, 0, None, None)


@pytest.mark.parametrize("make", [
    lambda **kw: FlowCacheConfig(rel_l1_thresh=kw.pop("thresh", 0.1), **kw),
    lambda **kw: MotionCacheConfig(threshold=kw.pop("thresh", 0.1), **kw),
])
def test_bad_prediction_settings_are_named(make):
    with pytest.raises(InputError, match="predict_order"):
        make(predict_order=3)
    with pytest.raises(InputError, match="predict_order"):
        make(predict_order=-1)
    with pytest.raises(InputError, match="reuse_thresh.*<= "):
        make(predict_order=1, reuse_thresh=0.2)
    with pytest.raises(InputError, match="reuse_thresh"):
        make(predict_order=1, reuse_thresh=float("nan"))
    with pytest.raises(InputError, match="thresh"):
        make(thresh=float("inf"))
    make(predict_order=0, reuse_thresh=0.5)      # no prediction: reuse_thresh is not read
    make(predict_order=2, reuse_thresh=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("levels", [[1000.0, 990.0, 700.0], [999.0, 995.0], [800.0, 800.0, 600.0], [900.0, 800.0, 700.0]])
def test_the_shared_level_path_is_bit_identical_to_the_per_token_one(dtype, levels):
    """FlowCache's chunks share one level per point: estimate takes a scalar path; an all-True
    mask forces the per-token path on the same history."""
    g = torch.Generator().manual_seed(len(levels))
    out = CachedOutputs(2)
    for level in levels:
        out.push(0, 0, torch.randn(ROWS, TOKENS, C, generator=g).to(dtype), level)
    for at in (650.0, 100.0, 995.0, 1200.0):
        fast, n_fast = out.estimate(0, 0, at, True)
        slow, n_slow = out.estimate(0, 0, at, torch.ones(TOKENS, dtype=torch.bool))
        assert torch.equal(fast, slow) and n_fast == n_slow and fast.dtype == dtype
