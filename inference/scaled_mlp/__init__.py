"""The "Scaling MLPs" recipe: jitted train / eval / TTA steps, on-device augmentation, scaling-law fits.

* `training`: the loss, Lion and the official alternatives, fine-tuning and linear probes, TTA (Sec. 4, App. A).
* `augment`: random-resized crops, flips and mixup as pure functions inside the step.
* `scaling_law`: E(C) = a (b + C)^-alpha + E_inf fitted to a sweep's compute-optimal frontier (Sec. 4.4).
"""

from theorax.inference.scaled_mlp import augment
from theorax.inference.scaled_mlp.scaling_law import ScalingLaw, fit_scaling_law, pareto_frontier
from theorax.inference.scaled_mlp.training import (
    OptimizerConfig,
    Recipe,
    compute_flops,
    make_eval_step,
    make_optimizer,
    make_train_step,
    make_tta_step,
    smoothed_cross_entropy,
)

__all__ = [
    "augment",
    "OptimizerConfig",
    "Recipe",
    "compute_flops",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "make_tta_step",
    "smoothed_cross_entropy",
    "ScalingLaw",
    "fit_scaling_law",
    "pareto_frontier",
]
