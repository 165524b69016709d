"""Plain-Python checks of the DKM's inputs, run before anything compiles. Each error names the value, what was
expected and how to fix it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from theorax.models import dkm as kernels
from theorax.models.validation import check_finite, is_concrete

LIKELIHOODS = ("gaussian", "categorical")


def non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")
    return int(value)


def positive_int(value, name: str) -> int:
    if non_negative_int(value, name) < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def positive(value, name: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be a finite number {bound}")
    return float(value)


def nu_tuple(nu, depth: int) -> tuple[float, ...]:
    """nu as one float per hidden layer; each must be > 0 (inf, the NNGP limit, allowed)."""
    values = [nu] * depth if np.ndim(nu) == 0 else list(nu)
    if len(values) != depth:
        raise ValueError(
            f"nu={nu!r} has {len(values)} values for {depth} hidden layers; give one number or {depth}"
        )
    out = []
    for i, v in enumerate(values):
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"nu[{i}]={values[i]!r} is not a number") from None
        if not v > 0:  # also catches NaN
            raise ValueError(
                f"nu[{i}]={values[i]!r} must be > 0: nu_l weighs layer l's KL to its prior (nu = N_l / N); "
                "nu = inf gives the NNGP, and nu -> 0 removes the prior entirely (the objective is then "
                "unbounded). Use a positive value such as 1"
            )
        out.append(v)
    return tuple(out)


def inputs(x, name: str = "x"):
    if is_concrete(x):
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D array (points, features), got shape {arr.shape}; reshape a single "
                "feature with x[:, None]"
            )
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        check_finite(arr, name)
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(
                f"{name} has shape {arr.shape}: it needs at least one point and one feature"
            )
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(float)


def data(x, y, likelihood: str, num_classes: int | None = None):
    """x (P, N_0) and targets: (P, C) float for "gaussian" (a vector becomes one column), integer labels
    (P,) in [0, num_classes) for "categorical"."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r} is not one of {list(LIKELIHOODS)}")
    x = inputs(x)
    y_np = np.asarray(y) if is_concrete(y) else None
    shape = y_np.shape if y_np is not None else y.shape
    if len(shape) == 0 or shape[0] != x.shape[0]:
        raise ValueError(
            f"x has {x.shape[0]} points but y has shape {shape}: give one target (row) per point of x"
        )
    if likelihood == "gaussian":
        if len(shape) not in (1, 2):
            raise ValueError(
                f"y must be (P,) or (P, C) for a Gaussian likelihood, got shape {shape}"
            )
        if y_np is not None:
            check_finite(y_np, "y")
        y = jnp.asarray(y, dtype=x.dtype)
        return x, y[:, None] if y.ndim == 1 else y
    if len(shape) != 1:
        raise ValueError(
            f"categorical targets must be integer labels of shape (P,), got shape {shape}"
        )
    if y_np is not None:
        if not np.issubdtype(y_np.dtype, np.integer):
            if not np.all(np.mod(y_np, 1) == 0):
                raise ValueError("categorical targets must be integer class labels 0..C-1")
        y_np = y_np.astype(np.int64)
        top = num_classes if num_classes is not None else y_np.max() + 1
        if y_np.min() < 0 or y_np.max() >= top:
            raise ValueError(
                f"categorical labels must lie in [0, {top}), got min {y_np.min()} and max {y_np.max()}"
            )
    return x, jnp.asarray(y, dtype=jnp.int32)


def per_layer_kernel_params(
    kernel: str | Callable, kernel_params: Mapping | Sequence[Mapping] | None, n: int
) -> list[dict[str, float]]:
    """One hyper-parameter mapping per kernel application (n of them), defaults filled in for a named kernel."""
    if isinstance(kernel, str):
        kernels.kernel_fn(kernel)  # the error for an unknown name
    elif not callable(kernel):
        raise ValueError(
            f"kernel={kernel!r} must be a name in {sorted(kernels.KERNELS)} or a function"
        )
    if kernel_params is None or isinstance(kernel_params, Mapping):
        per_layer = [kernel_params] * n
    else:
        per_layer = list(kernel_params)
        if len(per_layer) < n:
            raise ValueError(
                f"kernel_params has {len(per_layer)} mappings; {n} kernels need one each (or give one "
                "mapping for all)"
            )
        per_layer = per_layer[:n]
    if isinstance(kernel, str):
        return [kernels.kernel_params(kernel, p) for p in per_layer]
    return [dict(p or {}) for p in per_layer]


def psd_gram(g, what: str, p: int):
    """A concrete (P, P) Gram matrix must be finite, symmetric and positive semi-definite."""
    if not is_concrete(g):
        return g
    arr = np.asarray(g, dtype=np.float64)
    if arr.shape != (p, p):
        raise ValueError(f"{what} has shape {arr.shape}; expected ({p}, {p}) for {p} points")
    check_finite(arr, what)
    scale = max(np.max(np.abs(arr)), 1e-300)
    if np.max(np.abs(arr - arr.T)) > 1e-6 * scale:
        raise ValueError(
            f"{what} is not symmetric (max |G - G^T| = {np.max(np.abs(arr - arr.T)):.3g})"
        )
    low = float(np.linalg.eigvalsh(arr)[0])
    if low < -1e-8 * scale:
        raise ValueError(
            f"{what} is not positive semi-definite: its smallest eigenvalue is {low:.3g} (largest entry "
            f"{scale:.3g}). A Gram matrix is F F^T / N; build it from features or a Cholesky factor"
        )
    return jnp.asarray(g)
