"""The workflow tooling and the shipped workflows against the newest core's /object_info forms.

`tests/fixtures/object_info_newest_core.json` holds the /object_info entries of the core nodes
our workflows use as ComfyUI 0.38 serves them, written from the newest core's source
(`tests/fixtures/NEWEST_CORE_NOTES.md` cites it): SaveVideo's `format` is a dynamic combo there
(COMFY_DYNAMICCOMBO_V3), SaveLatent and SaveVideo gained outputs, GetVideoComponents has 5, ...
The pack's own entries come from the live server.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.workflow import to_api, unknown_widgets, validate

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
NEWEST = {k: v for k, v in json.loads((ROOT / "tests" / "fixtures" / "object_info_newest_core.json").read_text()).items()
          if not k.startswith("_")}


@pytest.fixture(scope="module")
def live(comfy):
    return comfy.object_info()


@pytest.fixture(scope="module")
def newest(live):
    return {**live, **NEWEST}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflow_is_valid_on_the_newest_core(newest, path):
    wf = json.loads(path.read_text())
    assert validate(wf, newest, allow_missing_files=True) == []
    prompt = to_api(wf, newest)
    for node in prompt.values():
        if node["class_type"] == "SaveVideo":     # the form the newest server expands
            assert node["inputs"]["format"] in ("auto", "mp4") and node["inputs"]["format.codec"] == "auto"
    assert unknown_widgets(wf, newest) == []


def test_save_video_converts_for_each_core(live, newest):
    wf = json.loads((ROOT / "workflows" / "skyreels_df_i2v.json").read_text())
    old = next(n for n in to_api(wf, live).values() if n["class_type"] == "SaveVideo")["inputs"]
    new = next(n for n in to_api(wf, newest).values() if n["class_type"] == "SaveVideo")["inputs"]
    assert {k: v for k, v in old.items() if not isinstance(v, list)} == {
        "filename_prefix": "video/ARCache_skyreels_df", "format": "auto", "codec": "auto"}
    assert {k: v for k, v in new.items() if not isinstance(v, list)} == {
        "filename_prefix": "video/ARCache_skyreels_df", "format": "auto", "format.codec": "auto"}


def save_video_workflow(values):
    return {"nodes": [{"id": 1, "type": "SaveVideo", "mode": 0, "widgets_values": values,
                       "inputs": [{"name": "video", "type": "VIDEO", "link": None}], "outputs": []}], "links": []}


def test_dynamic_combo_values_are_walked_and_checked(newest):
    wf = save_video_workflow(["v/x", "mp4", "h264", "re-encode", 30.0])
    prompt = to_api(wf, newest)["1"]["inputs"]
    assert prompt == {"filename_prefix": "v/x", "format": "mp4", "format.codec": "h264",
                      "format.codec.encoding": "re-encode", "format.codec.encoding.crf": 30.0}
    problems = validate(save_video_workflow(["v/x", "avi"]), newest)
    assert any("format='avi' not in" in p for p in problems)
    problems = validate(save_video_workflow(["v/x", "mp4", "h264", "re-encode", 99.0]), newest)
    assert any("format.codec.encoding.crf=99.0 outside" in p for p in problems)
    problems = validate(save_video_workflow(["v/x"]), newest)
    assert any("widget 'format' has no value" in p for p in problems)
    assert any("required input 'video' (VIDEO) is not connected" in p for p in problems)


def test_unknown_socketless_types_are_widgets_named_as_unchecked(newest):
    """LoadVideo's new `edit` (VIDEO_EDIT, socketless): a widget type this tooling does not know."""
    wf = {"nodes": [{"id": 1, "type": "LoadVideo", "mode": 0, "widgets_values": ["clip.mp4", "image", {"trim": 1}],
                     "inputs": [], "outputs": []}], "links": []}
    assert to_api(wf, newest)["1"]["inputs"] == {"file": "clip.mp4", "edit": {"trim": 1}}   # upload value skipped
    assert unknown_widgets(wf, newest) == ["LoadVideo.edit (VIDEO_EDIT)"]
    assert validate(wf, newest, allow_missing_files=True) == []
