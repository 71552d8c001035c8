"""The FlowCache node: chunk-wise caching and a bounded KV cache for SkyReels-V2-DF and MAGI-1 models."""
from comfy_api.latest import io

from ..cache_core.flowcache_policy import FlowCacheConfig
from ..model_patches.ar_cache import apply_flowcache
from ..model_patches.presets import PRESET_TOOLTIP, PRESETS, resolve
from .errors import named_errors
from .motioncache import ATTENTION_MODES, ATTENTION_TOOLTIP
from .prediction import prediction_inputs


class FlowCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheFlowCache",
            display_name="FlowCache (chunk-wise cache)",
            category="ARCache/cache",
            description=(
                "FlowCache for SkyReels-V2-DF: runs each window chunk by chunk (chunk-causal attention "
                "with per-layer K/V buffers; finished and history chunks are frozen) and lets every "
                "chunk skip its redundant steps on its own schedule, reusing its last residual. "
                "Optionally compresses finished chunks' K/V to a fixed budget (importance-redundancy). "
                "Works best with the Streaming AR Sampler; under a plain KSampler every chunk is active. "
                "Outputs differ from the uncached model by design (chunk-causal attention); the sampler's "
                "report shows how much of the saving came from the restructuring and how much from skipping. "
                "On MAGI-1 each chunk runs on its own with K/V written on every forward (no clean re-run), "
                "its change measured on the patch-embedded input, a skipped chunk reusing its velocity."),
            inputs=[
                io.Model.Input("model", tooltip="A SkyReels-V2-DF (Wan 2.1 t2v) model from UNETLoader, or a MAGI-1 model from MAGI-1 Model Loader."),
                io.Float.Input("rel_l1_thresh", default=0.1, min=0.0, max=5.0, step=0.005,
                               tooltip="Recompute a chunk once its accumulated change reaches this. SkyReels-V2-DF: 0.1 'slow' (best quality), 0.15 'fast' (paper); MAGI-1 (plain relative change): 0.01-0.015 in the reference configs; 0 computes every step."),
                io.Int.Input("warmup_steps", default=5, min=0, max=100,
                             tooltip="Each chunk's first denoising steps, always computed (5 in the paper)."),
                io.Int.Input("final_steps", default=1, min=0, max=100, optional=True,
                             tooltip="Each chunk's last denoising steps, always computed (1 in the paper)."),
                io.Combo.Input("coefficients", options=["auto", "1.3B", "14B", "none"], default="auto", optional=True,
                               tooltip="Polynomial that rescales the change indicator: auto picks by model size (1536 -> 1.3B, 5120 -> 14B, else none; MAGI-1: none)."),
                io.Int.Input("chunk_frames", default=5, min=1, max=64, optional=True,
                             tooltip="Latent frames per chunk when no AR sampler says otherwise (the Streaming AR Sampler uses its causal_block_size)."),
                io.Boolean.Input("kv_compress", default=False, optional=True,
                                 tooltip="Squeeze finished chunks' K/V to a fixed budget: memory stays bounded for long windows."),
                io.Int.Input("kv_budget_chunks", default=1, min=1, max=64, optional=True,
                             tooltip="History budget, in chunks' worth of tokens per head (1 in the paper)."),
                io.Float.Input("kv_lambda", default=0.07, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Importance weight: score = lambda * importance - (1 - lambda) * redundancy (0.07 in the paper)."),
                io.Int.Input("max_score_queries", default=256, min=1, max=65536, optional=True,
                             tooltip="At most this many queries score the history when compressing (bounds its cost)."),
                io.Boolean.Input("skip_redundant_steps", default=True, optional=True,
                                 tooltip="Off: chunk-causal restructuring only, every active chunk computed (for measuring what skipping adds)."),
                io.Combo.Input("attention", options=list(ATTENTION_MODES), default="chunk_causal", optional=True,
                               tooltip=ATTENTION_TOOLTIP),
                io.Combo.Input("preset", options=list(PRESETS), default="custom", optional=True,
                               tooltip="Sets rel_l1_thresh, attention, predict_order and reuse_thresh. " + PRESET_TOOLTIP),
                *prediction_inputs("rel_l1_thresh"),
            ],
            outputs=[io.Model.Output(tooltip="The model with FlowCache; bypass this node to get the original model back.")],
        )

    @classmethod
    @named_errors("FlowCache")
    def execute(cls, model, rel_l1_thresh, warmup_steps, final_steps=1, coefficients="auto", chunk_frames=5,
                kv_compress=False, kv_budget_chunks=1, kv_lambda=0.07, max_score_queries=256,
                skip_redundant_steps=True, attention="chunk_causal", preset="custom", predict_order=0,
                reuse_thresh=0.0) -> io.NodeOutput:
        s = resolve("flowcache", preset, model, coefficients, rel_l1_thresh, attention, predict_order, reuse_thresh)
        config = FlowCacheConfig(rel_l1_thresh=s.threshold, warmup_steps=warmup_steps, final_steps=final_steps,
                                 coefficients=coefficients, chunk_frames=chunk_frames, kv_compress=kv_compress,
                                 kv_budget_chunks=kv_budget_chunks, kv_lambda=kv_lambda,
                                 max_score_queries=max_score_queries, predict_order=s.predict_order,
                                 reuse_thresh=s.reuse_thresh)
        return io.NodeOutput(apply_flowcache(model, config, skip=skip_redundant_steps, attention=s.attention))
