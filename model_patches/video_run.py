"""What every family's AR video run shares: the request, the report, emission and the cache run.

A family's run (`Family.run`: df_sampling.DFRun, magi_sampling.MagiRun) is a `VideoRun`: it
plans its pieces (DF windows, MAGI-1 chunks) from the request and the schedule, then `run()`
generates them. The base owns what does not depend on the family:
- the run report (one RunReport, one vocabulary, in transformer_options only while the run
  lasts, taken out in `finally`);
- emission: the output video's latents handed over in order the moment they are final (a DF
  async block at its last step, a MAGI-1 chunk), decoded once by the family's stream decoder
  (whose frames equal VAEDecode of the whole LATENT), handed to the sink (file, live view), and
  logged on one timeline with one set of definitions for every family (TTFF, frames/s, real-time
  factor, stall-free start-up delay);
- the cache's per-run state, created by the cache's OUTER_SAMPLE wrapper (ar_cache) around the
  run, so a family whose loop does not go through ComfyUI's CFGGuider still meets the cache
  only through its keyed wrappers;
- the compute heatmap, and the checks of a request's images and latents.
"""
from __future__ import annotations

import functools
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.utils

from ..cache_core.drift import DriftAnchor, DriftMeter, anchor_latent, latent_stats
from ..cache_core.errors import InputError, ModelFamilyError
from ..cache_core.record import CACHE_WRAPPER_KEY
from ..cache_core.run_report import RunReport
from ..cache_core.seq_parallel import SP_KEY, check_world, checksum, from_environment
from .vae_stream import PreviewStreamDecoder


@dataclass
class VideoRequest:
    width: int
    height: int
    length: int                        # pixel frames to generate
    seed: int
    steps: int
    cfg: float
    schedule: object                   # the family's schedule (DFSchedule, MagiSchedule)
    positives: list                    # per-window/chunk positive conditionings (last one repeats)
    negative: list
    vae: object = None
    start_image: torch.Tensor | None = None
    prefix_latent: torch.Tensor | None = None   # raw latent of a video to extend
    end_image: torch.Tensor | None = None
    anchor: DriftAnchor | None = None           # the Drift Anchor node's settings (None: off)
    steering: object = None                     # a steering.Steering: prompt switches while it runs (None: off)


@functools.lru_cache(maxsize=1)
def pack_fingerprint() -> int:
    """A checksum of the pack's engine sources (cache_core/, model_patches/): processes that must run the
    same code (sequence-parallel ranks) compare it."""
    root = Path(__file__).resolve().parents[1]
    crc = 0
    for path in sorted([*root.glob("cache_core/*.py"), *root.glob("model_patches/*.py")]):
        crc = zlib.crc32(path.read_bytes(), zlib.crc32(path.name.encode(), crc))
    return crc


MULTIGPU_NODE = "MultiGPU CFG Split (MultiGPU_WorkUnits)"


def core_multigpu(model) -> bool:
    """Whether core's multi-GPU CFG split is on this model (newer core: its GPU clones ride along as
    additional models under "multigpu")."""
    get_extra = getattr(model, "get_additional_models_with_key", None)
    return bool(get_extra is not None and get_extra("multigpu"))


@dataclass(frozen=True)
class ChunkPlan:
    """One emitted chunk of a chunk-wise run (MAGI-1, causal Wan): the piece `VideoRun.plans` lists."""
    index: int                    # generated chunk number (0 = first emitted)


def encode_frames(vae, frames: torch.Tensor) -> torch.Tensor:
    return vae.encode(frames[..., :3]).to(comfy.model_management.intermediate_device(), torch.float32)




def resize_image(image: torch.Tensor, width: int, height: int, crop: str = "center") -> torch.Tensor:
    """The first image to width x height: centre-cropped to the aspect ratio (SkyReels-V2), or
    stretched (crop "disabled": MAGI-1's upstream resize)."""
    return comfy.utils.common_upscale(image[:1].movedim(-1, 1), width, height, "bilinear", crop).movedim(1, -1)


def check_image(name: str, image) -> None:
    if image is None:
        return
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise InputError(name, f"expected an IMAGE [batch, height, width, 3], got shape {tuple(image.shape)}")
    if image.shape[0] != 1:
        raise InputError(name, f"holds {image.shape[0]} images; give one (pick it with ImageFromBatch)")


def check_start(family, vae, width: int, height: int, images: dict, prefix_latent, vae_hint: str) -> None:
    """The checks every family makes of a request's images and prefix: an image needs the vae
    (`vae_hint`: which one, where) and is one image; a start image and a video to continue exclude
    each other; the prefix fits the video."""
    for name, image in images.items():
        if image is not None and vae is None:
            raise InputError(name, f"needs a vae: {vae_hint}")
        check_image(name, image)
    if images.get("start_image") is not None and prefix_latent is not None:
        raise InputError("start_image", "and prefix_latent: give one (image-to-video) or the other (a video to "
                         "continue), not both")
    check_prefix_latent(prefix_latent, width, height, family)


def check_prefix_latent(latent, width: int, height: int, family) -> None:
    if latent is None:
        return
    c_want, s = family.latent_channels, family.spatial_stride
    if latent.ndim != 5:
        raise InputError("prefix_latent", f"is a {latent.ndim}-D latent {tuple(latent.shape)}; it needs a video "
                         f"latent [1, {c_want}, frames, height/{s}, width/{s}] (VAEEncode of a video with the "
                         f"model's VAE)")
    b, c = latent.shape[:2]
    if c != c_want:
        raise InputError("prefix_latent", f"has {c} channels; {family.title} latents have {c_want}: encode the "
                         "video with the model's VAE")
    if b != 1:
        raise InputError("prefix_latent", f"holds a batch of {b} videos; the sampler extends one video at a time")
    if latent.shape[-2:] != (height // s, width // s):
        raise InputError("prefix_latent", f"is {latent.shape[-1] * s}x{latent.shape[-2] * s} pixels; "
                         f"set width/height to match it (now {width}x{height})")


class VideoRun:
    """One sampler run of any family (see the module docstring).

    A subclass sets `plans` (one per emitted piece, each with an `index`), `steps` and
    `calls_per_segment` (model calls per DF window; MAGI-1 runs one segment), and implements
    `_generate(report, on_call) -> video latent`. Callbacks must not refer back to the run:
    a cycle through it keeps its model clone alive until the cyclic collector runs, and ComfyUI
    then finds a loaded model whose patcher (and parent) died together, which it reports as a leak
    and answers with a full garbage collect on every later model load. `run(on_call=...)` takes
    the per-call callback for that reason.
    """

    schedule: type = None                     # the schedule type this run takes
    image_crop = "center"                     # how a given image is fitted to the video (common_upscale crop)

    def __init__(self, model, req: VideoRequest, family, dm, on_window=None, sink=None, t_start=None):
        if not isinstance(req.schedule, self.schedule):
            raise ModelFamilyError(f"{family.title} models take the {self.schedule.node_title}, not a "
                                   f"{type(req.schedule).__name__}")
        self.req, self.family, self.dm = req, family, dm
        self.on_window, self.sink = on_window, sink
        self._t0 = time.perf_counter() if t_start is None else t_start   # the node's start: TTFF counts from it
        self.decoder = None                       # the family's stream decoder while a run with a sink lasts
        self._shown_head = None                   # latents shown before the first piece (an i2v start frame)
        self._latents_out = 0                     # output latent frames handed over so far
        self._head_owed = 0                       # frames of an extended video the decoder still owes
        self._piece_frames: list = []             # decoded frames of the piece being finished (drift)
        self._last_latent = None                  # the last latent frame emitted (on_window's preview)
        self.model = model.clone()
        options = self.model.model_options.setdefault("transformer_options", {})
        self.sp = options.get(SP_KEY) or from_environment()     # the ranks (tools/sp_run.py), or one process
        if self.sp.active:
            options[SP_KEY] = self.sp          # the chunk executor's calls read it there (this run's clone)
        if self.sp.active and core_multigpu(model):
            raise ModelFamilyError(f"sequence parallelism already spreads each model call over {self.sp.world} GPUs; "
                                   f"core's {MULTIGPU_NODE} node would split the guidance across GPUs on top of it: "
                                   "remove that node from the workflow")
        self.heat = None
        self.plans: list = []
        self.calls_per_segment: list = []
        self.drift = DriftMeter()
        self._anchor = None                       # (prompt index, (mean, std)) the pieces are pulled towards
        self.steps = req.steps

    @property
    def model_options(self) -> dict:          # what an OUTER_SAMPLE wrapper reads and replaces
        return self.model.model_options

    @model_options.setter
    def model_options(self, options: dict) -> None:
        self.model.model_options = options

    @property
    def total_calls(self) -> int:
        return sum(self.calls_per_segment)

    def new_report(self, **fields) -> RunReport:
        return RunReport(windows=len(self.plans), model_calls=0, calls_per_window=list(self.calls_per_segment),
                         steps=self.steps, latent_frames=0, ttff_s=None, ttff_calls=None, emissions=[], stream_seconds=0.0,
                         transformer_flops=0.0,
                         transformer_flops_vanilla=0.0, cache=None, **fields)

    @torch.no_grad()   # ComfyUI's executor already disables autograd; callers outside it must not grow graphs
    def run(self, on_call=None) -> tuple[torch.Tensor, dict]:
        """(video latent, report). on_call(call, x0, x): after every model call (previews, progress)."""
        report = self.new_report(**self.report_fields())
        if self.sp.active:                    # named errors before any work
            heads, tokens, what = self.sharded()
            check_world(self.sp.world, heads, what, tokens)
            self.sp.agree_run(self.request_checksums(), pack_fingerprint())
        if self.sink is not None:
            self.decoder = self.family.stream_decoder(self.req.vae) if self.req.vae is not None else \
                PreviewStreamDecoder(self.family) if self.family.latent_format.latent_rgb_factors else None
        try:
            with report.installed(self.model.model_options["transformer_options"]):
                video = self._generate(report, on_call)
            self._hand_over(self.decoder.flush() if self.decoder is not None else None, 0, report.data,
                            report.data["model_calls"], piece=None)
            self.measure_drift()               # frames a decoder held back to the end
            if self.decoder is not None:
                report.data["stream_decode"] = dict(self.decoder.status)
            if self.req.steering is not None:
                report.data["switches"] = self.req.steering.log
                if self.req.steering.finished is not None:
                    report.data["finished_early"] = self.req.steering.finished
                else:
                    self.req.steering.check_replayed()
        finally:
            self.decoder = None
        report.data.update(stream_summary(report.data["emissions"], self.req.schedule.fps))
        report.data["latent_frames"] = int(video.shape[2])
        if self.sp.active:
            report.data["sequence_parallel"] = self.sp.summary(report_integers(report.data),
                                                               {"kv_bytes_peak": kv_bytes_peak(report.data)})
        report.data["drift"] = self.drift.summary()
        report.data["seconds"] = time.perf_counter() - self._t0
        return video, report.data

    def report_fields(self) -> dict:
        return {}

    def sharded(self) -> tuple[int, int, str]:
        """(attention heads the ranks split, tokens of the smallest block pass, what has those heads)."""
        raise NotImplementedError

    def request_checksums(self) -> dict:
        """What every rank of a sequence-parallel run must share before any work: the request (sizes,
        seed, guidance, schedule, prompts, given images and latents) and the model's shape."""
        req = self.req
        return dict(family=self.family.title, model=str(self.family.flops(self.dm)), width=req.width,
                    height=req.height, length=req.length, seed=req.seed, steps=req.steps, cfg=req.cfg,
                    schedule=str(req.schedule), anchor=str(req.anchor), steering=req.steering is not None,
                    inputs=checksum([req.positives, req.negative, req.start_image, req.prefix_latent, req.end_image]))

    def _generate(self, report: RunReport, on_call) -> torch.Tensor:
        raise NotImplementedError

    def refuse_foreign_wrappers(self) -> None:
        """For a family whose loop runs its own chunk-wise forward instead of ComfyUI's sampler and
        model call: other packs' and core's wrappers hook exactly those, which such a loop never
        makes, so they are refused by name rather than silently doing nothing."""
        mp = comfy.patcher_extension.WrappersMP
        for kind in (mp.OUTER_SAMPLE, mp.DIFFUSION_MODEL, mp.APPLY_MODEL, mp.PREDICT_NOISE, mp.SAMPLER_SAMPLE):
            foreign = sorted(k for k, fns in self.model.wrappers.get(kind, {}).items() if fns and k != CACHE_WRAPPER_KEY)
            if foreign:
                raise ModelFamilyError(f"carries {', '.join(foreign)} ({kind} wrappers, e.g. core's EasyCache or "
                                       f"another pack's cache), which hook ComfyUI's own sampling; {self.family.title} "
                                       "runs its own chunk-wise forward, so they cannot work: remove that node and "
                                       "use the pack's FlowCache or MotionCache")

    def outer_wrapped(self, fn, *args):
        """fn(*args) inside the cache node's OUTER_SAMPLE wrapper, as CFGGuider runs its sampling: the
        cache's keyed wrapper sets up and tears down the run's cache state."""
        mp = comfy.patcher_extension.WrappersMP
        wrappers = self.model.wrappers.get(mp.OUTER_SAMPLE, {}).get(CACHE_WRAPPER_KEY, [])
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(fn, self, wrappers).execute(*args)

    @property
    def anchoring(self) -> bool:
        return self.req.anchor is not None and self.req.anchor.strength > 0

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """A given image (start, end or anchor) as one raw latent frame at the video's size."""
        req = self.req
        return encode_frames(req.vae, resize_image(image, req.width, req.height, self.image_crop))[:, :, :1]

    def anchor_image_latent(self) -> torch.Tensor | None:
        """The Drift Anchor's image as a raw latent, or None."""
        if not self.anchoring or self.req.anchor.image is None:
            return None
        return self.encode_image(self.req.anchor.image)

    def anchored(self, latent: torch.Tensor, index: int, image_latent=None) -> torch.Tensor:
        """Piece `index`'s raw latent with the Drift Anchor applied: pulled towards the anchor's
        per-channel statistics. With an image (`image_latent`) the anchor is the image's, for the
        whole video; otherwise it is the first piece of the current prompt, which itself stays as
        generated, and a new prompt (another conditioning than the anchored piece's) re-anchors to
        its own first piece (a prompt switched in the Live View as well), so the anchor never pulls a
        new scene back to the old one."""
        if not self.anchoring:
            return latent
        prompt = self.req.positives[min(index, len(self.req.positives) - 1)]
        if self.req.steering is not None:          # a steered prompt is a new prompt too
            prompt = self.req.steering.prompt(prompt)
        if image_latent is not None:
            if self._anchor is None:
                self._anchor = (None, latent_stats(image_latent))
        elif self._anchor is None or self._anchor[0] is not prompt:
            self._anchor = (prompt, latent_stats(latent))
            return latent
        return anchor_latent(latent, self._anchor[1], self.req.anchor.strength)

    def check_finite(self, latent: torch.Tensor, index: int) -> None:
        """A finished piece must be finite: a NaN video is an error, not a result (one sync per piece)."""
        if not bool(torch.isfinite(latent).all()):
            raise InputError("model", f"{self.family.piece} {index + 1} of {len(self.plans)} came out NaN or infinite. Likely "
                             "causes: the checkpoint holds non-finite weights (a damaged or converted file: download it "
                             "again), or the compute dtype overflows (fp16 on a model trained in bf16: choose "
                             "weight_dtype default or bf16)")

    def show_head(self, latents: torch.Tensor, shown: bool) -> None:
        """Latents that precede the generated ones in the output video: a start image's frame, shown
        with the first piece; or the video being extended, decoded only to carry the stream
        decoder's state (its frames are the user's own video, not shown again: a decoder that held
        part of it back owes those frames, which are dropped when they come)."""
        if shown:
            self._shown_head = latents
            return
        n = latents.shape[2]
        if self.decoder is not None:
            self.keep_loaded()
            owed = self._pixel_frames(self._latents_out + n) - self._pixel_frames(self._latents_out)
            self._head_owed = owed - int(self.decoder.push(latents).shape[0])
        self._latents_out += n

    def _pixel_frames(self, latents: int) -> int:
        return self.family.pixel_frames(latents) if latents else 0

    def keep_loaded(self) -> None:
        """Before a decode during sampling: the VAE loaded next to the sampling model, so making room
        for it never unloads the model mid-run (ComfyUI keeps the models of one load call)."""
        if self.req.vae is not None:
            comfy.model_management.load_models_gpu([self.model, self.req.vae.patcher])

    def emit(self, latents: torch.Tensor, data: dict, piece: int, calls: int) -> None:
        """The output video's next raw latents [1, C, n, h, w] are final (they never change again):
        decoded in order, handed to the sink, logged. `piece`: the window or chunk they belong to;
        `calls`: model calls (DF) or forward steps (MAGI-1) run so far."""
        if self._shown_head is not None:
            latents, self._shown_head = torch.cat([self._shown_head, latents], 2), None
        self._last_latent = latents[:, :, -1:]
        if self.sp.active:    # every rank must have made these latents bit for bit: a diverged rank fails all
            self.sp.agree([piece, checksum(latents)], f"the emitted latents of piece {piece}")
        t0 = time.perf_counter()
        frames = None
        if self.decoder is not None:
            self.keep_loaded()
            frames = self.decoder.push(latents)
        self._hand_over(frames, latents.shape[2], data, calls, piece)
        data["stream_seconds"] += time.perf_counter() - t0

    def _hand_over(self, frames, n_latents: int, data: dict, calls: int, piece) -> None:
        before = self._pixel_frames(self._latents_out)
        self._latents_out += n_latents
        if frames is None:              # nothing decoded: the frames these latents will give
            n = self._pixel_frames(self._latents_out) - before
        else:
            if self._head_owed:         # the extended video's own last frames, held back until now
                cut = min(self._head_owed, int(frames.shape[0]))
                frames, self._head_owed = frames[cut:], self._head_owed - cut
            n = int(frames.shape[0])
            if n:
                if self.decoder.pixels:
                    self._piece_frames.append(frames)     # the drift measure takes each piece whole
                if self.sink is not None:
                    self.sink(frames, piece)
        if not n:
            return
        timeline = data["emissions"]
        first = timeline[-1][1] + timeline[-1][2] if timeline else 0
        t = time.perf_counter() - self._t0
        timeline.append([piece, first, n, round(t, 4)])
        if data["ttff_s"] is None:
            data["ttff_s"], data["ttff_calls"] = t, calls

    def measure_drift(self, frames: torch.Tensor | None = None) -> None:
        """One segment (a window's or chunk's new frames) into the drift measure: the frames given,
        or those the stream decoded since the last segment (what was decoded anyway: no second decode)."""
        if frames is None and self._piece_frames:
            frames = torch.cat(self._piece_frames)
        self._piece_frames = []
        if frames is not None and frames.shape[0]:
            self.drift.add(frames.movedim(-1, 1))

    def check_interrupt(self) -> None:
        """ComfyUI's Cancel, on every rank at once: a rank asked to stop tells the others at this point,
        which all of them pass (one process: ComfyUI's own check)."""
        if self.sp.any(comfy.model_management.processing_interrupted() or self.sp.stop_requested):
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()

    def finish_here(self, calls: int, index: int) -> bool:
        """After piece `index`: whether the user asked the Live View to end the video here."""
        return self.req.steering is not None and self.req.steering.finish_requested(calls, index)

    def piece_done(self, index: int) -> None:
        """Window or chunk `index` is finished: its drift segment, then on_window(plan, pieces, the
        last latent frame emitted) (progress text, a preview)."""
        self.measure_drift()
        if self.on_window is not None:
            self.on_window(self.plans[index], len(self.plans), self._last_latent)


def report_integers(data: dict) -> dict:
    """The report's integers that every rank of one run must have alike: calls, frames, the cache's counts."""
    same = {k: data.get(k) or 0 for k in ("model_calls", "pixel_frames", "latent_frames", "recache_passes")}
    cache = data.get("cache") or {}
    same.update({f"cache.{k}": v for k, v in cache.items() if isinstance(v, int) and not isinstance(v, bool)
                 and "bytes" not in k})
    return same


def kv_bytes_peak(data: dict) -> int:
    """The K/V bytes this process held at most: its store's (uncached runs), or its cache's."""
    return int(data.get("kv_bytes_peak") or (data.get("cache") or {}).get("kv_bytes_peak") or 0)


def stream_summary(emissions: list, fps: float) -> dict:
    """Streaming figures from an emission timeline [[piece, first frame, frames, seconds], ...]
    (one definition for every family; seconds from the sampler node's start):
    - sustained_fps: frames after the first emission / seconds from the first to the last;
    - realtime_factor: those seconds / the video seconds they made (<= 1: faster than real time);
    - startup_delay_s: how long after the first frame a viewer must wait to start playback at `fps`
      and never stall: max over emissions k of t_k - t_first - (frames before k) / fps."""
    out = {"sustained_fps": None, "realtime_factor": None, "startup_delay_s": None}
    if not emissions:
        return out
    fps = float(fps or 24)
    t_first = emissions[0][3]
    out["startup_delay_s"] = round(max(e[3] - t_first - e[1] / fps for e in emissions), 4)
    later = sum(e[2] for e in emissions[1:])
    span = emissions[-1][3] - t_first
    if later and span > 0:
        out["sustained_fps"] = round(later / span, 4)
        out["realtime_factor"] = round(span / (later / fps), 4)
    return out
