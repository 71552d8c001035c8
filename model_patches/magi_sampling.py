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


import torch

import comfy.model_management

from ..cache_core import flops as flop_count
from ..cache_core.errors import InputError
from ..cache_core.magi_schedule import (MagiSchedule, cached_chunks_needed, distill_dt, first_key_chunk, latent_length,
                                        plan_steps, time_grid)
from ..cache_core.record import CACHE_RUN_KEY
from .magi_cache import ALONE, HISTORY, TEXT
from .magi_model import ChunkForward, kv_store
from .magi_text import SPECIAL_KEY, chunk_text
from .video_run import ChunkPlan, VideoRun, check_start


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


class MagiRun(VideoRun):
    """A MAGI-1 video: chunk by chunk at staggered noise levels (see the module docstring); each
    chunk is emitted the moment it is finished. With a cache node on the model, the cache's
    OUTER_SAMPLE wrapper makes the run's cache state (magi_cache.MagiCacheRun) and the chunk-wise
    steps go through its chunk step."""

    schedule = MagiSchedule
    image_crop = "disabled"             # upstream's i2v resize: to the video's size, aspect ratio not kept

    @staticmethod
    def validate(width, height, length, schedule, vae, start_image, prefix_latent, end_image, family) -> None:
        if length < 4:
            raise InputError("length", f"{length}: MAGI-1 makes 4 video frames per latent frame; ask for at least 4")
        if end_image is not None:
            raise InputError("end_image", "is not supported with MAGI-1 (it has no end-frame conditioning); "
                             "disconnect it")
        check_start(family, vae, width, height, {"start_image": start_image}, prefix_latent,
                    "connect the MAGI-1 VAE (MAGI-1 VAE Loader)")

    def __init__(self, model, req, family, dm, on_window=None, sink=None, t_start=None):
        super().__init__(model, req, family, dm, on_window, sink, t_start)
        self.refuse_foreign_wrappers()
        sch: MagiSchedule = req.schedule
        cfg = self.dm.config
        self.distill = model.model.magi_distill if sch.distill == "auto" else sch.distill == "on"
        self.captions = [magi_conditioning(p, "positive" if i == 0 else "prompt_schedule") for i, p in
                         enumerate(req.positives)]
        for i, (caption, special) in enumerate(self.captions):
            if caption.shape[-1] != cfg.caption_channels:
                raise InputError("positive" if i == 0 else "prompt_schedule", f"text states are {caption.shape[-1]} "
                                 f"wide; this MAGI-1 model takes {cfg.caption_channels}-wide T5-XXL states")
        self.steps, cw = req.steps, sch.chunk_width
        if self.steps % 4 or self.steps % sch.window_size:
            raise InputError("steps", f"{self.steps}: MAGI-1 needs a multiple of 4 and of the schedule's "
                             f"window_size={sch.window_size} (e.g. 16, 32, 64)")
        if sch.kv_range and self.steps % len(sch.kv_range):
            raise InputError("steps", f"{self.steps} is not divisible by the {len(sch.kv_range)} kv_range entries")
        stride = family.spatial_stride
        self.lat_h, self.lat_w = req.height // stride, req.width // stride
        self.grid = family.token_grid(self.lat_h, self.lat_w)
        self.prefix = None                                      # raw latents the run continues from
        if req.start_image is not None:
            self.prefix = self.encode_image(req.start_image)
        elif req.prefix_latent is not None:
            self.prefix = req.prefix_latent.float()
        P = 0 if self.prefix is None else self.prefix.shape[2]
        self.T = latent_length(req.length, P, cw)
        self.num_chunks, self.prefix_chunks = self.T // cw, P // cw
        self.plan = plan_steps(self.num_chunks, self.prefix_chunks, sch.window_size, self.steps)
        self.plans = [ChunkPlan(i) for i in range(self.num_chunks - self.prefix_chunks)]
        self.calls_per_segment = [len(self.plan)]
        self._texts: dict = {}
        self._step = 0                   # the forward step being run (where a steered switch is logged)
        self.slot_captions = [] if req.steering is None else [
            magi_conditioning(p, "live") for p in req.steering.slots]
        for caption, _ in self.slot_captions:
            if caption.shape[-1] != cfg.caption_channels:
                raise InputError("live", f"a prompt's text states are {caption.shape[-1]} wide; this MAGI-1 model "
                                 f"takes {cfg.caption_channels}-wide T5-XXL states (MAGI-1 Text Encode with T5-XXL)")
        self.anchor_latent = self.anchor_image_latent()

    def sharded(self) -> tuple[int, int, str]:
        heads, what = self.family.shard_heads(self.dm)
        return heads, self.req.schedule.chunk_width * self.grid[0] * self.grid[1], what

    def report_fields(self) -> dict:
        return dict(model="MAGI-1 " + self.dm.config.size_name, distill=self.distill,
                    passes_run={"text": 0, "history": 0, "alone": 0, "refresh_only": 0})

    def text_for(self, chunk: int) -> torch.Tensor:
        """A generated chunk's text, fixed when the chunk enters the window (built once, asked for
        every forward): the storyboard's, or the steered slot's from a switch at that step on."""
        if chunk not in self._texts:
            k = chunk - self.prefix_chunks                       # generated chunk number
            steering = self.req.steering
            if steering is not None:
                steering.at_boundary(self._step, k)
            caption, special = self.captions[min(k, len(self.captions) - 1)] if steering is None or \
                steering.active is None else self.slot_captions[steering.active]
            self._texts[chunk] = chunk_text(caption, special, len(self.plans) - 1 - k,
                                            self.dm.config.caption_max_length)
        return self._texts[chunk]

    def _generate(self, run_report, on_call) -> torch.Tensor:
        return self.outer_wrapped(self._sample, run_report, on_call)

    def _sample(self, run_report, on_call) -> torch.Tensor:
        req, sch, cfg = self.req, self.req.schedule, self.dm.config
        data = run_report.data
        cw, S, fmt = sch.chunk_width, self.steps, self.model.model.latent_format
        tokens = cw * self.grid[0] * self.grid[1]
        # Working memory beyond the weights: a window's activations (fp32 residual temporaries, the MLP).
        mem = 12 * (sch.window_size + 2) * tokens * (cfg.hidden + cfg.ffn * (2 if cfg.gated else 1))
        comfy.model_management.load_models_gpu([self.model], memory_required=mem)
        dm, device = self.model.model.diffusion_model, self.model.load_device
        dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()
        gen = torch.Generator().manual_seed(req.seed)
        x = torch.randn((1, cfg.latent_channels, self.T, self.lat_h, self.lat_w), generator=gen).to(device)
        prefix = None if self.prefix is None else fmt.process_in(self.prefix).to(device)
        P = 0 if prefix is None else prefix.shape[2]
        if P and req.start_image is None:     # the continued video opens the output, not shown again
            self.show_head(self.prefix.cpu(), shown=False)
        grid = time_grid(S, sch.shift).tolist()
        cache = kv_store(cfg, self.num_chunks, tokens, keep=cached_chunks_needed(self.plan, S, sch.kv_range),
                         offload=sch.kv_on_cpu)
        null = dm.null_text(device)
        base = not self.distill
        shape = self.family.flops(dm)
        cached = self.model.model_options["transformer_options"].get(CACHE_RUN_KEY)
        if cached is not None:
            cached.bind(dm, self.plan, S, sch.kv_range, sch.kv_on_cpu, self.grid, cw, self.T, dtype, self.sp.world)

        def call_flops(call: ChunkForward, kv=None) -> float:
            lq = tokens if call.tokens is None else int(call.tokens.numel())
            keys = [(kv.key_count(0, call.first[i], call.start + i) if kv is not None
                     else (call.start + i - call.first[i] + 1) * tokens) for i in range(len(call.t))]
            return float(sum(flop_count.magi_chunk_flops(shape, lq, lk, len(tx)) for lk, tx in zip(keys, call.texts)))

        def forward(x_in, call: ChunkForward, kv=cache):
            f = call_flops(call, kv)                  # before the call: its writes do not change its own keys
            out = dm.forward_chunks(x_in.to(dtype), call, kv, self.sp).float()
            data["transformer_flops"] += f
            if cached is None:
                data["transformer_flops_vanilla"] += f
            data["model_calls"] += 1
            return out

        def vanilla_flops(x_in, call: ChunkForward, kv=None):   # what the uncached run would spend
            data["transformer_flops_vanilla"] += call_flops(call)
            return torch.zeros_like(x_in)

        def count_cached(before, noskip=None):   # a cached step's FLOPs into the cache's counts
            spent = data["transformer_flops"] - before[0]
            vanilla = data["transformer_flops_vanilla"] - before[1]
            cached.step.add_flops(spent, spent if noskip is None else noskip, vanilla)

        if P:
            x[:, :, :P] = prefix                # the given frames stay as given all run long
        dt0 = distill_dt(S, 0) if self.distill else None
        if self.prefix_chunks:      # whole prefix chunks go straight into the K/V cache, clean and self-only
            n = self.prefix_chunks
            call = ChunkForward(start=0, t=[sch.clean_t] * n, texts=[null] * n, first=list(range(n)), null_row=base,
                                write=tuple(range(n)), dt=dt0)
            if cached is None:
                forward(prefix[:, :, :n * cw], call)
            else:
                before = (data["transformer_flops"], data["transformer_flops_vanilla"])
                cached.write_prefix(forward, prefix, n, sch.clean_t, null, base, dt0)
                vanilla_flops(prefix[:, :, :n * cw], call)
                count_cached(before)
        for step in self.plan:
            self.check_interrupt()
            self._step = step.index
            if cached is None:
                v = self._vanilla_step(step, x, grid, null, forward, data)
            else:
                before = (data["transformer_flops"], data["transformer_flops_vanilla"])
                self._vanilla_step(step, x, grid, null, vanilla_flops, data)      # what uncached would spend
                v, noskip = self._cached_step(step, x, grid, null, forward, call_flops, cached)
                count_cached(before, noskip)
                if self.sp.active:
                    self.sp.agree(cached.step.fingerprint(), f"forward step {step.index}'s cache decisions")
            t_call = [grid[j] for j in step.step_of]
            x_in = x[:, :, step.start * cw: step.end * cw]
            dts = torch.tensor([grid[j + 1] - grid[j] for j in step.step_of], dtype=torch.float32, device=device)
            ts = torch.tensor(t_call, dtype=torch.float32, device=device)
            xs = x_in.clone()
            new = xs + v * dts.repeat_interleave(cw).view(1, 1, -1, 1, 1)
            x[:, :, step.start * cw: step.end * cw] = new
            if P > step.start * cw:   # the given frames stay exactly as given (upstream leaves them one Euler step off)
                x[:, :, step.start * cw:P] = prefix[:, :, step.start * cw:P]
            if on_call is not None:
                x0 = xs + v * (1 - ts).repeat_interleave(cw).view(1, 1, -1, 1, 1)
                preview = x.clone()
                preview[:, :, step.start * cw: step.end * cw] = x0
                on_call(step.index, preview, x)
            if step.finished is not None:
                done = slice(step.finished * cw, (step.finished + 1) * cw)
                self.check_finite(x[:, :, done], step.finished - self.prefix_chunks)
                if self.anchoring:             # in raw latent space, before it is refreshed into the K/V and emitted
                    own = slice(max(done.start, P), done.stop)     # frames the user gave stay as given
                    raw = self.anchored(fmt.process_out(x[:, :, own].float()), step.finished - self.prefix_chunks,
                                        self.anchor_latent)
                    x[:, :, own] = fmt.process_in(raw).to(x.dtype)
                if cached is not None:
                    cached.chunk_finished(step.finished)
                self._emit_chunk(fmt, x, step.finished, P, data, step.index + 1)
                if step.finished + 1 < self.num_chunks and self.finish_here(step.index + 1,
                                                                           step.finished - self.prefix_chunks):
                    end = (step.finished + 1) * cw        # the chunks after it are not finished: dropped
                    break
        else:
            end = self.T
        video = self._assemble(fmt.process_out(x[:, :, :end].float()).cpu(), P)
        if cached is not None:
            data["cache"] = cached.summary()
            self.heat = cached.heat.reshape(self.T, *self.grid)[:end]
        data["pixel_frames"] = self.family.pixel_frames(int(video.shape[2]))
        data["kv_cache_chunks"] = cache.chunks()
        data["kv_cache_bytes"] = cache.bytes_allocated()
        data["kv_bytes_peak"] = cache.peak_bytes
        return video

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
            v = forward(x_in, ChunkForward(lo, t_call, cond_texts, first, write=write, dt=dt))[:, :, a:]
            if t_call[off] > sch.nearly_clean_threshold:      # oldest active chunk, alone, mixed in
                alone = forward(x_in[:, :, a:a + cw], ChunkForward(step.start, t_call[off:off + 1],
                                                                   cond_texts[off:off + 1], [step.start], dt=dt))
                w = sch.nearly_clean_weight
                v[:, :, :cw] = w * v[:, :, :cw] + (1 - w) * alone
            return v
        scales = [sch.scales(t, req.cfg) for t in t_call[off:]]
        need_a, need_b, need_c = passes_needed(scales)
        zero = torch.zeros_like(x_in[:, :, a:])
        A = forward(x_in, ChunkForward(lo, t_call, cond_texts, first))[:, :, a:] if need_a else zero
        if need_b:
            B = forward(x_in, ChunkForward(lo, t_call, [null] * len(chunks), first, null_row=True, write=write))[:, :, a:]
        else:
            B = zero
            if write:       # the clean re-run is still due: it attends to itself only
                forward(x_in[:, :, :cw], ChunkForward(lo, t_call[:1], [null], first[:1], null_row=True, write=write))
                data["passes_run"]["refresh_only"] += 1
        n = len(step.step_of)
        C = forward(x_in[:, :, a:], ChunkForward(step.start, t_call[off:], [null] * n,
                                                 list(range(step.start, step.end)), null_row=True)) if need_c else zero
        for name, ran in (("text", need_a), ("history", need_b), ("alone", need_c)):
            data["passes_run"][name] += int(ran)
        return guided(scales, A, B, C, cw)

    def _cached_step(self, step, x, grid, null, forward, flops, cached) -> tuple[torch.Tensor, float]:
        """The same step chunk by chunk under the cache's policy (no clean re-run, as the references):
        (velocity, the FLOPs of the step with nothing skipped)."""
        sch, S = self.req.schedule, self.steps
        ts = [grid[j] for j in step.step_of]
        items = list(zip(step.chunks, step.step_of, ts))
        last = step is self.plan[-1]
        noskip = 0.0

        def velocity(branch, c, j, t, text, null_row, dt, alone=False):
            nonlocal noskip
            first = c if alone else first_key_chunk(c, j, S, sch.kv_range)
            call = ChunkForward(c, [t], [text], [first], null_row=null_row, write=(c,), dt=dt, token_major=True)
            v, cost = cached.chunk_velocity(forward, flops, branch, x, c, j, call, last)
            noskip += cost
            return v

        if self.distill:
            dt = distill_dt(S, step.inner)
            return torch.cat([velocity(TEXT, c, j, t, self.text_for(c), False, dt) for c, j, t in items], dim=2), noskip
        scales = [sch.scales(t, self.req.cfg) for t in ts]
        need = dict(zip((TEXT, HISTORY, ALONE), passes_needed(scales)))
        out = {}
        for branch, ran in need.items():
            if ran:
                out[branch] = [velocity(branch, c, j, t, self.text_for(c) if branch == TEXT else null, branch != TEXT,
                                        None, alone=branch == ALONE) for c, j, t in items]
        zero = torch.zeros_like(x[:, :, :len(items) * sch.chunk_width])
        A, B, C = (torch.cat(out[b], dim=2) if b in out else zero for b in (TEXT, HISTORY, ALONE))
        return guided(scales, A, B, C, sch.chunk_width), noskip

    def _emit_chunk(self, fmt, x, chunk, P, data, calls):
        """Chunk `chunk` is final: its frames of the output video (see `_assemble`) are emitted."""
        cw = self.req.schedule.chunk_width
        lo = max(chunk * cw, P) if self.req.start_image is None else chunk * cw
        self.emit(fmt.process_out(x[:, :, lo:(chunk + 1) * cw].float()).cpu(), data, chunk - self.prefix_chunks, calls)
        self.piece_done(chunk - self.prefix_chunks)

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
