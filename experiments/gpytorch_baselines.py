"""GPyTorch's Gaussian processes, the baselines the DKM is compared against (the `interop` extra).

* `ExactRBF`: an `ExactGP` with a constant mean and `ScaleKernel(RBFKernel)` (one lengthscale per feature
  with `ard=True`), hyper-parameters fitted by Adam on the exact marginal likelihood; Cholesky throughout
  (`max_cholesky_size` raised past the training set, so no conjugate-gradient approximation).
* `SVGP`: an `ApproximateGP` with `CholeskyVariationalDistribution` and `VariationalStrategy` over learned
  inducing points, trained on minibatches with the `VariationalELBO` (Hensman et al. 2013).

Imported only by code that runs them (`experiments/dkm.py` when a config asks, `experiments/bench_dkm.py`,
the interop tests), so everything else works without torch.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch  # first: without the interop extra the import fails on torch, the optional peer

# isort: split
import gpytorch

__all__ = ["ExactRBF", "SVGP", "fit_exact_gp", "fit_svgp", "predict", "svgp_epoch"]


def _covariance(dim: int, ard: bool) -> gpytorch.kernels.Kernel:
    return gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=dim if ard else None)
    )


class ExactRBF(gpytorch.models.ExactGP):
    """An exact GP regression model with a constant (or zero) mean and a scaled RBF kernel."""

    def __init__(self, x, y, likelihood, *, ard: bool = True, zero_mean: bool = False):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean() if zero_mean else gpytorch.means.ConstantMean()
        self.covar_module = _covariance(x.shape[1], ard)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class SVGP(gpytorch.models.ApproximateGP):
    """A sparse variational GP with learned inducing points and a scaled RBF kernel."""

    def __init__(self, inducing, *, ard: bool = True):
        dist = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing, dist, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = _covariance(inducing.shape[1], ard)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@dataclasses.dataclass
class Fitted:
    """A trained GPyTorch model, its likelihood, the seconds training took and the last loss."""

    model: gpytorch.models.GP
    likelihood: gpytorch.likelihoods.GaussianLikelihood
    seconds: float
    loss: float


def _tensor(a, dtype):
    return torch.as_tensor(np.asarray(a), dtype=dtype)


def fit_exact_gp(
    x, y, *, iters: int = 200, lr: float = 0.1, ard: bool = True, dtype=torch.float64
) -> Fitted:
    """Fits `ExactRBF` by Adam(lr) on minus the exact marginal log-likelihood for `iters` iterations."""
    xt, yt = _tensor(x, dtype), _tensor(y, dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    model = ExactRBF(xt, yt, likelihood, ard=ard).to(dtype)
    model.train()
    likelihood.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    start, loss = time.perf_counter(), torch.zeros(())
    with gpytorch.settings.max_cholesky_size(len(xt) + 1):
        for _ in range(iters):
            opt.zero_grad()
            loss = -mll(model(xt), yt)
            loss.backward()
            opt.step()
    return Fitted(model, likelihood, time.perf_counter() - start, float(loss.detach()))


def svgp_epoch(fitted: Fitted, x, y, *, batch_size: int, optimizer, generator) -> float:
    """One epoch of SVGP training: a fresh permutation, minibatches of `batch_size` (the last incomplete one
    dropped, as the DKM's epochs), one Adam step each. Returns the mean loss."""
    model, likelihood = fitted.model, fitted.likelihood
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=len(y))
    order = torch.randperm(len(y), generator=generator)
    total, steps = 0.0, len(y) // batch_size
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]
        optimizer.zero_grad()
        loss = -mll(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    return total / max(steps, 1)


def make_svgp(x, inducing, *, ard: bool = True, dtype=torch.float64) -> Fitted:
    """An untrained `SVGP` on inducing inputs `inducing` and its likelihood."""
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    model = SVGP(_tensor(inducing, dtype), ard=ard).to(dtype)
    return Fitted(model, likelihood, 0.0, float("nan"))


def fit_svgp(
    x,
    y,
    inducing,
    *,
    batch_size: int,
    epochs: int,
    lr: float = 0.01,
    seed: int = 0,
    ard: bool = True,
    dtype=torch.float64,
) -> Fitted:
    """Trains `SVGP` from inducing inputs `inducing` with Adam(lr) for `epochs` epochs of minibatches."""
    xt, yt = _tensor(x, dtype), _tensor(y, dtype)
    fitted = make_svgp(xt, inducing, ard=ard, dtype=dtype)
    fitted.model.train()
    fitted.likelihood.train()
    params = list(fitted.model.parameters()) + list(fitted.likelihood.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start, loss = time.perf_counter(), float("nan")
    for _ in range(epochs):
        loss = svgp_epoch(fitted, xt, yt, batch_size=batch_size, optimizer=opt, generator=generator)
    fitted.seconds, fitted.loss = time.perf_counter() - start, loss
    return fitted


def predict(fitted: Fitted, x_test, *, include_noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The predictive mean and variance at `x_test` (of y with `include_noise`, else of f), as numpy."""
    model, likelihood = fitted.model, fitted.likelihood
    model.eval()
    likelihood.eval()
    dtype = next(model.parameters()).dtype
    xt = _tensor(x_test, dtype)
    size = getattr(model, "train_inputs", None)
    cholesky = len(size[0]) + 1 if size else 800
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(cholesky):
        with gpytorch.settings.fast_pred_var(False):
            f = model(xt)
            out = likelihood(f) if include_noise else f
            return out.mean.numpy(), out.variance.numpy()
