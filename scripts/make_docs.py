#!/usr/bin/env python3
"""`make docs`: the generated parts of the docs, from a headless ComfyUI with this pack.

- docs/nodes.md: the node reference, from the live /object_info (tools/node_reference.py);
- docs/screenshots/<workflow>.png: the main shipped workflows as ComfyUI's real web frontend
  draws them (Debian's Chromium, as in the frontend tests), the whole graph in view;
- docs/screenshots/heatmap.png: MotionCache's compute heatmap over a toy-world video (every
  second latent frame of the first windows: preview colours on top, heatmap below);
- docs/screenshots/live_view.png: the live view playing a toy-world video while it is generated
  (queued from the page, captured mid-run).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.comfy_server import ComfyServer  # noqa: E402
from tools.frontend import READY, Frontend  # noqa: E402
from tools.graphs import live_graph, streaming_graph  # noqa: E402
from tools.node_reference import render  # noqa: E402

TOY = REPO / "toy_world" / "weights" / "toy_world_df.safetensors"


def heatmap_sheet(server: ComfyServer, path: Path) -> None:
    """A toy-world video with MotionCache: preview frames above, the heatmap over them below."""
    from PIL import Image
    server.add_model(TOY, "diffusion_models")
    sch = dict(window_frames=29, overlap_frames=5, ar_step=2, causal_block_size=2, prefix_mode="latent")
    cache = dict(class_type="ARCacheMotionCache", threshold=0.2, warmup_steps=1, phase1_updates=2, coefficients="none")
    g, sid = streaming_graph(TOY.name, width=128, height=128, length=53, steps=12, cfg=1.0, seed=3, schedule=sch,
                             cache=cache, save_prefix="latents/docs_heatmap")
    preview = g.add("ARCacheLatentPreview", samples=g.out(sid), family="wan21", upscale=8)
    heat = g.add("ARCacheComputeHeatmap", samples=g.out(sid), images=g.out(preview), opacity=0.65)
    g.add("SaveImage", images=g.out(preview), filename_prefix="docs/preview", node_id="pre")
    g.add("SaveImage", images=g.out(heat), filename_prefix="docs/heat", node_id="heat")
    entry = server.run(g.prompt, timeout=1800)
    rows = [[Image.open(server.output_path(i)) for i in entry["outputs"][k]["images"]][::2] for k in ("pre", "heat")]
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * len(rows[0]), 2 * h), "white")
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            sheet.paste(im.convert("RGB"), (c * w, r * h))
    sheet.save(path)

def live_view_shot(server: ComfyServer, fe: Frontend, path: Path) -> None:
    """The player on the sampler node, mid-run, on the toy world (queued from the page itself; no
    VAE for toy latents, so the player shows the latent preview's colours)."""
    from build_workflows import to_ui
    server.add_model(TOY, "diffusion_models")
    graph = live_graph(TOY.name, width=128, height=128, length=241, steps=12, seed=3,
                       schedule=dict(window_frames=29, ar_step=2, causal_block_size=2, addnoise_condition=0, fps=16,
                                     prefix_mode="latent"))
    fe.load(to_ui(graph, server.object_info()), "live_view.json")
    fe.page.evaluate(FIT)
    fe.page.evaluate("""async () => {
        const t0 = performance.now();
        await app.queuePrompt(0, 1);
        const run = () => Object.values(window.ARCacheLive?.runs ?? {}).find(r => r.startedAt >= t0);
        while (!(run() && run().drawn >= 40)) await new Promise(r => setTimeout(r, 50));
    }""")
    fe.page.evaluate(FIT)
    fe.screenshot(str(path))
    fe.page.evaluate("""async () => {      // the run ends before the next screenshots
        const runs = Object.values(window.ARCacheLive.runs);
        while (runs.some(r => r.ended === null)) await new Promise(r => setTimeout(r, 100));
    }""")
    fe.page.reload(wait_until="load")          # no "job completed" toast over the next screenshots
    fe.page.wait_for_function(READY, timeout=120_000)


SHOTS = ("skyreels_df_t2v_flowcache", "skyreels_df_t2v_motioncache", "skyreels_df_i2v_flowcache",
         "skyreels_df_extend_video", "magi1_t2v", "skyreels_df_t2v_live", "magi1_t2v_live", "causal_wan_t2v",
         "longlive_t2v_live")
FIT = """() => {
    let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
    for (const n of app.graph._nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 40);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    const c = app.canvas, r = window.devicePixelRatio || 1;
    const W = c.canvas.width / r, H = c.canvas.height / r;
    const s = Math.min(W / (x1 - x0), H / (y1 - y0)) * 0.92;
    c.ds.scale = s;
    c.ds.offset = [W / (2 * s) - (x0 + x1) / 2, H / (2 * s) - (y0 + y1) / 2];
    c.setDirty(true, true);
    c.draw(true, true);
}"""


def main() -> int:
    out = REPO / "docs"
    (out / "screenshots").mkdir(parents=True, exist_ok=True)
    with ComfyServer(Path(tempfile.mkdtemp(prefix="arcache_docs_"))) as server:
        (out / "nodes.md").write_text(render(server.object_info()))
        print(f"wrote {out / 'nodes.md'}")
        with Frontend(server.url) as fe:
            heatmap_sheet(server, out / "screenshots" / "heatmap.png")
            print(f"wrote {out / 'screenshots' / 'heatmap.png'}")
            live_view_shot(server, fe, out / "screenshots" / "live_view.png")
            print(f"wrote {out / 'screenshots' / 'live_view.png'}")
            for name in SHOTS:
                wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
                fe.load(wf, f"{name}.json")
                fe.page.evaluate(FIT)
                fe.page.wait_for_timeout(500)
                path = out / "screenshots" / f"{name}.png"
                fe.screenshot(str(path))
                print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
