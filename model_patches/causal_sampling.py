"""Few-step causal Wan (Self-Forcing, CausVid, Causal Forcing, LongLive 1.0, Krea Realtime), chunk by chunk.

The schedule is cache_core.causal_schedule's: each chunk of `chunk_frames` latent frames walks
the model's short timestep list (x0 predicted, re-noised to the next timestep), then one pass
over the clean chunk at `context_noise` writes the K/V that later chunks attend to. The model is
ComfyUI's own WanModel, run through the Wan chunk adapter (model_patches/wan.py) with its
self-attention going to the one K/V store (cache_core/kv_store.py): one store per run, one branch
per guidance branch (cfg > 1: the negative prompt keeps its own K/V), a rolling window behind a
sink when the schedule bounds attention, RoPE at the chunk's absolute frame position (K/V are
stored rotated, as upstream does).

Upstream's loop (guandeh17/Self-Forcing @33593df, pipeline/causal_inference.py:134-244): noise
for every generated frame drawn first as [B, F, C, H, W]; prefix chunks (i2v, continuation) run
once at timestep 0 into the K/V; per chunk and step a per-frame timestep [B, F], x0 = x - sigma
flow in float64, re-noising (1 - sigma) x0 + sigma eps with eps drawn as [F, C, H, W] after every
step but the last; the clean chunk at context_noise; nothing drawn for it. LongLive's prompt
switch (NVlabs/LongLive v1.0, pipeline/interactive_causal_inference.py:34-96): the kept chunks'
K/V recomputed under the new prompt at context_noise, attending to the sink and to each other.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management

from ..cache_core.causal_schedule import CausalSchedule
from ..cache_core.errors import InputError
from ..cache_core.frame_solver import UniPCFrameSolver
from ..cache_core.kv_store import ChunkLayout, KVStore
from . import wan
from .video_run import ChunkPlan, VideoRun, check_start

COND, UNCOND = 0, 1                       # K/V store branches: the guidance passes


def text_states(conditioning, name: str, width: int) -> torch.Tensor:
    """The text encoder states [1, L, width] of a CONDITIONING, or a named error."""
    try:
        states = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise InputError(name, "is not a CONDITIONING") from None
    if not torch.is_tensor(states) or states.ndim != 3 or states.shape[-1] != width:
        shape = tuple(states.shape) if torch.is_tensor(states) else type(states).__name__
        raise InputError(name, f"holds text states {shape}; this Wan model takes [1, tokens, {width}]: encode the "
                         "prompt with CLIPTextEncode and the umt5-xxl text encoder loaded as type wan")
    return states[:1]


class FrameAttention:
    """Self-attention of one pass over latent frames [f0, f1): each frame writes its K/V into its slot
    of the store (the store holds frames: a window and a sink count frames, as upstream's token
    buffer does), then the pass attends to everything held from `first` up to its last frame (the
    sink, the window, and all of its own frames: no mask among them)."""

    def __init__(self, store: KVStore, branch: int, frames: range, first: int):
        self.store, self.branch, self.frames, self.first = store, branch, frames, first
        self.key_len = None

    def __call__(self, layer: int, q, k, v, heads: int, attend):
        n = self.store.layout.chunk_tokens[0]
        for i, f in enumerate(self.frames):
            self.store.write(self.branch, layer, f, k[:, i * n:(i + 1) * n], v[:, i * n:(i + 1) * n])
        k, v = self.store.visible(self.branch, layer, self.frames[-1], self.first)
        if layer == 0:
            self.key_len = k.shape[1]
        return attend(q, k, v)


class CausalRun(VideoRun):
    """A few-step causal Wan video (see the module docstring); each chunk is emitted the moment its
    last step is done, before its K/V pass."""

    schedule = CausalSchedule

    @staticmethod
    def validate(width, height, length, schedule, vae, start_image, prefix_latent, end_image, family) -> None:
        if (length - 1) % 4:
            raise InputError("length", f"{length}: Wan videos have 4k+1 frames (e.g. 81, 129)")
        if end_image is not None:
            raise InputError("end_image", "is not supported with causal Wan models (they generate forward only); "
                             "disconnect it")
        check_start(family, vae, width, height, {"start_image": start_image}, prefix_latent,
                    "connect the model's Wan VAE to the sampler's vae input")
        schedule.check_length(*CausalRun.frames_to_generate(length, schedule, start_image is not None))

    @staticmethod
    def frames_to_generate(length: int, schedule, start_image: bool) -> tuple[int, int]:
        """(latent frames to generate, latent frames of `length` that are given): a start image written
        into the K/V first is the video's first latent frame; a clamped one is frame 0 of the first
        chunk; a video to continue comes on top of `length`."""
        frames = (length - 1) // 4 + 1
        return (frames - 1, 1) if start_image and schedule.first_frame == "own_chunk" else (frames, 0)

    def __init__(self, model, req, family, dm, on_window=None, sink=None, t_start=None):
        super().__init__(model, req, family, dm, on_window, sink, t_start)
        self.refuse_foreign_wrappers()
        sch: CausalSchedule = req.schedule
        width = dm.text_embedding[0].weight.shape[1]
        self.texts = [text_states(p, "positive" if i == 0 else "prompt_schedule", width)
                      for i, p in enumerate(req.positives)]
        self.slot_texts = [] if req.steering is None else [text_states(p, "live", width) for p in req.steering.slots]
        self.negative = text_states(req.negative, "negative", width) if req.cfg != 1.0 else None
        stride = family.spatial_stride
        self.lat_h, self.lat_w = req.height // stride, req.width // stride
        self.prefix = None                                  # raw latents written into the K/V before generating
        self.image = None                                   # raw latent the first chunk's frame 0 is held to
        generated, _ = self.frames_to_generate(req.length, sch, req.start_image is not None)
        sch.check_length(generated)
        if req.start_image is not None and sch.first_frame == "clamped":
            self.image = self.encode_image(req.start_image)
        elif req.start_image is not None:
            self.prefix = self.encode_image(req.start_image)
        elif req.prefix_latent is not None:
            self.prefix = req.prefix_latent.float()
        P = 0 if self.prefix is None else int(self.prefix.shape[2])
        b = sch.chunk_frames
        # the prefix in chunks too: a remainder first (one image frame = upstream's independent first frame)
        self.prefix_chunks = ([P % b] if P % b else []) + [b] * (P // b)
        self.P, self.T = P, P + generated
        self.plans = [ChunkPlan(i) for i in range(generated // b)]
        self.branches = (COND,) if req.cfg == 1.0 else (COND, UNCOND)
        self.keep, self.sink_frames = sch.window()          # the K/V store's bound, in latent frames
        self.timesteps, self.sigmas = sch.plan()
        self.steps = len(self.timesteps)
        self.calls_per_segment = [self.call_index(len(self.plans), -1)]
        self.anchor_latent = self.anchor_image_latent()
        if sch.switch == "recache" and not sch.attention_frames and (len(req.positives) > 1 or req.steering):
            logging.warning("ARCache: a prompt switch with re-cache and no window recomputes every frame made so far "
                            "in one pass (memory grows with the video); set the Causal Schedule's attention_frames "
                            "(LongLive: 12) or switch keep")
        if not wan.causal_origin(model.model):
            logging.warning("ARCache: the Causal Schedule runs this Wan model chunk by chunk, but nothing in how it was "
                            "loaded says it was trained that way (a Self-Forcing / LongLive file through Causal Wan "
                            "Loader, or core's causal_ar metadata); a bidirectional Wan makes noise-like chunks")

    def sharded(self) -> tuple[int, int, str]:
        b = self.req.schedule.chunk_frames
        heads, what = self.family.shard_heads(self.dm)
        return heads, self.family.tokens_per_frame(self.lat_h, self.lat_w) * min(b, *(self.prefix_chunks or [b])), what

    def call_index(self, chunk: int, step: int) -> int:
        """The planned model call of a generated chunk's step (-1: its K/V pass before it): the prefix's
        passes, then per chunk its steps and a K/V pass (none after the last chunk). Progress counts
        these; a re-cache pass is extra."""
        return len(self.prefix_chunks) + chunk * (self.steps + 1) + step

    def report_fields(self) -> dict:
        sch = self.req.schedule
        return dict(model="causal Wan", causal_weights=wan.causal_origin(self.model.model) or "unknown",
                    chunk_frames=sch.chunk_frames, solver=sch.solver, timesteps=self.timesteps, recache_passes=0,
                    attention_frames=sch.attention_frames or "all", sink_frames=sch.sink_frames)

    def _generate(self, report, on_call) -> torch.Tensor:
        return self.outer_wrapped(self._sample, report, on_call)

    # -- one model call -----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, t, frames: range, text, branch: int, head: bool = True):
        """The model on latent frames `frames` (model space, [1, C, n, h, w]) at timestep t (one for
        all frames, or one per frame), their K/V written into the store's branch: the flow
        prediction (None without the head)."""
        adapter, dtype = self.adapter, self.dtype
        n = len(frames)
        first = 0 if self.sink_frames or self.keep is None else max(0, frames[-1] - self.keep)
        attention = FrameAttention(self.store, branch, frames, first)
        timestep = torch.as_tensor(t, dtype=torch.float32).to(x.device).expand(1, n)
        call = adapter.embed(x.to(dtype), timestep, text.to(x.device, dtype), self.options)
        call.extra["frame_offset"] = frames[0]
        h = self.sp.run_blocks(adapter, call, slice(0, 1), (0, n), call.tokens, attention)
        f = self.flops.chunk_causal((call.tokens.shape[1],), [0], {0: attention.key_len}, frames=n)
        self.data["transformer_flops"] += f
        self.data["transformer_flops_vanilla"] += f
        if not head:
            return None
        out = adapter.head(call, h)
        return adapter.finish(call, out).float()

    def _pass(self, x, t, frames: range, texts: dict, head=True, branches=None):
        """Frames `frames` at timestep t in every guidance branch (or `branches`), each with its text
        (one model call): the guided flow."""
        flows = {branch: self._forward(x, t, frames, texts[branch], branch, head)
                 for branch in branches or self.branches}
        self.data["model_calls"] += 1
        if not head:
            return None
        if len(flows) == 1:
            return flows[COND]
        return flows[UNCOND] + self.req.cfg * (flows[COND] - flows[UNCOND])

    def _recache(self, x_model, upto: int, texts: dict, device) -> None:
        """LongLive's re-cache at a prompt switch before frame `upto`: the K/V of the frames held (those
        after the sink, once the window has dropped a frame behind it) recomputed at context_noise under
        the new prompt, in one pass where they attend to the sink and to each other."""
        pinned = set(self.store.sink_chunks(COND))       # a pinned sink keeps its K/V (LongLive's global sink)
        held = [f for f in self.store.chunks(COND) if f not in pinned and f < upto]
        if not held:
            return
        frames = range(held[0], held[-1] + 1)         # the negative's prompt did not change: its K/V stay
        self._pass(x_model[:, :, frames.start:frames.stop].to(device), self.req.schedule.context_noise, frames, texts,
                   head=False, branches=(COND,))
        self.data["recache_passes"] += 1

    # -- the run ------------------------------------------------------------------------------------------
    def _sample(self, report, on_call) -> torch.Tensor:
        req, sch = self.req, self.req.schedule
        self.data = data = report.data
        fmt = self.model.model.latent_format
        dm = self.dm
        tpf = self.family.tokens_per_frame(self.lat_h, self.lat_w)
        self.layout = ChunkLayout((tpf,) * self.T)            # the store holds frames
        b = sch.chunk_frames
        mem = 16 * b * tpf * (dm.dim + dm.ffn_dim) * (2 if len(self.branches) > 1 else 1)
        comfy.model_management.load_models_gpu([self.model], memory_required=mem)
        device = self.model.load_device
        self.dtype = self.model.model.manual_cast_dtype or self.model.model.get_dtype()
        self.adapter = self.family.chunk_adapter(self.model.model.diffusion_model)
        self.flops = self.adapter.flops
        self.options = self.model.model_options["transformer_options"]
        self.store = store = KVStore(self.layout, num_layers=self.adapter.num_layers, keep=self.keep,
                                     sink=self.sink_frames, reserve=self.T if self.keep is None else
                                     min(self.T, self.keep + 1 + self.sink_frames))
        C, P, T = fmt.latent_channels, self.P, self.T
        gen = torch.Generator().manual_seed(req.seed)
        # upstream's order: all noise first, frame-major [B, F, C, H, W]; then re-noising draws per step
        noise = torch.randn((1, T - P, C, self.lat_h, self.lat_w), generator=gen).movedim(1, 2)
        x = torch.zeros((1, C, T, self.lat_h, self.lat_w))     # the video, model space, in CPU memory
        texts = {COND: self.texts[0], UNCOND: self.negative}   # per guidance branch, for the next pass
        kv_prompt = None                               # the prompt the held K/V were written under
        if P:
            x[:, :, :P] = fmt.process_in(self.prefix)
            self.show_head(self.prefix.cpu(), shown=req.start_image is not None)
            kv_prompt = req.positives[0]
            f0 = 0
            for n in self.prefix_chunks:
                self.check_interrupt()
                self._pass(x[:, :, f0:f0 + n].to(device), 0.0, range(f0, f0 + n), texts, head=False)
                f0 += n
        timesteps, sigmas = self.timesteps, self.sigmas
        image = None if self.image is None else fmt.process_in(self.image).to(device)
        end = T
        for k, plan in enumerate(self.plans):
            f0 = P + k * b
            prompt = req.positives[min(k, len(req.positives) - 1)]
            text = self.texts[min(k, len(self.texts) - 1)]
            if req.steering is not None:
                req.steering.at_boundary(data["model_calls"], k)
                if req.steering.active is not None:
                    prompt, text = req.steering.slots[req.steering.active], self.slot_texts[req.steering.active]
            texts[COND] = text
            if kv_prompt is not None and prompt is not kv_prompt and sch.switch == "recache":
                self._recache(x, f0, texts, device)
            kv_prompt = prompt
            xt = noise[:, :, f0 - P:f0 - P + b].to(device)
            clamp = image is not None and k == 0       # LongLive 2.0's i2v: frame 0 held to the image at t = 0
            solver = UniPCFrameSolver(sigmas, b) if sch.solver == "unipc" else None   # fresh per chunk
            for i, t in enumerate(timesteps):
                self.check_interrupt()
                if clamp:
                    xt[:, :, :1] = image
                flow = self._pass(xt, [0.0] + [t] * (b - 1) if clamp else t, range(f0, f0 + b), texts)
                x0 = (xt.double() - sigmas[i].double() * flow.double()).float()
                if on_call is not None:        # progress counts the planned calls (a re-cache pass is extra)
                    on_call(self.call_index(k, i), x0, xt)
                if solver is not None:         # the last step lands on sigma 0: x0
                    xt = solver.step(xt, x0, [i] * b, [True] * b)
                elif i + 1 < len(timesteps):
                    eps = torch.randn((b, C, self.lat_h, self.lat_w), generator=gen).movedim(0, 1)[None].to(device)
                    xt = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * eps
            self.check_finite(x0, k)
            if self.anchoring:
                x0 = fmt.process_in(self.anchored(fmt.process_out(x0), k, self.anchor_latent)).to(x0.dtype)
            if clamp:                                  # after the anchor: the given frame stays as given
                x0[:, :, :1] = image
            x[:, :, f0:f0 + b] = x0.cpu()
            raw = fmt.process_out(x0).cpu()
            if clamp:
                raw[:, :, :1] = self.image.cpu()       # the given frame exactly (the LATENT has it so too)
            self.emit(raw, data, k, data["model_calls"])
            self.piece_done(k)
            if k + 1 == len(self.plans):
                break                         # nothing attends to the last chunk: no K/V pass (upstream runs one)
            if self.finish_here(data["model_calls"], k):
                end = f0 + b
                break
            self._pass(x0, sch.context_noise, range(f0, f0 + b), texts, head=False)
        video = fmt.process_out(x[:, :, :end].float()).cpu()
        if P:
            video[:, :, :P] = self.prefix.cpu()
        if self.image is not None:                   # the given frame exactly, as a prefix is
            video[:, :, :1] = self.image.cpu()
        data["pixel_frames"] = self.family.pixel_frames(int(video.shape[2]))
        data["kv_frames_held"] = len(store.chunks(COND))
        data["kv_bytes_peak"] = store.peak_bytes
        data["kv_cache_bytes"] = store.bytes_allocated()
        return video
