r"""The linear algebra of deep kernel machines: jittered Cholesky factors that escalate instead of failing, and
the Gaussian KL divergences of the DKM objective.

Jitter lives here, where matrices are factorised, not in the kernels: a kernel K is factorised as
chol(K o (1 + j I) + j I), the official code's relative-plus-absolute jitter with j = 1e-4 by default. When that
factorisation fails (a non-finite factor: the matrix is not positive definite in the working precision), the
jitter is raised tenfold, up to `MAX_ESCALATIONS` times, inside the compiled program (a `lax.while_loop` that
only runs on failure, so the usual case costs one factorisation). The number of escalations comes back beside
the factor, and the public functions of `theorax.inference.dkm` warn about it outside `jit`: a result is never
NaN without a warning or an error.

A kernel block that conditionals and KL terms use (`factorize`) is held in float64 as its inverse K_j^-1, so that
what the sparse DKM does with it is matrix products (fewer and faster on the CPU than triangular solves; see
`factorize`), and in float32 as its Cholesky factor, whose triangular solves stay accurate where an explicit
inverse would not.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import solve_triangular

__all__ = [
    "JITTER",
    "MAX_ESCALATIONS",
    "add_jitter",
    "cholesky",
    "Factor",
    "factorize",
    "kl",
    "jitter_levels",
    "gaussian_kl",
    "kl_from_cholesky",
    "check_jitter",
]

JITTER = 1e-4  # the official code's jitter: K o (1 + 1e-4 I) + 1e-4 I
MAX_ESCALATIONS = 4


def jitter_levels(jitter: float) -> tuple[float, ...]:
    """The jitters tried in turn: `jitter`, then tenfold steps from max(jitter, 1e-8).

    >>> jitter_levels(1e-4)[:3]
    (0.0001, 0.001, 0.01)
    """
    base = max(float(jitter), 1e-8)
    return (float(jitter),) + tuple(base * 10.0**i for i in range(1, MAX_ESCALATIONS + 1))


def add_jitter(k: jax.Array, jitter: float) -> jax.Array:
    """K o (1 + j I) + j I: the diagonal scaled by (1 + j) and raised by j (the official stabilisation)."""
    if jitter == 0.0:
        return k
    d = jnp.diagonal(k)
    return k + jnp.diag(jitter * d + jitter)


def cholesky(k: jax.Array, jitter: float = JITTER) -> tuple[jax.Array, jax.Array]:
    """The lower Cholesky factor of K with jitter, escalating the jitter while the factorisation fails.

    The escalation is a `lax.while_loop` that runs only when the first factorisation fails; the derivative is
    the Cholesky factor's own (dL = L Phi(L^-1 dK_j L^-T), Phi the lower triangle with half its diagonal,
    K_j the jittered matrix), so reverse-mode differentiation works and costs no extra factorisation.

    Args:
      k: a symmetric (M, M) matrix (its lower triangle is used after symmetrising, as `jnp.linalg.cholesky`).
      jitter: the first relative-and-absolute jitter j (see `add_jitter`); 0 factorises K itself first.

    Returns:
      (L, level): L L^T = K o (1 + j' I) + j' I for the first j' = `jitter_levels(jitter)[level]` whose
      factor is finite; `level` is an int32 scalar (0: no escalation). When every level fails L is not finite,
      and `level` is `MAX_ESCALATIONS + 1`.

    >>> L, level = cholesky(jnp.array([[1.0, 1.0], [1.0, 1.0]]), jitter=0.0)  # singular: escalates
    >>> int(level) > 0, bool(jnp.all(jnp.isfinite(L)))
    (True, True)
    """
    return _escalating_cholesky(jitter_levels(jitter))(k)


@functools.cache
def _escalating_cholesky(levels: tuple[float, ...]):
    """The escalating factorisation for one tuple of jitter levels (a static part of the function)."""

    def factor(k, level):
        j = jnp.asarray(levels, k.dtype)[level]
        sym = 0.5 * (k + k.T)  # symmetrised here, once (not again inside the factorisation)
        return lax.linalg.cholesky(
            sym + jnp.diag(j * jnp.diagonal(sym) + j), symmetrize_input=False
        )

    def bad(chol):
        return ~jnp.all(jnp.isfinite(chol))

    @jax.custom_jvp
    def escalate(k):
        chol, level = lax.while_loop(
            lambda c: bad(c[0]) & (c[1] < len(levels) - 1),
            lambda c: (factor(k, c[1] + 1), c[1] + 1),
            (factor(k, jnp.zeros((), jnp.int32)), jnp.zeros((), jnp.int32)),
        )
        return chol, jnp.where(bad(chol), len(levels), level)

    @escalate.defjvp
    def escalate_jvp(primals, tangents):
        (k,), (dk,) = primals, tangents
        chol, level = escalate(k)
        j = jnp.asarray(levels, k.dtype)[jnp.minimum(level, len(levels) - 1)]
        dk = 0.5 * (dk + dk.T)
        dk = dk + jnp.diag(j * jnp.diagonal(dk))
        white = solve_triangular(chol, solve_triangular(chol, dk, lower=True).T, lower=True)
        phi = jnp.tril(white) - 0.5 * jnp.diag(jnp.diagonal(white))
        return (chol, level), (chol @ phi, np.zeros((), dtype=jax.dtypes.float0))

    return escalate


class Factor(NamedTuple):
    """A factorised kernel block K_j (the jittered K): exactly one of `chol` (its lower Cholesky factor) and
    `inv` (K_j^-1) is set; `logdet` is log det K_j and `level` the jitter escalation (see `cholesky`)."""

    chol: jax.Array | None
    inv: jax.Array | None
    logdet: jax.Array
    level: jax.Array


def factorize(k: jax.Array, jitter: float = JITTER, inverse: bool | None = None) -> Factor:
    r"""K factorised for conditionals and KL terms (`objectives.conditional`, `kl`): its inverse or its factor.

    With `inverse` (the default in float64) the factor is K_j^-1 = L^-T L^-1 from `cholesky`'s L, and its
    derivative is the inverse's own, d K^-1 = -K^-1 dK_j K^-1 and d log det = tr(K^-1 dK_j): two M x M products
    in reverse mode where the factor's derivative takes two triangular solves and a product. What uses K^-1
    then needs one (B, M) by (M, M) product per conditional fewer than with L (`objectives.conditional`),
    and a KL needs no M x M solve at all: at M = 100, B = 250 on the CPU a layer's conditional and KL with
    their gradients are ~1.5x faster, the sparse DKM's whole epoch ~1.2x (README, DKM speed). In float32
    the explicit inverse loses the Schur complement k_t - K_ti K^-1 K_it to round-off (1e-3 to 1e-2 relative
    at cond(K) ~ 1e4, against 2e-5 by triangular solves), so there the factor is L (`inverse=False`).

    >>> f = factorize(jnp.array([[4.0, 2.0], [2.0, 2.0]]), jitter=0.0, inverse=True)
    >>> f.inv, float(f.logdet) == float(jnp.log(4.0))
    (Array([[ 0.5, -0.5],
           [-0.5,  1. ]], dtype=float32), True)
    """
    if inverse is None:
        inverse = k.dtype == jnp.float64
    if not inverse:
        chol, level = cholesky(k, jitter)
        return Factor(chol, None, _logdet(chol), level)
    inv, logdet, level = _escalating_inverse(jitter_levels(jitter))(k)
    return Factor(None, inv, logdet, level)


@functools.cache
def _escalating_inverse(levels: tuple[float, ...]):
    """K_j^-1 and log det K_j with the inverse's derivative, for one tuple of jitter levels."""
    factor = _escalating_cholesky(levels)

    @jax.custom_jvp
    def inverse(k):
        chol, level = factor(k)
        white = solve_triangular(chol, jnp.eye(k.shape[-1], dtype=k.dtype), lower=True)
        return white.T @ white, _logdet(chol), level

    @inverse.defjvp
    def inverse_jvp(primals, tangents):
        (k,), (dk,) = primals, tangents
        inv, logdet, level = inverse(k)
        j = jnp.asarray(levels, k.dtype)[jnp.minimum(level, len(levels) - 1)]
        dk = 0.5 * (dk + dk.T)
        dk = dk + jnp.diag(j * jnp.diagonal(dk))
        float0 = np.zeros((), dtype=jax.dtypes.float0)
        return (inv, logdet, level), (-(inv @ dk @ inv), jnp.sum(inv * dk), float0)

    return inverse


def outer(chol: jax.Array) -> jax.Array:
    r"""chol chol^T, whose derivative dL L^T + L dL^T is formed from the one product S = dL L^T (S + S^T).

    Its reverse mode is then one product, (C + C^T) L, where autodiff of `chol @ chol.T` takes two (C L and
    C^T L, one per operand). A covariance that several terms use (a Gram layer's G_ii = L L^T in its KL, its
    conditional and the next kernel) is formed once with it, so that their cotangents add before that one
    product.

    >>> outer(jnp.array([[1.0, 0.0], [2.0, 3.0]]))
    Array([[ 1.,  2.],
           [ 2., 13.]], dtype=float32)
    """
    return _outer(chol)


@jax.custom_jvp
def _outer(chol):
    return chol @ chol.T


@_outer.defjvp
def _outer_jvp(primals, tangents):
    (chol,), (dchol,) = primals, tangents
    s = dchol @ chol.T
    return _outer(chol), s + s.T


def kl(
    chol_q: jax.Array, p: Factor, mean: jax.Array | None = None, q: jax.Array | None = None
) -> jax.Array:
    r"""KL(N(mu_c, A) || N(0, K)) summed over the columns c of `mean`, A = chol_q chol_q^T and K given by its
    `Factor` `p`: `kl_from_cholesky` for a Cholesky factor, and for an inverse the same formula with
    tr(K^-1 A) = sum(K^-1 o A) and mu^T K^-1 mu as products (A itself is `q` when given, else `outer(chol_q)`).

    >>> k = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    >>> chol = jnp.linalg.cholesky(k)
    >>> [round(abs(float(kl(chol, factorize(k, 0.0, inverse)))), 6) for inverse in (False, True)]
    [0.0, 0.0]
    """
    if p.inv is None:
        return kl_from_cholesky(chol_q, p.chol, mean)
    m = chol_q.shape[-1]
    columns = 1 if mean is None else mean.shape[-1]
    trace = jnp.sum(p.inv * (outer(chol_q) if q is None else q))
    value = 0.5 * columns * (trace - m + p.logdet - _logdet(chol_q))
    if mean is not None:
        value = value + 0.5 * jnp.sum(mean * (p.inv @ mean))
    return value


def _logdet(chol: jax.Array) -> jax.Array:
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))


def kl_from_cholesky(
    chol_q: jax.Array, chol_p: jax.Array, mean: jax.Array | None = None
) -> jax.Array:
    r"""KL(N(mu_c, A) || N(0, K)) summed over the columns c of `mean`, from A = chol_q chol_q^T and
    K = chol_p chol_p^T.

    KL = 1/2 [C (tr(K^-1 A) - M + log det K - log det A) + sum_c mu_c^T K^-1 mu_c], with tr(K^-1 A) =
    ||chol_p^-1 chol_q||_F^2. Without `mean` it is the zero-mean KL of a Gram layer, C = 1 (the DKM regulariser
    KL(N(0, G) || N(0, K(G_{l-1}))), reference notes Sec. 2.1).

    >>> chol = jnp.linalg.cholesky(jnp.array([[2.0, 0.5], [0.5, 1.0]]))
    >>> abs(float(kl_from_cholesky(chol, chol))) < 1e-6
    True
    """
    m = chol_p.shape[-1]
    half = solve_triangular(chol_p, chol_q, lower=True)
    columns = 1 if mean is None else mean.shape[-1]
    kl = 0.5 * columns * (jnp.sum(half * half) - m + _logdet(chol_p) - _logdet(chol_q))
    if mean is not None:
        white = solve_triangular(chol_p, mean, lower=True)
        kl = kl + 0.5 * jnp.sum(white * white)
    return kl


def gaussian_kl(g: jax.Array, k: jax.Array, jitter: float = 0.0) -> tuple[jax.Array, jax.Array]:
    r"""KL(N(0, G) || N(0, K)) = 1/2 [tr(K^-1 G) - log det(K^-1 G) - P] of two (P, P) covariances.

    Both are factorised by `cholesky` with `jitter` (0 by default: the matrices as given, escalating only if
    that fails). Returns (kl, level), level the larger escalation of the two factorisations.

    >>> k = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    >>> kl, level = gaussian_kl(k, k)
    >>> abs(float(kl)) < 1e-6, int(level)
    (True, 0)
    """
    chol_g, level_g = cholesky(g, jitter)
    chol_k, level_k = cholesky(k, jitter)
    return kl_from_cholesky(chol_g, chol_k), jnp.maximum(level_g, level_k)


def check_jitter(level, where: str, jitter: float) -> None:
    """Outside `jit`: warns when a factorisation escalated its jitter, raises when every level failed.

    `level` is the (concrete) maximum escalation level a computation returned.
    """
    level = int(level)
    if level == 0:
        return
    levels = jitter_levels(jitter)
    if level > MAX_ESCALATIONS:
        raise FloatingPointError(
            f"{where}: a kernel or Gram matrix could not be factorised even with jitter {levels[-1]:g}: it "
            "is not positive definite or is far too ill-conditioned (check the inputs for NaNs or duplicated "
            "points, use float64, or lower the learning rate)"
        )
    warnings.warn(
        f"{where}: a Cholesky factorisation failed with jitter {levels[0]:g}; the jitter was escalated to "
        f"{levels[level]:g}. The matrix is ill-conditioned: results are approximate (use float64, a larger "
        "jitter, or fewer / better-spread inducing points)",
        RuntimeWarning,
        stacklevel=3,
    )
