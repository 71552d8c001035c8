"""The sampler's report for one run: its one owner, which the model's forward and the caches add to.

It travels in `transformer_options[REPORT_KEY]` as an object on purpose: ComfyUI copies nested
dicts of transformer_options for every model call, so a dict would collect nothing.
"""
from __future__ import annotations

import contextlib

REPORT_KEY = "arcache_report"


class RunReport:
    """Numbers of one sampler run. `data` is what the sampler returns as JSON.

    Transformer FLOPs are added by whoever really ran the transformer (`add_forward`): the plain
    forward counts itself only when no cache below it already did, so the total does not depend
    on the order of the wrappers. Caches merge their statistics with `merge_cache`.
    """

    def __init__(self, **fields):
        self.data: dict = dict(fields)
        self.data.setdefault("transformer_flops", 0.0)
        self.data.setdefault("cache", None)
        self.forwards = 0            # transformer forwards counted so far
        self.heat: dict = {}         # window -> [frames, tokens per frame] token-steps computed

    def add_heat(self, window: int, counts, tokens_per_frame: int) -> None:
        """Where a cache ran the blocks in one call: counts per window token (frame-major)."""
        counts = counts.reshape(-1, tokens_per_frame)
        old = self.heat.get(window)
        self.heat[window] = counts.clone() if old is None or old.shape != counts.shape else old + counts

    @contextlib.contextmanager
    def installed(self, transformer_options: dict):
        """The report in `transformer_options` for the duration of a run, taken out in `finally`."""
        transformer_options[REPORT_KEY] = self
        try:
            yield self
        finally:
            transformer_options.pop(REPORT_KEY, None)

    def add_forward(self, flops: float) -> None:
        self.data["transformer_flops"] += flops
        self.forwards += 1

    def merge_cache(self, method: str, summary: dict, reported: dict) -> dict:
        """Add what a cache's statistics gained since `reported` (its summary at the last merge;
        a cache's state may be replaced per window while the report spans the run). Peaks are
        maxed. Returns the summary to pass as `reported` next time."""
        cache = self.data.get("cache")
        if not isinstance(cache, dict):
            cache = self.data["cache"] = {"method": method}
        for key, value in summary.items():
            if key.endswith("_peak"):
                cache[key] = max(cache.get(key, 0), value)
            else:
                cache[key] = cache.get(key, 0) + value - reported.get(key, 0)
        derive_savings(cache)
        return dict(summary)


def derive_savings(cache: dict) -> None:
    """Where the time went: the chunk-wise restructuring vs skipping redundant chunk steps, and the
    share of active token-steps that ran the blocks (from the counts of cache_core.chunk_step)."""
    cache["flops_saved_restructure"] = cache["transformer_flops_vanilla"] - cache["transformer_flops_noskip"]
    cache["flops_saved_skipping"] = cache["transformer_flops_noskip"] - cache["transformer_flops"]
    if cache.get("tokens_active"):
        cache["token_fraction_computed"] = cache["tokens_computed"] / cache["tokens_active"]
