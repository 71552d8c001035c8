"""The Streaming AR Sampler node: long videos window by window, streamed as they finish."""
from __future__ import annotations

import json
import logging
import os
import time

from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths
import latent_preview

from ..cache_core.seq_parallel import check_world, in_ranks
from ..model_patches import families
from ..model_patches.vae_stream import decode_whole
from ..model_patches.video_run import VideoRequest
from .anchor import AnchorType
from .errors import InputError, named_errors
from .heatmap import FAMILY_KEY, HEAT_KEY
from .live import LiveType, open_session
from .multigpu import ranks_of, run_on_ranks
from .schedules import ARPrompts, ARSchedule
from .video_stream import StreamingVideoWriter


def progress_text(text: str, node_id) -> None:
    try:
        from server import PromptServer
        if PromptServer.instance is not None and node_id is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # progress text is a courtesy; never fail a run over it
        pass


def check_schedule(schedule, family: families.Family):
    """The family's schedule (its defaults when none is connected), or a named error."""
    kind = family.run.schedule
    if schedule is None:
        return family.default_schedule() if family.default_schedule else kind()
    if not isinstance(schedule, kind):
        raise InputError("schedule", f"is a {type(schedule).__name__}, but {family.title} models take the "
                         f"{kind.node_title}")
    return schedule


def validate(width, height, length, schedule, vae, start_image, prefix_latent, end_image,
             family: families.Family):
    """Everything that can be checked before the model runs (so a bad input costs nothing)."""
    if width % 16 or height % 16:
        raise InputError("width", f"width={width}, height={height}: both must be multiples of 16 (e.g. 960x544)")
    if vae is not None:
        family.check_vae(vae)
    family.run.validate(width, height, length, schedule, vae, start_image, prefix_latent, end_image, family)


def queued_seconds_ago() -> float | None:
    """Seconds since the running prompt was queued (ComfyUI stamps create_time at POST /prompt), or None."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        prompt_id = get_executing_context().prompt_id
        for item in PromptServer.instance.prompt_queue.currently_running.values():
            if item[1] == prompt_id and "create_time" in item[3]:
                return time.time() - item[3]["create_time"] / 1000.0
    except Exception:    # not run by a server (in-process use), or a core that moved these
        pass
    return None


def chunk_preview(model, total: int, vae, streamed: bool):
    """The per-call progress callback with a preview of the frame being finished: the family's
    latent-to-RGB factors (SkyReels-V2-DF), or for a family without them (MAGI-1) a decoded frame
    that changes once per chunk: the last frame the run decodes anyway when it `streamed` to a file
    or a Live View, else a cheap decode of the chunk's last latent frame (4 video frames, not the
    chunk's 24). Returns (callback, a sink for the streamed frames or None, on_piece(last latent)
    or None)."""
    if model.model.latent_format.latent_rgb_factors is not None:
        return latent_preview.prepare_callback(model, total), None, None
    pbar = comfy.utils.ProgressBar(total)
    last = {"frame": None}

    def callback(call, x0, x, total_calls):
        preview = None
        if last["frame"] is not None:
            from PIL import Image
            img = Image.fromarray((last["frame"].clamp(0, 1) * 255).round().byte().numpy())
            preview = ("JPEG", img, latent_preview.MAX_PREVIEW_RESOLUTION)
        pbar.update_absolute(call + 1, total_calls, preview)

    def keep(frames, piece):
        last["frame"] = frames[-1]

    def on_piece(latent):
        if latent is not None:
            last["frame"] = decode_whole(vae, latent)[-1]
    if streamed:
        return callback, keep, None
    return callback, None, on_piece if vae is not None else None


def video_path(filename_prefix: str, width: int, height: int) -> str:
    try:
        folder, name, counter, _, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
    except Exception as e:   # ComfyUI refuses paths outside its output folder with a bare Exception
        raise InputError("filename_prefix", f"{filename_prefix!r} cannot be used ({str(e).strip('* ')}); give a "
                         "path relative to ComfyUI's output folder, e.g. ARCache/video") from None
    return os.path.join(folder, f"{name}_{counter:05}_.mp4")


class StreamingSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheStreamingSampler",
            display_name="Streaming AR Sampler",
            category="ARCache/sampling",
            description=(
                "Generates a long video piece by piece: SkyReels-V2-DF by diffusion forcing (every frame "
                "has its own noise level, each window continues from the last frames of the previous "
                "one), MAGI-1 chunk by chunk (up to 4 chunks of 24 frames denoised at staggered noise "
                "levels, finished chunks kept in a K/V cache), few-step causal Wan models (Self-Forcing, "
                "LongLive) with a Causal Schedule, chunk after chunk in 3-4 steps each. One progress bar over the whole video; "
                "every frame is handed over the moment it is final (an async block at its last step, a "
                "MAGI-1 chunk), decoded with the vae into exactly the frames VAEDecode gives, written to an "
                "mp4 you can play while it grows, and shown in a Live View. Connect a FlowCache or MotionCache node before it (SkyReels-V2-DF) "
                "to skip redundant work."),
            inputs=[
                io.Model.Input("model", tooltip="A SkyReels-V2-DF model (Wan 2.1 t2v layout) from UNETLoader, optionally through a cache node; a MAGI-1 model from MAGI-1 Model Loader; or a few-step causal Wan (Self-Forcing, LongLive) from Causal Wan Loader."),
                io.Conditioning.Input("positive", tooltip="Text conditioning: CLIPTextEncode with the umt5 'wan' text encoder (SkyReels-V2-DF), MAGI-1 Text Encode (MAGI-1)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning; unused when cfg is 1, and by MAGI-1 (it uses its learned null caption)."),
                io.Int.Input("width", default=960, min=16, max=4096, step=16, tooltip="Video width in pixels (multiple of 16)."),
                io.Int.Input("height", default=544, min=16, max=4096, step=16, tooltip="Video height in pixels (multiple of 16)."),
                io.Int.Input("length", default=257, min=1, max=100001, step=4,
                             tooltip="Pixel frames to generate. SkyReels-V2-DF: 4k+1; 97 + 80k fill whole windows (257 = 3, 737 = 9); when extending a video, (length-1)/4+1 latent frames are appended, 4 pixel frames each. MAGI-1: rounded up to whole chunks of 24 frames (241 -> 240). Causal Wan: 4k+1 with (length-1)/4+1 latent frames a multiple of the chunk (81 = 7 chunks of 3; with a start image one less)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; window i uses seed + i."),
                io.Int.Input("steps", default=30, min=1, max=200, tooltip="Denoising steps every frame walks (SkyReels-V2-DF: 30 upstream; MAGI-1: a multiple of 4 and of the window size, 16 for distilled, 64 for base models). Causal Wan: unused (the Causal Schedule has its steps)."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (SkyReels-V2-DF: 6 upstream, 1 skips the negative pass). MAGI-1 base models: the text guidance scale (7.5 upstream); distilled models ignore it. Causal Wan: 1 upstream (distilled); > 1 runs the negative prompt with its own K/V."),
                ARSchedule.Input("schedule", optional=True, tooltip="Diffusion Forcing Schedule (SkyReels-V2-DF), MAGI-1 Schedule or Causal Schedule (few-step causal Wan; also what makes a plain Wan run causally); upstream's defaults when empty."),
                ARPrompts.Input("prompt_schedule", optional=True, tooltip="Per-window prompts (storyboard; per chunk for MAGI-1 and causal Wan); overrides positive."),
                io.Vae.Input("vae", optional=True, tooltip="The model's VAE (Wan 2.1 VAE, or MAGI-1 VAE Loader): needed for start/end images, pixel re-encoded history, streaming to file and the Live View's frames (MAGI-1: also its preview, a decoded frame per chunk)."),
                io.Image.Input("start_image", optional=True, tooltip="First frame (image-to-video). Needs the vae."),
                io.Latent.Input("prefix_latent", optional=True, tooltip="A video's latents to continue (video extension; MAGI-1 v2v: whole 6-latent chunks go into the K/V cache, the rest is written over the first chunk's frames); the output includes them."),
                io.Image.Input("end_image", optional=True, tooltip="Last frame to steer towards (appended clean to the last window; SkyReels-V2-DF only). Needs the vae."),
                AnchorType.Input("anchor", optional=True, tooltip="A Drift Anchor: holds the video's colour and contrast to its first window/chunk (or an image) over a long video."),
                io.Boolean.Input("save_video", default=False, optional=True,
                                 tooltip="With a vae: write every frame to a fragmented mp4 in the output folder the moment it is final (playable while it grows). An interrupted run keeps what was written as <name>_interrupted.mp4."),
                io.String.Input("filename_prefix", default="ARCache/video", optional=True,
                                tooltip="Where save_video writes, relative to ComfyUI's output folder."),
                LiveType.Input("live", optional=True, tooltip="A Live View: watch the video in a player on this node while it is made, and switch prompts as it runs. Frames are decoded with the vae (SkyReels-V2-DF without one: latent preview colours)."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The whole video's latents (raw, in the model's VAE layout); decode with VAEDecode and the same VAE."),
                io.String.Output(display_name="report", tooltip="JSON: windows, model calls, seconds, time to first window, transformer FLOPs (spent and vanilla), cache stats."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        """With a Live View the result depends on what the user does during the run: never cached.
        (ComfyUI gives a linked input here as None, without running its node: the key is what counts.)"""
        return float("nan") if "live" in kwargs else None

    @classmethod
    @named_errors("Streaming AR Sampler")
    def execute(cls, model, positive, negative, width, height, length, seed, steps, cfg, schedule=None,
                prompt_schedule=None, vae=None, start_image=None, prefix_latent=None, end_image=None, anchor=None,
                save_video=False, filename_prefix="ARCache/video", live=None) -> io.NodeOutput:
        t_start = time.perf_counter()
        prefix = prefix_latent["samples"] if prefix_latent is not None else None
        family, dm = families.detect(model, schedule)       # says what the model is, before anything runs
        schedule = check_schedule(schedule, family)
        validate(width, height, length, schedule, vae, start_image, prefix, end_image, family)
        if save_video and vae is None:
            raise InputError("save_video", "needs a vae: connect the model's VAE")
        if live is not None and vae is None and family.latent_format.latent_rgb_factors is None:
            raise InputError("live", f"shows decoded frames, and {family.title} latents have no preview colours: "
                             "connect the model's VAE to the sampler's vae input")
        if anchor is not None and anchor.image is not None and vae is None:
            raise InputError("anchor", "has an image, which the sampler encodes with its vae: connect the model's VAE, "
                             "or take the image out of the Drift Anchor to anchor to the first window/chunk")
        node_id = cls.hidden.unique_id
        ranks = ranks_of(model)
        if ranks is not None and not in_ranks():      # ARCache Multi-GPU: this part runs on the ranks
            check_world(ranks.gpus, *family.shard_heads(dm), name="gpus")
            latent, text = run_on_ranks(cls.hidden.prompt, node_id, ranks, live)
            return io.NodeOutput(latent, text, ui={"text": [text]})
        positives = list(prompt_schedule or [positive])
        fps = schedule.fps or 24
        writer = StreamingVideoWriter(video_path(filename_prefix, width, height), fps) if save_video else None
        session = open_session(live, positives, node_id, fps, None)     # closed in the finally below
        req = VideoRequest(width=width, height=height, length=length, seed=seed, steps=steps, cfg=cfg,
                           schedule=schedule, positives=positives, negative=negative, vae=vae, start_image=start_image,
                           prefix_latent=prefix, end_image=end_image, anchor=anchor,
                           steering=None if session is None else session.steering)

        status, report = "error", None
        try:
            run = family.run(model, req, family, dm, t_start=t_start)
            total = run.total_calls
            sinks = [f for f in (writer and (lambda frames, piece: writer.write(frames)),
                                 session and session.frames) if f]
            preview, keep_last, on_piece = chunk_preview(run.model, total, vae, streamed=bool(sinks))
            if keep_last:               # MAGI-1's preview: a frame the stream decodes anyway
                sinks.append(keep_last)
            if sinks:
                run.sink = lambda frames, piece: [f(frames, piece) for f in sinks]

            def on_window(plan, n, last_latent):
                progress_text(f"{family.piece} {plan.index + 1}/{n} done", node_id)
                if on_piece is not None:
                    on_piece(last_latent)
            run.on_window = on_window
            progress_text(f"{len(run.plans)} {family.piece}s, {total} model calls", node_id)
            video, report = run.run(on_call=lambda call, x0, x: preview(call, x0, x, total))
            ago = queued_seconds_ago()
            if ago is not None and report["ttff_s"] is not None:   # queue -> node start -> first frame
                report["ttff_queue_s"] = round(ago - (time.perf_counter() - t_start) + report["ttff_s"], 4)
            if writer:
                report["video_file"] = os.path.relpath(writer.close(), folder_paths.get_output_directory())
                report["video_frames"] = writer.frames
            status = "finished"
        except BaseException as e:
            status = "interrupted" if isinstance(e, comfy.model_management.InterruptProcessingException) else "error"
            if writer and (kept := writer.abort()):
                logging.warning("ARCache: the run stopped (%s); the frames written so far are in %s", status, kept)
            raise
        finally:
            if session is not None:
                session.close(status, report)
        text = json.dumps(report, indent=1)
        latent = {"samples": video}
        if run.heat is not None:                   # for ARCacheComputeHeatmap: where the cache spent compute
            latent[HEAT_KEY] = run.heat
            latent[FAMILY_KEY] = family.name
        return io.NodeOutput(latent, text, ui={"text": [text]})
