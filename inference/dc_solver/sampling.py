"""Sampling: DDIM, DPM-Solver++, UniPC and DC-Solver, each one `jax.jit` of the scan in `solvers.run`.

DC-Solver (Zhao, Wang, Zhou, Lu; ECCV 2024) corrects the misalignment of UniPC's predictor-corrector: the
buffered data prediction m_{i-1} was evaluated at the predictor's output but is used next to the corrected state.
Before the predictor of step i it is replaced, permanently, by the order-2 Lagrange interpolant of the three newest
buffered predictions over t, taken at t' = rho_i t_{i-1} + (1 - rho_i) t_{i-2} (Sec. 3.2). The ratios rho come
from `search_ratios` (Sec. 3.3) or `cpr_predict` (Sec. 3.4).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.dc_solver import _checks, solvers
from theorax.inference.dc_solver.config import SolverConfig, solver_config
from theorax.inference.dc_solver.solvers import Guidance
from theorax.models import diffusion

__all__ = ["lower_sample", "sample", "sample_with_trajectory"]


# `sample` unrolls its steps up to this many (a program per plan); longer grids (the many-step DDIM ground
# truth of the search goes through `sample_with_trajectory`) run the scan.
MAX_UNROLLED_STEPS = 64


@functools.partial(jax.jit, static_argnames=("dc", "trajectory"))
def _sample_jit(eps_fn, x_T, plan, ratios, guidance, dc, trajectory):
    ratios = jnp.asarray(ratios, x_T.dtype)
    x, traj, _, bad = solvers.run(eps_fn, x_T, plan, ratios, guidance, dc=dc, trajectory=trajectory)
    return x, traj, bad


class _ByIdentity:
    """A static jit argument that hashes and compares by the identity of what it holds. Plans are cached by
    value (`make_plan`), so equal plans are one object and share a program."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.value is self.value


@functools.partial(jax.jit, static_argnames=("plan", "dc"))
def _sample_unrolled_jit(eps_fn, x_T, ratios, dc_times, guidance, plan, dc):
    ratios, dc_times = jnp.asarray(ratios, x_T.dtype), jnp.asarray(dc_times, x_T.dtype)
    return solvers.run_unrolled(eps_fn, x_T, plan.value, ratios, guidance, dc=dc, dc_times=dc_times)


def _unrolled_call(eps_fn, x_T, plan: solvers.Plan, config: SolverConfig, ratios, guidance):
    """Checks and normalises the inputs; returns (the unrolled program, its arguments), or None when the plan
    has more than `MAX_UNROLLED_STEPS` steps, and the normalised (eps_fn, x_T, ratios, guidance, dc).

    Unrolled, the solvers that take ratios (UniPC through "dc", DPM-Solver++) always run with the compensation,
    unit ratios when none are given: XLA:CPU contracts a * b + c into fused multiply-adds as each fused loop's
    expression allows, so a program without the compensation could round differently from the one with unit
    ratios, which must give the same numbers (rho = 1 is exactly no compensation)."""
    x_T = _checks.noise(x_T)
    ratios = _checks.ratios(ratios, config.solver, plan.nfe)
    eps_fn, guidance = _checks.eps_fn_and_guidance(eps_fn, guidance, x_T.dtype)
    dc = ratios is not None
    ratios = np.ones(plan.nfe) if ratios is None else ratios
    normalised = (eps_fn, x_T, ratios, guidance, dc)
    if plan.nfe > MAX_UNROLLED_STEPS:
        return None, normalised
    compensable = config.solver != "ddim"
    args = (eps_fn, x_T, ratios, plan.dc_times, guidance, _ByIdentity(plan), compensable)
    return (_sample_unrolled_jit, args), normalised


def _solve(eps_fn, x_T, plan: solvers.Plan, config: SolverConfig, ratios, guidance, *, trajectory):
    """What `sample` and `sample_with_trajectory` share past the grid: check, normalise, run, check.

    Without a trajectory and for at most `MAX_UNROLLED_STEPS` steps, the steps run unrolled with the plan
    folded into the program (`solvers.run_unrolled`); when its output is not finite, the scan reruns the same
    sampler to name the first non-finite model evaluation."""
    call, (eps_fn, x_T, ratios, guidance, dc) = _unrolled_call(
        eps_fn, x_T, plan, config, ratios, guidance
    )
    if not trajectory and call is not None:
        fn, args = call
        x, finite = fn(*args)
        if finite:
            return x, None
    x, traj, bad = _sample_jit(eps_fn, x_T, plan, ratios, guidance, dc, trajectory)
    name = "sample_with_trajectory" if trajectory else "sample"
    _checks.raise_non_finite(bad, plan.ts, f"{name}(solver={config.solver!r}, nfe={plan.nfe})")
    return x, traj


def lower_sample(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    *,
    nfe: int,
    solver: str | SolverConfig,
    ratios=None,
    guidance: Guidance | None = None,
    **options,
) -> jax.stages.Lowered:
    """The program `sample` runs for these arguments, lowered and not yet compiled (`.compile()` gives its
    `memory_analysis()` and `cost_analysis()`, `.as_text()` its HLO). Same arguments as `sample`.

    Example:
      >>> import jax.numpy as jnp
      >>> from theorax.inference.dc_solver import lower_sample
      >>> from theorax.models.diffusion import GaussianMixture, VPSchedule
      >>> schedule = VPSchedule.named("sd_scaled_linear")
      >>> mixture = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.2, 0.2])
      >>> compiled = lower_sample(mixture.eps_fn(schedule), jnp.ones((4, 1)), schedule, nfe=5,
      ...                         solver="unipc").compile()
      >>> compiled.memory_analysis().output_size_in_bytes >= 4 * 4  # x_0 (4, 1) float32 and a flag
      True
    """
    config = solver_config(solver, **options)
    _checks.check_schedule(schedule)
    plan = solvers.make_plan(config, schedule, config.time_steps(schedule, nfe))
    call, (eps_fn, x_T, ratios, guidance, dc) = _unrolled_call(
        eps_fn, x_T, plan, config, ratios, guidance
    )
    if call is None:
        return _sample_jit.lower(eps_fn, x_T, plan, ratios, guidance, dc, False)
    fn, args = call
    return fn.lower(*args)


def sample(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    *,
    nfe: int,
    solver: str | SolverConfig,
    ratios=None,
    guidance: Guidance | None = None,
    **options,
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

    Compilation: one program per solver config, shapes and model function. The noise, the ratios, the guidance
    labels and scale, and the arrays bound in a `jax.tree_util.Partial` model are traced inputs, so new values
    never recompile; ratios given as a list, numpy float64 (what `search_ratios` returns) or a jnp float32 array
    share one program, as do Python and numpy guidance scales. The model's function itself is part of the
    program: `mixture.eps_fn(schedule)` or `jax.tree_util.Partial(f, params)` with the same `f` reuse it, while
    a new callable object (a `lambda` written in a loop, a fresh `functools.partial`) compiles anew. Bad input
    raises before anything is traced; a non-finite model output raises `FloatingPointError` after the run
    (checked on the device, one flag).

    Args:
      eps_fn: the noise prediction `eps_fn(x, t)` with x of x_T's shape and scalar continuous t (with guidance:
        `eps_fn(x, t, labels)`, `labels=None` meaning unconditional).
      x_T: initial noise, (B, ...) float.
      schedule: the VP schedule.
      nfe: number of steps = model evaluations of the multistep solvers; at least the order.
      solver: a `SolverConfig`, or the name of a solver ("ddim", "dpmsolver++", "unipc", "dc") with its options
        as keywords.
      ratios: (nfe,) compensation ratios for "dc" (required) or "dpmsolver++" (optional plug-in).
      guidance: `Guidance(labels, scale)` for classifier-free guidance, or None.
      **options: the `SolverConfig` fields when `solver` is a name: `order` (3), `variant` ("bh1"), `spacing`
        ("time_uniform"), `lower_order_final` (True), `use_corrector` (True), `disable_corrector` (()),
        `dpm_solver_type` ("midpoint").

    Returns:
      x_0, of x_T's shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from theorax.inference.dc_solver import sample
      >>> from theorax.models.diffusion import GaussianMixture, VPSchedule
      >>> schedule = VPSchedule.named("sd_scaled_linear")
      >>> mixture = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.2, 0.2])
      >>> x0 = sample(mixture.eps_fn(schedule), jnp.ones((4, 1)), schedule, nfe=5, solver="unipc")
      >>> x0.shape
      (4, 1)
    """
    config = solver_config(solver, **options)
    _checks.check_schedule(schedule)
    plan = solvers.make_plan(config, schedule, config.time_steps(schedule, nfe))
    return _solve(eps_fn, x_T, plan, config, ratios, guidance, trajectory=False)[0]


def sample_with_trajectory(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    *,
    ts=None,
    nfe: int | None = None,
    solver: str | SolverConfig = "ddim",
    ratios=None,
    guidance: Guidance | None = None,
    **options,
) -> tuple[jax.Array, jax.Array]:
    """`sample` that also returns the state after every step: (x_0, trajectory (nfe, *x_T.shape)).

    The grid is either `nfe` steps with the config's spacing, as `sample`, or an explicit decreasing grid `ts`
    (nfe + 1,), such as the many-step DDIM ground truth's. The other arguments are as for `sample` (with DDIM
    as the default solver).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from theorax.inference.dc_solver import sample_with_trajectory
      >>> from theorax.models.diffusion import GaussianMixture, VPSchedule
      >>> schedule = VPSchedule.named("sd_scaled_linear")
      >>> mixture = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.2, 0.2])
      >>> x0, traj = sample_with_trajectory(
      ...     mixture.eps_fn(schedule), jnp.ones((4, 1)), schedule, ts=np.linspace(1.0, 0.001, 11))
      >>> traj.shape, bool(jnp.all(traj[-1] == x0))
      ((10, 4, 1), True)
    """
    config = solver_config(solver, **options)
    _checks.check_schedule(schedule)
    if (ts is None) == (nfe is None):
        raise ValueError(
            "give exactly one of ts (the grid) and nfe (steps with the config's spacing)"
        )
    ts = config.time_steps(schedule, nfe) if ts is None else ts
    plan = solvers.make_plan(config, schedule, ts)
    return _solve(eps_fn, x_T, plan, config, ratios, guidance, trajectory=True)
