"""Exact and near-exact posteriors: the references that Distribution Transformers are scored against.

* `linear_gaussian_posterior`: a GMM prior with a linear-Gaussian likelihood gives a GMM posterior in closed form,
  a Kalman update per component with the weights re-scored by each component's evidence (reference notes
  Sec. 5(a); task (a) of the paper, Sec. 4). `sequential_linear_gaussian_posterior` applies it one observation at
  a time; `stack_observations` turns n i.i.d. observations into one batched update. Both are exact, so they agree.
* `inverse_gamma_posterior`: sigma^2 ~ IG(alpha, beta), z_i ~ N(mu, sigma^2) gives IG(alpha + n/2,
  beta + sum (z_i - mu)^2 / 2); `inverse_gamma_log_prob_log_space` is its density on y = log sigma^2 (task (b),
  paper Sec. 4.1).
* `gp_hyperprior_log_posterior`, `gp_hyperprior_log_marginals`: a GP with a lengthscale hyperprior; the
  posterior over (y*, log lengthscale) given data (`GPData`, `GPHyperprior`) is a Gaussian in y* for each
  lengthscale times a 1-D posterior over the lengthscale that is normalised by quadrature (reference notes
  Sec. 5(d); paper Sec. 4.2.1).
* `grid_bernoulli_log_posterior`: u = logit delta with delta ~ Beta(c1, c0) and binary measurements whose success
  probabilities are tabulated on a grid of u (task (e), the quantum reference; paper Sec. 4.2.2).
* `log_normalizer_1d`: the quadrature used for any 1-D latent (the GP lengthscale, the quantum delta).
* `LinearGaussianDynamics`: the LTI motion model x_{t+1} = A x_t + F eps of the filtering task, with its exact
  predict step for GMMs (paper Sec. 4.3).

Everything here is float32 unless called inside a `jax.enable_x64(True)` scope with float64 inputs,
which the tests and the reference evaluations do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve, solve_triangular
from jax.scipy.special import betaln, gammaln, logsumexp
from theorax.models.gmm import GMM, GMMError, mvn_log_prob_tril, validate_gmm
from theorax.models.validation import is_concrete

_LOG_2PI = math.log(2.0 * math.pi)


def _check_linear_gaussian(prior: GMM, H, R, z) -> None:
    validate_gmm(prior, name="prior")
    d = prior.dim
    if H.ndim < 2 or H.shape[-1] != d:
        raise GMMError(
            f"observation matrix H has shape {H.shape}; it must be [m, d] with d = prior.dim = {d}"
        )
    m = H.shape[-2]
    if R.shape[-2:] != (m, m):
        raise GMMError(f"noise covariance R has shape {R.shape}; H implies [m, m] = [{m}, {m}]")
    if z.shape[-1] != m:
        raise GMMError(f"observation z has shape {z.shape}; H implies a last axis of size m = {m}")
    if is_concrete(R):
        eig = np.linalg.eigvalsh(np.asarray(R, dtype=np.float64))
        if np.any(eig <= 0):
            raise GMMError(f"noise covariance R must be positive definite; eigenvalues {eig}")


def linear_gaussian_posterior(prior: GMM, H, R, z) -> GMM:
    r"""The exact posterior of a GMM prior under one linear-Gaussian observation z = H x + eps.

    With prior sum_j w_j N(mu_j, Sigma_j) and eps ~ N(0, R), the posterior is the GMM

        S_j    = H Sigma_j H^T + R
        K_j    = Sigma_j H^T S_j^{-1}
        mu'_j  = mu_j + K_j (z - H mu_j)
        Sigma'_j = (I - K_j H) Sigma_j (I - K_j H)^T + K_j R K_j^T      (Joseph form, symmetric)
        log w'_j = log w_j + log N(z; H mu_j, S_j) - logsumexp_i(...)

    (reference notes Sec. 5(a)). The weights stay in log space, so far-away components do not underflow.

    Args:
      prior: a GMM with batch shape `B` (any), k components in d dimensions.
      H: `[m, d]` (or broadcastable `[..., m, d]`) observation matrix.
      R: `[m, m]` positive-definite observation-noise covariance.
      z: `[*B, m]` the observation.

    Returns:
      The posterior GMM, same shapes as `prior`.

    Raises:
      GMMError: on dimension mismatches, a malformed prior or a non-positive-definite R (before compiling).
    """
    H, R, z = jnp.asarray(H), jnp.asarray(R), jnp.asarray(z)
    _check_linear_gaussian(prior, H, R, z)
    return _linear_gaussian_update(prior, H, R, z)


@jax.jit
def _linear_gaussian_update(prior: GMM, H, R, z) -> GMM:
    Sigma = prior.covariances  # [..., k, d, d]
    Ht = jnp.swapaxes(H, -1, -2)
    S = H[..., None, :, :] @ Sigma @ Ht[..., None, :, :] + R[..., None, :, :]  # [..., k, m, m]
    S = 0.5 * (S + jnp.swapaxes(S, -1, -2))
    S_chol = jnp.linalg.cholesky(S)
    pred = jnp.einsum("...md,...kd->...km", H, prior.means)
    innovation = z[..., None, :] - pred  # [..., k, m]
    # K^T = S^{-1} H Sigma (Sigma symmetric)
    Kt = cho_solve((S_chol, True), H[..., None, :, :] @ Sigma)  # [..., k, m, d]
    K = jnp.swapaxes(Kt, -1, -2)
    means = prior.means + jnp.einsum("...kdm,...km->...kd", K, innovation)
    eye = jnp.eye(prior.dim, dtype=Sigma.dtype)
    A = eye - K @ H[..., None, :, :]
    cov = A @ Sigma @ jnp.swapaxes(A, -1, -2) + K @ R[..., None, :, :] @ Kt
    cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
    log_w = prior.log_weights + mvn_log_prob_tril(innovation, S_chol)
    log_w = log_w - logsumexp(log_w, axis=-1, keepdims=True)
    return GMM(log_w, means, jnp.linalg.cholesky(cov))


def linear_gaussian_log_evidence(prior: GMM, H, R, z) -> jax.Array:
    """log p(z) = log sum_j w_j N(z; H mu_j, H Sigma_j H^T + R), `[*B]` (the evidence of the update)."""
    H, R, z = jnp.asarray(H), jnp.asarray(R), jnp.asarray(z)
    _check_linear_gaussian(prior, H, R, z)
    S = H @ prior.covariances @ H.T + R
    diff = z[..., None, :] - jnp.einsum("md,...kd->...km", H, prior.means)
    return logsumexp(prior.log_weights + mvn_log_prob_tril(diff, jnp.linalg.cholesky(S)), -1)


def stack_observations(H, R, zs) -> tuple[jax.Array, jax.Array, jax.Array]:
    """n i.i.d. observations z_i = H x + eps_i as one: H~ = 1_n (x) H, R~ = I_n (x) R, z~ = vec(z_1..z_n).

    Args:
      H: `[m, d]`; R: `[m, m]`; zs: `[*B, n, m]`.

    Returns:
      `(H~ [n m, d], R~ [n m, n m], z~ [*B, n m])`, for `linear_gaussian_posterior`.
    """
    H, R, zs = jnp.asarray(H), jnp.asarray(R), jnp.asarray(zs)
    n = zs.shape[-2]
    return (
        jnp.tile(H, (n, 1)),
        jnp.kron(jnp.eye(n, dtype=R.dtype), R),
        zs.reshape(*zs.shape[:-2], -1),
    )


def sequential_linear_gaussian_posterior(prior: GMM, H, R, zs) -> GMM:
    """Applies `linear_gaussian_posterior` to z_1, ..., z_n in turn (`zs` `[*B, n, m]`); exact, so it equals
    the batched update with `stack_observations`."""
    H, R, zs = jnp.asarray(H), jnp.asarray(R), jnp.asarray(zs)
    _check_linear_gaussian(prior, H, R, zs[..., 0, :])

    def body(gmm, z):
        return _linear_gaussian_update(gmm, H, R, z), None

    posterior, _ = jax.lax.scan(body, prior, jnp.moveaxis(zs, -2, 0))
    return posterior


# ------------------------------------------------------------------------------------ inverse gamma


def inverse_gamma_posterior(alpha, beta, z, loc=0.0) -> tuple[jax.Array, jax.Array]:
    r"""Conjugate update of sigma^2 ~ IG(alpha, beta) under z_i ~ N(loc, sigma^2), i = 1..n.

        alpha' = alpha + n / 2,      beta' = beta + sum_i (z_i - loc)^2 / 2

    Args:
      alpha, beta: `[*B]` prior shape and scale.
      z: `[*B, n]` observations.
      loc: the known mean of the observations.

    Returns:
      `(alpha', beta')`, each `[*B]`.
    """
    z = jnp.asarray(z)
    return alpha + 0.5 * z.shape[-1], beta + 0.5 * jnp.sum((z - loc) ** 2, -1)


def inverse_gamma_log_prob_log_space(y, alpha, beta) -> jax.Array:
    r"""Density of y = log sigma^2 when sigma^2 ~ IG(alpha, beta): p_y(y) = p_IG(e^y) e^y, i.e.

    log p_y(y) = alpha log beta - log Gamma(alpha) - alpha y - beta e^{-y}.
    """
    return alpha * jnp.log(beta) - gammaln(alpha) - alpha * y - beta * jnp.exp(-y)


def inverse_gamma_sample_log_space(key, alpha, beta, n: int) -> jax.Array:
    """n draws of y = log sigma^2, sigma^2 ~ IG(alpha, beta): y = log beta - log Gamma(alpha, 1).

    Uses `jax.random.loggamma`, which stays accurate for small shapes. Returns `[n, *B]`.
    """
    alpha, beta = jnp.asarray(alpha), jnp.asarray(beta)
    shape = (n, *jnp.broadcast_shapes(alpha.shape, beta.shape))
    return jnp.log(beta) - jax.random.loggamma(key, alpha, shape)


# ------------------------------------------------------------------------------------------ 1-D quadrature


def log_normalizer_1d(log_joint: Callable[[jax.Array], jax.Array], grid: jax.Array) -> jax.Array:
    """log of the integral of exp(log_joint(u)) du by the trapezoid rule on a sorted 1-D `grid` `[G]`.

    `log_joint` maps `[G]` to `[G, *B]`; returns `[*B]`. Computed in log space (logsumexp of the trapezoid
    weights plus the log integrand), so it does not underflow.
    """
    lj = log_joint(grid)
    return logsumexp(lj + _log_trapezoid_weights(grid, lj.ndim - 1), axis=0)


def _log_trapezoid_weights(grid: jax.Array, batch_ndim: int) -> jax.Array:
    """log of the trapezoid-rule weights of a sorted 1-D `grid` `[G]`, shaped `[G, 1 x batch_ndim]`."""
    du = jnp.diff(grid)
    w = jnp.concatenate([du[:1] / 2, (du[1:] + du[:-1]) / 2, du[-1:] / 2])
    return jnp.log(w).reshape((-1,) + (1,) * batch_ndim)


# ------------------------------------------------------------------------------ GP with a lengthscale prior


def rbf_kernel(x1: jax.Array, x2: jax.Array, lengthscale) -> jax.Array:
    """k(x, x') = exp(-(x - x')^2 / (2 l^2)) for 1-D inputs `[..., n1]`, `[..., n2]` -> `[..., n1, n2]`."""
    ls = jnp.asarray(lengthscale)[..., None, None]
    return jnp.exp(-0.5 * ((x1[..., :, None] - x2[..., None, :]) / ls) ** 2)


class GPData(NamedTuple):
    """Data and prior of one GP regression problem per batch entry (task (d)): f ~ GP(prior_mean, prior_var k_l),
    y_i = f(x_i) + noise, and the query input x*.

    Attributes:
      x, y: `[*B, n]` inputs and noisy outputs; x_star: `[*B]` the query input;
      prior_mean, prior_var: `[*B]` the GP's constant mean m and its signal variance s (the prior of y*).
    """

    x: jax.Array
    y: jax.Array
    x_star: jax.Array
    prior_mean: jax.Array
    prior_var: jax.Array


class GPHyperprior(NamedTuple):
    """The fixed settings of the GP-with-hyperprior posterior: observation noise, the Gamma(ls_shape, ls_rate)
    hyperprior on the lengthscale l, and the sorted quadrature grid `[G]` over u = log l (covering the mass)."""

    noise_var: float
    ls_shape: float
    ls_rate: float
    grid: jax.Array


def gp_conditionals(data: GPData, lengthscale, noise_var):
    r"""For f ~ GP(m, s k_l), y_i = f(x_i) + N(0, noise), returns, per lengthscale l,

        log N(y; m 1, s K_l + noise I)                      (the lengthscale's marginal likelihood)
        mean, var of f(x*) | y, l = m + s k*^T C^{-1} (y - m),  s - s^2 k*^T C^{-1} k*,   C = s K_l + noise I.

    Shapes: `data` as `GPData` (batch `[*B]`), `lengthscale` broadcastable to `[*B]` (e.g. `[G, *B]` for a
    grid). Returns three arrays of the broadcast shape.
    """
    x, y, x_star, prior_mean, prior_var = data
    ls = jnp.asarray(lengthscale)
    s = prior_var[..., None, None]
    n = x.shape[-1]
    C = s * rbf_kernel(x, x, ls) + noise_var * jnp.eye(n, dtype=x.dtype)
    chol = jnp.linalg.cholesky(C)
    r = y - prior_mean[..., None]
    r = jnp.broadcast_to(r, chol.shape[:-1])
    loglik = mvn_log_prob_tril(r, chol)
    ks = prior_var[..., None] * rbf_kernel(x, x_star[..., None], ls)[..., 0]  # [..., n]
    ks = jnp.broadcast_to(ks, chol.shape[:-1])
    a = solve_triangular(chol, r[..., None], lower=True)[..., 0]
    b = solve_triangular(chol, ks[..., None], lower=True)[..., 0]
    mean = prior_mean + jnp.sum(a * b, -1)
    var = prior_var - jnp.sum(b * b, -1)
    return loglik, mean, jnp.maximum(var, 1e-12)


def gamma_log_prob(x, shape, rate) -> jax.Array:
    """log Gamma(x; shape, rate)."""
    return shape * jnp.log(rate) - gammaln(shape) + (shape - 1) * jnp.log(x) - rate * x


def _gp_log_joint_u(u, data: GPData, hyper: GPHyperprior):
    """(log p(u, y), GP predictive mean and variance of y* given u) for u = log l, unnormalised in u."""
    ll, mean, var = gp_conditionals(data, jnp.exp(u), hyper.noise_var)
    return ll + gamma_log_prob(jnp.exp(u), hyper.ls_shape, hyper.ls_rate) + u, mean, var


def _log_normal(y, mean, var) -> jax.Array:
    return -0.5 * ((y - mean) ** 2 / var + jnp.log(var) + _LOG_2PI)


def gp_hyperprior_log_posterior(
    y_star, log_lengthscale, data: GPData, hyper: GPHyperprior
) -> jax.Array:
    r"""Near-exact log p(y*, u | D) with u = log l, for the GP-with-hyperprior task (paper Sec. 4.2.1).

        p(u | D)      = Gamma(e^u; a, b) e^u N(y; m 1, s K + noise I) / Z,   Z by trapezoid quadrature on the grid
        p(y* | u, D)  = N(y*; GP predictive mean and variance at x*)

    The only approximation is Z (a 1-D integral of a smooth function on a fine grid); the density itself is
    evaluated exactly at any (y*, u).

    Args:
      y_star, log_lengthscale: `[*S, *B]` the points at which to evaluate.
      data: the data and the GP prior of y*, each `[*B, ...]` (`GPData`).
      hyper: noise variance, the Gamma hyperprior on l and the grid `[G]` over u = log l (`GPHyperprior`).

    Returns:
      `[*S, *B]` log densities on (y*, u).
    """
    g = hyper.grid.reshape((-1,) + (1,) * len(jnp.shape(data.prior_mean)))
    log_z = log_normalizer_1d(lambda _: _gp_log_joint_u(g, data, hyper)[0], hyper.grid)
    log_joint, mean, var = _gp_log_joint_u(log_lengthscale, data, hyper)
    return log_joint - log_z + _log_normal(y_star, mean, var)


def gp_hyperprior_log_marginals(
    y_star, log_lengthscale, data: GPData, hyper: GPHyperprior
) -> tuple[jax.Array, jax.Array]:
    r"""The two marginals of `gp_hyperprior_log_posterior`: the predictive p(y* | D) and p(u | D), u = log l.

        p(y* | D) = int p(u | D) N(y*; m_u, v_u) du      (trapezoid quadrature on the grid)
        p(u | D)  = Gamma(e^u; a, b) e^u N(y; m 1, s K_u + noise I) / Z

    Same arguments and shapes as `gp_hyperprior_log_posterior`; returns two `[*S, *B]` arrays.
    """
    nb = len(jnp.shape(data.prior_mean))
    g = hyper.grid.reshape((-1,) + (1,) * nb)
    lj, mean_g, var_g = _gp_log_joint_u(g, data, hyper)  # [G, *B]
    log_w = lj + _log_trapezoid_weights(hyper.grid, nb)
    log_z = logsumexp(log_w, axis=0)
    log_w = log_w - log_z  # [G, *B] quadrature weights of p(u | D)
    expand = (slice(None),) + (None,) * (jnp.ndim(y_star) - nb)
    log_npdf = _log_normal(y_star[None], mean_g[expand], var_g[expand])
    log_py = logsumexp(log_w[expand] + log_npdf, axis=0)
    log_pu = _gp_log_joint_u(log_lengthscale, data, hyper)[0] - log_z
    return log_py, log_pu


# ------------------------------------------------------------------- binary measurements on a tabulated grid


def logit_beta_log_prob(u, c1, c0) -> jax.Array:
    """Density of u = logit delta, delta ~ Beta(c1, c0): c1 log s(u) + c0 log s(-u) - log B(c1, c0)."""
    return c1 * jax.nn.log_sigmoid(u) + c0 * jax.nn.log_sigmoid(-u) - betaln(c1, c0)


def interpolate_columns(u, grid, table) -> jax.Array:
    """Each column j of `table` `[G, J]` linearly interpolated at `u` on the sorted `grid` `[G]`: `[..., J]`."""
    return jnp.stack([jnp.interp(u, grid, table[:, j]) for j in range(table.shape[1])], -1)


def bernoulli_log_likelihood(p, z) -> jax.Array:
    """sum_j z_j log p_j + (1 - z_j) log(1 - p_j) over the last axis."""
    return jnp.sum(z * jnp.log(p) + (1 - z) * jnp.log1p(-p), -1)


def grid_bernoulli_log_posterior(u, c1, c0, z, grid, success) -> jax.Array:
    r"""log p(u | z) for u = logit delta, delta ~ Beta(c1, c0), z_j ~ Bernoulli(p_j(delta)), j = 1..J.

    The success probabilities p_j are tabulated at the points of the sorted `grid` `[G]` over u (`success`
    `[G, J]`, inside (0, 1)) and linearly interpolated between them; the posterior is normalised by trapezoid
    quadrature on the same grid (task (e), paper Sec. 4.2.2).

    Args:
      u: `[*S, B]` the points at which to evaluate; c1, c0: `[B]` the Beta prior; z: `[B, J]` the outcomes.
      grid, success: the table of p_j(u).

    Returns:
      `[*S, B]` log densities of u.
    """
    grid = jnp.asarray(grid)
    log_lik_grid = jnp.log(success) @ z.T + jnp.log1p(-success) @ (1 - z).T  # [G, B]
    log_prior_grid = logit_beta_log_prob(grid[:, None], c1, c0)
    log_z = log_normalizer_1d(lambda g: log_prior_grid + log_lik_grid, grid)
    log_lik = bernoulli_log_likelihood(interpolate_columns(u, grid, success), z)
    return logit_beta_log_prob(u, c1, c0) + log_lik - log_z


# -------------------------------------------------------------------------------- linear-Gaussian dynamics


@dataclasses.dataclass(frozen=True)
class LinearGaussianDynamics:
    """The LTI motion model x_0 ~ N(x0_mean, L0 L0^T), x_{t+1} = A x_t + F eps_t, eps_t ~ N(0, I), Q = F F^T.

    Attributes (array-likes; tuples keep the dataclass hashable):
      A: `[d, d]` transition matrix; Q_factor: `[d, e]` noise factor F.
      x0_mean: `[d]` (or `[B, d]`) mean of x_0; x0_scale_tril: its Cholesky factor L0 (identity if None).
    """

    A: object
    Q_factor: object
    x0_mean: object
    x0_scale_tril: object | None = None

    @property
    def Q(self) -> jax.Array:
        """The process-noise covariance F F^T."""
        F = jnp.asarray(self.Q_factor)
        return F @ F.T

    @property
    def x0_covariance(self) -> jax.Array:
        d = jnp.shape(self.A)[0]
        if self.x0_scale_tril is None:
            return jnp.eye(d)
        L0 = jnp.asarray(self.x0_scale_tril)
        return L0 @ L0.T

    def predict(self, gmm: GMM) -> GMM:
        """The exact predict step per component: mu <- A mu, Sigma <- A Sigma A^T + Q (weights unchanged)."""
        A = jnp.asarray(self.A)
        cov = A @ gmm.covariances @ A.T + self.Q
        cov = 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
        return GMM(gmm.logits, gmm.means @ A.T, jnp.linalg.cholesky(cov))
