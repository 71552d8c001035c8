"""Multi-GPU from inside ComfyUI: the Streaming AR Sampler's part of the workflow run over several GPUs.

`ARCacheMultiGPU` marks a MODEL with how many GPUs (ranks) to spread one video over. The Streaming AR
Sampler, seeing the mark in ComfyUI's own process, does not sample there: it frees the GPUs (ComfyUI's
loaded models are unloaded), writes its own part of the workflow (itself and every node feeding it,
plus a SaveLatent) and starts one process per rank on tools/sp_run.py, the torchrun entry, which runs
that graph through ComfyUI's executor on every rank with the tokens of each model call split across
them (cache_core/seq_parallel.py). The node's progress bar follows rank 0; Cancel stops every rank at
the same model call; a failing rank's error comes back named. The LATENT and the run report (with its
combined "sequence_parallel" part) come back; save_video writes into the output folder from rank 0.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from comfy_api.latest import io

import comfy.model_management
import comfy.utils
import folder_paths

from ..cache_core.errors import InputError

RANKS_KEY = "arcache_ranks"        # transformer_options: the Ranks a MODEL is marked with
ENTRY = Path(__file__).resolve().parents[1] / "tools" / "sp_run.py"


@dataclass(frozen=True)
class Ranks:
    gpus: int
    timeout_s: int


class MultiGPUNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ARCacheMultiGPU",
            display_name="ARCache Multi-GPU (sequence parallel)",
            category="ARCache/sampling",
            description=(
                "Spreads one video over several GPUs of this machine: the Streaming AR Sampler fed by this model "
                "runs in one process per GPU, each computing its share of every chunk's tokens (Ulysses sequence "
                "parallelism on torch.distributed, NCCL), with the K/V split by heads. Every family and both "
                "caches; the video equals the one-GPU video. Each GPU holds the whole model and 1/N of the K/V "
                "and activations. The GPU count must divide the model's attention heads (14B: 40; 1.3B: 12; "
                "MAGI-1: its 8 key/value heads). The Live View is not available in a multi-GPU run."),
            inputs=[
                io.Model.Input("model", tooltip="Any model the Streaming AR Sampler takes, with or without a cache node."),
                io.Int.Input("gpus", default=2, min=1, max=64,
                             tooltip="Processes (one per GPU) to spread each model call over; 1 runs in ComfyUI itself."),
                io.Int.Input("timeout_s", default=600, min=10, max=86400,
                             tooltip="A rank waiting longer than this for the others stops every rank with an error."),
            ],
            outputs=[io.Model.Output(tooltip="The model, marked to run on `gpus` ranks: connect it to the Streaming AR "
                                             "Sampler (directly, or through nodes that pass MODEL on).")],
        )

    @classmethod
    def execute(cls, model, gpus, timeout_s) -> io.NodeOutput:
        if gpus == 1:
            return io.NodeOutput(model)
        m = model.clone()
        m.model_options["transformer_options"][RANKS_KEY] = Ranks(int(gpus), int(timeout_s))
        return io.NodeOutput(m)


def ranks_of(model) -> Ranks | None:
    return model.model_options.get("transformer_options", {}).get(RANKS_KEY)


def sampler_part(prompt: dict, node_id: str) -> dict:
    """The sampler node and every node feeding it, from the API prompt ComfyUI is running."""
    part, todo = {}, [node_id]
    while todo:
        nid = todo.pop()
        if nid in part:
            continue
        part[nid] = prompt[nid]
        todo += [v[0] for v in prompt[nid].get("inputs", {}).values() if isinstance(v, list) and len(v) == 2]
    return part


def run_on_ranks(prompt: dict, node_id: str, ranks: Ranks, live) -> tuple[dict, str]:
    """(LATENT, report text) of the sampler `node_id` run over `ranks` (see the module docstring)."""
    import torch
    if torch.cuda.is_available() and ranks.gpus > torch.cuda.device_count():
        raise InputError("gpus", f"{ranks.gpus} GPUs asked, and this machine has {torch.cuda.device_count()}: one "
                         "process per GPU, so at most that many")
    if live is not None:
        raise InputError("live", "a multi-GPU run happens in other processes, which cannot show a Live View: "
                         "disconnect the Live View or set the Multi-GPU node's gpus to 1")
    work = Path(tempfile.mkdtemp(prefix="arcache_multigpu_"))
    scratch = f"ARCache/multigpu_{uuid.uuid4().hex[:8]}"
    part = sampler_part(prompt, node_id)
    part["arcache_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id, 0],
                                                                     "filename_prefix": f"{scratch}/latent"}}
    (work / "workflow_api.json").write_text(json.dumps(part))
    out = Path(folder_paths.get_output_directory())
    cmd = [sys.executable, str(ENTRY), "--workflow", str(work / "workflow_api.json"),
           "--comfy", str(Path(folder_paths.__file__).resolve().parent), "--base-directory", folder_paths.base_path,
           "--output-directory", str(out), "--timeout-s", str(ranks.timeout_s), "--progress", str(work / "progress"),
           "--errors", str(work), "--init", f"file://{work / 'store'}"]      # a file store: no port to race for
    for kind, (paths, _) in folder_paths.folder_names_and_paths.items():
        cmd += [a for p in paths if os.path.isdir(p) for a in ("--model-dir", f"{kind}={p}")]
    comfy.model_management.unload_all_models()          # the ranks need the GPUs this process holds
    comfy.model_management.soft_empty_cache()
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks.gpus)})
             for r in range(ranks.gpus)]
    bar, seen, stopped = comfy.utils.ProgressBar(1, node_id=node_id), "", False
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)
            text = (work / "progress").read_text() if (work / "progress").exists() else ""
            if text != seen and text.strip():
                seen = text
                value, total = (int(v) for v in text.strip().splitlines()[-1].split("/"))
                bar.update_absolute(value, total)
            if not stopped and comfy.model_management.processing_interrupted():   # Cancel: every rank stops together
                for p in procs:
                    p.send_signal(signal.SIGINT)
                stopped = True
        codes = [p.returncode for p in procs]
        if stopped or 130 in codes:
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException()
        if any(codes):
            errors = [f"rank {r}: {(work / f'rank{r}.err').read_text()}" for r in range(ranks.gpus)
                      if (work / f"rank{r}.err").exists()]
            raise RuntimeError(f"the multi-GPU run failed (exit codes {codes}): " + " | ".join(errors or ["no message"]))
        import safetensors.torch
        saved = next((out / scratch).glob("*.latent"))
        latent = {"samples": safetensors.torch.load_file(str(saved))["latent_tensor"].float()}
        report = (out / f"arcache_report_{node_id}.json").read_text()
        (out / f"arcache_report_{node_id}.json").unlink()
        return latent, report
    finally:
        for p in procs:                       # never leave a rank behind (an error here, or ComfyUI stopping)
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out / scratch, ignore_errors=True)
