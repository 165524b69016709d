"""Multistep diffusion ODE samplers as one compiled scan: DDIM, DPM-Solver++ (2M / 3M), UniPC and DC.

Every solver here is linear in its state and its buffered data predictions m_j = x0_theta(x_j, t_j): a step from
t_i to t_{i+1} is

    x~_{i+1}   = a_i x_i + sum_j P_ij m_j                              (predictor)
    x_{i+1}    = a_i x_i + sum_j C_ij m_j + c_i x0_theta(x~_{i+1}, t_{i+1})   (corrector, UniPC only)

with coefficients that depend on the time grid alone. A `Plan` holds them: it is built once on the host in
float64 numpy from a `SolverConfig` and the schedule's values on the grid (`make_plan`, cached by those values;
its arrays are read-only), and the device runs a `lax.scan` over steps whose body is the same for every solver
and for the ratio search (`run`). Dynamic compensation (DC-Solver, Zhao et al. 2024, Sec. 3.2;
reference/dc_solver.md Sec. 1.5) replaces the newest buffered prediction by a Lagrange interpolant before each
predictor; its ratio is a traced value chosen per step by the caller (given ratios when sampling, a short
optimisation when searching), so new ratios never recompile.

The buffer holds M = max(order, 3) predictions, oldest first (slot M - 1 is the newest, m_{s0} of the notes).
Three are kept even for order 1 or 2 so that DC (which interpolates the last 3) works for every order, as the
diffusers `DCSolverMultistepScheduler` does; the official LDM code keeps `order` entries, so order 2 there means
no DC at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.dc_solver.config import SolverConfig
from theorax.models import diffusion


class Guidance(NamedTuple):
    """Classifier-free guidance: eps = eps(x, t, None) + scale (eps(x, t, labels) - eps(x, t, None)).

    Attributes:
      labels: integer conditions of the batch, shape (B,) (or anything `eps_fn` accepts as its 3rd argument).
      scale: the guidance scale w (1 = the conditional model); a traced scalar, so changing it never
        recompiles.
    """

    labels: jax.Array
    scale: jax.Array | float


class Plan(NamedTuple):
    """The per-step coefficients of a multistep sampler on a fixed time grid (see the module docstring).

    Shapes: ts, alphas, sigmas (nfe + 1,); every other field has leading axis nfe (one row per step).
    `dc_times` (nfe, 3) are (t_i, t_{i-1}, t_{i-2}), the abscissae of the compensation at step i, and
    `dc_valid` marks the steps where three predictions are buffered (i >= 2). Every array is float64 numpy (bool
    for `dc_valid`) and read-only: plans are shared through the cache of `make_plan`.
    """

    ts: np.ndarray
    alphas: np.ndarray
    sigmas: np.ndarray
    pred_x: np.ndarray  # (nfe,)
    pred_m: np.ndarray  # (nfe, M)
    corr_m: np.ndarray  # (nfe, M)
    corr_new: np.ndarray  # (nfe,)
    corrector: np.ndarray  # (nfe,) 1.0 where the corrector runs
    dc_times: np.ndarray  # (nfe, 3)
    dc_valid: np.ndarray  # (nfe,) bool

    @property
    def nfe(self) -> int:
        return int(self.pred_x.shape[0])


# --------------------------------------------------------------------------------- coefficients


def _unit(m: int, slot: int) -> np.ndarray:
    e = np.zeros(m)
    e[slot] = 1.0
    return e


def unipc_coefficients(lam: np.ndarray, alpha_t: float, i: int, order: int, variant: str, m: int):
    """UniP-p and UniC-p in data-prediction form with B(h) = bh1 / bh2 (UniPC, Zhao et al. 2023, Alg. 2).

    With h = lambda_{t} - lambda_{s0}, hh = -h, r_k = (lambda_{s_k} - lambda_{s0}) / h (k < p), r_p = 1,
    D_k = (m_{s_k} - m_{s0}) / r_k, h phi_1 = expm1(hh), g_1 = h phi_1 / hh - 1, b_i = g_i i! / B(h),
    g_{i+1} = g_i / hh - 1 / (i + 1)!, R = Vandermonde(r):

        x~_t = (sigma_t / sigma_s0) x - alpha_t h phi_1 m_s0 - alpha_t B(h) sum_k rho^p_k D_k
        x_t  = (sigma_t / sigma_s0) x - alpha_t h phi_1 m_s0 - alpha_t B(h) (sum_k rho^c_k D_k
                                                                    + rho^c_p (m_t - m_s0))

    rho^p = [0.5] for p = 2 (hard-coded, as the official code), R[:-1, :-1]^-1 b[:-1] for p >= 3;
    rho^c = [0.5] for p = 1, R^-1 b otherwise (reference/dc_solver.md Sec. 1.3).

    Args:
      lam: lambda at every grid point (nfe + 1,).
      alpha_t: alpha at t_{i+1}.
      i: the step (from t_i to t_{i+1}).
      order: p, at most i + 1.
      variant: "bh1" (B(h) = hh) or "bh2" (B(h) = expm1(hh)).
      m: buffer size (slot m - 1 holds m_{s0}).

    Returns:
      (predictor coefficients (m,), corrector coefficients (m,), corrector weight of m_t).
    """
    h = lam[i + 1] - lam[i]
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)] + [1.0]
    rks = np.asarray(rks)
    rows, b, factorial = [], [], 1
    for j in range(1, order + 1):
        rows.append(rks ** (j - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    vander, b = np.stack(rows), np.asarray(b)

    newest = _unit(m, m - 1)
    base = -alpha_t * h_phi_1 * newest
    diffs = [(_unit(m, m - 1 - k) - newest) / rks[k - 1] for k in range(1, order)]

    pred = base.copy()
    if order >= 2:
        rhos_p = np.array([0.5]) if order == 2 else np.linalg.solve(vander[:-1, :-1], b[:-1])
        pred -= alpha_t * b_h * sum(r * d for r, d in zip(rhos_p, diffs, strict=True))
    rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(vander, b)
    corr = base.copy()
    if order >= 2:
        corr -= alpha_t * b_h * sum(r * d for r, d in zip(rhos_c[:-1], diffs, strict=True))
    corr += alpha_t * b_h * rhos_c[-1] * newest  # - alpha B rho_p (m_t - m_s0): the m_s0 part
    return pred, corr, -alpha_t * b_h * rhos_c[-1]


def dpm_solver_pp_coefficients(
    lam: np.ndarray, alpha_t: float, i: int, order: int, solver_type: str, m: int
) -> np.ndarray:
    """Multistep DPM-Solver++ (Lu et al. 2022b, Alg. 2; diffusers' `DPMSolverMultistepScheduler`).

    h = lambda_t - lambda_s0, r0 = (lambda_s0 - lambda_s1) / h, r1 = (lambda_s1 - lambda_s2) / h:

        1st order (DDIM): x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) m0
        2M midpoint:      ... - 1/2 alpha_t (e^-h - 1) D1,            D1 = (m0 - m1) / r0
        2M heun:          ... + alpha_t ((e^-h - 1) / h + 1) D1
        3M:               ... + alpha_t ((e^-h - 1) / h + 1) D1 - alpha_t ((e^-h - 1 + h) / h^2 - 1/2) D2,
                          D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1)

    Returns the coefficients (m,) of the buffered predictions (slot m - 1 = m0).
    """
    h = lam[i + 1] - lam[i]
    em1 = math.expm1(-h)
    e0, e1, e2 = _unit(m, m - 1), _unit(m, m - 2), _unit(m, m - 3)
    coef = -alpha_t * em1 * e0
    if order == 1:
        return coef
    r0 = (lam[i] - lam[i - 1]) / h
    d1_0 = (e0 - e1) / r0
    if order == 2:
        if solver_type == "midpoint":
            return coef - 0.5 * alpha_t * em1 * d1_0
        return coef + alpha_t * (em1 / h + 1.0) * d1_0
    r1 = (lam[i - 1] - lam[i - 2]) / h
    d1_1 = (e1 - e2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return coef + alpha_t * (em1 / h + 1.0) * d1 - alpha_t * ((em1 + h) / h**2 - 0.5) * d2


def step_orders(config: SolverConfig, nfe: int) -> list[int]:
    """The order of each step: warm-up min(order, i + 1), then the lower-order final steps.

    DDIM: 1 everywhere. UniPC / DC: min(order, nfe - i) when `lower_order_final` (the official LDM code and
    diffusers' UniPC). DPM-Solver++: order 1 on the last step and at most 2 on the one before, only when
    nfe < 15, as diffusers' `DPMSolverMultistepScheduler` does.
    """
    if config.solver == "ddim":
        return [1] * nfe
    unipc = config.solver in ("unipc", "dc")
    orders = []
    for i in range(nfe):
        p = min(config.order, i + 1)
        if config.lower_order_final and (unipc or nfe < 15):
            p = min(p, nfe - i)
        orders.append(p)
    return orders


def make_plan(config: SolverConfig, schedule: diffusion.VPSchedule, ts) -> Plan:
    """The coefficients of the sampler `config` on the time grid `ts` (float64 numpy, on the host).

    Plans are cached by value, never by object identity: the key is the config, the grid's float64 bytes and
    the schedule's pytree (its structure and the bytes of its arrays), so equal schedules share one plan, and
    its read-only arrays cannot be changed by one caller under another.

    Args:
      config: the solver and its options.
      schedule: the VP schedule (alpha, sigma, lambda at the grid points).
      ts: the time grid, strictly decreasing, shape (nfe + 1,) (`config.time_steps(schedule, nfe)` or any
        other grid, such as the DDIM ground truth's).

    Returns:
      a `Plan` of read-only float64 numpy arrays.

    Example:
      >>> from theorax.inference.dc_solver import SolverConfig, make_plan
      >>> from theorax.models.diffusion import VPSchedule
      >>> config, schedule = SolverConfig("unipc"), VPSchedule.named("sd_scaled_linear")
      >>> plan = make_plan(config, schedule, config.time_steps(schedule, 5))
      >>> plan.nfe, plan.pred_m.shape, plan.corrector.tolist()
      (5, (5, 3), [1.0, 1.0, 1.0, 1.0, 0.0])
      >>> plan is make_plan(config, VPSchedule.named("sd_scaled_linear"), config.time_steps(schedule, 5))
      True
    """
    ts = np.asarray(ts, dtype=np.float64)
    if ts.ndim != 1 or ts.shape[0] < 2 or not np.all(np.diff(ts) < 0):
        raise ValueError(
            f"ts must be a strictly decreasing 1-D grid of at least 2 times, got shape {ts.shape}"
        )
    config.check_steps(ts.shape[0] - 1)
    leaves, structure = jax.tree.flatten(schedule)
    leaves = tuple(_ArrayValue.of(leaf) for leaf in leaves)
    return _plan(config, structure, leaves, ts.tobytes())


class _ArrayValue(NamedTuple):
    """A numpy array as a hashable value (dtype, shape, bytes): part of the plan cache's key."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, array) -> _ArrayValue:
        array = np.asarray(array)
        return cls(array.dtype.str, array.shape, array.tobytes())

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


@functools.lru_cache(maxsize=256)
def _plan(config: SolverConfig, structure, leaves: tuple[_ArrayValue, ...], ts: bytes) -> Plan:
    """The plan of `make_plan`, cached by the config, the schedule's pytree and the grid's bytes."""
    schedule = jax.tree.unflatten(structure, [leaf.array() for leaf in leaves])
    ts = np.frombuffer(ts, dtype=np.float64)
    alphas, sigmas, lam = schedule.alpha(ts), schedule.sigma(ts), schedule.lambda_(ts)
    nfe = ts.shape[0] - 1
    m = config.buffer_size
    pred_m, corr_m = np.zeros((nfe, m)), np.zeros((nfe, m))
    corr_new, corrector = np.zeros(nfe), np.zeros(nfe)
    for i, p in enumerate(step_orders(config, nfe)):
        if config.solver in ("ddim", "dpmsolver++"):
            pred_m[i] = dpm_solver_pp_coefficients(
                lam, alphas[i + 1], i, p, config.dpm_solver_type, m
            )
        else:
            pred_m[i], corr_m[i], corr_new[i] = unipc_coefficients(
                lam, alphas[i + 1], i, p, config.variant, m
            )
            corrector[i] = float(
                config.use_corrector and i < nfe - 1 and i not in config.disable_corrector
            )
    idx = np.arange(nfe)
    dc_times = np.stack([ts[idx], ts[np.maximum(idx - 1, 0)], ts[np.maximum(idx - 2, 0)]], axis=1)
    dc_valid = idx >= 2
    # Distinct placeholder abscissae where fewer than 3 predictions are buffered (never used, keeps the
    # Lagrange weights finite so that gradients stay finite).
    dc_times[~dc_valid] = ts[idx[~dc_valid], None] + np.array([0.0, 1.0, 2.0])
    plan = Plan(
        ts=ts,
        alphas=alphas,
        sigmas=sigmas,
        pred_x=sigmas[1:] / sigmas[:-1],
        pred_m=pred_m,
        corr_m=corr_m,
        corr_new=corr_new,
        corrector=corrector,
        dc_times=dc_times,
        dc_valid=dc_valid,
    )
    for array in plan:
        array.setflags(write=False)
    return plan


# ------------------------------------------------------------------------- dynamic compensation


def compensation_weights(ratio, times):
    """Lagrange weights of dynamic compensation (DC-Solver Eq. 9; reference/dc_solver.md Sec. 1.5).

    t' = rho t_{i-1} + (1 - rho) t_{i-2} and w_k = prod_{l != k} (t' - t_l) / (t_k - t_l) over the three
    newest buffered times (t_{i-1}, t_{i-2}, t_{i-3} in the paper's indexing, `times` = (newest, ..., oldest)).
    The abscissa is t, not lambda (the official code). rho = 1 gives exactly (1, 0, 0).

    Args:
      ratio: the compensation ratio rho (scalar, differentiable).
      times: (3,) buffered times, newest first.

    Returns:
      (3,) weights of the newest, middle and oldest predictions.
    """
    t0, t1, t2 = times[0], times[1], times[2]
    tp = ratio * t0 + (1.0 - ratio) * t1
    w0 = (tp - t1) / (t0 - t1) * ((tp - t2) / (t0 - t2))
    w1 = (tp - t0) / (t1 - t0) * ((tp - t2) / (t1 - t2))
    w2 = (tp - t0) / (t2 - t0) * ((tp - t1) / (t2 - t1))
    return jnp.stack([w0, w1, w2])


def compensate(buf, ratio, times, valid, weights=None, one=None):
    """Replaces the newest buffered prediction by its compensated value where `valid` (permanently).

    `buf` is the stacked buffer (M, ...) of the scan, with a traced `valid`, or the tuple of M arrays of the
    unrolled steps, with the plan's bool `valid` (then nothing is emitted where it is False), the traced 1 of
    `_materialize` as `one` and, optionally, the step's `weights` computed beforehand (`run_unrolled` computes
    every step's at once). `times` are traced in both: folded into constants, the weights' divisions would round
    differently (rho = 1 would no longer give exactly (1, 0, 0))."""
    if isinstance(buf, tuple):
        if not valid:
            return buf
        w = compensation_weights(ratio, times) if weights is None else weights
        w = w.astype(buf[-1].dtype)
        new = w[0] * buf[-1] + w[1] * buf[-2] + w[2] * buf[-3]
        return (*buf[:-1], _materialize(new, one))
    w = compensation_weights(ratio, times).astype(buf.dtype)
    m = buf.shape[0]
    new = w[0] * buf[m - 1] + w[1] * buf[m - 2] + w[2] * buf[m - 3]
    return buf.at[m - 1].set(jnp.where(valid, new, buf[m - 1]))


# ----------------------------------------------------------------------------------- the engine


def model_eps(eps_fn: Callable, x, t, guidance: Guidance | None):
    """eps_fn(x, t) or, with guidance, its classifier-free-guided combination."""
    if guidance is None:
        return eps_fn(x, t)
    return diffusion.classifier_free_guidance(eps_fn, x, t, guidance.labels, guidance.scale)


def _data_prediction(eps_fn, guidance, x, t, alpha, sigma, check: bool = True):
    """x0 = (x - sigma eps) / alpha and whether eps is finite (None without `check`)."""
    eps = model_eps(eps_fn, x, jnp.asarray(t, x.dtype), guidance)
    if eps.shape != x.shape:
        raise ValueError(
            f"eps_fn returned shape {eps.shape} for input of shape {x.shape}; it must return the "
            "noise prediction with the input's shape"
        )
    eps = eps.astype(x.dtype)
    return (x - sigma * eps) / alpha, jnp.all(jnp.isfinite(eps)) if check else None


def _rows(plan: Plan, dtype):
    """Per-step scan inputs, cast to the state's dtype."""
    f = lambda a: jnp.asarray(a, dtype)
    return dict(
        t_next=f(plan.ts[1:]),
        alpha_next=f(plan.alphas[1:]),
        sigma_next=f(plan.sigmas[1:]),
        pred_x=f(plan.pred_x),
        pred_m=f(plan.pred_m),
        corr_m=f(plan.corr_m),
        corr_new=f(plan.corr_new),
        corrector=f(plan.corrector),
        dc_times=f(plan.dc_times),
        dc_valid=jnp.asarray(plan.dc_valid),
    )


def _combine(coef, buf):
    """sum_j coef_j m_j: a contraction over the stacked buffer, or, over the tuple buffer of the unrolled steps,
    one sum of the terms whose (float64, host) coefficient is not zero, which XLA fuses into one loop."""
    if isinstance(buf, tuple):
        terms = [float(c) * m for c, m in zip(coef, buf, strict=True) if c != 0.0]
        return functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(buf[-1])
    return jnp.tensordot(coef, buf, axes=1)


def step(eps_fn, guidance, x, buf, row, ratio, *, dc: bool, evaluate: bool):
    """One sampler step from t_i to t_{i+1}: compensation, predictor, model evaluation, corrector.

    Returns (x_{i+1}, the buffer after this step, finite flag of the model output). With evaluate=False
    (the last step) the predictor's output is returned and the buffer is left as it is.

    Two forms of the same step: inside the scan (`run`) the buffer is one stacked array and the row holds
    traced coefficients; unrolled (`run_unrolled`) the buffer is a tuple of arrays and the row holds the plan's
    own float64 numbers, so every coefficient is a constant of the program, zero terms and the corrector switch
    are resolved while tracing, and the buffer is never copied to shift it. The finite flag is then not
    computed (None): the unrolled run checks its output once instead.
    """
    unrolled = isinstance(buf, tuple)
    scalar = float if unrolled else (lambda a: a)
    if dc:
        buf = compensate(
            buf, ratio, row["dc_times"], row["dc_valid"], row.get("dc_weights"), row.get("one")
        )
    x_pred = scalar(row["pred_x"]) * x + _combine(row["pred_m"], buf)
    if unrolled and evaluate:
        x_pred = _materialize(x_pred, row["one"])
    if not evaluate:
        return x_pred, buf, jnp.array(True)
    t, alpha, sigma = (scalar(row[k]) for k in ("t_next", "alpha_next", "sigma_next"))
    m_new, finite = _data_prediction(eps_fn, guidance, x_pred, t, alpha, sigma, check=not unrolled)
    if unrolled:
        m_new = _materialize(m_new, row["one"])
    x_corr = scalar(row["pred_x"]) * x + _combine(row["corr_m"], buf)
    x_corr = x_corr + scalar(row["corr_new"]) * m_new
    if unrolled:
        x_next = _materialize(x_corr if row["corrector"] > 0 else x_pred, row["one"])
        return x_next, (*buf[1:], m_new), None
    x_next = jnp.where(row["corrector"] > 0, x_corr, x_pred)
    buf = jnp.concatenate([buf[1:], m_new[None]], axis=0)
    return x_next, buf, finite


def initial_buffer(eps_fn, guidance, x_T, plan: Plan):
    """The buffer before step 0: zeros and m_0 = x0_theta(x_T, t_0) in the newest slot."""
    dtype = x_T.dtype
    m0, finite = _data_prediction(
        eps_fn,
        guidance,
        x_T,
        jnp.asarray(plan.ts[0], dtype),
        jnp.asarray(plan.alphas[0], dtype),
        jnp.asarray(plan.sigmas[0], dtype),
    )
    m = plan.pred_m.shape[1]
    buf = jnp.zeros((m, *x_T.shape), dtype).at[m - 1].set(m0)
    return buf, finite


def given_ratio(x, buf, row, ratio, *, evaluate):
    """The ratio rule of sampling: step i's input is its ratio (no per-step output)."""
    del x, buf, row, evaluate
    return ratio, ()


def run(
    eps_fn,
    x_T,
    plan: Plan,
    per_step,
    guidance: Guidance | None,
    choose_ratio: Callable = given_ratio,
    *,
    dc: bool,
    trajectory: bool = False,
):
    """Runs a whole sampler (traceable; the public entry points jit it): the one scan over steps.

    Step i first asks `choose_ratio(x_i, buffer, row_i, per_step[i], evaluate=...)` for its compensation ratio
    (and an output of its own), then takes the `step`; every step but the last evaluates the model (and
    corrects). Sampling passes the ratios as `per_step` with `given_ratio`; the ratio search passes the ground
    truth and a rule that optimises the ratio against it.

    Args:
      eps_fn: noise prediction `eps_fn(x, t[, labels])`.
      x_T: the initial noise (any shape whose leading axes are the batch).
      plan: the coefficients (`make_plan`), as arrays.
      per_step: a pytree with leading axis nfe, step i's input to `choose_ratio`.
      guidance: None or `Guidance`.
      choose_ratio: `(x, buf, row, item, *, evaluate) -> (ratio, output)`.
      dc: apply dynamic compensation before each predictor.
      trajectory: also return the state after every step, shape (nfe, *x_T.shape).

    Returns:
      (x_0, trajectory or None, the rule's outputs stacked over the steps, bad) where bad is the first model
      evaluation (0 = at x_T, i + 1 = after step i) with a non-finite output, or -1.
    """
    nfe = plan.pred_x.shape[0]
    rows = _rows(plan, x_T.dtype)
    buf, finite0 = initial_buffer(eps_fn, guidance, x_T, plan)

    def advance(x, buf, row, item, evaluate):
        ratio, out = choose_ratio(x, buf, row, item, evaluate=evaluate)
        x_next, buf, finite = step(eps_fn, guidance, x, buf, row, ratio, dc=dc, evaluate=evaluate)
        return x_next, buf, finite, out

    def body(carry, inputs):
        x, buf, bad = carry
        row, item, i = inputs
        x_next, buf, finite, out = advance(x, buf, row, item, True)
        bad = jnp.where((bad < 0) & ~finite, i + 1, bad)
        return (x_next, buf, bad), (x_next if trajectory else None, out)

    head = lambda tree: jax.tree.map(lambda a: a[: nfe - 1], tree)
    last = lambda tree: jax.tree.map(lambda a: a[nfe - 1], tree)
    (x, buf, bad), (traj, outs) = jax.lax.scan(
        body,
        (x_T, buf, jnp.where(finite0, -1, 0)),
        (head(rows), head(per_step), jnp.arange(nfe - 1)),
    )
    x, _, _, out_last = advance(x, buf, last(rows), last(per_step), False)
    outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), outs, out_last)
    if trajectory:
        traj = jnp.concatenate([traj, x[None]], axis=0)
    return x, traj, outs, bad


def run_unrolled(
    eps_fn, x_T, plan: Plan, ratios, guidance: Guidance | None, *, dc: bool, dc_times=None
):
    """The sampler of `run` (given ratios, no trajectory) with its steps unrolled (traceable; `sample` jits it).

    The number of steps is static, so the steps are traced one after another instead of scanned: the plan's
    coefficients become constants of the program (its float64 numbers, rounded to the state's dtype where they
    multiply it, as the scan's rows are), the buffer is a tuple of arrays that is never copied, each linear
    combination of the solver is one fused loop, and there is no per-step loop machinery. Same maths as `run`.

    Instead of a finite flag per model evaluation, the output is checked once: every evaluation enters the next
    step's predictor with a nonzero weight, and every state enters the next with weight sigma_{i+1} / sigma_i,
    so a non-finite model output leaves the output non-finite. The caller then reruns `run` to find it.

    Args:
      eps_fn, x_T, guidance, dc: as for `run`.
      plan: the plan's float64 numpy arrays themselves (not device arrays): they are read while tracing.
      ratios: (nfe,) compensation ratios (traced).
      dc_times: with `dc`, the plan's `dc_times` (nfe, 3) as a traced array of the state's dtype (see
        `compensate`).

    Returns:
      (x_0, whether every element of x_0 is finite).
    """
    nfe = plan.nfe
    rows = {
        "t_next": plan.ts[1:],
        "alpha_next": plan.alphas[1:],
        "sigma_next": plan.sigmas[1:],
        "pred_x": plan.pred_x,
        "pred_m": plan.pred_m,
        "corr_m": plan.corr_m,
        "corr_new": plan.corr_new,
        "corrector": plan.corrector,
        "dc_times": dc_times if dc else plan.dc_times,
        "dc_valid": plan.dc_valid,
    }
    if dc:  # every step's compensation weights in one small computation, (nfe, 3)
        rows["dc_weights"] = compensation_weights(ratios, dc_times.T).T
    # A 1 that the compiler cannot fold (the ratios are finite), for `_materialize`.
    one = ratios[0] * 0 + 1
    t0, alpha0, sigma0 = float(plan.ts[0]), float(plan.alphas[0]), float(plan.sigmas[0])
    m0, _ = _data_prediction(eps_fn, guidance, x_T, t0, alpha0, sigma0, check=False)
    m0 = _materialize(m0, one)
    m = plan.pred_m.shape[1]
    buf = (*[jnp.zeros_like(x_T)] * (m - 1), m0)
    x = x_T
    for i in range(nfe):
        row = {k: v[i] for k, v in rows.items()} | {"one": one}
        x, buf, _ = step(eps_fn, guidance, x, buf, row, ratios[i], dc=dc, evaluate=i < nfe - 1)
    return x, jnp.all(jnp.isfinite(x))


def _materialize(a, one):
    """`a` itself (bitwise: a / 1), written so that XLA computes it once and does not fuse its computation into
    every consumer. Without it, XLA:CPU inlines each step's cheap linear combinations into all later ones,
    recomputing the whole trajectory inside every step (reads quadratic in NFE instead of linear).

    `one` is a traced 1 (from the program's inputs), so the division is not folded away, and XLA does not
    duplicate a division into several consumers: the combination stays one fused loop that ends in the
    division. (`lax.optimization_barrier` does not stop this fusion on XLA:CPU. The update of a's first
    element with its own value that stood here before cost a separate small in-place fusion after each
    combination, 35 more thunks on the critical path of an NFE-10 sampler.)"""
    return a / one.astype(a.dtype) if a.ndim else a
