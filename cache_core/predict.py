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


class CachedOutputs:
    """Every active chunk's cached outputs for one run, reused or predicted (module docstring)."""

    def __init__(self, order: int = 0):
        if order not in ORDERS:
            raise InputError("predict_order", f"{order!r}: choose 0, 1 or 2")
        self.order, self.slots = int(order), int(order) + 1
        self.items: dict = {}
        self.bytes = 0          # held now (kept as items come and go, not summed per push)
        self.peak_bytes = 0

    def reset(self) -> None:
        self.items.clear()
        self.bytes = 0

    def reset_branch(self, branch: int) -> None:
        for key in [k for k in self.items if k[0] == int(branch)]:
            self.forget(*key)

    def forget(self, branch: int, chunk: int) -> None:
        item = self.items.pop((int(branch), int(chunk)), None)
        if item is not None:
            self.bytes -= item.nbytes()

    def has(self, branch: int, chunk: int) -> bool:
        return (int(branch), int(chunk)) in self.items

    def push(self, branch: int, chunk: int, residual: torch.Tensor, level: float,
             tokens: Optional[torch.Tensor] = None) -> None:
        """A computed output: all of the chunk's tokens, or `tokens` of them (`residual` holds just those)."""
        key = (int(branch), int(chunk))
        item = self.items.get(key)
        before = 0 if item is None else item.nbytes()
        if item is None or (tokens is None and item.values[0].shape != residual.shape):
            if tokens is not None:
                raise RuntimeError("a token subset was computed before the chunk's first full step")
            item = self.items[key] = History(residual, level)
        else:
            item.push(residual, level, tokens, self.slots)
        self.bytes += item.nbytes() - before
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def estimate(self, branch: int, chunk: int, level: float, predict=None) -> tuple[torch.Tensor, int]:
        """The chunk's output at noise level `level` without running it, and how many of its tokens
        were extrapolated. predict: None/False reuse every token's newest output; True extrapolate
        every token; a bool tensor [L]: those tokens.

        Tokens with the same points (levels and order) share their weights: those are worked out
        once per group, on scalars. FlowCache's chunks are one group; MotionCache's subsets make a
        few."""
        item = self.items[(int(branch), int(chunk))]
        newest, k = item.values[0], len(item.values)
        if self.order == 0 or predict is None or predict is False or k < 2:
            return newest, 0
        if predict is True and item.shared is not None:          # every token the same points
            w, order = self._weights(item.shared, min(self.order, k - 1), level)
            if order == 0:
                return newest, 0
            weights, predicted = torch.tensor(w, dtype=torch.float64).view(k, 1), newest.shape[1]
        else:
            order = (item.count - 1).clamp(max=self.order)
            if predict is not True:
                order = torch.where(predict.cpu().bool(), order, torch.zeros_like(order))
            groups, inverse = torch.unique(torch.cat([torch.stack(item.levels), order[None].double()]), dim=1,
                                           return_inverse=True)
            table = [self._weights(col[:k].tolist(), int(col[k]), level) for col in groups.T]
            fitted = torch.tensor([o for _, o in table])[inverse] > 0
            if not bool(fitted.any()):
                return newest, 0
            weights, predicted = torch.tensor([w for w, _ in table], dtype=torch.float64).T[:, inverse], int(fitted.sum())
        dtype = torch.promote_types(newest.dtype, torch.float32)
        out = None
        for j, value in enumerate(item.values):
            wj = weights[j].to(device=newest.device, dtype=dtype).view(1, -1, *([1] * (newest.dim() - 2)))
            term = value.to(dtype) * wj
            out = term if out is None else out + term
        return out.to(newest.dtype), predicted

    @staticmethod
    def _weights(lv: list, order: int, level: float) -> tuple[list, int]:
        """Lagrange weights (one per slot, newest first) at `level` through the points lv[0..order],
        after the safeguards (coincident levels lower the order; the reach is clamped), and the
        order used."""
        tol = 1e-9 * max(abs(lv[0]), 1.0)
        for j in range(1, len(lv)):
            if order >= j and any(abs(lv[j] - lv[m]) <= tol for m in range(j)):
                order = j - 1
        weights = [1.0] + [0.0] * (len(lv) - 1)
        if order == 0:
            return weights, 0
        span, gap = abs(lv[0] - lv[order]), level - lv[0]
        direction = (gap > 0) - (gap < 0)
        at = lv[0] + direction * min(abs(gap), REACH * span)
        for j in range(order + 1):
            w = 1.0
            for m in range(order + 1):
                if m != j:
                    w = w * (at - lv[m]) / (lv[j] - lv[m])
            weights[j] = w
        return weights, order
