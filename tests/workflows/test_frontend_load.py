"""The shipped workflows in ComfyUI's real web frontend (headless Chromium).

Validation against /object_info cannot see what the frontend does with a file: a node type it
does not know, or widget values it reads in another order (the seed's hidden companion value,
V3 optional widgets) silently become defaults. So each workflow is loaded into the frontend and
the frontend's own graph -> API prompt conversion must equal ours, input by input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tools.frontend import CHROMIUM, Frontend
from tools.workflow import to_api

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def frontend(comfy):
    if os.environ.get("ARCACHE_SKIP_BROWSER"):
        pytest.skip("ARCACHE_SKIP_BROWSER is set: the frontend ring was switched off on purpose")
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no {CHROMIUM}: `apt-get install chromium` (make host does it as root), "
                           "or set ARCACHE_SKIP_BROWSER=1 to switch the frontend tests off")
    with Frontend(comfy.url) as fe:
        yield fe


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_loads_workflow_like_our_converter(path, frontend, comfy, tmp_path):
    wf = json.loads(path.read_text())
    got = frontend.load(wf, path.name)
    assert got["missing"] == []
    assert got["nodes"] == len(wf["nodes"])
    ours = to_api(wf, comfy.object_info())
    theirs = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in got["prompt"].items()}
    assert theirs.keys() == ours.keys()
    for nid in ours:
        assert theirs[nid]["class_type"] == ours[nid]["class_type"]
        assert theirs[nid]["inputs"] == ours[nid]["inputs"], f"node {nid} ({ours[nid]['class_type']})"
    frontend.screenshot(str(tmp_path / f"{path.stem}.png"))
    # no node drawn over another at the frontend's own node sizes
    boxes = got["boxes"]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, f"{a['type']} {a['box']} overlaps {b['type']} {b['box']}"
