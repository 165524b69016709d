"""Building blocks shared by several models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_SQRT_HALF = float(np.sqrt(0.5))


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in PyTorch's form, `x / 2 * (1 + erf(x / sqrt 2))`, and so its gradient too.

    `jax.nn.gelu(x, approximate=False)` computes `x / 2 * erfc(-x / sqrt 2)` instead: equal in exact arithmetic
    and more accurate for x below about -5 (where both are below 1e-6 in magnitude), but XLA's erfc costs more on
    the CPU; the erf form made the scaled-MLP training step ~5% faster.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))
