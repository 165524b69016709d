"""Scoring approximate posteriors against each task's exact or near-exact reference.

Two estimators of the expected KL E_z KL(p(. | z) || q(. | z)) (reference notes Sec. 5(c)), both in the GMM's
sample space (KL is invariant to the shared bijection f, so this is also the KL in the latent's own space):

* `monte_carlo_kl`: per problem, sample the exact posterior and average log p - log q. Needs a sampler of the
  exact posterior (tasks (a) and (b)).
* `gap_kl`: per problem, log p(y_true | z) - log q(y_true | z) at the true latent of the generating triple;
  its mean over problems is an unbiased estimate of the expected KL and only needs the reference density
  (tasks (a), (b), (d), (e)).

References: (a) the exact GMM posterior, (b) the conjugate inverse-gamma posterior on log sigma^2, (d) the GP
posterior over (y*, log l) normalised by quadrature, (e) the posterior over logit delta normalised by quadrature
with each measurement's success probability averaged over common random draws of (t, psi0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betaln
from theorax.inference.distribution_transformer import exact
from theorax.models.distribution_transformer import tasks as dt_tasks
from theorax.models.distribution_transformer.tasks import Problem
from theorax.models.gmm import GMM


def exact_gmm_posterior(task: dt_tasks.GMMLinearGaussianTask, problem: Problem) -> GMM:
    """Task (a): the exact posterior GMM after all of the problem's observations (stacked update)."""
    H, R, z = exact.stack_observations(task.H, task.R, problem.observations["z"])
    return exact.linear_gaussian_posterior(problem.prior, H, R, z)


def inverse_gamma_posterior_params(task: dt_tasks.InverseGammaTask, problem: Problem):
    """Task (b): (alpha', beta') of the conjugate posterior."""
    return exact.inverse_gamma_posterior(
        problem.info["alpha"], problem.info["beta"], problem.observations["z"][..., 0], task.loc
    )


# ---------------------------------------------------------------------------------------- quantum reference


QUANTUM_GRID = (-40.0, 40.0, 2001)
GP_GRID = (math.log(1e-3), math.log(20.0), 3001)


@functools.lru_cache(maxsize=8)
def quantum_success_grid(task: dt_tasks.QuantumTask, num_draws: int = 4096, seed: int = 12345):
    """p_j(delta) = E_{t, psi0}[|<0| e^{-i H t} psi0|^2] on the grid `QUANTUM_GRID` of u = logit delta.

    Averaged over `num_draws` common random draws of (t, psi0), the same for every grid point, so p_j is a
    smooth deterministic function of delta. Returns numpy `(grid [G], p [G, J])`; cached per task.
    """
    lo, hi, n = QUANTUM_GRID
    grid = jnp.linspace(lo, hi, n)
    key = jax.random.key(seed)
    p = jax.lax.map(
        lambda u: task.success_probability(key, jax.nn.sigmoid(u), num_draws), grid, batch_size=32
    )
    return np.asarray(grid), np.clip(np.asarray(p), 1e-7, 1 - 1e-7)


def quantum_log_likelihood(task: dt_tasks.QuantumTask, u, z):
    """log p(z | delta) = sum_j z_j log p_j(delta) + (1 - z_j) log(1 - p_j(delta)) at u = logit delta.

    `u` `[*S, B]`, `z` `[B, J]` -> `[*S, B]`; p_j is linearly interpolated from `quantum_success_grid`.
    """
    grid, p = quantum_success_grid(task)
    pj = jnp.stack([jnp.interp(u, grid, p[:, j]) for j in range(p.shape[1])], -1)
    return jnp.sum(z * jnp.log(pj) + (1 - z) * jnp.log1p(-pj), -1)


def logit_beta_log_prob(u, c1, c0):
    """Density of u = logit delta, delta ~ Beta(c1, c0): c1 log s(u) + c0 log s(-u) - log B(c1, c0)."""
    return c1 * jax.nn.log_sigmoid(u) + c0 * jax.nn.log_sigmoid(-u) - betaln(c1, c0)


def _quantum_log_posterior(task, problem, u):
    c1, c0, z = problem.info["c1"], problem.info["c0"], problem.info["z"]
    grid, p = quantum_success_grid(task)
    grid = jnp.asarray(grid)
    log_lik_grid = jnp.log(p) @ z.T + jnp.log1p(-p) @ (1 - z).T  # [G, B]
    log_prior_grid = logit_beta_log_prob(grid[:, None], c1, c0)
    log_z = exact.log_normalizer_1d(lambda g: log_prior_grid + log_lik_grid, grid)
    return logit_beta_log_prob(u, c1, c0) + quantum_log_likelihood(task, u, z) - log_z


# ------------------------------------------------------------------------------------------- references


def gp_reference_marginals(task: dt_tasks.GPHyperpriorTask, problem: Problem, y: jax.Array):
    """Task (d): log p(y* | D) and log p(log l | D) of the near-exact posterior at `y` `[*S, B, 2]`."""
    i = problem.info
    lo, hi, n = GP_GRID
    return exact.gp_hyperprior_log_marginals(
        y[..., 0],
        y[..., 1],
        i["x"],
        i["y"],
        i["x_star"],
        i["m"],
        i["s"],
        noise_var=task.noise_var,
        ls_shape=task.ls_shape,
        ls_rate=task.ls_rate,
        grid=jnp.linspace(lo, hi, n),
    )


def has_exact_sampler(task) -> bool:
    return isinstance(task, dt_tasks.GMMLinearGaussianTask | dt_tasks.InverseGammaTask)


def reference_log_prob(task, problem: Problem, y: jax.Array) -> jax.Array:
    """log p(y | z, phi) of the (near-)exact posterior in the GMM's sample space, `y` `[*S, B, d]` ->
    `[*S, B]`. Raises `ValueError` for tasks without one (sensor fusion: use a particle filter)."""
    if isinstance(task, dt_tasks.GMMLinearGaussianTask):
        return exact_gmm_posterior(task, problem).log_prob(y)
    if isinstance(task, dt_tasks.InverseGammaTask):
        a, b = inverse_gamma_posterior_params(task, problem)
        return exact.inverse_gamma_log_prob_log_space(y[..., 0], a, b)
    if isinstance(task, dt_tasks.GPHyperpriorTask):
        i = problem.info
        lo, hi, n = GP_GRID
        return exact.gp_hyperprior_log_posterior(
            y[..., 0],
            y[..., 1],
            i["x"],
            i["y"],
            i["x_star"],
            i["m"],
            i["s"],
            noise_var=task.noise_var,
            ls_shape=task.ls_shape,
            ls_rate=task.ls_rate,
            grid=jnp.linspace(lo, hi, n),
        )
    if isinstance(task, dt_tasks.QuantumTask):
        return _quantum_log_posterior(task, problem, y[..., 0])
    raise ValueError(f"no exact reference density for task {type(task).__name__}")


def reference_sample(task, problem: Problem, key: jax.Array, n: int) -> jax.Array:
    """n exact posterior draws in the sample space, `[n, B, d]` (tasks (a) and (b))."""
    if isinstance(task, dt_tasks.GMMLinearGaussianTask):
        return exact_gmm_posterior(task, problem).sample(key, n)
    if isinstance(task, dt_tasks.InverseGammaTask):
        a, b = inverse_gamma_posterior_params(task, problem)
        return exact.inverse_gamma_sample_log_space(key, a, b, n)[..., None]
    raise ValueError(f"no exact posterior sampler for task {type(task).__name__}")


def monte_carlo_kl(
    task, problem: Problem, q_log_prob, key: jax.Array, n: int = 10_000
) -> jax.Array:
    """Per-problem KL(p || q) `[B]` by `n` exact posterior draws; `q_log_prob` maps `[n, B, d]` -> `[n, B]`."""
    y = reference_sample(task, problem, key, n)
    return jnp.mean(reference_log_prob(task, problem, y) - q_log_prob(y), axis=0)


def gap_kl(task, problem: Problem, q_log_prob) -> jax.Array:
    """Per-problem log p(y_true | z) - log q(y_true | z) `[B]`; its mean estimates the expected KL."""
    y = problem.target
    return reference_log_prob(task, problem, y) - q_log_prob(y)
