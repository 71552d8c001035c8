"""The MotionCache node: token-wise, motion-weighted reuse for SkyReels-V2-DF and MAGI-1 models."""
from comfy_api.latest import io

from ..cache_core.chunk_executor import ATTENTION_MODES
from ..cache_core.motioncache_policy import MOTION_SOURCES, MotionCacheConfig
from ..model_patches.ar_cache import apply_motioncache
from ..model_patches.presets import PRESET_TOOLTIP, PRESETS, resolve
from .errors import named_errors
from .prediction import prediction_inputs

ATTENTION_TOOLTIP = (
    "chunk_causal: each chunk attends to itself and earlier chunks, finished chunks frozen (the papers' "
    "restructuring; fastest). bidirectional: the window attends as the uncached model does; reused chunks "
    "and tokens keep their last K/V (closest to the uncached video).")


class MotionCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheMotionCache",
            display_name="MotionCache (token-wise cache)",
            category="ARCache/cache",
            description=(
                "MotionCache for SkyReels-V2-DF: like FlowCache each chunk runs its own cache schedule, but after "
                "a chunk-wise phase every token decides for itself, weighted by how much it moves (inter-frame "
                "differences): static tokens reuse their last result longer, moving ones are recomputed. "
                "Recomputed tokens run the transformer alone (their RoPE and modulation at their true "
                "positions); the others keep their K/V. The sampler's report gives the token fraction computed."),
            inputs=[
                io.Model.Input("model", tooltip="A SkyReels-V2-DF (Wan 2.1 t2v) model from UNETLoader, or a MAGI-1 model from MAGI-1 Model Loader (token subsets run against the chunk's cached K/V)."),
                io.Float.Input("threshold", default=0.1, min=0.0, max=5.0, step=0.005,
                               tooltip="A token is recomputed once its motion-weighted accumulated change reaches this (0.1 in the paper); 0 computes every step."),
                io.Int.Input("warmup_steps", default=4, min=0, max=100,
                             tooltip="Each chunk's first warmup_steps + 1 denoising steps are always computed (4 in the paper)."),
                io.Int.Input("phase1_updates", default=6, min=0, max=100, optional=True,
                             tooltip="Chunk-wise recomputes after the warm-up before the token-wise phase starts (6 in the paper)."),
                io.Float.Input("weight_floor", default=0.6, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Motion weights span [floor, 1]: the stillest tokens accumulate change at this rate (0.6)."),
                io.Float.Input("min_update_ratio", default=0.4, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="When fewer than this share of a chunk's tokens would be recomputed, the chunk is reused whole this step (0.4)."),
                io.Float.Input("vote", default=0.5, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="Column voting: a spatial position is recomputed in all of the chunk's frames when more than this share of them want it (0.5; 0 off)."),
                io.Combo.Input("motion_source", options=list(MOTION_SOURCES), default="hidden", optional=True,
                               tooltip="hidden: inter-frame differences of the final hidden states (SkyReels reference; on MAGI-1 of the velocity); latents: of the input latents (MAGI reference)."),
                io.Combo.Input("attention", options=list(ATTENTION_MODES), default="chunk_causal", optional=True,
                               tooltip=ATTENTION_TOOLTIP),
                io.Combo.Input("coefficients", options=["auto", "1.3B", "14B", "none"], default="auto", optional=True,
                               tooltip="Polynomial that rescales the change indicator: auto picks by model size (1536 -> 1.3B, 5120 -> 14B, else none)."),
                io.Int.Input("chunk_frames", default=5, min=1, max=64, optional=True,
                             tooltip="Latent frames per chunk when no AR sampler says otherwise (the Streaming AR Sampler uses its causal_block_size)."),
                io.Combo.Input("preset", options=list(PRESETS), default="custom", optional=True,
                               tooltip="Sets threshold, attention, predict_order and reuse_thresh. " + PRESET_TOOLTIP),
                *prediction_inputs("threshold"),
            ],
            outputs=[io.Model.Output(tooltip="The model with MotionCache; bypass this node to get the original model back.")],
        )

    @classmethod
    @named_errors("MotionCache")
    def execute(cls, model, threshold, warmup_steps, phase1_updates=6, weight_floor=0.6, min_update_ratio=0.4,
                vote=0.5, motion_source="hidden", attention="chunk_causal", coefficients="auto",
                chunk_frames=5, preset="custom", predict_order=0, reuse_thresh=0.0) -> io.NodeOutput:
        s = resolve("motioncache", preset, model, coefficients, threshold, attention, predict_order, reuse_thresh)
        config = MotionCacheConfig(threshold=s.threshold, warmup_steps=warmup_steps, phase1_updates=phase1_updates,
                                   weight_floor=weight_floor, min_update_ratio=min_update_ratio, vote=vote,
                                   motion_source=motion_source, coefficients=coefficients, chunk_frames=chunk_frames,
                                   predict_order=s.predict_order, reuse_thresh=s.reuse_thresh)
        return io.NodeOutput(apply_motioncache(model, config, s.attention))
