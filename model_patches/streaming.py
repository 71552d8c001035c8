"""Window-by-window long-video generation: history prefixes, decoding and streaming to disk."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers

from ..cache_core import flops as flop_count
from ..cache_core.df_schedule import DFSchedule, plan_windows
from ..cache_core.run_report import REPORT_KEY, RunReport
from . import families
from .ar_sampling import WindowJob, count_rows, df_window_sampler, template_sigmas

WINDOW_SAMPLERS = {DFSchedule: df_window_sampler}   # the sampler dispatches on the schedule type


@dataclass
class VideoRequest:
    width: int
    height: int
    length: int                        # pixel frames to generate (4k+1)
    seed: int
    steps: int
    cfg: float
    schedule: DFSchedule
    positives: list                    # per-window positive conditionings (last one repeats)
    negative: list
    vae: object = None
    start_image: torch.Tensor | None = None
    prefix_latent: torch.Tensor | None = None   # raw latent of a video to extend
    end_image: torch.Tensor | None = None


def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    return vae.encode(frames[..., :3]).to(comfy.model_management.intermediate_device(), torch.float32)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw latent [1,C,F,h,w] -> pixel frames [N,H,W,3] in 0..1."""
    img = vae.decode(latents)
    return img.reshape(-1, *img.shape[-3:]).float().cpu()


def resize_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    import comfy.utils
    return comfy.utils.common_upscale(image[:1].movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)


class StreamingRun:
    """One sampler run. `sink(frames, window_index)` receives decoded frames as windows finish.

    Callbacks must not refer back to the run: a cycle through it keeps its model clone alive
    until the cyclic collector runs, and ComfyUI then finds a loaded model whose patcher (and
    parent) died together, which it reports as a leak and answers with a full garbage collect
    on every later model load. `run(on_row=...)` takes the per-row callback for that reason.
    """

    def __init__(self, model, req: VideoRequest, on_window=None, sink=None):
        self.req, self.on_window, self.sink = req, on_window, sink
        self.family, self.dm = families.detect(model)
        fam, sch = self.family, req.schedule
        self.window_sampler = WINDOW_SAMPLERS.get(type(sch))
        if self.window_sampler is None or fam.sampler_kind != "df":
            raise families.wan.ModelFamilyError(f"{fam.title} models take a {fam.sampler_kind} schedule, "
                                                f"not {type(sch).__name__}")
        self.model = model.clone()
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
            img = resize_image(req.start_image, req.width, req.height)
            init_prefix = encode_frames(req.vae, img)[:, :, :1]
            self.head_latent = init_prefix
        elif req.prefix_latent is not None:
            self.head_latent = req.prefix_latent.float()
            init_prefix = self.head_latent[:, :, -self.overlap_lat:] if self.overlap_lat else None
            if init_prefix is not None and self.mode == "reencode_pixels":
                px = decode_latents(req.vae, self.head_latent)[-sch.overlap_frames:]
                init_prefix = encode_frames(req.vae, px)
        total_lat = fam.latent_frames(req.length)
        new_total = total_lat - (1 if req.start_image is not None else 0)
        self.init_prefix = init_prefix
        self.plans = plan_windows(new_total, self.window_lat, self.overlap_lat, sch.causal_block_size,
                                  initial_prefix=0 if init_prefix is None else init_prefix.shape[2])
        self.rows = count_rows(self.plans, self.steps, sch)
        self.end_latent = None
        if req.end_image is not None:
            self.end_latent = encode_frames(req.vae, resize_image(req.end_image, req.width, req.height))[:, :, :1]
        self.branches = fam.cfg_branches(req.cfg)

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @torch.no_grad()   # ComfyUI's executor already disables autograd; callers outside it must not grow graphs
    def run(self, on_row=None) -> tuple[torch.Tensor, dict]:
        """on_row(row, x0, x): called after every model call (previews, progress)."""
        req, sch = self.req, self.req.schedule
        t0 = time.perf_counter()
        run_report = RunReport(windows=len(self.plans), model_calls=0, rows=self.rows, steps=self.steps,
                               latent_frames=0, first_window_seconds=None, transformer_flops=0.0,
                               transformer_flops_vanilla=0.0, cache=None, **self.notes, prefix_mode=self.mode)
        report = run_report.data
        self.model.model_options["transformer_options"][REPORT_KEY] = run_report
        fam = self.family
        shape = fam.flop_shape(self.dm)
        tokens_per_frame = fam.tokens_per_frame(self.lat_h, self.lat_w)
        generated = []                    # raw latents of new frames, window by window
        head_len = 0 if self.head_latent is None else self.head_latent.shape[2]
        heat = torch.zeros(head_len + sum(p.new_frames for p in self.plans), tokens_per_frame)
        prefix = self.init_prefix
        rows_done = 0
        for plan, rows in zip(self.plans, self.rows):
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
            job = WindowJob(plan=plan, prefix_frames=P, gen_frames=G, tail_frames=T, schedule=sch,
                            steps=self.steps, seed=req.seed + plan.index, rows_done=rows_done,
                            on_row=on_row)
            guider = comfy.samplers.CFGGuider(self.model)
            guider.set_conds(positive, req.negative)
            guider.set_cfg(req.cfg)
            sampler = comfy.samplers.KSAMPLER(self.window_sampler, extra_options={"job": job})
            out = guider.sample(noise, latent, sampler, self.template.clone(), disable_pbar=True,
                                seed=req.seed + plan.index)
            out = out.to(comfy.model_management.intermediate_device(), torch.float32)
            rows_done += rows
            report["model_calls"] += job.calls
            report["transformer_flops_vanilla"] += job.calls * flop_count.window_flops(
                shape, F * tokens_per_frame, F, batch=self.branches)
            new = out[:, :, P:P + plan.new_frames]
            generated.append(new)
            window_heat = run_report.heat.pop(plan.index, None)   # where a cache spent compute
            if window_heat is not None:
                at = head_len + plan.start - P                     # the window's frame 0 in the video
                heat[at:at + P + plan.new_frames] += window_heat[:P + plan.new_frames]
            window_px = None
            if req.vae is not None and (self.sink is not None or self.mode == "reencode_pixels"):
                window_px = decode_latents(req.vae, out[:, :, :P + plan.new_frames])
                keep_from = fam.pixel_frames(P) if P and not (plan.index == 0 and req.start_image is not None) else 0
                if self.sink is not None:
                    self.sink(window_px[keep_from:], plan.index)
            if plan.index == 0:
                report["first_window_seconds"] = time.perf_counter() - t0
            if self.on_window is not None:
                self.on_window(plan, len(self.plans))
            # History for the next window: the tail of the video so far, as latents or re-encoded.
            if self.overlap_lat:
                if self.mode == "reencode_pixels" and window_px is not None:
                    prefix = encode_frames(req.vae, window_px[-sch.overlap_frames:])[:, :, :self.overlap_lat]
                else:
                    prefix = torch.cat(([self.head_latent] if self.head_latent is not None else []) + generated,
                                       dim=2)[:, :, -self.overlap_lat:]
        video = torch.cat(([self.head_latent] if self.head_latent is not None else []) + generated, dim=2)
        self.heat = heat.reshape(heat.shape[0], *fam.token_grid(self.lat_h, self.lat_w)) if report["cache"] else None
        report["latent_frames"] = int(video.shape[2])
        report["seconds"] = time.perf_counter() - t0
        self.model.model_options["transformer_options"].pop(REPORT_KEY, None)
        return video, report
