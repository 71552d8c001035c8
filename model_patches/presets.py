"""The cache nodes' `preset` input: a threshold and attention mode per target fidelity.

Which values apply depends on how the model's change indicator is scaled:
- `fitted`: a SkyReels-V2-DF 1.3B/14B model with the reference's fitted polynomial (coefficients
  auto/1.3B/14B). No real weights can be run here, so these are the reference run scripts'
  thresholds (0.1 "slow" and 0.15 "fast" for FlowCache; 0.1 for MotionCache, whose fast setting
  the reference does not publish) with `balanced` between them;
- `raw`: any Wan model without a fitted polynomial (the indicator is the plain relative change),
  and `magi`: MAGI-1. These come from the bench's curves on the toy models
  (bench/results/latest.md): `quality` is the fastest setting that stayed at or above 35 dB PSNR
  against the uncached bidirectional video, `balanced` at or above 30 dB, `fast` at or above 25 dB.
"""
from __future__ import annotations

from ..cache_core.errors import InputError
from . import families, wan

PRESETS = ("custom", "quality", "balanced", "fast")
PRESET_TOOLTIP = ("custom: the threshold and attention inputs as set. quality / balanced / fast: both chosen for the "
                  "model (bench curves on the toy models: the fastest setting keeping >= 35 / 30 / 25 dB PSNR to the "
                  "uncached video; the papers' thresholds for SkyReels-V2-DF 1.3B/14B with fitted coefficients); "
                  "the README's cache guide lists the values.")

# method -> scale -> preset -> (threshold, attention)
VALUES = {
    "flowcache": {
        "fitted": {"quality": (0.1, "chunk_causal"), "balanced": (0.125, "chunk_causal"), "fast": (0.15, "chunk_causal")},
        "raw": {"quality": (0.05, "bidirectional"), "balanced": (0.1, "chunk_causal"), "fast": (0.2, "chunk_causal")},
        "magi": {"quality": (0.01, "chunk_causal"), "balanced": (0.02, "chunk_causal"), "fast": (0.05, "chunk_causal")},
    },
    "motioncache": {
        "fitted": {"quality": (0.1, "chunk_causal"), "balanced": (0.125, "chunk_causal"), "fast": (0.15, "chunk_causal")},
        "raw": {"quality": (0.05, "bidirectional"), "balanced": (0.1, "chunk_causal"), "fast": (0.2, "chunk_causal")},
        "magi": {"quality": (0.01, "chunk_causal"), "balanced": (0.02, "chunk_causal"), "fast": (0.05, "chunk_causal")},
    },
}


def indicator_scale(model, coefficients) -> str:
    """fitted | raw | magi: which preset table a model's change indicator belongs to."""
    family, dm = families.detect(model)
    if family.sampler_kind == "magi":
        return "magi"
    fitted = tuple(family.coefficients(coefficients, dm)) != tuple(wan.COEFFICIENTS["none"])
    return "fitted" if fitted else "raw"


def resolve(method: str, preset: str, model, coefficients, threshold: float, attention: str) -> tuple[float, str]:
    """(threshold, attention) for a preset; `custom` keeps the inputs."""
    if preset == "custom":
        return threshold, attention
    if preset not in PRESETS:
        raise InputError("preset", f"unknown value {preset!r}; expected one of {', '.join(PRESETS)}")
    return VALUES[method][indicator_scale(model, coefficients)][preset]
