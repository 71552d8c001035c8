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


MAGI_SCHEDULE_DEFAULTS = dict(chunk_width=6, window_size=4, shift=3.0, distill="auto", history_scale=1.5, guidance_until=0.3,
                              nearly_clean_threshold=0.3, nearly_clean_weight=0.7, kv_range="5,4,3,2",
                              kv_on_cpu=False, fps=24)
TINY_MAGI = "tiny_magi1_4.5b_layout/inference_weight/model.safetensors.index.json"


def magi_graph(model: str = TINY_MAGI, *, width=64, height=64, length=33, seed=0, steps=4, cfg=7.5,
               variant="auto", schedule: dict | None = None, vae: str | None = None, text="a red ball rolls",
               start_image: str | None = None, prefix_video: str | None = None, save_prefix="latents/magi",
               sampler_extra: dict | None = None, positive_node: tuple | None = None) -> tuple[Graph, str]:
    """MAGI-1 loaders -> ARCacheStreamingSampler (MAGI-1 schedule) -> SaveLatent; the tests' tiny
    T5 (testkit) stands in for T5-XXL. Returns (graph, sampler id)."""
    g = Graph()
    model_out = g.out(g.add("ARCacheMagiModelLoader", model_name=model, variant=variant, weight_dtype="default"))
    if positive_node is None:
        clip = g.add("TestkitTinyT5Loader", seed=0)
        pos = g.add("ARCacheMagiTextEncode", clip=g.out(clip), text=text, special_tokens="special_tokens.npz")
    else:
        pos = g.add(positive_node[0], **positive_node[1])
    extra = dict(sampler_extra or {})
    extra["schedule"] = g.out(g.add("ARCacheMagiSchedule", **dict(MAGI_SCHEDULE_DEFAULTS, **(schedule or {}))))
    if vae or start_image or prefix_video:
        extra["vae"] = g.out(g.add("ARCacheMagiVAELoader", vae_name=vae or "tiny_magi1_vae.safetensors"))
    if start_image:
        extra["start_image"] = g.out(g.add("LoadImage", image=start_image))
    if prefix_video:
        frames = g.add("GetVideoComponents", video=g.out(g.add("LoadVideo", file=prefix_video)))
        extra["prefix_latent"] = g.out(g.add("VAEEncode", pixels=g.out(frames), vae=extra["vae"]))
    sampler = g.add("ARCacheStreamingSampler", model=model_out, positive=g.out(pos), negative=g.out(pos),
                    width=width, height=height, length=length, seed=seed, steps=steps, cfg=cfg, **extra)
    g.add("SaveLatent", samples=g.out(sampler), filename_prefix=save_prefix)
    return g, sampler


def live_graph(unet: str, *, vae: str | None = None, width=64, height=64, length=201, steps=6, seed=7,
               schedule: dict | None = None, view_size=256) -> dict:
    """A SkyReels-V2-DF run with a Live View of two prompts, in build_workflows' compact UI form
    ({key: (type, widgets, links)}), for pages that queue it themselves (tests, docs)."""
    sch = dict(DF_SCHEDULE_DEFAULTS, window_frames=17, overlap_frames=5, ar_step=1, causal_block_size=1)
    sch.update(schedule or {})
    graph = {
        "unet": ("UNETLoader", dict(unet_name=unet, weight_dtype="default"), {}),
        "pos": ("ARCacheEmptyConditioning", dict(value=0.0), {}),
        "other": ("ARCacheEmptyConditioning", dict(value=2.0), {}),
        "schedule": ("ARCacheDFSchedule", sch, {}),
        "slots": ("ARCachePromptSchedule", {}, {"prompt_1": ("pos", 0), "prompt_2": ("other", 0)}),
        "live": ("ARCacheLiveView", dict(replay="", view_size=view_size, ring_frames=720), {"prompts": ("slots", 0)}),
        "sampler": ("ARCacheStreamingSampler",
                    dict(width=width, height=height, length=length, seed=seed, steps=steps, cfg=1.0, save_video=False,
                         filename_prefix="ARCache/live"),
                    {"model": ("unet", 0), "positive": ("pos", 0), "negative": ("pos", 0),
                     "schedule": ("schedule", 0), "live": ("live", 0)}),
    }
    if vae:
        graph["vae"] = ("VAELoader", dict(vae_name=vae), {})
        graph["sampler"][2]["vae"] = ("vae", 0)
    return graph


CAUSAL_SCHEDULE_DEFAULTS = dict(chunk_frames=3, denoising_steps="1000, 750, 500, 250", warp=True, shift=5.0,
                                context_noise=0, attention_frames=0, sink_frames=0, switch="recache", fps=16,
                                solver="renoise", first_frame="own_chunk", unipc_steps=4)


def causal_graph(ckpt: str = "tiny_self_forcing_layout.pt", *, loader: str = "ARCacheCausalWanLoader", weights="auto",
                 width=64, height=64, length=33, seed=0, cfg=1.0, schedule: dict | None = None,
                 lora: tuple | None = None, vae: str | None = None, prompts: tuple = (0.0,), negative=0.0,
                 save_prefix="latents/causal", sampler_extra: dict | None = None,
                 cache: dict | None = None, steps: int = 4, with_schedule: bool = True) -> tuple[Graph, str]:
    """A causal Wan loader -> [LoRA] -> ARCacheStreamingSampler (Causal Schedule) -> SaveLatent; prompts
    are ARCacheEmptyConditioning values, several make a per-chunk Prompt Schedule. Returns (graph, sampler id)."""
    g = Graph()
    if loader == "UNETLoader":
        model = g.out(g.add("UNETLoader", unet_name=ckpt, weight_dtype="default"))
    else:
        model = g.out(g.add(loader, ckpt_name=ckpt, weights=weights, weight_dtype="default"))
    if lora:
        model = g.out(g.add("ARCacheCausalWanLora", model=model, lora_name=lora[0], strength=lora[1]))
    if cache:
        cache = dict(cache)
        model = g.out(g.add(cache.pop("class_type"), model=model, **cache))
    conds = [g.add("ARCacheEmptyConditioning", value=v) for v in prompts]
    neg = g.add("ARCacheEmptyConditioning", value=negative)
    extra = dict(sampler_extra or {})
    if with_schedule:
        extra["schedule"] = g.out(g.add("ARCacheCausalSchedule", **dict(CAUSAL_SCHEDULE_DEFAULTS, **(schedule or {}))))
    if len(conds) > 1:
        extra["prompt_schedule"] = g.out(g.add("ARCachePromptSchedule", **{f"prompt_{i + 1}": g.out(c)
                                                                         for i, c in enumerate(conds[:4])}))
    if vae:
        extra["vae"] = g.out(g.add("VAELoader", vae_name=vae))
    sampler = g.add("ARCacheStreamingSampler", model=model, positive=g.out(conds[0]), negative=g.out(neg),
                    width=width, height=height, length=length, seed=seed, steps=steps, cfg=cfg, **extra)
    g.add("SaveLatent", samples=g.out(sampler), filename_prefix=save_prefix)
    return g, sampler
