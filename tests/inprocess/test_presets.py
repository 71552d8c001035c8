"""The cache nodes' presets are what make bench's guide measured (bench/results/latest.json):
a re-run of the bench that moves the best settings must move the presets with it."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import curves  # noqa: E402
from tools.inprocess import load_comfy, pack  # noqa: E402


def _values():
    load_comfy(cpu=True)
    return pack("model_patches.presets").VALUES


def test_presets_equal_the_bench_guide():
    results = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    values = _values()
    wan = curves.preset_values(results["guide"])
    magi = curves.preset_values(results["magi_guide"], exact_attention="chunk_causal")
    for method in ("flowcache", "motioncache"):
        assert values[method]["raw"] == wan[method]
        assert values[method]["magi"] == magi[method]


def test_every_preset_names_a_threshold_and_a_valid_attention_mode():
    _values()
    presets = pack("model_patches.presets")
    for method, scales in presets.VALUES.items():
        for scale, table in scales.items():
            assert set(table) == set(presets.PRESETS) - {"custom"}
            for thr, attention, order, reuse in table.values():
                assert thr >= 0 and attention in ("chunk_causal", "bidirectional")
                assert scale != "magi" or attention == "chunk_causal"     # MAGI-1 refuses bidirectional
                assert order in (0, 1, 2) and (order == 0 or 0 <= reuse <= thr)
