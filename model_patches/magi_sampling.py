"""MAGI-1's chunk-wise AR sampling (specs/magi1.md section 3), streamed chunk by chunk.

Every forward step denoises the window's chunks at staggered noise levels with one Euler
step each. Guidance per chunk: base models run up to three passes (text + history, history
only, each chunk alone), v = C + s_h (B - C) + s_t (A - B); a pass whose weight is zero for
every chunk of the step is not run (its result would be multiplied by 0). Distilled models run
one pass with the step-size embedding, plus a history-free copy of a nearly clean oldest chunk.
When a chunk leaves the window, the next step re-runs it at clean_t into the K/V cache
(the pass that writes: the history-only pass, or the single distilled pass).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.utils

from ..cache_core import flops as flop_count
from ..cache_core.errors import InputError
from ..cache_core.magi_schedule import (MagiSchedule, cached_chunks_needed, distill_dt, first_key_chunk, latent_length,
                                        plan_steps, time_grid)
from ..cache_core.run_report import REPORT_KEY, RunReport
from . import families
from .ar_cache import SPEC_KEY
from .magi_cache import ALONE, HISTORY, TEXT, MagiCacheRun
from .magi_model import ChunkCall, KVCache
from .magi_text import SPECIAL_KEY, chunk_text


@dataclass(frozen=True)
class ChunkPlan:
    index: int                    # generated chunk number (0 = first emitted)


def magi_conditioning(positive, name: str = "positive") -> tuple[torch.Tensor, dict]:
    """(caption rows [n, C], special tokens) from MAGI-1 Text Encode's CONDITIONING."""
    try:
        cond, extra = positive[0][0], positive[0][1]
    except (TypeError, IndexError, KeyError):
        raise InputError(name, "is not a CONDITIONING") from None
    if SPECIAL_KEY not in extra:
        raise InputError(name, "comes without MAGI-1's special tokens: encode the prompt with MAGI-1 Text Encode "
                         "(ARCacheMagiTextEncode), not CLIPTextEncode")
    return cond[0].float(), extra[SPECIAL_KEY]


def resize_exact(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Upstream's i2v resize: to width x height without keeping the aspect ratio."""
    return comfy.utils.common_upscale(image[:1].movedim(-1, 1), width, height, "bilinear", "disabled").movedim(1, -1)


class MagiRun:
    """One MAGI-1 run: the same interface as streaming.StreamingRun (plans, total_rows, run, heat)."""

    def __init__(self, model, req, on_window=None, sink=None):
        self.req, self.on_window, self.sink = req, on_window, sink
        self.family, self.dm = families.detect(model)
        sch: MagiSchedule = req.schedule
        if not isinstance(sch, MagiSchedule) or self.family.sampler_kind != "magi":
            raise families.ModelFamilyError(f"{self.family.title} models take a {self.family.sampler_kind} schedule, "
                                            f"not {type(sch).__name__}")
        self.model = model.clone()
        cfg = self.dm.config
        self.distill = model.model.magi_distill if sch.distill == "auto" else sch.distill == "on"
        self.captions = [magi_conditioning(p, "positive" if i == 0 else "prompt_schedule") for i, p in
                         enumerate(req.positives)]
        for caption, special in self.captions:
            if caption.shape[-1] != cfg.caption_channels:
                raise InputError("positive", f"text states are {caption.shape[-1]} wide; this MAGI-1 model takes "
                                 f"{cfg.caption_channels}-wide T5-XXL states")
        self.steps, cw = req.steps, sch.chunk_width
        if self.steps % 4 or self.steps % sch.window_size:
            raise InputError("steps", f"{self.steps}: MAGI-1 needs a multiple of 4 and of the schedule's "
                             f"window_size={sch.window_size} (e.g. 16, 32, 64)")
        if sch.kv_range and self.steps % len(sch.kv_range):
            raise InputError("steps", f"{self.steps} is not divisible by the {len(sch.kv_range)} kv_range entries")
        self.lat_h, self.lat_w = req.height // 8, req.width // 8
        self.prefix = None                                      # raw latents the run continues from
        if req.start_image is not None:
            self.prefix = req.vae.encode(resize_exact(req.start_image, req.width, req.height)[..., :3]).float()[:, :, :1]
        elif req.prefix_latent is not None:
            self.prefix = req.prefix_latent.float()
        P = 0 if self.prefix is None else self.prefix.shape[2]
        self.T = latent_length(req.length, P, cw)
        self.num_chunks, self.prefix_chunks = self.T // cw, P // cw
        self.plan = plan_steps(self.num_chunks, self.prefix_chunks, sch.window_size, self.steps)
        self.plans = [ChunkPlan(i) for i in range(self.num_chunks - self.prefix_chunks)]
        self.heat = None
        self._texts: dict = {}

    @property
    def total_rows(self) -> int:
        return len(self.plan)

    def text_for(self, chunk: int) -> torch.Tensor:
        """A generated chunk's text (fixed for the run: built once, asked for every forward)."""
        if chunk not in self._texts:
            k = chunk - self.prefix_chunks                       # generated chunk number
            caption, special = self.captions[min(k, len(self.captions) - 1)]
            self._texts[chunk] = chunk_text(caption, special, len(self.plans) - 1 - k,
                                            self.dm.config.caption_max_length)
        return self._texts[chunk]

    @torch.no_grad()
    def run(self, on_row=None) -> tuple[torch.Tensor, dict]:
        req, sch, cfg = self.req, self.req.schedule, self.dm.config
        t0 = time.perf_counter()
        report = RunReport(windows=len(self.plans), model_calls=0, rows=[len(self.plan)], steps=self.steps,
                           latent_frames=0, first_window_seconds=None, transformer_flops=0.0,
                           transformer_flops_vanilla=0.0, cache=None, model="MAGI-1 " + cfg.size_name,
                           distill=self.distill, passes_run={"text": 0, "history": 0, "alone": 0, "refresh_only": 0})
        data = report.data
        self.model.model_options["transformer_options"][REPORT_KEY] = report
        cw, S, fmt = sch.chunk_width, self.steps, self.model.model.latent_format
        tokens = cw * (self.lat_h // cfg.patch) * (self.lat_w // cfg.patch)
        # Working memory beyond the weights: a window's activations (fp32 residual temporaries, the MLP).
        mem = 12 * (sch.window_size + 2) * tokens * (cfg.hidden + cfg.ffn * (2 if cfg.gated else 1))
        comfy.model_management.load_models_gpu([self.model], memory_required=mem)
        dm, device = self.model.model.diffusion_model, self.model.load_device
        dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()
        gen = torch.Generator().manual_seed(req.seed)
        x = torch.randn((1, cfg.latent_channels, self.T, self.lat_h, self.lat_w), generator=gen).to(device)
        prefix = None if self.prefix is None else fmt.process_in(self.prefix).to(device)
        P = 0 if prefix is None else prefix.shape[2]
        grid = time_grid(S, sch.shift).tolist()
        cache = KVCache(cfg.num_layers, keep=cached_chunks_needed(self.plan, S, sch.kv_range), offload=sch.kv_on_cpu)
        null = dm.null_text(device)
        topts = self.model.model_options["transformer_options"]
        base = not self.distill
        shape = cfg.flop_shape()

        spec = topts.get(SPEC_KEY)
        cached = None if spec is None else MagiCacheRun(
            spec, dm, self.plan, S, sch.kv_range, sch.kv_on_cpu, shape, (self.lat_h // cfg.patch, self.lat_w // cfg.patch),
            cw, self.T)

        def call_flops(call: ChunkCall, kv=None) -> float:
            lq = tokens if call.tokens is None else int(call.tokens.numel())
            keys = [(kv.key_tokens(call.first[i], call.start + i, tokens) if kv is not None
                     else (call.start + i - call.first[i] + 1) * tokens) for i in range(len(call.t))]
            return float(sum(flop_count.magi_chunk_flops(shape, lq, lk, len(tx)) for lk, tx in zip(keys, call.texts)))

        def forward(x_in, call: ChunkCall, kv=cache):
            f = call_flops(call, kv)                  # before the call: its writes do not change its own keys
            out = dm.forward_chunks(x_in.to(dtype), call, kv, transformer_options=topts).float()
            data["transformer_flops"] += f
            if cached is None:
                data["transformer_flops_vanilla"] += f
            data["model_calls"] += 1
            return out

        def vanilla_flops(x_in, call: ChunkCall, kv=None):   # what the uncached run would spend
            data["transformer_flops_vanilla"] += call_flops(call)
            return torch.zeros_like(x_in)

        if P:
            x[:, :, :P] = prefix                # the given frames stay as given all run long
        dt0 = distill_dt(S, 0) if self.distill else None
        if self.prefix_chunks:      # whole prefix chunks go straight into the K/V cache, clean and self-only
            n = self.prefix_chunks
            call = ChunkCall(start=0, t=[sch.clean_t] * n, texts=[null] * n, first=list(range(n)), null_row=base,
                             write=tuple(range(n)), dt=dt0)
            if cached is None:
                forward(prefix[:, :, :n * cw], call)
            else:
                cached.write_prefix(forward, prefix, n, sch.clean_t, null, base, dt0)
                vanilla_flops(prefix[:, :, :n * cw], call)
        for step in self.plan:
            comfy.model_management.throw_exception_if_processing_interrupted()
            v = self._vanilla_step(step, x, grid, null, forward if cached is None else vanilla_flops, data)
            if cached is not None:
                v = self._cached_step(step, x, grid, null, forward, cached)
            t_call = [grid[j] for j in step.step_of]
            a = step.start * cw
            x_in = x[:, :, a: step.end * cw]
            dts = torch.tensor([grid[j + 1] - grid[j] for j in step.step_of], dtype=torch.float32, device=device)
            ts = torch.tensor(t_call, dtype=torch.float32, device=device)
            xs = x_in.clone()
            new = xs + v * dts.repeat_interleave(cw).view(1, 1, -1, 1, 1)
            x[:, :, step.start * cw: step.end * cw] = new
            if P > step.start * cw:   # the given frames stay exactly as given (upstream leaves them one Euler step off)
                x[:, :, step.start * cw:P] = prefix[:, :, step.start * cw:P]
            if on_row is not None:
                x0 = xs + v * (1 - ts).repeat_interleave(cw).view(1, 1, -1, 1, 1)
                preview = x.clone()
                preview[:, :, step.start * cw: step.end * cw] = x0
                on_row(step.index, preview, x)
            if step.finished is not None:
                if cached is not None:
                    cached.chunk_finished(step.finished)
                self._emit(fmt, x, step.finished, P, data, t0)
        video = self._assemble(fmt.process_out(x.float()).cpu(), P)
        if cached is not None:
            data["cache"] = cached.summary(getattr(cached.policy, "method", "ar_cache"))
            data["cache"]["flops_saved_skipping"] = data["transformer_flops_vanilla"] - data["transformer_flops"]
            self.heat = cached.heat.reshape(self.T, self.lat_h // cfg.patch, self.lat_w // cfg.patch)
        data["latent_frames"] = int(video.shape[2])
        data["pixel_frames"] = 4 * int(video.shape[2])
        data["kv_cache_chunks"] = cache.chunks()
        data["kv_cache_bytes"] = cache.nbytes()
        data["seconds"] = time.perf_counter() - t0
        self.model.model_options["transformer_options"].pop(REPORT_KEY, None)
        return video, data

    def _vanilla_step(self, step, x, grid, null, forward, data) -> torch.Tensor:
        """Velocity of the window's active chunks at one forward step, as upstream computes it."""
        req, sch, S = self.req, self.req.schedule, self.steps
        cw, P = sch.chunk_width, 0 if self.prefix is None else self.prefix.shape[2]
        lo = step.start if step.refresh is None else step.refresh
        x_in = x[:, :, lo * cw: step.end * cw]
        t_call = ([sch.clean_t] if step.refresh is not None else []) + [grid[j] for j in step.step_of]
        steps_call = ([S] if step.refresh is not None else []) + list(step.step_of)
        for i in range(max(0, (P - lo * cw) // cw)):      # chunks wholly given by the prefix are clean
            t_call[i] = 1.0
        chunks = list(range(lo, step.end))
        first = [first_key_chunk(c, j, S, sch.kv_range) for c, j in zip(chunks, steps_call)]
        write = (step.refresh,) if step.refresh is not None else ()
        off = 1 if step.refresh is not None else 0
        a = off * cw                                          # active chunks' first frame in x_in
        cond_texts = [null if c == step.refresh else self.text_for(c) for c in chunks]
        if self.distill:
            dt = distill_dt(S, step.inner)
            v = forward(x_in, ChunkCall(lo, t_call, cond_texts, first, write=write, dt=dt))[:, :, a:]
            if t_call[off] > sch.nearly_clean_threshold:      # oldest active chunk, alone, mixed in
                alone = forward(x_in[:, :, a:a + cw], ChunkCall(step.start, t_call[off:off + 1],
                                                                cond_texts[off:off + 1], [step.start], dt=dt))
                w = sch.nearly_clean_weight
                v[:, :, :cw] = w * v[:, :, :cw] + (1 - w) * alone
            return v
        scales = [sch.scales(t, req.cfg) for t in t_call[off:]]
        need_a, need_b, need_c = passes_needed(scales)
        zero = torch.zeros_like(x_in[:, :, a:])
        A = forward(x_in, ChunkCall(lo, t_call, cond_texts, first))[:, :, a:] if need_a else zero
        if need_b:
            B = forward(x_in, ChunkCall(lo, t_call, [null] * len(chunks), first, null_row=True, write=write))[:, :, a:]
        else:
            B = zero
            if write:       # the clean re-run is still due: it attends to itself only
                forward(x_in[:, :, :cw], ChunkCall(lo, t_call[:1], [null], first[:1], null_row=True, write=write))
                data["passes_run"]["refresh_only"] += 1
        n = len(step.step_of)
        C = forward(x_in[:, :, a:], ChunkCall(step.start, t_call[off:], [null] * n, list(range(step.start, step.end)),
                                              null_row=True)) if need_c else zero
        for name, ran in (("text", need_a), ("history", need_b), ("alone", need_c)):
            data["passes_run"][name] += int(ran)
        return guided(scales, A, B, C, cw)

    def _cached_step(self, step, x, grid, null, forward, cached) -> torch.Tensor:
        """The same step chunk by chunk under the cache's policy (no clean re-run, as the references)."""
        sch, S = self.req.schedule, self.steps
        ts = [grid[j] for j in step.step_of]
        items = list(zip(step.chunks, step.step_of, ts))
        if self.distill:
            dt = distill_dt(S, step.inner)
            return torch.cat([cached.chunk_velocity(forward, TEXT, x, c, j, t, self.text_for(c), False, dt)
                              for c, j, t in items], dim=2)
        scales = [sch.scales(t, self.req.cfg) for t in ts]
        need = dict(zip((TEXT, HISTORY, ALONE), passes_needed(scales)))
        out = {}
        for branch, ran in need.items():
            if ran:
                out[branch] = [cached.chunk_velocity(forward, branch, x, c, j, t,
                                                     self.text_for(c) if branch == TEXT else null, branch != TEXT,
                                                     None, alone=branch == ALONE) for c, j, t in items]
        zero = torch.zeros_like(x[:, :, :len(items) * sch.chunk_width])
        A, B, C = (torch.cat(out[b], dim=2) if b in out else zero for b in (TEXT, HISTORY, ALONE))
        return guided(scales, A, B, C, sch.chunk_width)

    def _emit(self, fmt, x, chunk, P, data, t0):
        k = chunk - self.prefix_chunks
        cw = self.req.schedule.chunk_width
        if k == 0:
            data["first_window_seconds"] = time.perf_counter() - t0
        if self.req.vae is not None and self.sink is not None:
            lo = max(chunk * cw, P) if self.req.start_image is None else chunk * cw
            latent = fmt.process_out(x[:, :, lo:(chunk + 1) * cw].float()).cpu()
            if latent.shape[2]:
                frames = self.req.vae.decode(latent)
                self.sink(frames.reshape(-1, *frames.shape[-3:]).float().cpu(), k)
        if self.on_window is not None:
            self.on_window(self.plans[k], len(self.plans))

    def _assemble(self, video: torch.Tensor, P: int) -> torch.Tensor:
        """The output: a continued video's prefix as given, then every generated frame; image-to-video
        starts with chunk 0 including the image's frame (as upstream emits it)."""
        if self.req.start_image is not None or not P:
            return video
        return torch.cat([self.prefix.cpu(), video[:, :, P:]], dim=2)


def passes_needed(scales) -> tuple[bool, bool, bool]:
    """Which guidance passes a step needs: a pass whose weight is 0 for every chunk is not run."""
    return (any(s_t != 0 for _, s_t in scales), any(s_h != s_t for s_h, s_t in scales),
            any(s_h != 1 for s_h, _ in scales))


def guided(scales, A, B, C, cw) -> torch.Tensor:
    """Per chunk: v = (1 - s_h) C + (s_h - s_t) B + s_t A (upstream's 3-pass guidance)."""
    return torch.cat([(1 - s_h) * C[:, :, i * cw:(i + 1) * cw] + (s_h - s_t) * B[:, :, i * cw:(i + 1) * cw]
                      + s_t * A[:, :, i * cw:(i + 1) * cw] for i, (s_h, s_t) in enumerate(scales)], dim=2)
