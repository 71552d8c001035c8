"""Our per-frame UniPC against diffusers' UniPCMultistepScheduler driven as SkyReels-V2 drives it.

SkyReels-V2 (and diffusers' SkyReels-V2 DF pipeline) keep one scheduler per latent frame and call
`latents[:, f] = sched[f].step(v[:, f], t, latents[:, f])`: the sample handed to `step()` is a
view that the assignment then overwrites. The independent reference here is diffusers' own
scheduler in exactly that loop (`aliased=True`), or with a private copy (`aliased=False`, the
textbook method). Frames start at staggered rows as in asynchronous diffusion forcing.
"""
import pytest
import torch

from diffusers import UniPCMultistepScheduler   # a dev requirement (requirements-dev.txt)

from cache_core.frame_solver import make_solver

STEPS, FRAMES, AR = 8, 4, 2


def scheduler():
    s = UniPCMultistepScheduler(num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                lower_order_final=True, prediction_type="flow_prediction", use_flow_sigmas=True,
                                flow_shift=8.0, final_sigmas_type="zero")
    s.set_timesteps(STEPS)
    return s


def velocity(x, sigma):
    """A deterministic stand-in for the transformer: v depends on the sample and the noise level."""
    return torch.tanh(1.3 * x) - 0.7 * x + 0.25 * sigma


def schedule_rows():
    """Frame f takes its steps at rows f*AR .. f*AR + STEPS - 1."""
    return [[(r - f * AR) if 0 <= r - f * AR < STEPS else None for f in range(FRAMES)]
            for r in range(STEPS + (FRAMES - 1) * AR)]


def diffusers_loop(noise, aliased: bool):
    scheds = [scheduler() for _ in range(FRAMES)]
    sig = scheds[0].sigmas.double()
    lat = noise.clone()
    for ks in schedule_rows():
        s_frames = torch.tensor([float(sig[k if k is not None else 0]) for k in ks])   # idle frames: unused
        v = velocity(lat, s_frames.view(1, 1, -1, 1, 1).float())
        for f, k in enumerate(ks):
            if k is None:
                continue
            sample = lat[:, :, f] if aliased else lat[:, :, f].clone()
            lat[:, :, f] = scheds[f].step(v[:, :, f], scheds[f].timesteps[k], sample, return_dict=False)[0]
    return lat, sig


def our_loop(noise, template, solver_name):
    solver = make_solver(solver_name, template, FRAMES)
    x = noise.clone()
    for ks in schedule_rows():
        upd = torch.tensor([k is not None for k in ks])
        k = torch.tensor([k if k is not None else 0 for k in ks])
        s_frames = template[k].float()
        v = velocity(x, s_frames.view(1, 1, -1, 1, 1))
        x0 = x - s_frames.view(1, 1, -1, 1, 1) * v
        x = solver.step(x, x0, k, upd)
    return x


@pytest.fixture(scope="module")
def noise():
    return torch.randn(1, 3, FRAMES, 4, 4, generator=torch.Generator().manual_seed(0))


def test_textbook_unipc_equals_diffusers_with_private_samples(noise):
    ref, sig = diffusers_loop(noise, aliased=False)
    torch.testing.assert_close(our_loop(noise, sig, "unipc"), ref, rtol=1e-5, atol=1e-5)


def test_upstream_exact_unipc_equals_diffusers_fed_a_view_as_skyreels_does(noise):
    ref, sig = diffusers_loop(noise, aliased=True)
    torch.testing.assert_close(our_loop(noise, sig, "unipc_upstream"), ref, rtol=1e-5, atol=1e-5)


def test_the_aliasing_changes_the_result(noise):
    a, _ = diffusers_loop(noise, aliased=True)
    b, _ = diffusers_loop(noise, aliased=False)
    assert (a - b).abs().max() > 1e-3
