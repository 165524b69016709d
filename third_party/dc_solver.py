"""Adapters to DC-Solver's and diffusers' formats.

* The official cascade-polynomial-regression coefficients: `dc_solver/cpr_coeffs_path/<model>.npy` in the
  wl-zhao/DC-Solver repository, 36 float64 numbers, reshaped (4, 3, 3) by its `cascade_polynomial_regression`
  (see `inference.dc_solver.cpr_predict` for the layout). `load_cpr_coeffs` / `save_cpr_coeffs` read and write
  that file.
* A PyTorch twin of `models.diffusion.GaussianMixture.eps` (isotropic / diagonal mixtures), so that diffusers'
  schedulers can be driven by the same analytic model in the benchmark and the parity tests. diffusers calls the
  model with integer timesteps k; the twin maps them to continuous t = (k + 1) / N, the discrete schedule's knot
  of k (where our piecewise-linear log alpha is exact).
"""

from __future__ import annotations

import os

import numpy as np
from theorax.models import diffusion


def load_cpr_coeffs(path: str) -> np.ndarray:
    """Reads an official CPR coefficient file (.npy, 36 numbers) as a float64 array of shape (36,)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no CPR coefficient file at {path} (expected a .npy of 36 float64)"
        )
    coeffs = np.load(path, allow_pickle=False)
    if coeffs.size != 36:
        raise ValueError(
            f"{path}: expected 36 CPR coefficients ((4, 3, 3) flattened), got shape {coeffs.shape}"
        )
    return np.asarray(coeffs, dtype=np.float64).reshape(36)


def save_cpr_coeffs(path: str, coeffs) -> str:
    """Writes 36 CPR coefficients in the official layout (.npy, float64, shape (36,))."""
    coeffs = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if coeffs.shape != (36,):
        raise ValueError(f"expected 36 CPR coefficients, got {coeffs.size}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, coeffs)
    return path


class TorchMixtureEps:
    """eps(x, k[, labels]) of an isotropic / diagonal `GaussianMixture` in PyTorch, for diffusers' loops.

    Args:
      mixture: the mixture (without full covariances).
      schedule: the discrete `VPSchedule` whose alpha / sigma at the knots the model uses.
      dtype: torch dtype of the computation (torch.float32 or torch.float64).
    """

    def __init__(
        self, mixture: diffusion.GaussianMixture, schedule: diffusion.VPSchedule, dtype=None
    ):
        import torch

        if mixture.eigvecs is not None:
            raise ValueError("TorchMixtureEps supports isotropic / diagonal mixtures only")
        if schedule.kind != "discrete":
            raise ValueError("TorchMixtureEps maps integer timesteps and needs a discrete schedule")
        self.torch = torch
        self.dtype = dtype or torch.float32
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=self.dtype)
        self.log_w = t(np.log(mixture.weights))
        self.means = t(mixture.means)
        self.var = t(mixture.variances)
        self.class_log_w = (
            None
            if mixture.class_weights is None
            else t(np.log(np.maximum(mixture.class_weights, 1e-300)))
        )
        knots = (np.arange(schedule.total_n) + 1.0) / schedule.total_n
        self.alpha = t(schedule.alpha(knots))
        self.sigma = t(schedule.sigma(knots))

    def __call__(self, x, k, labels=None):
        """The same expanded quadratic forms as `GaussianMixture._diagonal_parts` (matrix products)."""
        torch = self.torch
        k = int(k)
        a, s = self.alpha[k], self.sigma[k]
        v = a * a * self.var + s * s  # (K, d)
        w = 1.0 / v
        mw = self.means * w
        quad = (x * x) @ w.T - 2.0 * a * (x @ mw.T) + a * a * (self.means * mw).sum(-1)
        log_w = self.log_w if labels is None else self.class_log_w[labels]
        gamma = torch.softmax(log_w - 0.5 * (torch.log(v).sum(-1) + quad), dim=-1)
        return s * (x * (gamma @ w) - a * (gamma @ mw))

    def guided(self, x, k, labels, scale: float):
        """Classifier-free guidance eps_u + w (eps_c - eps_u)."""
        eps_u = self(x, k)
        return eps_u + scale * (self(x, k, labels) - eps_u)
