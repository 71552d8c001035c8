"""The bench's figures: speed against fidelity as one line per method over its thresholds."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from curves import LABELS  # noqa: E402

MEASURES = {"psnr_db": ("PSNR dB vs uncached, same attention mode (higher is better)", 50.0),
            "ssim": ("SSIM vs uncached, same attention mode (higher is better)", None),
            "st_lpips": ("ST-LPIPS vs uncached, same attention mode (lower is better)", None),
            "flicker_ratio": ("flicker ratio vs uncached, same attention mode (1 = same temporal change)", None)}
IDEAL = {"psnr_db": 50.0, "ssim": 1.0, "st_lpips": 0.0, "flicker_ratio": 1.0}
STYLE = {"flowcache": ("tab:red", "o", "-"), "flowcache_bidir": ("tab:orange", "o", "--"),
         "motioncache": ("tab:purple", "s", "-"), "motioncache_bidir": ("tab:pink", "s", "--"),
         "easycache": ("tab:blue", "^", "-"), "teacache_window": ("tab:green", "v", "-"),
         "magi_flowcache": ("tab:red", "o", "-"), "magi_motioncache": ("tab:purple", "s", "-")}
STYLE.update({f"{m}_predict": (colour, "D", ":" if ls == "-" else "-.") for m, (colour, _, ls) in list(STYLE.items())
              if "cache" in m and not m.startswith(("easy", "teacache"))})
PSNR_SHOWN_MAX = 50.0     # identical runs (99 dB) are drawn at the top of the axis


def _x(row: dict, measure: str) -> float:
    v = row["same"][measure]
    return min(v, PSNR_SHOWN_MAX) if measure == "psnr_db" else v


def _panel(ax, curves: dict, measure: str, ratio: str, title: str) -> None:
    ax.axhline(1.0, color="0.8", lw=0.8)
    for method, pts in curves.items():
        colour, marker, ls = STYLE[method]
        if ratio == "wall_ratio":             # a run another job stalled has no meaningful wall time
            pts = [p for p in pts if not p.get("wall_stalled")]
        xs, ys = [_x(p, measure) for p in pts], [p[ratio] for p in pts]
        ax.plot(xs, ys, color=colour, marker=marker, ls=ls, ms=4, lw=1.3, label=LABELS.get(method, method))
        for p, x, y in zip(pts, xs, ys):
            if p["threshold"]:
                ax.annotate(f"{p['threshold']:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6,
                            color=colour)
    ax.plot([IDEAL[measure]], [1.0], marker="*", ms=13, color="black", ls="none", label="uncached")
    if measure == "psnr_db":
        for floor in (30, 25):
            ax.axvline(floor, color="0.6", lw=0.8, ls=":")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(MEASURES[measure][0], fontsize=8)
    ax.set_ylabel("FLOP ratio (cached / uncached)" if ratio == "flops_ratio" else
                  "wall-time ratio (cached / uncached)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def measure_figures(panels: dict, out: Path) -> list[Path]:
    """panels: title -> {method: [rows with same[measure], flops_ratio, wall_ratio, threshold]}.
    One file per measure: FLOP ratio (top) and wall ratio (bottom), one column per panel."""
    paths = []
    for measure in MEASURES:
        fig, axes = plt.subplots(2, len(panels), figsize=(6.2 * len(panels), 8.4), squeeze=False)
        for j, (title, curves) in enumerate(panels.items()):
            for i, ratio in enumerate(("flops_ratio", "wall_ratio")):
                _panel(axes[i][j], curves, measure, ratio, title)
        axes[0][0].legend(fontsize=7, loc="best")
        if len(panels) > 1:
            axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"curves_{measure}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def steps_figure(by_steps: dict, out: Path) -> Path:
    """by_steps: steps -> {method: rows}. Wall ratio (top) and FLOP ratio (bottom) against PSNR."""
    fig, axes = plt.subplots(2, len(by_steps), figsize=(4.3 * len(by_steps), 7.6), squeeze=False, sharey="row")
    for j, (steps, curves) in enumerate(by_steps.items()):
        _panel(axes[0][j], curves, "psnr_db", "wall_ratio", f"toy SkyReels-V2-DF, {steps} steps")
        _panel(axes[1][j], curves, "psnr_db", "flops_ratio", f"toy SkyReels-V2-DF, {steps} steps")
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    path = out / "curves_steps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def headline_figure(curves: dict, steps: int, out: Path) -> Path:
    """The README's plot: wall ratio and FLOP ratio against PSNR, toy SkyReels-V2-DF only."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _panel(axes[0], curves, "psnr_db", "wall_ratio", f"toy SkyReels-V2-DF, {steps} steps: wall time")
    _panel(axes[1], curves, "psnr_db", "flops_ratio", f"toy SkyReels-V2-DF, {steps} steps: transformer FLOPs")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out / "latest.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
