"""The docs as a user meets them: generated from the live nodes, every node listed, every valid
value enterable in the UI."""
from __future__ import annotations

from pathlib import Path

from tools.node_reference import render

ROOT = Path(__file__).resolve().parents[2]


def pack_nodes(info: dict) -> dict:
    return {k: v for k, v in info.items() if k.startswith("ARCache")}


def test_node_reference_is_current(comfy):
    assert (ROOT / "docs" / "nodes.md").read_text() == render(comfy.object_info()), \
        "docs/nodes.md is stale: run `make docs`"


def test_readme_node_table_lists_every_node(comfy):
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in pack_nodes(comfy.object_info()) if f"`{k}`" not in readme]
    assert not missing, f"README's node table lacks {missing}"


# ComfyUI's frontend snaps an INT widget to min + k*step: every INT input with a step above 1 must
# reach all its valid values that way.
VALID = {("ARCacheDFSchedule", "window_frames"): (97, 121, 57, 5),          # 4k+1
         ("ARCacheStreamingSampler", "length"): (1, 97, 257, 737, 1457),    # 4k+1
         ("ARCacheStreamingSampler", "width"): (960, 1280, 16),             # multiples of 16
         ("ARCacheStreamingSampler", "height"): (544, 720, 16)}


def test_every_valid_int_value_can_be_entered(comfy):
    stepped = {}
    for node, info in pack_nodes(comfy.object_info()).items():
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                if spec[0] == "INT" and spec[1].get("step", 1) > 1:
                    stepped[(node, name)] = spec[1]
    assert stepped.keys() == VALID.keys(), "an INT input gained a step: add its valid values here"
    for key, opts in stepped.items():
        for v in VALID[key]:
            assert opts["min"] <= v <= opts["max"] and (v - opts["min"]) % opts["step"] == 0, (key, v)
    overlap = comfy.object_info()["ARCacheDFSchedule"]["input"]["required"]["overlap_frames"][1]
    assert overlap["min"] == 0 and overlap.get("step", 1) == 1      # 0, 17, 37 ... all reachable
