"""Gaussian mixture models as pytrees: the distribution family that Distribution Transformers map to itself.

A `GMM` holds, for a batch of mixtures with k components in d dimensions,

    logits      [..., k]        weights w = softmax(logits)
    means       [..., k, d]
    scale_tril  [..., k, d, d]  lower-triangular Cholesky factors L_j, covariance Sigma_j = L_j L_j^T

with density q(x) = sum_j w_j N(x; mu_j, L_j L_j^T) (Distribution Transformers, Whittle et al. 2025, Sec. 3;
reference notes Sec. 2). Weights are kept as logits so that every operation is done in log space and a GMM with
finite logits always has weights that sum to one.

Also here: moments, marginals, sampling, the Gaussian log-density by triangular solve (`mvn_log_prob_tril`),
Monte Carlo KL estimates, the conversion to a numpyro `MixtureSameFamily`, and sample-space transforms (log,
logit) with their Jacobians, for latents that live on (0, inf) or (0, 1) while the mixture lives on the real line
(the paper's f; reference notes Sec. 2, "Optional sample-space transform").

Validation (`validate_gmm`, `GMM.from_weights`, `GMM.from_covariance`, `GMM.from_stddevs`) is plain Python on
concrete values: shapes are always checked; values are checked whenever they are concrete (not traced), so bad
input is caught before anything compiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp
from theorax.models.validation import is_concrete

_LOG_2PI = math.log(2.0 * math.pi)


class GMMError(ValueError):
    """A Gaussian mixture's parameters are malformed (shape, weights, or covariance)."""


@flax.struct.dataclass
class GMM:
    """A (batch of) Gaussian mixture model(s), q(x) = sum_j softmax(logits)_j N(x; means_j, L_j L_j^T).

    Attributes:
      logits: `[..., k]` unnormalised log weights; `weights = softmax(logits)`.
      means: `[..., k, d]` component means.
      scale_tril: `[..., k, d, d]` lower-triangular Cholesky factors with positive diagonals.

    Example:
      >>> gmm = GMM.from_stddevs(jnp.log(jnp.array([0.3, 0.7])), jnp.zeros((2, 1)), jnp.ones((2, 1)))
      >>> round(float(gmm.log_prob(jnp.zeros(1))), 4)  # log N(0; 0, 1) = -log(2 pi) / 2
      -0.9189
    """

    logits: jax.Array
    means: jax.Array
    scale_tril: jax.Array

    # ------------------------------------------------------------------------------------- construction

    @classmethod
    def from_weights(
        cls, weights, means, scale_tril, *, atol: float = 1e-4, validate: bool = True
    ) -> GMM:
        """Builds a GMM from weights that sum to one (checked when concrete) instead of logits.

        Args:
          weights: `[..., k]` non-negative mixture weights summing to one within `atol`.
          means: `[..., k, d]` component means.
          scale_tril: `[..., k, d, d]` lower Cholesky factors with positive diagonals.
          atol: tolerance of the sum-to-one check.
          validate: run `validate_gmm` (shapes always, values when concrete).
        """
        weights = jnp.asarray(weights)
        if validate and is_concrete(weights):
            w = np.asarray(weights, dtype=np.float64)
            if np.any(~np.isfinite(w)) or np.any(w < 0):
                raise GMMError(f"weights must be finite and non-negative, got {w}")
            total = w.sum(-1)
            if np.any(np.abs(total - 1.0) > atol):
                raise GMMError(
                    f"weights must sum to one over the last axis (within {atol}); they sum to "
                    f"{np.unique(np.round(total, 6))[:5]}. Normalise them (w / w.sum(-1)) or pass logits."
                )
        gmm = cls(jnp.log(weights), jnp.asarray(means), jnp.asarray(scale_tril))
        if validate:
            validate_gmm(gmm)
        return gmm

    @classmethod
    def from_covariance(cls, logits, means, covariance, *, validate: bool = True) -> GMM:
        """Builds a GMM from full covariance matrices `[..., k, d, d]` (Cholesky-factorised here).

        Concrete covariances are checked for symmetry and positive definiteness before factorising.
        """
        covariance = jnp.asarray(covariance)
        if validate and is_concrete(covariance):
            c = np.asarray(covariance, dtype=np.float64)
            if c.ndim < 2 or c.shape[-1] != c.shape[-2]:
                raise GMMError(f"covariance must be [..., k, d, d], got shape {c.shape}")
            if not np.allclose(c, np.swapaxes(c, -1, -2), rtol=1e-5, atol=1e-8 * np.abs(c).max()):
                raise GMMError("covariance matrices must be symmetric")
            eig = np.linalg.eigvalsh(c)
            if np.any(~np.isfinite(eig)) or np.any(eig <= 0):
                raise GMMError(
                    f"covariance matrices must be positive definite; smallest eigenvalue "
                    f"{np.nanmin(eig):.3g}. Add jitter to the diagonal or fix the input."
                )
        gmm = cls(jnp.asarray(logits), jnp.asarray(means), jnp.linalg.cholesky(covariance))
        if validate:
            validate_gmm(gmm)
        return gmm

    @classmethod
    def from_stddevs(cls, logits, means, stddevs, *, validate: bool = True) -> GMM:
        """Builds a GMM with diagonal covariances from per-dimension standard deviations `[..., k, d]`.

        Component j is N(mu_j, diag(stddevs_j^2)), i.e. `scale_tril = diag(stddevs_j)`: the one-dimensional
        and axis-aligned mixtures need no hand-built Cholesky arrays. Pass `jnp.log(weights)` for weights.
        Concrete standard deviations are checked to have the means' shape and to be finite and positive.

        Example:
          >>> gmm = GMM.from_stddevs(jnp.zeros(2), jnp.array([[-1.0], [1.0]]), jnp.array([[0.5], [2.0]]))
          >>> gmm.covariances[:, 0, 0].tolist()
          [0.25, 4.0]
        """
        stddevs, means = jnp.asarray(stddevs), jnp.asarray(means)
        if validate and stddevs.shape != means.shape:
            raise GMMError(
                f"stddevs have shape {stddevs.shape} but means {means.shape}; both are [..., k, d]"
            )
        if validate and is_concrete(stddevs):
            s = np.asarray(stddevs, dtype=np.float64)
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise GMMError(
                    f"stddevs must be finite and strictly positive; smallest {np.nanmin(s):.3g}"
                )
        tril = stddevs[..., None] * jnp.eye(stddevs.shape[-1], dtype=stddevs.dtype)
        gmm = cls(jnp.asarray(logits), means, tril)
        if validate:
            validate_gmm(gmm)
        return gmm

    @classmethod
    def gaussian(cls, mean, scale_tril) -> GMM:
        """A single Gaussian N(mean, L L^T) as a one-component GMM; `mean` is `[..., d]`."""
        mean, scale_tril = jnp.asarray(mean), jnp.asarray(scale_tril)
        return cls(
            jnp.zeros(mean.shape[:-1] + (1,)), mean[..., None, :], scale_tril[..., None, :, :]
        )

    # ---------------------------------------------------------------------------------------- shapes

    @property
    def num_components(self) -> int:
        return self.means.shape[-2]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.means.shape[:-2]

    @property
    def weights(self) -> jax.Array:
        """Mixture weights `[..., k]`, `softmax(logits)`: non-negative and summing to one."""
        return jax.nn.softmax(self.logits, axis=-1)

    @property
    def log_weights(self) -> jax.Array:
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def covariances(self) -> jax.Array:
        """Component covariances `[..., k, d, d]`, Sigma_j = L_j L_j^T."""
        return self.scale_tril @ jnp.swapaxes(self.scale_tril, -1, -2)

    def __getitem__(self, index) -> GMM:
        """Indexes the batch dimensions (not the components)."""
        return jax.tree.map(lambda a: a[index], self)

    # ------------------------------------------------------------------------------------- densities

    def component_log_prob(self, x: jax.Array) -> jax.Array:
        """log N(x; mu_j, Sigma_j) for every component: `x` `[..., d]` -> `[..., k]`.

        Uses the triangular solve `L_j^{-1}(x - mu_j)` (`mvn_log_prob_tril`); leading dims of `x` broadcast
        against the batch.
        """
        diff = x[..., None, :] - self.means  # [..., k, d]
        shape = jnp.broadcast_shapes(diff.shape, self.means.shape)
        diff = jnp.broadcast_to(diff, shape)
        return mvn_log_prob_tril(diff, jnp.broadcast_to(self.scale_tril, shape + (self.dim,)))

    def log_prob(self, x: jax.Array) -> jax.Array:
        """log q(x) = logsumexp_j(log w_j + log N(x; mu_j, Sigma_j)); `x` `[..., d]` -> `[...]`."""
        return logsumexp(self.log_weights + self.component_log_prob(x), axis=-1)

    def responsibilities(self, x: jax.Array) -> jax.Array:
        """Posterior component probabilities p(j | x) `[..., k]`."""
        return jax.nn.softmax(self.log_weights + self.component_log_prob(x), axis=-1)

    # -------------------------------------------------------------------------------------- sampling

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """Draws `n` samples per mixture: returns `[n, *batch_shape, d]`.

        Component j ~ Categorical(w), then x = mu_j + L_j eps with eps ~ N(0, I).
        """
        k_cat, k_eps = jax.random.split(key)
        shape = (n, *self.batch_shape)
        idx = jax.random.categorical(k_cat, self.logits, axis=-1, shape=shape)
        eps = jax.random.normal(k_eps, shape + (self.dim,), dtype=self.means.dtype)
        mu = jnp.take_along_axis(
            jnp.broadcast_to(self.means, shape + self.means.shape[-2:]),
            idx[..., None, None],
            axis=-2,
        )[..., 0, :]
        tril = jnp.take_along_axis(
            jnp.broadcast_to(self.scale_tril, shape + self.scale_tril.shape[-3:]),
            idx[..., None, None, None],
            axis=-3,
        )[..., 0, :, :]
        return mu + jnp.einsum("...ij,...j->...i", tril, eps)

    # --------------------------------------------------------------------------------------- moments

    def mean(self) -> jax.Array:
        """Mixture mean E[x] = sum_j w_j mu_j, `[..., d]`."""
        return jnp.einsum("...k,...kd->...d", self.weights, self.means)

    def covariance(self) -> jax.Array:
        """Mixture covariance sum_j w_j (Sigma_j + mu_j mu_j^T) - E[x] E[x]^T, `[..., d, d]`."""
        w, m = self.weights, self.mean()
        second = jnp.einsum("...k,...kij->...ij", w, self.covariances) + jnp.einsum(
            "...k,...ki,...kj->...ij", w, self.means, self.means
        )
        return second - m[..., :, None] * m[..., None, :]

    def marginal(self, dims: int | Sequence[int]) -> GMM:
        """The marginal mixture over `dims` (a GMM's marginal is the GMM of the components' marginals).

        The marginal Cholesky factors are re-factorised from Sigma_j[dims, dims].
        """
        dims = [dims] if isinstance(dims, int) else list(dims)
        idx = jnp.asarray(dims)
        cov = self.covariances[..., idx[:, None], idx[None, :]]
        return GMM(self.logits, self.means[..., idx], jnp.linalg.cholesky(cov))

    # ------------------------------------------------------------------------------------ conversion

    def to_numpyro(self):
        """numpyro `MixtureSameFamily(Categorical(logits), MultivariateNormal(means, scale_tril))`."""
        import numpyro.distributions as dist

        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits),
            dist.MultivariateNormal(self.means, scale_tril=self.scale_tril),
        )


def mvn_log_prob_tril(diff: jax.Array, scale_tril: jax.Array) -> jax.Array:
    """log N(diff; 0, L L^T) for lower Cholesky factors L, `diff` `[..., d]` and `scale_tril` `[..., d, d]` of
    the same leading shape -> `[...]`: -|L^{-1} diff|^2 / 2 - sum_i log L_ii - d log(2 pi) / 2, by triangular solve.
    """
    white = solve_triangular(scale_tril, diff[..., None], lower=True)[..., 0]
    half_log_det = jnp.sum(jnp.log(jnp.diagonal(scale_tril, axis1=-2, axis2=-1)), -1)
    return -0.5 * jnp.sum(white**2, -1) - half_log_det - 0.5 * diff.shape[-1] * _LOG_2PI


def validate_gmm(gmm: GMM, *, name: str = "GMM") -> None:
    """Checks a GMM in plain Python and raises `GMMError` naming what is wrong and how to fix it.

    Shapes are always checked: `logits` `[..., k]`, `means` `[..., k, d]`, `scale_tril` `[..., k, d, d]` with
    the same batch shape. When the values are concrete (not inside `jit`), also: finite logits and means, lower
    triangular `scale_tril` with a finite, strictly positive diagonal (that is, positive-definite covariances).
    """
    lg, mu, tril = (jnp.shape(a) for a in (gmm.logits, gmm.means, gmm.scale_tril))
    if len(mu) < 2:
        raise GMMError(f"{name}.means must be [..., k, d], got shape {mu}")
    k, d = mu[-2], mu[-1]
    if len(lg) < 1 or lg[-1] != k or lg[:-1] != mu[:-2]:
        raise GMMError(
            f"{name}.logits has shape {lg} but means {mu} imply [..., k] = {mu[:-2] + (k,)}"
        )
    if tril != mu + (d,):
        raise GMMError(
            f"{name}.scale_tril has shape {tril} but means {mu} imply [..., k, d, d] = {mu + (d,)}"
        )
    if not all(is_concrete(a) for a in (gmm.logits, gmm.means, gmm.scale_tril)):
        return
    logits, means, L = (np.asarray(a) for a in (gmm.logits, gmm.means, gmm.scale_tril))
    if np.any(np.isnan(logits)) or np.any(logits == np.inf):
        raise GMMError(
            f"{name}.logits must be finite or -inf (zero weight); got {logits.ravel()[:8]}"
        )
    if np.any(np.all(logits == -np.inf, axis=-1)):
        raise GMMError(f"{name} has a mixture whose weights are all zero (every logit is -inf)")
    if not np.all(np.isfinite(means)):
        raise GMMError(f"{name}.means must be finite")
    if not np.all(np.isfinite(L)):
        raise GMMError(f"{name}.scale_tril must be finite")
    if np.any(np.triu(L, 1) != 0):
        raise GMMError(
            f"{name}.scale_tril must be lower triangular (a Cholesky factor); pass "
            "GMM.from_covariance(...) to factorise full covariance matrices"
        )
    diag = np.diagonal(L, axis1=-2, axis2=-1)
    if np.any(diag <= 0):
        raise GMMError(
            f"{name}.scale_tril needs a strictly positive diagonal (positive-definite covariance); "
            f"smallest diagonal entry {diag.min():.3g}"
        )


# ------------------------------------------------------------------------------------------------ KL


def kl_monte_carlo(key: jax.Array, p_sample_fn, p_log_prob_fn, q_log_prob_fn, n: int) -> jax.Array:
    """Monte Carlo KL(p || q) = E_p[log p(x) - log q(x)] with `n` samples of p.

    Args:
      key: PRNG key.
      p_sample_fn: `(key, n) -> [n, ..., d]` samples of p.
      p_log_prob_fn, q_log_prob_fn: `[n, ..., d] -> [n, ...]` log densities (in the same space).
      n: number of samples.

    Returns:
      `[...]` the estimate per problem of the batch.
    """
    x = p_sample_fn(key, n)
    return jnp.mean(p_log_prob_fn(x) - q_log_prob_fn(x), axis=0)


def kl_gmm(key: jax.Array, p: GMM, q: GMM, n: int = 10_000) -> jax.Array:
    """Monte Carlo KL(p || q) between two (batched) GMMs in the same space, `[*batch_shape]`."""
    return kl_monte_carlo(key, p.sample, p.log_prob, q.log_prob, n)


# -------------------------------------------------------------------------------- sample-space transforms

_TRANSFORMS = ("identity", "log", "logit")


@flax.struct.dataclass
class SampleSpaceTransform:
    """An elementwise bijection f from the latent's space onto R^d, one kind per dimension.

    The GMM q lives on y = f(x); the density in the latent's space is q_x(x) = q(f(x)) |det df/dx|
    (reference notes Sec. 2). Kinds: "identity", "log" (x > 0), "logit" (0 < x < 1).

    Attributes:
      kinds: a tuple of kinds, one per dimension (static).
    """

    kinds: tuple[str, ...] = flax.struct.field(pytree_node=False, default=("identity",))

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in _TRANSFORMS]
        if bad:
            raise ValueError(f"unknown sample-space transform(s) {bad}; choose from {_TRANSFORMS}")

    def forward(self, x: jax.Array) -> jax.Array:
        """y = f(x), elementwise over the last axis."""
        return jnp.stack([_forward(k, x[..., i]) for i, k in enumerate(self.kinds)], -1)

    def inverse(self, y: jax.Array) -> jax.Array:
        """x = f^{-1}(y)."""
        return jnp.stack([_inverse(k, y[..., i]) for i, k in enumerate(self.kinds)], -1)

    def log_abs_det_jacobian(self, x: jax.Array) -> jax.Array:
        """log |det df/dx| at x, `[..., d] -> [...]` (log: -log x; logit: -log x - log(1 - x))."""
        return sum(_log_jac(k, x[..., i]) for i, k in enumerate(self.kinds))

    def log_abs_det_jacobian_at(self, y: jax.Array) -> jax.Array:
        """log |det df/dx| at x = f^{-1}(y), computed stably from y (log: -y; logit: softplus(y) +
        softplus(-y)), `[..., d] -> [...]`."""
        return sum(_log_jac_at_y(k, y[..., i]) for i, k in enumerate(self.kinds))

    def log_prob(self, gmm: GMM, x: jax.Array) -> jax.Array:
        """Density of the latent in its own space: log q(f(x)) + log |det df/dx|."""
        return gmm.log_prob(self.forward(x)) + self.log_abs_det_jacobian(x)


def _forward(kind, x):
    if kind == "log":
        return jnp.log(x)
    if kind == "logit":
        return jnp.log(x) - jnp.log1p(-x)
    return x


def _inverse(kind, y):
    if kind == "log":
        return jnp.exp(y)
    if kind == "logit":
        return jax.nn.sigmoid(y)
    return y


def _log_jac(kind, x):
    if kind == "log":
        return -jnp.log(x)
    if kind == "logit":
        return -jnp.log(x) - jnp.log1p(-x)
    return jnp.zeros_like(x)


def _log_jac_at_y(kind, y):
    if kind == "log":
        return -y
    if kind == "logit":
        return jax.nn.softplus(y) + jax.nn.softplus(-y)
    return jnp.zeros_like(y)
