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

The last two are the sensor-fusion instances of two model-agnostic filters for any LTI motion model with a
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
from theorax.inference.distribution_transformer.baselines import kde_gmm
from theorax.models.distribution_transformer import tasks as dt_tasks
from theorax.models.gmm import GMM


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
    *,
    A: jax.Array,
    Q_factor: jax.Array,
    x0_mean: jax.Array,
    num_particles: int,
    x0_scale_tril: jax.Array | None = None,
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
      A: `[d, d]` transition matrix; Q_factor: `[d, e]` noise factor F.
      x0_mean: `[d]` (or `[B, d]`) mean of x_0; x0_scale_tril: its Cholesky factor (identity if None).
      num_particles: N.
      states: optional true states `[T, B, d]` for the NLL.

    Returns:
      A `FilterResult`.
    """
    T, B = _num_steps_and_series(observations)
    A, F = jnp.asarray(A), jnp.asarray(Q_factor)
    d = A.shape[0]
    k0, key = jax.random.split(key)
    eps = jax.random.normal(k0, (B, num_particles, d))
    if x0_scale_tril is not None:
        eps = eps @ jnp.asarray(x0_scale_tril).T
    particles = jnp.asarray(x0_mean)[..., None, :] + eps  # x0_mean [d] or [B, d]

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


def sensor_fusion_log_likelihood(task: dt_tasks.SensorFusionTask) -> Callable:
    """The exact log p(range, bearing | x) in `particle_filter`'s convention: particles `[B, N, 4]` and one
    step's readings `{source: [B, 1, 1]}` -> `[B, N]`."""

    def log_likelihood(particles, obs):
        obs_b = jax.tree.map(lambda o: o[:, None], obs)  # [B, 1, 1, 1] broadcast over particles
        return task.log_likelihood(particles, obs_b)

    return log_likelihood


def bootstrap_particle_filter(
    key, task: dt_tasks.SensorFusionTask, states, observations, num_particles: int
) -> jax.Array:
    """Per-step NLL `[T, B]` of a bootstrap particle filter scored through a KDE-GMM of its particles."""
    return particle_filter(
        key,
        sensor_fusion_log_likelihood(task),
        observations,
        A=task.A,
        Q_factor=task.Q_factor,
        x0_mean=task.x0_mean,
        num_particles=num_particles,
        states=states,
    ).nll


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


def lti_extended_kalman_filter(
    observation_fn: Callable,
    noise_covariance: Callable,
    observations: jax.Array,
    *,
    A: jax.Array,
    Q: jax.Array,
    x0_mean: jax.Array,
    x0_covariance: jax.Array,
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
      A, Q: `[d, d]` transition matrix and noise covariance.
      x0_mean: `[d]` (or `[B, d]`); x0_covariance: `[d, d]` (or `[B, d, d]`).
      residual: `(z, h(mu)) -> [m]` (z - h(mu) if None; e.g. wraps angles).
      states: optional true states `[T, B, d]` for the NLL.

    Returns:
      A `FilterResult`.
    """
    observations = jnp.asarray(observations)
    T, B = _num_steps_and_series(observations)
    A, Q = jnp.asarray(A), jnp.asarray(Q)
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

    mu0 = jnp.broadcast_to(jnp.asarray(x0_mean), (B, d))
    P0 = jnp.broadcast_to(jnp.asarray(x0_covariance), (B, d, d))
    _, out = jax.lax.scan(step, (mu0, P0), (observations, states))
    return out


def ekf_observation_model(task: dt_tasks.SensorFusionTask) -> tuple[Callable, Callable, Callable]:
    """The sensor-fusion EKF's `(h, R, residual)`: h(x) = (moment-matched mean range, bearing), R(x) =
    diag(rangefinder mixture variance at r(x), bearing_scale^2), and the residual with a wrapped bearing."""

    def h(x):
        mean_r, _ = _range_moments(task, task.true_range(x))
        return jnp.stack([mean_r, task.true_bearing(x)])

    def noise_covariance(x):
        _, var_r = _range_moments(task, task.true_range(x))
        return jnp.diag(jnp.stack([var_r, jnp.asarray(task.bearing_scale**2)]))

    def residual(z, z_pred):
        innov = z - z_pred
        return innov.at[1].set(dt_tasks.wrap_angle(innov[1]))

    return h, noise_covariance, residual


def extended_kalman_filter(task: dt_tasks.SensorFusionTask, states, observations) -> jax.Array:
    """Per-step NLL `[T, B]` of an EKF with a moment-matched rangefinder and a wrapped bearing residual."""
    h, noise_covariance, residual = ekf_observation_model(task)
    z = jnp.stack([observations["range"][..., 0, 0], observations["bearing"][..., 0, 0]], -1)
    return lti_extended_kalman_filter(
        h,
        noise_covariance,
        z,
        A=task.A,
        Q=task.Q,
        x0_mean=task.x0_mean,
        x0_covariance=jnp.eye(4),
        residual=residual,
        states=states,
    ).nll
