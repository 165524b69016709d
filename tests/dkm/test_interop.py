"""Parity with GPyTorch: with no hidden layer and the squared-exponential kernel, the DKM's NNGP path is an exact
GP with an RBF kernel (needs the interop extra: torch and gpytorch)."""

import math

import numpy as np
import pytest
from theorax.inference import dkm

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch")
gpytorch = pytest.importorskip("gpytorch")
gpb = pytest.importorskip("theorax.experiments.gpytorch_baselines")

LENGTHSCALE, VARIANCE, NOISE = 0.8, 1.3, 0.05


def _data():
    rng = np.random.default_rng(0)
    x, x_test = rng.normal(size=(25, 3)), rng.normal(size=(9, 3))
    return x, np.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.1 * rng.normal(size=25), x_test


def _gpytorch_exact(x, y):
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = gpb.ExactRBF(xt, yt, likelihood, ard=False, zero_mean=True).double()
    # our lengthscale is in units of the input Gram X X^T / N_0: GPyTorch's is sqrt(N_0) times it
    # (float64 tensors: GPyTorch's setters would round a Python float through float32)
    as64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    model.covar_module.base_kernel.lengthscale = as64(LENGTHSCALE * math.sqrt(x.shape[1]))
    model.covar_module.outputscale = as64(VARIANCE)
    likelihood.noise = as64(NOISE)
    return model, likelihood, xt, yt


def _ours(x, y):
    options = dkm.ModelOptions(
        kernel_params={"lengthscale": LENGTHSCALE, "variance": VARIANCE}, learn_kernel=False,
        noise_var=NOISE, learn_noise=False, jitter=0.0,
    )  # fmt: skip
    return dkm.fit(
        x, y, depth=0, nu=(), kernel="sqexp", model=options, options=dkm.FitOptions(steps=1)
    )


def test_no_hidden_layer_sqexp_nngp_predicts_as_gpytorchs_exact_gp():
    x, y, x_test = _data()
    model, likelihood, _, _ = _gpytorch_exact(x, y)
    model.eval()
    likelihood.eval()
    with (
        torch.no_grad(),
        gpytorch.settings.fast_pred_var(False),
        gpytorch.settings.max_cholesky_size(1000),
    ):
        f = model(torch.as_tensor(x_test))
        f_mean, f_var = f.mean.numpy(), f.variance.numpy()
        y_var = likelihood(f).variance.numpy()
    state = _ours(x, y)
    mean, var = dkm.predict(state, x_test)
    np.testing.assert_allclose(np.asarray(mean), f_mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(np.asarray(var), f_var, rtol=1e-7, atol=1e-10)
    _, var_y = dkm.predict(state, x_test, include_noise=True)
    np.testing.assert_allclose(np.asarray(var_y), y_var, rtol=1e-7)


def test_no_hidden_layer_objective_is_gpytorchs_exact_marginal_likelihood():
    x, y, _ = _data()
    model, likelihood, xt, yt = _gpytorch_exact(x, y)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(1000):
        theirs = float(mll(model(xt), yt)) * len(y)  # GPyTorch divides by the number of points
    ours = dkm.objective([], x, y, nu=(), kernel="sqexp", noise_var=NOISE, jitter=0.0,
                         kernel_params={"lengthscale": LENGTHSCALE, "variance": VARIANCE})  # fmt: skip
    np.testing.assert_allclose(float(ours), theirs, rtol=1e-9)


def test_gpytorch_baselines_fit_and_predict():
    # The experiment's baselines run end to end and beat predicting the mean.
    x, y, x_test = _data()
    y_test = np.sin(x_test[:, 0]) + 0.5 * x_test[:, 1]
    exact = gpb.fit_exact_gp(x, y, iters=50)
    svgp = gpb.fit_svgp(x, y, x[:8], batch_size=10, epochs=100, lr=0.05)
    for fitted in (exact, svgp):
        mean, var = gpb.predict(fitted, x_test)
        assert mean.shape == var.shape == (9,) and np.all(var > 0)
        assert np.mean((mean - y_test) ** 2) < 0.5 * np.var(y_test)
