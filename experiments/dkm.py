r"""Deep kernel machines (Yang et al., ICML 2023): regression beside GP baselines, the DGP check, classification.

    python -m theorax.experiments.dkm --config=configs/dkm.py:cpu --workdir=results/dkm_cpu
    python -m theorax.experiments.dkm --config=configs/dkm.py:uci --workdir=results/dkm_uci
    python -m theorax.experiments.dkm --config=configs/dkm.py:dgp --workdir=results/dkm_dgp
    python -m theorax.experiments.dkm --config=configs/dkm.py:classify --workdir=results/dkm_digits

Parts (`config.parts`):

* regression: for every dataset and split, the DKM, the NNGP (the same model with nu = inf), an exact GP with an
  RBF kernel fitted by marginal likelihood (JAX: the DKM code with no hidden layer; and GPyTorch's `ExactGP`),
  on a random subset of `regression.exact_gp.max_train` training points where the training set is larger (subset
  of data; `exact_gp.subset=False` skips them there), and GPyTorch's SVGP with the DKM's number of
  inducing points, batch and steps. Inputs and targets are standardised with the training statistics; RMSE and
  test log-likelihood are in the original units, then mean +- standard error over splits (the Bayesian deep
  learning benchmarks' protocol). Every (dataset, split, method) is its own sub-run under
  `regression/<dataset>/split<k>/<method>/` (results.json, and for the DKMs metrics and orbax checkpoints), so a
  rerun resumes where it stopped. Writes `regression.png`.
* dgp: numpyro NUTS on a 2-layer deep GP whose hidden layers are N wide, for every width N, with the
  log-likelihood multiplied by N (the outputs replicated N times) so that, with nu_l = N_l / N, the posterior
  over the Gram matrices concentrates on the DKM optimum as N grows (the representation-learning limit). The
  relative Frobenius distance of the posterior-mean Grams to the DKM optimum (and, for reference, to the NNGP)
  is fitted against N on log-log axes. Writes `dgp.png`.
* classify: a sparse DKM with a categorical likelihood on scikit-learn digits (or MNIST-style IDX files),
  beside the NNGP: test accuracy and log-likelihood.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from theorax.experiments import data as data_lib
from theorax.experiments import runtime
from theorax.inference import dkm
from theorax.inference.dkm import linalg
from theorax.models import dkm as kernels

METHODS = {
    "dkm": "DKM",
    "nngp": "NNGP (nu = inf)",
    "exact_gp": "exact GP, RBF (JAX)",
    "gpytorch_exact_gp": "exact GP, RBF (GPyTorch)",
    "gpytorch_svgp": "SVGP (GPyTorch)",
}
GPYTORCH = ("gpytorch_exact_gp", "gpytorch_svgp")
EXACT = ("exact_gp", "gpytorch_exact_gp")
PARTS = ("regression", "dgp", "classify")


# ------------------------------------------------------------------------------------------------ checks


def _check_model(m, key: str) -> None:
    check = runtime.check
    check(m.depth >= 0, f"{key}.depth={m.depth} must be >= 0")
    check(m.nu > 0, f"{key}.nu={m.nu} must be > 0 (nu = inf gives the NNGP)")
    runtime.check_choice(f"{key}.kernel", m.kernel, ("relu", "sqexp", "normalised_gaussian"))
    runtime.check_choice(f"{key}.optimizer", m.optimizer, ("adam", "lbfgs"))
    check(m.num_inducing >= 0, f"{key}.num_inducing={m.num_inducing} must be >= 0 (0: full DKM)")
    check(m.steps >= 1, f"{key}.steps={m.steps} must be >= 1")
    check(m.lr > 0, f"{key}.lr={m.lr} must be > 0")
    check(m.batch_size >= 1, f"{key}.batch_size={m.batch_size} must be >= 1")
    check(m.noise_var > 0, f"{key}.noise_var={m.noise_var} must be > 0")
    check(m.jitter >= 0, f"{key}.jitter={m.jitter} must be >= 0")


def num_splits(config, name: str) -> int:
    """The splits a dataset runs: the first `regression.splits`, capped at the number the set has (its
    `n_splits.txt`: 20 for most UCI sets, 5 for protein)."""
    r = config.regression
    path = os.path.join(r.data_dir, name, "data", "n_splits.txt")
    if name == "diabetes" or not os.path.isfile(path):
        return r.splits
    with open(path) as f:
        return min(r.splits, int(f.read().split()[0]))


def _check_uci_layout(directory: str, name: str, splits: int) -> None:
    root = os.path.join(directory, name, "data")
    needed = ["data.txt", "index_features.txt", "index_target.txt"]
    needed += [f"index_{s}_{k}.txt" for k in range(splits) for s in ("train", "test")]
    missing = [f for f in needed if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise runtime.ConfigError(
            f"regression.data_dir={directory!r}: dataset {name!r} is missing {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''} under {root}; expected layout: {data_lib.UCI_LAYOUT}"
            f" with splits 0..{splits - 1}"
        )


def validate(config) -> None:
    """Plain-Python checks of the config, before any data is read or anything compiles."""
    check = runtime.check
    for part in config.parts:
        runtime.check_choice("parts", part, PARTS)
    check(config.checkpoint_every >= 1, "checkpoint_every must be >= 1")
    check(config.blas_threads >= 0, "blas_threads must be >= 0 (0: leave OpenBLAS as it is)")
    if "regression" in config.parts:
        r = config.regression
        check(r.splits >= 1, f"regression.splits={r.splits} must be >= 1")
        check(r.max_train >= 0, f"regression.max_train={r.max_train} must be >= 0 (0: all points)")
        check(len(r.datasets) >= 1, "regression.datasets must name at least one dataset")
        for m in r.methods:
            runtime.check_choice("regression.methods", m, METHODS)
        runtime.check_choice("regression.gpytorch", r.gpytorch, ("auto", "on", "off"))
        _check_model(r.dkm, "regression.dkm")
        check(r.exact_gp.iters >= 1, "regression.exact_gp.iters must be >= 1")
        check(
            "gpytorch_svgp" not in r.methods or (r.svgp.num_inducing or r.dkm.num_inducing) >= 1,
            "regression.svgp.num_inducing must be >= 1 when the DKM is full-data (num_inducing=0)",
        )
        for name in r.datasets:
            if name == "diabetes":
                continue
            check(bool(r.data_dir), f"dataset {name!r} is read from files: set regression.data_dir")
            _check_uci_layout(r.data_dir, name, num_splits(config, name))
        if r.gpytorch == "on":
            check(
                _gpytorch_available(),
                "regression.gpytorch=on needs torch and gpytorch (the interop extra)",
            )
    if "dgp" in config.parts:
        d = config.dgp
        check(len(d.widths) >= 2, "dgp.widths needs at least two widths (for the slope)")
        check(
            all(int(w) >= 1 for w in d.widths), f"dgp.widths={d.widths} must be positive integers"
        )
        check(d.num_points >= 2, f"dgp.num_points={d.num_points} must be >= 2")
        check(d.input_dim >= 0, f"dgp.input_dim={d.input_dim} must be >= 0 (0: a 1-D grid)")
        check(d.nu > 0 and d.noise_var > 0, "dgp.nu and dgp.noise_var must be > 0")
        check(
            all(round(d.nu * w) >= 1 for w in d.widths),
            "dgp.nu * width must be >= 1 at every width",
        )
        check(
            d.chains >= 1 and d.warmup >= 1 and d.samples >= 1,
            "dgp.chains/warmup/samples must be >= 1",
        )
        runtime.check_choice("dgp.kernel", d.kernel, ("relu", "sqexp", "normalised_gaussian"))
        runtime.check_choice("dgp.dkm_optimizer", d.dkm_optimizer, ("adam", "lbfgs"))
        check(d.dkm_steps >= 1, f"dgp.dkm_steps={d.dkm_steps} must be >= 1")
    if "classify" in config.parts:
        k = config.classify
        runtime.check_choice(
            "classify.data.name", k.data.name, ("digits", "mnist", "fashion_mnist")
        )
        if k.data.name != "digits":
            check(bool(k.data.dir), f"classify.data.name={k.data.name!r} needs classify.data.dir")
        _check_model(k.dkm, "classify.dkm")
        check(k.dkm.num_inducing >= 1, "classify.dkm.num_inducing must be >= 1 (a sparse DKM)")


def _gpytorch_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "gpytorch"))


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class Split:
    """One train/test split, standardised with the training statistics (targets: y = y_std * scale + shift)."""

    dataset: str
    index: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test_raw: np.ndarray
    shift: float
    scale: float

    @classmethod
    def standardise(cls, dataset: str, index: int, raw: data_lib.RegressionSplit) -> Split:
        mx, sx = raw.x_train.mean(0), raw.x_train.std(0)
        sx = np.where(sx > 1e-12, sx, 1.0)
        shift, scale = float(raw.y_train.mean()), float(raw.y_train.std()) or 1.0
        return cls(
            dataset, index, (raw.x_train - mx) / sx, (raw.y_train - shift) / scale,
            (raw.x_test - mx) / sx, np.asarray(raw.y_test, np.float64), shift, scale,
        )  # fmt: skip

    def score(self, mean, var) -> dict[str, float]:
        """RMSE and mean test log-likelihood in the original units, from a standardised predictive N(mean, var)
        of y (noise included)."""
        mean = np.asarray(mean, np.float64) * self.scale + self.shift
        var = np.asarray(var, np.float64) * self.scale**2
        err = self.y_test_raw - mean
        ll = -0.5 * np.log(2 * math.pi * var) - 0.5 * err**2 / var
        return {"rmse": float(np.sqrt(np.mean(err**2))), "test_ll": float(np.mean(ll))}


def diabetes_split(index: int, test_fraction: float = 0.1) -> data_lib.RegressionSplit:
    """scikit-learn's diabetes set (442 x 10) in a random 90/10 split (seeded by the index)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(1000 + index).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return data_lib.RegressionSplit(x[train], y[train], x[test], y[test])


def load_split(config, name: str, index: int) -> Split:
    if name == "diabetes":
        raw = diabetes_split(index)
    else:
        raw = data_lib.load_uci(config.regression.data_dir, name, index)
    cap = config.regression.max_train
    if 0 < cap < len(raw.y_train):
        keep = np.random.default_rng(2000 + index).choice(len(raw.y_train), cap, replace=False)
        raw = dataclasses.replace(raw, x_train=raw.x_train[keep], y_train=raw.y_train[keep])
    return Split.standardise(name, index, raw)


# ------------------------------------------------------------------------------------------- fitting


def _precision(float64: bool):
    return jax.enable_x64(True) if float64 else contextlib.nullcontext()


def dkm_arguments(
    m, *, n_train: int, nu: float, likelihood: str, seed: int, num_classes=None
) -> dict:
    """`dkm.make_trainer`'s keyword arguments from a model config (`configs/dkm.py: _dkm_model`)."""
    sparse = m.num_inducing > 0
    batch = min(m.batch_size, n_train)
    epochs = m.steps
    if sparse and m.optimizer == "adam" and m.min_minibatch_steps > 0:
        epochs = max(epochs, -(-m.min_minibatch_steps // (n_train // batch)))
    return dict(
        depth=m.depth,
        nu=nu,
        kernel=m.kernel,
        likelihood=likelihood,
        num_inducing=min(m.num_inducing, n_train) if sparse else None,
        model=dkm.ModelOptions(
            input_scales=m.input_scales,
            noise_var=m.noise_var,
            jitter=m.jitter,
            mc_samples=m.mc_samples,
            num_classes=num_classes,
            dtype="float64" if m.float64 else "float32",
        ),  # fmt: skip
        options=dkm.FitOptions(
            optimizer=m.optimizer,
            steps=epochs,
            lr=m.lr,
            batch_size=batch if sparse and m.optimizer == "adam" else None,  # L-BFGS: full batch
            seed=seed,
        ),  # fmt: skip
    )


def train_dkm(config, sub: runtime.Workdir, x, y, arguments: dict, desc: str):
    """Fits a DKM through the shared resumable loop in `sub`; returns (state, seconds, worst jitter level)."""
    start = time.perf_counter()
    trainer = dkm.make_trainer(x, y, **arguments)
    state = runtime.train(
        sub, trainer.init_state, trainer.step, num_steps=trainer.num_steps,
        checkpoint_every=config.checkpoint_every, log_every=max(1, trainer.num_steps // 20), desc=desc,
    )  # fmt: skip
    jax.block_until_ready(state)
    levels = [r.get("jitter_level", 0) for r in sub.read_metrics()]
    worst = int(max(levels, default=0))
    linalg.check_jitter(worst, desc, trainer.spec.options.jitter)
    return trainer.state(state), time.perf_counter() - start, worst


def _exact_gp_subset(config, split: Split) -> tuple[np.ndarray, np.ndarray, dict]:
    """The exact GPs' training data: all of it, or a random `exact_gp.max_train`-point subset of a larger set
    (the same subset for both exact GPs of a split), and the result fields that say which."""
    n, cap = len(split.y_train), config.regression.exact_gp.max_train
    if n <= cap:
        return split.x_train, split.y_train, {}
    idx = np.random.default_rng(config.seed + split.index).choice(n, cap, replace=False)
    return split.x_train[idx], split.y_train[idx], {"subset_of": n, "n_fitted": cap}


def _regression_method(config, split: Split, method: str, sub: runtime.Workdir) -> dict:
    r = config.regression
    n = len(split.y_train)
    if method in ("dkm", "nngp"):
        m = r.dkm
        nu = float("inf") if method == "nngp" else float(m.nu)
        args = dkm_arguments(
            m, n_train=n, nu=nu, likelihood="gaussian", seed=config.seed + split.index
        )
        with _precision(m.float64):
            desc = f"{method} {split.dataset} split {split.index}"
            state, seconds, worst = train_dkm(config, sub, split.x_train, split.y_train, args, desc)
            mean, var = dkm.predict(state, split.x_test, include_noise=True)
            noise = float(dkm.model.noise_var(state.spec, state.params))
        return {
            **split.score(mean, var),
            "seconds": seconds,
            "jitter_level": worst,
            "noise_var": noise,
        }
    if method == "exact_gp":
        x, y, subset = _exact_gp_subset(config, split)
        with jax.enable_x64(True):
            start = time.perf_counter()
            state = dkm.fit(
                x, y, depth=0, nu=(), kernel="sqexp",
                model=dkm.ModelOptions(input_scales=True, jitter=0.0),
                options=dkm.FitOptions(optimizer="lbfgs", steps=r.exact_gp.iters),
            )  # fmt: skip
            mean, var = dkm.predict(state, split.x_test, include_noise=True)
        return {**split.score(mean, var), "seconds": time.perf_counter() - start, **subset}
    from theorax.experiments import gpytorch_baselines as gpb

    subset = {}
    if method == "gpytorch_exact_gp":
        x, y, subset = _exact_gp_subset(config, split)
        fitted = gpb.fit_exact_gp(x, y, iters=r.exact_gp.iters)
    else:
        m = r.dkm
        batch = min(m.batch_size, n)
        # Adam epochs as the sparse DKM's Adam schedule (also when the DKM itself is fitted by L-BFGS)
        epochs = max(m.steps, -(-m.min_minibatch_steps // (n // batch)))
        inducing = _inducing_init(
            split.x_train, min(r.svgp.num_inducing or m.num_inducing, n), config.seed + split.index
        )
        fitted = gpb.fit_svgp(
            split.x_train, split.y_train, inducing, batch_size=batch, epochs=epochs, lr=r.svgp.lr,
            seed=config.seed + split.index,
        )  # fmt: skip
    mean, var = gpb.predict(fitted, split.x_test)
    return {**split.score(mean, var), "seconds": fitted.seconds, **subset}


def _inducing_init(x, m: int, seed: int) -> np.ndarray:
    """The DKM's own initial inducing inputs (its random subset of the training inputs), for the SVGP."""
    with jax.enable_x64(True):
        key = jax.random.key(seed)
        idx = (
            np.arange(len(x))
            if m == len(x)
            else np.asarray(jax.random.choice(key, len(x), (m,), replace=False))
        )
    return np.asarray(x)[idx]


def _methods_to_run(config, n_train: int) -> tuple[list[str], dict[str, str]]:
    """The methods that run on a training set of n_train points, and a note for each that does not."""
    r = config.regression
    gpytorch = r.gpytorch == "on" or (r.gpytorch == "auto" and _gpytorch_available())
    run, skipped = [], {}
    for m in r.methods:
        if m in GPYTORCH and not gpytorch:
            skipped[m] = (
                "GPyTorch is not installed (the interop extra: make test-interop installs it)"
                if r.gpytorch == "auto" else "switched off (regression.gpytorch=off)"
            )  # fmt: skip
        elif m in EXACT and n_train > r.exact_gp.max_train and not r.exact_gp.subset:
            skipped[m] = (
                f"training set of {n_train} > regression.exact_gp.max_train={r.exact_gp.max_train}"
            )
        else:
            run.append(m)
    return run, skipped


def _mean_se(values) -> dict:
    v = np.asarray(values, np.float64)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def run_regression(config, wd: runtime.Workdir) -> dict:
    """Every dataset, split and method (see the module docstring); returns the per-split numbers and their
    summaries, and the methods that did not run with the reason."""
    r = config.regression
    out = {}
    for name in r.datasets:
        per_method: dict[str, list[dict]] = {}
        skipped: dict[str, str] = {}
        for index in range(num_splits(config, name)):
            split = load_split(config, name, index)
            run, skipped = _methods_to_run(config, len(split.y_train))
            for method in run:
                sub = runtime.Workdir(
                    os.path.join(wd.path, "regression", name, f"split{index}", method)
                )
                if sub.finished:
                    result = sub.read_results()
                else:
                    result = sub.write_results(_regression_method(config, split, method, sub))
                sub.close()
                per_method.setdefault(method, []).append(result)
        summary = {
            m: {k: _mean_se([row[k] for row in rows]) for k in ("rmse", "test_ll", "seconds")}
            for m, rows in per_method.items()
        }
        n_train = len(load_split(config, name, 0).y_train)
        out[name] = {
            "n_train": n_train,
            "splits": per_method,
            "summary": summary,
            "skipped": skipped,
        }
    wins = [
        v["summary"]["dkm"]["test_ll"]["mean"] >= v["summary"]["nngp"]["test_ll"]["mean"]
        for v in out.values()
        if "dkm" in v["summary"] and "nngp" in v["summary"]
    ]
    return {"datasets": out, "dkm_ll_at_least_nngp": f"{sum(wins)} of {len(wins)}"}


# -------------------------------------------------------------------------------------------- DGP check


def dgp_data(num_points: int, seed: int, input_dim: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small regression, y = sin(2 x_1) + x_1 / 2 + noise, standardised: x on a grid of [-2, 2]
    (`input_dim=0`), or x ~ N(0, I) in `input_dim` dimensions (well-conditioned Gram matrices)."""
    rng = np.random.default_rng(seed)
    if input_dim:
        x = rng.normal(size=(num_points, input_dim))
    else:
        x = np.linspace(-2.0, 2.0, num_points)[:, None]
    y = np.sin(2 * x[:, 0]) + 0.5 * x[:, 0] + 0.2 * rng.normal(size=num_points)
    return x, ((y - y.mean()) / y.std())[:, None]


def dgp_model(x, y, *, width: int, nu: float, kernel: str, noise_var: float, jitter: float):
    """numpyro model of a 2-layer DGP with N_l = nu * width features per hidden layer (non-centred: F_l =
    chol(K(G_{l-1})) E_l, E_l ~ N(0, I)), G_l = F_l F_l^T / N_l, and the output's log-likelihood
    sum_c log N(y_c; 0, K(G_2) + sigma^2 I) multiplied by `width` (the outputs replicated width times)."""
    import numpyro
    import numpyro.distributions as dist

    fn = kernels.kernel_fn(kernel)
    g = kernels.input_gram(x)
    p = x.shape[0]
    n_l = int(round(nu * width))
    for layer in (1, 2):
        chol = jnp.linalg.cholesky(linalg.add_jitter(fn(g), jitter))
        eps = numpyro.sample(f"eps{layer}", dist.Normal(0.0, 1.0).expand([p, n_l]).to_event(2))
        f = chol @ eps
        g = numpyro.deterministic(f"g{layer}", f @ f.T / n_l)
    k = fn(g) + noise_var * jnp.eye(p, dtype=x.dtype)
    chol = jnp.linalg.cholesky(linalg.add_jitter(k, jitter))
    white = jax.scipy.linalg.solve_triangular(chol, y, lower=True)
    log_lik = -0.5 * jnp.sum(white**2) - y.shape[1] * jnp.sum(jnp.log(jnp.diagonal(chol)))
    numpyro.factor("likelihood", width * log_lik)


def _relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def run_dgp(config, wd: runtime.Workdir) -> dict:
    """The DGP-to-DKM check (module docstring); resumable per width (`dgp/width<N>/results.json`)."""
    from numpyro.infer import MCMC, NUTS

    d = config.dgp
    x, y = dgp_data(d.num_points, d.seed, d.input_dim)
    common = dict(kernel=d.kernel, noise_var=d.noise_var, jitter=d.jitter)
    with jax.enable_x64(True):
        model_opts = dkm.ModelOptions(
            learn_kernel=False, learn_noise=False, noise_var=d.noise_var, jitter=d.jitter
        )
        optimum = dkm.fit(x, y, depth=2, nu=d.nu, kernel=d.kernel, model=model_opts,
                          options=dkm.FitOptions(optimizer=d.dkm_optimizer, steps=d.dkm_steps))  # fmt: skip
        dkm_grams = [np.asarray(g) for g in dkm.gram_matrices(optimum)[0]]
        nngp_grams = [
            np.asarray(dkm.nngp_gram(x, depth, d.kernel, kernels.kernel_params(d.kernel)))
            for depth in (1, 2)
        ]
        objective = functools.partial(
            dkm.objective,
            x=x,
            y=y,
            nu=d.nu,
            kernel=d.kernel,
            noise_var=d.noise_var,
            jitter=d.jitter,
        )
        rows = []
        for width in d.widths:
            sub = runtime.Workdir(os.path.join(wd.path, "dgp", f"width{width}"))
            if sub.finished:
                rows.append(sub.read_results())
                continue
            start = time.perf_counter()
            kernel = NUTS(dgp_model, max_tree_depth=d.max_tree_depth, target_accept_prob=0.8)
            mcmc = MCMC(kernel, num_warmup=d.warmup, num_samples=d.samples, num_chains=d.chains,
                        chain_method="vectorized", progress_bar=False)  # fmt: skip
            mcmc.run(jax.random.key(d.seed + width), jnp.asarray(x), jnp.asarray(y), width=int(width),
                     nu=d.nu, **common)  # fmt: skip
            samples = mcmc.get_samples()
            means = [np.asarray(jnp.mean(samples[f"g{layer}"], axis=0)) for layer in (1, 2)]
            extra = mcmc.get_extra_fields()
            row = {
                "width": int(width),
                "features_per_layer": int(round(d.nu * width)),
                "divergences": int(np.sum(np.asarray(extra["diverging"]))),
                "seconds": time.perf_counter() - start,
                "posterior_means": [m.tolist() for m in means],
            }
            rows.append(sub.write_results(row))
            sub.close()
        # Distances from the stored posterior means: a better DKM optimum needs no new sampling.
        for row in rows:
            means = [np.asarray(m) for m in row["posterior_means"]]
            row["dist_to_dkm"] = [_relative(m, g) for m, g in zip(means, dkm_grams, strict=True)]
            row["dist_to_nngp"] = [_relative(m, g) for m, g in zip(means, nngp_grams, strict=True)]
        # The optimiser's check: no posterior mean may score higher on the DKM objective than the optimum.
        at_optimum = float(objective(dkm_grams))
        at_widest = float(objective([np.asarray(m) for m in rows[-1]["posterior_means"]]))
    widths = np.asarray([row["width"] for row in rows], np.float64)
    fits = {}
    for layer in (0, 1):
        dist_ = np.asarray([row["dist_to_dkm"][layer] for row in rows])
        slope, intercept = np.polyfit(np.log(widths), np.log(dist_), 1)
        fits[f"g{layer + 1}"] = {"slope": float(slope), "intercept": float(intercept)}
    return {
        "widths": widths.astype(int).tolist(),
        "rows": [{k: v for k, v in row.items() if k != "posterior_means"} for row in rows],
        "fits": fits,
        "dkm_vs_nngp": [_relative(a, b) for a, b in zip(dkm_grams, nngp_grams, strict=True)],
        "objective_at_dkm_optimum": at_optimum,
        "objective_at_widest_posterior_mean": at_widest,
        "dkm_optimum_is_best": at_optimum >= at_widest,
        "falls_with_width": bool(all(f["slope"] < 0 for f in fits.values())),
        "num_points": d.num_points,
        "input_dim": d.input_dim,
        "optimiser": f"{d.dkm_optimizer}, {d.dkm_steps} steps",
        "nu": d.nu,
        "kernel": d.kernel,
        "samples": f"{d.chains} chains x {d.samples} NUTS draws after {d.warmup} warm-up",
    }


# -------------------------------------------------------------------------------------- classification


def classification_data(config):
    k = config.classify
    ds = data_lib.load_image_dataset(k.data.name, k.data.dir or None)
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64) / 255.0  # noqa: E731
    x_train, x_test = flat(ds.train_images), flat(ds.test_images)
    y_train, y_test = ds.train_labels, ds.test_labels
    if k.n_train > 0:
        x_train, y_train = x_train[: k.n_train], y_train[: k.n_train]
    mean, std = x_train.mean(0), x_train.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test, ds.num_classes


def run_classify(config, wd: runtime.Workdir) -> dict:
    """Sparse DKM and sparse NNGP classification; resumable per method (`classify/<method>/`)."""
    k = config.classify
    x_train, y_train, x_test, y_test, num_classes = classification_data(config)
    out = {"dataset": k.data.name, "n_train": len(y_train), "n_test": len(y_test)}
    for method in ("dkm", "nngp"):
        sub = runtime.Workdir(os.path.join(wd.path, "classify", method))
        if sub.finished:
            out[method] = sub.read_results()
            continue
        nu = float("inf") if method == "nngp" else float(k.dkm.nu)
        args = dkm_arguments(k.dkm, n_train=len(y_train), nu=nu, likelihood="categorical",
                             seed=config.seed, num_classes=num_classes)  # fmt: skip
        with _precision(k.dkm.float64):
            state, seconds, worst = train_dkm(
                config, sub, x_train, y_train, args, f"classify {method}"
            )
            key = jax.random.key(config.seed + 1)
            probs = np.asarray(dkm.predict_proba(state, x_test, key=key, samples=k.test_samples))
            ll = np.asarray(
                dkm.log_predictive(state, x_test, y_test, key=key, samples=k.test_samples)
            )
        out[method] = sub.write_results({
            "accuracy": float(np.mean(np.argmax(probs, -1) == y_test)),
            "test_ll": float(np.mean(ll)),
            "seconds": seconds,
            "jitter_level": worst,
        })  # fmt: skip
        sub.close()
    return out


# ---------------------------------------------------------------------------------------------- run


def blas_threads(n: int):
    """A scope limiting numpy's and scipy's OpenBLAS to `n` threads (0: as they are).

    JAX's CPU triangular solves call scipy's OpenBLAS `trsm`; with its default of one thread per core, every
    solve of the sparse DKM's size (100 x 100 by 100 x 256) waits for a second thread, and on a busy machine
    that wait is a scheduler time slice: 25-45 ms instead of 0.1 ms (measured here, load ~20). One thread is
    also no slower on a quiet machine for these sizes. An explicit experiment-layer setting
    (`config.blas_threads`, `bench_dkm --blas_threads`), never set by the library.

    This limit does not reach every call XLA's worker threads make: on a quiet 2-core machine the sparse-DKM
    epoch still took 382 / 483 ms (min / median) under it, and 233 / 241 ms when OpenBLAS started with one
    thread (`OPENBLAS_NUM_THREADS=1`, which the entry points' `runtime.tune_process` sets).
    """
    if n <= 0:
        return contextlib.nullcontext()
    import threadpoolctl

    return threadpoolctl.threadpool_limits(n, user_api="blas")


def run(config, workdir: str) -> dict:
    """Runs the parts of `config.parts` (module docstring); returns (and writes) results.json."""
    wd = runtime.Workdir(workdir, config)
    if wd.finished:
        return wd.read_results()
    validate(config)
    with blas_threads(config.blas_threads):
        return _run(config, wd)


def _run(config, wd: runtime.Workdir) -> dict:
    results: dict = {"preset": config.preset, "parts": list(config.parts)}
    if "regression" in config.parts:
        results["regression"] = run_regression(config, wd)
        results["regression_config"] = _model_summary(config.regression.dkm)
        wd.savefig(_plot_regression(results["regression"]), "regression.png")
    if "dgp" in config.parts:
        results["dgp"] = run_dgp(config, wd)
        wd.savefig(_plot_dgp(results["dgp"]), "dgp.png")
    if "classify" in config.parts:
        results["classify"] = run_classify(config, wd)
        results["classify_config"] = _model_summary(config.classify.dkm)
    out = wd.write_results(results)
    wd.close()
    return out


def _model_summary(m) -> str:
    kind = (
        f"sparse, {m.num_inducing} inducing points, batch {m.batch_size}"
        if m.num_inducing
        else "full-data"
    )
    opt = (
        f"Adam({m.lr:g}, betas (0.8, 0.9)), {m.steps} epochs"
        + (f" (at least {m.min_minibatch_steps} minibatch steps)" if m.num_inducing and m.min_minibatch_steps else "")
        if m.optimizer == "adam"
        else f"L-BFGS, {m.steps} iterations"
    )  # fmt: skip
    ard = ", learned input scales (ARD)" if m.input_scales else ""
    return f"{m.depth} hidden layers, {m.kernel} kernel, nu = {m.nu:g}, {kind}{ard}; {opt}"


# -------------------------------------------------------------------------------------------- plots


def _plot_regression(reg: dict) -> Figure:
    """Test log-likelihood and RMSE per dataset (mean +- standard error), one marker per method."""
    names = list(reg["datasets"])
    fig = Figure(figsize=(max(6.0, 1.3 * len(names)), 6.5))
    axes = fig.subplots(2, 1, sharex=True)
    methods = [m for m in METHODS if any(m in v["summary"] for v in reg["datasets"].values())]
    for ax, metric, label in zip(
        axes, ("test_ll", "rmse"), ("test log-likelihood", "RMSE"), strict=True
    ):
        for j, m in enumerate(methods):
            xs, ys, es = [], [], []
            for i, name in enumerate(names):
                s = reg["datasets"][name]["summary"].get(m)
                if s is None:
                    continue
                ref = reg["datasets"][name]["summary"].get("dkm")  # RMSE relative to the DKM's
                base = ref[metric]["mean"] if metric == "rmse" and ref else 0.0
                scale = base if metric == "rmse" and base else 1.0
                xs.append(i + (j - (len(methods) - 1) / 2) * 0.12)
                ys.append(s[metric]["mean"] / scale)
                es.append((s[metric]["se"] or 0.0) / scale)
            ax.errorbar(xs, ys, yerr=es, fmt="o", ms=4, capsize=2, label=METHODS[m])
        ax.set_ylabel(label + (" / DKM's" if metric == "rmse" else ""))
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(range(len(names)))
    axes[-1].set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=7)
    axes[0].set_title("UCI-style regression: mean +- standard error over splits")
    return fig


def _plot_dgp(res: dict) -> Figure:
    widths = np.asarray(res["widths"], np.float64)
    fig = Figure(figsize=(5.5, 4.0))
    ax = fig.subplots()
    for layer in (0, 1):
        dist_ = [row["dist_to_dkm"][layer] for row in res["rows"]]
        fit = res["fits"][f"g{layer + 1}"]
        (line,) = ax.loglog(
            widths,
            dist_,
            "o-",
            label=f"G_{layer + 1} to the DKM optimum (slope {fit['slope']:.2f})",
        )
        ax.loglog(
            widths,
            np.exp(fit["intercept"]) * widths ** fit["slope"],
            "--",
            color=line.get_color(),
            lw=0.8,
        )
        ax.loglog(widths, [row["dist_to_nngp"][layer] for row in res["rows"]], "x:", color=line.get_color(),
                  label=f"G_{layer + 1} to the NNGP")  # fmt: skip
    ax.set_xlabel("DGP width N")
    ax.set_ylabel("relative Frobenius distance")
    ax.set_title("Posterior-mean Grams of a width-N DGP")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return fig


# ------------------------------------------------------------------------------------------- report


def _cell(s: dict | None, key: str, best: bool) -> str:
    if s is None:
        return "-"
    v = s[key]
    txt = f"{v['mean']:.3f} ± {v['se']:.3f}" if v["se"] is not None else f"{v['mean']:.3f}"
    return f"**{txt}**" if best else txt


def _regression_table(reg: dict) -> list[str]:
    methods = [m for m in METHODS if any(m in v["summary"] for v in reg["datasets"].values())]
    lines = []
    for key, label, better in (("test_ll", "test log-likelihood (higher is better)", max),
                               ("rmse", "RMSE (lower is better)", min)):  # fmt: skip
        lines += ["", f"{label}:", "", "| dataset | N train | splits | " + " | ".join(METHODS[m] for m in methods) + " |",
                  "|---|---|---|" + "---|" * len(methods)]  # fmt: skip
        for name, v in reg["datasets"].items():
            s = v["summary"]
            present = [m for m in methods if m in s]
            best = better(present, key=lambda m: s[m][key]["mean"]) if present else None
            n_splits = max((s[m][key]["n"] for m in present), default=0)
            cells = [_cell(s.get(m), key, m == best) for m in methods]
            lines.append(f"| {name} | {v['n_train']} | {n_splits} | " + " | ".join(cells) + " |")
    skipped, subsets = {}, {}
    for name, v in reg["datasets"].items():
        for m, why in v["skipped"].items():
            skipped.setdefault((m, why), []).append(name)
        for m in EXACT:
            rows = v["splits"].get(m, [])
            if rows and "n_fitted" in rows[0]:
                subsets.setdefault(m, []).append(
                    f"{name} ({rows[0]['n_fitted']} of {rows[0]['subset_of']})"
                )
    notes = [
        f"- {METHODS[m]} fitted on a random subset of the training set (subset of data) on {', '.join(n)}."
        for m, n in subsets.items()
    ] + [f"- {METHODS[m]} not run on {', '.join(n)}: {why}." for (m, why), n in skipped.items()]
    if notes:
        lines += ["", *notes]
    return lines


def report(results: dict, workdir: str) -> str:
    """A markdown section: the regression table beside the baselines, the DGP check, classification, plots."""
    del workdir
    lines = ["## Deep kernel machines", ""]
    if "regression" in results:
        reg = results["regression"]
        lines += [
            f"Regression (preset `{results['preset']}`), DKM: {results['regression_config']}. The NNGP is the "
            "same model with nu = inf. Mean ± standard error over splits, original units.",
            *_regression_table(reg),
            "",
            f"The DKM's test log-likelihood is at least the NNGP's on {reg['dkm_ll_at_least_nngp']} datasets. "
            "The paper's own UCI table (ICML 2023) was not available to us (the reference notes could not "
            "retrieve it), so there is no paper column; the baselines above ran here.",
            "",
            "![regression](./regression.png)",
            "",
        ]
    if "dgp" in results:
        d = results["dgp"]
        rows = ["| width N | features per layer | G_1 to DKM | G_2 to DKM | G_1 to NNGP | G_2 to NNGP | divergences | s |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in d["rows"]:
            a, b = row["dist_to_dkm"], row["dist_to_nngp"]
            rows.append(f"| {row['width']} | {row['features_per_layer']} | {a[0]:.4f} | {a[1]:.4f} | {b[0]:.4f} | "
                        f"{b[1]:.4f} | {row['divergences']} | {row['seconds']:.0f} |")  # fmt: skip
        f1, f2 = d["fits"]["g1"]["slope"], d["fits"]["g2"]["slope"]
        where = (
            f"drawn from N(0, I) in {d['input_dim']} dimensions"
            if d["input_dim"]
            else "on a 1-D grid"
        )
        lines += [
            f"DGP check: NUTS ({d['samples']}) on a 2-layer deep GP ({d['kernel']} kernel, {d['num_points']} "
            f"points {where}, "
            f"nu = {d['nu']:g}) whose log-likelihood is scaled by the width N. Relative Frobenius distance "
            "of the posterior-mean Gram matrices to the DKM optimum, and to the NNGP for reference "
            f"(the DKM optimum itself is {d['dkm_vs_nngp'][0]:.3f} / {d['dkm_vs_nngp'][1]:.3f} from the NNGP):",
            "",
            *rows,
            "",
            f"The DKM optimum ({d['optimiser']}) scores {d['objective_at_dkm_optimum']:.4f} on the DKM objective, "
            f"the widest DGP's posterior mean {d['objective_at_widest_posterior_mean']:.4f}"
            f"{'' if d['dkm_optimum_is_best'] else ' (HIGHER: the optimiser stopped short; raise dgp.dkm_steps)'}.",
            "",
            f"Log-log slope of the distance to the DKM against width: {f1:.2f} (G_1), {f2:.2f} (G_2); "
            f"{'it falls with width, as the paper claims' if d['falls_with_width'] else 'it does NOT fall with width'} "
            "(the representation-learning limit predicts O(1/N), slope -1, until Monte Carlo error dominates). The "
            "paper's figure is not available to us, so there is no paper number.",
            "",
            "![DGP check](./dgp.png)",
            "",
        ]
    if "classify" in results:
        c = results["classify"]
        lines += [
            f"Classification on {c['dataset']} ({c['n_train']} train / {c['n_test']} test), "
            f"{results['classify_config']}:",
            "",
            "| model | test accuracy | test log-likelihood | s |",
            "|---|---|---|---|",
        ]
        for m in ("dkm", "nngp"):
            lines.append(
                f"| {METHODS[m]} | {c[m]['accuracy']:.4f} | {c[m]['test_ll']:.4f} | {c[m]['seconds']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    runtime.main(run)
