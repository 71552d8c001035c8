"""The live view in ComfyUI's real web frontend (headless Chromium): a prompt queued from the page
plays its frames in the player on the sampler node before the prompt ends, and the player's
buttons steer the run through the server's route (the switch is applied and reported)."""
from __future__ import annotations

import json
import os

import pytest

from build_workflows import to_ui
from tools.frontend import CHROMIUM, Frontend
from tools.graphs import live_graph

UNET13, VAE = "tiny_skyreels_df_1.3b_layout.safetensors", "tiny_wan21_vae.safetensors"


@pytest.fixture(scope="module")
def frontend(comfy):
    if os.environ.get("ARCACHE_SKIP_BROWSER"):
        pytest.skip("ARCACHE_SKIP_BROWSER is set: the frontend ring was switched off on purpose")
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no {CHROMIUM}: `apt-get install chromium`, or set ARCACHE_SKIP_BROWSER=1")
    with Frontend(comfy.url) as fe:
        yield fe


PLAY_AND_STEER = """async () => {
    const t0 = performance.now();
    await app.queuePrompt(0, 1);
    const until = async (ok, ms) => {
        const end = performance.now() + ms;
        while (!ok()) {
            if (performance.now() > end) return false;
            await new Promise(r => setTimeout(r, 20));
        }
        return true;
    };
    const run = () => Object.values(window.ARCacheLive?.runs ?? {}).find(r => r.startedAt >= t0);
    if (!await until(() => run() && run().drawn > 0, 120000)) return { error: 'no frame drawn', run: run() };
    const r = run();
    const drawnFirst = { at: r.firstDrawnAt, ended: r.ended };
    const button = r.player.buttons.querySelector('button[data-slot="1"]');
    button.click();
    await until(() => r.requests.length > 0, 30000);
    await until(() => r.ended !== null, 300000);
    await until(() => r.drawn >= r.emitted, 60000);
    return { ttff_client_s: (drawnFirst.at - t0) / 1000, ended_at_first_draw: drawnFirst.ended,
             drawn: r.drawn, emitted: r.emitted, requests: r.requests, switches: r.switches, ended: r.ended,
             canvas: [r.player.canvas.width, r.player.canvas.height],
             buttons: r.player.buttons.querySelectorAll('button').length };
}"""


def test_player_shows_frames_while_running_and_steers(frontend, comfy, tmp_path):
    info = comfy.object_info()
    wf = to_ui(live_graph(UNET13, vae=VAE, length=201), info)
    got = frontend.load(wf, "live_view_test.json")
    assert got["missing"] == []
    result = frontend.page.evaluate(PLAY_AND_STEER)
    frontend.screenshot(str(tmp_path / "live_view.png"))
    assert "error" not in result, result
    print("ttff_client_s", result["ttff_client_s"])
    assert result["ended_at_first_draw"] is None           # a frame was drawn while the prompt was running
    assert result["ended"] == "finished"
    assert result["drawn"] == result["emitted"] == 201     # every frame played, in order
    assert result["canvas"] == [64, 64] and result["buttons"] == 3       # two prompts and "finish"
    assert result["requests"] == [{"slot": 1, "status": 200}]
    assert len(result["switches"]) == 1 and result["switches"][0]["slot"] == 1
    history = comfy.get("/history")
    outputs = [e["outputs"] for e in history.values() if any(
        o.get("text") and "switches" in o["text"][0] for o in e["outputs"].values())]
    report = json.loads(next(o["text"][0] for o in outputs[-1].values() if o.get("text")))
    assert report["switches"][0]["call"] == result["switches"][0]["call"]
