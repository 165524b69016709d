"""The Distribution Transformer (GMM prior + observations -> GMM posterior) and the paper's tasks.

* `transformer`: the permutation-equivariant model and the GMM <-> token encodings (paper Sec. 3).
* `tasks`: the meta-priors, priors and likelihoods of the paper's tasks (a)-(e), sampled in JAX (Sec. 4).
"""

from theorax.models.distribution_transformer import tasks
from theorax.models.distribution_transformer.tasks import (
    TASKS,
    GMMLinearGaussianTask,
    GPHyperpriorTask,
    InverseGammaTask,
    Problem,
    QuantumTask,
    SensorFusionTask,
    make_task,
    model_kwargs,
)
from theorax.models.distribution_transformer.transformer import (
    DistributionTransformer,
    GMMError,
    ModelInputError,
    decode_components,
    encode_components,
    num_component_features,
)

__all__ = [
    "DistributionTransformer",
    "ModelInputError",
    "GMMError",
    "encode_components",
    "decode_components",
    "num_component_features",
    "tasks",
    "Problem",
    "GMMLinearGaussianTask",
    "InverseGammaTask",
    "SensorFusionTask",
    "GPHyperpriorTask",
    "QuantumTask",
    "TASKS",
    "make_task",
    "model_kwargs",
]
