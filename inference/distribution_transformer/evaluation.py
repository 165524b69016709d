"""Scoring approximate posteriors against each task's exact or near-exact reference.

Two estimators of the expected KL E_z KL(p(. | z) || q(. | z)) (reference notes Sec. 5(c)), both in the GMM's
sample space (KL is invariant to the shared bijection f, so this is also the KL in the latent's own space):

* `monte_carlo_kl`: per problem, sample the exact posterior and average log p - log q (`gmm.kl_monte_carlo`).
  Needs a sampler of the exact posterior (`task.has_exact_sampler`: tasks (a) and (b)).
* `gap_kl`: per problem, log p(y_true | z) - log q(y_true | z) at the true latent of the generating triple;
  its mean over problems is an unbiased estimate of the expected KL and only needs the reference density
  (tasks (a), (b), (d), (e)).

The references are the tasks' own (`Task.reference_log_prob`, `Task.reference_sample`): (a) the exact GMM
posterior, (b) the conjugate inverse-gamma posterior on log sigma^2, (d) the GP posterior over (y*, log l)
normalised by quadrature, (e) the posterior over logit delta normalised by quadrature.

`kde_gmm` turns a sample-based method's (weighted) samples into a density to score, as the paper does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from theorax.inference.distribution_transformer.tasks import Problem, Task
from theorax.models.gmm import GMM, kl_monte_carlo


def monte_carlo_kl(
    task: Task, problem: Problem, q_log_prob, key: jax.Array, n: int = 10_000
) -> jax.Array:
    """Per-problem KL(p || q) `[B]` by `n` exact posterior draws; `q_log_prob` maps `[n, B, d]` -> `[n, B]`."""
    return kl_monte_carlo(
        key,
        lambda k, m: task.reference_sample(problem, k, m),
        lambda y: task.reference_log_prob(problem, y),
        q_log_prob,
        n,
    )


def gap_kl(task: Task, problem: Problem, q_log_prob) -> jax.Array:
    """Per-problem log p(y_true | z) - log q(y_true | z) `[B]`; its mean estimates the expected KL."""
    y = problem.target
    return task.reference_log_prob(problem, y) - q_log_prob(y)


def kde_gmm(
    samples: jax.Array,
    log_weights: jax.Array | None = None,
    jitter: float = 1e-3,
    *,
    bandwidth: str = "covariance",
) -> GMM:
    """A kernel density estimate as a GMM: one component per (weighted) sample, one shared kernel covariance.

    The kernel is (Cov_w + jitter I) * 1.06 N_eff^{-0.2}, with Cov_w the weighted sample covariance and
    N_eff = 1 / sum w^2 the effective sample size: the paper's scoring of its particle filter (reference notes
    Sec. 4.3.1), `bandwidth="covariance"`. `bandwidth="std"` scales the kernel once more by 1.06 N^{-0.2}
    (N the number of samples), so that for equally weighted samples it is h^2 (Cov + jitter I) with
    Silverman's h = 1.06 N^{-1/5} applied to the standard deviation (how NUTS and importance sampling are
    scored in the experiment).

    Args:
      samples: `[N, *B, d]` samples (per problem of a batch `B`).
      log_weights: optional `[N, *B]` unnormalised log importance weights (uniform if None).
      jitter: added to the sample covariance's diagonal.
      bandwidth: `"covariance"` or `"std"` (above).

    Returns:
      A GMM with batch `B` and N components.
    """
    if bandwidth not in ("covariance", "std"):
        raise ValueError(f"kde_gmm bandwidth={bandwidth!r}; choose 'covariance' or 'std'")
    d = samples.shape[-1]
    if log_weights is None:
        log_weights = jnp.zeros(samples.shape[:-1])
    w = jax.nn.softmax(log_weights, axis=0)
    mean = jnp.einsum("n...,n...d->...d", w, samples)
    c = samples - mean
    cov = jnp.einsum("n...,n...i,n...j->...ij", w, c, c)
    n_eff = 1.0 / jnp.sum(w**2, axis=0)
    bw = 1.06 * n_eff ** (-0.2)
    kernel = (cov + jitter * jnp.eye(d)) * bw[..., None, None]
    chol = jnp.linalg.cholesky(kernel)
    if bandwidth == "std":
        chol = chol * math.sqrt(1.06 * samples.shape[0] ** (-0.2))
    logits = jnp.moveaxis(jax.nn.log_softmax(log_weights, axis=0), 0, -1)
    means = jnp.moveaxis(samples, 0, -2)
    return GMM(logits, means, jnp.broadcast_to(chol[..., None, :, :], means.shape + (d,)))
