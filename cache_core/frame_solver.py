"""Per-frame flow-matching solvers driven by x0 predictions, vectorised over frames.

In diffusion forcing every latent frame walks the same sigma template but may be at a
different step of it in any given model call (specs/skyreels_df.md 1.2-1.4). Upstream keeps
one scheduler object per frame; here one solver holds the state of all frames and steps any
subset of them at once, each at its own step index.

Tensors are [B, C, F, H, W] (frames on dim 2). The caller passes the model's x0 prediction
(for a flow model x0 = x - sigma * v). ``step_index[f] = k`` moves frame f from template[k]
to template[k+1]; frames with ``update[f] = False`` come back bit-identical and keep their
solver state.

Flow parametrisation for UniPC: alpha = 1 - sigma, sigma = sigma, lambda = log(alpha/sigma).
Step coefficients depend only on the step index (all frames share one template), so they are
tabulated once in float64 and gathered per frame. Latents are combined in the input dtype
(float32 for half types, so bf16 latents do not lose the small corrections).
"""
from __future__ import annotations

import math

import torch


def _as_template(template) -> torch.Tensor:
    t = torch.as_tensor(template, dtype=torch.float64).detach().cpu().flatten()
    if t.numel() < 2:
        raise ValueError("a template needs at least 2 sigmas (one step)")
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError("template sigmas must be strictly decreasing")
    if float(t[-1]) < 0.0 or float(t[0]) > 1.0:
        raise ValueError("flow template sigmas must lie in [0, 1]")
    return t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class FrameSolver:
    """Base class: validation, per-frame bookkeeping and coefficient gathering."""

    def __init__(self, template, num_frames: int):
        self.template = _as_template(template)
        self.steps = int(self.template.numel()) - 1
        self.num_frames = int(num_frames)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.reset()

    def reset(self) -> None:
        """Forget all per-frame history (a new window)."""

    def step(self, x: torch.Tensor, x0: torch.Tensor, step_index, update) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != self.num_frames:
            raise ValueError(f"x must be [B, C, F={self.num_frames}, H, W], got {tuple(x.shape)}")
        if x0.shape != x.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} must match x {tuple(x.shape)}")
        # Schedules live on the CPU; moving these tiny vectors is the only host traffic.
        k = torch.as_tensor(step_index).detach().to("cpu", torch.int64).flatten()
        upd = torch.as_tensor(update).detach().to("cpu", torch.bool).flatten()
        if k.numel() != self.num_frames or upd.numel() != self.num_frames:
            raise ValueError(f"step_index and update need {self.num_frames} entries")
        if not bool(upd.any()):
            return x
        ku = k[upd]
        if bool((ku < 0).any()) or bool((ku >= self.steps).any()):
            raise ValueError(f"step_index of updated frames must lie in [0, {self.steps - 1}], "
                             f"got {ku.tolist()}")
        k = torch.where(upd, k, torch.zeros_like(k))  # safe gather index for idle frames
        return self._step(x, x0, k, upd)

    def _step(self, x, x0, k, upd):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _frame_vec(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[F] float64 (CPU) -> [1, 1, F, 1, 1] on like's device in dtype."""
        return values.to(device=like.device, dtype=dtype).view(1, 1, -1, 1, 1)


class EulerFrameSolver(FrameSolver):
    """Flow-matching Euler: x_next = x0 + (sigma_next / sigma) (x - x0); exact x0 at sigma 0."""

    def __init__(self, template, num_frames: int):
        super().__init__(template, num_frames)
        t = self.template
        self._ratio = t[1:] / t[:-1]   # sigma_next / sigma per step; 0 on the final step

    def _step(self, x, x0, k, upd):
        cd = _compute_dtype(x.dtype)
        ratio = self._frame_vec(self._ratio[k], x, cd)
        xc, x0c = x.to(cd), x0.to(cd)
        x_new = (x0c + ratio * (xc - x0c)).to(x.dtype)
        return torch.where(self._frame_vec(upd, x, torch.bool), x_new, x)


class UniPCFrameSolver(FrameSolver):
    """UniPC (order 2, B(h)=bh2, data prediction) with the UniC corrector, one history per frame.

    Per frame this is upstream's FlowUniPCMultistepScheduler with solver_order=2, bh2,
    predict_x0, lower_order_final and no disabled corrector steps:

    - step k first corrects the incoming sample with UniC, using the new x0 (from the
      uncorrected sample), when the frame took step k-1 just before; the corrector order is
      the order of that previous predictor;
    - then the UniP predictor goes to template[k+1] with order min(2, steps taken + 1, N - k):
      first step of a frame and the final step (to sigma 0, which lands on x0) are order 1;
    - no corrector follows the final step (there is no model call at sigma 0).

    A frame whose step index does not continue its previous one (a new window, or a first
    step in the middle of the template) starts fresh at order 1, like upstream's scheduler on
    its first call.

    upstream_exact: reproduce what SkyReels-V2's pipeline (and diffusers' port) really computes.
    It hands each frame's scheduler a *view* of its latents and then writes the new sample into
    that memory, so the scheduler's stored previous sample has become the current one by the
    frame's first corrector step (its second step); from the third step on the stored sample is
    a fresh tensor and all is textbook again. Off (default): textbook UniPC.
    """

    def __init__(self, template, num_frames: int, upstream_exact: bool = False):
        self.upstream_exact = bool(upstream_exact)
        super().__init__(template, num_frames)
        self._build_tables()

    def reset(self) -> None:
        F = self.num_frames
        self._k_last = torch.full((F,), -2, dtype=torch.int64)   # last step index taken
        self._hist = torch.zeros(F, dtype=torch.int64)            # consecutive steps taken (<=2)
        self._last_order = torch.zeros(F, dtype=torch.int64)      # order of the last predictor
        self._last_sample = None   # corrected sample the last predictor started from
        self._m1 = None            # x0 of the last step
        self._m2 = None            # x0 of the step before

    # -- coefficient tables ------------------------------------------------------------------

    def _build_tables(self) -> None:
        sig = self.template.tolist()
        N = self.steps

        def lam(s: float) -> float:  # log-SNR of the flow schedule; +-inf at the ends
            if s <= 0.0:
                return math.inf
            if s >= 1.0:
                return -math.inf
            return math.log1p(-s) - math.log(s)

        lams = [lam(s) for s in sig]
        z = torch.zeros
        # predictor at step k: x_next = px*x + p0*m_k + p1*m_{k-1} (p1 only for order 2)
        self._px, self._p0_1 = z(N, dtype=torch.float64), z(N, dtype=torch.float64)
        self._p0_2, self._p1_2 = z(N, dtype=torch.float64), z(N, dtype=torch.float64)
        # corrector at step k: x_c = cx*x_last + c1*m_{k-1} + c2*m_{k-2} + ct*m_k
        self._cx = z(N, dtype=torch.float64)
        self._c1 = z(2, N, dtype=torch.float64)  # [order-1, k]
        self._c2 = z(2, N, dtype=torch.float64)
        self._ct = z(2, N, dtype=torch.float64)

        for k in range(N):
            s, t = sig[k], sig[k + 1]
            if t == 0.0:
                # lambda_t = inf: the order-1 step is exactly x0 (the lower_order_final step)
                self._px[k], self._p0_1[k] = 0.0, 1.0
                self._p0_2[k], self._p1_2[k] = 1.0, 0.0
            else:
                hh = -(lams[k + 1] - lams[k])
                phi1 = math.expm1(hh)          # h*phi_1(h) with the data-prediction sign
                b_h = phi1                     # bh2: B(h) = expm1(hh)
                a_t = 1.0 - t
                self._px[k] = t / s
                self._p0_1[k] = -a_t * phi1
                if k >= 1:
                    r1 = (lams[k - 1] - lams[k]) / -hh
                    # UniP-2 uses rho = 1/2 on D1 = (m_{k-1} - m_k) / r1
                    p1 = -a_t * b_h * 0.5 / r1
                    self._p1_2[k], self._p0_2[k] = p1, -a_t * phi1 - p1
            if k >= 1:
                self._corrector_row(k, sig, lams)

    def _corrector_row(self, k: int, sig, lams) -> None:
        """UniC coefficients to correct the sample at template[k] coming from template[k-1]."""
        s, t = sig[k - 1], sig[k]
        h = lams[k] - lams[k - 1]
        hh = -h
        phi1 = math.expm1(hh)
        b_h = phi1
        a_t = 1.0 - t
        self._cx[k] = t / s
        base = -a_t * phi1
        # order 1: rho_c = 1/2 on D1_t = m_k - m_{k-1}
        ct = -0.5 * a_t * b_h
        self._ct[0, k], self._c1[0, k], self._c2[0, k] = ct, base - ct, 0.0
        if k >= 2:
            # order 2: solve [[1, 1], [r1, 1]] rho = [b1, b2] in closed form
            r1 = (lams[k - 2] - lams[k - 1]) / h
            g1 = phi1 / hh - 1.0
            b1 = g1 / b_h
            b2 = 2.0 * (g1 / hh - 0.5) / b_h
            rho0 = (b1 - b2) / (1.0 - r1)
            rho1 = b1 - rho0
            c2 = -a_t * b_h * rho0 / r1
            ct = -a_t * b_h * rho1
            self._c2[1, k], self._ct[1, k], self._c1[1, k] = c2, ct, base - c2 - ct

    # -- stepping ----------------------------------------------------------------------------

    def _step(self, x, x0, k, upd):
        N = self.steps
        cd = _compute_dtype(x.dtype)
        fv = lambda v: self._frame_vec(v, x, cd)  # noqa: E731
        if self._m1 is None or self._m1.shape != x.shape or self._m1.device != x.device:
            self._last_sample = torch.zeros_like(x)
            self._m1 = torch.zeros_like(x)
            self._m2 = torch.zeros_like(x)
            self._k_last.fill_(-2)
            self._hist.zero_()
            self._last_order.zero_()

        cont = upd & (k >= 1) & (self._k_last == k - 1) & (self._hist >= 1)
        hist = torch.where(cont, self._hist, torch.zeros_like(self._hist))

        xc, x0c = x.to(cd), x0.to(cd)
        last, m1, m2 = self._last_sample.to(cd), self._m1.to(cd), self._m2.to(cd)
        if self.upstream_exact:   # the aliased view: at the first corrector, "previous" = current
            last = torch.where(self._frame_vec(cont & (self._hist == 1), x, torch.bool), xc, last)

        # UniC corrector on the incoming sample (frames continuing their history only)
        oc = (self._last_order.clamp(1, 2) - 1)
        x_corr = (fv(self._cx[k]) * last + fv(self._c1[oc, k]) * m1
                  + fv(self._c2[oc, k]) * m2 + fv(self._ct[oc, k]) * x0c)
        x_corr = torch.where(self._frame_vec(cont, x, torch.bool), x_corr, xc)

        # UniP predictor; order 1 on a frame's first step and on the final step
        order = torch.minimum(hist + 1, (N - k).clamp(max=2)).clamp(1, 2)
        two = order == 2
        p0 = torch.where(two, self._p0_2[k], self._p0_1[k])
        p1 = torch.where(two, self._p1_2[k], torch.zeros_like(self._p1_2[k]))
        x_next = fv(self._px[k]) * x_corr + fv(p0) * x0c + fv(p1) * m1

        # commit state for updated frames only
        mask = self._frame_vec(upd, x, torch.bool)
        sd = self._m1.dtype
        self._m2 = torch.where(mask, self._m1, self._m2)
        self._m1 = torch.where(mask, x0.to(sd), self._m1)
        self._last_sample = torch.where(mask, x_corr.to(sd), self._last_sample)
        self._k_last = torch.where(upd, k, self._k_last)
        self._hist = torch.where(upd, (hist + 1).clamp(max=2), self._hist)
        self._last_order = torch.where(upd, order, self._last_order)

        return torch.where(mask, x_next.to(x.dtype), x)


SOLVERS = {
    "unipc": lambda template, frames: UniPCFrameSolver(template, frames),
    "unipc_upstream": lambda template, frames: UniPCFrameSolver(template, frames, upstream_exact=True),
    "euler": EulerFrameSolver,
}


def make_solver(name: str, template, num_frames: int) -> FrameSolver:
    """Build a per-frame solver by name: "unipc", "unipc_upstream" (see UniPCFrameSolver) or "euler"."""
    key = str(name).lower()
    if key not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[key](template, num_frames)
