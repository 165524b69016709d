"""The greedy search of DC-Solver's compensation ratios (Sec. 3.3) and its many-step DDIM ground truth.

The search runs the samplers' own scan (`solvers.run`): at each step the ratio is not given but optimised against
the ground truth, then applied, and the scan moves on. The whole search is one `jax.jit`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from theorax.inference.dc_solver import _checks, solvers
from theorax.inference.dc_solver.config import SolverConfig, solver_config
from theorax.inference.dc_solver.sampling import sample_with_trajectory
from theorax.inference.dc_solver.solvers import Guidance
from theorax.models import diffusion

__all__ = ["GT_MODES", "ddim_reference", "ldm_reference_index", "search_ratios"]

GT_MODES = ("aligned", "ldm")


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

    Example:
      >>> import jax.numpy as jnp
      >>> from theorax.inference.dc_solver import ddim_reference
      >>> from theorax.models.diffusion import GaussianMixture, VPSchedule, time_steps
      >>> schedule = VPSchedule.named("sd_scaled_linear")
      >>> mixture = GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.2, 0.2])
      >>> ddim_reference(mixture.eps_fn(schedule), jnp.ones((4, 1)), schedule, time_steps(schedule, 5),
      ...                steps=50).shape
      (5, 4, 1)
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
    """The official lookup `max{j : ref_ts[j] > t}` (strict) of the LDM search.

    Example:
      >>> import numpy as np
      >>> from theorax.inference.dc_solver import ldm_reference_index
      >>> ldm_reference_index(np.array([0.9, 0.5, 0.1]), 0.5)
      0
    """
    hits = np.where(np.asarray(ref_ts) > t)[0]
    if hits.size == 0:
        raise ValueError(f"no reference time above t={t}")
    return int(hits.max())


# ------------------------------------------------------------------------------- ratio search


@functools.partial(jax.jit, static_argnames=("num_iters", "lr", "weight_decay"))
def _search_jit(eps_fn, x_T, plan, targets, guidance, init, num_iters, lr, weight_decay):
    dtype = x_T.dtype
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)

    def optimise(x, buf, row, target, evaluate):
        def loss_fn(ratio):
            x_next, _, _ = solvers.step(
                eps_fn, guidance, x, buf, row, ratio, dc=True, evaluate=evaluate
            )
            return jnp.mean((x_next - target) ** 2)

        def it(carry, _):
            ratio, state = carry
            loss, grad = jax.value_and_grad(loss_fn)(ratio)
            updates, state = opt.update(grad, state, ratio)
            return (optax.apply_updates(ratio, updates), state), loss

        ratio0 = jnp.asarray(init, dtype)
        (ratio, _), losses = jax.lax.scan(it, (ratio0, opt.init(ratio0)), None, length=num_iters)
        return ratio, losses

    def searched_ratio(x, buf, row, target, *, evaluate):
        """The ratio rule of the search: AdamW on this step's loss where DC acts, `init` elsewhere.

        Returns the ratio, and (the ratio, its losses) as this step's output."""
        ratio, losses = jax.lax.cond(
            row["dc_valid"],
            lambda: optimise(x, buf, row, target, evaluate),
            lambda: (jnp.asarray(init, dtype), jnp.zeros(num_iters, dtype)),
        )
        return ratio, (ratio, losses)

    _, _, (ratios, losses), bad = solvers.run(
        eps_fn, x_T, plan, targets, guidance, searched_ratio, dc=True
    )
    return ratios, losses, bad


def search_ratios(
    eps_fn: Callable,
    x_T: jax.Array,
    schedule: diffusion.VPSchedule,
    *,
    nfe: int,
    solver: str | SolverConfig = "dc",
    guidance: Guidance | None = None,
    targets: jax.Array | None = None,
    gt_steps: int = 200,
    gt_mode: str = "aligned",
    num_iters: int = 40,
    lr: float = 0.1,
    weight_decay: float = 0.01,
    init: float = 1.0,
    return_losses: bool = False,
    **options,
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
    reproduces it). The whole search is one `jax.jit`: the samplers' scan over steps, each step a scan of
    optimiser iterations; it compiles as `sample` does (new datapoints, conditions and guidance scales reuse
    the program).

    Args:
      eps_fn, x_T, schedule, guidance, **options: as for `sample` (x_T: the search datapoints, guidance: their
        conditions and scale).
      nfe: number of steps.
      solver: "dc" (UniPC + DC) or "dpmsolver++" (DC as a plug-in on the predictor-only solver), or a
        `SolverConfig` of one of them.
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
    config = solver_config(solver, **options)
    if config.solver not in ("dc", "dpmsolver++"):
        raise ValueError(
            f"search_ratios supports solver 'dc' or 'dpmsolver++', got {config.solver!r}"
        )
    _checks.check_schedule(schedule)
    plan = solvers.make_plan(config, schedule, config.time_steps(schedule, nfe))
    x_T = _checks.noise(x_T)
    eps_fn, guidance = _checks.eps_fn_and_guidance(eps_fn, guidance, x_T.dtype)
    if int(num_iters) < 1:
        raise ValueError(f"num_iters={num_iters} must be at least 1")
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
        eps_fn,
        x_T,
        plan,
        jnp.asarray(targets, x_T.dtype),
        guidance,
        float(init),
        int(num_iters),
        float(lr),
        float(weight_decay),
    )
    _checks.raise_non_finite(bad, plan.ts, f"search_ratios(nfe={nfe})")
    ratios = np.asarray(ratios, dtype=np.float64)
    if not np.all(np.isfinite(ratios)):
        raise FloatingPointError(f"the ratio search diverged: ratios {ratios}")
    return (ratios, np.asarray(losses)) if return_losses else ratios
