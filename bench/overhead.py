"""Where a cached run's time goes besides the transformer: the executor's own bookkeeping.

One FlowCache run under cProfile (reusing, and predicting at first order); for each piece of the
executor (the policy's decision per chunk, the skipped step's reuse or prediction and the cached
outputs it keeps, the K/V store's writes and its gathers of the visible history) it reports calls, mean
microseconds per call and the share of the run's wall time. The profiler slows Python calls, so
the shares are upper bounds.
"""
from __future__ import annotations

import cProfile
import pstats
import time

PIECES = {"chunk decision": ("flowcache_policy.py", "decide"),
          "skipped step: reuse or predict": ("predict.py", "estimate"),
          "cached output kept": ("predict.py", "push"),
          "change indicator": ("wan.py", "indicators"),
          "K/V write": ("kv_store.py", "write"),
          "K/V gather (visible history)": ("kv_store.py", "visible"),
          "chunk attention call": ("wan.py", "_attend"),
          "transformer blocks": ("wan.py", "run_blocks")}


def measure(generate, model, job) -> dict:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    generate(model, job)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats            # (file, line, name) -> (cc, nc, tt, ct, callers)
    out = {"wall_s": wall}
    for label, (file, func) in PIECES.items():
        hits = [(nc, ct) for (f, _, name), (cc, nc, tt, ct, callers) in stats.items()
                if f.endswith(file) and name == func]
        # the outermost entry of a function that calls itself through a wrapper is counted once
        calls = max((nc for nc, _ in hits), default=0)
        cum = max((ct for _, ct in hits), default=0.0)
        out[label] = {"calls": calls, "us_per_call": 1e6 * cum / calls if calls else None,
                      "share_of_wall": cum / wall}
    return out


def table(result: dict) -> str:
    lines = ["| piece | calls | us per call | share of wall time |", "|---|---:|---:|---:|"]
    for label in PIECES:
        r = result[label]
        us = "-" if r["us_per_call"] is None else f"{r['us_per_call']:.0f}"
        lines.append(f"| {label} | {r['calls']} | {us} | {100 * r['share_of_wall']:.1f} % |")
    return "\n".join(lines)
