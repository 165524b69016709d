"""Deep kernel machines (Yang, Robeyns, Milsom, Anson, Schoots, Aitchison, ICML 2023).

* `objectives`: the DKM objective `objective(grams, X, Y, ...)`, `nngp_gram`, the likelihoods and the
  conditional formulas that carry Gram blocks to new points.
* `model`: the full and the sparse (inducing-point) DKM as parameters (`DKMSpec`, `ModelOptions`,
  `DKMState`), initialised at the NNGP.
* `fitting`: `fit` (Adam with the paper's settings over minibatch epochs, or full-batch L-BFGS) and
  `make_trainer` for resumable loops.
* `prediction`: `predict` (mean and variance), `log_predictive`, `predict_proba`, `gram_matrices`.
* `linalg`: jittered Cholesky factors that escalate (and warn) instead of failing, the Gaussian KLs.

The kernels of a Gram matrix are in `theorax.models.dkm`.
"""

from theorax.inference.dkm.fitting import FitOptions, Trainer, fit, make_trainer, precision
from theorax.inference.dkm.linalg import JITTER, cholesky, gaussian_kl
from theorax.inference.dkm.model import DKMSpec, DKMState, ModelOptions
from theorax.inference.dkm.objectives import nngp_gram, objective
from theorax.inference.dkm.prediction import gram_matrices, log_predictive, predict, predict_proba

__all__ = [
    "DKMSpec",
    "DKMState",
    "FitOptions",
    "JITTER",
    "ModelOptions",
    "Trainer",
    "cholesky",
    "fit",
    "gaussian_kl",
    "gram_matrices",
    "log_predictive",
    "make_trainer",
    "nngp_gram",
    "objective",
    "precision",
    "predict",
    "predict_proba",
]
