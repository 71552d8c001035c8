"""Our streaming DF sampler against an independent diffusion-forcing implementation.

`toy_world.sample_check.sample_async` was written separately (for the toy model's own checks):
a plain Euler loop over per-frame sigmas with blocks starting `ar_step` rows apart. Driven by the
same ComfyUI WanModel, the same noise and the same sigmas, the two must produce the same video:
that checks our step matrix, per-frame timesteps through ComfyUI, velocity recovery from the
guider, per-frame Euler and the history hand-over between windows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)
import comfy.latent_formats  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
from toy_world.sample_check import flow_sigmas, sample_async  # noqa: E402

streaming = pack("model_patches.video_run")
ar = pack("model_patches.df_sampling")
STEPS, BLOCK, AR_STEP = 6, 2, 2


@pytest.fixture(scope="module")
def model(tiny_models):
    return comfy.sd.load_diffusion_model(str(tiny_models["14b"]))


def theirs_model(model):
    dm, ctx = model.model.diffusion_model, torch.zeros(1, 512, 4096)
    return lambda x, t: dm(x, t, ctx)


def skyreels_template(steps, shift):
    """SkyReels-V2's template, written out here: linspace(float32 0.999, 0) shifted, then 0."""
    base = np.linspace(np.float32(0.999), 0.0, steps + 1)[:-1].astype(np.float64)
    return torch.from_numpy(np.concatenate([shift * base / (1 + (shift - 1) * base), [0.0]]))


def ours(model, length, seed, native_template=False):
    sched = ar.DFSchedule(window_frames=29, overlap_frames=5, ar_step=AR_STEP, causal_block_size=BLOCK,
                          addnoise_condition=0, solver="euler", fps=0, prefix_mode="latent", shift=8.0,
                          sigmas=None if native_template else flow_sigmas(STEPS, 8.0))
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = streaming.VideoRequest(width=64, height=64, length=length, seed=seed, steps=STEPS, cfg=1.0,
                                 schedule=sched, positives=[cond], negative=cond)
    raw, report = pack("model_patches.families").new_video_run(model, req).run()
    return comfy.latent_formats.Wan21().process_in(raw), report


def test_one_async_window_matches(model):
    mine, report = ours(model, length=29, seed=4)                       # 8 latent frames, blocks of 2
    noise = comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 8, 8), 4)
    theirs, rows = sample_async(theirs_model(model), noise, block=BLOCK, ar_step=AR_STEP, steps=STEPS, shift=8.0)
    assert report["calls_per_window"] == [rows] == [STEPS + 3 * AR_STEP]
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_two_windows_with_history_match(model):
    mine, report = ours(model, length=53, seed=9)                       # 14 latent: 8, then 2 history + 6
    run = theirs_model(model)
    first, _ = sample_async(run, comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 8, 8), 9),
                            block=BLOCK, ar_step=AR_STEP, steps=STEPS, shift=8.0)
    noise2 = comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 8, 8), 10)[:, :, 2:]
    second, _ = sample_async(run, noise2, history=first[:, :, -2:], block=BLOCK, ar_step=AR_STEP, steps=STEPS,
                             shift=8.0)
    assert report["windows"] == 2
    torch.testing.assert_close(mine, torch.cat([first, second], 2), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,seeds", [(29, (4,)), (53, (9, 10))], ids=["one_window", "two_windows"])
def test_native_template_with_upstream_integer_timesteps_matches(model, length, seeds):
    """SkyReels-V2's own template: the model must see whole-number timesteps (999 waiting,
    int64(1000 sigma) stepping, 0 done) and the frames start from unscaled noise."""
    mine, report = ours(model, length=length, seed=seeds[0], native_template=True)
    run, tmpl = theirs_model(model), skyreels_template(STEPS, 8.0)
    kw = dict(block=BLOCK, ar_step=AR_STEP, steps=STEPS, sigmas=tmpl, integer_timesteps=True)
    first, _ = sample_async(run, comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 8, 8), seeds[0]), **kw)
    parts = [first]
    if len(seeds) > 1:
        noise2 = comfy.sample.prepare_noise(torch.zeros(1, 16, 8, 8, 8), seeds[1])[:, :, 2:]
        parts.append(sample_async(run, noise2, history=first[:, :, -2:], **kw)[0])
    assert report["windows"] == len(seeds)
    torch.testing.assert_close(mine, torch.cat(parts, 2), rtol=2e-5, atol=2e-5)


def test_model_sees_hand_written_integer_timesteps(model):
    """Async window (blocks of 2, ar_step 1, 4 steps of shift 8: t = 999, 959, 888, 727) and a
    second window whose 2 history frames are re-noised to addnoise_condition = 20."""
    seen = []
    dm = model.model.diffusion_model
    original = dm.forward_orig

    def spy(x, t, *args, **kwargs):
        seen.append(t[0].tolist())
        return original(x, t, *args, **kwargs)

    sched = ar.DFSchedule(window_frames=13, overlap_frames=5, ar_step=1, causal_block_size=2,
                          addnoise_condition=20, solver="unipc", shift=8.0, fps=0, prefix_mode="latent")
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = streaming.VideoRequest(width=64, height=64, length=21, seed=3, steps=4, cfg=1.0, schedule=sched,
                                 positives=[cond], negative=cond)
    dm.forward_orig = spy
    try:
        pack("model_patches.families").new_video_run(model, req).run()
    finally:
        del dm.forward_orig
    assert seen == [
        [999, 999, 999, 999], [959, 959, 999, 999], [888, 888, 959, 959], [727, 727, 888, 888], [0, 0, 727, 727],
        [20, 20, 999, 999], [20, 20, 959, 959], [20, 20, 888, 888], [20, 20, 727, 727],
    ]
