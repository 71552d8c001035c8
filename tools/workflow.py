"""UI-format workflows (what users drag into ComfyUI) -> API prompts, checked against /object_info.

    python -m tools.workflow run workflows/foo.json [--server URL]   # convert and run headless
    python -m tools.workflow check workflows/*.json --server URL     # validate only

The frontend stores widget values positionally (`widgets_values`), including the hidden
`control_after_generate` companion ("fixed", "randomize", ...) after each seed-like input, so
conversion walks the node's inputs in /object_info order. A dynamic combo (newer cores'
COMFY_DYNAMICCOMBO_V3, e.g. SaveVideo's `format`) is one widget followed by the chosen option's
own widgets, recursively; in the API prompt they are flat dotted keys ("format", "format.codec").
An input of a type this module does not know is a socket, unless the server marks it
`socketless`: then it is a widget whose value is passed through unchecked (`unknown_widgets`
names them).
"""
from __future__ import annotations

import json
import sys

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
SKIP_TYPES = {"Note", "MarkdownNote"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def _specs(inputs: dict, order: dict | None = None) -> list[tuple[str, str, dict, bool]]:
    """(name, type, options, required) for every input of an input dict ({"required": ..,
    "optional": ..}), in the frontend's order."""
    out = []
    order = order or {g: list(inputs.get(g, {})) for g in ("required", "optional")}
    for group in ("required", "optional"):
        for name in order.get(group, []):
            spec = inputs[group][name]
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):            # a V1 combo: the options are the type
                kind, opts = "COMBO", dict(opts, options=kind)
            out.append((name, kind, opts, group == "required"))
    return out


def node_specs(info: dict) -> list[tuple[str, str, dict, bool]]:
    return _specs(info["input"], info.get("input_order"))


def is_widget(kind: str, opts: dict) -> bool:
    return (kind in WIDGET_TYPES or bool(opts.get("socketless"))) and not opts.get("forceInput")


def dynamic_option(opts: dict, key) -> dict | None:
    """The option of a dynamic combo whose key is `key`."""
    return next((o for o in opts.get("options", []) if o.get("key") == key), None)


def widget_specs(info: dict, values: dict) -> list[tuple[str, str, dict, bool]]:
    """Every widget input of a node with its dotted name, dynamic combos expanded by the values
    chosen (sub-inputs of an unchosen option do not exist)."""
    out = []

    def walk(specs, prefix):
        for name, kind, opts, required in specs:
            if not is_widget(kind, opts):
                continue
            out.append((prefix + name, kind, opts, required))
            if kind == DYNAMIC_COMBO:
                option = dynamic_option(opts, values.get(prefix + name))
                if option is not None:
                    walk(_specs(option.get("inputs", {})), prefix + name + ".")
    walk(node_specs(info), "")
    return out


def combo_options(info: dict, name: str) -> list | None:
    for group in ("required", "optional"):
        spec = info["input"].get(group, {}).get(name)
        if spec:
            if isinstance(spec[0], list):
                return spec[0]
            if spec[0] == "COMBO":
                return (spec[1] if len(spec) > 1 else {}).get("options", [])
            if spec[0] == DYNAMIC_COMBO:
                return [o.get("key") for o in (spec[1] if len(spec) > 1 else {}).get("options", [])]
    return None


UPLOAD_VALUES = ("image", "video", "audio")


def _has_upload(opts: dict) -> bool:
    return any(opts.get(k) for k in ("image_upload", "video_upload", "audio_upload"))


def _has_control(name: str, kind: str, opts: dict) -> bool:
    return kind in ("INT", "FLOAT") and bool(opts.get("control_after_generate")) or name in ("seed", "noise_seed")


def widget_values(node: dict, info: dict) -> dict:
    """Map a UI node's positional widgets_values to (dotted) input names."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):          # some nodes (e.g. VHS) store them by name
        return dict(values)
    out, pos = {}, [0]

    def walk(specs, prefix) -> bool:
        for name, kind, opts, _ in specs:
            if not is_widget(kind, opts):
                continue
            if pos[0] >= len(values):
                return False
            out[prefix + name] = value = values[pos[0]]
            pos[0] += 1
            if _has_control(name, kind, opts) and pos[0] < len(values) and values[pos[0]] in (
                    "fixed", "increment", "decrement", "randomize"):
                pos[0] += 1
            if _has_upload(opts) and pos[0] < len(values) and values[pos[0]] in UPLOAD_VALUES:
                pos[0] += 1                 # the frontend's upload button stores a value too
            if kind == DYNAMIC_COMBO:       # the chosen option's widgets follow their parent
                option = dynamic_option(opts, value)
                if option is not None and not walk(_specs(option.get("inputs", {})), prefix + name + "."):
                    return False
        return True
    walk(node_specs(info), "")
    return out


def unknown_widgets(workflow: dict, object_info: dict) -> list[str]:
    """"node type.input (TYPE)" for every widget of a type this module cannot check."""
    out = []
    for node in workflow.get("nodes", []):
        info = object_info.get(node["type"])
        if info:
            values = widget_values(node, info)
            out += [f"{node['type']}.{name} ({kind})" for name, kind, opts, _ in widget_specs(info, values)
                    if kind not in WIDGET_TYPES and name in values]
    return out


def to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow into an API prompt."""
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError("not a UI-format workflow: it has no 'nodes'/'links' (an API prompt can be posted as is)")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {l[0]: l for l in workflow["links"]}

    def source(link_id):
        """Follow reroutes and bypassed nodes to the real (node id, slot) or a primitive value."""
        _, src, slot, *_ = links[link_id]
        node = nodes[src]
        if node["type"] == "Reroute":
            return source(node["inputs"][0]["link"])
        if node["type"] == "PrimitiveNode":
            return ("value", node["widgets_values"][0])
        if node.get("mode") == BYPASSED:
            out_type = node["outputs"][slot]["type"]
            for inp in node.get("inputs", []):
                if inp.get("link") is not None and inp["type"] == out_type:
                    return source(inp["link"])
            raise WorkflowError(f"bypassed node {src} ({node['type']}) has no {out_type} input to pass through")
        return (str(src), slot)

    prompt = {}
    for nid, node in nodes.items():
        kind = node["type"]
        if kind in SKIP_TYPES or kind in ("Reroute", "PrimitiveNode") or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {nid}: type '{kind}' is not installed (missing custom node pack?)")
        inputs = widget_values(node, object_info[kind])
        for inp in node.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            inputs[inp["name"]] = src[1] if src[0] == "value" else [src[0], src[1]]
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs}
    return prompt


FILE_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".pt", ".pth", ".ckpt", ".bin", ".png", ".jpg", ".jpeg",
                   ".webp", ".mp4", ".webm", ".mov", ".latent", ".index.json", ".npz")


def is_file_value(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(FILE_EXTENSIONS)


def referenced_files(workflow: dict, object_info: dict) -> dict[str, str]:
    """{"node type.input": file name} for every file a workflow's combos name (models, images)."""
    out = {}
    for node in workflow.get("nodes", []):
        info = object_info.get(node["type"])
        if info:
            for name, value in widget_values(node, info).items():
                if is_file_value(value) and combo_options(info, name) is not None:
                    out[f"{node['type']}.{name}"] = value
    return out


def validate(workflow: dict, object_info: dict, allow_missing_files: bool = False) -> list[str]:
    """Everything the frontend would silently get wrong: unknown nodes, bad widget values,
    mismatched link types, missing required inputs. With allow_missing_files, a model or image
    file that this server does not have is not a problem (a user downloads it)."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    for l in workflow.get("links", []):
        link_id, src, slot, dst, dslot, ltype = l
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: endpoint node missing")
            continue
        out_t = nodes[src]["outputs"][slot]["type"]
        in_t = nodes[dst]["inputs"][dslot]["type"]
        if "*" not in (out_t, in_t, ltype) and not (set(str(out_t).split(",")) & set(str(in_t).split(","))):
            problems.append(f"link {link_id}: {nodes[src]['type']} output {out_t} -> {nodes[dst]['type']} input {in_t}")
        info = nodes[src]["type"] in ("Reroute", "PrimitiveNode") or object_info.get(nodes[src]["type"])
        if isinstance(info, dict) and slot < len(info["output"]) and info["output"][slot] != out_t and out_t != "*":
            problems.append(f"link {link_id}: {nodes[src]['type']} output {slot} is {info['output'][slot]}, workflow says {out_t}")
    for nid, node in nodes.items():
        kind = node["type"]
        if kind in SKIP_TYPES or kind in ("Reroute", "PrimitiveNode"):
            continue
        if kind not in object_info:
            problems.append(f"node {nid}: unknown type '{kind}'")
            continue
        info = object_info[kind]
        values = widget_values(node, info)
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, t, opts, required in node_specs(info):
            if required and name not in linked and not is_widget(t, opts):
                problems.append(f"node {nid} ({kind}): required input '{name}' ({t}) is not connected")
        for name, t, opts, required in widget_specs(info, values):
            if name in linked:
                continue
            if name not in values:
                if required:
                    problems.append(f"node {nid} ({kind}): widget '{name}' has no value")
                continue
            v = values[name]
            if t in ("COMBO", DYNAMIC_COMBO):
                opts_list = ([o.get("key") for o in opts.get("options", [])] if t == DYNAMIC_COMBO
                             else opts.get("options", []))
                if v not in opts_list and not (allow_missing_files and is_file_value(v)):
                    problems.append(f"node {nid} ({kind}): {name}={v!r} not in {opts_list[:8]}")
            elif t in ("INT", "FLOAT"):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    problems.append(f"node {nid} ({kind}): {name}={v!r} is not a number")
                elif ("min" in opts and v < opts["min"]) or ("max" in opts and v > opts["max"]):
                    problems.append(f"node {nid} ({kind}): {name}={v} outside [{opts.get('min')}, {opts.get('max')}]")
                elif t == "INT" and v != int(v):
                    problems.append(f"node {nid} ({kind}): {name}={v} is not an integer")
            elif t == "BOOLEAN" and not isinstance(v, bool):
                problems.append(f"node {nid} ({kind}): {name}={v!r} is not a boolean")
            elif t == "STRING" and not isinstance(v, str):
                problems.append(f"node {nid} ({kind}): {name}={v!r} is not a string")
    return problems


def retarget(prompt: dict, unet: str, vae: str, width=64, height=64, length=33, steps=2,
             window_frames=21, overlap_frames=9, seed: int | None = None,
             magi_model: str = "tiny_magi1_4.5b_layout/inference_weight/model.safetensors.index.json",
             magi_vae: str = "tiny_magi1_vae.safetensors", causal_model: str = "tiny_self_forcing_layout.pt",
             causal_base: str = "tiny_longlive_base_layout.pt", causal_lora: str = "tiny_longlive_lora_layout.pt") -> dict:
    """Point an API prompt at small local models and shrink the video, for tests and the demo.

    MAGI-1 graphs get the tiny MAGI-1 files and the tests' tiny T5 (testkit) for T5-XXL, and
    4 steps (MAGI-1 needs a multiple of 4 and of the window size).

    Each CLIPTextEncode becomes ARCacheEmptyConditioning (no tiny umt5 can exist: ComfyUI builds
    the 5.7B model from a fixed config). The defaults give 6-latent windows with 3 of history,
    so causal blocks of 3 fit; larger blocks are cut to 3 and ar_step to 1. A multi-GPU run keeps at
    most 2 ranks (processes on this machine's CPU).
    """
    magi_clips = {v[0] for node in prompt.values() if node["class_type"] == "ARCacheMagiTextEncode"
                  for v in [node["inputs"].get("clip")] if isinstance(v, list)}
    for nid, node in list(prompt.items()):
        kind, inp = node["class_type"], node["inputs"]
        if kind == "ARCacheMagiModelLoader":
            inp["model_name"] = magi_model
        elif kind == "ARCacheMagiVAELoader":
            inp["vae_name"] = magi_vae
        elif kind == "ARCacheCausalWanLoader":             # a LoRA's base gets the tiny base of that layout
            inp["ckpt_name"] = causal_base if "longlive" in inp["ckpt_name"] else causal_model
        elif kind == "ARCacheCausalWanLora":
            inp["lora_name"] = causal_lora
        elif kind == "ARCacheCausalSchedule":             # a window that fits the shrunk video (9 latent frames)
            inp.update(attention_frames=min(inp["attention_frames"], 6), sink_frames=min(inp["sink_frames"], 3))
        elif kind == "CLIPLoader" and nid in magi_clips:   # no tiny T5-XXL can go through CLIPLoader
            prompt[nid] = {"class_type": "TestkitTinyT5Loader", "inputs": {"seed": 0}}
        elif kind == "ARCacheMagiSchedule":
            inp.update(window_size=min(inp["window_size"], 4))
        elif kind == "ARCacheMultiGPU":                    # the tiny Wan has 2 heads: 2 ranks
            inp["gpus"] = min(inp["gpus"], 2)
        elif kind == "UNETLoader":
            inp["unet_name"] = unet
        elif kind == "VAELoader":
            inp["vae_name"] = vae
        elif kind == "CLIPTextEncode":
            prompt[nid] = {"class_type": "ARCacheEmptyConditioning", "inputs": {"value": 0.0}}
        elif kind == "CLIPLoader":
            del prompt[nid]
        elif kind == "ARCacheStreamingSampler":
            magi = any(n["class_type"] == "ARCacheMagiSchedule" for n in prompt.values())
            inp.update(width=width, height=height, length=length, steps=4 if magi else steps)
            if seed is not None:
                inp["seed"] = seed
        elif kind == "ARCacheDFSchedule":
            inp.update(window_frames=window_frames, overlap_frames=overlap_frames,
                       causal_block_size=min(inp["causal_block_size"], 3), ar_step=min(inp["ar_step"], 1))
    return prompt


def main(argv=None) -> int:
    import argparse
    import urllib.request
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["check", "run", "convert"])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="a running ComfyUI")
    a = ap.parse_args(argv)
    with urllib.request.urlopen(a.server + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    status = 0
    for path in a.files:
        with open(path) as f:
            wf = json.load(f)
        problems = validate(wf, info, allow_missing_files=a.command == "check")
        if problems:
            status = 1
            print(f"{path}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
            continue
        prompt = to_api(wf, info)
        for widget in unknown_widgets(wf, info):
            print(f"{path}: {widget}: a widget type this tool does not know; its value is passed through unchecked")
        if a.command == "convert":
            print(json.dumps(prompt, indent=1))
        elif a.command == "run":
            req = urllib.request.Request(a.server + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                print(path, "queued:", json.loads(r.read())["prompt_id"])
        else:
            print(f"{path}: ok ({len(prompt)} nodes)")
    return status


if __name__ == "__main__":
    sys.exit(main())
