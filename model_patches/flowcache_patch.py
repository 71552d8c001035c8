"""FlowCache on a ComfyUI MODEL: a clone with keyed wrappers, state cloned per sampling run.

The config lives in the clone's transformer_options; each sampling run (OUTER_SAMPLE) gets a
fresh `WanChunkedState` that the DIFFUSION_MODEL wrapper uses, and drops it in `finally`, so an
interrupted run leaves nothing behind and the original model is never touched.
"""
from __future__ import annotations

import comfy.model_patcher
import comfy.patcher_extension

from ..cache_core.flowcache_policy import FlowCacheConfig
from . import wan
from .wan_chunked import WanChunkedState, forward_chunked, supports

CONFIG_KEY = "arcache_flowcache_config"
STATE_KEY = "arcache_flowcache"
WRAPPER_KEY = "arcache_flowcache"
AR_CACHE_KEYS = (CONFIG_KEY, "arcache_motioncache_config")   # one AR cache per model


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    options = guider.model_options["transformer_options"]
    config, skip = options[CONFIG_KEY]
    state = options[STATE_KEY] = WanChunkedState(config, skip=skip)
    try:
        return executor(*args, **kwargs)
    finally:
        state.reset()            # frees the K/V buffers
        guider.model_options = original


def diffusion_model_wrapper(executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                            transformer_options={}, **kwargs):
    state = transformer_options.get(STATE_KEY)
    dm = executor.class_obj
    if state is None or not supports(dm):
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)
    return forward_chunked(dm, x, timestep, context, transformer_options, state, clip_fea=clip_fea,
                           time_dim_concat=time_dim_concat, **kwargs)


def apply_flowcache(model, config: FlowCacheConfig, skip: bool = True):
    """Return a clone of `model` that runs chunk-causally with FlowCache's skipping."""
    dm = wan.wan_transformer(model)
    if not supports(dm):
        raise wan.ModelFamilyError(f"FlowCache serves plain Wan 2.1 transformers; this is "
                                   f"{wan.describe_model(model.model)} with a changed forward")
    stacked = [k for k in AR_CACHE_KEYS if k in model.model_options.get("transformer_options", {})]
    if stacked:
        raise wan.ModelFamilyError("an AR cache (FlowCache/MotionCache) is already applied to this model; "
                                   "connect the loader's MODEL instead of stacking two AR caches")
    m = model.clone()
    m.model_options["transformer_options"][CONFIG_KEY] = (config, skip)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
    return m
