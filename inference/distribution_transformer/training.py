"""Training a Distribution Transformer on fresh draws from a task's meta-prior (paper Sec. 3.3).

Each step draws a batch of triples (phi, x, z) ~ p(phi) p(x | phi) p(z | x) inside the jitted step (no dataset),
and minimises

    loss = E[-log q_theta(f(x) | phi)] + E[-log q_theta(f(x) | z, phi)]

the prior-consistency NLL of the decoded prior tokens plus the posterior NLL (reference notes Sec. 3). The second
term equals E_{phi,z} KL(p(. | z, phi) || q_theta(. | z, phi)) up to a constant (Prop. 3.1), so minimising it
fits the exact posterior in expectation; the first is what lets the posterior be fed back as the next prior.
Both are computed in the GMM's sample space (the Jacobian of f does not depend on theta). `nanmean` over the
batch as in the official code.

The optimiser is AdamW (weight decay 0 by default) on a linear warm-up + cosine decay schedule, after an
element-wise gradient clip at +-1e4 (the official gradient hook).

Optional **self-fed priors** (`PriorFeedback`, filtering tasks only; not in the paper or the official code,
which train on meta-prior draws alone): a pool of priors is kept in the train state and fills a fraction of
every batch. After each step, the model's own posterior for each pool prior goes through the task's exact
predict step (mu <- A mu, Sigma <- A Sigma A^T + Q) and becomes that entry's next prior, as in the filter
(`filters.dt_filter`); entries restart from the filter's initial prior with probability `reset_prob` per step,
or when their prior leaves a sane range. Each training triple still draws the latent
from its own prior (x ~ prior, z ~ p(z | x)), so the posterior term keeps its meaning (Prop. 3.1) for these
priors too: the model is asked for the exact posterior of the priors it feeds itself at test time, instead of
only for meta-prior draws, which after many steps look different (the train/test mismatch of sequential use).

Nothing here is tuned for a machine by default. `compiler_options` (the train step, `make_posterior_fn`) and
`slices` (`make_posterior_fn`) are the hardware knobs, passed explicitly; the experiment sets them for the CPU
(`experiments.distribution_transformer.cpu_tuning`). This module does not import numpyro.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from theorax.inference.distribution_transformer.tasks import Problem, Task
from theorax.models.distribution_transformer import DistributionTransformer
from theorax.models.gmm import GMM


def _options(compiler_options: Mapping[str, str] | None) -> dict[str, str] | None:
    return dict(compiler_options) if compiler_options else None


def make_optimizer(
    learning_rate: float,
    num_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.0,
    grad_clip: float = 1e4,
) -> optax.GradientTransformation:
    """AdamW on a linear warm-up to `learning_rate` over `warmup_steps`, then cosine decay to 0 at
    `num_steps`; gradients are first clipped element-wise to [-grad_clip, grad_clip]."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(warmup_steps, 1), max(num_steps, warmup_steps + 1), 0.0
    )
    return optax.chain(optax.clip(grad_clip), optax.adamw(schedule, weight_decay=weight_decay))


@dataclasses.dataclass(frozen=True)
class PriorFeedback:
    """Self-fed priors for filtering tasks (see the module docstring).

    Attributes:
      fraction: share of each batch filled from the pool (`pool_size` rounds it to a whole number).
      reset_prob: per-step probability that a pool entry restarts from the filter's initial prior (mean
        chain length 1 / reset_prob steps).
      start_step: before this step every entry is reset each step (the pool holds initial priors only),
        so early, untrained posteriors are not fed back.
      max_abs_mean, max_log_scale: an entry whose predicted prior has a mean or a Cholesky diagonal beyond
        these (or is not finite) restarts.
    """

    fraction: float = 0.25
    reset_prob: float = 0.02
    start_step: int = 0
    max_abs_mean: float = 100.0
    max_log_scale: float = 3.0

    def pool_size(self, batch_size: int) -> int:
        return max(1, min(batch_size - 1, round(self.fraction * batch_size)))


def _check_feedback(task: Task, feedback: PriorFeedback | None) -> None:
    if feedback is None:
        return
    if not task.filtering:
        raise ValueError(
            f"PriorFeedback needs a filtering task with a linear-Gaussian transition (`dynamics`), an "
            f"`initial_prior` and `sample_given_prior`; {type(task).__name__} has none"
        )
    if not 0.0 < feedback.fraction < 1.0:
        raise ValueError(f"PriorFeedback.fraction={feedback.fraction} must lie in (0, 1)")
    if not 0.0 <= feedback.reset_prob <= 1.0:
        raise ValueError(f"PriorFeedback.reset_prob={feedback.reset_prob} must lie in [0, 1]")


def _next_pool(
    task: Task, feedback: PriorFeedback, posterior: GMM, key, step
) -> tuple[GMM, jax.Array]:
    """Predicts each pool entry's posterior to its next prior; restarts some entries. Returns the new pool
    and the restart mask."""
    posterior = jax.lax.stop_gradient(posterior)
    nxt = task.dynamics.predict(posterior)
    n, k = nxt.logits.shape
    log_diag = jnp.log(jnp.diagonal(nxt.scale_tril, axis1=-2, axis2=-1))
    sane = (
        jnp.all(jnp.isfinite(nxt.logits), -1)
        & jnp.all(jnp.isfinite(nxt.means) & (jnp.abs(nxt.means) <= feedback.max_abs_mean), (-2, -1))
        & jnp.all(jnp.isfinite(log_diag) & (log_diag <= feedback.max_log_scale), (-2, -1))
    )
    reset = (jax.random.uniform(key, (n,)) < feedback.reset_prob) | ~sane
    reset = reset | (step < feedback.start_step)
    init = task.initial_prior(n, k)
    logits = nxt.logits - jax.scipy.special.logsumexp(nxt.logits, -1, keepdims=True)
    pool = GMM(
        jnp.where(reset[:, None], init.logits, logits),
        jnp.where(reset[:, None, None], init.means, nxt.means),
        jnp.where(reset[:, None, None, None], init.scale_tril, nxt.scale_tril),
    )
    return pool, reset


def nll_loss(
    model: DistributionTransformer,
    params,
    problem: Problem,
    use_prior_loss: bool = True,
    return_posterior: bool = False,
):
    """The training loss on one batch: posterior NLL (+ prior NLL) of the true latents, `nanmean` over the
    batch. Returns `(loss, metrics)` with `prior_nll` and `posterior_nll` (sample space); with
    `return_posterior`, `(loss, (metrics, posterior))`."""
    prior_q, post_q = model.apply(params, problem.prior, problem.observations, return_prior=True)
    posterior_nlls = -post_q.log_prob(problem.target)
    posterior_nll = jnp.nanmean(posterior_nlls)
    prior_nll = jnp.nanmean(-prior_q.log_prob(problem.target))
    loss = posterior_nll + prior_nll if use_prior_loss else posterior_nll
    metrics = {"loss": loss, "posterior_nll": posterior_nll, "prior_nll": prior_nll}
    if return_posterior:
        return loss, (dict(metrics, posterior_nlls=posterior_nlls), post_q)
    return loss, metrics


def init_state(
    model: DistributionTransformer,
    task: Task,
    optimizer,
    key: jax.Array,
    *,
    feedback: PriorFeedback | None = None,
    batch_size: int | None = None,
) -> dict:
    """Initial train state `{"params", "opt_state"}` from a small batch of the task (jitted); with
    `feedback`, also `"pool"`: `feedback.pool_size(batch_size)` copies of the filter's initial prior."""
    _check_feedback(task, feedback)
    if feedback is not None and batch_size is None:
        raise ValueError("init_state(feedback=...) needs the batch_size the pool is sized for")

    def init(key):
        problem = task.sample(jax.random.fold_in(key, 1), 2)
        params = model.init(jax.random.fold_in(key, 2), problem.prior, problem.observations)
        state = {"params": params, "opt_state": optimizer.init(params)}
        if feedback is not None:
            state["pool"] = task.initial_prior(
                feedback.pool_size(batch_size), problem.prior.num_components
            )
        return state

    return jax.jit(init)(key)


def make_train_step(
    model: DistributionTransformer,
    task: Task,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    key: jax.Array,
    use_prior_loss: bool = True,
    batch_sharding: jax.sharding.Sharding | None = None,
    feedback: PriorFeedback | None = None,
    compiler_options: Mapping[str, str] | None = None,
) -> Callable[[dict, int], tuple[dict, Mapping[str, jax.Array]]]:
    """A jitted `step_fn(state, step) -> (state, metrics)` with the state donated.

    The step's randomness is `fold_in(key, step)`, so the step is a pure function of (state, step) and a
    resumed run redraws exactly the same batches. With `batch_sharding` the sampled problems are constrained
    to it (the batch axis split over a `data` mesh; parameters stay replicated). With `feedback` (the state
    from `init_state(..., feedback=...)`), the last `feedback.pool_size(batch_size)` problems of each batch
    use the pool's priors, and the metrics add `feedback_posterior_nll` and `feedback_resets`.
    `compiler_options` are XLA options for this one program (`jax.jit(..., compiler_options=...)`; none by
    default).
    """
    _check_feedback(task, feedback)
    n_fb = feedback.pool_size(batch_size) if feedback is not None else 0

    def step_fn(state, step):
        k_step = jax.random.fold_in(key, step)
        problem = task.sample(k_step, batch_size - n_fb)
        if feedback is not None:
            fed = task.sample_given_prior(jax.random.fold_in(k_step, 1), state["pool"])
            problem = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), problem, fed)
        if batch_sharding is not None:
            problem = jax.lax.with_sharding_constraint(problem, batch_sharding)

        def loss_fn(params):
            return nll_loss(model, params, problem, use_prior_loss, return_posterior=True)

        grads, (metrics, posterior) = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        nlls = metrics.pop("posterior_nlls")
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        new_state = {"params": params, "opt_state": opt_state}
        if feedback is not None:
            pool, reset = _next_pool(
                task, feedback, posterior[batch_size - n_fb :], jax.random.fold_in(k_step, 2), step
            )
            new_state["pool"] = pool
            metrics["feedback_posterior_nll"] = jnp.nanmean(nlls[batch_size - n_fb :])
            metrics["feedback_resets"] = jnp.mean(reset.astype(jnp.float32))
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,), compiler_options=_options(compiler_options))


def make_posterior_fn(
    model: DistributionTransformer,
    *,
    slices: int = 1,
    compiler_options: Mapping[str, str] | None = None,
) -> Callable:
    """A jitted `posterior(params, prior, observations) -> GMM` for inference (validated at trace time).

    Two hardware knobs, off by default:

    * `slices`: inside the one compiled program the batch (the leading axis of the prior and of every
      observation array) is cut into `slices` near-equal parts that go through the model independently and
      are concatenated back; the result is the same. XLA's CPU runtime runs the independent parts' small
      operations concurrently, which keeps both cores of a small machine busy better than one batch of small
      operations does (the paper's DT-5 on 1,000 problems, 2-core CPU: ~30 ms whole, ~28 ms in 2 slices).
      Batches smaller than `slices` run whole.
    * `compiler_options`: XLA options for this program (`jax.jit(..., compiler_options=...)`).
    """

    def posterior(params, prior, observations):
        first = jax.tree.leaves(prior)[0]  # GMM logits [*B, k] or prior features [*B, f]
        n = first.shape[0] if first.ndim > 1 else 0
        if slices <= 1 or n < slices:
            return model.apply(params, prior, observations)
        bounds = [round(i * n / slices) for i in range(slices + 1)]
        parts = [
            model.apply(
                params, *jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], (prior, observations))
            )
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

    return jax.jit(posterior, compiler_options=_options(compiler_options))


def scan_updates(
    update: Callable[[GMM, Mapping[str, jax.Array]], GMM],
    prior: GMM,
    observations: Mapping[str, jax.Array],
    transition: Callable[[GMM], GMM] | None = None,
) -> GMM:
    """The sequential-inference loop: posterior_t = update(prior_t, observations_t), and the next prior is
    transition(posterior_t) (the posterior itself without a transition). One `lax.scan` over the leading axis of
    every observation array; returns the posteriors stacked, batch `[T, *B]`."""

    def body(gmm, obs):
        post = update(gmm, obs)
        nxt = transition(post) if transition is not None else post
        return nxt, post

    _, posts = jax.lax.scan(body, prior, dict(observations))
    return posts


def sequential_posterior(
    model: DistributionTransformer,
    params,
    prior: GMM,
    observations: Mapping[str, jax.Array],
    transition: Callable[[GMM], GMM] | None = None,
) -> GMM:
    """Sequential inference: feeds each posterior back as the next prior (paper Sec. 3.3 and 4.3).

    Args:
      model, params: a GMM-prior `DistributionTransformer` and its parameters.
      prior: the initial GMM prior, batch `[*B]`.
      observations: `{source: [T, *B, n, m]}`, one update per leading index.
      transition: optional map applied to each posterior before it becomes the next prior (e.g. an exact
        linear-Gaussian predict step in filtering).

    Returns:
      The GMMs after each update, stacked: batch `[T, *B]`.
    """
    model.check_inputs(prior, jax.tree.map(lambda z: z[0], dict(observations)))
    return scan_updates(
        lambda gmm, obs: model.apply(params, gmm, obs), prior, observations, transition
    )
