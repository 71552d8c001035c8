"""Schedule nodes: how a long video is cut into windows, and which prompt each window follows."""
from comfy_api.latest import io

from ..cache_core.df_schedule import DFSchedule
from .errors import InputError, named_errors

ARSchedule = io.Custom("AR_SCHEDULE")
ARPrompts = io.Custom("AR_PROMPTS")


class DFScheduleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheDFSchedule",
            display_name="Diffusion Forcing Schedule (SkyReels-V2)",
            category="ARCache/schedules",
            description=(
                "How the Streaming AR Sampler cuts a SkyReels-V2-DF video into windows and staggers "
                "the frames' noise levels. Defaults are SkyReels-V2's (97-frame windows, 17 frames of "
                "history). ar_step 0 = synchronous; 5 with causal_block_size 5 = asynchronous."),
            inputs=[
                io.Int.Input("window_frames", default=97, min=5, max=1025, step=4,
                             tooltip="Pixel frames per window, history included (4k+1). 97 (540P) or 121 (720P); lower saves memory."),
                io.Int.Input("overlap_frames", default=17, min=0, max=1021, step=1,
                             tooltip="Pixel frames of history each window continues from (4k+1, or 0). Must be smaller than window_frames."),
                io.Int.Input("ar_step", default=0, min=0, max=50,
                             tooltip="0: all frames of a window denoise together (synchronous). >0: each block starts this many steps after the previous one (asynchronous; 5 upstream)."),
                io.Int.Input("causal_block_size", default=1, min=1, max=16,
                             tooltip="Latent frames per block that share a noise level (1 or 5 upstream). Caches use it as their chunk size."),
                io.Int.Input("addnoise_condition", default=20, min=0, max=200,
                             tooltip="History frames are shown re-noised to sigma = value/1000 (20 recommended, at most ~50). 0 = clean history."),
                io.Combo.Input("solver", options=["unipc", "unipc_upstream", "euler"], default="unipc",
                               tooltip="Per-frame solver: unipc (2nd order bh2, textbook), unipc_upstream (bit-for-bit what SkyReels-V2's pipeline computes, including its aliased first corrector step) or euler."),
                io.Float.Input("shift", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Sigma shift of the step template; 0 uses the model's own (8 for Wan 2.1)."),
                io.Int.Input("fps", default=24, min=0, max=120,
                             tooltip="fps conditioning of SkyReels-V2-DF-1.3B (16 or 24). Ignored by the 14B models; 0 disables it."),
                io.Combo.Input("prefix_mode", options=["auto", "reencode_pixels", "latent"], default="auto",
                               tooltip="History for the next window: reencode_pixels decodes and re-encodes the last frames (upstream, needs a VAE); latent keeps the latents (diffusers); auto picks reencode when a VAE is connected."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="Optional custom step template (e.g. from BasicScheduler); overrides the sampler's steps and this node's shift."),
            ],
            outputs=[ARSchedule.Output(tooltip="Diffusion-forcing schedule for the Streaming AR Sampler.")],
        )

    @classmethod
    @named_errors("Diffusion Forcing Schedule")
    def execute(cls, window_frames, overlap_frames, ar_step, causal_block_size, addnoise_condition, solver,
                shift, fps, prefix_mode, sigmas=None) -> io.NodeOutput:
        if (window_frames - 1) % 4:
            raise InputError("window_frames", f"{window_frames}: must be of the form 4k+1 (e.g. 97, 121)")
        if overlap_frames and (overlap_frames - 1) % 4:
            raise InputError("overlap_frames", f"{overlap_frames}: must be 0 or of the form 4k+1 (e.g. 17, 37)")
        if overlap_frames >= window_frames:
            raise InputError("overlap_frames", f"{overlap_frames} must be smaller than window_frames={window_frames}")
        return io.NodeOutput(DFSchedule(window_frames, overlap_frames, ar_step, causal_block_size,
                                        addnoise_condition, solver, shift, fps, prefix_mode, sigmas))


class PromptScheduleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCachePromptSchedule",
            display_name="Prompt Schedule (per window)",
            category="ARCache/schedules",
            description=(
                "A storyboard for long videos: window i of the Streaming AR Sampler follows prompt i; "
                "after the last prompt, the last one repeats. Chain nodes through `previous` for more "
                "than four prompts."),
            inputs=[
                io.Conditioning.Input("prompt_1", tooltip="Conditioning for the first window."),
                io.Conditioning.Input("prompt_2", optional=True, tooltip="Conditioning for the next window."),
                io.Conditioning.Input("prompt_3", optional=True, tooltip="Conditioning for the next window."),
                io.Conditioning.Input("prompt_4", optional=True, tooltip="Conditioning for the next window."),
                ARPrompts.Input("previous", optional=True,
                                tooltip="An earlier prompt schedule; its windows come first."),
            ],
            outputs=[ARPrompts.Output(tooltip="Per-window prompts for the Streaming AR Sampler's prompt_schedule.")],
        )

    @classmethod
    @named_errors("Prompt Schedule")
    def execute(cls, prompt_1, prompt_2=None, prompt_3=None, prompt_4=None, previous=None) -> io.NodeOutput:
        prompts = list(previous or []) + [p for p in (prompt_1, prompt_2, prompt_3, prompt_4) if p is not None]
        return io.NodeOutput(prompts)
