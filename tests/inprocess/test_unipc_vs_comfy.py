"""Our per-frame UniPC against ComfyUI's own UniPC, in process (no server needed).

Two comparisons, all frames in sync, same sigmas, same deterministic toy denoiser:

1. ComfyUI's ``UniPC`` class driven with the flow-matching noise schedule (alpha = 1 - sigma,
   std = sigma), order 2, bh2, data prediction, lower_order_final: this is the algorithm
   upstream's FlowUniPCMultistepScheduler runs, so ours must match it to rounding.

2. ComfyUI's stock ``uni_pc_bh2`` sampler (``sample_unipc_bh2``) as a KSampler would run it on
   a flow model. It differs by design, so only agreement within discretisation error holds:
   - it treats the latent as variance-exploding, x = x0 + sigma*eps (log-SNR -log sigma),
     where FlowUniPC uses log((1-sigma)/sigma); both integrate the same ODE
     dx/dsigma = (x - x0(x, sigma)) / sigma and their first-order steps coincide (DDIM), but
     the higher-order corrections differ;
   - it uses order 3 (min(3, steps-1)); upstream uses order 2;
   - it replaces the final sigma 0 by 0.001, which leaves a trace of noise.
"""
import pytest
import torch

from comfy.extra_samplers import uni_pc

from cache_core.df_schedule import flow_template
from cache_core.frame_solver import EulerFrameSolver, UniPCFrameSolver

D64 = torch.float64


@pytest.fixture(autouse=True)
def float64_default():
    # ComfyUI's UniPC builds its coefficient tensors with the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(D64)
    yield
    torch.set_default_dtype(old)


def _sig(s, x):
    s = torch.as_tensor(s, dtype=x.dtype)
    return s.view(-1, 1, 1, 1, 1) if s.ndim else s


# Gaussian data N(MU, SD^2) per element: exact denoiser and exact ODE end point are analytic.
MU, SD = 0.3, 0.6


def gauss_x0(x, sigma):
    s = _sig(sigma, x)
    a = 1 - s
    var = a * a * SD * SD + s * s
    return MU + a * SD * SD / var * (x - a * MU)


def gauss_exact_end(x, s0):
    a = 1 - s0
    return MU + SD * (x - a * MU) / (a * a * SD * SD + s0 * s0) ** 0.5


def mixture_x0(x, sigma):
    """A non-linear denoiser: exact posterior mean of a two-Gaussian mixture."""
    s = _sig(sigma, x)
    a = 1 - s
    parts = []
    for mu, sd, w in ((-0.6, 0.3, 0.4), (0.8, 0.4, 0.6)):
        var = a * a * sd * sd + s * s
        logp = torch.log(torch.tensor(w)) - 0.5 * torch.log(var) - 0.5 * (x - a * mu) ** 2 / var
        parts.append((logp, mu + a * sd * sd / var * (x - a * mu)))
    r = torch.sigmoid(parts[1][0] - parts[0][0])
    return parts[0][1] + r * (parts[1][1] - parts[0][1])


def run_ours(solver, x, tmpl, denoise):
    F = x.shape[2]
    for k in range(len(tmpl) - 1):
        x = solver.step(x, denoise(x, tmpl[k]), torch.full((F,), k), torch.ones(F, dtype=torch.bool))
    return x


class FlowSchedule:
    """Flow-matching marginals in the interface ComfyUI's UniPC expects (t is sigma)."""
    schedule = "flow"

    def marginal_log_mean_coeff(self, s):
        return torch.log1p(-s)

    def marginal_alpha(self, s):
        return 1 - s

    def marginal_std(self, s):
        return s

    def marginal_lambda(self, s):
        return torch.log1p(-s) - torch.log(s)


def noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


@pytest.mark.parametrize("steps,shift", [(3, 8.0), (5, 3.0), (30, 8.0), (50, 1.0)])
def test_matches_comfy_unipc_with_flow_schedule(steps, shift):
    tmpl = flow_template(steps, shift)
    x = noise((2, 3, 4, 5, 6), seed=steps) * tmpl[0]
    ours = run_ours(UniPCFrameSolver(tmpl, 4), x.clone(), tmpl, mixture_x0)

    ns = FlowSchedule()
    model_fn = uni_pc.model_wrapper(lambda xx, t: mixture_x0(xx, t), ns, model_type="x_start",
                                    guidance_type="uncond", model_kwargs={})
    solver = uni_pc.UniPC(model_fn, ns, predict_x0=True, variant="bh2")
    theirs = solver.sample(x.clone(), timesteps=tmpl.clone(), method="multistep", order=2,
                           lower_order_final=True, disable_pbar=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def _rms(t):
    return t.pow(2).mean().sqrt().item()


def _stock_vs_ours(steps, shift):
    tmpl = flow_template(steps, shift)
    x = noise((2, 4, 3, 8, 8), seed=1) * tmpl[0]
    exact = gauss_exact_end(x, tmpl[0].item())
    ours = run_ours(UniPCFrameSolver(tmpl, 3), x.clone(), tmpl, gauss_x0)
    euler = run_ours(EulerFrameSolver(tmpl, 3), x.clone(), tmpl, gauss_x0)
    # KSAMPLER passes model(x, sigma) -> denoised; sample_unipc edits its sigmas in place
    stock = uni_pc.sample_unipc_bh2(lambda xx, s: gauss_x0(xx, s), x.clone(), tmpl.clone(),
                                    extra_args={}, disable=True)
    return _rms(ours - stock), _rms(ours - exact), _rms(stock - exact), _rms(euler - exact)


@pytest.mark.parametrize("steps,shift", [(30, 8.0), (30, 1.0), (60, 8.0)])
def test_close_to_comfy_stock_uni_pc_bh2(steps, shift):
    diff, err_ours, err_stock, err_euler = _stock_vs_ours(steps, shift)
    # both are higher-order solvers of the same ODE: both clearly beat Euler ...
    assert err_ours < 0.6 * err_euler and err_stock < 0.6 * err_euler
    # ... and they agree with each other far better than either agrees with Euler
    assert diff < 0.25 * err_euler


def test_stock_difference_shrinks_with_steps():
    assert _stock_vs_ours(60, 8.0)[0] < _stock_vs_ours(30, 8.0)[0] / 5
