"""bench/curves.py's headline: the fastest setting above a fidelity floor, per method and steps,
with each method's exact run (threshold 0) on its curve and nothing below the floor counted."""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import curves  # noqa: E402


def _row(method, thr, wall, psnr, steps=20, flops=None):
    fid = {"psnr_db": psnr, "ssim": 1.0, "st_lpips": 0.0, "flicker_ratio": 1.0}
    return {"steps": steps, "method": method, "mode": curves.MODES[method], "threshold": thr,
            "wall_ratio": wall, "flops_ratio": flops or wall, "same": fid, "bidir": fid, "token_fraction": 1.0}


ROWS = [_row("uncached", 0.0, 1.0, 99.0), _row("chunk_causal", 0.0, 0.8, 99.0),
        _row("flowcache", 0.05, 0.6, 34.0), _row("flowcache", 0.1, 0.4, 29.0), _row("flowcache", 0.2, 0.3, 24.0),
        _row("easycache", 0.05, 0.9, 31.0), _row("easycache", 0.1, 0.7, 26.0),
        _row("teacache_window", 0.1, 0.95, 20.0)]


def _best(floor):
    return {h["method"]: h for h in curves.headline(ROWS, floor) if h["steps"] == 20}


def test_fastest_setting_at_or_above_the_floor_wins():
    at30, at25 = _best(30.0), _best(25.0)
    assert at30["flowcache"]["threshold"] == 0.05 and abs(at30["flowcache"]["wall_speedup"] - 1 / 0.6) < 1e-9
    assert at25["flowcache"]["threshold"] == 0.1
    assert at30["easycache"]["threshold"] == 0.05 and at25["easycache"]["threshold"] == 0.1


def test_exact_run_counts_when_every_cached_point_is_below_the_floor():
    at30 = _best(30.0)
    assert at30["teacache_window"]["threshold"] == 0.0            # only uncached itself qualifies
    assert abs(at30["teacache_window"]["wall_speedup"] - 1.0) < 1e-9
    causal = [r["method"] for r in curves.series_of(ROWS, "flowcache", 20)]
    assert causal[0] == "chunk_causal" and "uncached" not in causal   # chunk-causal curves start there


def test_table_names_every_method_and_step_count():
    text = curves.headline_table(ROWS)
    assert "At or above 30 dB" in text and "At or above 25 dB" in text
    for method in curves.SERIES:
        assert curves.LABELS[method] in text
    assert "20 steps" in text and "1.67x" in text
    assert "exact run only" in text                                  # TeaCache above 30 dB: uncached only


def test_guide_picks_per_node_the_fastest_within_each_lpips_ceiling_of_the_uncached_video():
    def row(method, thr, wall, bidir_lpips):
        r = _row(method, thr, wall, 99.0)
        r["bidir"] = dict(r["bidir"], st_lpips=bidir_lpips)
        return r
    rows = [_row("uncached", 0.0, 1.0, 99.0), row("chunk_causal", 0.0, 0.8, 0.15), row("flowcache", 0.1, 0.5, 0.3),
            row("flowcache_bidir", 0.1, 0.7, 0.05), row("flowcache_bidir", 0.2, 0.6, 0.12),
            row("flowcache_bidir", 0.4, 1.2, 0.01), row("motioncache_bidir", 0.1, 0.9, 0.5)]
    g = {(x["node"], x["preset"]): x for x in curves.guide(rows, 20)}
    assert (g[("FlowCache", "quality")]["attention"], g[("FlowCache", "quality")]["threshold"]) == ("bidirectional", 0.1)
    assert (g[("FlowCache", "balanced")]["attention"], g[("FlowCache", "balanced")]["threshold"]) == ("bidirectional", 0.2)
    assert (g[("FlowCache", "fast")]["attention"], g[("FlowCache", "fast")]["threshold"]) == ("chunk_causal", 0.1)
    assert g[("MotionCache", "quality")]["threshold"] is None                  # nothing faster stays within it
    assert g[("MotionCache", "balanced")]["attention"] == "chunk_causal"       # its threshold-0 point
    assert "nothing faster stays within it" in curves.guide_table(curves.guide(rows, 20))
    magi = [{"method": "restructure", "threshold": 0.0, "wall_ratio": 0.95, "flops_ratio": 0.9,
             "same": {"psnr_db": 40.0, "ssim": 1.0, "st_lpips": 0.02, "flicker_ratio": 1.0}},
            {"method": "flowcache", "threshold": 0.05, "wall_ratio": 0.6, "flops_ratio": 0.5,
             "same": {"psnr_db": 30.0, "ssim": 0.9, "st_lpips": 0.15, "flicker_ratio": 1.0}}]
    m = {(x["node"], x["preset"]): x for x in curves.magi_guide(magi)}
    assert m[("FlowCache", "quality")]["threshold"] == 0.0 and m[("FlowCache", "balanced")]["threshold"] == 0.05
    assert m[("MotionCache", "balanced")]["threshold"] == 0.0


def test_interleaving_brackets_every_cached_run_with_uncached_runs():
    order, walls = [], iter([1.0, 3.0, 5.0])

    def cached(setting):
        order.append(setting)
        return setting * 10, float(setting)

    def uncached():
        order.append("u")
        return next(walls)

    done, unc = curves.interleaved([1, 2, 3], cached, uncached, first_uncached_wall=2.0)
    assert order == [1, 2, "u", 3, "u"] and unc == [2.0, 1.0, 3.0]
    assert [(s, r, w, b) for s, r, w, b in done] == [(1, 10, 1.0, (2.0, 1.0)), (2, 20, 2.0, (2.0, 1.0)),
                                                     (3, 30, 3.0, (1.0, 3.0))]


def test_a_stalled_uncached_run_is_found_and_replaced_by_the_median():
    walls = iter([1.1, 9.0])                          # the last uncached run stalled (9 s among ~1 s)
    done, unc = curves.interleaved([1, 2, 3, 4], lambda s: (s, 1.0), lambda: next(walls), first_uncached_wall=1.0)
    assert unc == [1.0, 1.1, 9.0] and curves.stalled(unc) == [2]
    assert done[0][3] == (1.0, 1.1) and done[2][3] == done[3][3] == (1.1, 1.1)    # 9 s re-timed by the median


def test_the_choice_is_by_flops_and_ignores_wall_time():
    def row(thr, flops, wall, psnr):
        return {"threshold": thr, "flops_ratio": flops, "wall_ratio": wall, "same": {"psnr_db": psnr}}
    fast_wall = row(0.1, 0.8, 0.5, 31.0)              # a lucky wall time
    cheap = row(0.2, 0.6, 0.9, 30.5)
    assert curves.by_flops([fast_wall, cheap], "same") is cheap
    tie = row(0.05, 0.6, 2.0, 33.0)                   # same FLOPs, better fidelity
    assert curves.by_flops([fast_wall, cheap, tie], "same") is tie
    assert curves.by_flops([], "same") is None


def test_a_predicting_series_can_win_a_preset_and_the_preset_carries_its_order():
    def row(method, thr, flops, bidir_lpips):       # at equal FLOPs, the better fidelity wins
        r = _row(method, thr, flops, 99.0, flops=flops)
        r["bidir"] = dict(r["bidir"], st_lpips=bidir_lpips, psnr_db=40.0 - 50 * bidir_lpips)
        return r
    rows = [_row("uncached", 0.0, 1.0, 99.0), row("chunk_causal", 0.0, 0.8, 0.3),
            row("flowcache_bidir", 0.05, 0.84, 0.12), row("flowcache_bidir_predict", 0.05, 0.84, 0.01),
            row("flowcache_bidir", 0.1, 0.7, 0.3), row("flowcache_bidir_predict", 0.1, 0.7, 0.15)]
    g = {(x["node"], x["preset"]): x for x in curves.guide(rows, 20)}
    assert (g[("FlowCache", "quality")]["threshold"], g[("FlowCache", "quality")]["predict_order"]) == (0.05, 1)
    assert (g[("FlowCache", "balanced")]["threshold"], g[("FlowCache", "balanced")]["predict_order"]) == (0.1, 1)
    values = curves.preset_values(curves.guide(rows, 20))["flowcache"]
    assert values["quality"] == (0.05, "bidirectional", 1, 0.0)
    assert values["fast"] == values["balanced"] == (0.1, "bidirectional", 1, 0.0)
    assert "| 1 |" in curves.guide_table(curves.guide(rows, 20))
    assert curves.predict_order("motioncache_predict") == 1 and curves.predict_order("motioncache") == 0


def test_a_stalled_cached_run_shows_no_wall_figure_but_still_counts():
    rows = [_row("uncached", 0.0, 1.0, 99.0), _row("chunk_causal", 0.0, 1.0, 99.0, flops=0.8),
            _row("flowcache", 0.05, 0.7, 34.0, flops=0.6), _row("flowcache", 0.1, 3.0, 31.0, flops=0.5),
            _row("flowcache", 0.2, 0.45, 24.0, flops=0.4)]
    stalled = curves.flag_stalled_cached(rows)
    assert [r["threshold"] for r in stalled] == [0.1]               # 6x its FLOP ratio; the others ~1.1-1.25x
    best = {h["method"]: h for h in curves.headline(rows, 30.0)}["flowcache"]
    assert best["threshold"] == 0.1 and best["wall_stalled"]       # chosen by FLOPs all the same
    assert "stalled" in curves.headline_table(rows) and "stalled" in curves.curve_table(rows)
