"""Filtering for the 4-D sensor-fusion task (paper Sec. 4.3.1): the Distribution Transformer as a filter, a
bootstrap particle filter and an extended Kalman filter, each scored by the NLL of the true state.

All three share the LTI motion model x_{t+1} = A x_t + F eps (Q = F F^T) of `SensorFusionTask` and see, at every
step t, one rangefinder and one bearing reading of x_t. Each returns the per-step NLL -log q_t(x_t) of the
filtering distribution after the step's update, `[T, B]`.

* `dt_filter` (the official `LTIFilter`): x0's Gaussian copied into k components with weights proportional to
  1..k (distinct tokens for the permutation-equivariant model), then at each step a transformer update with the
  step's readings followed by an exact per-component predict (mu <- A mu, Sigma <- A Sigma A^T + Q), fed back
  as the next prior.
* `bootstrap_particle_filter`: propagate, weight by the exact likelihood (rangefinder mixture in the sampler's
  component order), score with `kde_gmm` of the weighted particles, resample multinomially.
* `extended_kalman_filter`: Gaussian belief; the rangefinder is replaced by its moment-matched Gaussian
  (mean 0.7 r + 0.2 / rate + 0.1 max / 2, the mixture's variance), the bearing residual is wrapped, and both
  are linearised at the predicted mean (as the official EKF, which uses the rangefinder's mean and variance).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from inference.baselines import kde_gmm
from models import dt_tasks
from models.gmm import GMM


def gaussian_predict(gmm: GMM, A: jax.Array, Q: jax.Array) -> GMM:
    """Exact predict step per component: mu <- A mu, Sigma <- A Sigma A^T + Q (weights unchanged)."""
    cov = A @ gmm.covariances @ A.T + Q
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    return GMM(gmm.logits, gmm.means @ A.T, jnp.linalg.cholesky(cov))


def initial_gmm(task: dt_tasks.SensorFusionTask, batch: int, num_components: int) -> GMM:
    """x0 ~ N(x0_mean, I) as k identical components with weights proportional to 1..k."""
    w = jnp.arange(1, num_components + 1, dtype=jnp.float32)
    logits = jnp.broadcast_to(jnp.log(w / w.sum()), (batch, num_components))
    means = jnp.broadcast_to(jnp.asarray(task.x0_mean), (batch, num_components, 4))
    tril = jnp.broadcast_to(jnp.eye(4), (batch, num_components, 4, 4))
    return GMM(logits, means, tril)


def dt_filter(
    posterior_fn: Callable,
    params,
    task: dt_tasks.SensorFusionTask,
    states,
    observations,
    num_components,
) -> jax.Array:
    """Per-step NLL `[T, B]` of the Distribution-Transformer filter (update, then exact predict)."""
    A, Q = jnp.asarray(task.A), task.Q
    prior = initial_gmm(task, states.shape[1], num_components)

    def step(prior, inputs):
        x, obs = inputs
        post = posterior_fn(params, prior, obs)
        return gaussian_predict(post, A, Q), -post.log_prob(x)

    _, nll = jax.lax.scan(step, prior, (states, observations))
    return nll


def bootstrap_particle_filter(
    key, task: dt_tasks.SensorFusionTask, states, observations, num_particles: int
) -> jax.Array:
    """Per-step NLL `[T, B]` of a bootstrap particle filter scored through a KDE-GMM of its particles."""
    T, B = states.shape[:2]
    A, F = jnp.asarray(task.A), jnp.asarray(task.Q_factor)
    k0, key = jax.random.split(key)
    particles = jnp.asarray(task.x0_mean) + jax.random.normal(k0, (B, num_particles, 4))

    def step(particles, inputs):
        x, obs, k = inputs
        k_res, k_dyn = jax.random.split(k)
        obs_b = jax.tree.map(lambda o: o[:, None], obs)  # [B, 1, 1, 1] broadcast over particles
        logw = task.log_likelihood(particles, obs_b)  # [B, N]
        kde = kde_gmm(jnp.moveaxis(particles, 1, 0), jnp.moveaxis(logw, 1, 0))
        nll = -kde.log_prob(x)
        idx = jax.random.categorical(k_res, logw, axis=-1, shape=(num_particles, B)).T
        resampled = jnp.take_along_axis(particles, idx[..., None], axis=1)
        noise = jax.random.normal(k_dyn, (B, num_particles, F.shape[1])) @ F.T
        return resampled @ A.T + noise, nll

    _, nll = jax.lax.scan(step, particles, (states, observations, jax.random.split(key, T)))
    return nll


def _range_moments(task: dt_tasks.SensorFusionTask, r):
    w0, w1, w2 = task.range_weights
    m = jnp.stack(
        [r, jnp.full_like(r, 1.0 / task.range_rate), jnp.full_like(r, task.max_range / 2)]
    )
    v = jnp.stack(
        [
            (task.range_scale * (r + 1.0)) ** 2,
            jnp.full_like(r, 1.0 / task.range_rate**2),
            jnp.full_like(r, task.max_range**2 / 12.0),
        ]
    )
    w = jnp.asarray([w0, w1, w2]).reshape((3,) + (1,) * r.ndim)
    mean = jnp.sum(w * m, 0)
    return mean, jnp.sum(w * (v + m**2), 0) - mean**2


def extended_kalman_filter(task: dt_tasks.SensorFusionTask, states, observations) -> jax.Array:
    """Per-step NLL `[T, B]` of an EKF with a moment-matched rangefinder and a wrapped bearing residual."""
    B = states.shape[1]
    A, Q = jnp.asarray(task.A), task.Q

    def h(x):
        mean_r, _ = _range_moments(task, task.true_range(x))
        return jnp.stack([mean_r, task.true_bearing(x)])

    def update(mu, P, z):
        Hj = jax.jacfwd(h)(mu)
        _, var_r = _range_moments(task, task.true_range(mu))
        R = jnp.diag(jnp.stack([var_r, jnp.asarray(task.bearing_scale**2)]))
        innov = z - h(mu)
        innov = innov.at[1].set(dt_tasks.wrap_angle(innov[1]))
        S = Hj @ P @ Hj.T + R
        K = jnp.linalg.solve(S, Hj @ P).T
        I_KH = jnp.eye(4) - K @ Hj
        P = I_KH @ P @ I_KH.T + K @ R @ K.T
        return mu + K @ innov, 0.5 * (P + P.T)

    def step(carry, inputs):
        mu, P = carry
        x, obs = inputs
        z = jnp.stack([obs["range"][:, 0, 0], obs["bearing"][:, 0, 0]], -1)
        mu, P = jax.vmap(update)(mu, P, z)
        nll = -GMM.gaussian(mu, jnp.linalg.cholesky(P)).log_prob(x)
        return (mu @ A.T, A @ P @ A.T + Q), nll

    mu0 = jnp.broadcast_to(jnp.asarray(task.x0_mean), (B, 4))
    P0 = jnp.broadcast_to(jnp.eye(4), (B, 4, 4))
    _, nll = jax.lax.scan(step, (mu0, P0), (states, observations))
    return nll
