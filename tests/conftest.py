"""Shared fixtures: tiny checkpoints and one headless ComfyUI server per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))          # tools.*, scripts.*
sys.path.insert(0, str(REPO / "scripts"))

from tools.comfy_server import ComfyServer  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a small shared machine: extra threads only spin against other jobs."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints in the real SkyReels-V2-DF / Wan 2.1 layouts."""
    from make_tiny_checkpoints import write_all
    out = tmp_path_factory.mktemp("tiny_models")
    return {k: Path(v) for k, v in write_all(str(out), seed=0).items()}


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, tiny_models) -> ComfyServer:
    """A real ComfyUI server with this pack in custom_nodes and the tiny models installed."""
    server = ComfyServer(tmp_path_factory.mktemp("comfy_base")).prepare()
    server.add_model(tiny_models["1.3b"], "diffusion_models")
    server.add_model(tiny_models["14b"], "diffusion_models")
    server.add_model(tiny_models["vae"], "vae")
    for name in ("self_forcing", "causal_comfy", "longlive_base", "longlive2"):
        server.add_model(tiny_models[name], "diffusion_models")
    server.add_model(tiny_models["longlive_lora"], "loras")
    server.add_model_tree(Path(tiny_models["magi_special_tokens"]).parent, "magi1")
    server.add_custom_node(REPO / "tests" / "fixtures" / "arcache_testkit")
    server.start()
    yield server
    server.stop()
