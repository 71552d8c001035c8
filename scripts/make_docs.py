#!/usr/bin/env python3
"""`make docs`: the generated parts of the docs, from a headless ComfyUI with this pack.

- docs/nodes.md: the node reference, from the live /object_info (tools/node_reference.py);
- docs/screenshots/<workflow>.png: the main shipped workflows as ComfyUI's real web frontend
  draws them (Debian's Chromium, as in the frontend tests), the whole graph in view.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.comfy_server import ComfyServer  # noqa: E402
from tools.frontend import Frontend  # noqa: E402
from tools.node_reference import render  # noqa: E402

SHOTS = ("skyreels_df_t2v_flowcache", "skyreels_df_t2v_motioncache", "skyreels_df_i2v_flowcache",
         "skyreels_df_extend_video")
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
