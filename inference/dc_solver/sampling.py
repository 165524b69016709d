"""DC-Solver: sampling with dynamic compensation, the greedy ratio search, and cascade polynomial regression.

DC-Solver (Zhao, Wang, Zhou, Lu; ECCV 2024) corrects the misalignment of UniPC's predictor-corrector: the
buffered data prediction m_{i-1} was evaluated at the predictor's output but is used next to the corrected state.
Before the predictor of step i it is replaced, permanently, by the order-2 Lagrange interpolant of the three newest
buffered predictions over t, taken at t' = rho_i t_{i-1} + (1 - rho_i) t_{i-2} (Sec. 3.2). The ratios rho are found
per step by a short gradient search against a many-step DDIM trajectory (Sec. 3.3), and cascade polynomial
regression (CPR) predicts them for unseen (NFE, CFG) settings from a few searched ones (Sec. 3.4).

Public API:

* `sample(eps_fn, x_T, schedule, *, nfe, solver, ...)`: DDIM, DPM-Solver++, UniPC or DC-Solver, each one
  `jax.jit` (a scan over steps); the ratios and the guidance scale are traced arrays.
* `search_ratios(eps_fn, x_T, schedule, *, nfe, ...)`: the greedy search, one `jax.jit` (a scan over steps, each
  with a scan of AdamW iterations).
* `ddim_reference(...)`: the many-step DDIM ground truth at the solver's grid times.
* `cpr_fit(settings, ratios)`, `cpr_predict(coeffs, cfg, nfe)`, in the official 36-number layout.

Files (saving ratios as JSON, reading the official .npy) are the experiments' and `third_party`'s business.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from theorax.inference.dc_solver import solvers as ds
from theorax.inference.dc_solver.solvers import SOLVERS, VARIANTS, Guidance, Plan
from theorax.models import diffusion
from theorax.models.validation import check_finite

__all__ = [
    "Guidance",
    "sample",
    "sample_with_trajectory",
    "search_ratios",
    "ddim_reference",
    "cpr_fit",
    "cpr_predict",
    "cpr_features",
    "GT_MODES",
]

GT_MODES = ("aligned", "ldm")


# ------------------------------------------------------------------------------------ validation


def _check_eps_fn(eps_fn, guidance):
    if not callable(eps_fn):
        raise TypeError(f"eps_fn must be callable as eps_fn(x, t), got {type(eps_fn).__name__}")
    if guidance is None:
        return
    if not isinstance(guidance, Guidance):
        raise TypeError(
            f"guidance must be a Guidance(labels, scale) or None, got {type(guidance).__name__}"
        )
    func = eps_fn.func if isinstance(eps_fn, jax.tree_util.Partial) else eps_fn
    bound = eps_fn.args if isinstance(eps_fn, jax.tree_util.Partial) else ()
    for arg in bound:
        if isinstance(arg, diffusion.GaussianMixture) and arg.num_classes is None:
            raise ValueError(
                "guidance was given but the GaussianMixture has no class_weights (a model without "
                "conditions); build it with GaussianMixture.class_conditional(...) or pass guidance=None"
            )
    try:
        sig = inspect.signature(eps_fn)
        sig.bind(None, None, None)
    except TypeError:
        raise ValueError(
            f"guidance was given but eps_fn {getattr(func, '__name__', func)!r} takes no labels argument "
            "(a model without conditions); classifier-free guidance calls eps_fn(x, t, labels) and "
            "eps_fn(x, t, None). Pass guidance=None or a conditional model."
        ) from None
    except ValueError:  # no signature available (builtins): let tracing report it
        pass
    scale = guidance.scale
    if isinstance(scale, int | float) and not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")


def _check_common(x_T, schedule, nfe, order, solver, variant, spacing):
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    if not isinstance(schedule, diffusion.VPSchedule):
        raise TypeError(
            f"schedule must be a models.diffusion.VPSchedule, got {type(schedule).__name__}"
        )
    if isinstance(nfe, bool) or not isinstance(nfe, int | np.integer) or nfe < 1:
        raise ValueError(f"nfe={nfe!r} must be a positive integer (the number of steps)")
    if isinstance(order, bool) or not isinstance(order, int | np.integer) or not 1 <= order <= 3:
        raise ValueError(f"order={order!r} must be 1, 2 or 3")
    if solver != "ddim" and nfe < order:
        raise ValueError(
            f"nfe={nfe} is smaller than order={order}: a multistep solver of order {order} needs at least "
            f"{order} steps. Use nfe >= {order} or order <= {nfe}."
        )
    if solver in ("unipc", "dc") and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    if spacing not in diffusion.SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {list(diffusion.SPACINGS)}")
    if not hasattr(x_T, "shape") or len(x_T.shape) < 1:
        raise ValueError("x_T must be an array with a leading batch axis")
    if not jnp.issubdtype(jnp.asarray(x_T).dtype, jnp.floating):
        raise ValueError(f"x_T must be a float array, got dtype {jnp.asarray(x_T).dtype}")


def _check_ratios(ratios, solver, nfe):
    if ratios is None:
        if solver == "dc":
            raise ValueError(
                "solver='dc' needs ratios of shape (nfe,): search them with search_ratios(...) or predict "
                "them with cpr_predict(...); all-ones ratios give UniPC"
            )
        return None
    if solver not in ("dc", "dpmsolver++"):
        raise ValueError(
            f"ratios apply to solver='dc' (UniPC + DC) or 'dpmsolver++' (DC as a plug-in); got "
            f"solver={solver!r}. Drop ratios or change the solver."
        )
    shape = np.shape(ratios)
    if shape != (nfe,):
        raise ValueError(
            f"ratios must have shape ({nfe},) (one per step, nfe={nfe}); got shape {shape}"
        )
    check_finite(ratios, "ratios")
    return ratios


def _as_partial(eps_fn):
    """Model functions travel through jit as `jax.tree_util.Partial` pytrees (func static, args traced)."""
    return eps_fn if isinstance(eps_fn, jax.tree_util.Partial) else jax.tree_util.Partial(eps_fn)


@functools.lru_cache(maxsize=256)
def _plan_cached(schedule, key):
    (
        nfe,
        solver,
        order,
        variant,
        dpm_solver_type,
        spacing,
        lower_order_final,
        use_corrector,
        dis,
    ) = key
    ts = diffusion.time_steps(schedule, nfe, spacing)
    return ds.make_plan(
        schedule,
        ts,
        solver=solver,
        order=order,
        variant=variant,
        dpm_solver_type=dpm_solver_type,
        lower_order_final=lower_order_final,
        use_corrector=use_corrector,
        disable_corrector=dis,
    )


def plan_for(
    schedule: diffusion.VPSchedule,
    *,
    nfe: int,
    solver: str,
    order: int = 3,
    variant: str = "bh1",
    dpm_solver_type: str = "midpoint",
    spacing: str = "time_uniform",
    lower_order_final: bool = True,
    use_corrector: bool = True,
    disable_corrector: Sequence[int] = (),
) -> Plan:
    """The `Plan` of a sampler on the grid `time_steps(schedule, nfe, spacing)` (cached per schedule)."""
    if dpm_solver_type not in ds.DPM_SOLVER_TYPES:
        raise ValueError(
            f"unknown dpm_solver_type {dpm_solver_type!r}; choose one of {list(ds.DPM_SOLVER_TYPES)}"
        )
    key = (
        int(nfe),
        solver,
        int(order),
        variant,
        dpm_solver_type,
        spacing,
        bool(lower_order_final),
        bool(use_corrector),
        tuple(int(i) for i in disable_corrector),
    )
    return _plan_cached(schedule, key)


def _jnp_plan(plan: Plan) -> Plan:
    # dc_valid stays boolean; orders is not needed on the device.
    return plan._replace(orders=np.zeros(0))


# ---------------------------------------------------------------------------------------- sample


@functools.partial(jax.jit, static_argnames=("dc", "trajectory"))
def _sample_jit(eps_fn, x_T, plan, ratios, guidance, dc, trajectory):
    return ds.run(eps_fn, x_T, plan, ratios, guidance, dc=dc, trajectory=trajectory)


def _raise_non_finite(bad, plan: Plan, what: str):
    bad = int(bad)
    if bad >= 0:
        raise FloatingPointError(
            f"{what}: the model returned non-finite values at evaluation {bad} (t={plan.ts[bad]:.6g}); "
            "check the model (and its inputs' scale) and the guidance scale"
        )


def sample(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    *,
    nfe: int,
    solver: str,
    order: int = 3,
    variant: str = "bh1",
    ratios=None,
    spacing: str = "time_uniform",
    guidance: Guidance | None = None,
    lower_order_final: bool = True,
    use_corrector: bool = True,
    disable_corrector: Sequence[int] = (),
    dpm_solver_type: str = "midpoint",
) -> jax.Array:
    """Solves the diffusion ODE from x_T at t = T to t = 1/N with `nfe` steps.

    Solvers (all in data-prediction form, exponential integrators in lambda):

    * "ddim": x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h_i}) x0_theta(x_i, t_i);
    * "dpmsolver++": multistep DPM-Solver++ of `order` 1-3 (2M / 3M; `dpm_solver_type` midpoint or heun); with
      `ratios`, dynamic compensation as a plug-in before each step (the paper's DPM-Solver++ + DC);
    * "unipc": UniPC-p with B(h) = `variant` (bh1 / bh2), corrector on unless `use_corrector=False` and never on
      the last step; the corrector's model evaluation is stored for the next step (the "misalignment");
    * "dc": DC-Solver, UniPC with the newest buffered prediction replaced before each predictor by
      m^_{i-1} = sum_k l_k(t') m_{i-1-k}, t' = rho_i t_{i-1} + (1 - rho_i) t_{i-2} (DC-Solver Sec. 3.2,
      reference/dc_solver.md Sec. 1.5); rho_1 = rho_2 = 1 always (three predictions are needed).

    Deviations from the official code: only the data-prediction form (`predict_x0=True`, what every DC-Solver
    experiment uses) is implemented, without dynamic thresholding; for order < 3 the buffer still holds three
    predictions so that DC acts (as diffusers' DC scheduler; the LDM code silently disables DC there).

    One `jax.jit` per solver configuration: the noise, the ratios, the guidance labels and scale, and the arrays
    of a `jax.tree_util.Partial` model are traced, so new values of any of them never recompile. Bad input
    raises before anything is traced; a non-finite model output raises `FloatingPointError` after the run
    (checked on the device, one flag).

    Args:
      eps_fn: the noise prediction `eps_fn(x, t)` with x of x_T's shape and scalar continuous t (with guidance:
        `eps_fn(x, t, labels)`, `labels=None` meaning unconditional). A `jax.tree_util.Partial` keeps its
        arrays as traced inputs (see `GaussianMixture.eps_fn`); any other callable is a static part of the
        compiled function (a new callable object recompiles).
      x_T: initial noise, (B, ...) float.
      schedule: the VP schedule.
      nfe: number of steps = model evaluations of the multistep solvers.
      solver: one of "ddim", "dpmsolver++", "unipc", "dc".
      order: the multistep order (1-3); must not exceed nfe.
      variant: UniPC's B(h): "bh1" (B(h) = -h, the LDM default) or "bh2" (B(h) = e^{-h} - 1).
      ratios: (nfe,) compensation ratios for "dc" (required) or "dpmsolver++" (optional plug-in).
      spacing: time grid, one of `models.diffusion.SPACINGS` ("time_uniform" as the paper's experiments).
      guidance: `Guidance(labels, scale)` for classifier-free guidance, or None.
      lower_order_final: lower the order on the final steps (official default True).
      use_corrector: UniPC's corrector (False gives the predictor-only UniP).
      disable_corrector: step indices without corrector (diffusers' option).
      dpm_solver_type: "midpoint" or "heun" for DPM-Solver++ 2M.

    Returns:
      x_0, of x_T's shape and dtype.

    Example:
      >>> sched = diffusion.VPSchedule.named("sd_scaled_linear")
      >>> gm = diffusion.GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.2, 0.2])
      >>> x0 = sample(gm.eps_fn(sched), jnp.ones((4, 1)), sched, nfe=5, solver="unipc")
    """
    _check_common(x_T, schedule, nfe, order, solver, variant, spacing)
    ratios = _check_ratios(ratios, solver, nfe)
    _check_eps_fn(eps_fn, guidance)
    plan = plan_for(
        schedule,
        nfe=nfe,
        solver=solver,
        order=order,
        variant=variant,
        dpm_solver_type=dpm_solver_type,
        spacing=spacing,
        lower_order_final=lower_order_final,
        use_corrector=use_corrector,
        disable_corrector=disable_corrector,
    )
    x_T = jnp.asarray(x_T)
    dc = ratios is not None
    if ratios is None:
        ratios = np.ones(nfe)
    x, _, bad = _sample_jit(_as_partial(eps_fn), x_T, _jnp_plan(plan), ratios, guidance, dc, False)
    _raise_non_finite(bad, plan, f"sample(solver={solver!r}, nfe={nfe})")
    return x


def sample_with_trajectory(eps_fn, x_T, schedule, *, ts, solver="ddim", order=1, guidance=None):
    """Runs `solver` on an explicit time grid `ts` (nfe + 1,) and returns (x_0, states after each step).

    Used for the many-step DDIM ground truth; `ts` may be any decreasing grid.
    """
    ts = np.asarray(ts, dtype=np.float64)
    nfe = ts.shape[0] - 1
    _check_common(x_T, schedule, nfe, order, solver, "bh1", "time_uniform")
    _check_eps_fn(eps_fn, guidance)
    plan = ds.make_plan(schedule, ts, solver=solver, order=order)
    x_T = jnp.asarray(x_T)
    x, traj, bad = _sample_jit(
        _as_partial(eps_fn), x_T, _jnp_plan(plan), np.ones(nfe), guidance, False, True
    )
    _raise_non_finite(bad, plan, f"sample_with_trajectory(solver={solver!r}, nfe={nfe})")
    return x, traj


# ------------------------------------------------------------------------------- ground truth


def ddim_reference(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    ts: np.ndarray,
    *,
    steps: int = 200,
    mode: str = "aligned",
    guidance: Guidance | None = None,
) -> jax.Array:
    """The many-step DDIM ground truth x^GT at the solver's grid times t_1 .. t_nfe, shape (nfe, *x_T.shape).

    * mode="aligned" (default): DDIM on a grid that refines each solver interval [t_i, t_{i+1}] uniformly in t
      into ceil(steps / nfe) sub-steps, so the targets sit exactly at the solver's times.
    * mode="ldm": the official LDM quirk (reference/dc_solver.md Sec. 1.6, 5.1): the 200-step DDIM of
      CompVis (timesteps 1 + c n, c = N // steps) started from x_T at timestep 1 + c (steps - 1), states
      labelled ref_t = timestep / N (one step early), and the target of t_{i+1} is the state with the largest
      index j such that ref_t[j] > t_{i+1} (nearest from above, strict). Discrete schedules only.

    Args:
      eps_fn, x_T, schedule, guidance: as for `sample`.
      ts: the solver's grid (nfe + 1,).
      steps: the number of DDIM steps (200 in the official code; 999 in its README demo).
      mode: one of `GT_MODES`.
    """
    if mode not in GT_MODES:
        raise ValueError(f"unknown ground-truth mode {mode!r}; choose one of {list(GT_MODES)}")
    ts = np.asarray(ts, dtype=np.float64)
    nfe = ts.shape[0] - 1
    if mode == "aligned":
        sub = max(1, math.ceil(steps / nfe))
        fine = np.concatenate(
            [np.linspace(ts[i], ts[i + 1], sub + 1)[:-1] for i in range(nfe)] + [ts[-1:]]
        )
        _, traj = sample_with_trajectory(eps_fn, x_T, schedule, ts=fine, guidance=guidance)
        return traj[sub - 1 :: sub]
    if schedule.kind != "discrete":
        raise ValueError(
            "mode='ldm' reproduces CompVis' discrete DDIM and needs a discrete schedule"
        )
    n = schedule.total_n
    c = n // steps
    ts_int = (np.arange(0, n, c) + 1)[::-1]  # CompVis make_ddim_timesteps('uniform') + 1
    fine = np.concatenate([(ts_int + 1.0) / n, [1.0 / n]])
    _, traj = sample_with_trajectory(eps_fn, x_T, schedule, ts=fine, guidance=guidance)
    states = jnp.concatenate([jnp.asarray(x_T)[None], traj[:-1]], axis=0)  # x_inter[:-1]
    ref_ts = ts_int / n
    idx = [ldm_reference_index(ref_ts, t) for t in ts[1:]]
    return states[np.asarray(idx)]


def ldm_reference_index(ref_ts: np.ndarray, t: float) -> int:
    """The official lookup `max{j : ref_ts[j] > t}` (strict) of the LDM search."""
    hits = np.where(np.asarray(ref_ts) > t)[0]
    if hits.size == 0:
        raise ValueError(f"no reference time above t={t}")
    return int(hits.max())


# ------------------------------------------------------------------------------- ratio search


@functools.partial(jax.jit, static_argnames=("dc", "num_iters", "lr", "weight_decay"))
def _search_jit(eps_fn, x_T, plan, targets, guidance, init, dc, num_iters, lr, weight_decay):
    del dc
    nfe = plan.pred_x.shape[0]
    dtype = x_T.dtype
    rows = ds._rows(plan, dtype)
    buf, finite0 = ds.initial_buffer(eps_fn, guidance, x_T, plan)
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)

    def optimise(x, buf, row, target, evaluate):
        def loss_fn(ratio):
            x_next, _, _ = ds.step(eps_fn, guidance, x, buf, row, ratio, dc=True, evaluate=evaluate)
            return jnp.mean((x_next - target) ** 2)

        def it(carry, _):
            ratio, state = carry
            loss, grad = jax.value_and_grad(loss_fn)(ratio)
            updates, state = opt.update(grad, state, ratio)
            return (optax.apply_updates(ratio, updates), state), loss

        ratio0 = jnp.asarray(init, dtype)
        (ratio, _), losses = jax.lax.scan(it, (ratio0, opt.init(ratio0)), None, length=num_iters)
        return ratio, losses

    def searched(x, buf, row, target, evaluate):
        return jax.lax.cond(
            row["dc_valid"],
            lambda: optimise(x, buf, row, target, evaluate),
            lambda: (jnp.asarray(init, dtype), jnp.zeros(num_iters, dtype)),
        )

    def body(carry, inputs):
        x, buf, bad = carry
        row, target, i = inputs
        ratio, losses = searched(x, buf, row, target, True)
        x_next, buf, finite = ds.step(eps_fn, guidance, x, buf, row, ratio, dc=True, evaluate=True)
        bad = jnp.where((bad < 0) & ~finite, i + 1, bad)
        return (x_next, buf, bad), (ratio, losses)

    head = jax.tree.map(lambda a: a[: nfe - 1], rows)
    (x, buf, bad), (ratios, losses) = jax.lax.scan(
        body, (x_T, buf, jnp.where(finite0, -1, 0)), (head, targets[: nfe - 1], jnp.arange(nfe - 1))
    )
    last = ds._slice(rows, nfe - 1)
    r_last, l_last = searched(x, buf, last, targets[nfe - 1], False)
    ratios = jnp.concatenate([ratios, r_last[None]])
    losses = jnp.concatenate([losses, l_last[None]])
    return ratios, losses, bad


def search_ratios(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    *,
    nfe: int,
    solver: str = "dc",
    order: int = 3,
    variant: str = "bh1",
    spacing: str = "time_uniform",
    guidance: Guidance | None = None,
    targets: jax.Array | None = None,
    gt_steps: int = 200,
    gt_mode: str = "aligned",
    num_iters: int = 40,
    lr: float = 0.1,
    weight_decay: float = 0.01,
    init: float = 1.0,
    lower_order_final: bool = True,
    use_corrector: bool = True,
    disable_corrector: Sequence[int] = (),
    return_losses: bool = False,
):
    """Greedy search of the compensation ratios, step by step (DC-Solver Sec. 3.3, reference Sec. 1.6).

    At step i, with rho_1 .. rho_{i-1} fixed and applied, rho_i minimises

        L(rho) = mean || x_{i+1}(rho) - x^GT_{t_{i+1}} ||^2

    over the datapoints (the paper uses 10 noises with their conditions), where x_{i+1}(rho) is the UniPC step
    (predictor, a fresh model evaluation at its output, corrector; predictor alone on the last step) from the
    compensated buffer. The gradient flows through that model evaluation. The optimiser is AdamW (lr 0.1,
    betas (0.9, 0.999), eps 1e-8, weight decay 0.01: torch's defaults, as the official code), started from
    rho = 1 at every step, run `num_iters` times (40, the LDM code; diffusers' script uses 20), and the last
    iterate is kept. rho_1 = rho_2 = 1. Not reproduced: diffusers' optional `bound_func='tanh'`
    reparametrisation, and (by default) the official nearest-neighbour ground-truth lookup (`gt_mode="ldm"`
    reproduces it). The whole search is one `jax.jit`: a scan over steps, each a scan of
    optimiser iterations.

    Args:
      eps_fn, x_T, schedule, order, variant, spacing, guidance, lower_order_final, use_corrector,
        disable_corrector: as for `sample` (x_T: the search datapoints, guidance: their conditions and scale).
      nfe: number of steps.
      solver: "dc" (UniPC + DC) or "dpmsolver++" (DC as a plug-in on the predictor-only solver).
      targets: optional ground truth (nfe, *x_T.shape) at t_1 .. t_nfe; default `ddim_reference(...,
        steps=gt_steps, mode=gt_mode)`.
      gt_steps: DDIM steps of the ground truth (200 as the official code).
      gt_mode: "aligned" or "ldm" (see `ddim_reference`).
      num_iters: optimiser iterations per step.
      lr, weight_decay: AdamW's.
      init: the starting ratio of every step.
      return_losses: also return the loss of every iteration, (nfe, num_iters).

    Returns:
      ratios as a float64 numpy array (nfe,) (and the losses if asked).
    """
    if solver not in ("dc", "dpmsolver++"):
        raise ValueError(f"search_ratios supports solver 'dc' or 'dpmsolver++', got {solver!r}")
    _check_common(x_T, schedule, nfe, order, solver, variant, spacing)
    _check_eps_fn(eps_fn, guidance)
    if int(num_iters) < 1:
        raise ValueError(f"num_iters={num_iters} must be at least 1")
    plan = plan_for(
        schedule,
        nfe=nfe,
        solver=solver,
        order=order,
        variant=variant,
        spacing=spacing,
        lower_order_final=lower_order_final,
        use_corrector=use_corrector,
        disable_corrector=disable_corrector,
    )
    x_T = jnp.asarray(x_T)
    if targets is None:
        targets = ddim_reference(
            eps_fn, x_T, schedule, plan.ts, steps=gt_steps, mode=gt_mode, guidance=guidance
        )
    if tuple(np.shape(targets)) != (nfe, *x_T.shape):
        raise ValueError(
            f"targets must have shape {(nfe, *x_T.shape)} (the state at t_1..t_nfe), got "
            f"{tuple(np.shape(targets))}"
        )
    ratios, losses, bad = _search_jit(
        _as_partial(eps_fn),
        x_T,
        _jnp_plan(plan),
        jnp.asarray(targets, x_T.dtype),
        guidance,
        float(init),
        True,
        int(num_iters),
        float(lr),
        float(weight_decay),
    )
    _raise_non_finite(bad, plan, f"search_ratios(nfe={nfe})")
    ratios = np.asarray(ratios, dtype=np.float64)
    if not np.all(np.isfinite(ratios)):
        raise FloatingPointError(f"the ratio search diverged: ratios {ratios}")
    return (ratios, np.asarray(losses)) if return_losses else ratios


# ---------------------------------------------------------------------- cascade polynomial regression

CPR_SHAPE = (4, 3, 3)  # (power of i/NFE: 0..3, CFG term: c^2, c, 1, NFE term: n^2, n, 1)


def cpr_features(cfg: float, nfe: int, step: int) -> np.ndarray:
    """The 36 monomials multiplying the CPR coefficients, in the official (4, 3, 3) layout, flattened.

    rho^_i = sum_j P_j x^j, P_j = A_j0 c^2 + A_j1 c + A_j2, A_jq = C_jq0 n^2 + C_jq1 n + C_jq2 with
    c = CFG / 12, n = NFE / 50, x = i / NFE, i the 1-based step (DC-Solver Sec. 3.4; reference Sec. 1.7), so
    the feature of C[j, q, r] is x^j c^(2 - q) n^(2 - r).
    """
    c, n, x = cfg / 12.0, nfe / 50.0, step / nfe
    xp = x ** np.arange(4)
    cp = c ** np.array([2.0, 1.0, 0.0])
    nn_ = n ** np.array([2.0, 1.0, 0.0])
    return (xp[:, None, None] * cp[None, :, None] * nn_[None, None, :]).reshape(-1)


def cpr_predict(coeffs, cfg: float, nfe: int) -> np.ndarray:
    """Ratios predicted by cascade polynomial regression for (CFG, NFE): (nfe,), the first two equal 1.

    Args:
      coeffs: 36 coefficients in the official layout (`sd2.1.npy` of DC-Solver; reshape (4, 3, 3)).
      cfg: guidance scale.
      nfe: number of steps.

    Example (the official SD 2.1 coefficients): CFG 7.5, NFE 5 gives [1, 1, 1.0271, 0.7392, 1.2263].
    """
    coeffs = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if coeffs.shape != (36,):
        raise ValueError(
            f"CPR coefficients must be 36 numbers ((4, 3, 3) flattened), got {coeffs.size}"
        )
    if int(nfe) < 1:
        raise ValueError(f"nfe={nfe} must be a positive integer")
    out = np.array([cpr_features(cfg, nfe, i) @ coeffs for i in range(1, nfe + 1)])
    out[: min(2, nfe)] = 1.0
    return out


def cpr_fit(
    settings: Sequence[tuple[float, int]], ratios: Sequence, *, ridge: float = 0.0
) -> np.ndarray:
    """Fits the 36 CPR coefficients to searched ratios by least squares.

    The model is linear in its coefficients, so the fit is one (regularised) linear least-squares problem over
    every searched step i >= 3 of every setting (the first two ratios are fixed to 1 and carry no information).
    The official fit used `scipy.optimize.curve_fit` on pairs not published; on a linear model it has the same
    minimiser. With too few distinct settings the system is rank-deficient and the minimum-norm solution is
    returned: use at least 3 NFEs x 3 CFGs (and NFE >= 6 somewhere, for the cubic in i/NFE), or set `ridge`.

    Args:
      settings: (cfg, nfe) for each searched setting.
      ratios: the searched ratios of each setting, (nfe,) each.
      ridge: optional L2 penalty on the coefficients.

    Returns:
      (36,) coefficients in the official layout.
    """
    if len(settings) != len(ratios) or not settings:
        raise ValueError(
            f"need one ratio vector per setting; got {len(settings)} settings, {len(ratios)} vectors"
        )
    rows, targets = [], []
    for (cfg, nfe), r in zip(settings, ratios, strict=True):
        r = np.asarray(r, dtype=np.float64)
        if r.shape != (nfe,):
            raise ValueError(
                f"ratios for (cfg={cfg}, nfe={nfe}) must have shape ({nfe},), got {r.shape}"
            )
        for i in range(3, nfe + 1):
            rows.append(cpr_features(cfg, nfe, i))
            targets.append(r[i - 1])
    a, y = np.asarray(rows), np.asarray(targets)
    if ridge > 0:
        a = np.concatenate([a, math.sqrt(ridge) * np.eye(36)])
        y = np.concatenate([y, np.zeros(36)])
    coeffs, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coeffs
