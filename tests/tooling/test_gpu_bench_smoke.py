"""bench/gpu.py runs its whole flow on CPU in --tiny mode and writes the JSON it promises.

The real run happens once on a rented GPU; this keeps the script from rotting in between.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFY = Path(os.environ.get("COMFYUI_PATH", REPO / ".host" / "ComfyUI"))
if not (COMFY / "comfy").is_dir():
    pytest.skip(f"no ComfyUI tree at {COMFY}", allow_module_level=True)


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "tiny.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--tiny", "--comfyui", str(COMFY),
         "--out", str(out), "--budget-s", "120"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "model" in proc.stdout and "uncached" in proc.stdout     # the printed table
    return json.loads(out.read_text())


def test_top_level(result):
    assert result["complete"] is True
    assert result["errors"] == {}, result["errors"]
    assert result["skipped_stages"] == []
    assert result["device"].startswith("cpu") and result["torch"]
    assert result["window"]["latent_frames"] == 25 and result["window"]["chunk_frames"] == 5
    assert positive(result["elapsed_s"]) and positive(result["import_s"])
    assert result["table"] and all(positive(r["s"]) for r in result["table"])


@pytest.mark.parametrize("tag", ["1.3B", "14B"])
def test_model_numbers(result, tag):
    m = result["models"][tag]
    assert "skipped" not in m, m
    assert m["chunks"] == 5 and m["batch"] == 2 and m["cond_or_uncond"] == [0, 1]
    assert positive(m["params"]) and positive(m["flops_uncached"])

    unc = m["uncached"]
    for key in ("cold_s", "median_s", "flops", "tflops_per_s"):
        assert positive(unc[key]), (key, unc)
    assert unc["output_finite"]

    cc = m["chunk_causal"]
    for key in ("median_s", "flops", "tflops_per_s", "speedup_vs_uncached", "ideal_speedup_vs_uncached",
                "kv_bytes", "kv_peak_bytes"):
        assert positive(cc[key]), (key, cc)

    fc = m["flowcache"]
    pats = {tuple(p["skip"]): p for p in fc["patterns"]}
    assert () in pats and (0, 1, 2, 3, 4) in pats and len(pats) >= 3
    for pat, p in pats.items():
        for key in ("median_s", "flops", "tflops_per_s", "ideal_s", "speedup_realised", "speedup_ideal",
                    "efficiency", "speedup_vs_uncached", "ideal_speedup_vs_uncached"):
            assert positive(p[key]), (pat, key, p)
        assert p["chunk_skips_per_call"] == p["expected_chunk_skips_per_call"] == 2 * len(pat)
    flops = [pats[p]["flops"] for p in sorted(pats, key=len)]
    assert flops == sorted(flops, reverse=True)   # more skipped chunks, fewer FLOPs
    assert positive(fc["kv_bytes"]) and positive(fc["residual_bytes"])
    ov = fc["decision_overhead"]
    for key in ("embed_head_s", "decide_isolated_s", "decide_per_call_isolated_s", "all_skip_s"):
        assert positive(ov[key]), (key, ov)
    assert ov["decisions_per_call"] == 10

    ka = m["kv_async"]
    assert ka["schedule_active_chunks"][-1] == [4]
    a, b = ka["no_compress"], ka["compress"]
    assert a["rows"][-1]["frozen"] == b["rows"][-1]["frozen"] == [0, 1, 2, 3]
    assert positive(a["final_kv_bytes"]) and positive(b["final_kv_bytes"])
    assert b["final_kv_bytes"] < a["final_kv_bytes"]   # the frozen history is squeezed to 1 chunk
    assert all(positive(r["s"]) for r in a["rows"] + b["rows"])


def test_equivalence_check(result):
    chk = result["models"]["1.3B"]["check"]
    assert chk["ok"] and chk["finite"], chk


def test_token_subset_stage(result):
    sub = result["models"]["1.3B"]["subset"]
    assert "error" not in sub, sub
    assert [s["share"] for s in sub["shares"]] == [0.25, 0.5, 0.75]
    ideal = [s["speedup_ideal"] for s in sub["shares"]]
    assert ideal[0] > ideal[1] > ideal[2] > 1.0        # fewer query tokens, fewer FLOPs
    assert all(s["chunk_s"] is not None for s in sub["shares"])


def test_magi_stage(result):
    m = result["models"]["MAGI-1-4.5B"]["magi"]
    assert "error" not in m, m
    assert [r["cached_chunks"] for r in m["per_chunk"]] == [0, 1, 2, 3, 4]
    assert all(positive(r["median_s"]) for r in m["per_chunk"]) and positive(m["window"]["median_s"])
    assert m["sdpa"]["rel_err_vs_fp32"] < 1e-5          # fp32 on CPU; bf16 on a GPU is ~1e-3
    assert any(r["case"].startswith("chunk vs") for r in result["table"])


def test_stream_stage(result):
    """The live stream's decode at the device: the stream decoder's frames against VAEDecode's (bit
    for bit on CPU), seconds per latent frame, and the shipped schedule's TTFF computed from them."""
    s = result["models"]["stream"]["stream"]
    assert s["frames"] == 4 * (s["latent_frames"] - 1) + 1
    assert s["max_abs_diff_vs_vaedecode"] == 0.0 and s["uint8_identical_fraction"] == 1.0
    assert positive(s["stream_s_per_latent_frame"]) and positive(s["whole_decode_s"])
    shipped = s["shipped_async_computed"]
    assert shipped["ttff_s"] > shipped["block_period_s"] > 0 and 0 < shipped["decode_share"] < 1


def test_causal_stage(result):
    """The causal run end to end at the device: both attention settings at two lengths, the window's
    K/V peak the same at both lengths and below the full history's at the longer one."""
    runs = {(r["attention"], r["chunks"]): r for r in result["models"]["causal"]["causal"]["runs"]}
    assert len(runs) == 4 and not any("skipped" in r for r in runs.values())
    for r in runs.values():
        assert positive(r["ttff_s"]) and positive(r["sustained_fps"]) and positive(r["kv_bytes_peak"])
        assert r["model_calls"] == 5 * r["chunks"] - 1
    window = [runs[("window 12 + sink 3", n)]["kv_bytes_peak"] for n in (2, 4)]
    full = [runs[("full history", n)]["kv_bytes_peak"] for n in (2, 4)]
    assert full[1] == 2 * full[0] and window[0] <= window[1] <= full[1]
