"""Bad input inside a real ComfyUI: every error names the node and the input, and the next good
run is bit-identical to one made before the error."""
from __future__ import annotations

import math
import uuid

import pytest

from tools.comfy_server import ComfyError
from tools.graphs import streaming_graph

UNET, VAE = "tiny_skyreels_df_1.3b_layout.safetensors", "tiny_wan21_vae.safetensors"
SMALL = dict(window_frames=17, overlap_frames=5)


def good(comfy, seed=31):
    g, _ = streaming_graph(UNET, length=17, seed=seed, steps=2, cfg=2.0, schedule=SMALL,
                           save_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    entry = comfy.run(g.prompt)
    return comfy.saved_latent(entry, next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent"))


def with_prefix(node: str, **inputs):
    def build():
        g, sid = streaming_graph(UNET, length=17, seed=1, steps=2, schedule=SMALL, save_prefix="latents/bad")
        g.prompt[sid]["inputs"]["prefix_latent"] = g.out(g.add(node, width=64, height=64, **inputs))
        return g
    return build


def with_start_image(batch: int):
    def build():
        g, sid = streaming_graph(UNET, length=17, seed=1, steps=2, schedule=SMALL, vae=VAE, save_prefix="latents/bad")
        g.prompt[sid]["inputs"]["start_image"] = g.out(g.add("EmptyImage", width=64, height=64, batch_size=batch,
                                                              color=0))
        return g
    return build


def plain(**kw):
    def build():
        args = dict(length=17, seed=1, steps=2, schedule=SMALL, save_prefix="latents/bad")
        args.update(kw)
        return streaming_graph(UNET, **args)[0]
    return build


CASES = {
    "prefix_12_channels": (with_prefix("EmptyMochiLatentVideo", length=7, batch_size=1),
                           "Streaming AR Sampler, prefix_latent: has 12 channels"),
    "prefix_image_latent": (with_prefix("EmptyLatentImage", batch_size=1),
                            "Streaming AR Sampler, prefix_latent: is a 4-D latent"),
    "prefix_batch_2": (with_prefix("EmptyHunyuanLatentVideo", length=9, batch_size=2),
                       "Streaming AR Sampler, prefix_latent: holds a batch of 2 videos"),
    "start_image_batch_2": (with_start_image(2), "Streaming AR Sampler, start_image: holds 2 images"),
    "cfg_nan": (plain(cfg=math.nan), "Streaming AR Sampler, cfg: is nan"),
    "shift_nan": (plain(schedule=dict(SMALL, shift=math.nan)), "Diffusion Forcing Schedule, shift: is nan"),
    "rel_l1_thresh_nan": (plain(cache=dict(class_type="ARCacheFlowCache", rel_l1_thresh=math.nan, warmup_steps=1)),
                          "FlowCache, rel_l1_thresh: is nan"),
    "filename_prefix_escape": (plain(vae=VAE, sampler_extra={"save_video": True, "filename_prefix": "../../escaped"}),
                               "Streaming AR Sampler, filename_prefix:"),
    "cache_block_mismatch": (plain(schedule=dict(window_frames=17, overlap_frames=5, causal_block_size=2), length=33),
                             "Streaming AR Sampler, schedule.causal_block_size:"),
}


@pytest.fixture(scope="module")
def reference(comfy):
    return good(comfy)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named_and_the_next_run_is_identical(comfy, reference, case):
    build, needle = CASES[case]
    with pytest.raises(ComfyError) as err:
        comfy.run(build().prompt)
    assert needle in str(err.value)
    assert good(comfy).equal(reference)

