"""Per-frame solvers: Euler and UniPC-bh2 against scalar references, exact cases, accuracy."""
import math

import pytest
import torch

from cache_core.df_schedule import flow_template, step_matrix
from cache_core.frame_solver import EulerFrameSolver, UniPCFrameSolver, make_solver

D64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Toy data: every latent element is drawn from a 1-D mixture of two Gaussians, so the exact
# denoiser E[x0 | x_sigma] of the flow x = (1-sigma) x0 + sigma eps is analytic and non-linear.
# A per-frame offset makes frames differ.
# ---------------------------------------------------------------------------------------------

MU, SD, W = (-0.6, 0.8), (0.3, 0.4), (0.4, 0.6)


def mixture_x0(x, sigma, offset=0.0):
    """Exact x0 prediction; sigma broadcasts against x (scalar or [1,1,F,1,1])."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    a = 1.0 - sigma
    logp, means = [], []
    for mu, sd, w in zip(MU, SD, W):
        mu = mu + offset
        var = a * a * sd * sd + sigma * sigma
        logp.append(math.log(w) - 0.5 * torch.log(var) - 0.5 * (x - a * mu) ** 2 / var)
        means.append(mu + a * sd * sd / var * (x - a * mu))
    r1 = torch.sigmoid(logp[1] - logp[0])  # responsibility of component 1 (two components)
    return means[0] + r1 * (means[1] - means[0])


def frame_offsets(F):
    return (0.1 * torch.arange(F, dtype=D64)).view(1, 1, F, 1, 1)


def rk4_reference(x, sigma0, offset=0.0, n=400, sigma_end=1e-7):
    """Fine RK4 solution of dx/dsigma = (x - x0(x, sigma)) / sigma down to ~0."""
    v = lambda y, s: (y - mixture_x0(y, s, offset)) / s  # noqa: E731
    grid = torch.linspace(sigma0, sigma_end, n + 1, dtype=D64)
    for s, s_next in zip(grid[:-1], grid[1:]):
        h = s_next - s
        k1 = v(x, s)
        k2 = v(x + 0.5 * h * k1, s + 0.5 * h)
        k3 = v(x + 0.5 * h * k2, s + 0.5 * h)
        k4 = v(x + h * k3, s_next)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return mixture_x0(x, sigma_end, offset)


# ---------------------------------------------------------------------------------------------
# A scalar reference of upstream's FlowUniPCMultistepScheduler (order 2, bh2, predict_x0,
# lower_order_final, corrector on), written from its formulas with the generic R/b system and
# torch.linalg.solve, one frame, internal step counter. Independent of the vectorised tables.
# ---------------------------------------------------------------------------------------------

class RefFlowUniPC:
    def __init__(self, sigmas):
        self.sig = sigmas.to(D64)
        self.N = len(sigmas) - 1
        self.ms, self.last, self.lower, self.i, self.order = [None, None], None, 0, 0, None

    def _lam(self, i):
        s = self.sig[i]
        return torch.log(1 - s) - torch.log(s)

    def _coeffs(self, t_idx, s0_idx, order, prev_idx):
        lt, l0 = self._lam(t_idx), self._lam(s0_idx)
        h = lt - l0
        rks = [((self._lam(prev_idx) - l0) / h).item()] if order == 2 else []
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        B_h = torch.expm1(hh)
        R, b, fact = [], [], 1
        rk_t = torch.tensor(rks + [1.0], dtype=D64)
        for i in range(1, order + 1):
            R.append(rk_t ** (i - 1))
            b.append((h_phi_k * fact / B_h).item())
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        return rks, torch.stack(R), torch.tensor(b, dtype=D64), h_phi_1, B_h

    def _predict(self, x, order):
        i = self.i
        m0 = self.ms[-1]
        s_t, s_0 = self.sig[i + 1], self.sig[i]
        rks, _, _, h_phi_1, B_h = self._coeffs(i + 1, i, order, i - 1)
        a_t = 1 - s_t
        x_t_ = s_t / s_0 * x - a_t * h_phi_1 * m0
        res = 0.5 * (self.ms[-2] - m0) / rks[0] if order == 2 else 0.0
        return x_t_ - a_t * B_h * res

    def _correct(self, model_t, x_t):
        i, order = self.i, self.order
        m0, x = self.ms[-1], self.last
        s_t, s_0 = self.sig[i], self.sig[i - 1]
        rks, R, b, h_phi_1, B_h = self._coeffs(i, i - 1, order, i - 2)
        rhos = torch.tensor([0.5], dtype=D64) if order == 1 else torch.linalg.solve(R, b)
        a_t = 1 - s_t
        x_t_ = s_t / s_0 * x - a_t * h_phi_1 * m0
        corr = rhos[0] * (self.ms[-2] - m0) / rks[0] if order == 2 else 0.0
        return x_t_ - a_t * B_h * (corr + rhos[-1] * (model_t - m0))

    def step(self, x0, sample):
        if self.i > 0 and self.last is not None:
            sample = self._correct(x0, sample)
        self.ms = [self.ms[-1], x0]
        self.order = min(2, self.N - self.i, self.lower + 1)
        self.last = sample
        out = self._predict(sample, self.order)
        self.lower = min(self.lower + 1, 2)
        self.i += 1
        return out


def noise(F=3, seed=0, shape=(1, 2, None, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    shp = tuple(F if s is None else s for s in shape)
    return torch.randn(shp, generator=g, dtype=D64)


def run_sync(solver, x, tmpl, offsets):
    F = x.shape[2]
    for k in range(len(tmpl) - 1):
        x0 = mixture_x0(x, tmpl[k], offsets)
        x = solver.step(x, x0, torch.full((F,), k), torch.ones(F, dtype=torch.bool))
    return x


# -- Euler -------------------------------------------------------------------------------------

def test_euler_in_sync_equals_plain_scalar_euler():
    tmpl = flow_template(12, 5.0)
    F = 4
    x_init = noise(F) * tmpl[0]
    out = run_sync(EulerFrameSolver(tmpl, F), x_init.clone(), tmpl, frame_offsets(F))
    x = x_init.clone()
    for k in range(12):
        s, s_next = tmpl[k].item(), tmpl[k + 1].item()
        d = (x - mixture_x0(x, s, frame_offsets(F))) / s     # k-diffusion style Euler
        x = x + (s_next - s) * d
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)


# -- UniPC against the scalar upstream reference ----------------------------------------------

@pytest.mark.parametrize("steps,shift", [(1, 8.0), (2, 8.0), (3, 1.0), (10, 3.0), (30, 8.0)])
def test_unipc_in_sync_matches_scalar_upstream_reference(steps, shift):
    tmpl = flow_template(steps, shift)
    F = 3
    x = noise(F, seed=steps)
    ours = UniPCFrameSolver(tmpl, F)
    ref = RefFlowUniPC(tmpl)
    xr = x.clone()
    for k in range(steps):
        x0 = mixture_x0(x, tmpl[k], frame_offsets(F))
        x = ours.step(x, x0, torch.full((F,), k), torch.ones(F, dtype=torch.bool))
        xr = ref.step(mixture_x0(xr, tmpl[k], frame_offsets(F)), xr)
        torch.testing.assert_close(x, xr, rtol=0, atol=1e-11)


def test_unipc_first_step_of_a_frame_is_first_order():
    tmpl = flow_template(10, 8.0)
    x = noise(2)
    x0 = mixture_x0(x, tmpl[4])
    k = torch.tensor([4, 4])
    on = torch.ones(2, dtype=torch.bool)
    # a first step (even mid-template) is DDIM, which is the Euler step for flow matching
    a = UniPCFrameSolver(tmpl, 2).step(x, x0, k, on)
    b = EulerFrameSolver(tmpl, 2).step(x, x0, k, on)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


# -- UniPC vectorisation: frames at different steps equal each frame alone ---------------------

def test_unipc_frames_at_different_steps_equal_each_frame_alone():
    steps, prefix, new = 8, 1, 6
    tmpl = flow_template(steps, 5.0)
    m = step_matrix(new, steps, ar_step=3, causal_block_size=2, prefix_frames=prefix)
    F = prefix + new
    off = frame_offsets(F)
    x = noise(F, seed=7)
    x_start = x.clone()
    sig = m.sigmas(tmpl)
    solver = UniPCFrameSolver(tmpl, F)
    for r in range(m.rows):
        x0 = mixture_x0(x, sig[r].view(1, 1, F, 1, 1), off)
        before = x.clone()
        x = solver.step(x, x0, m.step_index[r], m.update[r])
        idle = ~m.update[r]
        assert torch.equal(x[:, :, idle], before[:, :, idle])  # idle frames untouched
        # frames at several different step indexes were stepped in the same call at some row
    assert len(set(m.step_index[m.rows // 2][m.update[m.rows // 2]].tolist())) > 1

    assert torch.equal(x[:, :, :prefix], x_start[:, :, :prefix])
    for f in range(prefix, F):
        alone = UniPCFrameSolver(tmpl, 1)
        ref = RefFlowUniPC(tmpl)
        xf = x_start[:, :, f:f + 1].clone()
        xr = xf.clone()
        for k in range(steps):
            xf = alone.step(xf, mixture_x0(xf, tmpl[k], off[:, :, f:f + 1]), torch.tensor([k]),
                            torch.tensor([True]))
            xr = ref.step(mixture_x0(xr, tmpl[k], off[:, :, f:f + 1]), xr)
        torch.testing.assert_close(x[:, :, f:f + 1], xf, rtol=0, atol=1e-13)
        torch.testing.assert_close(x[:, :, f:f + 1], xr, rtol=0, atol=1e-11)


def test_idle_calls_leave_frame_state_untouched():
    tmpl = flow_template(6, 8.0)
    x = noise(1, seed=3)
    a, b = UniPCFrameSolver(tmpl, 1), UniPCFrameSolver(tmpl, 1)
    xa, xb = x.clone(), x.clone()
    on, off = torch.tensor([True]), torch.tensor([False])
    for k in range(6):
        xa = a.step(xa, mixture_x0(xa, tmpl[k]), torch.tensor([k]), on)
        # b sees an idle call with a garbage prediction before every real step
        same = b.step(xb, torch.full_like(xb, 1e6), torch.tensor([k]), off)
        assert same is xb
        xb = b.step(xb, mixture_x0(xb, tmpl[k]), torch.tensor([k]), on)
    assert torch.equal(xa, xb)


def test_reset_reproduces_the_run():
    tmpl = flow_template(5, 8.0)
    s = UniPCFrameSolver(tmpl, 2)
    x = noise(2, seed=4)
    first = run_sync(s, x.clone(), tmpl, 0.0)
    s.reset()
    assert torch.equal(run_sync(s, x.clone(), tmpl, 0.0), first)


# -- exact and accuracy checks -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_constant_x0_prediction_is_solved_exactly(name):
    # With x0 fixed at c the flow ODE solution is x(sigma) = c + sigma/sigma_0 (x_0 - c).
    tmpl = flow_template(9, 8.0)
    F = 2
    c = torch.full((1, 2, F, 3, 4), 0.37, dtype=D64)
    x_init = noise(F, seed=5)
    x = x_init.clone()
    solver = make_solver(name, tmpl, F)
    for k in range(9):
        x = solver.step(x, c, torch.full((F,), k), torch.ones(F, dtype=torch.bool))
        expect = c + tmpl[k + 1] / tmpl[0] * (x_init - c)
        torch.testing.assert_close(x, expect, rtol=0, atol=1e-12)
    assert torch.equal(x, c)


def test_unipc_beats_euler_on_a_nonlinear_field():
    # Against a fine RK4 solution of the same ODE. Shift 1 spreads the steps evenly, so the
    # observed convergence order shows: Euler halves its error per doubling, UniPC ~quarters.
    F = 2
    off = frame_offsets(F)
    errs = {}
    for steps in (8, 16, 32):
        tmpl = flow_template(steps, 1.0)
        x_init = noise(F, seed=11, shape=(1, 4, None, 8, 8)) * tmpl[0]
        exact = rk4_reference(x_init.clone(), tmpl[0].item(), off)
        for name in ("euler", "unipc"):
            out = run_sync(make_solver(name, tmpl, F), x_init.clone(), tmpl, off)
            errs[name, steps] = (out - exact).pow(2).mean().sqrt().item()
    assert errs["unipc", 8] < errs["euler", 8] / 2
    assert errs["unipc", 16] < errs["euler", 16] / 4
    assert errs["unipc", 32] < errs["euler", 32] / 10
    assert errs["euler", 16] / errs["euler", 32] < 2.3
    assert errs["unipc", 16] / errs["unipc", 32] > 3.5


# -- dtype and validation ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["unipc", "euler"])
def test_output_dtype_follows_input(name, dtype):
    tmpl = flow_template(4, 8.0)
    x64 = noise(2, seed=2)
    out64 = run_sync(make_solver(name, tmpl, 2), x64.clone(), tmpl, 0.0)
    x = x64.to(dtype)
    s = make_solver(name, tmpl, 2)
    for k in range(4):
        x = s.step(x, mixture_x0(x.double(), tmpl[k]).to(dtype), torch.full((2,), k),
                   torch.ones(2, dtype=torch.bool))
        assert x.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(x.double(), out64, rtol=0, atol=tol)


def test_validation():
    tmpl = flow_template(4, 8.0)
    with pytest.raises(ValueError, match="unknown solver"):
        make_solver("heun", tmpl, 2)
    s = make_solver("unipc", tmpl, 2)
    x = noise(2)
    with pytest.raises(ValueError, match="step_index"):
        s.step(x, x, torch.tensor([4, 0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="F=2"):
        s.step(noise(3), noise(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="decreasing"):
        UniPCFrameSolver(torch.tensor([0.5, 0.7, 0.0]), 1)
    # an out-of-range index on an idle frame is ignored
    assert s.step(x, x, torch.tensor([99, 99]), torch.tensor([False, False])) is x
