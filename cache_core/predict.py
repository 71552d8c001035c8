"""The cached outputs of a chunk step, reused or predicted on a skipped step.

Plain torch, no ComfyUI. `ChunkStep` keeps, per (branch, chunk), the output it would reuse: the
block stack's residual (output minus input; MAGI-1's input is zero, so there it is the chunk's
velocity). A policy's SKIP reuses the newest one (order 0: the zeroth-order guess every AR cache
makes today). A PREDICT skip extrapolates instead: the Lagrange polynomial of degree k through the
chunk's last k+1 computed outputs, as a function of the chunk's noise level (the model timestep,
or MAGI-1's time), evaluated at the skipped step's noise level. For TaylorSeer-style forecasting
and SCOPE's predict mode, see README "Predicting skipped steps".

History is per token: MotionCache's subsets recompute some tokens of a chunk, so each token has
its own last k+1 (noise level, output) points. Safeguards, per token:
- fewer than k+1 points: the order drops to what the points allow (one point: plain reuse);
- two points at the same noise level (a chunk held at one level): the order drops below them;
- bounded reach: the evaluation point is clamped to REACH times the span of the fitted points
  past the newest one (an extrapolation never runs further than the data it rests on allows);
- nothing crosses a segment (DF window, MAGI-1 run): the step clears the history with the
  policy's state (`reset`, `reset_branch`, `forget`).

Memory: k+1 residuals per active chunk in the model's dtype plus k+1 noise levels per token (CPU,
float64); `peak_bytes` is reported (`cached_outputs_bytes_peak`). Order 0 keeps one residual.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import InputError, require_finite

ORDERS = (0, 1, 2)
REACH = 2.0        # an extrapolation reaches at most this many spans of its points past the newest


def check_prediction(order: int, reuse_thresh: float, thresh: float, thresh_name: str) -> None:
    """The prediction settings of a cache node, refused by name when out of range or out of order."""
    if order not in ORDERS:
        raise InputError("predict_order", f"{order!r}: choose 0 (reuse), 1 (linear) or 2 (quadratic)")
    require_finite("reuse_thresh", reuse_thresh)
    if reuse_thresh < 0:
        raise InputError("reuse_thresh", f"must be >= 0, got {reuse_thresh}")
    if order and reuse_thresh > thresh:
        raise InputError("reuse_thresh", f"{reuse_thresh} is above {thresh_name} {thresh}: a skipped step reuses "
                         f"below reuse_thresh, predicts between the two and recomputes from {thresh_name} on, so "
                         f"reuse_thresh must be <= {thresh_name}")


class History:
    """One chunk's last outputs, newest first: values[j] [rows, L, C], levels[j] [L] (CPU float64)."""

    __slots__ = ("values", "levels", "count", "shared")

    def __init__(self, residual: torch.Tensor, level: float):
        n = residual.shape[1]
        self.values = [residual]
        self.levels = [torch.full((n,), float(level), dtype=torch.float64)]
        self.count = torch.ones(n, dtype=torch.int64)
        self.shared = [float(level)]     # the slots' levels while every token has the same (no subset yet)

    def push(self, residual: torch.Tensor, level: float, tokens: Optional[torch.Tensor], slots: int) -> None:
        if tokens is None:
            self.values.insert(0, residual)
            self.levels.insert(0, torch.full((residual.shape[1],), float(level), dtype=torch.float64))
            del self.values[slots:], self.levels[slots:]
            self.count.add_(1).clamp_(max=slots)
            if self.shared is not None:
                self.shared = [float(level)] + self.shared[:slots - 1]
            return
        self.shared = None
        if len(self.values) < slots:     # room for one more point: a new slot, the others' tokens copied
            self.values.append(self.values[-1].clone())
            self.levels.append(self.levels[-1].clone())
        cpu = tokens.cpu()
        for j in range(len(self.values) - 1, 0, -1):    # shift the selected tokens one point older
            self.values[j][:, tokens] = self.values[j - 1][:, tokens]
            self.levels[j][cpu] = self.levels[j - 1][cpu]
        self.values[0][:, tokens] = residual
        self.levels[0][cpu] = float(level)
        self.count[cpu] = (self.count[cpu] + 1).clamp(max=slots)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values) + sum(s.numel() * 8 for s in self.levels)


def lagrange_weights(levels: list, order: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """[K, L] weights of each token's points 0..order (newest first) for its value at `at` [L]."""
    k = len(levels)
    w = torch.zeros(k, at.numel(), dtype=torch.float64)
    w[0] = 1.0
    for o in range(1, int(order.max()) + 1):
        sel = order == o
        if not bool(sel.any()):
            continue
        for j in range(o + 1):
            wj = torch.ones(int(sel.sum()), dtype=torch.float64)
            for m in range(o + 1):
                if m != j:
                    wj = wj * (at[sel] - levels[m][sel]) / (levels[j][sel] - levels[m][sel])
            w[j, sel] = wj
    return w


class CachedOutputs:
    """Every active chunk's cached outputs for one run, reused or predicted (module docstring)."""

    def __init__(self, order: int = 0):
        if order not in ORDERS:
            raise InputError("predict_order", f"{order!r}: choose 0, 1 or 2")
        self.order, self.slots = int(order), int(order) + 1
        self.items: dict = {}
        self.peak_bytes = 0

    def reset(self) -> None:
        self.items.clear()

    def reset_branch(self, branch: int) -> None:
        for key in [k for k in self.items if k[0] == int(branch)]:
            del self.items[key]

    def forget(self, branch: int, chunk: int) -> None:
        self.items.pop((int(branch), int(chunk)), None)

    def has(self, branch: int, chunk: int) -> bool:
        return (int(branch), int(chunk)) in self.items

    def push(self, branch: int, chunk: int, residual: torch.Tensor, level: float,
             tokens: Optional[torch.Tensor] = None) -> None:
        """A computed output: all of the chunk's tokens, or `tokens` of them (`residual` holds just those)."""
        key = (int(branch), int(chunk))
        item = self.items.get(key)
        if item is None or (tokens is None and item.values[0].shape != residual.shape):
            if tokens is not None:
                raise RuntimeError("a token subset was computed before the chunk's first full step")
            self.items[key] = History(residual, level)
        else:
            item.push(residual, level, tokens, self.slots)
        self.peak_bytes = max(self.peak_bytes, sum(h.nbytes() for h in self.items.values()))

    def estimate(self, branch: int, chunk: int, level: float, predict=None) -> tuple[torch.Tensor, int]:
        """The chunk's output at noise level `level` without running it, and how many of its tokens
        were extrapolated. predict: None/False reuse every token's newest output; True extrapolate
        every token; a bool tensor [L]: those tokens."""
        item = self.items[(int(branch), int(chunk))]
        newest = item.values[0]
        if self.order == 0 or predict is None or predict is False or len(item.values) < 2:
            return newest, 0
        if predict is True and item.shared is not None:
            return self._estimate_shared(item, level)
        order = (item.count - 1).clamp(max=self.order)
        if predict is not True:
            order = torch.where(predict.cpu().bool(), order, torch.zeros_like(order))
        levels = item.levels
        tol = 1e-9 * levels[0].abs().clamp_min(1.0)
        for j in range(1, len(levels)):             # points at one noise level cannot be fitted
            same = torch.zeros_like(order, dtype=torch.bool)
            for m in range(j):
                same |= (levels[j] - levels[m]).abs() <= tol
            order = torch.where((order >= j) & same, torch.full_like(order, j - 1), order)
        if not bool((order > 0).any()):
            return newest, 0
        at = torch.full_like(levels[0], float(level))
        span = torch.zeros_like(at)
        for o in range(1, len(levels)):
            span = torch.where(order == o, (levels[0] - levels[o]).abs(), span)
        direction = torch.sign(at - levels[0])
        at = torch.where(order > 0, levels[0] + direction * torch.minimum((at - levels[0]).abs(), REACH * span), at)
        w = lagrange_weights(levels, order, at)
        dtype = torch.promote_types(newest.dtype, torch.float32)
        out = None
        for j, value in enumerate(item.values):
            wj = w[j].to(device=newest.device, dtype=dtype).view(1, -1, *([1] * (newest.dim() - 2)))
            term = value.to(dtype) * wj
            out = term if out is None else out + term
        return out.to(newest.dtype), int((order > 0).sum())

    def _estimate_shared(self, item: History, level: float) -> tuple[torch.Tensor, int]:
        """`estimate` for a chunk whose tokens share their points (FlowCache; MotionCache before its
        first subset): the same arithmetic on scalars, without per-token tensors (bit-identical)."""
        lv, newest = item.shared, item.values[0]
        order = min(self.order, len(lv) - 1)
        tol = 1e-9 * max(abs(lv[0]), 1.0)
        for j in range(1, len(lv)):
            if order >= j and any(abs(lv[j] - lv[m]) <= tol for m in range(j)):
                order = j - 1
        if order == 0:
            return newest, 0
        span, gap = abs(lv[0] - lv[order]), level - lv[0]
        direction = (gap > 0) - (gap < 0)
        at = lv[0] + direction * min(abs(gap), REACH * span)
        dtype = torch.promote_types(newest.dtype, torch.float32)
        out = None
        for j, value in enumerate(item.values):
            w = 0.0
            if j <= order:
                w = 1.0
                for m in range(order + 1):
                    if m != j:
                        w = w * (at - lv[m]) / (lv[j] - lv[m])
            term = value.to(dtype) * torch.tensor(w, dtype=torch.float64).to(device=newest.device, dtype=dtype)
            out = term if out is None else out + term
        return out.to(newest.dtype), newest.shape[1]
