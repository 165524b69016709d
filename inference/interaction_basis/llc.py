"""The local learning coefficient (LLC) by SGLD, as devinterp estimates it.

Chains start at the trained parameters w* and follow localised SGLD (Welling and Teh; Lau et al.):

    w <- w - (eps / 2) [n beta grad L_m(w) + gamma (w - w*)] + sqrt(eps) xi,    xi ~ N(0, I)

with L_m the mean loss on a random mini-batch of m examples, n beta the inverse temperature times the dataset
size (default n / log n, devinterp's `default_nbeta`) and gamma the localisation. The estimate is

    llc = n beta (E_chain[L_m(w_t)] - L_n(w*)),

averaged over draws after burn-in and over chains (the standard deviation over chains is reported too). For a
regular model with d parameters the learning coefficient is d / 2; N_eff = 2 llc is the degeneracy paper's
effective parameter count. Every chain is one `lax.scan`, the chains a `vmap`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class LLCEstimate:
    """An LLC estimate.

    Attributes:
      llc_mean: the mean over chains of each chain's estimate.
      llc_std: their standard deviation over chains.
      llc_per_chain: (num_chains,).
      init_loss: L_n(w*).
      loss_trace: (num_chains, num_draws) mini-batch losses along each chain after burn-in.
      nbeta: the n beta used.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: np.ndarray
    init_loss: float
    loss_trace: np.ndarray
    nbeta: float

    @property
    def llc_sem(self) -> float:
        """Standard error of the mean over chains."""
        return self.llc_std / math.sqrt(max(len(self.llc_per_chain), 1))


def default_nbeta(n: int) -> float:
    """n / log n (devinterp's default inverse temperature times n).

    >>> round(default_nbeta(1000), 3)
    144.765
    """
    if n < 2:
        raise ValueError(f"need at least 2 examples for n / log n, got n={n}")
    return n / math.log(n)


def llc(
    loss_fn: Callable,
    params,
    data,
    key: jax.Array,
    *,
    num_chains: int = 4,
    num_draws: int = 400,
    num_burnin: int = 0,
    step_size: float = 1e-4,
    localization: float = 100.0,
    nbeta: float | None = None,
    batch_size: int | None = None,
) -> LLCEstimate:
    r"""The local learning coefficient of `loss_fn` at `params` by localised SGLD (devinterp's estimator).

    :math:`\hat\lambda = n\beta\,(\mathbb{E}_{w \sim p_\gamma}[L_m(w)] - L_n(w^*))` with SGLD samples from the
    localised tempered posterior :math:`\propto \exp(-n\beta L_n(w) - \frac{\gamma}{2}\|w - w^*\|^2)`.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss on a batch (a pytree of arrays with a leading
        example axis, like `data`).
      params: the trained parameters w* (a pytree of float arrays).
      data: the training data, a pytree of arrays with n examples on the leading axis.
      key: PRNG key (chains, batches and noise are derived from it).
      num_chains: independent chains (vmapped).
      num_draws: SGLD steps recorded per chain after burn-in.
      num_burnin: steps discarded first.
      step_size: eps.
      localization: gamma.
      nbeta: n beta (default n / log n).
      batch_size: m, examples per step drawn uniformly without replacement (default all n: full batch).

    Returns:
      `LLCEstimate`.

    Raises:
      ValueError: bad input (before anything compiles).
      FloatingPointError: a chain's loss became non-finite (SGLD diverged: the step is too large for the loss's
        curvature); the message names the chains and the first step.

    Example: linear regression (a regular model) with d = 3 parameters has learning coefficient 3 / 2.

    >>> x = jax.random.normal(jax.random.key(0), (2000, 3))
    >>> y = x @ jnp.array([1.0, -2.0, 0.5]) + jax.random.normal(jax.random.key(1), (2000,))
    >>> loss = lambda w, b: 0.5 * jnp.mean((b[1] - b[0] @ w) ** 2)
    >>> w_star = jnp.linalg.lstsq(x, y)[0]
    >>> est = llc(loss, w_star, (x, y), jax.random.key(2), num_draws=2000, num_burnin=200, step_size=1e-3,
    ...           localization=1.0)
    >>> 1.2 < est.llc_mean < 1.8
    True
    """
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError(
            "data is empty: pass a pytree of arrays with the examples on the leading axis"
        )
    n = int(leaves[0].shape[0])
    if any(int(leaf.shape[0]) != n for leaf in leaves) or n == 0:
        raise ValueError(
            f"every array in data needs the same number of examples (> 0) on axis 0, got "
            f"{[tuple(leaf.shape) for leaf in leaves]}"
        )
    m = n if batch_size is None else int(batch_size)
    if not 1 <= m <= n:
        raise ValueError(f"batch_size={batch_size} must be in [1, n={n}]")
    for name, value in (("num_chains", num_chains), ("num_draws", num_draws)):
        if int(value) < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if num_burnin < 0 or not step_size > 0 or localization < 0:
        raise ValueError(
            f"need num_burnin >= 0, step_size > 0 and localization >= 0; got {num_burnin}, {step_size}, "
            f"{localization}"
        )
    nb = default_nbeta(n) if nbeta is None else float(nbeta)
    init_loss = float(loss_fn(params, data))
    if not math.isfinite(init_loss):
        raise ValueError(f"the loss at params is not finite ({init_loss}); check params and data")
    traces = _chains(loss_fn, params, data, key, int(num_chains), int(num_draws) + int(num_burnin), m,
                     float(step_size), float(localization), nb)  # fmt: skip
    traces = np.asarray(traces, np.float64)
    diverged = ~np.all(np.isfinite(traces), axis=1)
    if diverged.any():
        first = int(np.argmax(~np.isfinite(traces[diverged]), axis=1).min())
        raise FloatingPointError(
            f"llc: SGLD diverged (a non-finite loss) in chains {np.flatnonzero(diverged).tolist()} of "
            f"{num_chains}, first at step {first}; lower step_size (now {step_size}) or raise localization "
            f"(now {localization})"
        )
    traces = traces[:, num_burnin:]
    per_chain = nb * (traces.mean(axis=1) - init_loss)
    return LLCEstimate(
        float(per_chain.mean()), float(per_chain.std()), per_chain, init_loss, traces, nb
    )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _chains(loss_fn, params, data, key, num_chains, num_steps, m, step_size, localization, nbeta):
    n = jax.tree.leaves(data)[0].shape[0]
    grad_fn = jax.value_and_grad(loss_fn)

    def step(w, k):
        kb, kn = jax.random.split(k)
        idx = jax.random.permutation(kb, n)[:m] if m < n else jnp.arange(n)
        batch = jax.tree.map(lambda a: a[idx], data)
        loss, g = grad_fn(w, batch)
        leaves, treedef = jax.tree.flatten(w)
        noise = jax.random.split(kn, len(leaves))
        new = [
            p
            - 0.5 * step_size * (nbeta * gp + localization * (p - p0))
            + jnp.sqrt(step_size) * jax.random.normal(kk, p.shape, p.dtype)
            for p, gp, p0, kk in zip(
                leaves, jax.tree.leaves(g), jax.tree.leaves(params), noise, strict=True
            )
        ]
        return jax.tree.unflatten(treedef, new), loss

    def chain(k):
        _, losses = jax.lax.scan(step, params, jax.random.split(k, num_steps))
        return losses

    return jax.vmap(chain)(jax.random.split(key, num_chains))
