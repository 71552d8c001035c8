"""The pack loads in a stock ComfyUI and a tiny Wan graph runs over HTTP."""
from pathlib import Path

import torch


def test_every_node_is_an_arcache_node_with_docs(comfy):
    info = comfy.object_info()
    ours = {k: v for k, v in info.items() if v.get("python_module", "").endswith("ComfyUI-ARCache")}
    assert "ARCacheEmptyConditioning" in ours
    assert "IMPORT FAILED" not in comfy.log_path.read_text()
    for node_id, spec in ours.items():
        assert node_id.startswith("ARCache"), node_id
        assert spec["category"].startswith("ARCache/"), node_id
        assert spec["description"].strip(), f"{node_id} has no description"
        for group in ("required", "optional"):
            for name, (_, opts) in ((n, (d[0], d[1] if len(d) > 1 else {}))
                                    for n, d in spec["input"].get(group, {}).items()):
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(spec.get("output_tooltips") or [None]), f"{node_id} outputs lack tooltips"
        assert len(spec.get("output_tooltips", [])) == len(spec["output"]), node_id


def tiny_t2v_prompt(unet: str, seed: int, cfg: float = 1.0, steps: int = 3) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "ARCacheEmptyConditioning", "inputs": {}},
        "3": {"class_type": "EmptyHunyuanLatentVideo",
              "inputs": {"width": 64, "height": 64, "length": 9, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": f"latents/t2v_{seed}"}},
    }


def load_saved_latent(comfy, entry, node="5") -> torch.Tensor:
    return comfy.saved_latent(entry, node)


def test_tiny_wan_graph_runs_over_http(comfy, tiny_models):
    for layout in ("1.3b", "14b"):
        entry = comfy.run(tiny_t2v_prompt(Path(tiny_models[layout]).name, seed=1, cfg=2.0))
        lat = load_saved_latent(comfy, entry)
        assert lat.shape == (1, 16, 3, 8, 8)
        assert torch.isfinite(lat).all() and lat.abs().sum() > 0
    log = comfy.log_path.read_text()
    assert "WAN21" in log or "wan" in log.lower()
