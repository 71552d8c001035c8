"""The Drift Anchor node: hold a long video's colour and contrast to its start (or to an image)."""
from comfy_api.latest import io

from ..cache_core.drift import DriftAnchor
from ..cache_core.errors import require_finite
from ..model_patches.video_run import check_image
from .errors import InputError, named_errors

AnchorType = io.Custom("ARCACHE_DRIFT_ANCHOR")


class DriftAnchorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheDriftAnchor",
            display_name="Drift Anchor",
            category="ARCache/sampling",
            description=(
                "Against colour and contrast drift in long videos: every new window (SkyReels-V2-DF) or chunk "
                "(MAGI-1) has its latent statistics (per-channel mean and spread) pulled towards the anchor's, "
                "the first window/chunk of the video or an image you give. Without an image, a new prompt from the "
                "Prompt Schedule re-anchors to its own first window/chunk, so the anchor never fights a prompt "
                "change; an image holds for every prompt. "
                "Off unless connected to the Streaming AR Sampler's anchor input; strength 0 changes nothing."),
            inputs=[
                io.Float.Input("strength", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="0: no change; 1: each window/chunk takes the anchor's per-channel mean and spread exactly."),
                io.Image.Input("image", optional=True,
                               tooltip="Anchor to this image's colours instead of the video's first window/chunk (encoded with the sampler's vae; resized to the video's size)."),
            ],
            outputs=[AnchorType.Output(display_name="anchor", tooltip="Connect to the Streaming AR Sampler's anchor input.")],
        )

    @classmethod
    @named_errors("Drift Anchor")
    def execute(cls, strength, image=None) -> io.NodeOutput:
        require_finite("strength", strength)
        if not 0.0 <= strength <= 1.0:
            raise InputError("strength", f"{strength}: choose a value from 0 (off) to 1 (the anchor's statistics exactly)")
        check_image("image", image)
        return io.NodeOutput(DriftAnchor(strength, image))
