"""Where the cache spent its compute: a heatmap video of how often each token was recomputed."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..model_patches.families import FAMILIES, WAN21
from .errors import InputError, named_errors

HEAT_KEY = "arcache_heat"       # [latent frames, token rows, token cols] in the sampler's LATENT
FAMILY_KEY = "arcache_family"   # beside it: the family's name (its pixel and frame geometry)


def colormap(v: torch.Tensor) -> torch.Tensor:
    """0..1 -> RGB: dark blue (reused) through magenta to yellow (recomputed every step)."""
    stops = torch.tensor([[0.05, 0.05, 0.35], [0.75, 0.1, 0.55], [1.0, 0.85, 0.1]])
    x = v.clamp(0, 1) * (len(stops) - 1)
    i = x.floor().long().clamp(max=len(stops) - 2)
    t = (x - i)[..., None]
    return stops[i] * (1 - t) + stops[i + 1] * t


class ComputeHeatmapNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheComputeHeatmap",
            display_name="Compute Heatmap (where the cache worked)",
            category="ARCache/preview",
            description=(
                "Shows where FlowCache or MotionCache spent transformer compute: for every token, how many "
                "denoising steps recomputed it (yellow: every step, blue: reused), as a video aligned with "
                "the decoded frames. FlowCache recomputes whole chunks; MotionCache single tokens. Give the "
                "decoded frames to overlay it on the video."),
            inputs=[
                io.Latent.Input("samples", tooltip="The Streaming AR Sampler's LATENT from a run with FlowCache or MotionCache."),
                io.Image.Input("images", optional=True, tooltip="The decoded video (VAEDecode of the same LATENT, or Latent Preview's one image per latent frame): the heatmap is blended over it."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="How strongly the heatmap covers the frames (with images)."),
            ],
            outputs=[io.Image.Output(tooltip="One frame per video frame: the recompute heatmap (over the video with images).")],
            is_output_node=True,
        )

    @classmethod
    @named_errors("Compute Heatmap")
    def execute(cls, samples, images=None, opacity=0.6) -> io.NodeOutput:
        heat = samples.get(HEAT_KEY)
        if heat is None:
            raise InputError("samples", "carries no compute heatmap: connect the Streaming AR Sampler's LATENT "
                                        "from a run whose model went through FlowCache or MotionCache")
        family = FAMILIES.get(samples.get(FAMILY_KEY), WAN21)
        total = float(heat.sum())
        norm = heat.float() / max(float(heat.max()), 1.0)
        rgb = colormap(norm)                                        # [F, gh, gw, 3]
        px = family.spatial_stride * family.patch                   # pixels per token, each way
        rgb = rgb.repeat_interleave(px, 1).repeat_interleave(px, 2)
        stride = family.temporal_stride
        if family.causal_vae:                                       # 1 + 4 (F - 1) frames (Wan)
            frames = torch.cat([rgb[:1], rgb[1:].repeat_interleave(stride, 0)])
        else:                                                       # 4 F frames (MAGI-1)
            frames = rgb.repeat_interleave(stride, 0)
        if images is not None:
            if images.shape[0] == heat.shape[0]:              # one image per latent frame (Latent Preview)
                frames = rgb
            elif images.shape[0] != frames.shape[0]:
                raise InputError("images", f"has {images.shape[0]} frames; the video has {frames.shape[0]} "
                                           f"({heat.shape[0]} latent frames): decode the same LATENT")
            frames = frames[:, :images.shape[1], :images.shape[2]]
            frames = (1 - opacity) * images[..., :3].float().cpu() + opacity * frames
        summary = {"token_steps_computed": total, "latent_frames": int(heat.shape[0]),
                   "max_per_token": float(heat.max())}
        return io.NodeOutput(frames.contiguous(), ui={"text": [json.dumps(summary)]})
