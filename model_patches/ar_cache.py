"""An AR cache on a ComfyUI MODEL: a clone with keyed wrappers, a fresh cache run per sampling run.

The cache's spec (which policy, chunk size, compression, attention) lives in the clone's
transformer_options. Each sampling run goes through the OUTER_SAMPLE wrapper, which asks the
model's family for a fresh cache run (`Family.new_cache_run`: the DF chunk executor, or MAGI-1's
cache run), puts it into transformer_options under CACHE_RUN_KEY and drops it in `finally`, so
an interrupted run leaves nothing behind and the original model is never touched. A family whose
model calls go through ComfyUI's forward (Wan) is driven by the DIFFUSION_MODEL wrapper through
its chunk adapter; MAGI-1's run takes the cache run from transformer_options itself. Every cache
method is a policy (cache_core); this file serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import comfy.model_patcher
import comfy.patcher_extension

from ..cache_core.chunk_executor import ChunkExecutor, branch_rows
from ..cache_core.chunk_step import ChunkPolicy
from ..cache_core.errors import ModelFamilyError
from ..cache_core.flowcache_policy import FlowCacheConfig, FlowCachePolicy
from ..cache_core.kv_store import CompressConfig
from ..cache_core.motioncache_policy import MotionCacheConfig, MotionCachePolicy
from ..cache_core.record import CACHE_RUN_KEY, CACHE_WRAPPER_KEY, RECORD_KEY
from ..cache_core.run_report import REPORT_KEY
from ..cache_core.seq_parallel import NO_SP, SP_KEY
from . import families
from .video_run import MULTIGPU_NODE, core_multigpu

SPEC_KEY = "arcache_ar_cache"       # one AR cache per model
WRAPPER_KEY = CACHE_WRAPPER_KEY


@dataclass(frozen=True)
class CacheSpec:
    """What one AR cache node asked for; the family makes a fresh cache run of it per sampling run."""
    make_policy: Callable[[], ChunkPolicy]
    chunk_frames: int = 5
    compress: Optional[CompressConfig] = None
    attention: str = "chunk_causal"
    family: families.Family = None


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    spec: CacheSpec = options[SPEC_KEY]
    family = getattr(guider, "family", None) or spec.family     # a family's own run (VideoRun) says which it is
    run = None
    try:
        run = options[CACHE_RUN_KEY] = family.new_cache_run(spec)
        return executor(*args, **kwargs)
    finally:
        options.pop(CACHE_RUN_KEY, None)
        if run is not None:
            run.reset()          # frees the K/V buffers
        guider.model_options = original


def _steps_per_chunk(record, transformer_options: dict) -> int:
    if record is not None:
        return int(record.steps)
    sigmas = transformer_options.get("sample_sigmas")
    if sigmas is not None and len(sigmas) > 1:
        return len(sigmas) - 1
    return 1 << 30   # unknown: no forced final step


def diffusion_model_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                            transformer_options={}, **kwargs):
    run: ChunkExecutor | None = transformer_options.get(CACHE_RUN_KEY)
    dm = executor.class_obj
    family = families.family_of(dm)
    if run is None or family is None or family.chunk_adapter is None:
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    if transformer_options.get("multigpu_thread_device") is not None:   # newer core: threads share the run state
        raise ModelFamilyError(f"AR caches cannot run under core multi-GPU: remove the {MULTIGPU_NODE} node "
                               "or the cache node")
    return forward_chunkwise(run, family.chunk_adapter(dm), x, timestep, context, transformer_options,
                             clip_fea=clip_fea, time_dim_concat=time_dim_concat, **kwargs)


def forward_chunkwise(run: ChunkExecutor, adapter, x, timestep, context, transformer_options: dict, **kwargs):
    """One model call through the chunk executor: what the model's own forward returns."""
    record = transformer_options.get(RECORD_KEY)
    call = adapter.embed(x, timestep, context, transformer_options, record=record, **kwargs)
    return run.forward(adapter, call, record, branch_rows(transformer_options.get("cond_or_uncond"), x.shape[0]),
                       _steps_per_chunk(record, transformer_options), transformer_options.get(REPORT_KEY),
                       transformer_options.get(SP_KEY, NO_SP))


def apply_ar_cache(model, spec: CacheSpec):
    """Return a clone of `model` that runs chunk-wise with the cache `spec` describes."""
    family, dm = spec.family, spec.family.transformer(model)
    if not family.supports_chunks(dm):
        raise ModelFamilyError(f"chunk-wise caches serve plain {family.title} transformers; this one has a "
                               f"changed forward ({type(dm).__name__})")
    if SPEC_KEY in model.model_options.get("transformer_options", {}):
        raise ModelFamilyError("an AR cache (FlowCache/MotionCache) is already applied to this model; "
                               "connect the loader's MODEL instead of stacking two AR caches")
    if core_multigpu(model):
        raise ModelFamilyError(f"AR caches cannot run under core multi-GPU (cond and uncond in threads on "
                               f"different GPUs): remove the {MULTIGPU_NODE} node")
    m = model.clone()
    m.model_options["transformer_options"][SPEC_KEY] = spec
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return m


def flowcache_spec(config: FlowCacheConfig, family: families.Family, dm, skip: bool = True,
                   attention: str = "chunk_causal") -> CacheSpec:
    """FlowCache (skip=False: the chunk restructuring alone, every active chunk computed)."""
    coefficients = family.coefficients(config.coefficients, dm)     # refused here when unknown
    make_policy = (lambda: FlowCachePolicy(config, coefficients)) if skip else ChunkPolicy
    compress = None
    if config.kv_compress:
        compress = CompressConfig(budget_chunks=config.kv_budget_chunks, lam=config.kv_lambda,
                                  kernel=config.kv_pool_kernel, max_queries=config.max_score_queries)
    spec = CacheSpec(make_policy, config.chunk_frames, compress, attention, family)
    family.check_cache_spec(spec)   # settings the family cannot run are refused here, by name
    return spec


def apply_flowcache(model, config: FlowCacheConfig, skip: bool = True, attention: str = "chunk_causal"):
    """FlowCache on a MODEL: a clone that runs chunk-wise and skips redundant chunk steps."""
    family, dm = families.detect(model)
    return apply_ar_cache(model, flowcache_spec(config, family, dm, skip, attention))


def motioncache_spec(config: MotionCacheConfig, family: families.Family, dm, attention: str = "chunk_causal"):
    coefficients = family.coefficients(config.coefficients, dm)
    spec = CacheSpec(lambda: MotionCachePolicy(config, coefficients), config.chunk_frames, None, attention, family)
    family.check_cache_spec(spec)
    return spec


def apply_motioncache(model, config: MotionCacheConfig, attention: str = "chunk_causal"):
    """MotionCache on a MODEL: a clone that runs chunk-wise and recomputes only moving tokens."""
    family, dm = families.detect(model)
    return apply_ar_cache(model, motioncache_spec(config, family, dm, attention))
