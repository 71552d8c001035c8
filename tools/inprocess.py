"""ComfyUI and this pack in the current process (benchmarks, GPU scripts, in-process tests)."""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "arcache_pack"


def load_comfy(comfy_dir: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Put a ComfyUI tree on sys.path (after our own paths) and set it up before model_management."""
    root = Path(comfy_dir or os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI").resolve()
    if not (root / "comfy").is_dir():
        raise FileNotFoundError(f"no ComfyUI tree at {root}: run `make host` or pass its path")
    if str(root) not in sys.path:
        sys.path.append(str(root))      # appended: ComfyUI's nodes.py must not shadow our nodes/
    import comfy.cli_args
    if cpu is None:
        import torch
        cpu = not torch.cuda.is_available()
    comfy.cli_args.args.cpu = cpu
    return root


def pack(module: str):
    """Import one of the pack's modules (they use relative imports) without its ComfyUI entry point."""
    if PACKAGE not in sys.modules:
        pkg = types.ModuleType(PACKAGE)
        pkg.__path__ = [str(REPO)]
        sys.modules[PACKAGE] = pkg
    return importlib.import_module(f"{PACKAGE}.{module}")
