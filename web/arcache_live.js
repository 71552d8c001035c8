// ComfyUI-ARCache live view: plays the frames a Streaming AR Sampler emits while it runs, and
// switches its prompt (buttons) through POST /arcache/steer. Events come from nodes/live.py:
// arcache.live.start / frames / switch / end, sent only to the client that queued the prompt.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const runs = {};                       // run id -> player state (also read by the browser tests)
window.ARCacheLive = { runs };

function graphNode(id) {
  // a node inside a subgraph has a path id ("5:12"): look in the graph on screen, then the root;
  // only a Streaming AR Sampler gets the player, never an unrelated node with the same number
  const last = String(id).split(":").pop();
  for (const graph of [app.canvas?.graph, app.graph]) {
    const node = graph?.getNodeById?.(Number(last)) ?? graph?.getNodeById?.(last);
    if (node && (node.comfyClass ?? node.type) === "ARCacheStreamingSampler") return node;
  }
  return null;
}

function playerFor(node) {
  if (node.arcachePlayer) return node.arcachePlayer;
  const root = document.createElement("div");
  root.className = "arcache-live";
  root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;font:12px sans-serif;color:#ddd";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = "width:100%;flex:1;min-height:120px;object-fit:contain;background:#111";
  const status = document.createElement("div");
  status.className = "arcache-live-status";
  const buttons = document.createElement("div");
  buttons.className = "arcache-live-buttons";
  buttons.style.cssText = "display:flex;flex-wrap:wrap;gap:4px";
  root.append(canvas, status, buttons);
  const widget = node.addDOMWidget("arcache_live", "arcache_live", root, { serialize: false, hideOnZoom: false });
  widget.computeSize = (width) => [width, 300];
  node.setSize([Math.max(node.size[0], 360), node.size[1] + 300]);
  node.arcachePlayer = { root, canvas, status, buttons, widget };
  app.graph.setDirtyCanvas(true, true);
  return node.arcachePlayer;
}

function say(run, text) {
  run.note = text;
  render(run);
}

function render(run) {
  const p = run.player;
  if (!p) return;
  const ahead = run.loaded.size;
  const rate = run.realtime ? ` · ${run.realtime}` : "";
  const ttff = run.firstDrawnAt ? ` · first frame after ${((run.firstDrawnAt - run.startedAt) / 1000).toFixed(2)} s` : "";
  p.status.textContent = `frame ${run.drawn}/${run.emitted}${run.ended ? " (ended: " + run.ended + ")" : ""}` +
    ` · ${(ahead / run.fps).toFixed(1)} s buffered${ttff}${rate}${run.note ? " · " + run.note : ""}`;
}

async function steer(run, slot) {
  const res = await api.fetchApi("/arcache/steer", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: run.id, token: run.token, slot }),
  });
  const body = await res.json().catch(() => ({}));
  run.requests.push({ slot, status: res.status });
  say(run, res.ok ? `prompt ${slot + 1} requested` : `steer refused: ${body.error ?? res.status}`);
}

async function finish(run) {
  const res = await api.fetchApi("/arcache/finish", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ run: run.id, token: run.token }),
  });
  const body = await res.json().catch(() => ({}));
  run.requests.push({ finish: true, status: res.status });
  say(run, res.ok ? "finishing after the next window/chunk" : `finish refused: ${body.error ?? res.status}`);
}

function tick(run) {
  if (run.failed.has(run.drawn)) {               // a frame the server no longer holds: skip it
    run.failed.delete(run.drawn);
    run.drawn += 1;
    return;
  }
  const img = run.loaded.get(run.drawn);
  if (!img) {                                    // waiting for the generator: a stall
    if (run.drawn > 0 && !run.ended) run.stalls += 1;
    if (run.ended && run.drawn >= run.emitted) { clearInterval(run.timer); run.timer = null; }
    return;
  }
  const c = run.player.canvas;
  if (c.width !== img.naturalWidth) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
  c.getContext("2d").drawImage(img, 0, 0);
  run.loaded.delete(run.drawn);
  if (run.drawn === 0) run.firstDrawnAt = performance.now();
  run.drawn += 1;
  render(run);
}

api.addEventListener("arcache.live.start", ({ detail }) => {
  const node = graphNode(detail.node);
  const run = runs[detail.run] = {
    id: detail.run, token: detail.token, node: detail.node, fps: detail.fps || 24, slots: detail.slots,
    emitted: 0, drawn: 0, loaded: new Map(), failed: new Set(), stalls: 0, switches: [], requests: [], ended: null,
    startedAt: performance.now(), firstDrawnAt: null, player: node ? playerFor(node) : null,
  };
  for (const other of Object.values(runs)) {
    if (other !== run && other.node === run.node && other.timer) { clearInterval(other.timer); other.timer = null; }
  }
  if (run.player) {
    run.player.buttons.replaceChildren();
    if (detail.steerable && detail.slots > 1) {
      for (let i = 0; i < detail.slots; i++) {
        const b = document.createElement("button");
        b.textContent = `prompt ${i + 1}`;
        b.dataset.slot = String(i);
        b.onclick = () => steer(run, i);
        run.player.buttons.append(b);
      }
    }
    if (detail.steerable) {                        // end here: the video so far is the result
      const f = document.createElement("button");
      f.textContent = "finish";
      f.dataset.finish = "1";
      f.title = "End the video after the next finished window or chunk and keep it";
      f.onclick = () => finish(run);
      run.player.buttons.append(f);
    }
    run.timer = setInterval(() => tick(run), 1000 / run.fps);
  }
  render(run);
});

api.addEventListener("arcache.live.frames", ({ detail }) => {
  const run = runs[detail.run];
  if (!run) return;
  run.emitted = detail.first + detail.count;
  for (let i = detail.first; i < detail.first + detail.count; i++) {
    const img = new Image();
    img.onload = () => { run.loaded.set(i, img); };
    img.onerror = () => { run.failed.add(i); };
    img.src = api.apiURL(`/arcache/live/${run.id}/${i}.jpg?token=${encodeURIComponent(run.token)}`);
  }
  render(run);
});

api.addEventListener("arcache.live.switch", ({ detail }) => {
  const run = runs[detail.run];
  if (!run) return;
  run.switches.push(detail);
  say(run, `prompt ${detail.slot + 1} from ${detail.piece != null ? "piece " + (detail.piece + 1) : "now"}`);
});

api.addEventListener("arcache.live.end", ({ detail }) => {
  const run = runs[detail.run];
  if (!run) return;
  run.ended = detail.status;
  if (detail.realtime_factor) run.realtime = `${(1 / detail.realtime_factor).toFixed(2)}x real time`;
  render(run);
});

app.registerExtension({ name: "arcache.live" });
