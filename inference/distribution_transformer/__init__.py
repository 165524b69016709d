"""Training, querying and scoring Distribution Transformers, and the exact posteriors they are scored against.

* `training`: the prior-consistency + posterior NLL loss on fresh meta-prior draws, jitted steps, posteriors.
* `exact`: closed-form and quadrature reference posteriors (tasks (a), (b), (d)).
* `evaluation`: the expected-KL estimators against those references.
* `filters`: the transformer as a filter, a bootstrap particle filter and an EKF (task (c)).
* `baselines`: numpyro NUTS / SVI and importance sampling (imported on its own: it needs numpyro).
"""

from theorax.inference.distribution_transformer.evaluation import (
    gap_kl,
    monte_carlo_kl,
    reference_log_prob,
    reference_sample,
)
from theorax.inference.distribution_transformer.exact import (
    gp_hyperprior_log_marginals,
    gp_hyperprior_log_posterior,
    inverse_gamma_log_prob_log_space,
    inverse_gamma_posterior,
    linear_gaussian_log_evidence,
    linear_gaussian_posterior,
    sequential_linear_gaussian_posterior,
    stack_observations,
)
from theorax.inference.distribution_transformer.training import (
    PriorFeedback,
    init_state,
    make_optimizer,
    make_posterior_fn,
    make_train_step,
    nll_loss,
    sequential_posterior,
)

__all__ = [
    "linear_gaussian_posterior",
    "linear_gaussian_log_evidence",
    "sequential_linear_gaussian_posterior",
    "stack_observations",
    "inverse_gamma_posterior",
    "inverse_gamma_log_prob_log_space",
    "gp_hyperprior_log_posterior",
    "gp_hyperprior_log_marginals",
    "monte_carlo_kl",
    "gap_kl",
    "reference_log_prob",
    "reference_sample",
    "PriorFeedback",
    "init_state",
    "make_optimizer",
    "make_posterior_fn",
    "make_train_step",
    "nll_loss",
    "sequential_posterior",
]
