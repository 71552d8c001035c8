"""Few-step causal Wan (Self-Forcing class) in a real ComfyUI: the published layouts load through the
pack's loaders (and a repackage through UNETLoader) and run with the Causal Schedule; LongLive's
LoRA; storyboard and live prompt switches with re-cache, replayed bit for bit; the frames stream;
bad input gets named errors."""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError, Events, http
from tools.graphs import causal_graph

SF, COMFY, LL_BASE = "tiny_self_forcing_layout.pt", "tiny_causal_wan_comfy_layout.safetensors", "tiny_longlive_base_layout.pt"
LORA, VAE = "tiny_longlive_lora_layout.pt", "tiny_wan21_vae.safetensors"
LONGLIVE = dict(attention_frames=6, sink_frames=3)


def graph(**kw):
    return causal_graph(save_prefix=f"latents/{uuid.uuid4().hex[:8]}", **kw)


def run(comfy, **kw):
    g, sid = graph(**kw)
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


def refused(comfy, **kw) -> str:
    g, _ = graph(**kw)
    with pytest.raises(ComfyError) as e:
        comfy.run(g.prompt)
    return str(e.value)


def test_each_published_layout_runs_and_the_same_weights_give_the_same_video(comfy):
    sf, report = run(comfy, ckpt=SF)                                    # Self-Forcing .pt: generator_ema
    repack, report2 = run(comfy, ckpt=COMFY)                            # the same weights, core's causal_ar file
    plain, report3 = run(comfy, ckpt=COMFY, loader="UNETLoader")        # 0.3.75's UNETLoader, no causal mark
    assert sf.shape == (1, 16, 9, 8, 8)
    assert torch.equal(sf, repack) and torch.equal(sf, plain)
    assert "generator_ema" in report["causal_weights"] and "causal_ar" in report2["causal_weights"]
    assert report3["causal_weights"] == "unknown"
    assert report["windows"] == 3 and report["model_calls"] == 3 * 4 + 2
    assert report["timesteps"] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    generator, _ = run(comfy, ckpt=SF, weights="generator")
    assert float((generator - sf).abs().max()) > 1e-3


def test_longlive_lora_on_its_base(comfy):
    base, _ = run(comfy, ckpt=LL_BASE, length=45, schedule=LONGLIVE)
    off, _ = run(comfy, ckpt=LL_BASE, length=45, schedule=LONGLIVE, lora=(LORA, 0.0))
    on, report = run(comfy, ckpt=LL_BASE, length=45, schedule=LONGLIVE, lora=(LORA, 1.0))
    assert torch.equal(base, off)
    assert float((on - base).abs().max()) > 1e-3
    assert report["attention_frames"] == 6 and report["kv_frames_held"] == 6     # the window, bounded


def test_storyboard_switch_recaches_and_changes_only_what_follows(comfy):
    one, _ = run(comfy, prompts=(0.0,), schedule=LONGLIVE, length=45)
    two, report = run(comfy, prompts=(0.0, 2.0), schedule=LONGLIVE, length=45)
    kept, report_keep = run(comfy, prompts=(0.0, 2.0), schedule=dict(LONGLIVE, switch="keep"), length=45)
    assert report["recache_passes"] == 1 and report_keep["recache_passes"] == 0
    assert torch.equal(one[:, :, :3], two[:, :, :3]) and torch.equal(two[:, :, :3], kept[:, :, :3])
    assert float((two[:, :, 3:] - one[:, :, 3:]).abs().max()) > 1e-3
    assert float((two[:, :, 3:] - kept[:, :, 3:]).abs().max()) > 1e-4


def _live(g, sid, **live_inputs):
    conds = {f"prompt_{i + 1}": g.out(g.add("ARCacheEmptyConditioning", value=v)) for i, v in enumerate((0.0, 2.0))}
    g.prompt[sid]["inputs"]["live"] = g.out(g.add("ARCacheLiveView", prompts=g.out(g.add("ARCachePromptSchedule", **conds)),
                                                  **dict(dict(view_size=4096), **live_inputs)))


def test_live_switch_changes_the_following_chunks_and_replays_bit_for_bit(comfy):
    length = 4 * 60 + 1 - 4 * 1      # 60 latent frames: 20 chunks
    g, sid = graph(length=length, vae=VAE, schedule=LONGLIVE)
    _live(g, sid)
    with Events(comfy) as ev:
        pid = comfy.queue(g.prompt)
        start = ev.wait_for("arcache.live.start")[0]
        ev.wait_for("arcache.live.frames")
        status, body = http(comfy.url + "/arcache/steer", "POST",
                            json.dumps({"run": start["run"], "token": start["token"], "slot": 1}).encode(),
                            {"Content-Type": "application/json"})
        assert status == 200, body
        entry = comfy.wait(pid)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    steered, report = comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])
    assert len(report["switches"]) == 1 and report["recache_passes"] == 1
    piece = report["switches"][0]["piece"]
    assert 0 < piece < 20
    g2, sid2 = graph(length=length, vae=VAE, schedule=LONGLIVE)
    _live(g2, sid2, replay=json.dumps(report["switches"]))
    entry2 = comfy.run(g2.prompt)
    save2 = next(k for k, v in g2.prompt.items() if v["class_type"] == "SaveLatent")
    assert torch.equal(comfy.saved_latent(entry2, save2), steered)
    plain, _ = run(comfy, length=length, vae=VAE, schedule=LONGLIVE)
    assert torch.equal(plain[:, :, :3 * piece], steered[:, :, :3 * piece])       # chunks before the switch
    assert float((plain[:, :, 3 * piece:] - steered[:, :, 3 * piece:]).abs().max()) > 1e-3
    frames = sum(m["count"] for m in ev.of("arcache.live.frames"))
    assert frames == 4 * 59 + 1 == sum(e[2] for e in report["emissions"])       # every frame streamed
    assert len(report["emissions"]) >= 20 and report["ttff_calls"] == 4             # the first chunk's last step


def test_cfg_runs_a_negative_pass_with_its_own_kv(comfy):
    one, r1 = run(comfy, cfg=1.0, negative=1.0)
    three, r3 = run(comfy, cfg=3.0, negative=1.0)
    assert float((three - one).abs().max()) > 1e-3
    assert r3["kv_bytes_peak"] == 2 * r1["kv_bytes_peak"]
    assert r3["transformer_flops"] == pytest.approx(2 * r1["transformer_flops"], rel=1e-9)


@pytest.mark.parametrize("kw,words", [
    (dict(length=29), ["length", "not a positive multiple", "chunk_frames=3", "21 or 33 frames"]),
    (dict(schedule=dict(denoising_steps="1000, 750, 750")), ["denoising_steps", "strictly decreasing"]),
    (dict(schedule=dict(denoising_steps="1000, 750, x")), ["denoising_steps", "not a list of numbers"]),
    (dict(schedule=dict(attention_frames=4, sink_frames=3)), ["attention_frames", "at least 6"]),
    (dict(schedule=dict(sink_frames=3)), ["sink_frames", "rolling window"]),
    (dict(ckpt=LL_BASE, lora=("tiny_longlive_lora_layout.pt", 1.0), weights="generator_ema"), ["weights", "no generator_ema"]),
    (dict(cache=dict(class_type="ARCacheFlowCache", rel_l1_thresh=0.1, warmup_steps=1)),
     ["FlowCache", "nothing to skip", "attention_frames"]),
    (dict(ckpt=COMFY, loader="UNETLoader", cache=dict(class_type="ARCacheFlowCache", rel_l1_thresh=0.1, warmup_steps=1)),
     ["FlowCache", "nothing to skip"]),           # a plain Wan: the cache is accepted, the causal run refuses it
])
def test_bad_input_gets_a_named_error(comfy, kw, words):
    text = refused(comfy, **kw)
    for w in words:
        assert w in text, (w, text)


def test_a_failed_run_leaves_the_next_one_clean(comfy):
    clean, _ = run(comfy, seed=5)
    refused(comfy, seed=5, length=29)
    again, _ = run(comfy, seed=5)
    assert torch.equal(clean, again)


def test_start_image_is_the_first_chunk_and_conditions_the_rest(comfy):
    """Image-to-video: the image's latent frame is a 1-frame chunk written into the K/V at timestep 0
    (Self-Forcing's independent first frame), kept as the video's first frame; 37 frames = 1 + 3 chunks."""
    def with_image(color):
        g, sid = graph(length=37, vae=VAE, seed=3)
        img = g.out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=color))
        g.prompt[sid]["inputs"]["start_image"] = img
        g.add("SaveLatent", samples=g.out(g.add("VAEEncode", pixels=img, vae=g.prompt[sid]["inputs"]["vae"])),
              filename_prefix=f"latents/{uuid.uuid4().hex[:8]}", node_id="enc_save")
        entry = comfy.run(g.prompt)
        save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent" and k != "enc_save")
        return comfy.saved_latent(entry, save), comfy.saved_latent(entry, "enc_save"), \
            json.loads(entry["outputs"][sid]["text"][0])
    video, image, report = with_image(0x3366CC)
    other, _, _ = with_image(0xCC6633)
    assert video.shape[2] == 10 and report["windows"] == 3
    torch.testing.assert_close(video[:, :, :1], image[:, :, :1])
    assert float((video[:, :, 1:] - other[:, :, 1:]).abs().max()) > 1e-3       # the image conditions the chunks
    assert report["model_calls"] == 1 + 3 * 4 + 2


def test_an_interrupted_run_leaves_the_next_one_clean(comfy):
    clean, _ = run(comfy, seed=8, length=4 * 299 + 1)        # 300 latent frames: 100 chunks
    g, _ = graph(seed=8, length=4 * 299 + 1)
    assert "interrupt" in comfy.run_interrupted(g.prompt, after_s=1.0)
    again, _ = run(comfy, seed=8, length=4 * 299 + 1)
    assert torch.equal(clean, again)


LL2 = "tiny_longlive2_5b_layout.pt"
LL2_SCHEDULE = dict(chunk_frames=8, solver="unipc", shift=5.0, attention_frames=32, sink_frames=8, switch="keep", fps=24,
                    first_frame="clamped", unipc_steps=4)


def test_longlive2_on_wan22_5b_runs_with_its_defaults(comfy):
    """LongLive 2.0's merged generator (Wan2.2-TI2V-5B layout, 48-channel latents) through the loader:
    without a schedule the sampler uses LongLive 2.0's (chunks of 8, 4 UniPC steps, a 32-frame window
    behind an 8-frame sink), the same video as that schedule given explicitly; 40 latent frames. A
    video shorter than the window runs with its full history."""
    length = 4 * 39 + 1
    default, report = run(comfy, ckpt=LL2, length=length, with_schedule=False, steps=30)   # the sampler's steps: unused
    given, _ = run(comfy, ckpt=LL2, length=length, schedule=LL2_SCHEDULE)
    assert default.shape == (1, 48, 40, 4, 4)
    assert torch.equal(default, given)
    assert report["solver"] == "unipc" and report["timesteps"] == [999, 937, 833, 624]
    assert report["windows"] == 5 and report["kv_frames_held"] == 32
    text = refused(comfy, ckpt=LL2, length=length, vae=VAE, with_schedule=False)
    assert "vae" in text and "Wan 2.2 VAE" in text
    short, report = run(comfy, ckpt=LL2, length=4 * 15 + 1, with_schedule=False)   # 16 latent frames < the window:
    assert short.shape[2] == 16 and report["kv_frames_held"] == 16                 # the full history, no error


def test_an_image_to_video_length_error_suggests_lengths_that_work(comfy):
    """81 frames with a start image written into the K/V first leave 20 latent frames to generate: the
    message suggests the lengths that give whole chunks with the image's frame counted (73, 85)."""
    g, sid = graph(length=81, vae=VAE)
    g.prompt[sid]["inputs"]["start_image"] = g.out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=0))
    with pytest.raises(ComfyError) as e:
        comfy.run(g.prompt)
    assert "73 or 85 frames" in str(e.value)
