"""Speed against fidelity, as curves over thresholds, per method and step count, in one run.

For each step count the toy SkyReels-V2-DF model generates the same multi-window video with
every method at every threshold. Uncached runs are spread through the sequence (one before the
first cached run, then one after every two), and each cached run's wall ratio divides its time by
the mean of the two uncached runs that bracket its pair, so machine load cannot flip a result.

Fidelity is measured twice (tools/metrics.py: PSNR, SSIM, ST-LPIPS, flicker ratio):
- `same`: against the uncached run of the same attention mode (chunk-causal caches against the
  chunk-causal run without skipping, bidirectional ones against the uncached model), which
  isolates what the skipping costs;
- `bidir`: against the uncached bidirectional video, what the user compares with.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tools.metrics import PSNR_CAP_DB, fidelity, preview_frames, psnr  # noqa: E402

# method -> attention mode its output is compared with ("uncached of the same attention mode")
MODES = {"uncached": "bidirectional", "chunk_causal": "chunk_causal",
         "flowcache": "chunk_causal", "motioncache": "chunk_causal",
         "flowcache_bidir": "bidirectional", "motioncache_bidir": "bidirectional",
         "flowcache_predict": "chunk_causal", "motioncache_predict": "chunk_causal",
         "flowcache_bidir_predict": "bidirectional", "motioncache_bidir_predict": "bidirectional",
         "easycache": "bidirectional", "teacache_window": "bidirectional"}
LABELS = {"uncached": "uncached", "chunk_causal": "chunk-causal, no skipping",
          "flowcache": "FlowCache (chunk-causal)", "flowcache_bidir": "FlowCache (bidirectional)",
          "motioncache": "MotionCache (chunk-causal)", "motioncache_bidir": "MotionCache (bidirectional)",
          "flowcache_predict": "FlowCache predicting (chunk-causal)",
          "flowcache_bidir_predict": "FlowCache predicting (bidirectional)",
          "motioncache_predict": "MotionCache predicting (chunk-causal)",
          "motioncache_bidir_predict": "MotionCache predicting (bidirectional)",
          "easycache": "EasyCache (ComfyUI core)", "teacache_window": "TeaCache per window",
          "magi_flowcache": "FlowCache", "magi_motioncache": "MotionCache",
          "magi_flowcache_predict": "FlowCache predicting", "magi_motioncache_predict": "MotionCache predicting"}
PREDICTING_ORDER = 1    # the predicting series: first order, every skipped step predicted (reuse_thresh 0)


def predict_order(method: str) -> int:
    return PREDICTING_ORDER if method.endswith("_predict") else 0


SERIES = {"flowcache": (0.02, 0.05, 0.1, 0.2, 0.4),
          "flowcache_bidir": (0.02, 0.05, 0.1, 0.2, 0.4),
          "flowcache_predict": (0.02, 0.05, 0.1, 0.2),
          "flowcache_bidir_predict": (0.02, 0.05, 0.1, 0.2),
          "motioncache": (0.02, 0.05, 0.1, 0.2, 0.4),
          "motioncache_bidir": (0.02, 0.05, 0.1, 0.2, 0.4),
          "motioncache_predict": (0.02, 0.05, 0.1, 0.2),
          "motioncache_bidir_predict": (0.02, 0.05, 0.1, 0.2),
          "easycache": (0.02, 0.05, 0.1, 0.2, 0.4),
          "teacache_window": (0.05, 0.1, 0.2, 0.4, 0.8)}
STEPS = (10, 20, 30, 50)
FLOORS_DB = (30.0, 25.0)


def _runs(per_method: int | None = None) -> list[tuple[str, float | None]]:
    return [("chunk_causal", None)] + [(m, t) for m, ts in SERIES.items() for t in ts[:per_method]]


STALL_FACTOR = 2.0     # an uncached run over twice the median of its step count's uncached runs stalled


def stalled(walls: list[float]) -> list[int]:
    """Indices of uncached runs that stalled (the machine is shared: another job took the cores)."""
    median = statistics.median(walls)
    return [i for i, w in enumerate(walls) if w > STALL_FACTOR * median]


def flag_stalled_cached(rows: list[dict]) -> list[dict]:
    """Cached runs another job stalled: wall ratio per FLOP ratio over STALL_FACTOR times the median
    of its step count's cached runs. They get `wall_stalled` (their wall figures are not shown; their
    FLOPs and fidelity are deterministic and still count). Returns them."""
    found = []
    for steps in sorted({r["steps"] for r in rows}):
        cached = [r for r in rows if r["steps"] == steps and r["method"] != "uncached"]
        if not cached:
            continue
        median = statistics.median(r["wall_ratio"] / r["flops_ratio"] for r in cached)
        for r in cached:
            r["wall_stalled"] = r["wall_ratio"] / r["flops_ratio"] > STALL_FACTOR * median
            if r["wall_stalled"]:
                found.append(r)
    return found


def wall_text(row: dict, speedup: float) -> str:
    return "stalled" if row.get("wall_stalled") else f"{speedup:.2f}x"


def interleaved(settings, run_cached, run_uncached, first_uncached_wall: float):
    """Run every setting once, an uncached run after every two and after the last.
    run_cached(setting) -> (result, wall s); run_uncached() -> wall s. Returns
    [(setting, result, wall, (the two uncached walls that bracket it))] and all uncached walls
    (the first is the caller's reference run, just before the first setting). A stalled uncached
    run (see `stalled`) is replaced by the median in the brackets; the caller reports it."""
    walls, done = [first_uncached_wall], []
    for i, setting in enumerate(settings):
        result, wall = run_cached(setting)
        done.append((setting, result, wall, len(walls) - 1))
        if i % 2 == 1 or i == len(settings) - 1:
            walls.append(run_uncached())
    bad, median = set(stalled(walls)), statistics.median(walls)
    timed = [median if i in bad else w for i, w in enumerate(walls)]
    return [(st, res, w, tuple(timed[b:b + 2])) for st, res, w, b in done], walls


def by_flops(candidates: list[dict], reference: str):
    """The deterministic choice: fewest FLOPs, then the better fidelity, then the lower threshold.
    Wall time never decides: a rerun of the same commit on a loaded machine chooses the same."""
    return min(candidates, key=lambda r: (round(r["flops_ratio"], 9), -r[reference]["psnr_db"], r["threshold"]),
               default=None)


def sweep(model, job_for, steps_list=STEPS, log=print, per_method: int | None = None) -> list[dict]:
    """All methods and thresholds (the first `per_method` of each) at each step count; rows carry
    both fidelity references."""
    import methods                                                    # loads ComfyUI
    rows = []
    runs = _runs(per_method)
    for steps in steps_list:
        job = job_for(steps)
        methods.generate(model, job)                                 # warm-up at this size
        ref, ref_report, w, _ = methods.generate(model, job)
        ref_frames = preview_frames(ref)
        t0 = time.perf_counter()

        def run_cached(setting):
            video, report, wall, rss = methods.generate(methods.with_method(model, *setting), job)
            return (report, rss, preview_frames(video)), wall

        done, uncached_walls = interleaved(runs, run_cached, lambda: methods.generate(model, job)[2], w)
        stalls = [uncached_walls[i] for i in stalled(uncached_walls)]
        refs = {"bidirectional": ref_frames,
                "chunk_causal": next(res[2] for st, res, _, _ in done if st[0] == "chunk_causal")}
        for (method, thr), (report, rss, frames), wall, bracket in done:
            mode = MODES[method]
            cache = report.get("cache") or {}
            first = job["first_window_frames"] * (frames.shape[0] // report["latent_frames"])
            rows.append({
                "steps": steps, "method": method, "mode": mode, "threshold": 0.0 if thr is None else thr,
                "flops_ratio": report["transformer_flops"] / ref_report["transformer_flops"],
                "wall_ratio": wall / statistics.mean(bracket), "wall_ratio_spread": [wall / max(bracket), wall / min(bracket)],
                "wall_s": wall, "uncached_wall_s": statistics.mean(bracket),
                "same": fidelity(frames, refs[mode]), "bidir": fidelity(frames, ref_frames),
                "psnr_first_window_same_db": psnr(frames[:first], refs[mode][:first]),
                "chunk_steps_skipped": cache.get("chunk_steps_skipped"),
                "token_fraction": cache.get("token_fraction_computed"), "peak_rss_mb": rss})
            r = rows[-1]
            log(f"steps {steps:2d} {method:18s} thr {r['threshold']:<5g} flops {r['flops_ratio']:.3f} "
                f"wall {r['wall_ratio']:.3f} psnr(same) {r['same']['psnr_db']:6.2f} "
                f"psnr(bidir) {r['bidir']['psnr_db']:6.2f} lpips {r['same']['st_lpips']:.3f}")
        rows.append({"steps": steps, "method": "uncached", "mode": "bidirectional", "threshold": 0.0,
                     "flops_ratio": 1.0, "wall_ratio": 1.0, "wall_s": statistics.mean(uncached_walls),
                     "uncached_wall_s": statistics.mean(uncached_walls),
                     "same": fidelity(ref_frames, ref_frames), "bidir": fidelity(ref_frames, ref_frames),
                     "psnr_first_window_same_db": PSNR_CAP_DB, "chunk_steps_skipped": 0, "token_fraction": 1.0,
                     "peak_rss_mb": None, "uncached_wall_spread": [min(uncached_walls), max(uncached_walls)],
                     "stalled_uncached_s": stalls})
        log(f"steps {steps}: {len(done)} cached runs, {len(uncached_walls)} uncached "
            f"({min(uncached_walls):.1f}-{max(uncached_walls):.1f} s, {len(stalls)} stalled), "
            f"{time.perf_counter() - t0:.0f} s")
    return rows


def series_of(rows: list[dict], method: str, steps: int) -> list[dict]:
    """One curve: the method's points by threshold, starting at its exact run (threshold 0)."""
    exact = "chunk_causal" if MODES[method] == "chunk_causal" else "uncached"
    pts = [r for r in rows if r["steps"] == steps and (r["method"] == method or r["method"] == exact)]
    return sorted(pts, key=lambda r: (r["method"] == method, r["threshold"]))


def headline(rows: list[dict], floor_db: float, reference: str = "same") -> list[dict]:
    """Per method and step count: the setting with the fewest FLOPs at or above floor_db PSNR
    (`by_flops`; a method's exact run, threshold 0, counts: chunk-causal without skipping, or
    uncached). Its wall speed-up is reported beside, with the spread over its two uncached runs."""
    out = []
    for method in SERIES:
        for steps in sorted({r["steps"] for r in rows}):
            ok = [r for r in series_of(rows, method, steps) if r[reference]["psnr_db"] >= floor_db]
            best = by_flops(ok, reference)
            out.append({"method": method, "steps": steps, "floor_db": floor_db, "reference": reference,
                        "threshold": best and (best["threshold"] if best["method"] == method else 0.0),
                        "wall_speedup": best and 1 / best["wall_ratio"], "wall_stalled": bool(best and best.get("wall_stalled")),
                        "wall_speedup_spread": best and best.get("wall_ratio_spread") and
                        sorted(1 / w for w in best["wall_ratio_spread"]),
                        "flop_speedup": best and 1 / best["flops_ratio"],
                        "psnr_db": best and best[reference]["psnr_db"]})
    return out


def headline_table(rows: list[dict]) -> str:
    steps = sorted({r["steps"] for r in rows})
    lines = []
    for floor in FLOORS_DB:
        best = {(h["method"], h["steps"]): h for h in headline(rows, floor)}
        lines += [f"**At or above {floor:g} dB PSNR** against the uncached run of the same attention mode: the "
                  "setting with the fewest FLOPs (wall-clock speed-up with its spread over the two bracketing "
                  "uncached runs, FLOP speed-up in brackets, threshold):", "",
                  "| method | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for method in SERIES:
            cells = []
            for s in steps:
                h = best[(method, s)]
                exact = h["threshold"] == 0.0 and MODES[method] == "bidirectional"   # chunk-causal: its own run
                spread = None if h.get("wall_stalled") else h.get("wall_speedup_spread")
                wall = wall_text(h, h["wall_speedup"]) + (f" [{spread[0]:.2f}-{spread[1]:.2f}]" if spread else "")
                cells.append("exact run only (1.00x)" if exact else
                             f"{wall} ({h['flop_speedup']:.2f}x) @ {h['threshold']:g}")
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def curve_table(rows: list[dict]) -> str:
    cols = ("steps", "method", "threshold", "flops_ratio", "wall_ratio")
    meas = ("psnr_db", "ssim", "st_lpips", "flicker_ratio")
    head = list(cols) + [f"{m} ({ref})" for ref in ("same", "bidir") for m in meas] + ["token_fraction"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r[c] for c in cols] + [r[ref][m] for ref in ("same", "bidir") for m in meas] + [r["token_fraction"]]
        if r.get("wall_stalled"):
            vals[cols.index("wall_ratio")] = "stalled"
        lines.append("| " + " | ".join(fmt(v) for v in vals) + " |")
    return "\n".join(lines)


# The presets quality / balanced / fast: the most ST-LPIPS to the uncached video each may cost.
# Perceptual, not PSNR: over a multi-window rollout any early difference sends later windows
# down another (equally valid) path, which PSNR punishes as hard as a broken frame.
GUIDE_CEILINGS = (("quality", 0.1), ("balanced", 0.2), ("fast", 0.35))
NODES = {node: tuple(f"{m}{mode}{p}" for p in ("", "_predict") for mode in ("", "_bidir"))
         for node, m in (("FlowCache", "flowcache"), ("MotionCache", "motioncache"))}
MAGI_NODES = {"FlowCache": ("flowcache", "flowcache_predict", "restructure"),
              "MotionCache": ("motioncache", "motioncache_predict", "restructure")}


MIN_SAVING = 0.05      # a preset must save at least 5% of the FLOPs, or the node runs its exact setting


def _fastest_within(pts: list[dict], reference: str, ceiling: float):
    ok = [r for r in pts if r[reference]["st_lpips"] <= ceiling and r["flops_ratio"] <= 1.0 - MIN_SAVING]
    return by_flops(ok, reference)


def guide(rows: list[dict], steps: int, ceilings=GUIDE_CEILINGS) -> list[dict]:
    """Per node and preset: the threshold and attention mode with the fewest FLOPs (`by_flops`)
    whose ST-LPIPS to the uncached bidirectional video (what a user compares with) stays within
    the ceiling.
    These are the presets' values for Wan models without a fitted polynomial."""
    out = []
    for node, node_methods in NODES.items():
        pts = [r for m in node_methods for r in series_of(rows, m, steps) if r["method"] != "uncached"]
        for preset, ceiling in ceilings:
            best = _fastest_within(pts, "bidir", ceiling)
            out.append(_guide_row(node, preset, ceiling, steps, best, best and MODES[best["method"]], "bidir"))
    return out


def magi_guide(rows: list[dict], ceilings=GUIDE_CEILINGS) -> list[dict]:
    """The same for the toy MAGI-1 (one attention mode; fidelity against its uncached run)."""
    out = []
    for node, node_methods in MAGI_NODES.items():
        pts = [r for r in rows if r["method"] in node_methods]
        for preset, ceiling in ceilings:
            best = _fastest_within(pts, "same", ceiling)
            out.append(_guide_row(node, preset, ceiling, None, best, best and "chunk_causal", "same"))
    return out


def _guide_row(node, preset, ceiling, steps, best, attention, reference):
    return {"node": node, "preset": preset, "lpips_ceiling": ceiling, "steps": steps, "attention": attention,
            "threshold": best and best["threshold"], "predict_order": best and predict_order(best["method"]),
            "wall_speedup": best and 1 / best["wall_ratio"], "wall_stalled": bool(best and best.get("wall_stalled")),
            "flop_speedup": best and 1 / best["flops_ratio"], "fidelity": best and best[reference]}


def guide_table(entries: list[dict]) -> str:
    lines = ["| preset (ST-LPIPS to the uncached video at most) | node | attention | threshold | predict_order | "
             "wall speed-up | FLOP speed-up | PSNR dB | SSIM | ST-LPIPS | flicker ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in entries:
        head = f"| {g['preset']} ({g['lpips_ceiling']:g}) | {g['node']}"
        if g["threshold"] is None:
            lines.append(f"{head} | nothing faster stays within it: run uncached | | | | | | | | |")
            continue
        f = g["fidelity"]
        lines.append(f"{head} | {g['attention']} | {g['threshold']:g} | {g.get('predict_order') or 0} | "
                     f"{wall_text(g, g['wall_speedup'])} | "
                     f"{g['flop_speedup']:.2f}x | {f['psnr_db']:.1f} | {f['ssim']:.3f} | {f['st_lpips']:.3f} | "
                     f"{f['flicker_ratio'] or 0:.2f} |")
    return "\n".join(lines)


def preset_values(entries: list[dict], exact_attention: str = "bidirectional") -> dict:
    """node (lower case) -> preset -> (threshold, attention, predict_order, reuse_thresh), as
    model_patches/presets.py holds them (Setting): a preset nothing qualifies for takes the stricter
    preset's value, and `quality` falls back to threshold 0 in `exact_attention` (Wan:
    bidirectional, the uncached model's output; MAGI-1 has only chunk_causal). The predicting
    series predict every skipped step (reuse_thresh 0)."""
    out = {}
    for node in {g["node"] for g in entries}:
        vals, prev = {}, (0.0, exact_attention, 0, 0.0)
        for preset, _ in GUIDE_CEILINGS:
            g = next(x for x in entries if x["node"] == node and x["preset"] == preset)
            if g["threshold"] is not None:
                prev = (g["threshold"], g["attention"], g.get("predict_order") or 0, 0.0)
            vals[preset] = prev
        out[node.lower()] = vals
    return out
