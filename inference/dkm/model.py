r"""Deep kernel machines as parameters: the full-data DKM and the sparse (inducing-point) DKM.

A DKM with L hidden layers has a Gram matrix G_l per hidden layer, each parametrised by its Cholesky factor
chol(G_l) = V_l / sqrt(M), V_l lower-triangular with a log-parametrised diagonal (the official
`LayerCholesky`; M is the number of points G_l is over), and initialised at the NNGP: G_l = K(G_{l-1})
(with the factorisation's jitter), so every KL term starts at 0. A layer with nu_l = inf has no parameters:
its Gram is K(G_{l-1}) exactly (the NNGP limit).

* The full DKM (`num_inducing=None`, Gaussian likelihood): G_l over all P training points, the exact
  objective log N(Y; 0, K(G_L) + sigma^2 I) - sum_l nu_l KL_l. Cost O(P^3) per step.
* The sparse DKM: learned inducing inputs Z (M, N_0) and inducing Grams G_ii^l, the points' Gram blocks
  carried by the conditional formulas (`objectives.propagate`), and a variational output layer q(f_i) =
  N(mu_c, A) (one A shared by the C outputs). The per-datapoint objective of a minibatch b of P_train points,

      mean_{p in b} E_q[log p(y_p | f_p)] - [s sum_c KL(N(mu_c, A) || N(0, K_ii)) + sum_l nu_l KL_l] / P_train,

  (the official `norm_kl_reg`, reference notes Sec. 2.3) costs O(B M^2 + M^3) per step, so an epoch's cost
  grows linearly with P. s = 1 for a Gaussian likelihood (then with Z at the data the bound is tight and the
  sparse DKM equals the full one), 1 / C for a categorical one (the official tempering).

Kernel hyper-parameters (one set per kernel application, L + 1 of them), the Gaussian noise and optional
per-feature input scales are learned in log space unless frozen.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax
from theorax.inference.dkm import _checks, linalg, objectives
from theorax.models import dkm as kernels
from theorax.models.dkm import GramBlocks

__all__ = ["ModelOptions", "DKMSpec", "DKMState", "make_spec", "init_params", "full_objective",
           "sparse_objective", "inducing_chain", "point_blocks", "batched_map", "padded_batches"]  # fmt: skip

OUTPUT_INITS = ("optimal", "prior")


def _freeze_mapping(m) -> tuple[tuple[str, float], ...]:
    if m is None:
        return ()
    if isinstance(m, tuple):
        return tuple((str(k), float(v)) for k, v in m)
    return tuple(sorted((str(k), float(v)) for k, v in dict(m).items()))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The DKM's settings beyond its architecture; every field has the value the experiments use by default.

    Attributes:
      kernel_params: initial kernel hyper-parameters (a mapping; unset ones take `KERNEL_DEFAULTS`).
      noise_var: initial Gaussian noise variance sigma^2.
      learn_noise: learn sigma^2 (else fixed).
      learn_kernel: learn the kernel hyper-parameters (those > 0; else fixed).
      learn_inducing: learn the inducing inputs Z (sparse DKM).
      input_scales: learn one positive scale per input feature (ARD): G_0 = (X s)(X s)^T / N_0.
      jitter: the first jitter of every kernel factorisation (official: 1e-4).
      output_kl_scale: s, the weight of the output layer's KL; None: 1 (Gaussian), 1 / C (categorical).
      output_init: "optimal": the output layer starts at the exact optimum of q(f_i) for a Gaussian likelihood
        given the initial kernel (Titsias 2009), "prior": q = N(0, K_ii). Categorical always uses "prior".
      mc_samples: Monte Carlo samples of the categorical expected log-likelihood in training.
      num_classes: the number of classes C (categorical; default: max label + 1).
      dtype: "float64" (the linear algebra in a `jax.enable_x64` scope) or "float32".
    """

    kernel_params: Any = ()
    noise_var: float = 0.1
    learn_noise: bool = True
    learn_kernel: bool = True
    learn_inducing: bool = True
    input_scales: bool = False
    jitter: float = linalg.JITTER
    output_kl_scale: float | None = None
    output_init: str = "optimal"
    mc_samples: int = 100
    num_classes: int | None = None
    dtype: str = "float64"

    def __post_init__(self):
        object.__setattr__(self, "kernel_params", _freeze_mapping(self.kernel_params))
        _checks.positive(self.noise_var, "noise_var", allow_zero=True)
        _checks.positive(self.jitter, "jitter", allow_zero=True)
        _checks.positive_int(self.mc_samples, "mc_samples")
        if self.output_kl_scale is not None:
            _checks.positive(self.output_kl_scale, "output_kl_scale", allow_zero=True)
        if self.output_init not in OUTPUT_INITS:
            raise ValueError(f"output_init={self.output_init!r} is not one of {list(OUTPUT_INITS)}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'float64'")
        if self.num_classes is not None:
            _checks.positive_int(self.num_classes, "num_classes")


@dataclasses.dataclass(frozen=True)
class DKMSpec:
    """A DKM's static structure (hashable: it is a static argument of every compiled function).

    Attributes:
      depth: hidden layers L.
      nu: nu_l per hidden layer (inf: an NNGP layer).
      kernel: the kernel's name (`theorax.models.dkm.KERNELS`) or a function gram -> kernel (fixed, no
        hyper-parameters).
      likelihood: "gaussian" or "categorical".
      num_outputs: C, the output GP's columns (targets' columns or classes).
      input_dim: N_0.
      num_inducing: M, or None for the full-data DKM.
      options: `ModelOptions`.
      squeeze: the targets were a vector (predictions come back as vectors).
    """

    depth: int
    nu: tuple[float, ...]
    kernel: str | Callable
    likelihood: str
    num_outputs: int
    input_dim: int
    num_inducing: int | None
    options: ModelOptions
    squeeze: bool = False

    @property
    def sparse(self) -> bool:
        return self.num_inducing is not None

    @property
    def kernel_init(self) -> list[dict[str, float]]:
        return _checks.per_layer_kernel_params(
            self.kernel, dict(self.options.kernel_params), self.depth + 1
        )

    @property
    def output_kl_scale(self) -> float:
        if self.options.output_kl_scale is not None:
            return self.options.output_kl_scale
        return 1.0 / self.num_outputs if self.likelihood == "categorical" else 1.0

    @property
    def dtype(self):
        return jnp.float64 if self.options.dtype == "float64" else jnp.float32


@flax.struct.dataclass
class DKMState:
    """A fitted DKM: its parameters, its structure and (full DKM) the training data predictions need.

    Attributes:
      params: the parameter pytree (see `init_params`).
      x_train, y_train: the training inputs and targets (full DKM; None for the sparse one).
      spec: the `DKMSpec` (static).
    """

    params: dict
    x_train: jax.Array | None
    y_train: jax.Array | None
    spec: DKMSpec = flax.struct.field(pytree_node=False)


def make_spec(
    x, y, *, depth, nu, kernel, likelihood, num_inducing, options: ModelOptions
) -> tuple[DKMSpec, jax.Array, jax.Array]:
    """Validates the data and the architecture (plain Python) and returns (spec, x, y) with y as (P, C) or
    labels (P,)."""
    depth = _checks.non_negative_int(depth, "depth")
    nu = _checks.nu_tuple(nu, depth)
    squeeze = likelihood == "gaussian" and getattr(y, "ndim", len(getattr(y, "shape", ()))) == 1
    x, y = _checks.data(x, y, likelihood, options.num_classes)
    _checks.per_layer_kernel_params(kernel, dict(options.kernel_params), depth + 1)
    p = x.shape[0]
    if num_inducing is not None:
        num_inducing = _checks.positive_int(num_inducing, "num_inducing")
        if num_inducing > p:
            raise ValueError(
                f"num_inducing={num_inducing} exceeds the {p} training points; use at most {p} (or "
                "num_inducing=None for the full DKM)"
            )
    if likelihood == "categorical":
        num_outputs = options.num_classes or int(jnp.max(y)) + 1
        if num_inducing is None:  # the full categorical DKM: the variational output at every point
            num_inducing = p
            options = dataclasses.replace(options, learn_inducing=False)
    else:
        num_outputs = y.shape[1]
    spec = DKMSpec(
        depth, nu, kernel, likelihood, num_outputs, x.shape[1], num_inducing, options, squeeze
    )
    return spec, x, y


# --------------------------------------------------------------------------------------------- parameters


def _encode_cholesky(chol: jax.Array) -> jax.Array:
    """V = sqrt(M) chol with the diagonal stored as its log (the official LayerCholesky)."""
    v = chol * math.sqrt(chol.shape[-1])
    return jnp.tril(v, -1) + jnp.diag(jnp.log(jnp.diagonal(v)))


def _decode_cholesky(v: jax.Array) -> jax.Array:
    return (jnp.tril(v, -1) + jnp.diag(jnp.exp(jnp.diagonal(v)))) / math.sqrt(v.shape[-1])


def _learned_kernel_names(spec: DKMSpec, layer: int) -> list[str]:
    if not isinstance(spec.kernel, str) or not spec.options.learn_kernel:
        return []
    return [k for k, v in spec.kernel_init[layer].items() if v > 0]


def kernel_hyper(spec: DKMSpec, params, layer: int) -> dict:
    """Kernel `layer`'s hyper-parameters: learned ones from `params` (log space), the rest from the spec."""
    values = dict(spec.kernel_init[layer])
    for name, log_value in params["kernel"][layer].items():
        values[name] = jnp.exp(log_value)
    return values


def _kernel(spec: DKMSpec, params, layer: int, gram):
    return kernels.kernel_fn(spec.kernel)(gram, **kernel_hyper(spec, params, layer))


def noise_var(spec: DKMSpec, params):
    if "log_noise" in params:
        return jnp.exp(params["log_noise"])
    return spec.options.noise_var


def _scaled(spec: DKMSpec, params, x):
    if "log_input_scales" in params:
        return x * jnp.exp(params["log_input_scales"])
    return x


def _inducing(spec: DKMSpec, params):
    z = params["inducing"]
    return z if spec.options.learn_inducing else lax.stop_gradient(z)


class Chain(NamedTuple):
    """The inducing (full DKM: training) block through the layers, shared by every batch of points.

    grams[l]: G_l's block (l = 0..L); factors[l]: K(G_l) factorised (`linalg.factorize`) for the finite-nu
    layers l < L (None for NNGP layers, whose points need no conditional); chols_g[l]: chol(G_{l+1}) (None
    likewise); k_out: the output kernel's block K(G_L); reg: sum_l nu_l KL_l; level: the largest jitter
    escalation.
    """

    grams: list
    factors: list
    chols_g: list
    k_out: jax.Array
    reg: jax.Array
    level: jax.Array


def inducing_chain(spec: DKMSpec, params, g0: jax.Array) -> Chain:
    """Runs the inducing (or full training) block G_0 through the hidden layers."""
    jitter = spec.options.jitter
    grams, factors, chols_g = [g0], [], []
    reg, level = jnp.zeros((), g0.dtype), jnp.zeros((), jnp.int32)
    g = g0
    for layer in range(spec.depth):
        k = _kernel(spec, params, layer, g)
        if math.isinf(spec.nu[layer]):
            factors.append(None)
            chols_g.append(None)
            g = k
        else:
            factor = linalg.factorize(k, jitter)
            chol_g = _decode_cholesky(params["grams"][str(layer)])
            g = linalg.outer(chol_g)
            reg = reg + spec.nu[layer] * linalg.kl(chol_g, factor, q=g)
            level = jnp.maximum(level, factor.level)
            factors.append(factor)
            chols_g.append(chol_g)
        grams.append(g)
    return Chain(grams, factors, chols_g, _kernel(spec, params, spec.depth, g), reg, level)


def point_blocks(spec: DKMSpec, params, chain: Chain, ti0: jax.Array, t0: jax.Array) -> GramBlocks:
    """The output kernel's blocks (K_ii, K_ti, k_t) of points whose input blocks are (ti0, t0)."""
    blocks = GramBlocks(chain.grams[0], ti0, t0)
    for layer in range(spec.depth):
        k = _kernel(spec, params, layer, blocks)
        if chain.factors[layer] is None:
            blocks = k
        else:
            blocks = objectives.propagate(
                k, chain.factors[layer], chain.chols_g[layer], chain.grams[layer + 1]
            )
    out = _kernel(spec, params, spec.depth, blocks)
    return GramBlocks(chain.k_out, out.ti, out.t)


def _input(spec, params, x_inducing, x_points=None) -> GramBlocks:
    z = _scaled(spec, params, x_inducing)
    return kernels.input_blocks(z, None if x_points is None else _scaled(spec, params, x_points))


def _output(params):
    out = params["output"]
    return out["mean"], _decode_cholesky(out["chol"])


# --------------------------------------------------------------------------------------------- objectives


def full_objective(spec: DKMSpec, params, x, y):
    """The full DKM's objective log N(Y; 0, K(G_L) + sigma^2 I) - sum_l nu_l KL_l (a sum over points) and the
    largest jitter escalation."""
    chain = inducing_chain(spec, params, _input(spec, params, x).ii)
    k = chain.k_out
    k_y = k + noise_var(spec, params) * jnp.eye(k.shape[0], dtype=k.dtype)
    log_marginal, ly = objectives.gaussian_log_marginal_of(k_y, y, spec.options.jitter)
    return log_marginal - chain.reg, jnp.maximum(chain.level, ly)


def expected_log_lik(spec: DKMSpec, params, mean, var, y, key):
    """E_q[log p(y | f)] per point for the spec's likelihood (Gaussian: closed form; categorical: MC)."""
    if spec.likelihood == "gaussian":
        return objectives.gaussian_expected_log_lik(mean, var, y, noise_var(spec, params))
    return objectives.categorical_expected_log_lik(mean, var, y, key, spec.options.mc_samples)


def sparse_objective(spec: DKMSpec, params, x, y, n_train: int, key):
    """The sparse DKM's per-datapoint objective on a minibatch (x, y) of a training set of `n_train` points,
    and the largest jitter escalation."""
    blocks = _input(spec, params, _inducing(spec, params), x)
    chain = inducing_chain(spec, params, blocks.ii)
    k = point_blocks(spec, params, chain, blocks.ti, blocks.t)
    factor = linalg.factorize(k.ii, spec.options.jitter)
    mean_u, chol_a = _output(params)
    a = linalg.outer(chol_a)
    mean, _, var = objectives.conditional(k, factor, chol_a, mean_u, q=a)
    ell = expected_log_lik(spec, params, mean, var, y, key)
    kl_out = linalg.kl(chol_a, factor, mean_u, q=a)
    value = jnp.mean(ell) - (spec.output_kl_scale * kl_out + chain.reg) / n_train
    return value, jnp.maximum(chain.level, factor.level)


# ----------------------------------------------------------------------------------------- initialisation


def padded_batches(batch: int, *arrays: jax.Array):
    """The rows of `arrays` as (steps, batch, ...) chunks, the last padded with zero rows, and the (steps, batch)
    mask of real rows."""
    n = arrays[0].shape[0]
    batch = max(1, min(batch, n))
    steps = -(-n // batch)
    pad = steps * batch - n

    def chunks(a):
        if pad:
            a = jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(steps, batch, *a.shape[1:])

    mask = jnp.arange(steps * batch).reshape(steps, batch) < n
    return tuple(chunks(a) for a in arrays), mask


def batched_map(fn: Callable, batch: int, *arrays: jax.Array):
    """fn over the rows of `arrays` in batches of `batch` (one `lax.map`); fn's outputs for every row."""
    n = arrays[0].shape[0]
    chunks, _ = padded_batches(batch, *arrays)
    out = lax.map(lambda args: fn(*args), chunks)
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:])[:n], out)


def _optimal_output(spec, params, chain, x, y, batch: int):
    """q(f_i) at the Gaussian likelihood's optimum for the current kernel (Titsias 2009):
    A = K_ii (K_ii + s^-2 Phi)^-1 K_ii, mu = s^-2 K_ii (K_ii + s^-2 Phi)^-1 K_iX y, Phi = K_iX K_Xi,
    accumulated over the training points in batches."""
    chol_k, _ = linalg.cholesky(chain.k_out, spec.options.jitter)
    z = _inducing(spec, params)
    (xs, ys), mask = padded_batches(batch, x, y)

    def accumulate(carry, args):
        xb, yb, wb = args
        blocks = _input(spec, params, z, xb)
        kt = point_blocks(spec, params, chain, blocks.ti, blocks.t).ti * wb[:, None]
        return (carry[0] + kt.T @ kt, carry[1] + kt.T @ yb), None

    m = chol_k.shape[0]
    zeros = (jnp.zeros((m, m), x.dtype), jnp.zeros((m, y.shape[1]), x.dtype))
    (phi, r), _ = lax.scan(accumulate, zeros, (xs, ys, mask.astype(x.dtype)))
    inv_noise = 1.0 / noise_var(spec, params)
    solve = functools.partial(jax.scipy.linalg.solve_triangular, lower=True)
    white = solve(chol_k, solve(chol_k, phi).T)  # L^-1 Phi L^-T
    b = jnp.eye(m, dtype=phi.dtype) + inv_noise * 0.5 * (white + white.T)
    chol_b, _ = linalg.cholesky(b, 0.0)
    s = solve(chol_b, chol_k.T).T  # L L_B^-T: A = s s^T
    mean = inv_noise * (s @ solve(chol_b, solve(chol_k, r)))
    cov = s @ s.T
    chol_a, _ = linalg.cholesky(0.5 * (cov + cov.T), 0.0)
    return mean, chol_a


def init_params(spec: DKMSpec, x, y, key, init_batch: int = 1024) -> dict:
    """Parameters at the NNGP: every Gram G_l = K(G_{l-1}) (jittered as it is factorised), every KL 0.

    Sparse: the inducing inputs are a random subset of the training inputs (all of them when M = P, in
    order), the output layer starts as `options.output_init` says.
    """
    opts = spec.options
    params: dict = {
        "kernel": [
            {n: jnp.log(jnp.asarray(spec.kernel_init[layer][n], x.dtype)) for n in _learned_kernel_names(spec, layer)}
            for layer in range(spec.depth + 1)
        ]
    }  # fmt: skip
    if spec.likelihood == "gaussian" and opts.learn_noise and opts.noise_var > 0:
        params["log_noise"] = jnp.log(jnp.asarray(opts.noise_var, x.dtype))
    if opts.input_scales:
        params["log_input_scales"] = jnp.zeros(spec.input_dim, x.dtype)
    if spec.sparse:
        p, m = x.shape[0], spec.num_inducing
        idx = jnp.arange(p) if m == p else jax.random.choice(key, p, (m,), replace=False)
        params["inducing"] = x[idx]
        g = _input(spec, params, params["inducing"]).ii
    else:
        g = _input(spec, params, x).ii
    params["grams"] = {}
    for layer in range(spec.depth):
        k = _kernel(spec, params, layer, g)
        if math.isinf(spec.nu[layer]):
            g = k
            continue
        chol_k, _ = linalg.cholesky(k, opts.jitter)
        params["grams"][str(layer)] = _encode_cholesky(chol_k)
        g = chol_k @ chol_k.T
    if spec.sparse:
        chain = inducing_chain(spec, params, _input(spec, params, params["inducing"]).ii)
        if spec.likelihood == "gaussian" and opts.output_init == "optimal":
            mean, chol_a = _optimal_output(spec, params, chain, x, y, init_batch)
        else:
            chol_a, _ = linalg.cholesky(chain.k_out, opts.jitter)
            mean = jnp.zeros((spec.num_inducing, spec.num_outputs), x.dtype)
        params["output"] = {"mean": mean, "chol": _encode_cholesky(chol_a)}
    return params
