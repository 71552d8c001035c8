"""A no-VAE preview of a whole video's latents, in seconds."""
from comfy_api.latest import io

from ..model_patches.families import FAMILIES
from ..model_patches.preview import latent_to_rgb
from .errors import InputError, named_errors


class LatentPreviewNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheLatentPreview",
            display_name="Latent Preview (no VAE)",
            category="ARCache/preview",
            description=(
                "Turns video latents into rough RGB frames with the model family's linear preview "
                "factors (the colours of the sampler's live preview): a look at a long video in "
                "seconds, without decoding it. One image per latent frame."),
            inputs=[
                io.Latent.Input("samples", tooltip="Video latents, e.g. the Streaming AR Sampler's LATENT."),
                io.Combo.Input("family", options=[k for k, f in FAMILIES.items() if f.latent_format.latent_rgb_factors],
                               default="wan21",
                               tooltip="Latent space: wan21 for SkyReels-V2-DF and Wan 2.1."),
                io.Int.Input("upscale", default=8, min=1, max=16,
                             tooltip="Nearest-neighbour upscale of each latent pixel (8 gives the video's own size)."),
            ],
            outputs=[io.Image.Output(tooltip="One RGB frame per latent frame, 0..1.")],
        )

    @classmethod
    @named_errors("Latent Preview")
    def execute(cls, samples, family, upscale) -> io.NodeOutput:
        raw = samples["samples"]
        if raw.ndim != 5:
            raise InputError("samples", f"expected video latents [B, C, F, h, w], got shape {tuple(raw.shape)}")
        channels = FAMILIES[family].latent_channels
        if raw.shape[1] != channels:
            raise InputError("samples", f"have {raw.shape[1]} channels; family {family} has {channels}")
        frames = latent_to_rgb(raw, family)
        if upscale > 1:
            frames = frames.repeat_interleave(upscale, 1).repeat_interleave(upscale, 2)
        return io.NodeOutput(frames.contiguous())
