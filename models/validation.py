"""Input checks shared by every system: plain Python on concrete values, before anything compiles.

Shapes are always checked where they are known. Values can only be checked when they are concrete: outside
`jit`, `vmap` and `grad`, an array holds numbers; inside them it is a `jax.core.Tracer` and its values do not
exist yet. Library functions therefore check values when `is_concrete` says they can, and leave traced values to
the NaN guards that compiled code returns.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def is_concrete(x: Any) -> bool:
    """True when `x` holds values (a Python number, numpy or committed JAX array), False for a tracer."""
    return not isinstance(x, jax.core.Tracer)


def check_finite(x: Any, what: str, error: type[Exception] = ValueError) -> None:
    """Raises `error("<what> must be finite ...")` when `x` is concrete and holds a NaN or an infinity.

    A traced `x` passes: its values are checked by the caller's compiled guard instead.
    """
    if not is_concrete(x):
        return
    values = np.asarray(x)
    if not np.all(np.isfinite(values)):
        bad = np.argwhere(~np.isfinite(values))
        where = f" (first at index {tuple(int(i) for i in bad[0])})" if values.ndim else ""
        raise error(f"{what} must be finite, got {values.ravel()[:8]}{where}")
