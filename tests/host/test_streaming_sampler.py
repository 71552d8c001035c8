"""The Streaming AR Sampler inside a real ComfyUI, on tiny SkyReels-V2-DF-layout models."""
from __future__ import annotations

import json
import uuid

import pytest
import safetensors.torch
import torch

from tools.comfy_server import ComfyError
from tools.graphs import Graph, streaming_graph

UNET13, UNET14, VAE = ("tiny_skyreels_df_1.3b_layout.safetensors", "tiny_skyreels_df_14b_layout.safetensors",
                       "tiny_wan21_vae.safetensors")
SMALL = dict(window_frames=17, overlap_frames=5)      # 5-latent windows with 2 latents of history


def run_latent(comfy, graph: Graph, sampler_id: str):
    """Run a graph; return (latent saved by its SaveLatent, the sampler's JSON report)."""
    entry = comfy.run(graph.prompt)
    save_id = next(k for k, v in graph.prompt.items() if v["class_type"] == "SaveLatent")
    latent = comfy.saved_latent(entry, save_id)
    report = json.loads(entry["outputs"][sampler_id]["text"][0])
    return latent, report


def unique() -> str:
    return f"latents/{uuid.uuid4().hex[:8]}"


def test_sync_euler_one_window_equals_stock_sampler_custom_advanced(comfy):
    """With all frames at one noise level diffusion forcing is ordinary sampling: same sigmas,
    same noise, Euler -> the stock SamplerCustomAdvanced result."""
    g, sid = streaming_graph(UNET14, length=17, seed=11, steps=5, sigmas_steps=5, save_prefix=unique(),
                             schedule=dict(window_frames=17, overlap_frames=0, solver="euler", fps=0))
    ours, report = run_latent(comfy, g, sid)

    s = Graph()
    model = s.add("UNETLoader", unet_name=UNET14, weight_dtype="default")
    cond = s.add("ARCacheEmptyConditioning", value=0.0)
    latent = s.add("EmptyHunyuanLatentVideo", width=64, height=64, length=17, batch_size=1)
    sampler = s.add("SamplerCustomAdvanced",
                    noise=s.out(s.add("RandomNoise", noise_seed=11)),
                    guider=s.out(s.add("BasicGuider", model=s.out(model), conditioning=s.out(cond))),
                    sampler=s.out(s.add("KSamplerSelect", sampler_name="euler")),
                    sigmas=s.out(s.add("BasicScheduler", model=s.out(model), scheduler="simple", steps=5, denoise=1.0)),
                    latent_image=s.out(latent))
    s.add("SaveLatent", samples=s.out(sampler), filename_prefix=unique())
    entry = comfy.run(s.prompt)
    stock = comfy.saved_latent(entry, [k for k, v in s.prompt.items() if v["class_type"] == "SaveLatent"][0])

    assert report["windows"] == 1 and report["model_calls"] == 5
    assert ours.shape == stock.shape == (1, 16, 5, 8, 8)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,windows,frames", [(17, 1, 5), (29, 2, 8), (33, 3, 9), (41, 3, 11)])
def test_window_count_and_frame_count(comfy, length, windows, frames):
    g, sid = streaming_graph(UNET13, length=length, seed=1, steps=3, save_prefix=unique(), schedule=SMALL)
    latent, report = run_latent(comfy, g, sid)
    assert latent.shape == (1, 16, frames, 8, 8)
    assert report["windows"] == windows
    assert report["latent_frames"] == frames
    assert torch.isfinite(latent).all()


def test_async_rows_follow_the_step_matrix(comfy):
    """Asynchronous: block b starts ar_step rows after b-1. 4 new frames, cbs 1, ar 2, 3 steps:
    first window (no history) 3 + 4*2 = 11 rows; every later window with history ends sooner."""
    sch = dict(SMALL, ar_step=2, causal_block_size=1)
    g, sid = streaming_graph(UNET13, length=33, seed=2, steps=3, save_prefix=unique(), schedule=sch)
    latent, report = run_latent(comfy, g, sid)
    assert report["calls_per_window"][0] == 3 + (5 - 1) * 2
    assert report["calls_per_window"][1] == 3 + (3 - 1) * 2
    assert report["model_calls"] == sum(report["calls_per_window"])
    assert latent.shape[2] == 9


def test_same_seed_same_video_other_seed_differs(comfy):
    a, _ = run_latent(comfy, *streaming_graph(UNET13, length=29, seed=7, steps=3, schedule=SMALL, save_prefix=unique(), cfg=2.0))
    b, _ = run_latent(comfy, *streaming_graph(UNET13, length=29, seed=7, steps=3, schedule=SMALL,
                                              save_prefix=unique(), cfg=2.0, sampler_extra={"filename_prefix": "x"}))
    c, _ = run_latent(comfy, *streaming_graph(UNET13, length=29, seed=8, steps=3, schedule=SMALL, save_prefix=unique(), cfg=2.0))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_doubles_vanilla_flops_and_report_fields(comfy):
    _, r1 = run_latent(comfy, *streaming_graph(UNET13, length=17, seed=3, steps=3, cfg=1.0, save_prefix=unique(), schedule=SMALL))
    _, r2 = run_latent(comfy, *streaming_graph(UNET13, length=17, seed=3, steps=3, cfg=3.0, save_prefix=unique(), schedule=SMALL))
    for r in (r1, r2):
        assert {"windows", "model_calls", "seconds", "ttff_s", "emissions", "transformer_flops",
                "transformer_flops_vanilla", "cache"} <= set(r)
        assert r["cache"] is None and r["transformer_flops"] == r["transformer_flops_vanilla"] > 0
    assert r2["transformer_flops_vanilla"] == pytest.approx(2 * r1["transformer_flops_vanilla"])


def test_fps_conditioning_restored_only_for_the_13b_layout(comfy):
    _, r13 = run_latent(comfy, *streaming_graph(UNET13, length=17, seed=4, steps=2, save_prefix=unique(), schedule=SMALL))
    _, r14 = run_latent(comfy, *streaming_graph(UNET14, length=17, seed=4, steps=2, save_prefix=unique(), schedule=SMALL))
    assert r13["fps_conditioning"] == UNET13
    assert r14["fps_conditioning"] is None
    a, _ = run_latent(comfy, *streaming_graph(UNET13, length=17, seed=4, steps=2, save_prefix=unique(), schedule=dict(SMALL, fps=16)))
    b, _ = run_latent(comfy, *streaming_graph(UNET13, length=17, seed=4, steps=2, save_prefix=unique(), schedule=dict(SMALL, fps=24)))
    assert not torch.allclose(a, b)   # the two fps embeddings condition differently


def image_graph(g: Graph, color: int) -> list:
    return g.out(g.add("EmptyImage", width=64, height=64, batch_size=1, color=color))


@pytest.mark.parametrize("schedule", [SMALL, dict(window_frames=21, overlap_frames=9, causal_block_size=3, ar_step=1)],
                         ids=["blocks_of_1", "blocks_of_3_async"])
def test_start_image_frame_is_kept(comfy, schedule):
    """Also with causal blocks > 1, where upstream SkyReels-V2 silently drops the image."""
    g, sid = streaming_graph(UNET13, length=29, seed=5, steps=3, vae=VAE, save_prefix=unique(), schedule=schedule)
    img = image_graph(g, 0x3366CC)
    g.prompt[sid]["inputs"]["start_image"] = img
    vae = g.prompt[sid]["inputs"]["vae"]
    enc = g.add("VAEEncode", pixels=img, vae=vae)
    g.add("SaveLatent", samples=g.out(enc), filename_prefix=unique(), node_id="enc_save")
    entry = comfy.run(g.prompt)
    load = lambda nid: comfy.saved_latent(entry, nid)  # noqa: E731
    video = load([k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent" and k != "enc_save"][0])
    image_latent = load("enc_save")
    assert video.shape[2] == 8
    torch.testing.assert_close(video[:, :, :1], image_latent[:, :, :1])


def test_extension_continues_the_prefix(comfy):
    g, first = streaming_graph(UNET13, length=17, seed=6, steps=3, save_prefix=unique(),
                               schedule=dict(SMALL, prefix_mode="latent"))
    second = g.add("ARCacheStreamingSampler", model=g.prompt[first]["inputs"]["model"],
                   positive=g.prompt[first]["inputs"]["positive"], negative=g.prompt[first]["inputs"]["negative"],
                   width=64, height=64, length=13, seed=9, steps=3, cfg=1.0,
                   schedule=g.prompt[first]["inputs"]["schedule"], prefix_latent=g.out(first))
    g.add("SaveLatent", samples=g.out(second), filename_prefix=unique(), node_id="ext")
    entry = comfy.run(g.prompt)
    load = lambda nid: comfy.saved_latent(entry, nid)  # noqa: E731
    base = load([k for k, v in g.prompt.items() if v["class_type"] == "SaveLatent" and k != "ext"][0])
    ext = load("ext")
    assert ext.shape[2] == base.shape[2] + 4        # 13 pixel frames = 4 new latent frames
    assert torch.equal(ext[:, :, :base.shape[2]], base)
    report = json.loads(entry["outputs"][second]["text"][0])
    assert report["calls_per_window"][0] == 3                  # sync: steps rows, history held as done


def test_prompt_schedule_changes_only_later_windows(comfy):
    def with_prompts(values):
        g, sid = streaming_graph(UNET13, length=29, seed=12, steps=3, cfg=1.0, save_prefix=unique(),
                                 schedule=dict(SMALL, prefix_mode="latent"))
        conds = {f"prompt_{i + 1}": g.out(g.add("ARCacheEmptyConditioning", value=v)) for i, v in enumerate(values)}
        g.prompt[sid]["inputs"]["prompt_schedule"] = g.out(g.add("ARCachePromptSchedule", **conds))
        return run_latent(comfy, g, sid)[0]
    same = with_prompts([0.5])
    story = with_prompts([0.5, -0.5])
    assert torch.equal(same[:, :, :5], story[:, :, :5])            # window 0 follows prompt 1 in both
    assert not torch.allclose(same[:, :, 5:], story[:, :, 5:])     # window 1 follows prompt 2


def test_streaming_to_file_writes_every_frame(comfy):
    import av
    g, sid = streaming_graph(UNET13, length=29, seed=13, steps=2, vae=VAE, save_prefix=unique(), schedule=SMALL,
                             sampler_extra={"save_video": True, "filename_prefix": "ARCache/test_stream"})
    _, report = run_latent(comfy, g, sid)
    path = comfy.base_dir / "output" / report["video_file"]
    with av.open(str(path)) as c:
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == report["video_frames"] == 29
    assert not list((comfy.base_dir / "output" / "ARCache").glob("*.partial.mp4"))


@pytest.mark.parametrize("change,needle", [
    (dict(width=72), "width"),
    (dict(length=18), "length"),
    (dict(schedule=dict(window_frames=17, overlap_frames=17)), "overlap_frames"),
    (dict(schedule=dict(window_frames=17, overlap_frames=5, causal_block_size=2)), "causal_block_size"),
])
def test_bad_input_names_the_input(comfy, change, needle):
    kw = dict(length=17, seed=1, steps=2, save_prefix=unique(), schedule=SMALL)
    kw.update(change)
    with pytest.raises(ComfyError) as e:
        comfy.run(streaming_graph(UNET13, **kw)[0].prompt)
    assert needle in str(e.value)


def test_start_image_without_vae_is_refused(comfy):
    g, sid = streaming_graph(UNET13, length=17, seed=1, steps=2, save_prefix=unique(), schedule=SMALL)
    g.prompt[sid]["inputs"]["start_image"] = image_graph(g, 0)
    with pytest.raises(ComfyError, match="Streaming AR Sampler, start_image: needs a vae"):
        comfy.run(g.prompt)


def test_other_model_family_is_refused(comfy, tiny_models):
    from make_tiny_checkpoints import random_tensors, wan21_dit_shapes
    path = comfy.base_dir / "models" / "diffusion_models" / "tiny_wan22_ti2v_layout.safetensors"
    safetensors.torch.save_file(random_tensors(wan21_dit_shapes(fps_keys=False, channels=48), 0), str(path))
    with pytest.raises(ComfyError, match="model: .*SkyReels-V2-DF") as err:
        comfy.run(streaming_graph(path.name, length=17, seed=1, steps=2, save_prefix=unique(), schedule=SMALL)[0].prompt)
    assert "this is a Wan 2.2" in str(err.value) and "48 latent channels" in str(err.value)


def test_interrupted_run_leaves_the_next_run_identical(comfy):
    kw = dict(length=29, seed=21, steps=3, cfg=2.0, schedule=SMALL)
    before, _ = run_latent(comfy, *streaming_graph(UNET13, save_prefix=unique(), **kw))

    long_graph, _ = streaming_graph(UNET13, save_prefix=unique(), length=401, seed=21, steps=20, cfg=2.0, schedule=SMALL)
    assert "interrupt" in comfy.run_interrupted(long_graph.prompt)

    after, _ = run_latent(comfy, *streaming_graph(UNET13, save_prefix=unique(), sampler_extra={"filename_prefix": "y"}, **kw))
    assert torch.equal(before, after)


def test_latent_preview_shows_every_latent_frame(comfy):
    g, sid = streaming_graph(UNET13, length=29, seed=14, steps=2, save_prefix=unique(), schedule=SMALL)
    prev = g.add("ARCacheLatentPreview", samples=g.out(sid), family="wan21", upscale=2)
    g.add("SaveImage", images=g.out(prev), filename_prefix="ARCache/preview", node_id="img")
    entry = comfy.run(g.prompt)
    images = entry["outputs"]["img"]["images"]
    assert len(images) == 8                      # 29 pixel frames = 8 latent frames
    from PIL import Image
    im = Image.open(comfy.output_path(images[0]))
    assert im.size == (16, 16)
    assert len(im.getcolors(maxcolors=1 << 16) or range(2)) > 1     # not one flat colour


def test_core_easycache_composes_with_an_async_schedule(comfy):
    """The scalar sigma ComfyUI sees must only decrease, or whole-call caches such as core
    EasyCache break (it crashed on async rows before the sampler reported window progress)."""
    sch = dict(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2, prefix_mode="latent")
    lat, report = run_latent(comfy, *streaming_graph(
        UNET13, length=53, seed=15, steps=6, save_prefix=unique(), schedule=sch,
        cache=dict(class_type="EasyCache", reuse_threshold=3.0, start_percent=0.15, end_percent=0.95, verbose=False)))
    assert report["windows"] == 2 and torch.isfinite(lat).all()
    assert report["transformer_flops"] < report["transformer_flops_vanilla"]     # EasyCache skipped calls
