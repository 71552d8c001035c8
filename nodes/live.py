"""Watch and steer a video while the Streaming AR Sampler makes it: the Live View node, its routes
on ComfyUI's own server and its websocket events.

While a sampler with a Live View runs, it is one `LiveRun` in the registry:
- every emitted frame is kept as a small JPEG in a bounded ring and announced to the client that
  queued the prompt (`arcache.live.frames`); the `web/` player fetches them from
  `GET /arcache/live/{run}/{frame}.jpg?token=...` and plays them at the video's fps;
- `POST /arcache/steer` {run, token, slot} switches the prompt to one of the Live View's prompts
  (encoded before the run); the sampler applies it at its next point where a prompt can change
  and logs it in the report's `switches`, which the `replay` input reproduces bit for bit;
- `POST /arcache/finish` {run, token} ends the video after the next finished window or chunk:
  the sampler returns the video so far as its result.
The token is made per run and sent only to the queuing client; ComfyUI itself has no
authentication, so anyone who can reach its port can queue prompts anyway: the routes add no
exposure beyond that, read no paths and accept bodies of at most 16 KB.
"""
from __future__ import annotations

import io as _io
import json
import logging
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..model_patches.steering import Mailbox, Steering, parse_replay
from .errors import InputError, named_errors
from .schedules import ARPrompts

LiveType = io.Custom("ARCACHE_LIVE")
MAX_BODY = 16 * 1024
KEEP_FINISHED = 4                 # finished runs whose frames stay fetchable (the player may lag behind)


@dataclass
class LiveSettings:
    """What the Live View node asks for."""
    prompts: list | None            # the slots steering switches among (None: the sampler's prompts)
    replay: str = ""
    view_size: int = 512            # longest side of the frames sent to the player
    ring_frames: int = 720          # frames the player can still fetch (30 s at 24 fps)


@dataclass
class LiveRun:
    run: str
    token: str
    node: str
    client_id: str | None
    slots: int
    steerable: bool
    fps: float
    ring_frames: int
    mailbox: Mailbox = field(default_factory=Mailbox)
    frames: OrderedDict = field(default_factory=OrderedDict)     # frame index -> JPEG bytes
    emitted: int = 0
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, jpegs: list[bytes]) -> int:
        """A piece's frames; older frames leave the ring beyond `ring_frames`, never the new piece's
        own (the player has not been told of them yet)."""
        with self.lock:
            first = self.emitted
            for data in jpegs:
                self.frames[self.emitted] = data
                self.emitted += 1
            while len(self.frames) > self.ring_frames and next(iter(self.frames)) < first:
                self.frames.popitem(last=False)
            return first

    def frame(self, index: int) -> tuple[bytes | None, int]:
        """(the frame's JPEG or None, the oldest frame held)."""
        with self.lock:
            return self.frames.get(index), next(iter(self.frames), 0)


class Registry:
    """Live runs by id: the running ones and the last few finished ones."""

    def __init__(self):
        self._runs: OrderedDict[str, LiveRun] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, **kw) -> LiveRun:
        run = LiveRun(run=uuid.uuid4().hex, token=secrets.token_urlsafe(16), **kw)
        with self._lock:
            self._runs[run.run] = run
        return run

    def close(self, run: LiveRun) -> None:
        with self._lock:
            run.finished = True
            finished = [r for r in self._runs.values() if r.finished]
            for old in finished[:-KEEP_FINISHED]:
                del self._runs[old.run]

    def get(self, run_id) -> LiveRun | None:
        with self._lock:
            return self._runs.get(run_id) if isinstance(run_id, str) else None


REGISTRY = Registry()


def server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except Exception:          # no server (in-process use): nothing to announce to
        return None


def send(event: str, data: dict, client_id) -> None:
    """To the client that queued the prompt only (ComfyUI would broadcast a None client id to every
    tab, token included; a prompt queued without one gets no events, as ComfyUI's own)."""
    srv = server()
    if srv is not None and client_id is not None:
        srv.send_sync(f"arcache.live.{event}", data, client_id)


def jpeg(frame: torch.Tensor, size: int, quality: int = 85) -> bytes:
    from PIL import Image
    img = Image.fromarray((frame.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    if max(img.size) > size:
        img.thumbnail((size, size))
    buf = _io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class LiveSession:
    """One sampler run's live view: opened before the run, closed in the sampler's `finally`."""

    def __init__(self, settings: LiveSettings, slots: list, node_id, fps: float, total_frames: int | None):
        self.settings = settings
        replay = parse_replay(settings.replay, len(slots))
        srv = server()
        self.live = REGISTRY.open(node=str(node_id), client_id=getattr(srv, "client_id", None), slots=len(slots),
                                  steerable=replay is None, fps=float(fps), ring_frames=settings.ring_frames)
        self.steering = Steering(slots, replay=replay, mailbox=self.live.mailbox, on_switch=self._switched)
        send("start", {"run": self.live.run, "token": self.live.token, "node": self.live.node, "fps": self.live.fps,
                       "slots": len(slots), "steerable": self.live.steerable, "total_frames": total_frames},
             self.live.client_id)

    def _switched(self, entry: dict) -> None:
        send("switch", dict(entry, run=self.live.run, node=self.live.node), self.live.client_id)

    def frames(self, frames: torch.Tensor, piece) -> None:
        """The sink: emitted frames [N, H, W, 3] to the ring and the player."""
        first = self.live.add([jpeg(f, self.settings.view_size) for f in frames])
        send("frames", {"run": self.live.run, "node": self.live.node, "first": first, "count": int(frames.shape[0]),
                        "piece": piece}, self.live.client_id)

    def close(self, status: str, report: dict | None = None) -> None:
        REGISTRY.close(self.live)
        end = {"run": self.live.run, "node": self.live.node, "status": status, "frames": self.live.emitted}
        if report:
            end.update({k: report.get(k) for k in ("ttff_s", "sustained_fps", "realtime_factor", "startup_delay_s")})
        send("end", end, self.live.client_id)


# ----------------------------------------------------------------------------- routes

def _error(status: int, message: str):
    from aiohttp import web
    return web.json_response({"error": message}, status=status)


def _authorised(live: LiveRun | None, token) -> str | None:
    """None, or why not (the caller answers 404 or 403)."""
    if live is None:
        return "unknown"
    if not isinstance(token, str) or not secrets.compare_digest(token, live.token):
        return "token"
    return None


async def get_frame(request):
    from aiohttp import web
    live = REGISTRY.get(request.match_info.get("run"))
    why = _authorised(live, request.query.get("token"))
    if why == "unknown":
        return _error(404, "no live run with this id (it ended long ago, or ComfyUI restarted)")
    if why == "token":
        return _error(403, "wrong token for this run")
    try:
        index = int(request.match_info.get("frame", ""))
    except ValueError:
        return _error(400, "frame must be a whole number")
    data, oldest = live.frame(index)
    if data is None:
        return _error(404, f"frame {index} is not held (frames {oldest}..{live.emitted - 1})")
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "no-store"})


async def _json_body(request, shape: str):
    """(the JSON object of a POST body, None) or (None, a 4xx answer)."""
    if request.content_length is None or request.content_length > MAX_BODY:
        return None, _error(413, f"the body must be JSON of at most {MAX_BODY} bytes, with a Content-Length")
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, _error(400, f"the body is not JSON; send {shape}")
    if not isinstance(body, dict):
        return None, _error(400, f"the body must be a JSON object {shape}")
    return body, None


def _steerable(body: dict):
    """(the running, live-steered run the body names, None) or (None, a 4xx answer)."""
    live = REGISTRY.get(body.get("run"))
    why = _authorised(live, body.get("token"))
    if why == "unknown":
        return None, _error(404, "no live run with this id")
    if why == "token":
        return None, _error(403, "wrong token for this run")
    if live.finished:
        return None, _error(409, "this run has ended; steer a running one")
    if not live.steerable:
        return None, _error(409, "this run replays a logged run's switches; it takes no live ones")
    return live, None


async def post_steer(request):
    from aiohttp import web
    body, error = await _json_body(request, '{"run": ..., "token": ..., "slot": <prompt number from 0>}')
    if error is not None:
        return error
    live, error = _steerable(body)
    if error is not None:
        return error
    slot = body.get("slot")
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < live.slots:
        return _error(400, f"slot must be a prompt number from 0 to {live.slots - 1}")
    live.mailbox.put(slot)
    logging.info("ARCache live run %s: switch to prompt %d requested", live.run[:8], slot)
    return web.json_response({"accepted": True, "slot": slot,
                              "applies": "at the next point where a prompt can change (DF: a block's first step; "
                                         "MAGI-1: the next chunk entering the window)"})


async def post_finish(request):
    """End the video at the next finished window (SkyReels-V2-DF) or chunk (MAGI-1): the sampler
    returns the video so far as its result (and the file is closed as finished)."""
    from aiohttp import web
    body, error = await _json_body(request, '{"run": ..., "token": ...}')
    if error is not None:
        return error
    live, error = _steerable(body)
    if error is not None:
        return error
    live.mailbox.finish.set()
    logging.info("ARCache live run %s: finish requested", live.run[:8])
    return web.json_response({"accepted": True, "applies": "after the next finished window (SkyReels-V2-DF) or "
                                                         "chunk (MAGI-1); the video so far is the result"})


def register_routes() -> bool:
    srv = server()
    if srv is None or getattr(srv, "_arcache_live_routes", False):
        return False
    srv.routes.get("/arcache/live/{run}/{frame}.jpg")(get_frame)
    srv.routes.post("/arcache/steer")(post_steer)
    srv.routes.post("/arcache/finish")(post_finish)
    srv._arcache_live_routes = True
    return True


register_routes()


# ----------------------------------------------------------------------------- node

class LiveViewNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheLiveView",
            display_name="Live View",
            category="ARCache/sampling",
            description=(
                "Watch the video while the Streaming AR Sampler makes it, and switch its prompt as it runs. "
                "Connect to the sampler's live input: each finished block (SkyReels-V2-DF async) or chunk (MAGI-1) "
                "is decoded at once with the sampler's vae and played in a player on the sampler node (without a "
                "vae, SkyReels-V2-DF shows the latent preview's colours instead; MAGI-1 needs the vae). Buttons on the "
                "player switch to one of the prompts given here; the switch applies at the sampler's next block "
                "start (SkyReels-V2-DF; sync windows: the next window) or the next chunk entering the window "
                "(MAGI-1), and the report's `switches` log lets replay reproduce the run exactly."),
            inputs=[
                ARPrompts.Input("prompts", optional=True,
                                tooltip="The prompts the player can switch to (a Prompt Schedule list). Empty: the sampler's prompt_schedule, or its positive."),
                io.String.Input("replay", default="", multiline=True, optional=True,
                                tooltip="Reproduce a steered run: paste its report's `switches` list (or the whole report). Empty: steer live."),
                io.Int.Input("view_size", default=512, min=16, max=4096, optional=True,
                             tooltip="Longest side of the frames sent to the player, in pixels (the file keeps full size)."),
                io.Int.Input("ring_frames", default=720, min=16, max=100000, optional=True,
                             tooltip="How many recent frames the player can still fetch (JPEGs kept in memory)."),
            ],
            outputs=[LiveType.Output(display_name="live", tooltip="Connect to the Streaming AR Sampler's live input.")],
        )

    @classmethod
    @named_errors("Live View")
    def execute(cls, prompts=None, replay="", view_size=512, ring_frames=720) -> io.NodeOutput:
        if replay and replay.strip():
            parse_replay(replay, 1 << 30)           # JSON and shape checked here; slots by the sampler
        return io.NodeOutput(LiveSettings(prompts=list(prompts) if prompts else None, replay=replay or "",
                                          view_size=view_size, ring_frames=ring_frames))


def open_session(live: LiveSettings | None, positives: list, node_id, fps, total_frames):
    """The sampler's live session, or None without a Live View."""
    if live is None:
        return None
    slots = live.prompts or positives
    if not slots:
        raise InputError("live", "has no prompts to switch among")
    return LiveSession(live, slots, node_id, fps, total_frames)
