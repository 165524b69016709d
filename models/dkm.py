r"""Kernels computed from a Gram matrix alone, the building block of deep kernel machines.

A deep kernel machine (Yang, Robeyns, Milsom, Anson, Schoots, Aitchison, ICML 2023) never sees features: each
layer maps a Gram matrix G (the features' inner products divided by their number) to a kernel K(G) that depends
on G alone. The input Gram is G_0 = X X^T / N_0 (`input_gram`); a kernel K(G) is the covariance of the next
layer's Gaussian features.

Every kernel here takes either a full P x P Gram matrix or the inducing-point blocks `GramBlocks(ii, ti, t)`
(inducing Gram, test-by-inducing block, test diagonal: what the sparse DKM carries from layer to layer, since the
points are independent given the inducing points) and returns the same kind. They return the kernel itself:
the jitter that makes a kernel safe to factorise is added where it is factorised
(`theorax.inference.dkm.linalg.cholesky`).

Kernels (reference notes Sec. 2.2; the official `dkm/kernels.py` conventions):

* `relu_kernel`: the arc-cosine kernel of a ReLU layer in the DKM convention, which keeps the diagonal,
  K_ij = w [sqrt(g_ii g_jj - g_ij^2) + (pi - theta_ij) g_ij] / pi + b, K_ii = w g_ii + b,
  theta_ij = arccos(g_ij / sqrt(g_ii g_jj)): twice the NNGP of a ReLU network (which has 1 / (2 pi)).
* `sqexp_kernel`: K_ij = variance exp(-(g_ii / 2 + g_jj / 2 - g_ij) / lengthscale^2), i.e.
  exp(-||f_i - f_j||^2 / (2 lengthscale^2)) for features f with Gram G.
* `normalised_gaussian_kernel`: K_ij = w sqrt(g_ii g_jj) exp(g_ij / sqrt(g_ii g_jj) - 1) + b.
* `linear_kernel`: K = w G + b (the deep linear DKM; the closed-form check of the reference notes Sec. 4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "GramBlocks",
    "KERNELS",
    "KERNEL_DEFAULTS",
    "input_gram",
    "input_blocks",
    "relu_kernel",
    "sqexp_kernel",
    "normalised_gaussian_kernel",
    "linear_kernel",
    "kernel_fn",
]

_TINY = 1e-30


class GramBlocks(NamedTuple):
    """The blocks of a Gram (or kernel) matrix over inducing points i and test / training points t.

    Attributes:
      ii: (M, M) the inducing points' Gram.
      ti: (B, M) the test-by-inducing block, or None when only the inducing block is carried.
      t: (B,) the diagonal of the test block (the off-diagonal test entries are never needed), or None.
    """

    ii: jax.Array
    ti: jax.Array | None = None
    t: jax.Array | None = None


Gram = jax.Array | GramBlocks


def input_gram(x: jax.Array) -> jax.Array:
    """G_0 = X X^T / N_0 for inputs X of shape (P, N_0).

    >>> input_gram(jnp.array([[1.0, 1.0], [1.0, -1.0]]))
    Array([[1., 0.],
           [0., 1.]], dtype=float32)
    """
    return x @ x.T / x.shape[-1]


def input_blocks(inducing: jax.Array, x: jax.Array | None = None) -> GramBlocks:
    """The input Gram's blocks for inducing inputs Z (M, N_0) and points X (B, N_0).

    Returns GramBlocks(Z Z^T / N_0, X Z^T / N_0, ||x||^2 / N_0); with `x=None` only the inducing block.

    >>> input_blocks(jnp.eye(2), jnp.array([[2.0, 0.0]])).t
    Array([2.], dtype=float32)
    """
    n0 = inducing.shape[-1]
    ii = inducing @ inducing.T / n0
    if x is None:
        return GramBlocks(ii)
    return GramBlocks(ii, x @ inducing.T / n0, jnp.sum(x * x, axis=-1) / n0)


def _apply(gram: Gram, pair: Callable, diag: Callable) -> Gram:
    """Applies an elementwise kernel, given by its off-diagonal rule pair(g_xy, g_xx, g_yy) and its diagonal
    rule diag(g_xx), to a full Gram matrix or to inducing blocks. The diagonal of every square block is set by
    `diag` exactly, as the official code does."""
    if isinstance(gram, GramBlocks):
        ii = _apply(gram.ii, pair, diag)
        if gram.ti is None:
            return GramBlocks(ii)
        d_ii = jnp.diagonal(gram.ii)
        return GramBlocks(ii, pair(gram.ti, gram.t[:, None], d_ii[None, :]), diag(gram.t))
    g = jnp.asarray(gram)
    d = jnp.diagonal(g)
    eye = jnp.eye(g.shape[-1], dtype=bool)
    return jnp.where(eye, diag(d)[:, None], pair(g, d[:, None], d[None, :]))


# asin(x) = x + x^3 P(x^2) on |x| <= 1/2: P is the degree-11 least-squares fit, in Chebyshev nodes on
# z = x^2 in [0, 1/4], of the Taylor series of (asin(x) - x) / x^3 summed to 60 terms; its largest error in
# asin there is 4e-17 (below float64's rounding). `_arccos` reduces every cosine to that interval.
_ASIN_POLY = (
    0.16666666666666644, 0.07500000000021147, 0.044642857102254005, 0.030381947450620277,
    0.022372044860789846, 0.01735531190781168, 0.013929053295772329, 0.011879913716142708,
    0.007782080112145359, 0.016096641259228744, -0.010850202955590789, 0.028241517886420476,
)  # fmt: skip


def _arccos(c):
    """arccos on [-1, 1] by a polynomial, to within a few ulp of `jnp.arccos` in float64 and float32.

    XLA:CPU computes `jnp.arccos` through a scalar libm `atan2` per element; this form vectorises and is ~7x
    faster on the sparse DKM's (B, M) blocks, where the ReLU kernel's arccos was the largest cost of a step.
    |c| <= 1/2: pi/2 - asin(c); c > 1/2: 2 asin(sqrt((1 - c) / 2)); c < -1/2: pi - 2 asin(sqrt((1 + c) / 2)).
    """
    a = jnp.abs(c)
    small = a <= 0.5
    x = jnp.where(small, c, jnp.sqrt(jnp.maximum(0.5 * (1.0 - a), 0.0)))
    z = x * x
    p = jnp.asarray(_ASIN_POLY[-1], c.dtype)
    for coef in _ASIN_POLY[-2::-1]:
        p = p * z + coef
    asin = x + x * z * p
    return jnp.where(
        small, 0.5 * math.pi - asin, jnp.where(c > 0, 2.0 * asin, math.pi - 2.0 * asin)
    )


def _arccos_j(c):
    """J(c) = sqrt(1 - c^2) + (pi - arccos c) c, the arc-cosine kernel of degree 1 as a function of the cosine
    c = cos(theta) (Cho and Saul 2009: sin theta + (pi - theta) cos theta).

    J is smooth at c = +-1 although both of its terms have infinite slopes there; the ReLU kernel's own
    derivative rule (`_relu_pair`) is what keeps the gradient at collinear points finite.
    """
    return jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0)) + (math.pi - _arccos(c)) * c


def _cosine(g_xy, g_xx, g_yy):
    norm = jnp.sqrt(jnp.maximum(g_xx * g_yy, _TINY))
    return jnp.clip(g_xy / norm, -1.0, 1.0), norm


def relu_kernel(gram: Gram, weight_var: float = 1.0, bias_var: float = 0.0) -> Gram:
    r"""The ReLU arc-cosine kernel of a Gram matrix, in the DKM convention (reference notes Sec. 2.2).

    K_ij = w [sqrt(g_ii g_jj - g_ij^2) + (pi - theta_ij) g_ij] / pi + b with cos theta_ij = g_ij / sqrt(g_ii
    g_jj), and K_ii = w g_ii + b. For features f ~ N(0, G), K = 2 w E[relu(f) relu(f)^T] + b: twice the ReLU
    NNGP kernel of neural-tangents (which uses 1 / (2 pi)), so with w = 1 a ReLU layer keeps the diagonal.

    Args:
      gram: a (P, P) Gram matrix or `GramBlocks`.
      weight_var: w, the weight variance.
      bias_var: b, the bias variance.

    Returns:
      The kernel, of the same kind as `gram` (the kernel itself: no jitter).

    >>> relu_kernel(jnp.array([[1.0, 0.0], [0.0, 1.0]]))  # orthogonal points: 1 / pi off the diagonal
    Array([[1.        , 0.31830987],
           [0.31830987, 1.        ]], dtype=float32)
    """

    def pair(g_xy, g_xx, g_yy):
        return weight_var * _relu_pair(g_xy, g_xx, g_yy) + bias_var

    return _apply(gram, pair, lambda g: weight_var * g + bias_var)


@jax.custom_jvp
def _relu_pair(g_xy, g_xx, g_yy):
    """[sqrt(g_xx g_yy - g_xy^2) + (pi - theta) g_xy] / pi, the ReLU kernel off the diagonal with w = 1, b = 0."""
    c, norm = _cosine(g_xy, g_xx, g_yy)
    return norm * _arccos_j(c) / math.pi


@_relu_pair.defjvp
def _relu_pair_jvp(primals, tangents):
    """The derivatives in closed form: dK/dg_xy = (pi - theta) / pi and dK/dg_xx = sqrt(g_xx g_yy - g_xy^2) /
    (2 pi g_xx) (g_yy alike), finite at collinear points, where autodiff of the formula would pass through
    the cosine's division, clip and square root (a few more passes over every (B, M) block)."""
    (g_xy, g_xx, g_yy), (d_xy, d_xx, d_yy) = primals, tangents
    c, norm = _cosine(g_xy, g_xx, g_yy)
    half_sine = 0.5 * norm * jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))
    tangent = (math.pi - _arccos(c)) * d_xy
    tangent = tangent + half_sine * (
        d_xx / jnp.maximum(g_xx, _TINY) + d_yy / jnp.maximum(g_yy, _TINY)
    )
    return norm * _arccos_j(c) / math.pi, tangent / math.pi


def sqexp_kernel(gram: Gram, lengthscale: float = 1.0, variance: float = 1.0) -> Gram:
    r"""The squared-exponential kernel of a Gram matrix.

    K_ij = variance exp(-R_ij / lengthscale^2) with R_ij = g_ii / 2 + g_jj / 2 - g_ij (half the squared distance
    between the features), K_ii = variance. On the input Gram X X^T / N_0 this is the RBF kernel of X with
    lengthscale `lengthscale * sqrt(N_0)`. The official code has no lengthscale (lengthscale = 1; scale comes
    from its normalisation layers); bayesfunc's `SqExpKernelGram` has one.

    Args:
      gram: a (P, P) Gram matrix or `GramBlocks`.
      lengthscale: the lengthscale in units of the features' root-mean-square.
      variance: the kernel's variance (the diagonal).

    Returns:
      The kernel, of the same kind as `gram`.

    >>> sqexp_kernel(jnp.array([[1.0, 0.0], [0.0, 1.0]]))  # R = 1 off the diagonal
    Array([[1.        , 0.36787945],
           [0.36787945, 1.        ]], dtype=float32)
    """

    def pair(g_xy, g_xx, g_yy):
        r = jnp.maximum(0.5 * g_xx + 0.5 * g_yy - g_xy, 0.0)
        return variance * jnp.exp(-r / lengthscale**2)

    return _apply(gram, pair, lambda g: variance * jnp.ones_like(g))


def normalised_gaussian_kernel(gram: Gram, weight_var: float = 1.0, bias_var: float = 0.0) -> Gram:
    r"""The normalised Gaussian kernel of the SKR headline runs (reference notes Sec. 2.2).

    K_ij = w sqrt(g_ii g_jj) exp(g_ij / sqrt(g_ii g_jj) - 1) + b, K_ii = w g_ii + b: a squared-exponential
    kernel of the features normalised to unit length, rescaled by their norms.

    Args:
      gram: a (P, P) Gram matrix or `GramBlocks`.
      weight_var: w.
      bias_var: b.

    Returns:
      The kernel, of the same kind as `gram`.

    >>> k = normalised_gaussian_kernel(jnp.array([[4.0, 0.0], [0.0, 1.0]]))
    >>> float(k[0, 0]), round(float(k[0, 1]), 4)  # 2 exp(-1) off the diagonal
    (4.0, 0.7358)
    """

    def pair(g_xy, g_xx, g_yy):
        c, norm = _cosine(g_xy, g_xx, g_yy)
        return weight_var * norm * jnp.exp(c - 1.0) + bias_var

    return _apply(gram, pair, lambda g: weight_var * g + bias_var)


def linear_kernel(gram: Gram, weight_var: float = 1.0, bias_var: float = 0.0) -> Gram:
    r"""K = w G + b: the kernel of a linear layer (a deep linear DKM).

    >>> linear_kernel(jnp.eye(2), 2.0).tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """
    return _apply(
        gram, lambda g, _x, _y: weight_var * g + bias_var, lambda g: weight_var * g + bias_var
    )


KERNELS: dict[str, Callable[..., Gram]] = {
    "relu": relu_kernel,
    "sqexp": sqexp_kernel,
    "normalised_gaussian": normalised_gaussian_kernel,
    "linear": linear_kernel,
}
# Each kernel's hyper-parameters and the values a DKM starts from (learned in log space; a 0 stays fixed). The ReLU
# bias 0.1 is the official default; the function's own default (0) is the plain arc-cosine kernel.
KERNEL_DEFAULTS: dict[str, dict[str, float]] = {
    "relu": {"weight_var": 1.0, "bias_var": 0.1},
    "sqexp": {"lengthscale": 1.0, "variance": 1.0},
    "normalised_gaussian": {"weight_var": 1.0, "bias_var": 0.1},
    "linear": {"weight_var": 1.0, "bias_var": 0.0},
}


def kernel_fn(kernel: str | Callable[..., Gram]) -> Callable[..., Gram]:
    """The kernel function named `kernel` (one of `KERNELS`), or `kernel` itself when it is callable.

    >>> kernel_fn("relu") is relu_kernel
    True
    """
    if callable(kernel):
        return kernel
    if kernel not in KERNELS:
        raise ValueError(
            f"kernel={kernel!r} is not one of {sorted(KERNELS)}; pass a name or a function"
        )
    return KERNELS[kernel]


def kernel_params(kernel: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The hyper-parameters of kernel `kernel`: its defaults (`KERNEL_DEFAULTS`) updated by `overrides`.

    >>> kernel_params("sqexp", {"lengthscale": 2.0})
    {'lengthscale': 2.0, 'variance': 1.0}
    """
    if kernel not in KERNEL_DEFAULTS:
        raise ValueError(f"kernel={kernel!r} is not one of {sorted(KERNEL_DEFAULTS)}")
    params = dict(KERNEL_DEFAULTS[kernel])
    for name, value in (overrides or {}).items():
        if name not in params:
            raise ValueError(
                f"kernel {kernel!r} has no hyper-parameter {name!r}; it has {sorted(params)}"
            )
        if not (isinstance(value, int | float) and value >= 0 and math.isfinite(value)):
            raise ValueError(f"kernel hyper-parameter {name}={value!r} must be a number >= 0")
        params[name] = float(value)
    return params
