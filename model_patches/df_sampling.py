"""SkyReels-V2-DF's run: diffusion forcing window by window, through ComfyUI's own sampling machinery.

`DFRun` plans the windows (history prefixes, start/end images, video extension) and generates
them one after another. A generated frame is emitted the moment it is final: in async windows a
block at its last step (a finished block never changes again), in sync windows at the window's
last row, with the Drift Anchor at the window's end (it works on the whole window). Each window
is one `CFGGuider.sample` call with a custom KSAMPLER function, so ComfyUI loads
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

from ..cache_core.chunk_step import ChunkPolicy
from ..cache_core.df_schedule import DFSchedule, WindowPlan, flow_template, plan_windows, step_matrix, window_rows
from ..cache_core.errors import InputError
from ..cache_core.frame_solver import make_solver
from ..cache_core.record import RECORD_KEY, StepRecord
from .steering import SteeredGuider
from .vae_stream import decode_whole
from .video_run import VideoRun, check_start, encode_frames


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
    calls_done: int                  # model calls finished in earlier windows (one global progress bar)
    on_call: callable = None         # progress(call_global, x0, x)
    on_final: callable = None        # (raw latents, calls so far): the next generated frames, now final
    steering: object = None          # a Steering: prompt switches at block starts
    check_interrupt: callable = comfy.model_management.throw_exception_if_processing_interrupted
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
    base = model_k.inner_model.inner_model          # the BaseModel: what CFGGuider.sample does to its output
    new_end = P + job.plan.new_frames               # generated frames the video keeps (padding is dropped)
    final = P                                       # window frames [0, final) handed to on_final

    def raw(lo: int, hi: int) -> torch.Tensor:
        """Window frames [lo, hi) as guider.sample returns them (bit-identical: elementwise)."""
        out = base.model_sampling.inverse_noise_scaling(sigmas[-1], state[:, :, lo:hi])
        return base.process_latent_out(out.to(torch.float32)).to(comfy.model_management.intermediate_device(),
                                                                  torch.float32)

    try:
        for row in range(counters.shape[0]):
            job.check_interrupt()
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
            if job.steering is not None and bool((counters[row, P:new_end] == 1).any()):   # a block starts
                job.steering.at_boundary(job.calls_done + row, job.plan.index)
            # The scalar sigma ComfyUI sees (EasyCache, timestep-range conds, post-CFG hooks): the
            # window's progress through the template, so it only ever decreases. In async windows the
            # stepped frames' own sigmas jump back up whenever a new block starts; those reach the
            # transformer per frame through the record. Any positive value inverts exactly below.
            sigma_call = template[min(steps - 1, row * steps // counters.shape[0])].to(torch.float32)
            transformer_options[RECORD_KEY] = StepRecord(
                frame_sigmas=f_sig, active=upd.clone(), prefix_frames=P,
                chunk_frames=sch.causal_block_size, steps=steps, window_index=job.plan.index,
                call=row, calls=counters.shape[0], timesteps=f_t,
                prompt_switches=0 if job.steering is None else job.steering.switches)
            denoised = model_k(x_in, sigma_call.to(state) * state.new_ones(B), **extra_args)
            job.calls += 1
            v = (x_in - denoised) / sigma_call.to(state)
            x0 = x_in - f_sig.to(state).view(1, 1, -1, 1, 1) * v
            state = solver.step(state, x0, (counters[row] - 1).clamp(min=0), upd)
            if job.on_call is not None:
                preview = torch.where(upd.to(state.device).view(1, 1, -1, 1, 1), x0, state)
                job.on_call(job.calls_done + row, being_finished(preview, upd, P), state)
            if job.on_final is not None:      # frames whose last step was this row (blocks finish in order)
                done = P + int((counters[row, P:new_end] >= steps).sum())
                if done > final:
                    job.on_final(raw(final, done), job.calls_done + row + 1)
                    final = done
    finally:
        transformer_options.pop(RECORD_KEY, None)
    return state


def being_finished(x: torch.Tensor, update: torch.Tensor, prefix: int) -> torch.Tensor:
    """The window from its oldest frame still being stepped on: ComfyUI's previewer draws a video
    latent's frame 0, which from the second window on is a history frame that never changes; this
    way it draws the frame closest to being finished (the next one emitted)."""
    stepped = torch.nonzero(update[prefix:]).flatten()
    return x[:, :, prefix + int(stepped[0]):] if len(stepped) else x


def calls_per_window(plans: list[WindowPlan], steps: int, schedule: DFSchedule) -> list[int]:
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


class DFRun(VideoRun):
    """A SkyReels-V2-DF video: windows of diffusion forcing, each continuing from the last frames of
    the one before; generated frames are emitted as they become final (see the module docstring),
    and with prefix_mode reencode_pixels each window is also decoded on its own for the next
    window's history, as upstream does."""

    schedule = DFSchedule

    @staticmethod
    def validate(width, height, length, schedule, vae, start_image, prefix_latent, end_image, family) -> None:
        """What can be checked before the model runs (so a bad input costs nothing)."""
        if (length - 1) % 4:
            raise InputError("length", f"{length}: must be of the form 4k+1 pixel frames (e.g. 97, 257, 737)")
        check_start(family, vae, width, height, {"start_image": start_image, "end_image": end_image}, prefix_latent,
                    "connect the Wan 2.1 VAE to the sampler's vae input")
        if schedule.prefix_mode == "reencode_pixels" and vae is None:
            raise InputError("schedule.prefix_mode", "reencode_pixels needs a vae: connect one, or use prefix_mode "
                             "latent")
        if schedule.overlap_frames == 0 and prefix_latent is not None:
            raise InputError("prefix_latent", "needs schedule.overlap_frames > 0 to continue from it")

    def __init__(self, model, req, family, dm, on_window=None, sink=None, t_start=None):
        super().__init__(model, req, family, dm, on_window, sink, t_start)
        fam, sch = family, req.schedule
        if self.sp.active:
            self.use_executor_when_uncached()
        self.notes = fam.prepare_sampling(self.model, sch)
        self.template = template_sigmas(self.model, req.steps, sch)
        self.steps = len(self.template) - 1
        self.lat_h, self.lat_w = req.height // fam.spatial_stride, req.width // fam.spatial_stride
        self.window_lat = fam.latent_frames(sch.window_frames)
        self.overlap_lat = fam.latent_frames(sch.overlap_frames) if sch.overlap_frames > 0 else 0
        self.mode = sch.prefix_mode if sch.prefix_mode != "auto" else ("reencode_pixels" if req.vae else "latent")

        # The video starts with the start image (frame 0 of the output) or the extended video's tail.
        self.head_latent = None          # raw latents that precede the generated ones in the output
        init_prefix = None
        if req.start_image is not None:
            init_prefix = self.encode_image(req.start_image)
            self.head_latent = init_prefix
        elif req.prefix_latent is not None:
            self.head_latent = req.prefix_latent.float()
            init_prefix = self.head_latent[:, :, -self.overlap_lat:] if self.overlap_lat else None
            if init_prefix is not None and self.mode == "reencode_pixels":
                px = decode_whole(req.vae, self.head_latent)[-sch.overlap_frames:]
                init_prefix = encode_frames(req.vae, px)
        total_lat = fam.latent_frames(req.length)
        new_total = total_lat - (1 if req.start_image is not None else 0)
        self.init_prefix = init_prefix
        self.plans = plan_windows(new_total, self.window_lat, self.overlap_lat, sch.causal_block_size,
                                  initial_prefix=0 if init_prefix is None else init_prefix.shape[2])
        self.calls_per_segment = calls_per_window(self.plans, self.steps, sch)
        self.end_latent = None
        if req.end_image is not None:
            self.end_latent = self.encode_image(req.end_image)
        self.branches = fam.cfg_branches(req.cfg)
        self.anchor_latent = self.anchor_image_latent()

    def use_executor_when_uncached(self) -> None:
        """Sequence parallelism shards the chunk executor's block passes; an uncached model runs through
        it too: every token of the window in one bidirectional pass per call, the uncached model's math."""
        from . import ar_cache
        if ar_cache.SPEC_KEY not in self.model.model_options["transformer_options"]:
            self.model = ar_cache.apply_ar_cache(self.model, ar_cache.CacheSpec(
                ChunkPolicy, attention="bidirectional", family=self.family))

    def sharded(self) -> tuple[int, int, str]:     # a chunk may be one frame (a window's last)
        heads, what = self.family.shard_heads(self.dm)
        return heads, self.family.tokens_per_frame(self.lat_h, self.lat_w), what

    def report_fields(self) -> dict:
        return dict(self.notes, prefix_mode=self.mode)

    def _generate(self, run_report, on_call) -> torch.Tensor:
        req, sch, fam = self.req, self.req.schedule, self.family
        report = run_report.data
        flops = fam.flops(self.dm)
        tokens_per_frame = fam.tokens_per_frame(self.lat_h, self.lat_w)
        generated = []                    # raw latents of new frames, window by window
        head_len = 0 if self.head_latent is None else self.head_latent.shape[2]
        heat = torch.zeros(head_len + sum(p.new_frames for p in self.plans), tokens_per_frame)
        prefix = self.init_prefix
        calls_done = 0
        if self.head_latent is not None:     # a start image is shown as frame 0; an extended video is not
            self.show_head(self.head_latent, shown=req.start_image is not None)
        for plan, calls in zip(self.plans, self.calls_per_segment):
            positive = req.positives[min(plan.index, len(req.positives) - 1)]
            P = 0 if prefix is None else prefix.shape[2]
            G = plan.new_frames + plan.pad_frames
            tail = self.end_latent if (self.end_latent is not None and plan is self.plans[-1]) else None
            T = 0 if tail is None else 1
            F = P + G + T
            latent = torch.zeros(1, fam.latent_channels, F, self.lat_h, self.lat_w)
            if P:
                latent[:, :, :P] = prefix
            if T:
                latent[:, :, P + G:] = tail
            noise = comfy.sample.prepare_noise(torch.zeros_like(latent), req.seed + plan.index)
            def on_final(latents, calls, index=plan.index):
                self.check_finite(latents, index)
                self.emit(latents, report, index, calls)

            job = WindowJob(plan=plan, prefix_frames=P, gen_frames=G, tail_frames=T, schedule=sch,
                            steps=self.steps, seed=req.seed + plan.index, calls_done=calls_done, on_call=on_call,
                            on_final=None if self.anchoring else on_final, steering=req.steering,
                            check_interrupt=self.check_interrupt)
            guider = comfy.samplers.CFGGuider(self.model) if req.steering is None else SteeredGuider(self.model,
                                                                                                  req.steering)
            guider.set_conds(positive, req.negative)
            guider.set_cfg(req.cfg)
            sampler = comfy.samplers.KSAMPLER(df_window_sampler, extra_options={"job": job})
            out = guider.sample(noise, latent, sampler, self.template.clone(), disable_pbar=True,
                                seed=req.seed + plan.index)
            out = out.to(comfy.model_management.intermediate_device(), torch.float32)
            self.check_finite(out[:, :, P:P + plan.new_frames], plan.index)
            if self.anchoring:                 # before it is decoded, emitted and becomes history
                out[:, :, P:P + plan.new_frames] = self.anchored(out[:, :, P:P + plan.new_frames], plan.index,
                                                                 self.anchor_latent)
            calls_done += calls
            report["model_calls"] += job.calls
            report["transformer_flops_vanilla"] += job.calls * flops.window(F * tokens_per_frame, F,
                                                                            batch=self.branches)
            new = out[:, :, P:P + plan.new_frames]
            generated.append(new)
            window_heat = run_report.heat.pop(plan.index, None)   # where a cache spent compute
            if window_heat is not None:
                at = head_len + plan.start - P                     # the window's frame 0 in the video
                heat[at:at + P + plan.new_frames] += window_heat[:P + plan.new_frames]
            if self.anchoring:                 # anchored as a whole window: emitted now
                self.emit(new, report, plan.index, calls_done)
            self.piece_done(plan.index)
            # History for the next window: the tail of the video so far, as latents or re-encoded
            # (upstream decodes each window on its own, its causal VAE restarting at the prefix).
            # Without a stream (no sink) that decode is also what the drift measure sees, as before.
            last = plan is self.plans[-1]
            window_px = None
            if self.mode == "reencode_pixels" and (self.decoder is None or (self.overlap_lat and not last)):
                window_px = decode_whole(req.vae, out[:, :, :P + plan.new_frames])
                if self.decoder is None:
                    own = fam.pixel_frames(P) if P and not (plan.index == 0 and req.start_image is not None) else 0
                    self.measure_drift(window_px[own:])
            if self.overlap_lat and not last:
                if window_px is not None:
                    prefix = encode_frames(req.vae, window_px[-sch.overlap_frames:])[:, :, :self.overlap_lat]
                else:
                    prefix = torch.cat(([self.head_latent] if self.head_latent is not None else []) + generated,
                                       dim=2)[:, :, -self.overlap_lat:]
            if not last and self.finish_here(calls_done, plan.index):
                break
        video = torch.cat(([self.head_latent] if self.head_latent is not None else []) + generated, dim=2)
        heat = heat[:video.shape[2]]                 # a video ended early: its frames only
        self.heat = heat.reshape(heat.shape[0], *fam.token_grid(self.lat_h, self.lat_w)) if report["cache"] else None
        return video
