"""The cache nodes' `preset` input: a threshold, attention mode and prediction per target fidelity.

Which values apply depends on how the model's change indicator is scaled:
- `fitted`: a SkyReels-V2-DF 1.3B/14B model with the reference's fitted polynomial (coefficients
  auto/1.3B/14B). No real weights can be run here, so these are the reference run scripts'
  thresholds (0.1 "slow" and 0.15 "fast" for FlowCache; 0.1 for MotionCache, whose fast setting
  the reference does not publish) with `balanced` between them;
- `raw`: any Wan model without a fitted polynomial (the indicator is the plain relative change),
  and `magi`: MAGI-1. These come from `make bench`'s guide on the toy models at 30 steps (toy
  MAGI-1: 16) (bench/results/latest.md, bench/curves.py `guide`): the setting with the fewest
  FLOPs, saving at least 5% of them (reusing or predicting skipped steps), whose ST-LPIPS to the uncached video stays within 0.1
  (`quality`), 0.2 (`balanced`) or 0.35 (`fast`) (FLOPs, not wall time: a rerun chooses the same). Where nothing qualifies, the preset falls back
  to the stricter preset's value, and `quality` to threshold 0 (nothing skipped; bidirectional on Wan).
"""
from __future__ import annotations

from typing import NamedTuple

from ..cache_core.errors import InputError
from . import families


class Setting(NamedTuple):
    """What a preset sets on a cache node (a tuple, as bench/curves.py `preset_values` writes it)."""
    threshold: float
    attention: str
    predict_order: int = 0
    reuse_thresh: float = 0.0

PRESETS = ("custom", "quality", "balanced", "fast")
PRESET_TOOLTIP = ("custom: the inputs as set. quality / balanced / fast: chosen for the "
                  "model: SkyReels-V2-DF 1.3B/14B with fitted coefficients get the reference's thresholds (0.1 slow, "
                  "0.15 fast); other models the bench's toy-model guide (the setting with the fewest FLOPs within 0.1 / 0.2 / "
                  "0.35 ST-LPIPS of the uncached video). The README's cache guide lists the values.")

# method -> scale -> preset -> Setting. `raw` and `magi` are make bench's guide
# (tests/inprocess/test_presets.py holds them equal to bench/results/latest.json).
_FITTED = {"quality": Setting(0.1, "chunk_causal"), "balanced": Setting(0.125, "chunk_causal"),
           "fast": Setting(0.15, "chunk_causal")}
VALUES = {
    "flowcache": {
        "fitted": _FITTED,
        "raw": {"quality": Setting(0.05, "bidirectional", 1), "balanced": Setting(0.2, "bidirectional", 1),
                "fast": Setting(0.2, "bidirectional", 1)},
        "magi": {"quality": Setting(0.1, "chunk_causal", 1), "balanced": Setting(0.2, "chunk_causal"),
                 "fast": Setting(0.2, "chunk_causal")},
    },
    "motioncache": {
        "fitted": _FITTED,
        "raw": {"quality": Setting(0.05, "bidirectional", 1), "balanced": Setting(0.2, "bidirectional", 1),
                "fast": Setting(0.2, "bidirectional", 1)},
        "magi": {"quality": Setting(0.1, "chunk_causal"), "balanced": Setting(0.2, "chunk_causal"),
                 "fast": Setting(0.2, "chunk_causal")},
    },
}


def indicator_scale(model, coefficients) -> str:
    """fitted | raw | magi: which preset table a model's change indicator belongs to."""
    family, dm = families.detect(model)
    return family.indicator_scale(dm, coefficients)


def resolve(method: str, preset: str, model, coefficients, threshold: float, attention: str,
            predict_order: int = 0, reuse_thresh: float = 0.0) -> Setting:
    """The node's setting under a preset; `custom` keeps the inputs."""
    if preset == "custom":
        return Setting(threshold, attention, predict_order, reuse_thresh)
    if preset not in PRESETS:
        raise InputError("preset", f"unknown value {preset!r}; expected one of {', '.join(PRESETS)}")
    return VALUES[method][indicator_scale(model, coefficients)][preset]
