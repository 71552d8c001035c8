"""Few-step causal Wan models (Self-Forcing class): the schedule node and the loaders for their files."""
from comfy_api.latest import io

import folder_paths

from ..cache_core.causal_schedule import FIRST_FRAME_MODES, SOLVERS, SWITCH_MODES, CausalSchedule
from ..model_patches import causal_loader
from .errors import named_errors
from .schedules import ARSchedule


class CausalScheduleNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = CausalSchedule()
        return io.Schema(
            node_id="ARCacheCausalSchedule",
            display_name="Causal Schedule (Self-Forcing / LongLive)",
            category="ARCache/schedules",
            description=(
                "How the Streaming AR Sampler runs a few-step causal Wan model (Self-Forcing, CausVid, Causal "
                "Forcing, LongLive 1.0, Krea Realtime): chunk after chunk, each chunk denoised in a few steps "
                "(re-noised between them) and then written clean into a K/V cache that later chunks attend to. "
                "Defaults are Self-Forcing's; LongLive 1.0: attention_frames 12, sink_frames 3; LongLive 2.0 "
                "(Wan2.2-TI2V-5B): chunk_frames 8, solver unipc with 4 steps, attention_frames 32, "
                "sink_frames 8, first_frame clamped, switch keep, fps 24 (its defaults when no schedule is "
                "connected). cfg 1 runs no negative pass, cfg > 1 keeps the negative prompt's own K/V. Only "
                "meaningful for causally trained weights: a plain Wan or SkyReels model runs but makes "
                "noise-like chunks."),
            inputs=[
                io.Int.Input("chunk_frames", default=d.chunk_frames, min=1, max=64,
                             tooltip="Latent frames per chunk (num_frame_per_block): 3 for chunk-wise Self-Forcing / LongLive 1.0, 1 for frame-wise Causal Forcing. Must match how the checkpoint was trained."),
                io.String.Input("denoising_steps", default=", ".join(map(str, d.denoising_steps)),
                                tooltip="The model's timestep list, noise first (denoising_step_list): 1000, 750, 500, 250 upstream. Strictly decreasing."),
                io.Boolean.Input("warp", default=d.warp,
                                 tooltip="Map the steps through the shifted flow grid (warp_denoising_step, on upstream): 1000, 750, 500, 250 become timesteps 1000, 937.5, 833.3, 625 at shift 5. Off: the steps are the timesteps."),
                io.Float.Input("shift", default=d.shift, min=0.01, max=100.0, step=0.01,
                               tooltip="Flow timestep shift (timestep_shift): 5 for Self-Forcing / LongLive."),
                io.Int.Input("context_noise", default=int(d.context_noise), min=0, max=1000,
                             tooltip="Timestep of the pass that writes a finished chunk's K/V from its clean latents (0 upstream)."),
                io.Int.Input("attention_frames", default=d.attention_frames, min=0, max=100000,
                             tooltip="Latent frames a chunk attends to, itself and the sink included: a rolling K/V window that keeps memory flat for any length (12 for LongLive 1.0, 32 for 2.0). 0 = the whole history (Self-Forcing; memory grows with the video). A video shorter than the window keeps all of it."),
                io.Int.Input("sink_frames", default=d.sink_frames, min=0, max=100000,
                             tooltip="The video's first latent frames, kept in every window (an attention sink: 3 for LongLive 1.0, 8 for 2.0). Needs attention_frames."),
                io.Combo.Input("switch", options=list(SWITCH_MODES), default=d.switch,
                               tooltip="When the prompt changes between chunks (Prompt Schedule, Live View): recache recomputes the kept chunks' K/V under the new prompt, one extra pass (LongLive); keep goes on with the K/V written under the old one."),
                io.Int.Input("fps", default=d.fps, min=1, max=120, tooltip="Frame rate of the saved video (16 for Wan 2.1 1.3B models, 24 for LongLive 2.0)."),
                io.Combo.Input("solver", options=list(SOLVERS), default=d.solver,
                               tooltip="renoise: walk denoising_steps, re-noising the predicted clean chunk to each next step (Self-Forcing, LongLive 1.0, CausVid). unipc: a fresh UniPC of unipc_steps steps per chunk on the shifted grid (LongLive 2.0: 4); denoising_steps and warp are then unused."),
                io.Int.Input("unipc_steps", default=d.unipc_steps, min=1, max=100,
                             tooltip="UniPC steps per chunk with solver unipc (4 for LongLive 2.0)."),
                io.Combo.Input("first_frame", options=list(FIRST_FRAME_MODES), default=d.first_frame,
                               tooltip="With a start_image: own_chunk writes it into the K/V first as a 1-frame chunk (Self-Forcing's independent first frame); clamped holds frame 0 of the first chunk to it at timestep 0 while the chunk is denoised (LongLive 2.0)."),
            ],
            outputs=[ARSchedule.Output(tooltip="Causal schedule for the Streaming AR Sampler.")],
        )

    @classmethod
    @named_errors("Causal Schedule")
    def execute(cls, chunk_frames, denoising_steps, warp, shift, context_noise, attention_frames, sink_frames,
                switch, fps, solver="renoise", unipc_steps=4, first_frame="own_chunk") -> io.NodeOutput:
        return io.NodeOutput(CausalSchedule(chunk_frames, denoising_steps, warp, shift, float(context_noise),
                                            attention_frames, sink_frames, switch, fps, solver, first_frame,
                                            unipc_steps))


class CausalWanLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheCausalWanLoader",
            display_name="Causal Wan Loader (Self-Forcing / LongLive)",
            category="ARCache/loaders",
            description=(
                "Loads a few-step causal Wan checkpoint (Wan 2.1 bases; LongLive 2.0 on Wan2.2-TI2V-5B) from "
                "models/diffusion_models in the layout it is published in: Self-Forcing / LongLive / CausVid "
                "training files (.pt with generator or "
                "generator_ema, 'model.' prefixed keys), ComfyUI repackages (.safetensors), core's causal_ar "
                "files; through ComfyUI's own model loading. The model is marked causal, so the Streaming AR "
                "Sampler runs it with the Causal Schedule."),
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The checkpoint in models/diffusion_models (e.g. self_forcing_dmd.pt, longlive_base.pt)."),
                io.Combo.Input("weights", options=list(causal_loader.WEIGHT_CHOICES), default="auto",
                               tooltip="Which weights of a training file: auto = generator_ema when present (Self-Forcing's inference --use_ema), else generator; a file with one set ignores this."),
                io.Combo.Input("weight_dtype", options=list(causal_loader.WEIGHT_DTYPES), default="default",
                               tooltip="Weight storage dtype, as UNETLoader's (default: as ComfyUI picks for the device; fp8 to save memory)."),
            ],
            outputs=[io.Model.Output(tooltip="The causal Wan model, for the Streaming AR Sampler with a Causal Schedule.")],
        )

    @classmethod
    @named_errors("Causal Wan Loader")
    def execute(cls, ckpt_name, weights, weight_dtype) -> io.NodeOutput:
        return io.NodeOutput(causal_loader.load_causal_wan(ckpt_name, weights, weight_dtype))


class CausalWanLoraNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheCausalWanLora",
            display_name="Causal Wan LoRA (LongLive)",
            category="ARCache/loaders",
            description=(
                "Applies a LoRA in the layout LongLive publishes (lora.pt: generator_lora with PEFT keys "
                "base_model.model.blocks.N....lora_A/lora_B) to a Wan model, through ComfyUI's own LoRA "
                "patching. Every key must land on a weight of the model with a matching shape, or it is an "
                "error naming the first that does not (a LoRA for another base). Files in core's LoRA layouts "
                "load with LoraLoaderModelOnly as well."),
            inputs=[
                io.Model.Input("model", tooltip="The base model (e.g. longlive_base.pt through Causal Wan Loader)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The LoRA file in models/loras (e.g. LongLive's lora.pt)."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="LoRA strength (1 as LongLive applies it; its alpha equals its rank)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the LoRA applied (the base is not changed).")],
        )

    @classmethod
    @named_errors("Causal Wan LoRA")
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        return io.NodeOutput(causal_loader.apply_lora(model, lora_name, strength))
