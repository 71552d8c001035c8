"""MAGI-1 end to end inside a real ComfyUI: tiny checkpoints in the official layouts (real MAGI-1
weights cannot be downloaded here), the pack's loaders, text encoding over a real ComfyUI T5
(tiny, from the tests' testkit), the streaming sampler with the MAGI-1 schedule."""
from __future__ import annotations

import json
import shutil
import uuid

import pytest
import torch

from tools.comfy_server import ComfyError
from tools.media import write_test_video
from tools.graphs import DF_SCHEDULE_DEFAULTS, MAGI_SCHEDULE_DEFAULTS, TINY_MAGI, Graph, magi_graph

TINY_24B = "tiny_magi1_24b_layout.safetensors"
CHUNK = 6


def run(comfy, **kw):
    kw.setdefault("save_prefix", f"latents/{uuid.uuid4().hex[:8]}")
    g, sid = magi_graph(**kw)
    entry = comfy.run(g.prompt)
    save = next(k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent")
    return comfy.saved_latent(entry, save), json.loads(entry["outputs"][sid]["text"][0])


@pytest.fixture(scope="module")
def media(comfy):
    """An input image and a 21-frame video in the server's input folder."""
    import numpy as np
    from PIL import Image
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
                    ).save(comfy.base_dir / "input" / "magi_start.png")
    write_test_video(comfy.base_dir / "input" / "magi_prefix.mp4")
    return {"image": "magi_start.png", "video": "magi_prefix.mp4"}


def test_nodes_and_files_are_listed(comfy):
    info = comfy.object_info()
    for node in ("ARCacheMagiModelLoader", "ARCacheMagiVAELoader", "ARCacheMagiTextEncode", "ARCacheMagiSchedule"):
        assert node in info
    names = info["ARCacheMagiModelLoader"]["input"]["required"]["model_name"]
    options = names[1]["options"] if isinstance(names[1], dict) and "options" in names[1] else names[0]
    assert TINY_MAGI in options and TINY_24B in options
    assert not any("-of-" in o for o in options)           # shards are listed once, by their index


@pytest.mark.parametrize("model,variant", [(TINY_MAGI, "base"), (TINY_MAGI, "distill"), (TINY_24B, "auto")])
def test_t2v_generates_whole_chunks_reproducibly(comfy, model, variant):
    a, ra = run(comfy, model=model, variant=variant, seed=3, length=33)
    b, _ = run(comfy, model=model, variant=variant, seed=3, length=33)
    c, _ = run(comfy, model=model, variant=variant, seed=4, length=33)
    # 33 frames -> 8 latent frames -> rounded up to 2 chunks of 6 (upstream's infer_chunk_num).
    assert a.shape == (1, 16, 2 * CHUNK, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ra["windows"] == 2 and ra["pixel_frames"] == 48 and ra["transformer_flops"] > 0
    distilled = variant == "distill"
    assert ra["distill"] is distilled
    # 2 chunks, window 4, 4 steps: (2 + 4 - 1) stages of 1 step = 5 forward steps; base runs up to 3 passes each.
    assert (ra["model_calls"] <= 5 + 2) if distilled else (ra["model_calls"] > 5)


def test_distilled_and_base_passes_differ(comfy):
    base, rb = run(comfy, variant="base", seed=5)
    dist, rd = run(comfy, variant="distill", seed=5)
    assert not torch.equal(base, dist)
    assert rb["passes_run"]["text"] > 0 and rb["passes_run"]["alone"] > 0 and rd["passes_run"]["text"] == 0


def test_guidance_scales_reach_the_result(comfy):
    plain, r1 = run(comfy, variant="base", cfg=1.0, schedule={"history_scale": 1.0}, seed=6)
    guided, r2 = run(comfy, variant="base", cfg=7.5, seed=6)
    assert not torch.equal(plain, guided)
    # history scale 1 everywhere: v = B + s_t (A - B) never needs the chunk-alone pass C
    assert r1["passes_run"]["alone"] == 0 and r2["passes_run"]["alone"] > 0
    assert r2["model_calls"] > r1["model_calls"]


def test_kv_cache_stays_within_its_bound(comfy):
    _, bounded = run(comfy, variant="distill", length=6 * 24, steps=8, seed=7)
    _, full = run(comfy, variant="distill", length=6 * 24, steps=8, seed=7, schedule={"kv_range": "all"})
    assert bounded["windows"] == 6
    # upstream's defaults: every key range starts at most one chunk before the forward's first
    # chunk, so the newest clean chunk and the one before it are all the cache holds
    assert bounded["kv_cache_chunks"] == [3, 4]
    assert full["kv_cache_chunks"] == [0, 1, 2, 3, 4]       # chunk 5 finishes last: never re-run
    assert full["transformer_flops"] > bounded["transformer_flops"]


def test_kv_on_cpu_gives_the_same_video(comfy):
    a, _ = run(comfy, variant="distill", seed=8, length=72)
    b, _ = run(comfy, variant="distill", seed=8, length=72, schedule={"kv_on_cpu": True})
    assert torch.equal(a, b)


def test_i2v_keeps_the_image_latent_as_frame_zero(comfy, media):
    out, r = run(comfy, variant="distill", seed=9, start_image=media["image"])
    t2v, _ = run(comfy, variant="distill", seed=9)
    assert out.shape == t2v.shape and not torch.equal(out, t2v)
    assert r["windows"] == 2
    # frame 0 is the VAE encoding of the image (replicated x4, MAGI's i2v encoding)
    enc = encode_image(comfy, media["image"])
    torch.testing.assert_close(out[:, :, :1], enc, atol=1e-5, rtol=1e-5)


def encode_image(comfy, image):
    g = Graph()
    vae = g.add("ARCacheMagiVAELoader", vae_name="tiny_magi1_vae.safetensors")
    img = g.add("ImageScale", image=g.out(g.add("LoadImage", image=image)), upscale_method="bilinear",
                width=64, height=64, crop="disabled")
    enc = g.add("VAEEncode", pixels=g.out(img), vae=g.out(vae))
    save = g.add("SaveLatent", samples=g.out(enc), filename_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    return comfy.saved_latent(comfy.run(g.prompt), save)


def test_v2v_continues_the_prefix_and_keeps_it(comfy, media):
    out, r = run(comfy, variant="distill", seed=10, prefix_video=media["video"], length=33)
    # 21 frames -> 6 latent frames (padded to 24 frames): one whole prefix chunk, pre-encoded into the cache
    assert out.shape[2] == 6 + 2 * CHUNK and r["windows"] == 2
    g = Graph()
    vae = g.add("ARCacheMagiVAELoader", vae_name="tiny_magi1_vae.safetensors")
    frames = g.add("GetVideoComponents", video=g.out(g.add("LoadVideo", file=media["video"])))
    enc = g.add("VAEEncode", pixels=g.out(frames), vae=g.out(vae))
    save = g.add("SaveLatent", samples=g.out(enc), filename_prefix=f"latents/{uuid.uuid4().hex[:8]}")
    prefix = comfy.saved_latent(comfy.run(g.prompt), save)
    assert torch.equal(out[:, :, :6], prefix)


def test_streams_chunks_to_a_video_file(comfy):
    import av
    prefix = f"ARCache/magi_{uuid.uuid4().hex[:6]}"
    _, r = run(comfy, variant="distill", seed=11, vae="tiny_magi1_vae.safetensors",
               sampler_extra={"save_video": True, "filename_prefix": prefix})
    with av.open(str(comfy.base_dir / "output" / r["video_file"])) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == r["video_frames"] == 48


def test_interrupt_leaves_the_next_run_clean(comfy):
    before, _ = run(comfy, variant="base", seed=12)
    g, _ = magi_graph(variant="base", seed=12, length=24 * 40, steps=16)
    comfy.run_interrupted(g.prompt)
    after, _ = run(comfy, variant="base", seed=12)
    assert torch.equal(before, after)


# --- bad input ---------------------------------------------------------------------------------

def expect_error(comfy, fragment: str, **kw):
    with pytest.raises(ComfyError) as e:
        run(comfy, **kw)
    assert fragment in str(e.value), str(e.value)[-2000:]
    return str(e.value)


def test_bad_inputs_are_named(comfy):
    expect_error(comfy, "steps", steps=6)
    expect_error(comfy, "multiples of 16", width=72)
    msg = expect_error(comfy, "positive", positive_node=("ARCacheEmptyConditioning", {"value": 0.0}))
    assert "MAGI-1 Text Encode" in msg
    msg = expect_error(comfy, "is not a MAGI-1 DiT", model="tiny_skyreels_df_1.3b_layout.safetensors")
    assert "Wan 2.1" in msg


def test_schedules_and_models_must_match(comfy):
    from tools.graphs import streaming_graph
    g, _ = streaming_graph("tiny_skyreels_df_1.3b_layout.safetensors")
    sampler = next(k for k, v in g.prompt.items() if v["class_type"] == "ARCacheStreamingSampler")
    g.prompt["90"] = {"class_type": "ARCacheMagiSchedule", "inputs": dict(MAGI_SCHEDULE_DEFAULTS)}
    g.prompt[sampler]["inputs"]["schedule"] = ["90", 0]
    with pytest.raises(ComfyError) as e:
        comfy.run(g.prompt)
    assert "Diffusion Forcing Schedule" in str(e.value)
    g, sid = magi_graph()
    g.prompt["91"] = {"class_type": "ARCacheDFSchedule", "inputs": dict(DF_SCHEDULE_DEFAULTS)}
    g.prompt[sid]["inputs"]["schedule"] = ["91", 0]
    with pytest.raises(ComfyError) as e:
        comfy.run(g.prompt)
    assert "MAGI-1 Schedule" in str(e.value)


def test_broken_checkpoints_get_clear_errors(comfy):
    from safetensors.torch import load_file, save_file
    src = comfy.base_dir / "models" / "magi1" / "tiny_magi1_4.5b_layout" / "inference_weight"
    root = comfy.base_dir / "models" / "magi1"
    # a missing shard
    missing = root / "broken_missing" / "inference_weight"
    shutil.copytree(src, missing)
    (missing / "model-00002-of-00002.safetensors").unlink()
    msg = expect_error(comfy, "not in", model="broken_missing/inference_weight/model.safetensors.index.json")
    assert "model-00002-of-00002.safetensors" in msg
    # an extra key and a missing key
    keys = root / "broken_keys" / "inference_weight"
    shutil.copytree(src, keys)
    shard = keys / "model-00001-of-00002.safetensors"
    sd = load_file(shard)
    dropped = sorted(sd)[-1]
    sd.pop(dropped)
    sd["videodit_blocks.layers.0.extra.weight"] = torch.zeros(2)
    save_file(sd, shard)
    index = json.loads((keys / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(dropped)
    index["weight_map"]["videodit_blocks.layers.0.extra.weight"] = shard.name
    (keys / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = expect_error(comfy, "1 missing", model="broken_keys/inference_weight/model.safetensors.index.json")
    assert dropped in msg and "videodit_blocks.layers.0.extra.weight" in msg and "1 unexpected" in msg
