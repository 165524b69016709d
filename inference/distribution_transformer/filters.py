"""Filtering for the 4-D sensor-fusion task (paper Sec. 4.3.1): the Distribution Transformer as a filter, a
bootstrap particle filter and an extended Kalman filter, each scored by the NLL of the true state.

All three run on a filtering task (`Task.filtering`; `SensorFusionTask`): its LTI motion model
x_{t+1} = A x_t + F eps (`task.dynamics`, Q = F F^T), and at every step t one reading of each sensor of x_t. Each
returns the per-step NLL -log q_t(x_t) of the filtering distribution after the step's update, `[T, B]`.

* `dt_filter` (the official `LTIFilter`): the task's initial prior (x0's Gaussian copied into k components with
  weights proportional to 1..k), then at each step a transformer update with the step's readings followed by the
  exact per-component predict (mu <- A mu, Sigma <- A Sigma A^T + Q), fed back as the next prior
  (`training.scan_updates`, the loop of `training.sequential_posterior`).
* `bootstrap_particle_filter`: propagate, weight by the task's exact likelihood, score with `kde_gmm` of the
  weighted particles, resample multinomially.
* `extended_kalman_filter`: Gaussian belief with the task's EKF observation model (for sensor fusion: the
  rangefinder replaced by its moment-matched Gaussian, the bearing residual wrapped), linearised at the
  predicted mean.

The last two are the task instances of two model-agnostic filters for any `exact.LinearGaussianDynamics` with a
Gaussian x0, which take the observation model as functions and return the filtering moments, the per-step
evidence and (given the true states) the NLL as a `FilterResult`:

* `particle_filter`: the bootstrap PF for any log-likelihood `(particles, observation) -> log p(z | x)`.
* `lti_extended_kalman_filter`: the EKF for any observation function h(x), noise covariance R(x) and residual
  (on a linear h with constant R it is exactly the Kalman filter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from theorax.inference.distribution_transformer.evaluation import kde_gmm
from theorax.inference.distribution_transformer.exact import LinearGaussianDynamics
from theorax.inference.distribution_transformer.tasks import Task
from theorax.inference.distribution_transformer.training import scan_updates
from theorax.models.gmm import GMM


def dt_filter(
    posterior_fn: Callable, params, task: Task, states, observations, num_components: int
) -> jax.Array:
    """Per-step NLL `[T, B]` of the Distribution-Transformer filter (update, then exact predict).

    `posterior_fn(params, prior, observations_t) -> GMM` is the update (e.g. `model.apply`); `states`
    `[T, B, d]` are the true states and `observations` `{source: [T, B, ...]}` their readings.
    """
    prior = task.initial_prior(states.shape[1], num_components)
    posts = scan_updates(
        lambda gmm, obs: posterior_fn(params, gmm, obs), prior, observations, task.dynamics.predict
    )
    return -posts.log_prob(states)


class FilterResult(NamedTuple):
    """Per-step outputs of a filter over T steps of B series (all after the step's update).

    mean: `[T, B, d]` filtering mean E[x_t | z_{0:t}]; covariance: `[T, B, d, d]` its covariance.
    log_evidence: `[T, B]` log p(z_t | z_{0:t-1}) (the PF's estimate log mean_i w_i; the EKF's Gaussian
    innovation density). nll: `[T, B]` -log q_t(x_t) of the true states, or None when none were given.
    """

    mean: jax.Array
    covariance: jax.Array
    log_evidence: jax.Array
    nll: jax.Array | None


def _num_steps_and_series(observations) -> tuple[int, int]:
    leaves = jax.tree.leaves(observations)
    if not leaves or any(jnp.ndim(o) < 2 for o in leaves):
        shapes = [jnp.shape(o) for o in leaves]
        raise ValueError(f"observations need leading [T, B] axes; got shapes {shapes}")
    return leaves[0].shape[0], leaves[0].shape[1]


def _multinomial_resample(key: jax.Array, weights: jax.Array) -> jax.Array:
    """N indices per row of `weights` `[B, N]`, drawn iid from it: inverse CDF at N uniforms, O(N log N).

    (`jax.random.categorical(..., shape=(N, B))` draws the same distribution but by Gumbel-max over all N
    categories for each of the N draws, O(N^2) per series and step.)
    """
    cdf = jnp.cumsum(weights, axis=-1)
    u = jax.random.uniform(key, weights.shape) * cdf[:, -1:]
    idx = jax.vmap(jnp.searchsorted)(cdf, u)
    return jnp.minimum(idx, weights.shape[-1] - 1)


def particle_filter(
    key: jax.Array,
    log_likelihood: Callable,
    observations,
    dynamics: LinearGaussianDynamics,
    *,
    num_particles: int,
    states: jax.Array | None = None,
) -> FilterResult:
    r"""A bootstrap particle filter for x_0 ~ N(x0_mean, L0 L0^T), x_{t+1} = A x_t + F eps_t (Q = F F^T).

    At every step t: weight the particles x_t^i (draws of p(x_t | z_{0:t-1})) by w_i = p(z_t | x_t^i); report the
    weighted mean and covariance, the evidence estimate log (1/N sum_i w_i) and, given the true state, the NLL
    of the KDE-GMM of the weighted particles (`kde_gmm`); resample multinomially and propagate through the
    motion model.

    Args:
      key: PRNG key.
      log_likelihood: `(particles [B, N, d], observation_t) -> [B, N]`, with `observation_t` one step's slice
        of `observations` (leading axis B).
      observations: a pytree of arrays `[T, B, ...]`.
      dynamics: the motion model (A, F, x0_mean and L0; `exact.LinearGaussianDynamics`).
      num_particles: N.
      states: optional true states `[T, B, d]` for the NLL.

    Returns:
      A `FilterResult`.
    """
    T, B = _num_steps_and_series(observations)
    A, F = jnp.asarray(dynamics.A), jnp.asarray(dynamics.Q_factor)
    d = A.shape[0]
    k0, key = jax.random.split(key)
    eps = jax.random.normal(k0, (B, num_particles, d))
    if dynamics.x0_scale_tril is not None:
        eps = eps @ jnp.asarray(dynamics.x0_scale_tril).T
    particles = jnp.asarray(dynamics.x0_mean)[..., None, :] + eps  # x0_mean [d] or [B, d]

    def step(particles, inputs):
        obs, k, x = inputs
        k_res, k_dyn = jax.random.split(k)
        logw = log_likelihood(particles, obs)  # [B, N]
        w = jax.nn.softmax(logw, axis=-1)
        mean = jnp.einsum("bn,bnd->bd", w, particles)
        c = particles - mean[:, None]
        cov = jnp.einsum("bn,bni,bnj->bij", w, c, c)
        log_evidence = logsumexp(logw, axis=-1) - jnp.log(num_particles)
        nll = None
        if x is not None:
            kde = kde_gmm(jnp.moveaxis(particles, 1, 0), jnp.moveaxis(logw, 1, 0))
            nll = -kde.log_prob(x)
        idx = _multinomial_resample(k_res, w)
        resampled = jnp.take_along_axis(particles, idx[..., None], axis=1)
        noise = jax.random.normal(k_dyn, (B, num_particles, F.shape[1])) @ F.T
        return resampled @ A.T + noise, FilterResult(mean, cov, log_evidence, nll)

    _, out = jax.lax.scan(step, particles, (observations, jax.random.split(key, T), states))
    return out


def particle_log_likelihood(task: Task) -> Callable:
    """The task's exact log p(observations | x) in `particle_filter`'s convention: particles `[B, N, d]` and one
    step's readings `{source: [B, ...]}` -> `[B, N]`."""

    def log_likelihood(particles, obs):
        obs_b = jax.tree.map(lambda o: o[:, None], obs)  # [B, 1, ...] broadcast over particles
        return task.log_likelihood(particles, obs_b)

    return log_likelihood


def bootstrap_particle_filter(
    key, task: Task, states, observations, num_particles: int
) -> jax.Array:
    """Per-step NLL `[T, B]` of a bootstrap particle filter scored through a KDE-GMM of its particles."""
    return particle_filter(
        key,
        particle_log_likelihood(task),
        observations,
        task.dynamics,
        num_particles=num_particles,
        states=states,
    ).nll


def lti_extended_kalman_filter(
    observation_fn: Callable,
    noise_covariance: Callable,
    observations: jax.Array,
    dynamics: LinearGaussianDynamics,
    *,
    residual: Callable | None = None,
    states: jax.Array | None = None,
) -> FilterResult:
    r"""An extended Kalman filter for x_0 ~ N(x0_mean, P0), x_{t+1} = A x_t + N(0, Q), z_t ~ N(h(x_t), R(x_t)).

    Update at the predicted mean mu with H = dh/dx(mu) (`jax.jacfwd`), R = R(mu), innovation
    nu = residual(z, h(mu)): S = H P H^T + R, K = P H^T S^{-1}, mu <- mu + K nu,
    P <- (I - K H) P (I - K H)^T + K R K^T (Joseph form); then the exact LTI predict. The evidence is
    log N(nu; 0, S). With h linear and R constant this is the Kalman filter.

    Args:
      observation_fn: h, `[d] -> [m]`.
      noise_covariance: R, `[d] -> [m, m]` (evaluated at the predicted mean).
      observations: `[T, B, m]`.
      dynamics: the motion model (A, Q = F F^T, x0_mean `[d]` or `[B, d]`, x0's covariance L0 L0^T;
        `exact.LinearGaussianDynamics`).
      residual: `(z, h(mu)) -> [m]` (z - h(mu) if None; e.g. wraps angles).
      states: optional true states `[T, B, d]` for the NLL.

    Returns:
      A `FilterResult`.
    """
    observations = jnp.asarray(observations)
    T, B = _num_steps_and_series(observations)
    A, Q = jnp.asarray(dynamics.A), dynamics.Q
    d = A.shape[0]
    residual = (lambda z, zp: z - zp) if residual is None else residual

    def update(mu, P, z):
        Hj = jax.jacfwd(observation_fn)(mu)
        R = noise_covariance(mu)
        innov = residual(z, observation_fn(mu))
        S = Hj @ P @ Hj.T + R
        K = jnp.linalg.solve(S, Hj @ P).T
        I_KH = jnp.eye(d) - K @ Hj
        P = I_KH @ P @ I_KH.T + K @ R @ K.T
        log_evidence = GMM.gaussian(jnp.zeros_like(innov), jnp.linalg.cholesky(S)).log_prob(innov)
        return mu + K @ innov, 0.5 * (P + P.T), log_evidence

    def step(carry, inputs):
        mu, P = carry
        z, x = inputs
        mu, P, log_evidence = jax.vmap(update)(mu, P, z)
        nll = None if x is None else -GMM.gaussian(mu, jnp.linalg.cholesky(P)).log_prob(x)
        return (mu @ A.T, A @ P @ A.T + Q), FilterResult(mu, P, log_evidence, nll)

    mu0 = jnp.broadcast_to(jnp.asarray(dynamics.x0_mean), (B, d))
    P0 = jnp.broadcast_to(dynamics.x0_covariance, (B, d, d))
    _, out = jax.lax.scan(step, (mu0, P0), (observations, states))
    return out


def extended_kalman_filter(task: Task, states, observations) -> jax.Array:
    """Per-step NLL `[T, B]` of an EKF with the task's observation model (`task.ekf_observation_model()`)."""
    h, noise_covariance, residual = task.ekf_observation_model()
    return lti_extended_kalman_filter(
        h,
        noise_covariance,
        task.ekf_observations(observations),
        task.dynamics,
        residual=residual,
        states=states,
    ).nll
