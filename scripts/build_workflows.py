#!/usr/bin/env python3
"""Write the shipped UI-format workflows in workflows/ from compact graph descriptions.

Widget order, output types and the `control_after_generate` companion come from a live
server's /object_info, so the files are exactly what the frontend would save.
usage: python scripts/build_workflows.py [--server URL]   (default: boot a private host)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.workflow import WIDGET_TYPES, _has_control, node_specs  # noqa: E402

# Model files as users download them (see README "Where the model files go").
DF_13B = "Wan2_1-SkyReels-V2-DF-1_3B-540P_fp32.safetensors"
DF_14B = "Wan2_1-SkyReels-V2-DF-14B-540P_fp16.safetensors"
DF_14B_720P = "Wan2_1-SkyReels-V2-DF-14B-720P_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN_VAE = "wan_2.1_vae.safetensors"
MAGI_DIT = "4.5B_distill/inference_weight.distill/model.safetensors.index.json"
MAGI_VAE = "vae/diffusion_pytorch_model.safetensors"
T5XXL = "t5xxl_fp16.safetensors"
SELF_FORCING = "self_forcing_dmd.pt"
LONGLIVE_BASE, LONGLIVE_LORA = "longlive_base.pt", "longlive_lora.pt"
NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
            "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


KITE = "A red kite dances over a green hill under a clear blue sky, camera slowly tracking, cinematic, detailed."


def wan_prompts() -> dict:
    """The umt5 prompts and the Wan 2.1 VAE every Wan workflow feeds its sampler."""
    return {
        "clip": ("CLIPLoader", dict(clip_name=UMT5, type="wan", device="default"), {}),
        "pos": ("CLIPTextEncode", dict(text=KITE), {"clip": ("clip", 0)}),
        "neg": ("CLIPTextEncode", dict(text=NEGATIVE), {"clip": ("clip", 0)}),
        "vae": ("VAELoader", dict(vae_name=WAN_VAE), {}),
    }


def decode_and_save(fps: float, save_prefix: str) -> dict:
    """The sampler's LATENT decoded and saved as a video."""
    return {
        "decode": ("VAEDecode", {}, {"samples": ("sampler", 0), "vae": ("vae", 0)}),
        "video": ("CreateVideo", dict(fps=fps), {"images": ("decode", 0)}),
        "save": ("SaveVideo", dict(filename_prefix=save_prefix, format="auto", codec="auto"), {"video": ("video", 0)}),
    }


def sampler_nodes(model_from: str, *, length: int, async_mode: bool, extra_inputs: dict | None = None) -> dict:
    """The shared middle of every SkyReels-V2-DF workflow."""
    sch = dict(window_frames=97, overlap_frames=17, ar_step=5 if async_mode else 0,
               causal_block_size=5 if async_mode else 1, addnoise_condition=20, solver="unipc", shift=0.0,
               fps=24, prefix_mode="auto")
    return {
        **wan_prompts(),
        "schedule": ("ARCacheDFSchedule", sch, {}),
        "sampler": ("ARCacheStreamingSampler",
                    dict(width=960, height=544, length=length, seed=42, steps=30, cfg=6.0, save_video=False,
                         filename_prefix="ARCache/skyreels_df"),
                    {"model": (model_from, 0), "positive": ("pos", 0), "negative": ("neg", 0),
                     "schedule": ("schedule", 0), "vae": ("vae", 0), **(extra_inputs or {})}),
        **decode_and_save(24.0, "video/ARCache_skyreels_df"),
    }


def flowcache(model_from: str) -> dict:
    return {"flowcache": ("ARCacheFlowCache", dict(rel_l1_thresh=0.1, warmup_steps=5), {"model": (model_from, 0)})}


def motioncache(model_from: str) -> dict:
    return {"motioncache": ("ARCacheMotionCache", dict(threshold=0.1, warmup_steps=4), {"model": (model_from, 0)})}


def heatmap() -> dict:
    """Where the cache spent compute, over the decoded video, saved as a second video."""
    return {"heat": ("ARCacheComputeHeatmap", dict(opacity=0.6), {"samples": ("sampler", 0), "images": ("decode", 0)}),
            "heat_video": ("CreateVideo", dict(fps=24.0), {"images": ("heat", 0)}),
            "heat_save": ("SaveVideo", dict(filename_prefix="video/ARCache_heatmap", format="auto", codec="auto"),
                          {"video": ("heat_video", 0)})}


def magi_nodes(*, length: int, extra_inputs: dict | None = None, text: str | None = None, model_from: str = "magi",
               schedule: dict | None = None, steps: int = 16) -> dict:
    """The shared body of every MAGI-1 workflow (4.5B distill, 720x720, upstream's defaults)."""
    return {
        "magi": ("ARCacheMagiModelLoader", dict(model_name=MAGI_DIT, variant="auto", weight_dtype="default"), {}),
        "clip": ("CLIPLoader", dict(clip_name=T5XXL, type="pixart", device="default"), {}),
        "pos": ("ARCacheMagiTextEncode", dict(text=text or "A red kite dances over a green hill under a clear blue "
                                              "sky, the camera slowly tracking it, cinematic, detailed.",
                                              special_tokens="special_tokens.npz"), {"clip": ("clip", 0)}),
        "vae": ("ARCacheMagiVAELoader", dict(vae_name=MAGI_VAE), {}),
        "schedule": ("ARCacheMagiSchedule", dict(schedule or {}), {}),
        "sampler": ("ARCacheStreamingSampler",
                    dict(width=720, height=720, length=length, seed=42, steps=steps, cfg=7.5, save_video=False,
                         filename_prefix="ARCache/magi1"),
                    {"model": (model_from, 0), "positive": ("pos", 0), "negative": ("pos", 0),
                     "schedule": ("schedule", 0), "vae": ("vae", 0), **(extra_inputs or {})}),
        "decode": ("VAEDecode", {}, {"samples": ("sampler", 0), "vae": ("vae", 0)}),
        "video": ("CreateVideo", dict(fps=24.0), {"images": ("decode", 0)}),
        "save": ("SaveVideo", dict(filename_prefix="video/ARCache_magi1", format="auto", codec="auto"),
                 {"video": ("video", 0)}),
    }


def live(clip_encoder: str, texts: list[str], clip_extra: dict | None = None) -> dict:
    """A Live View on the sampler, switching among the sampler's prompt and `texts`."""
    nodes = {f"steer_{i}": (clip_encoder, dict(text=t, **(clip_extra or {})), {"clip": ("clip", 0)})
             for i, t in enumerate(texts, start=2)}
    slots = {"prompt_1": ("pos", 0), **{f"prompt_{i}": (f"steer_{i}", 0) for i in range(2, len(texts) + 2)}}
    nodes["slots"] = ("ARCachePromptSchedule", {}, slots)
    nodes["live"] = ("ARCacheLiveView", dict(replay="", view_size=512, ring_frames=720), {"prompts": ("slots", 0)})
    return nodes


def causal_nodes(ckpt: str, *, length: int, schedule: dict | None = None, lora: str | None = None,
                 extra_inputs: dict | None = None) -> dict:
    """A few-step causal Wan workflow: Causal Wan Loader [-> LoRA] -> sampler with a Causal Schedule, 832x480."""
    nodes = {
        "causal": ("ARCacheCausalWanLoader", dict(ckpt_name=ckpt, weights="auto", weight_dtype="default"), {}),
        **wan_prompts(),
        "schedule": ("ARCacheCausalSchedule", dict(schedule or {}), {}),
        "sampler": ("ARCacheStreamingSampler",
                    dict(width=832, height=480, length=length, seed=42, steps=4, cfg=1.0, save_video=False,
                         filename_prefix="ARCache/causal_wan"),
                    {"model": ("lora" if lora else "causal", 0), "positive": ("pos", 0), "negative": ("neg", 0),
                     "schedule": ("schedule", 0), "vae": ("vae", 0), **(extra_inputs or {})}),
        **decode_and_save(16.0, "video/ARCache_causal_wan"),
    }
    if lora:
        nodes["lora"] = ("ARCacheCausalWanLora", dict(lora_name=lora, strength=1.0), {"model": ("causal", 0)})
        nodes["causal"][1]["weights"] = "generator"       # LongLive loads its base's generator (use_ema false)
    return nodes


STEER_TEXTS = ["The red kite climbs into golden sunset clouds above the hill, cinematic, detailed.",
               "A thunderstorm rolls in over the hill, rain and lightning around the red kite, cinematic."]


def workflows(info: dict) -> dict[str, dict]:
    unet13 = {"unet": ("UNETLoader", dict(unet_name=DF_13B, weight_dtype="default"), {})}
    image = {"image": ("LoadImage", dict(image="example.png"), {})}
    extend_src = {"load_video": ("LoadVideo", dict(file="input_video.mp4"), {}),
                  "components": ("GetVideoComponents", {}, {"video": ("load_video", 0)}),
                  "encode": ("VAEEncode", {}, {"pixels": ("components", 0), "vae": ("vae", 0)})}
    out = {
        "skyreels_df_t2v_long_async": {**unet13, **sampler_nodes("unet", length=737, async_mode=True)},
        "skyreels_df_i2v": {**unet13, **image, **sampler_nodes("unet", length=257, async_mode=False,
                                                               extra_inputs={"start_image": ("image", 0)})},
        "skyreels_df_extend_video": {**unet13, **extend_src, **sampler_nodes(
            "unet", length=257, async_mode=False, extra_inputs={"prefix_latent": ("encode", 0)})},
    }
    if "ARCacheMagiModelLoader" in info:
        out["magi1_t2v"] = magi_nodes(length=241)
        out["magi1_i2v"] = {**image, **magi_nodes(length=241, extra_inputs={"start_image": ("image", 0)})}
        out["magi1_v2v"] = {**extend_src, **magi_nodes(length=241, extra_inputs={"prefix_latent": ("encode", 0)})}
        # The references' MAGI-1 settings: FlowCache with full-history attention at 16 steps (FC-M
        # sample/vbench), MotionCache at 64 steps (its token phase starts after 25 steps per chunk).
        magi_live = magi_nodes(length=24 * 40, extra_inputs={"live": ("live", 0)})
        magi_live["sampler"][1].update(save_video=True, filename_prefix="ARCache/magi1_live")
        out["magi1_t2v_live"] = {**magi_live, **live("ARCacheMagiTextEncode", STEER_TEXTS,
                                                     dict(special_tokens="special_tokens.npz"))}
        out["magi1_t2v_flowcache"] = {
            **magi_nodes(length=241, model_from="flowcache", schedule=dict(kv_range="all")),
            "flowcache": ("ARCacheFlowCache", dict(rel_l1_thresh=0.01, warmup_steps=5, coefficients="none"),
                          {"model": ("magi", 0)}), **heatmap()}
        out["magi1_t2v_motioncache"] = {
            **magi_nodes(length=241, model_from="motioncache", steps=64),
            "motioncache": ("ARCacheMotionCache", dict(threshold=0.0065, warmup_steps=5, phase1_updates=6, vote=0.0,
                                                        min_update_ratio=0.0, motion_source="latents",
                                                        coefficients="none"), {"model": ("magi", 0)}), **heatmap()}
    if "ARCacheFlowCache" in info:
        out["skyreels_df_t2v_flowcache"] = {**unet13, **flowcache("unet"),
                                            **sampler_nodes("flowcache", length=737, async_mode=True), **heatmap()}
        out["skyreels_df_i2v_flowcache"] = {**unet13, **image, **flowcache("unet"), **sampler_nodes(
            "flowcache", length=257, async_mode=True, extra_inputs={"start_image": ("image", 0)}), **heatmap()}
        df_live = sampler_nodes("flowcache", length=1457, async_mode=True, extra_inputs={"live": ("live", 0)})
        df_live["sampler"][1].update(save_video=True, filename_prefix="ARCache/skyreels_df_live")
        out["skyreels_df_t2v_live"] = {**unet13, **flowcache("unet"), **df_live, **live("CLIPTextEncode", STEER_TEXTS)}
    if "ARCacheCausalSchedule" in info:
        out["causal_wan_t2v"] = causal_nodes(SELF_FORCING, length=81)          # Self-Forcing's 81 frames, 7 chunks
        longlive = causal_nodes(LONGLIVE_BASE, length=957, lora=LONGLIVE_LORA, extra_inputs={"live": ("live", 0)},
                                schedule=dict(attention_frames=12, sink_frames=3, switch="recache"))
        longlive["sampler"][1].update(save_video=True, filename_prefix="ARCache/longlive_live")
        out["longlive_t2v_live"] = {**longlive, **live("CLIPTextEncode", STEER_TEXTS)}   # 80 chunks, a minute
    if "ARCacheMultiGPU" in info:
        # 14B at 720P over 4 GPUs of one machine: each holds the model and a quarter of the K/V
        big = {"unet": ("UNETLoader", dict(unet_name=DF_14B_720P, weight_dtype="default"), {}), **flowcache("unet"),
               "gpus": ("ARCacheMultiGPU", dict(gpus=4, timeout_s=600), {"model": ("flowcache", 0)}),
               **sampler_nodes("gpus", length=737, async_mode=True)}
        big["sampler"][1].update(width=1280, height=720, save_video=True, filename_prefix="ARCache/skyreels_df_720p")
        big["schedule"][1].update(window_frames=121, overlap_frames=17)
        out["skyreels_df_14b_720p_multigpu"] = big
    if "ARCacheMotionCache" in info:
        out["skyreels_df_t2v_motioncache"] = {**unet13, **motioncache("unet"),
                                              **sampler_nodes("motioncache", length=737, async_mode=True), **heatmap()}
    return out


COLUMNS, WIDTH, GAP = 5, 340, 50


def node_height(spec: dict) -> int:
    """The height ComfyUI's frontend draws a node at (title excluded): socket rows beside the
    outputs, then a row per widget (a multiline text box is taller), with a margin."""
    sockets = widgets = tall = 0
    for name, t, opts, _ in node_specs(spec):
        if t in WIDGET_TYPES and not opts.get("forceInput"):
            widgets += 1 + int(_has_control(name, t, opts))
            tall += int(bool(opts.get("multiline")))
        else:
            sockets += 1
    return 24 * max(sockets, len(spec["output"])) + 26 * widgets + 110 * tall + 30


def to_ui(graph: dict, info: dict) -> dict:
    """Lay out a {key: (type, widgets, links)} graph as a frontend (UI-format) workflow: nodes in
    columns, each stacked below the one before at the height the frontend draws it, so none overlap."""
    ids = {key: i + 1 for i, key in enumerate(graph)}
    nodes, links = [], []
    tops = [0] * COLUMNS                        # where the next node of each column starts
    for key, (kind, widgets, inputs) in graph.items():
        spec = info[kind]
        node_inputs, values = [], []
        for name, t, opts, _ in node_specs(spec):
            if t in WIDGET_TYPES and not opts.get("forceInput"):
                if name in widgets:
                    values.append(widgets[name])
                elif "default" in opts:
                    values.append(opts["default"])
                else:
                    values.append((opts.get("options") or [""])[0])
                if _has_control(name, t, opts):
                    values.append("fixed")
            if name in inputs:
                src, slot = inputs[name]
                link_id = len(links) + 1
                ltype = info[graph[src][0]]["output"][slot]
                links.append([link_id, ids[src], slot, ids[key], len(node_inputs), ltype])
                entry = {"name": name, "type": t if t not in WIDGET_TYPES else t, "link": link_id}
                if t in WIDGET_TYPES:
                    entry["widget"] = {"name": name}
                node_inputs.append(entry)
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(spec["output_name"], spec["output"]))]
        order = len(nodes)
        col = order % COLUMNS
        height = node_height(spec)
        nodes.append({"id": ids[key], "type": kind, "pos": [60 + (WIDTH + GAP) * col, 80 + tops[col]],
                      "size": [WIDTH, height], "flags": {}, "order": order, "mode": 0, "inputs": node_inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": kind}, "widgets_values": values})
        tops[col] += height + GAP + 30         # + the title bar above pos
    by_id = {n["id"]: n for n in nodes}
    for link_id, src, slot, *_ in links:
        by_id[src]["outputs"][slot]["links"].append(link_id)
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--server", default=None)
    a = ap.parse_args()
    if a.server:
        import urllib.request
        info = json.loads(urllib.request.urlopen(a.server + "/object_info", timeout=60).read())
    else:
        from tools.comfy_server import ComfyServer
        with ComfyServer(Path(tempfile.mkdtemp(prefix="arcache_wf_"))) as server:
            info = server.object_info()
    for name, graph in workflows(info).items():
        path = REPO / "workflows" / f"{name}.json"
        path.write_text(json.dumps(to_ui(graph, info), indent=1, ensure_ascii=False) + "\n")
        print("wrote", path.relative_to(REPO))


if __name__ == "__main__":
    main()
