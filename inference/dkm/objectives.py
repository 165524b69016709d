r"""The DKM objective, its likelihoods, and the conditional formulas that carry Gram blocks to new points.

The objective of a deep kernel machine with Gram matrices G_1..G_L over the P training points (Yang et al.,
ICML 2023; reference notes Sec. 2.1) is

    L(G_1..G_L) = log P(Y | G_L) - sum_l nu_l KL(N(0, G_l) || N(0, K(G_{l-1}))),   G_0 = X X^T / N_0,

with log P(Y | G_L) = sum_c log N(y_c; 0, K(G_L) + sigma^2 I) for regression. For a categorical likelihood
log P(Y | G_L) has no closed form; its evidence lower bound with a Gaussian q(F) = N(mu_c, A) per class,
E_q[log P(Y | F)] - s sum_c KL(N(mu_c, A) || N(0, K(G_L))), takes its place (s = 1 is the bound itself; the
official code tempers it by s = 1 / C).

The sparse DKM learns only the inducing block G_ii of each layer and carries the points' blocks through the
conditional formulas of the official `GramLayer` (reference notes Sec. 2.3), with K = K(G_{l-1}):

    G_ti = K_ti K_ii^-1 G_ii,
    g_t  = k_t - diag(K_ti K_ii^-1 K_it) + diag(K_ti K_ii^-1 G_ii K_ii^-1 K_it),

and the output layer q(f_i) = N(mu, A) gives the points' marginals mean K_ti K_ii^-1 mu and variance
k_t - diag(K_ti K_ii^-1 K_it) + diag(K_ti K_ii^-1 A K_ii^-1 K_it): the same formula with A for G_ii.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from theorax.inference.dkm import _checks, linalg
from theorax.models import dkm as kernels
from theorax.models.dkm import GramBlocks

__all__ = [
    "conditional",
    "propagate",
    "gaussian_log_marginal",
    "gaussian_log_marginal_of",
    "gaussian_expected_log_lik",
    "categorical_expected_log_lik",
    "objective",
]


def conditional(
    k: GramBlocks,
    factor: linalg.Factor,
    chol_q: jax.Array,
    mean: jax.Array | None = None,
    q: jax.Array | None = None,
) -> tuple[jax.Array | None, jax.Array, jax.Array]:
    r"""The conditional formulas at B points: their means, their cross block K_ti K_ii^-1 Q and their variances.

    Args:
      k: kernel blocks (ii, ti, t) with `ti` of shape (B, M).
      factor: k.ii factorised (`linalg.factorize`, with the jitter).
      chol_q: a factor of the inducing block's covariance Q = chol_q chol_q^T (G_ii of a Gram layer, A of
        the output layer).
      mean: optional inducing means mu (M, C).
      q: Q itself when the caller has it (the inverse path uses it; else `linalg.outer(chol_q)`). Passing the
        Q that other terms use too makes their derivatives share its one backward product.

    Returns:
      (mean_t, cross, var): mean_t = K_ti K_ii^-1 mu of shape (B, C) (None without `mean`), cross = K_ti
      K_ii^-1 Q of shape (B, M) (a Gram layer's G_ti), and var = k_t - diag(K_ti K_ii^-1 K_it) +
      diag(K_ti K_ii^-1 Q K_ii^-1 K_it) of shape (B,). The first two terms of var (a Schur complement,
      non-negative in exact arithmetic) are clamped at 0 against round-off, and so is the third.

    With K_ii^-1 the (B, M)-wide work is two products, A = K_ti K_ii^-1 and cross = A Q (then var = k_t -
    rowsum(A o K_ti) + rowsum(A o cross)); with the factor L it is a triangular solve and two products, half =
    L^-1 K_it, QW = (L^-1 chol_q)^T half and cross = QW^T chol_q^T (var from the squares of half and QW).
    """
    if factor.inv is not None:
        a = k.ti @ factor.inv
        cross = a @ (linalg.outer(chol_q) if q is None else q)
        schur = jnp.maximum(k.t - jnp.sum(a * k.ti, axis=1), 0.0)
        mean_t = None if mean is None else a @ mean
        return mean_t, cross, schur + jnp.maximum(jnp.sum(a * cross, axis=1), 0.0)
    half = solve_triangular(factor.chol, k.ti.T, lower=True)
    qw = solve_triangular(factor.chol, chol_q, lower=True).T @ half
    schur = jnp.maximum(k.t - jnp.sum(half * half, axis=0), 0.0)
    mean_t = None if mean is None else half.T @ solve_triangular(factor.chol, mean, lower=True)
    return mean_t, qw.T @ chol_q.T, schur + jnp.sum(qw * qw, axis=0)


def propagate(
    k: GramBlocks, factor: linalg.Factor, chol_g: jax.Array, g_ii: jax.Array | None = None
) -> GramBlocks:
    r"""A Gram layer's blocks from the next kernel's blocks and its inducing Gram G_ii = chol_g chol_g^T.

    G_ti = K_ti K_ii^-1 G_ii and g_t = k_t - diag(K_ti K_ii^-1 K_it) + diag(K_ti K_ii^-1 G_ii K_ii^-1 K_it)
    (reference notes Sec. 2.3), with `factor` K_ii factorised (`linalg.factorize`). Without points
    (`k.ti is None`) only G_ii. `g_ii`: G_ii when the caller has formed it (else `linalg.outer(chol_g)`).
    """
    g_ii = linalg.outer(chol_g) if g_ii is None else g_ii
    if k.ti is None:
        return GramBlocks(g_ii)
    _, g_ti, g_t = conditional(k, factor, chol_g, q=g_ii)
    return GramBlocks(g_ii, g_ti, g_t)


def gaussian_log_marginal(chol_y: jax.Array, y: jax.Array) -> jax.Array:
    r"""sum_c log N(y_c; 0, K_y) for targets Y (P, C) given chol_y, the Cholesky factor of K_y = K + sigma^2 I."""
    p, c = y.shape
    white = solve_triangular(chol_y, y, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_y)))
    return -0.5 * (jnp.sum(white * white) + c * logdet + p * c * math.log(2.0 * math.pi))


def gaussian_log_marginal_of(
    k_y: jax.Array, y: jax.Array, jitter: float
) -> tuple[jax.Array, jax.Array]:
    r"""sum_c log N(y_c; 0, K_y) from K_y itself, and the jitter escalation of its factorisation.

    K_y is factorised by `linalg.cholesky(k_y, jitter)`; the value is `gaussian_log_marginal` of that factor.
    The gradient is the closed form d/dK_j = (A A^T - C K_j^-1) / 2 with A = K_j^-1 Y and K_j the jittered
    matrix (then carried through the jitter's diagonal scaling), instead of the Cholesky factor's own
    derivative: one inverse from the factor (a triangular solve and a product, ~3 N^3 flops) where
    differentiating through the factor costs two N x N triangular solves and an N x N product more.
    """
    return _log_marginal(k_y, y, float(jitter))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _log_marginal(k_y, y, jitter):
    return _log_marginal_fwd(k_y, y, jitter)[0]


def _log_marginal_fwd(k_y, y, jitter):
    chol, level = linalg.cholesky(k_y, jitter)
    alpha = solve_triangular(chol, solve_triangular(chol, y, lower=True), lower=True, trans="T")
    return (gaussian_log_marginal(chol, y), level), (chol, alpha, level)


def _log_marginal_bwd(jitter, residuals, cotangents):
    chol, alpha, level = residuals
    g, _ = cotangents
    levels = linalg.jitter_levels(jitter)
    j = jnp.asarray(levels, chol.dtype)[jnp.minimum(level, len(levels) - 1)]
    eye = jnp.eye(chol.shape[0], dtype=chol.dtype)
    linv = solve_triangular(chol, eye, lower=True)
    grad = 0.5 * g * (alpha @ alpha.T - alpha.shape[1] * (linv.T @ linv))
    grad = 0.5 * (grad + grad.T)
    return grad + jnp.diag(j * jnp.diagonal(grad)), -g * alpha


_log_marginal.defvjp(_log_marginal_fwd, _log_marginal_bwd)


def gaussian_expected_log_lik(
    mean: jax.Array, var: jax.Array, y: jax.Array, noise_var: jax.Array
) -> jax.Array:
    r"""E_{f ~ N(mean, var)} log N(y; f, sigma^2) per point, summed over output columns (closed form):
    -1/2 log(2 pi sigma^2) - ((y - mean)^2 + var) / (2 sigma^2). `var` has shape (B,), mean and y (B, C)."""
    sq = (y - mean) ** 2 + var[:, None]
    return jnp.sum(-0.5 * jnp.log(2.0 * math.pi * noise_var) - 0.5 * sq / noise_var, axis=-1)


def categorical_expected_log_lik(
    mean: jax.Array, var: jax.Array, labels: jax.Array, key: jax.Array, samples: int
) -> jax.Array:
    r"""E_{f ~ N(mean, var)} log softmax(f)_y per point, by Monte Carlo over the output GP's marginals
    (`samples` reparametrised draws; the official code uses 1000). `mean` (B, C) logits, `var` (B,)."""
    eps = jax.random.normal(key, (samples, *mean.shape), mean.dtype)
    f = mean + jnp.sqrt(var)[:, None] * eps
    logp = jax.nn.log_softmax(f, axis=-1)
    picked = jnp.take_along_axis(logp, labels[None, :, None], axis=-1)[..., 0]
    return jnp.mean(picked, axis=0)


def _as_layers(nu, depth: int) -> tuple[float, ...]:
    return _checks.nu_tuple(nu, depth)


def objective(
    grams: Sequence[jax.Array],
    x: jax.Array,
    y: jax.Array,
    *,
    nu: float | Sequence[float],
    kernel: str | Callable = "relu",
    kernel_params: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
    noise_var: float = 0.1,
    likelihood: str = "gaussian",
    output: tuple[jax.Array, jax.Array] | None = None,
    key: jax.Array | None = None,
    mc_samples: int = 100,
    output_kl_scale: float = 1.0,
    jitter: float = linalg.JITTER,
    dtype: str = "float64",
) -> jax.Array:
    r"""The full-data DKM objective L(G_1..G_L) = log P(Y | G_L) - sum_l nu_l KL(N(0, G_l) || N(0, K(G_{l-1}))).

    G_0 = X X^T / N_0; each K(G) is factorised with the official jitter (`linalg.cholesky`), escalating it
    with a warning when that fails. The Gram matrices G_l themselves are factorised as given (no jitter unless
    their factorisation fails). nu_l = inf (an NNGP layer) requires G_l = K(G_{l-1}); its term is 0.

    Args:
      grams: the L hidden-layer Gram matrices G_1..G_L, each (P, P) and positive definite.
      x: inputs (P, N_0).
      y: targets: (P,) or (P, C) for "gaussian", integer labels (P,) for "categorical".
      nu: nu_l > 0 per layer (a number for every layer, or one per layer).
      kernel: a kernel name of `theorax.models.dkm.KERNELS` or a function gram -> kernel.
      kernel_params: the kernel's hyper-parameters, one mapping for all L + 1 kernels or one per kernel.
      noise_var: sigma^2 of the Gaussian likelihood (>= 0).
      likelihood: "gaussian" (exact log marginal likelihood) or "categorical" (the ELBO of `output`).
      output: for "categorical", the variational posterior (mean (P, C), covariance A (P, P)) over the output
        GP at the training points.
      key: for "categorical", the PRNG key of the Monte Carlo expectation.
      mc_samples: Monte Carlo samples of the categorical expectation.
      output_kl_scale: s, the weight of the output KL in the categorical ELBO.
      jitter: the first jitter of the kernel factorisations.
      dtype: "float64" (computed in a `jax.enable_x64` scope) or "float32".

    Returns:
      The objective, a scalar (a sum over training points, not a mean).

    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> y = jnp.array([0.5, -0.5, 0.2])
    >>> g1 = nngp_gram(x, 1, "relu")  # the NNGP Gram: every KL term vanishes
    >>> bool(jnp.isclose(objective([g1], x, y, nu=1.0, jitter=0.0), objective([g1], x, y, nu=10.0, jitter=0.0)))
    True
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r} must be 'float32' or 'float64'")
    with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
        return _objective(grams, x, y, nu, kernel, kernel_params, noise_var, likelihood, output, key,
                          mc_samples, output_kl_scale, jitter)  # fmt: skip


def _objective(grams, x, y, nu, kernel, kernel_params, noise_var, likelihood, output, key, mc_samples,
               output_kl_scale, jitter):  # fmt: skip
    depth = len(grams)
    nu = _as_layers(nu, depth)
    x, y = _checks.data(x, y, likelihood)
    params = _checks.per_layer_kernel_params(kernel, kernel_params, depth + 1)
    grams = [_checks.psd_gram(g, f"grams[{i}]", x.shape[0]) for i, g in enumerate(grams)]
    if likelihood == "categorical" and (output is None or key is None):
        raise ValueError("likelihood='categorical' needs output=(mean, covariance) and a PRNG key")
    value, level = _objective_jit(
        tuple(grams), x, y, output, key, nu, kernel, _freeze(params), float(noise_var),
        likelihood, int(mc_samples), float(output_kl_scale), float(jitter),
    )  # fmt: skip
    linalg.check_jitter(level, "objective", jitter)
    return value


def _freeze(params):
    return tuple(tuple(sorted(p.items())) for p in params)


@functools.partial(
    jax.jit,
    static_argnames=(
        "nu", "kernel", "params", "noise_var", "likelihood", "mc_samples", "output_kl_scale", "jitter",
    ),
)  # fmt: skip
def _objective_jit(
    grams, x, y, output, key, nu, kernel, params, noise_var, likelihood, mc_samples,
    output_kl_scale, jitter,
):  # fmt: skip
    fn = kernels.kernel_fn(kernel)
    g = kernels.input_gram(x)
    value, level = 0.0, jnp.zeros((), jnp.int32)
    for layer, g_next in enumerate(grams):
        k = fn(g, **dict(params[layer]))
        if math.isinf(nu[layer]):
            g = k
            continue
        chol_k, lk = linalg.cholesky(k, jitter)
        chol_g, lg = linalg.cholesky(g_next, 0.0)
        value = value - nu[layer] * linalg.kl_from_cholesky(chol_g, chol_k)
        level = jnp.maximum(level, jnp.maximum(lk, lg))
        g = g_next
    k = fn(g, **dict(params[-1]))
    if likelihood == "gaussian":
        p = k.shape[0]
        log_marginal, ly = gaussian_log_marginal_of(
            k + noise_var * jnp.eye(p, dtype=k.dtype), y, jitter
        )
        return value + log_marginal, jnp.maximum(level, ly)
    mean, cov = output
    chol_k, lk = linalg.cholesky(k, jitter)
    chol_a, la = linalg.cholesky(cov, 0.0)
    ell = categorical_expected_log_lik(mean, jnp.diagonal(cov), y, key, mc_samples)
    kl = linalg.kl_from_cholesky(chol_a, chol_k, mean)
    value = value + jnp.sum(ell) - output_kl_scale * kl
    return value, jnp.maximum(level, jnp.maximum(lk, la))


def nngp_gram(
    x: jax.Array,
    depth: int,
    kernel: str | Callable = "relu",
    kernel_params: Mapping[str, float] | Sequence[Mapping[str, float]] | None = None,
) -> jax.Array:
    r"""The NNGP Gram matrix G_depth of the recursion G_0 = X X^T / N_0, G_l = K(G_{l-1}).

    It is the DKM's solution as nu -> infinity (every KL term forces G_l = K(G_{l-1})), and the initialisation
    of every DKM fitted here. The output GP's covariance is K(G_depth).

    Args:
      x: inputs (P, N_0).
      depth: the number of hidden layers L >= 0 (0 returns G_0).
      kernel: a kernel name of `theorax.models.dkm.KERNELS` or a function gram -> kernel.
      kernel_params: the kernel's hyper-parameters, one mapping for every layer or one per layer (the first
        `depth` are used). For a name, unset ones take `KERNEL_DEFAULTS`.

    Returns:
      G_depth, (P, P).

    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> nngp_gram(x, 1, "relu", {"bias_var": 0.0})  # orthogonal unit inputs: 1 / (2 pi) off the diagonal
    Array([[0.5       , 0.15915494],
           [0.15915494, 0.5       ]], dtype=float32)
    """
    depth = _checks.non_negative_int(depth, "depth")
    x = _checks.inputs(x)
    params = _checks.per_layer_kernel_params(kernel, kernel_params, max(depth, 1))
    return _nngp_jit(x, depth, kernel, _freeze(params))


@functools.partial(jax.jit, static_argnames=("depth", "kernel", "params"))
def _nngp_jit(x, depth, kernel, params):
    fn = kernels.kernel_fn(kernel)
    g = kernels.input_gram(x)
    for layer in range(depth):
        g = fn(g, **dict(params[layer]))
    return g
