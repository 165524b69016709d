"""Compute-optimal scaling-law fits, as in "Scaling MLPs" Sec. 4.4 / App. A.4.

The error of the best run at compute C follows E(C) = a (b + C)^(-alpha) + E_inf. The paper fits it with
`scipy.optimize.curve_fit` to the compute-optimal frontier of a sweep (models x data sizes x epochs) and
reports alpha (e.g. 0.25 for the CIFAR-100 linear probe of the B-MLP).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import optimize


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """E(C) = a (b + C)^(-alpha) + e_inf, with C measured in units of `c_scale` FLOPs."""

    a: float
    b: float
    alpha: float
    e_inf: float
    c_scale: float = 1.0

    def __call__(self, compute):
        c = np.asarray(compute, np.float64) / self.c_scale
        return self.a * (self.b + c) ** (-self.alpha) + self.e_inf


def pareto_frontier(compute, error) -> np.ndarray:
    """Indices of the runs no cheaper run beats (sorted by compute): the compute-optimal frontier."""
    compute, error = np.asarray(compute, np.float64), np.asarray(error, np.float64)
    best, keep = np.inf, []
    for i in np.argsort(compute, kind="stable"):
        if error[i] < best:
            best = error[i]
            keep.append(i)
    return np.asarray(keep, int)


def fit_scaling_law(compute, error, *, frontier: bool = True) -> ScalingLaw:
    """Least-squares fit of E(C) = a (b + C)^(-alpha) + E_inf (compute rescaled to its smallest value).

    Args:
      compute: FLOPs of each run (C = FLOP(f) x 3 x examples seen).
      error: test error of each run, in [0, 1].
      frontier: fit only the compute-optimal frontier (the paper's choice) rather than every run.

    Raises:
      ValueError: fewer than 4 distinct points, or non-positive / non-finite compute.
    """
    compute, error = np.asarray(compute, np.float64), np.asarray(error, np.float64)
    if compute.shape != error.shape or compute.ndim != 1:
        raise ValueError(
            f"compute {compute.shape} and error {error.shape} must be equal-length 1-D"
        )
    if not (np.all(np.isfinite(compute)) and np.all(compute > 0) and np.all(np.isfinite(error))):
        raise ValueError("compute must be positive and finite, and error finite")
    if frontier:
        idx = pareto_frontier(compute, error)
        compute, error = compute[idx], error[idx]
    if len(np.unique(compute)) < 4:
        raise ValueError(
            f"a 4-parameter scaling law needs >= 4 runs of distinct compute, got {len(compute)}; "
            "fit on all runs (frontier=False) or sweep more settings"
        )
    scale = compute.min()
    c = compute / scale
    law = lambda c, a, b, alpha, e_inf: a * (b + c) ** (-alpha) + e_inf
    e_min = float(error.min())
    p0 = (max(error.max() - e_min, 1e-3), 1.0, 0.3, max(e_min - 0.05, 0.0))
    bounds = ([0.0, 0.0, 1e-4, 0.0], [np.inf, np.inf, 5.0, max(e_min, 1e-6)])
    (a, b, alpha, e_inf), _ = optimize.curve_fit(law, c, error, p0=p0, bounds=bounds, maxfev=20000)
    return ScalingLaw(float(a), float(b), float(alpha), float(e_inf), float(scale))
