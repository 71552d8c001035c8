"""Decode a video's latents piece by piece, as they are finished, into the frames `VAEDecode` gives
for the whole video.

A stream decoder is fed the output video's raw latents in order (`push`), any number at a time,
and returns the pixel frames of what it could decode so far; `flush` returns the rest at the end.
The concatenation of everything it returns equals `VAEDecode(LATENT)` of the whole video:
- Wan 2.1 VAE (`WanStreamDecoder`): the decoder is causal and core's `WanVAE.decode` already runs
  it frame group by frame group over one feature cache, so the stream keeps that cache alive
  across pieces and feeds the same groups. ComfyUI 0.3.75 feeds one latent frame per call; the
  newest core the first frame alone, then pairs (its `count_cache_layers`), so an odd trailing
  frame is held back until the next piece or the end. The first piece is also decoded whole with
  `vae.decode` and compared: if a core ever changes the loop again, the run warns and falls back
  to `RedecodeStreamDecoder` instead of streaming another video than the file.
- MAGI-1 VAE (`SlabStreamDecoder`): decodes in temporal tiles of 3 latent frames with no overlap
  in time, so whole tiles aligned to the video's first frame decode exactly as in the full video.
- Anything else (`RedecodeStreamDecoder`): each piece decoded with a few latents of context before
  it; close to, not equal to, the whole decode (the report says "approximate").
- No VAE (`PreviewStreamDecoder`): the family's linear latent-to-RGB preview (the sampler preview's
  colours), each latent frame shown for the pixel frames it stands for: a live view without a
  decode, not the video.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management

EXACT_TOLERANCE = 1.0 / 255     # pixel values in 0..1: below one uint8 step counts as the same video


def _frames(vae, out: torch.Tensor) -> torch.Tensor:
    """A decoder's output [B, 3, n, H, W] as VAEDecode gives it: [n, H, W, 3] floats in 0..1, on CPU."""
    img = vae.process_output(out.to(vae.output_device).float()).movedim(1, -1)
    return img.reshape(-1, *img.shape[-3:]).float().cpu()


def decode_whole(vae, latents: torch.Tensor) -> torch.Tensor:
    """What VAEDecode gives for raw latents [1, C, F, h, w]: frames [N, H, W, 3] in 0..1, on CPU."""
    img = vae.decode(latents)
    return img.reshape(-1, *img.shape[-3:]).float().cpu()


def _empty() -> torch.Tensor:
    return torch.zeros(0, 1, 1, 3)


def rgb_preview(raw: torch.Tensor, latent_format) -> torch.Tensor:
    """Raw latent [B, C, F, h, w] -> frames [B*F, h, w, 3] in 0..1 through a latent format's linear
    preview factors (what ComfyUI's Latent2RGB previewer draws)."""
    x = latent_format.process_in(raw.float())
    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=x.dtype)          # [C, 3]
    bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=x.dtype)
    rgb = torch.einsum("bcfhw,cr->bfhwr", x, factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1).reshape(-1, *rgb.shape[2:])


class PreviewStreamDecoder:
    """Frames from the family's latent-to-RGB factors, upscaled to the video's size (nearest), each
    latent frame repeated for the pixel frames it decodes to, so the timeline counts video frames."""

    exact = False
    pixels = False                    # not the video's pixels: no drift measure on them
    status = {"mode": "latent_preview"}

    def __init__(self, family):
        self.family, self.format, self.fed = family, family.latent_format(), 0

    def push(self, z: torch.Tensor) -> torch.Tensor:
        if not z.shape[2]:
            return _empty()
        fam = self.family
        rgb = rgb_preview(z.cpu(), self.format)
        rgb = rgb.repeat_interleave(fam.spatial_stride, 1).repeat_interleave(fam.spatial_stride, 2)
        counts = torch.full((z.shape[2],), fam.temporal_stride)
        if fam.causal_vae and self.fed == 0:
            counts[0] = 1                # a causal VAE's first latent is one frame
        self.fed += z.shape[2]
        return rgb.repeat_interleave(counts, 0)

    def flush(self) -> torch.Tensor:
        return _empty()


class RedecodeStreamDecoder:
    """Each piece decoded by `vae.decode` together with up to `context` latents before it, whose
    frames are dropped. Not the whole video's decode for causal VAEs (the cache restarts at the
    context), so `exact` is False."""

    exact = False
    pixels = True
    status = {"mode": "approximate"}

    def __init__(self, vae, frames_per_latent: int = 4, context: int = 4):
        self.vae, self.per, self.context = vae, frames_per_latent, max(1, context)
        self.tail = None            # the last latents fed, as context for the next piece

    def follow(self, z: torch.Tensor) -> None:
        """Latents already decoded elsewhere: only their tail is kept, as the next piece's context."""
        self.tail = z[:, :, -self.context:]

    def push(self, z: torch.Tensor) -> torch.Tensor:
        if not z.shape[2]:
            return _empty()
        first = self.tail is None   # the video's first latents: the decoder's first frame is really first
        full = z if first else torch.cat([self.tail, z], 2)
        frames = decode_whole(self.vae, full)
        self.follow(full)
        return frames if first else frames[-z.shape[2] * self.per:]

    def flush(self) -> torch.Tensor:
        return _empty()


class SlabStreamDecoder:
    """Decodes whole temporal tiles (`slab` latent frames, counted from the video's first frame) with
    `vae.decode`; a remainder waits for the next piece or `flush`. Exact for VAEs whose temporal
    tiles do not overlap (MAGI-1's)."""

    exact = True
    pixels = True
    status = {"mode": "exact"}

    def __init__(self, vae, slab: int):
        self.vae, self.slab = vae, max(1, int(slab))
        self.held = None

    def push(self, z: torch.Tensor) -> torch.Tensor:
        z = z if self.held is None else torch.cat([self.held, z], 2)
        n = z.shape[2] // self.slab * self.slab
        self.held = z[:, :, n:] if n < z.shape[2] else None
        return decode_whole(self.vae, z[:, :, :n]) if n else _empty()

    def flush(self) -> torch.Tensor:
        held, self.held = self.held, None
        return decode_whole(self.vae, held) if held is not None else _empty()


class WanStreamDecoder:
    """The Wan 2.1 VAE's own decode loop, with its feature cache carried from piece to piece (see the
    module docstring). Mirrors what `comfy.sd.VAE.decode` does around the model: load it with the
    memory the piece needs, cast to the VAE's dtype and device, process the output."""

    exact = True
    pixels = True

    def __init__(self, vae):
        import comfy.ldm.wan.vae as wan_vae
        self.vae, self.model = vae, vae.first_stage_model
        counter = getattr(wan_vae, "count_cache_layers", None)       # newest core: frame 0, then pairs
        self.pairs = counter is not None
        self.feat = [None] * (counter or wan_vae.count_conv3d)(self.model.decoder)
        self.fed = 0                 # latent frames given to the decoder so far
        self.held = None             # pair mode: a conv2'd frame waiting for its partner

    def _decoder(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.decoder(x, feat_cache=self.feat, feat_idx=[0])
        return out if torch.is_tensor(out) else torch.cat(out, 2)

    def _groups(self, x: torch.Tensor):
        """The frame groups core's decode feeds, for the next frames x (conv2 applied)."""
        if not self.pairs:
            for i in range(x.shape[2]):
                yield x[:, :, i:i + 1]
            return
        i = 0
        if self.fed == 0 and x.shape[2]:
            yield x[:, :, :1]
            i = 1
        if self.held is not None:
            x = torch.cat([self.held, x[:, :, i:]], 2)
            self.held, i = None, 0
        while i + 2 <= x.shape[2]:
            yield x[:, :, i:i + 2]
            i += 2
        if i < x.shape[2]:
            self.held = x[:, :, i:]

    def push(self, z: torch.Tensor) -> torch.Tensor:
        if not z.shape[2]:
            return _empty()
        vae = self.vae
        comfy.model_management.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(z.shape, vae.vae_dtype),
                                               force_full_load=getattr(vae, "disable_offload", False))
        x = self.model.conv2(z.to(vae.vae_dtype).to(vae.device))     # a 1x1x1 conv: frame by frame
        outs = []
        for group in self._groups(x):
            outs.append(self._decoder(group))
            self.fed += group.shape[2]
        return _frames(vae, torch.cat(outs, 2)) if outs else _empty()

    def flush(self) -> torch.Tensor:
        if self.held is None:
            return _empty()
        held, self.held = self.held, None
        out = self._decoder(held)
        self.fed += held.shape[2]
        return _frames(self.vae, out)


class CheckedStreamDecoder:
    """A stream decoder whose first piece is checked against `vae.decode` of the same latents; on a
    difference above EXACT_TOLERANCE it warns once and hands over to `fallback()` for the rest of
    the run. `status` says which decode the video got ({"mode": exact | approximate, "max_abs"})."""

    pixels = True

    def __init__(self, decoder, vae, fallback):
        self.decoder, self.vae, self.fallback = decoder, vae, fallback
        self.checked = False
        self.status = {"mode": "exact" if decoder.exact else "approximate", "max_abs": None}

    def push(self, z: torch.Tensor) -> torch.Tensor:
        frames = self.decoder.push(z)
        if self.checked or not z.shape[2] or not self.decoder.exact:
            return frames
        self.checked = True
        whole = decode_whole(self.vae, z)
        # the stream's frames are the first ones of the whole decode (a held frame comes later)
        ref = whole[:frames.shape[0]]
        diff = float((frames - ref).abs().max()) if frames.shape == ref.shape else float("inf")
        self.status["max_abs"] = diff
        if diff <= EXACT_TOLERANCE:
            return frames
        logging.warning("ARCache: streaming decode differs from VAEDecode on the first piece (max %.4g); this "
                        "ComfyUI's VAE decode loop is not the one the pack mirrors, so each piece is decoded with "
                        "context instead (close to, not equal to, VAEDecode of the whole video)", diff)
        self.decoder = self.fallback()
        self.status["mode"] = "approximate"
        self.decoder.follow(z)    # its context; the frames are the whole decode's, decoded above
        return whole

    def flush(self) -> torch.Tensor:
        return self.decoder.flush()
