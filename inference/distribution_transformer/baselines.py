"""Baselines that Distribution Transformers are compared with: numpyro NUTS and SVI, and importance sampling
(reference notes Sec. 4-5). The numpyro model of each task is the task's own (`Task.baseline_problem`); samples
are scored through `evaluation.kde_gmm`.

* `nuts`: numpyro's NUTS kernel with vectorised chains, and problems vectorised too (each problem is its own
  posterior with its own adaptation), compiled once; compilation is timed apart from the sampling.
* `svi_gaussian`: numpyro SVI with a full-rank Gaussian guide (`AutoMultivariateNormal`, `Trace_ELBO`, Adam),
  `vmap`-ed over problems; the guide is a Gaussian in numpyro's unconstrained space, which for every task here
  is the GMM's sample space (log for positive, logit for unit-interval latents).
* `svi_gmm`: SVI with a K-component Gaussian-mixture guide (`MixtureGuide`: full-rank or diagonal components,
  learnable weights) on numpyro's unconstrained log joint, fitted by the stratified mixture ELBO with Adam,
  `vmap`-ed over problems; returns a `GMM` in the same space, scored like the transformer.
* `importance_sampling`: self-normalised importance sampling from the prior (task (e), reference notes 5(e)).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpyro
import optax
from numpyro.distributions.transforms import biject_to
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoMultivariateNormal
from numpyro.infer.util import potential_energy
from theorax.models.gmm import GMM

# ----------------------------------------------------------------------------------------------- NUTS


def nuts(
    model: Callable,
    args: tuple,
    key: jax.Array,
    *,
    num_warmup: int,
    num_samples: int,
    num_chains: int = 4,
    problems_per_call: int | None = None,
) -> tuple[dict[str, jax.Array], dict[str, float]]:
    """numpyro NUTS on every problem of a batch: chains vectorised, problems too (in calls of
    `problems_per_call`, all problems at once by default; 1 is the usual one-problem-at-a-time use).

    Uses numpyro's functional kernel (`numpyro.infer.hmc.hmc(potential_fn_gen, algo="NUTS")`) with the
    model arguments dynamic, `vmap`-ed over chains and problems, with step-size and diagonal mass-matrix
    adaptation during `num_warmup` steps per chain. Every chain starts from the unconstrained point that
    `initialize_model` finds for the first problem (warm-up moves it). Samples are returned in numpyro's
    unconstrained space (log for positive, logit for unit-interval sites), which is the GMM's sample space.

    Args:
      model: a numpyro model `model(*args_b)`.
      args: a tuple of arrays with a leading problem axis `[P, ...]`.
      key: PRNG key.
      num_warmup, num_samples, num_chains: per problem.
      problems_per_call: problems per call of the one compiled program (must divide P).

    Returns:
      `(samples, timing)`: `samples[site]` is `[P, num_chains * num_samples, ...]` (unconstrained);
      `timing` holds `compile_s` and `per_problem_s` (steady-state wall time of all calls divided by P).
    """
    from numpyro.infer.hmc import hmc
    from numpyro.infer.util import initialize_model

    num_problems = args[0].shape[0]
    first = tuple(a[0] for a in args)
    info, potential_fn_gen, _, _ = initialize_model(
        jax.random.fold_in(key, 0), model, model_args=first, dynamic_args=True
    )
    init_z = info.z
    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_fn_gen, algo="NUTS")

    def one_chain(key, args_b):
        state = init_kernel(init_z, num_warmup, model_args=args_b, rng_key=key)

        def step(state, _):
            state = sample_kernel(state, model_args=args_b)
            return state, state.z

        state, _ = jax.lax.scan(step, state, None, length=num_warmup)
        _, zs = jax.lax.scan(step, state, None, length=num_samples)
        return zs

    def one_problem(key, *args_b):
        zs = jax.vmap(one_chain, in_axes=(0, None))(jax.random.split(key, num_chains), args_b)
        return jax.tree.map(lambda z: z.reshape((-1,) + z.shape[2:]), zs)

    run_all = jax.jit(jax.vmap(one_problem))
    per_call = num_problems if problems_per_call is None else problems_per_call
    if num_problems % per_call:
        raise ValueError(f"problems_per_call={per_call} must divide the {num_problems} problems")
    keys = jax.random.split(jax.random.fold_in(key, 1), num_problems)
    start = time.perf_counter()
    compiled = run_all.lower(keys[:per_call], *(a[:per_call] for a in args)).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    parts = []
    for i in range(0, num_problems, per_call):
        part = compiled(keys[i : i + per_call], *(a[i : i + per_call] for a in args))
        parts.append(jax.block_until_ready(part))
    run_s = time.perf_counter() - start
    samples = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    return samples, {"compile_s": compile_s, "per_problem_s": run_s / num_problems}


# ------------------------------------------------------------------------------------------------ SVI


def _fit_every_problem(fit: Callable, key: jax.Array, args: tuple) -> tuple[Any, dict[str, float]]:
    """Runs `fit(key, *args_b)` on every problem `b` (leading axis of `args`) in one vmapped, jitted call:
    (its outputs, {"compile_s", "per_problem_s"}) with the compile and run times measured apart."""
    num_problems = args[0].shape[0]
    keys = jax.random.split(key, num_problems)
    start = time.perf_counter()
    compiled = jax.jit(jax.vmap(fit)).lower(keys, *args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(keys, *args))
    run_s = time.perf_counter() - start
    return out, {"compile_s": compile_s, "per_problem_s": run_s / num_problems}


def svi_gaussian(
    model: Callable,
    args: tuple,
    key: jax.Array,
    *,
    num_steps: int,
    learning_rate: float | optax.Schedule = 0.01,
    num_particles: int = 10,
) -> tuple[jax.Array, jax.Array, dict[str, float]]:
    """Fits a full-rank Gaussian guide (numpyro `AutoMultivariateNormal`) to every problem, vmapped.

    Args:
      model: a numpyro model `model(*args_b)`.
      args: a tuple of arrays with a leading problem axis `[P, ...]`.
      key: PRNG key.
      num_steps: Adam steps per problem; learning_rate: Adam step size (a float or an optax schedule);
        num_particles: ELBO samples.

    Returns:
      `(loc [P, D], scale_tril [P, D, D], timing)`: the guide in numpyro's unconstrained space (the latent
      sites flattened in the model's sample order); `timing["per_problem_s"]` is the steady-state wall time
      of the vmapped fit divided by P (compilation is timed separately as `compile_s`).
    """
    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, optax.adam(learning_rate), Trace_ELBO(num_particles=num_particles))
    first = tuple(a[0] for a in args)
    svi.init(key, *first)  # sets up the guide's prototype trace outside of vmap

    def fit(key, *args_b):
        state = svi.init(key, *args_b)
        state = jax.lax.fori_loop(0, num_steps, lambda i, s: svi.update(s, *args_b)[0], state)
        params = svi.get_params(state)
        return params["auto_loc"], params["auto_scale_tril"]

    (loc, tril), timing = _fit_every_problem(fit, key, args)
    return loc, tril, timing


def _unconstrained_draw(model: Callable, key: jax.Array, args: tuple) -> dict[str, jax.Array]:
    """One draw of the model's latent sites from its own sampling distributions, in the order the model samples
    them, mapped to numpyro's unconstrained space."""
    trace = numpyro.handlers.trace(numpyro.handlers.seed(model, key)).get_trace(*args)
    latent = {n: s for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
    discrete = [n for n, s in latent.items() if s["fn"].support.is_discrete]
    if discrete:
        raise ValueError(
            f"SVI with a Gaussian-mixture guide needs continuous latents; {discrete} are discrete"
        )
    return {n: biject_to(s["fn"].support).inv(s["value"]) for n, s in latent.items()}


def _latent_shapes(model: Callable, args: tuple) -> dict[str, tuple[int, ...]]:
    """The model's latent sample sites in the order the model samples them, with the shapes of their values in
    numpyro's unconstrained space; found by abstract evaluation (nothing runs op by op)."""
    names = []

    def unconstrained(key):
        values = _unconstrained_draw(model, key, args)
        names.extend(values)  # the sampling order (eval_shape's output dict is key-sorted)
        return values

    shapes = jax.eval_shape(unconstrained, jax.random.key(0))
    if not names:
        raise ValueError("the model has no latent sample sites to fit a guide to")
    return {n: shapes[n].shape for n in names}


class _SiteLayout(NamedTuple):
    """A model's latent sites in its sampling order with their unconstrained shapes, flattened side by side into
    one vector of size `dim`."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(shape) for shape in self.shapes.values()]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def unflatten(self, y: jax.Array) -> dict[str, jax.Array]:
        """`[D]` -> `{site: unconstrained value}`."""
        parts = jnp.split(y, list(itertools.accumulate(self.sizes))[:-1])
        return {n: p.reshape(s) for (n, s), p in zip(self.shapes.items(), parts, strict=True)}

    def flatten(self, values: dict[str, jax.Array]) -> jax.Array:
        return jnp.concatenate([jnp.reshape(values[n], -1) for n in self.shapes])


@dataclasses.dataclass(frozen=True)
class MixtureGuide:
    """The K-component Gaussian-mixture guide of `svi_gmm`: q(y) = sum_k w_k N(y; mu_k, L_k L_k^T).

    Parameters `(logits, means, raw)`: the logits of w, the means, and the Cholesky factors' raw values
    (diagonal through softplus, strict lower part free; `covariance="diag"` keeps only the diagonal). They start
    at equal weights and scale `init_scale` I; the means are given (`init_params`).

    Attributes:
      num_components: K.
      covariance: `"full"` (full-rank components) or `"diag"`.
      init_scale: initial standard deviation of every component.
    """

    num_components: int = 4
    covariance: str = "full"
    init_scale: float = 0.1

    def init_params(self, means: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Initial parameters around `means` `[K, D]`."""
        K, dim = means.shape
        dtype = jnp.result_type(float)
        raw_scale = jnp.log(jnp.expm1(jnp.asarray(self.init_scale, dtype)))
        if self.covariance == "full":
            raw = jnp.broadcast_to(raw_scale * jnp.eye(dim, dtype=dtype), (K, dim, dim))
        else:
            raw = jnp.full((K, dim), raw_scale, dtype)
        return jnp.zeros(K, dtype), means.astype(dtype), raw

    def to_gmm(self, params) -> GMM:
        logits, means, raw = params
        if self.covariance == "diag":
            return GMM.from_stddevs(logits, means, jax.nn.softplus(raw), validate=False)
        dim = means.shape[-1]
        diag = jax.nn.softplus(jnp.diagonal(raw, axis1=-2, axis2=-1))
        tril = jnp.tril(raw, -1) + diag[..., None] * jnp.eye(dim, dtype=raw.dtype)
        return GMM(logits, means, tril)


def mixture_elbo(q: GMM, log_joint: Callable, key: jax.Array, num_particles: int) -> jax.Array:
    r"""The stratified ("mixture") ELBO of a mixture guide `q` (one problem: batch `()`, K components, D dims),

        ELBO = sum_k w_k E_{eps ~ N(0, I)}[ log p(y_k, z) - log q(y_k) ],   y_k = mu_k + L_k eps,

    by `num_particles` draws of eps per component; `log_joint` maps `[N, D]` -> `[N]`. It equals the usual
    ELBO E_q[log p - log q], and is differentiable in the weights (they appear explicitly) as well as, through
    the reparameterisation, in mu_k and L_k (Morningstar et al., "Automatic Differentiation Variational
    Inference with Mixtures", AISTATS 2021).
    """
    S, (K, dim) = num_particles, q.means.shape
    eps = jax.random.normal(key, (S, K, dim), q.means.dtype)
    y = q.means + jnp.einsum("kij,skj->ski", q.scale_tril, eps)  # [S, K, D]
    log_p = log_joint(y.reshape(S * K, dim)).reshape(S, K)
    gap = jnp.mean(log_p - q.log_prob(y), axis=0)  # [K]
    return jnp.sum(q.weights * gap)


def _fit_mixture(key, args_b, *, model, layout, guide, optimizer, num_steps, num_particles):
    """One problem's `svi_gmm` fit: prior-draw initial means, Adam on the negative mixture ELBO in a
    `fori_loop`. Returns `(q, finite)`."""
    log_joint = jax.vmap(lambda y: -potential_energy(model, args_b, {}, layout.unflatten(y)))
    k_init, k_steps = jax.random.split(key)
    draws = jax.vmap(lambda k: layout.flatten(_unconstrained_draw(model, k, args_b)))
    params = guide.init_params(draws(jax.random.split(k_init, guide.num_components)))

    def negative_elbo(params, key):
        return -mixture_elbo(guide.to_gmm(params), log_joint, key, num_particles)

    def step(i, state):
        params, opt_state = state
        grads = jax.grad(negative_elbo)(params, jax.random.fold_in(k_steps, i))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, _ = jax.lax.fori_loop(0, num_steps, step, (params, optimizer.init(params)))
    q = guide.to_gmm(params)
    finite = jnp.all(jnp.isfinite(q.logits)) & jnp.all(jnp.isfinite(q.means))
    return q, finite & jnp.all(jnp.isfinite(q.scale_tril))


def _check_svi_gmm(args: tuple, guide: MixtureGuide, num_steps: int, num_particles: int) -> None:
    if num_steps < 1 or guide.num_components < 1 or num_particles < 1:
        raise ValueError(
            f"svi_gmm needs num_steps, num_components and num_particles >= 1; got {num_steps}, "
            f"{guide.num_components}, {num_particles}"
        )
    if guide.covariance not in ("full", "diag"):
        raise ValueError(f"svi_gmm covariance={guide.covariance!r}; choose 'full' or 'diag'")
    if not guide.init_scale > 0:
        raise ValueError(f"svi_gmm init_scale={guide.init_scale} must be > 0")
    num_problems = args[0].shape[0]
    if any(jnp.shape(a)[:1] != (num_problems,) for a in args):
        shapes = [jnp.shape(a) for a in args]
        raise ValueError(
            f"svi_gmm args need one leading problem axis of equal size; shapes {shapes}"
        )


def svi_gmm(
    model: Callable,
    args: tuple,
    key: jax.Array,
    *,
    num_steps: int,
    guide: MixtureGuide = MixtureGuide(),
    learning_rate: float | optax.Schedule = 0.01,
    num_particles: int = 3,
) -> tuple[GMM, dict[str, float]]:
    r"""Fits a K-component Gaussian-mixture guide to every problem by SVI, vmapped over problems.

    The guide q(y) = sum_k w_k N(y; mu_k, L_k L_k^T) (`MixtureGuide`) lives in numpyro's unconstrained space
    (the GMM's sample space: log for positive, logit for unit-interval latents), where the target is the
    model's log joint log p(y, z) = -U(y) with the change-of-variables Jacobian included (numpyro's
    `potential_energy` U). Every parameter is learnt: logits of w, means mu_k, and Cholesky factors L_k.

    Objective: the stratified mixture ELBO (`mixture_elbo`), which draws `num_particles` reparameterised
    samples from *every* component rather than sampling a component index. Fresh noise at every step; Adam;
    a `lax.fori_loop` over steps inside one jitted, problem-vmapped program.

    Initialisation: equal weights, scale `guide.init_scale` I, and each component's mean at an independent draw
    of the model's latents from its own sampling distributions (prior draws, as numpyro's `init_to_sample`),
    mapped to the unconstrained space, so the components start spread over the prior's modes.

    Args:
      model: a numpyro model `model(*args_b)` whose latents are continuous.
      args: a tuple of arrays with a leading problem axis `[P, ...]`.
      key: PRNG key.
      num_steps: Adam steps per problem.
      guide: the guide's components, covariance form and initial scale.
      learning_rate: Adam step size (a float or an optax schedule of the step).
      num_particles: samples per component per step (K * num_particles log-joint evaluations a step).

    Returns:
      `(q, timing)`: `q` a `GMM` with batch `[P]` and K components over the latent sites flattened in the
      model's sample order (as `svi_gaussian`); `timing` holds `compile_s`, `per_problem_s` (steady-state wall
      time of the vmapped fit divided by P) and `nonfinite_problems` (problems whose fit went non-finite).
    """
    _check_svi_gmm(args, guide, num_steps, num_particles)
    layout = _SiteLayout(_latent_shapes(model, tuple(a[0] for a in args)))
    settings = dict(model=model, layout=layout, guide=guide, num_steps=num_steps)
    settings.update(optimizer=optax.adam(learning_rate), num_particles=num_particles)
    (q, finite), timing = _fit_every_problem(
        lambda key, *args_b: _fit_mixture(key, args_b, **settings), key, args
    )
    return q, timing | {"nonfinite_problems": int(args[0].shape[0] - finite.sum())}


# ------------------------------------------------------------------------------- importance sampling


def importance_sampling(
    key: jax.Array,
    sample_prior: Callable[[jax.Array, int], jax.Array],
    log_likelihood: Callable[[jax.Array], jax.Array],
    num_samples: int,
) -> tuple[jax.Array, jax.Array]:
    """Self-normalised importance sampling with the prior as proposal.

    Args:
      key: PRNG key.
      sample_prior: `(key, n) -> [n, *B, d]` prior draws (in the GMM's sample space).
      log_likelihood: `[n, *B, d] -> [n, *B]`.
      num_samples: number of prior draws per problem.

    Returns:
      `(samples [n, *B, d], log_weights [n, *B])`, for `kde_gmm`.
    """
    y = sample_prior(key, num_samples)
    return y, log_likelihood(y)
