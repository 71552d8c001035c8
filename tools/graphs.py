"""API-prompt builders for the pack's graphs (tests, demo and bench share them)."""
from __future__ import annotations

DF_SCHEDULE_DEFAULTS = dict(window_frames=97, overlap_frames=17, ar_step=0, causal_block_size=1,
                            addnoise_condition=20, solver="unipc", shift=0.0, fps=24, prefix_mode="auto")


class Graph:
    """A tiny builder: `g.add("UNETLoader", unet_name=...)` returns a node id; `g.out(id, slot)` links."""

    def __init__(self):
        self.prompt: dict = {}

    def add(self, class_type: str, node_id: str | None = None, **inputs) -> str:
        nid = node_id or str(len(self.prompt) + 1)
        self.prompt[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    @staticmethod
    def out(nid: str, slot: int = 0) -> list:
        return [nid, slot]


def streaming_graph(unet: str, *, width=64, height=64, length=17, seed=0, steps=4, cfg=1.0,
                    schedule: dict | None = None, vae: str | None = None, cache: dict | None = None,
                    cond_value: float = 0.0, save_prefix: str = "latents/arcache", sampler_extra: dict | None = None,
                    sigmas_steps: int | None = None) -> tuple[Graph, str]:
    """UNETLoader -> [cache] -> ARCacheStreamingSampler -> SaveLatent. Returns (graph, sampler id)."""
    g = Graph()
    model = g.add("UNETLoader", unet_name=unet, weight_dtype="default")
    model_out = g.out(model)
    if cache:
        cache = dict(cache)
        kind = cache.pop("class_type")
        model_out = g.out(g.add(kind, model=model_out, **cache))
    pos = g.add("ARCacheEmptyConditioning", value=cond_value)
    neg = g.add("ARCacheEmptyConditioning", value=0.0)
    extra = dict(sampler_extra or {})
    if schedule is not None or sigmas_steps:
        sch = dict(DF_SCHEDULE_DEFAULTS, **(schedule or {}))
        if sigmas_steps:
            sch["sigmas"] = g.out(g.add("BasicScheduler", model=model_out, scheduler="simple",
                                        steps=sigmas_steps, denoise=1.0))
        extra["schedule"] = g.out(g.add("ARCacheDFSchedule", **sch))
    if vae:
        extra["vae"] = g.out(g.add("VAELoader", vae_name=vae))
    sampler = g.add("ARCacheStreamingSampler", model=model_out, positive=g.out(pos), negative=g.out(neg),
                    width=width, height=height, length=length, seed=seed, steps=steps, cfg=cfg, **extra)
    g.add("SaveLatent", samples=g.out(sampler), filename_prefix=save_prefix)
    return g, sampler
