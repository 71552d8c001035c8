"""Drive ComfyUI's real web frontend in headless Chromium (Debian's package, via Playwright).

Used to prove that shipped workflows load in the frontend users have: every node type is
registered, and the frontend's own graph -> prompt conversion matches ours.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import urllib.request

CHROMIUM = "/usr/lib/chromium/chromium"
READY = """() => !!(window.app && app.graph && app.canvas && app.extensionManager
    && app.extensionManager.workflow && app.extensionManager.workflow.activeWorkflow
    && window.LiteGraph && Object.keys(LiteGraph.registered_node_types).length > 0
    && document.querySelector('#graph-canvas'))"""
# First-run screens and update checks would cover the graph or call out to the internet.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Notification.ShowVersionUpdates": False}


class Frontend:
    def __init__(self, url: str):
        self.url = url

    def __enter__(self) -> "Frontend":
        from playwright.sync_api import sync_playwright
        req = urllib.request.Request(self.url + "/api/settings", data=json.dumps(SETTINGS).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=30).read()
        self.profile = tempfile.mkdtemp(prefix="arcache_chromium_")
        self.pw = sync_playwright().start()
        self.ctx = self.pw.chromium.launch_persistent_context(
            self.profile, executable_path=CHROMIUM, headless=True, viewport={"width": 1600, "height": 900},
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  # every host but the test server fails to resolve: the page stays hermetic
                  "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"])
        self.page = self.ctx.new_page()
        self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        self.page.goto(self.url, wait_until="load", timeout=120_000)
        self.page.wait_for_function(READY, timeout=120_000)
        return self

    def __exit__(self, *exc):
        self.ctx.close()
        self.pw.stop()
        shutil.rmtree(self.profile, ignore_errors=True)

    def load(self, workflow: dict, name: str) -> dict:
        """Load a UI-format workflow; return the node types the frontend lacks, its API prompt and
        every node's drawn bounding box [x, y, width, height] (title bar included)."""
        return self.page.evaluate("""async ([wf, name]) => {
            const missing = [...new Set(wf.nodes.map(n => n.type)
                .filter(t => !['Note', 'MarkdownNote', 'Reroute', 'PrimitiveNode'].includes(t)
                             && !LiteGraph.registered_node_types[t]))];
            await app.loadGraphData(wf, true, true, name);
            const { output } = await app.graphToPrompt();
            app.canvas.draw(true, true);            // sizes as drawn
            const boxes = app.graph._nodes.map(n => ({ id: n.id, type: n.type, box: Array.from(n.getBounding()) }));
            return { missing, prompt: output, nodes: app.graph._nodes.length, boxes };
        }""", [workflow, name])

    def screenshot(self, path: str) -> None:
        self.page.screenshot(path=path)
