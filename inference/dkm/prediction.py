r"""Predictions of a fitted DKM at new points: the output GP's mean and variance, predictive densities and class
probabilities.

The test points' Gram blocks are carried through the hidden layers by the conditional formulas
(`objectives.propagate`) from the inducing block (sparse DKM) or from the training block (full DKM, whose
training points play the inducing points). At the output:

* sparse: mean K_ti K_ii^-1 mu, variance k_t - diag(K_ti K_ii^-1 K_it) + diag(K_ti K_ii^-1 A K_ii^-1 K_it);
* full (Gaussian): the exact GP conditional on K(G_L), mean K_ti (K_ii + sigma^2 I)^-1 Y, variance
  k_t - diag(K_ti (K_ii + sigma^2 I)^-1 K_it).

Test points are processed in batches inside one compiled `lax.map`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from theorax.inference.dkm import _checks, linalg, objectives
from theorax.inference.dkm.fitting import precision
from theorax.inference.dkm.model import (
    DKMSpec,
    DKMState,
    _input,
    _output,
    batched_map,
    inducing_chain,
    noise_var,
    point_blocks,
)

__all__ = ["predict", "log_predictive", "predict_proba", "gram_matrices"]


@functools.partial(jax.jit, static_argnames=("spec", "batch"))
def _moments(spec: DKMSpec, params, x_train, y_train, x_test, batch: int):
    jitter = spec.options.jitter
    if spec.sparse:
        z = params["inducing"]
        chain = inducing_chain(spec, params, _input(spec, params, z).ii)
        factor = linalg.factorize(chain.k_out, jitter)
        level = factor.level
        mean_u, chol_a = _output(params)
        a = linalg.outer(chol_a)  # once, not per batch

        def one(xb):
            blocks = _input(spec, params, z, xb)
            k = point_blocks(spec, params, chain, blocks.ti, blocks.t)
            mean, _, var = objectives.conditional(k, factor, chol_a, mean_u, q=a)
            return mean, var

    else:
        z = x_train
        chain = inducing_chain(spec, params, _input(spec, params, z).ii)
        k_y = chain.k_out + noise_var(spec, params) * jnp.eye(z.shape[0], dtype=z.dtype)
        chol_y, level = linalg.cholesky(k_y, jitter)
        white_y = solve_triangular(chol_y, y_train, lower=True)

        def one(xb):
            blocks = _input(spec, params, z, xb)
            k = point_blocks(spec, params, chain, blocks.ti, blocks.t)
            half = solve_triangular(chol_y, k.ti.T, lower=True)
            return half.T @ white_y, jnp.maximum(k.t - jnp.sum(half * half, axis=0), 0.0)

    mean, var = batched_map(one, batch, x_test)
    return mean, var, jnp.maximum(chain.level, level)


def _test_inputs(state: DKMState, x_test):
    x_test = _checks.inputs(x_test, "x_test")
    if x_test.shape[1] != state.spec.input_dim:
        raise ValueError(
            f"x_test has {x_test.shape[1]} features; the DKM was fitted on {state.spec.input_dim}"
        )
    return x_test.astype(state.spec.dtype)


def _latent(state: DKMState, x_test, batch_size: int):
    _checks.positive_int(batch_size, "batch_size")
    spec = state.spec
    x_test = _test_inputs(state, x_test)
    mean, var, level = _moments(
        spec, state.params, state.x_train, state.y_train, x_test, batch_size
    )
    linalg.check_jitter(level, "predict", spec.options.jitter)
    if not (bool(jnp.all(jnp.isfinite(mean))) and bool(jnp.all(jnp.isfinite(var)))):
        raise FloatingPointError(
            "predict: the predictions are not finite; the DKM's parameters are bad"
        )
    return mean, var


def predict(
    state: DKMState, x_test, *, include_noise: bool = False, batch_size: int = 2048
) -> tuple[jax.Array, jax.Array]:
    r"""The output GP's predictive mean and variance at `x_test` (see the module docstring for the formulas).

    Args:
      state: a fitted DKM (`fit`).
      x_test: (T, N_0) inputs.
      include_noise: add the Gaussian likelihood's noise sigma^2 to the variance (the predictive of y).
      batch_size: test points per batch.

    Returns:
      (mean, var), each (T,) when the DKM was fitted on a target vector, else (T, C) (C outputs or classes'
      logits; the variance is shared by the outputs).

    >>> import numpy as np
    >>> from theorax.inference.dkm import FitOptions, fit
    >>> x = np.linspace(-1, 1, 8)[:, None]
    >>> state = fit(x, x[:, 0], depth=1, nu=float("inf"), kernel="relu", options=FitOptions(steps=5))
    >>> mean, var = predict(state, x[:3])
    >>> mean.shape, var.shape, bool(np.all(np.asarray(var) >= 0))
    ((3,), (3,), True)
    """
    spec = state.spec
    with precision(spec):
        mean, var = _latent(state, x_test, batch_size)
        if include_noise and spec.likelihood == "gaussian":
            var = var + noise_var(spec, state.params)
        var = jnp.broadcast_to(var[:, None], mean.shape)
        if spec.squeeze:
            return mean[:, 0], var[:, 0]
        return mean, var


def log_predictive(
    state: DKMState, x_test, y_test, *, key=None, samples: int = 1000, batch_size: int = 2048
) -> jax.Array:
    r"""log p(y* | x*) per test point.

    Gaussian: sum_c log N(y*_c; mean_c, var + sigma^2). Categorical: log (1/S) sum_s softmax(f_s)_{y*}
    with f_s ~ N(mean, var) (S = `samples` draws from `key`; the official prediction averages 1000).

    >>> import numpy as np
    >>> from theorax.inference.dkm import FitOptions, fit
    >>> x = np.linspace(-1, 1, 8)[:, None]
    >>> state = fit(x, x[:, 0], depth=0, nu=(), kernel="sqexp", options=FitOptions(steps=5))
    >>> log_predictive(state, x[:2], x[:2, 0]).shape
    (2,)
    """
    spec = state.spec
    with precision(spec):
        x_test = _test_inputs(state, x_test)
        _, y_test = _checks.data(x_test, y_test, spec.likelihood, spec.num_outputs)
        mean, var = _latent(state, x_test, batch_size)
        if spec.likelihood == "gaussian":
            total = var[:, None] + noise_var(spec, state.params)
            return jnp.sum(
                -0.5 * jnp.log(2 * math.pi * total) - 0.5 * (y_test - mean) ** 2 / total, axis=-1
            )
        log_p = _log_class_probs(mean, var, _key(key), samples)
        return jnp.take_along_axis(log_p, y_test[:, None], axis=-1)[:, 0]


def _key(key):
    return jax.random.key(0) if key is None else key


@functools.partial(jax.jit, static_argnames=("samples",))
def _log_class_probs(mean, var, key, samples: int):
    eps = jax.random.normal(key, (samples, *mean.shape), mean.dtype)
    logp = jax.nn.log_softmax(mean + jnp.sqrt(var)[:, None] * eps, axis=-1)
    return jax.nn.logsumexp(logp, axis=0) - math.log(samples)


def predict_proba(
    state: DKMState, x_test, *, key=None, samples: int = 1000, batch_size: int = 2048
) -> jax.Array:
    r"""Class probabilities (T, C) of a categorical DKM: the softmax averaged over `samples` draws of the
    output GP's marginals (the official `categorical_prediction`)."""
    spec = state.spec
    if spec.likelihood != "categorical":
        raise ValueError("predict_proba needs a categorical DKM; use predict for a Gaussian one")
    with precision(spec):
        mean, var = _latent(state, x_test, batch_size)
        return jnp.exp(_log_class_probs(mean, var, _key(key), samples))


@functools.partial(jax.jit, static_argnames=("spec",))
def _grams(spec: DKMSpec, params, x_train):
    z = params["inducing"] if spec.sparse else x_train
    chain = inducing_chain(spec, params, _input(spec, params, z).ii)
    return chain.grams[1:], chain.k_out


def gram_matrices(state: DKMState) -> tuple[list[jax.Array], jax.Array]:
    r"""The fitted Gram matrices G_1..G_L and the output kernel K(G_L), over the training points (full DKM) or
    the inducing points (sparse DKM). A layer with nu = inf has G_l = K(G_{l-1}).

    >>> import numpy as np
    >>> from theorax.inference.dkm import FitOptions, ModelOptions, fit, nngp_gram
    >>> x = np.linspace(-1, 1, 6)[:, None]
    >>> state = fit(x, x[:, 0], depth=2, nu=float("inf"), options=FitOptions(steps=1),
    ...             model=ModelOptions(learn_kernel=False, learn_noise=False))
    >>> grams, k_out = gram_matrices(state)
    >>> bool(np.allclose(grams[-1], nngp_gram(x, 2, "relu", {"bias_var": 0.1})))
    True
    """
    with precision(state.spec):
        grams, k_out = _grams(state.spec, state.params, state.x_train)
        return list(grams), k_out
