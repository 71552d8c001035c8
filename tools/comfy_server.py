"""Boot a headless ComfyUI server and talk to it over HTTP (tests, demo, bench).

Each server gets its own --base-directory (private models/, custom_nodes/, input/, output/)
and an in-memory database, so several can run side by side and nothing leaks between runs.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-ARCache"


class ComfyError(RuntimeError):
    """A server or prompt failure; the message carries the cause and the server log tail."""


def host_paths() -> tuple[Path, str]:
    """The ComfyUI checkout and interpreter to use: $COMFYUI_PATH/$COMFYUI_PYTHON or .host/."""
    comfy = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")
    python = os.environ.get("COMFYUI_PYTHON") or str(REPO / ".host" / "venv" / "bin" / "python")
    if not (comfy / "main.py").is_file():
        raise ComfyError(f"no ComfyUI at {comfy}: run `make host` (or set COMFYUI_PATH)")
    return comfy, python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def copy_pack(dest: Path) -> None:
    """Copy the pack's files (tracked, and new ones git does not ignore: what a clone or the
    Registry's archive holds, never .host/ or out/) to dest."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


class ComfyServer:
    def __init__(self, base_dir: Path, comfy_dir: Path | None = None, python: str | None = None,
                 extra_args: tuple[str, ...] = (), install: str = "link"):
        """install: "link" (a symlink to this checkout: edits are live) or "copy" (the pack's
        tracked files copied, as ComfyUI-Manager or a signed-node policy would have it)."""
        if install not in ("link", "copy"):
            raise ValueError(f"install must be link or copy, got {install!r}")
        self.install = install
        default_comfy, default_python = host_paths()
        self.comfy_dir = Path(comfy_dir or default_comfy)
        self.python = python or default_python
        self.base_dir = Path(base_dir)
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"

    # --- lifecycle -------------------------------------------------------------------------
    def prepare(self) -> "ComfyServer":
        """Make the private folders and link this pack into custom_nodes."""
        for sub in ("models/diffusion_models", "models/vae", "models/loras", "custom_nodes", "input", "output",
                    "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        dest = self.base_dir / "custom_nodes" / PACK_NAME
        if not dest.exists():
            if self.install == "link":
                dest.symlink_to(REPO, target_is_directory=True)
            else:
                copy_pack(dest)
        return self

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.prepare()
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:", "--log-stdout", *self.extra_args]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited during start-up (code {self.proc.returncode})\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() - t0 > timeout:
                    self.stop()
                    raise ComfyError(f"ComfyUI not ready after {timeout:.0f} s\n{self.log_tail()}")
                time.sleep(0.25)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "--- ComfyUI log tail ---\n" + "\n".join(text[-lines:])

    def add_custom_node(self, src: str | Path) -> None:
        """Link another custom-node package (e.g. the tests' testkit) into custom_nodes."""
        src = Path(src)
        dst = self.base_dir / "custom_nodes" / src.name
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=True)

    def add_model_tree(self, src: str | Path, folder: str) -> None:
        """Copy a folder of model files (a sharded checkpoint, MAGI-1's models/magi1) into models/<folder>."""
        shutil.copytree(src, self.base_dir / "models" / folder, dirs_exist_ok=True, copy_function=_link_or_copy)

    def add_model(self, src: str | Path, folder: str) -> str:
        """Copy (hard-link where possible) a model file into models/<folder>; return its name."""
        src = Path(src)
        dst = self.base_dir / "models" / folder / src.name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return src.name

    # --- HTTP -------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict | None = None, timeout: float = 30):
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')[:4000]}") from None
        return json.loads(body) if body.strip() else None

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=60)

    def queue(self, prompt: dict) -> str:
        """POST an API-format prompt; return its prompt id (validation errors raise)."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a prompt to finish; return its /history entry. Raise on error."""
        t0 = time.time()
        while True:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error")):
                if entry["status"]["status_str"] != "success":
                    raise ComfyError(f"prompt {prompt_id} failed: {execution_error(entry)}")
                return entry
            if self.proc and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died while running {prompt_id}\n{self.log_tail()}")
            if time.time() - t0 > timeout:
                raise ComfyError(f"prompt {prompt_id} not done after {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.1)

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt")

    def run_interrupted(self, prompt: dict, after_s: float = 1.5, timeout: float = 120) -> str:
        """Queue a prompt, interrupt it after `after_s` seconds; return how it ended (the error)."""
        pid = self.queue(prompt)
        time.sleep(after_s)
        self.interrupt()
        try:
            self.wait(pid, timeout=timeout)
        except ComfyError as e:
            return str(e)
        return "finished before the interrupt"

    def saved_latent(self, entry: dict, node_id: str):
        """The tensor a SaveLatent node wrote in a finished prompt's history entry."""
        import safetensors.torch
        info = entry["outputs"][str(node_id)]["latents"][0]
        return safetensors.torch.load_file(str(self.output_path(info)))["latent_tensor"]

    def output_path(self, file_info: dict) -> Path:
        """Path of an output file from a history entry's {filename, subfolder, type}."""
        root = {"output": "output", "temp": "temp", "input": "input"}[file_info.get("type", "output")]
        return self.base_dir / root / file_info.get("subfolder", "") / file_info["filename"]


class Events:
    """The JSON messages the server sends to one client id over its websocket, collected by a thread
    (ComfyUI sends a run's messages to the client that queued it: queue with the same client id)."""

    def __init__(self, server: "ComfyServer"):
        self.url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        self.messages: list[dict] = []
        self.binary: list[int] = []            # the event types of binary messages (1: a preview image)
        self._stop = False

    def __enter__(self) -> "Events":
        import threading
        ready = threading.Event()
        self._thread = threading.Thread(target=self._listen, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise ComfyError("could not open the websocket")
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join(timeout=10)

    def _listen(self, ready) -> None:
        import asyncio

        import aiohttp

        async def main():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url) as ws:
                    ready.set()
                    while not self._stop:
                        try:
                            msg = await ws.receive(timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            self.messages.append(json.loads(msg.data))
                        elif msg.type == aiohttp.WSMsgType.BINARY:     # 4-byte event type, then its data
                            self.binary.append(int.from_bytes(msg.data[:4], "big"))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return
        asyncio.run(main())

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.messages) if m.get("type") == kind]

    def wait_for(self, kind: str, timeout: float = 120, count: int = 1) -> list[dict]:
        t0 = time.time()
        while len(self.of(kind)) < count:
            if time.time() - t0 > timeout:
                raise ComfyError(f"no {count} {kind!r} message(s) after {timeout:.0f} s")
            time.sleep(0.02)
        return self.of(kind)


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    """(status, body) of one request; 4xx/5xx answers are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def execution_error(entry: dict) -> str:
    """The human part of a failed prompt's history: node, type and exception message."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}")
        if kind == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return json.dumps(entry.get("status"))[:2000]


def node_outputs(entry: dict, node_id: str) -> dict:
    return entry.get("outputs", {}).get(str(node_id), {})
