"""The streaming diffusion-forcing engine, run through ComfyUI's own sampling machinery.

Each window is one `CFGGuider.sample` call with a custom KSAMPLER function, so ComfyUI loads
and offloads the model, encodes conds, batches CFG and runs every wrapper and hook as usual.
ComfyUI sees one scalar sigma per call (the window's progress through the template); the real
per-frame timesteps reach the transformer through the `StepRecord` in transformer_options,
and the per-frame velocity is recovered exactly as v = (x - denoised) / sigma.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers

from ..cache_core.errors import InputError
from ..cache_core.df_schedule import (DFSchedule, WindowPlan, flow_template, latent_frames, plan_windows,
                                      step_matrix, window_rows)
from ..cache_core.frame_solver import make_solver
from ..cache_core.record import RECORD_KEY, StepRecord


@dataclass
class WindowJob:
    """Everything the KSAMPLER function needs for one window."""
    plan: WindowPlan
    prefix_frames: int
    gen_frames: int                  # frames generated here (new + padding)
    tail_frames: int                 # fixed frames after the generated ones (end image)
    schedule: DFSchedule
    steps: int
    seed: int
    rows_done: int                   # rows finished in earlier windows (for one global progress bar)
    on_row: callable = None          # progress(row_global, x0, x)
    calls: int = 0


def frame_sigmas_of(counters: torch.Tensor, template: torch.Tensor, steps: int) -> torch.Tensor:
    """Counter 0: waiting at the first template level; k in 1..N: template[k-1]; N+1: clean (0)."""
    idx = (counters - 1).clamp(min=0, max=steps)
    sig = template[idx]
    return torch.where(counters > steps, torch.zeros_like(sig), sig)


def df_window_sampler(model_k, x, sigmas, extra_args=None, callback=None, disable=None, job: WindowJob = None):
    """KSAMPLER function: all rows of one window's diffusion-forcing step matrix."""
    extra_args = extra_args or {}
    sch, steps = job.schedule, job.steps
    P, G, T = job.prefix_frames, job.gen_frames, job.tail_frames
    template = sigmas.double().cpu()
    matrix = step_matrix(G, steps, sch.ar_step, sch.causal_block_size, prefix_frames=P)
    counters = matrix.counters
    if T:  # the end image: always clean, never stepped
        counters = torch.cat([counters, torch.full((counters.shape[0], T), steps + 1, dtype=counters.dtype)], 1)
    update = counters.new_zeros(counters.shape, dtype=torch.bool)
    update[:, :P + G] = matrix.update[:, :P + G]

    # Start state in model space: history and end frame from the (processed) latent image,
    # generated frames as noise: unscaled for SkyReels-V2's own template (upstream starts from
    # randn at t = 999, sigma_0 = 0.99987), sigma_0 * noise for a custom list as ComfyUI does.
    state = model_k.latent_image.clone()
    state[:, :, P:P + G] = model_k.noise[:, :, P:P + G] * (1.0 if sch.sigmas is None else sigmas[0])
    gen = torch.Generator(device="cpu").manual_seed(job.seed ^ 0x5EED)
    solver = make_solver(sch.solver, template, state.shape[2])
    a = sch.addnoise_condition / 1000.0
    # What the transformer sees (specs/skyreels_df.md 1.2-1.4). SkyReels-V2's own template: its
    # whole-number timesteps, int64(1000*sigma) truncated (999 while a frame waits, 0 when done,
    # addnoise_condition for history). A custom sigma list keeps ComfyUI's convention
    # t = 1000*sigma, as ComfyUI's own samplers feed it. The solver always uses the exact sigmas.
    timesteps = None
    if sch.sigmas is None:
        timesteps = matrix.timesteps(template).to(torch.float32)
        if T:
            timesteps = torch.cat([timesteps, timesteps.new_zeros(timesteps.shape[0], T)], 1)
    transformer_options = extra_args.setdefault("model_options", {}).setdefault("transformer_options", {})
    B = state.shape[0]

    for row in range(counters.shape[0]):
        comfy.model_management.throw_exception_if_processing_interrupted()
        f_sig = frame_sigmas_of(counters[row], template, steps).to(torch.float32)
        f_t = None if timesteps is None else timesteps[row].clone()
        x_in = state
        if P and a > 0:  # history re-noised afresh every row (seeded, unlike upstream)
            eps = torch.randn(state[:, :, :P].shape, generator=gen).to(state)
            x_in = state.clone()
            x_in[:, :, :P] = (1 - a) * state[:, :, :P] + a * eps
            f_sig[:P] = a
            if f_t is not None:
                f_t[:P] = sch.addnoise_condition
        upd = update[row]
        # The scalar sigma ComfyUI sees (EasyCache, timestep-range conds, post-CFG hooks): the
        # window's progress through the template, so it only ever decreases. In async windows the
        # stepped frames' own sigmas jump back up whenever a new block starts; those reach the
        # transformer per frame through the record. Any positive value inverts exactly below.
        sigma_call = template[min(steps - 1, row * steps // counters.shape[0])].to(torch.float32)
        transformer_options[RECORD_KEY] = StepRecord(
            frame_sigmas=f_sig, active=upd.clone(), prefix_frames=P,
            chunk_frames=sch.causal_block_size, steps=steps, window_index=job.plan.index,
            row=row, rows=counters.shape[0], timesteps=f_t)
        denoised = model_k(x_in, sigma_call.to(state) * state.new_ones(B), **extra_args)
        job.calls += 1
        v = (x_in - denoised) / sigma_call.to(state)
        x0 = x_in - f_sig.to(state).view(1, 1, -1, 1, 1) * v
        state = solver.step(state, x0, (counters[row] - 1).clamp(min=0), upd)
        if job.on_row is not None:
            preview = torch.where(upd.to(state.device).view(1, 1, -1, 1, 1), x0, state)
            job.on_row(job.rows_done + row, preview, state)
    transformer_options.pop(RECORD_KEY, None)
    return state


def count_rows(plans: list[WindowPlan], steps: int, schedule: DFSchedule) -> list[int]:
    return [window_rows(p.new_frames + p.pad_frames, steps, schedule.ar_step, schedule.causal_block_size)
            for p in plans]


def template_sigmas(model_patcher, steps: int, schedule: DFSchedule) -> torch.Tensor:
    if schedule.sigmas is not None:
        s = schedule.sigmas.detach().float().cpu()
        if (s.ndim != 1 or len(s) < 2 or float(s[-1]) != 0.0 or not bool((s[1:] < s[:-1]).all())
                or float(s[0]) > 1.0):
            raise InputError("schedule.sigmas", "need a strictly decreasing flow sigma list from at most 1 down "
                             "to 0 (e.g. BasicScheduler on this model)")
        return s
    shift = schedule.shift or float(model_patcher.get_model_object("model_sampling").shift)
    return flow_template(steps, shift).float()


__all__ = ["DFSchedule", "WindowJob", "df_window_sampler", "count_rows", "template_sigmas",
           "latent_frames", "plan_windows"]
