"""What the sampler streams is the video: emitted latents equal the LATENT output, and the streamed
frames equal VAEDecode of it, bit for bit in fp32 on CPU (SkyReels-V2-DF sync and async, several
windows, both history modes, image-to-video, extension, the Drift Anchor), and an async block is
emitted at its last step (before its window ends)."""
from __future__ import annotations

import pytest
import torch

from tools.inprocess import load_comfy, pack

load_comfy(cpu=True)
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

video_run = pack("model_patches.video_run")
df = pack("model_patches.df_sampling")
families = pack("model_patches.families")
vae_stream = pack("model_patches.vae_stream")
drift = pack("cache_core.drift")


@pytest.fixture(scope="module")
def model(tiny_models):
    return comfy.sd.load_diffusion_model(str(tiny_models["1.3b"]))


@pytest.fixture(scope="module")
def vae(tiny_models):
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny_models["vae"])))


def schedule(**kw):
    base = dict(window_frames=21, overlap_frames=5, ar_step=0, causal_block_size=1, addnoise_condition=0,
                solver="euler", fps=16, prefix_mode="latent", shift=8.0, sigmas=None)
    return df.DFSchedule(**dict(base, **kw))


def streamed(model, vae, sch, length=41, **req_kw):
    """(LATENT, emitted latents, streamed frames, report) of one run with a capturing sink."""
    cond = [[torch.zeros(1, 512, 4096), {}]]
    req = video_run.VideoRequest(width=32, height=32, length=length, seed=5, steps=4, cfg=1.0, schedule=sch,
                                 positives=[cond], negative=cond, vae=vae, **req_kw)
    frames = []
    run = families.new_video_run(model, req, sink=lambda f, piece: frames.append(f))
    latents = []
    emit = run.emit
    run.emit = lambda lat, data, piece, calls: (latents.append((lat.clone(), calls)), emit(lat, data, piece, calls))
    video, report = run.run()
    return video, latents, torch.cat(frames), report


def decoded(vae, latent):
    img = vae.decode(latent)
    return img.reshape(-1, *img.shape[-3:]).float().cpu()


@pytest.mark.parametrize("sch", [
    dict(),                                                    # sync: each window at its last row
    dict(ar_step=2, causal_block_size=2),                      # async: blocks at their last step
    dict(ar_step=2, causal_block_size=2, prefix_mode="reencode_pixels"),
], ids=["sync", "async", "async-reencode"])
def test_stream_is_the_video(model, vae, sch):
    video, latents, frames, report = streamed(model, vae, schedule(**sch))
    assert report["windows"] >= 3
    assert torch.equal(torch.cat([lat for lat, _ in latents], 2), video)
    assert torch.equal(frames, decoded(vae, video))
    assert report["stream_decode"]["mode"] == "exact" and report["stream_decode"]["max_abs"] == 0.0
    timeline = report["emissions"]
    assert sum(e[2] for e in timeline) == frames.shape[0] == 41
    assert [e[1] for e in timeline] == [sum(e[2] for e in timeline[:i]) for i in range(len(timeline))]


def test_async_blocks_come_before_their_window_ends(model, vae):
    sch = schedule(ar_step=2, causal_block_size=2)
    _, latents, _, report = streamed(model, vae, sch)
    calls = [c for _, c in latents]
    window_ends = list(torch.tensor(report["calls_per_window"]).cumsum(0).tolist())
    assert len(calls) > report["windows"]                   # several emissions per window
    assert any(c not in window_ends for c in calls)
    assert report["ttff_calls"] == calls[0] < window_ends[0]
    # the first block is final after its own steps: ar_step rows before the next block starts, etc.
    assert calls[0] == 4                                    # 4 steps: block 0 runs rows 1..4


def test_sync_windows_emit_at_their_end(model, vae):
    _, latents, _, report = streamed(model, vae, schedule())
    window_ends = torch.tensor(report["calls_per_window"]).cumsum(0).tolist()
    assert [c for _, c in latents] == window_ends


def test_image_to_video_and_extension_stream_the_output(model, vae):
    image = torch.rand(1, 32, 32, 3)
    video, _, frames, _ = streamed(model, vae, schedule(ar_step=2, causal_block_size=2), start_image=image)
    assert torch.equal(frames, decoded(vae, video))
    prefix = torch.randn(1, 16, 4, 4, 4)
    video, latents, frames, _ = streamed(model, vae, schedule(ar_step=2, causal_block_size=2), length=21,
                                         prefix_latent=prefix)
    assert torch.equal(video[:, :, :4], prefix)
    assert torch.equal(frames, decoded(vae, video)[decoded(vae, prefix).shape[0]:])   # the user's video not again


def test_anchored_windows_stream_the_anchored_video(model, vae):
    video, latents, frames, report = streamed(model, vae, schedule(ar_step=2, causal_block_size=2),
                                              anchor=drift.DriftAnchor(strength=0.5))
    assert len(latents) == report["windows"]                # whole windows: the anchor needs them
    assert torch.equal(torch.cat([lat for lat, _ in latents], 2), video)
    assert torch.equal(frames, decoded(vae, video))


def test_live_ring_keeps_a_whole_piece_even_when_it_is_larger_than_the_ring():
    live = pack("nodes.live")
    run = live.LiveRun(run="r", token="t", node="1", client_id=None, slots=1, steerable=True, fps=24, ring_frames=16)
    assert run.add([b"a"] * 24) == 0
    assert all(run.frame(i)[0] == b"a" for i in range(24))       # announced next: all still held
    assert run.add([b"b"] * 24) == 24
    assert run.frame(23)[0] is None and run.frame(24) == (b"b", 24)
    assert all(run.frame(i)[0] == b"b" for i in range(24, 48))


@torch.no_grad()                  # as the sampler runs it
def test_a_decode_loop_core_changed_falls_back_and_says_so(vae):
    """The first-piece check: a stream decoder whose frames differ from VAEDecode's (as if core had
    changed its decode loop) is replaced by the context re-decode, the first piece is VAEDecode's own
    frames, and the report's mode reads approximate."""
    class Shifted(vae_stream.WanStreamDecoder):
        def push(self, z):
            return super().push(z) + 0.1
    z = torch.randn(1, 16, 11, 4, 4, generator=torch.Generator().manual_seed(4))
    dec = vae_stream.CheckedStreamDecoder(Shifted(vae), vae, lambda: vae_stream.RedecodeStreamDecoder(vae))
    first = dec.push(z[:, :, :6])
    assert torch.equal(first, decoded(vae, z[:, :, :6]))
    assert dec.status["mode"] == "approximate" and dec.status["max_abs"] > vae_stream.EXACT_TOLERANCE
    later = dec.push(z[:, :, 6:])
    assert later.shape[0] == 4 * 5 and bool(torch.isfinite(later).all())
    exact = vae_stream.CheckedStreamDecoder(vae_stream.WanStreamDecoder(vae), vae,
                                            lambda: vae_stream.RedecodeStreamDecoder(vae))
    assert torch.equal(torch.cat([exact.push(z[:, :, :6]), exact.push(z[:, :, 6:])]), decoded(vae, z))
    assert exact.status == {"mode": "exact", "max_abs": 0.0}
