"""Training, querying and scoring Distribution Transformers on the paper's tasks, and the exact posteriors they are
scored against.

* `tasks`: the tasks as inference problems, one class each (`Task`): meta-prior, likelihood, reference posterior,
  and how the baselines see them.
* `training`: the prior-consistency + posterior NLL loss on fresh meta-prior draws, jitted steps, posteriors.
* `exact`: closed-form and quadrature reference posteriors (tasks (a), (b), (d), (e)) and the LTI predict step.
* `evaluation`: the expected-KL estimators against those references, and the KDE-GMM of samples.
* `filters`: the transformer as a filter, a bootstrap particle filter and an EKF (task (c)).
* `baselines`: numpyro NUTS / SVI and importance sampling (imported on its own: it needs numpyro).
"""

from theorax.inference.distribution_transformer.evaluation import gap_kl, kde_gmm, monte_carlo_kl
from theorax.inference.distribution_transformer.exact import (
    GPData,
    GPHyperprior,
    LinearGaussianDynamics,
    gp_hyperprior_log_marginals,
    gp_hyperprior_log_posterior,
    grid_bernoulli_log_posterior,
    inverse_gamma_log_prob_log_space,
    inverse_gamma_posterior,
    linear_gaussian_log_evidence,
    linear_gaussian_posterior,
    sequential_linear_gaussian_posterior,
    stack_observations,
)
from theorax.inference.distribution_transformer.tasks import (
    TASKS,
    BaselineProblem,
    GMMLinearGaussianTask,
    GMMMetaPrior,
    GPHyperpriorTask,
    InverseGammaTask,
    Problem,
    QuantumTask,
    SensorFusionTask,
    Task,
    make_task,
)
from theorax.inference.distribution_transformer.training import (
    PriorFeedback,
    init_state,
    make_optimizer,
    make_posterior_fn,
    make_train_step,
    nll_loss,
    scan_updates,
    sequential_posterior,
)

__all__ = [
    # exact posteriors
    "linear_gaussian_posterior",
    "linear_gaussian_log_evidence",
    "sequential_linear_gaussian_posterior",
    "stack_observations",
    "inverse_gamma_posterior",
    "inverse_gamma_log_prob_log_space",
    "GPData",
    "GPHyperprior",
    "gp_hyperprior_log_posterior",
    "gp_hyperprior_log_marginals",
    "grid_bernoulli_log_posterior",
    "LinearGaussianDynamics",
    # tasks
    "Task",
    "Problem",
    "BaselineProblem",
    "GMMMetaPrior",
    "GMMLinearGaussianTask",
    "InverseGammaTask",
    "SensorFusionTask",
    "GPHyperpriorTask",
    "QuantumTask",
    "TASKS",
    "make_task",
    # scoring
    "monte_carlo_kl",
    "gap_kl",
    "kde_gmm",
    # training
    "PriorFeedback",
    "init_state",
    "make_optimizer",
    "make_posterior_fn",
    "make_train_step",
    "nll_loss",
    "scan_updates",
    "sequential_posterior",
]
