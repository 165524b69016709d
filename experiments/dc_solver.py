r"""DC-Solver against DDIM, DPM-Solver++ and UniPC: MSE to the ground-truth sample over (NFE, CFG).

    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:cpu --workdir=results/dc_solver_cpu
    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:learned --workdir=results/dc_solver_digits
    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:grid --workdir=results/dc_solver_grid

For every setting (NFE, CFG) of `eval`: the ground-truth samples of `eval.num_samples` noises (DDIM with
`eval.gt_nfe` steps, the paper's protocol), the MSE of each sampler's output to them, and for DC-Solver the ratios
searched on `search.num_points` other noises for each search seed (ratios.json). CPR is fitted per seed on the
ratios searched over the `cpr` grid (disjoint from eval's settings) and predicts the ratios of eval's settings
(cpr_coeffs_seed<k>.npy, the official 36-number layout). Writes results.json, ratios.json, mse.png and
ratios.png; a finished workdir is not redone.

The model is the analytic class-conditional Gaussian mixture (exact noise prediction) or, with `model=learned`, a
small noise-prediction MLP trained here (resumable orbax checkpoints) on scikit-learn digits or MNIST-like IDX
files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure
from theorax.experiments import runtime
from theorax.inference import dc_solver as dcs
from theorax.models import diffusion
from theorax.third_party import dc_solver as tp

METHODS = ("ddim", "dpmsolver++", "unipc", "dc_searched", "dc_cpr")
LABELS = {
    "ddim": "DDIM",
    "dpmsolver++": "DPM-Solver++",
    "unipc": "UniPC",
    "dc_searched": "DC-Solver (searched)",
    "dc_cpr": "DC-Solver (CPR)",
}
# The paper's Stable Diffusion 2.1 latent MSE at CFG 7.5 (reference notes Sec. 2, quoted second-hand from a
# summary of the paper; the protocol is most likely DPM-Solver-v3's: 999-step DDIM ground truth, COCO prompts).
PAPER_SD21 = {
    5: {"dpmsolver++": 0.443, "unipc": 0.434, "dc_searched": 0.394},
    10: {"dpmsolver++": 0.370, "unipc": 0.373, "dc_searched": 0.294},
}


# ------------------------------------------------------------------------------------ ratios I/O


def save_ratios(path: str, ratios: dict) -> None:
    """Writes {name: ratio vector} as JSON (the official search output is a JSON list per setting)."""
    with open(path, "w") as f:
        json.dump({k: [float(v) for v in np.asarray(r)] for k, r in ratios.items()}, f, indent=1)


def load_ratios(path: str) -> dict[str, np.ndarray]:
    """Reads ratios written by `save_ratios` (or a bare official JSON list, returned under "ratios")."""
    with open(path) as f:
        raw = json.load(f)
    if isinstance(raw, list):
        raw = {"ratios": raw}
    return {k: np.asarray(v, dtype=np.float64) for k, v in raw.items()}


# ----------------------------------------------------------------------------------------- checks


def validate(config) -> None:
    """Plain-Python checks of the config, before anything is built or compiled."""
    check = runtime.check
    runtime.check_choice("model", config.model, ("mixture", "learned"))
    runtime.check_choice("schedule", config.schedule, diffusion.SCHEDULES)
    runtime.check_choice("solver.variant", config.solver.variant, dcs.VARIANTS)
    runtime.check_choice("solver.spacing", config.solver.spacing, diffusion.SPACINGS)
    runtime.check_choice("solver.order", config.solver.order, (1, 2, 3))
    runtime.check_choice("solver.dpm_order", config.solver.dpm_order, (1, 2, 3))
    runtime.check_choice("eval.gt_solver", config.eval.gt_solver, ("ddim", "dpmsolver++", "unipc"))
    runtime.check_choice("search.gt_mode", config.search.gt_mode, dcs.GT_MODES)
    runtime.check_choice("data.name", config.data.name, ("digits", "mnist", "fashion_mnist"))
    order = max(config.solver.order, config.solver.dpm_order)
    for nfe in tuple(config.eval.nfes) + tuple(config.cpr.nfes):
        check(
            int(nfe) >= order,
            f"an NFE of {nfe} in eval.nfes / cpr.nfes is smaller than the solver order {order}; "
            f"use NFE >= {order}",
        )
    check(len(config.search.seeds) >= 1, "search.seeds must name at least one seed")
    check(
        config.search.num_points >= 1, f"search.num_points={config.search.num_points} must be >= 1"
    )
    check(config.search.num_iters >= 1, f"search.num_iters={config.search.num_iters} must be >= 1")
    check(config.eval.num_samples >= 1, f"eval.num_samples={config.eval.num_samples} must be >= 1")
    check(config.eval.gt_nfe >= 2 * max(config.eval.nfes), "eval.gt_nfe must be >> the eval NFEs")
    if config.model == "mixture":
        m = config.mixture
        check(
            m.dim >= 1 and m.num_classes >= 1 and m.components_per_class >= 1,
            "mixture sizes must be >= 1",
        )
        check(
            0 < m.std_min <= m.std_max,
            f"need 0 < mixture.std_min <= std_max, got {m.std_min}, {m.std_max}",
        )
    if config.model == "learned" and config.data.name != "digits":
        check(
            bool(config.data.dir), f"data.name={config.data.name!r} needs data.dir (the IDX files)"
        )
    if config.search.gt_mode == "ldm":
        check(
            config.schedule in ("sd_scaled_linear", "ldm_linear"),
            "search.gt_mode=ldm needs a discrete schedule",
        )


# ------------------------------------------------------------------------------------------ models


def make_mixture(config) -> diffusion.GaussianMixture:
    """The analytic benchmark: num_classes classes, each a uniform mixture of its own components."""
    m = config.mixture
    rng = np.random.default_rng(m.seed)
    k = m.num_classes * m.components_per_class
    means = m.mean_scale * rng.normal(size=(k, m.dim))
    stds = rng.uniform(m.std_min, m.std_max, size=k)
    class_weights = np.kron(np.eye(m.num_classes), np.ones((1, m.components_per_class)))
    return diffusion.GaussianMixture.class_conditional(means, stds, class_weights)


def _flat_data(config):
    from theorax.experiments import data

    if config.data.name == "digits":
        ds = data.load_digits()
    else:
        ds = data.load_idx_dataset(config.data.dir, config.data.name)
    x = ds.train_images.reshape(len(ds.train_images), -1).astype(np.float32) / 127.5 - 1.0
    return x, ds.train_labels.astype(np.int32), ds.num_classes


def train_learned_model(config, wd: runtime.Workdir, schedule):
    """Trains `EpsMLP` with the noise-prediction loss E ||eps_theta(alpha_t x0 + sigma_t eps, t, c) - eps||^2.

    t ~ U(1/N, 1) continuous, labels dropped to the null class with probability `train.label_dropout` (for
    classifier-free guidance), AdamW with a cosine-decayed learning rate, resumable through `runtime.train`.
    Returns (eps_fn, dim, num_classes).
    """
    x_all, y_all, num_classes = _flat_data(config)
    dim = x_all.shape[1]
    tc = config.train
    model = diffusion.EpsMLP(features=tc.features, depth=tc.depth, num_classes=num_classes)
    params = model.init(
        jax.random.key(config.seed), jnp.zeros((1, dim)), jnp.zeros(1), jnp.zeros(1, jnp.int32)
    )
    tx = optax.adamw(optax.cosine_decay_schedule(tc.lr, tc.steps), weight_decay=1e-4)
    state = {"params": params, "opt": tx.init(params)}
    x_dev, y_dev = jnp.asarray(x_all), jnp.asarray(y_all)
    base_key = jax.random.key(config.seed + 1)
    t_min = schedule.t_min

    def loss_fn(params, x0, labels, key):
        kt, kn = jax.random.split(key)
        t = jax.random.uniform(kt, (x0.shape[0],), minval=t_min, maxval=1.0)
        noise = jax.random.normal(kn, x0.shape)
        xt = schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * noise
        pred = model.apply(params, xt, t, labels)
        return jnp.mean((pred - noise) ** 2)

    @jax.jit
    def step_fn_jit(state, step):
        key = jax.random.fold_in(base_key, step)
        kb, kd, kl = jax.random.split(key, 3)
        idx = jax.random.randint(kb, (tc.batch_size,), 0, x_dev.shape[0])
        labels = y_dev[idx]
        drop = jax.random.bernoulli(kd, tc.label_dropout, labels.shape)
        labels = jnp.where(drop, num_classes, labels)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], x_dev[idx], labels, kl)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

    state = runtime.train(
        wd,
        state,
        lambda s, i: step_fn_jit(s, jnp.asarray(i)),
        num_steps=tc.steps,
        checkpoint_every=tc.checkpoint_every,
        log_every=100,
        desc="train eps-MLP",
    )
    # The module is static (part of the function), the parameters are traced inputs of the samplers.
    eps_fn = jax.tree_util.Partial(functools.partial(_learned_eps, model), state["params"])
    return eps_fn, dim, num_classes


def _learned_eps(model, params, x, t, labels=None):
    return model.apply(params, x, t, labels)


# ------------------------------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class Problem:
    """The model every step samples from: its noise prediction, schedule and sizes."""

    eps_fn: Callable
    schedule: diffusion.VPSchedule
    dim: int
    num_classes: int

    def noises(self, seed: int, n: int):
        """n Gaussian noises and uniform labels (host numpy: nothing to compile)."""
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, self.dim), dtype=np.float32)
        labels = rng.integers(0, self.num_classes, size=n, dtype=np.int32)
        return jnp.asarray(x), jnp.asarray(labels)


@dataclasses.dataclass(frozen=True)
class Samplers:
    """The samplers the study compares, each as one solver config (`config.solver`)."""

    ddim: dcs.SolverConfig
    dpm: dcs.SolverConfig
    unipc: dcs.SolverConfig
    dc: dcs.SolverConfig

    @classmethod
    def from_config(cls, sc) -> Samplers:
        unipc = dcs.SolverConfig("unipc", order=sc.order, variant=sc.variant, spacing=sc.spacing)
        return cls(
            ddim=dcs.SolverConfig("ddim", spacing=sc.spacing),
            dpm=dcs.SolverConfig("dpmsolver++", order=sc.dpm_order, spacing=sc.spacing),
            unipc=unipc,
            dc=dataclasses.replace(unipc, solver="dc"),
        )


@dataclasses.dataclass(frozen=True)
class SearchedRatios:
    """The searched ratios, {"nfe=..,cfg=..,seed=..": (nfe,)}, and per NFE the seconds of each search (the
    first with compilation)."""

    ratios: dict[str, np.ndarray]
    seconds: dict[str, list[float]]


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """The evaluation noises and labels, the ground-truth sample per CFG, and the ground truth's own error."""

    x: jax.Array
    labels: jax.Array
    samples: dict[float, jax.Array]
    error: dict[str, float]


def _mse(a, b) -> float:
    return float(jnp.mean((a - b) ** 2))


def _key(nfe, cfg) -> str:
    return f"nfe={int(nfe)},cfg={float(cfg):g}"


def _ratio_key(nfe, cfg, seed) -> str:
    return f"{_key(nfe, cfg)},seed={seed}"


def _spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "per_seed": v.tolist(),
    }


def _each(items: list, desc: str):
    """The items one by one, with a progress bar."""
    bar = runtime.progress(len(items), desc=desc)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def _eval_settings(config) -> tuple[list[int], list[float]]:
    return [int(n) for n in config.eval.nfes], [float(c) for c in config.eval.cfgs]


def _cpr_settings(config) -> list[tuple[float, int]]:
    """The (CFG, NFE) grid CPR is fitted on."""
    return [(float(c), int(n)) for n in config.cpr.nfes for c in config.cpr.cfgs]


def _seeds(config) -> list[int]:
    return [int(s) for s in config.search.seeds]


def run(config, workdir: str) -> dict:
    """Runs the comparison described in the module docstring; returns (and writes) results.json."""
    wd = runtime.Workdir(workdir, config)
    if wd.finished:
        return wd.read_results()
    validate(config)
    problem = make_problem(config, wd)
    samplers = Samplers.from_config(config.solver)
    truth = ground_truth(config, problem)
    searched = search_all_ratios(config, problem, samplers.dc)
    save_ratios(wd.file("ratios.json"), searched.ratios)
    cpr_coeffs = fit_cpr(config, searched.ratios, wd)
    table = evaluate(config, problem, samplers, truth, searched.ratios, cpr_coeffs)
    results = summarise(config, problem, table, truth, searched, cpr_coeffs)
    _plots(wd, results, searched.ratios, cpr_coeffs)
    return wd.write_results(results)


def make_problem(config, wd: runtime.Workdir) -> Problem:
    """The analytic mixture of `config.mixture`, or the noise MLP trained here (`model=learned`)."""
    schedule = diffusion.VPSchedule.named(config.schedule)
    if config.model == "mixture":
        mixture = make_mixture(config)
        return Problem(mixture.eps_fn(schedule), schedule, mixture.dim, mixture.num_classes)
    eps_fn, dim, num_classes = train_learned_model(config, wd, schedule)
    return Problem(eps_fn, schedule, dim, num_classes)


def ground_truth(config, problem: Problem) -> GroundTruth:
    """The evaluation noises and, per CFG, their ground-truth sample (DDIM with `eval.gt_nfe` steps) and the
    MSE of that ground truth to a many-step DPM-Solver++ 3M solve (its error estimate)."""
    ec = config.eval
    eps_fn, schedule = problem.eps_fn, problem.schedule
    x, labels = problem.noises(ec.seed, ec.num_samples)
    gt_solver = dcs.SolverConfig(ec.gt_solver, order=1, spacing="time_uniform")
    check_solver = dcs.SolverConfig("dpmsolver++", order=3, spacing="logSNR")
    samples, error = {}, {}
    for cfg in _each(_eval_settings(config)[1], "ground truth"):
        g = dcs.Guidance(labels, cfg)
        samples[cfg] = dcs.sample(eps_fn, x, schedule, nfe=ec.gt_nfe, solver=gt_solver, guidance=g)
        if ec.check_nfe > 0:
            check = dcs.sample(
                eps_fn, x, schedule, nfe=ec.check_nfe, solver=check_solver, guidance=g
            )
            error[_key(0, cfg)] = _mse(samples[cfg], check)
    return GroundTruth(x, labels, samples, error)


def search_all_ratios(config, problem: Problem, solver: dcs.SolverConfig) -> SearchedRatios:
    """The ratios of every evaluation setting and of every CPR-grid setting, searched for every seed on
    `search.num_points` noises of its own (disjoint from the evaluation noises)."""
    sc = config.search
    nfes, cfgs = _eval_settings(config)
    seeds = _seeds(config)
    data = {s: problem.noises(10_000 + s, sc.num_points) for s in seeds}
    evaluated = {(n, c) for n in nfes for c in cfgs}
    jobs = [(n, c, s) for n in nfes for c in cfgs for s in seeds]
    jobs += [(n, c, s) for c, n in _cpr_settings(config) for s in seeds if (n, c) not in evaluated]
    ratios, seconds = {}, {}
    for n, c, s in _each(jobs, "ratio search"):
        x, labels = data[s]
        start = time.perf_counter()
        ratios[_ratio_key(n, c, s)] = dcs.search_ratios(
            problem.eps_fn, x, problem.schedule, nfe=n, solver=solver,
            guidance=dcs.Guidance(labels, c), gt_steps=sc.gt_steps, gt_mode=sc.gt_mode,
            num_iters=sc.num_iters, lr=sc.lr, weight_decay=sc.weight_decay,
        )  # fmt: skip
        seconds.setdefault(str(n), []).append(time.perf_counter() - start)
    return SearchedRatios(ratios, seconds)


def _fit_cpr_on(config, settings, ratios, seed) -> np.ndarray:
    return dcs.cpr_fit(
        settings, [ratios[_ratio_key(n, c, seed)] for c, n in settings], ridge=config.cpr.ridge
    )


def fit_cpr(config, ratios: dict, wd: runtime.Workdir) -> dict[int, np.ndarray]:
    """Per search seed, CPR fitted on the ratios of the `cpr` grid (written as cpr_coeffs_seed<k>.npy)."""
    coeffs = {}
    for s in _seeds(config):
        coeffs[s] = _fit_cpr_on(config, _cpr_settings(config), ratios, s)
        if wd.is_main:
            tp.save_cpr_coeffs(wd.file(f"cpr_coeffs_seed{s}.npy"), coeffs[s])
    return coeffs


def _sample_mse(problem: Problem, truth: GroundTruth, solver, nfe, cfg, ratios=None) -> float:
    x0 = dcs.sample(
        problem.eps_fn, truth.x, problem.schedule, nfe=nfe, solver=solver, ratios=ratios,
        guidance=dcs.Guidance(truth.labels, cfg),
    )  # fmt: skip
    return _mse(x0, truth.samples[cfg])


def evaluate(config, problem, samplers: Samplers, truth: GroundTruth, ratios, cpr_coeffs) -> dict:
    """The MSE of every sampler to the ground truth at every evaluation setting (DC: over search seeds)."""
    nfes, cfgs = _eval_settings(config)
    seeds = _seeds(config)
    table = {}
    for n, c in _each([(n, c) for n in nfes for c in cfgs], "evaluate"):
        mse = functools.partial(_sample_mse, problem, truth, nfe=n, cfg=c)
        searched = [mse(samplers.dc, ratios=ratios[_ratio_key(n, c, s)]) for s in seeds]
        cpr = [mse(samplers.dc, ratios=dcs.cpr_predict(cpr_coeffs[s], c, n)) for s in seeds]
        table[_key(n, c)] = {
            "ddim": mse(samplers.ddim),
            "dpmsolver++": mse(samplers.dpm),
            "unipc": mse(samplers.unipc),
            "dc_searched": _spread(searched),
            "dc_cpr": _spread(cpr),
        }
    return table


def summarise(config, problem, table, truth, searched: SearchedRatios, cpr_coeffs) -> dict:
    """results.json: the table, the ground truth's error, search times, CPR and the targets."""
    sc = config.solver
    search_seconds = searched.seconds
    nfes, cfgs = _eval_settings(config)
    cpr_settings = _cpr_settings(config)
    warm = {
        n: float(np.median(ts[1:])) if len(ts) > 1 else float(ts[0])
        for n, ts in search_seconds.items()
    }
    targets = {}
    for n in (5, 8):
        key = _key(n, 7.5)
        if key in table:
            targets[f"cfg7.5_nfe{n}_dc_median_beats_unipc"] = bool(
                table[key]["dc_searched"]["median"] < table[key]["unipc"]
            )
    return {
        "preset": config.preset,
        "solver": f"UniPC-{sc.order} ({sc.variant}) and DC-Solver on {sc.spacing} steps, "
        f"DPM-Solver++ {sc.dpm_order}M",
        "gt": f"{config.eval.gt_solver.upper()} with {config.eval.gt_nfe} steps",
        "model": config.model,
        "dim": problem.dim,
        "nfes": nfes,
        "cfgs": cfgs,
        "seeds": _seeds(config),
        "table": table,
        "gt_error_mse": truth.error,
        "search_seconds_first_call": {n: ts[0] for n, ts in search_seconds.items()},
        "search_seconds_warm_median": warm,
        "cpr_coeffs": {str(s): c.tolist() for s, c in cpr_coeffs.items()},
        "cpr_settings": cpr_settings,
        "cpr_disjoint": not any((c, n) in cpr_settings for n in nfes for c in cfgs),
        "cpr_holdout": _cpr_holdout(config, searched.ratios) if config.cpr.holdout else None,
        "targets": targets,
    }


def _cpr_holdout(config, ratios) -> dict:
    """Leave-one-setting-out: fit CPR on the other settings, RMS error of the held-out setting's ratios."""
    settings = _cpr_settings(config)
    errs = []
    for s in _seeds(config):
        for held in settings:
            coeffs = _fit_cpr_on(config, [st for st in settings if st != held], ratios, s)
            c, n = held
            pred = dcs.cpr_predict(coeffs, c, n)
            true = ratios[_ratio_key(n, c, s)]
            errs.append(float(np.sqrt(np.mean((pred[2:] - true[2:]) ** 2))))
    return {"rms_median": float(np.median(errs)), "rms_max": float(np.max(errs)), "n": len(errs)}


# ------------------------------------------------------------------------------------------- plots


def _plot_mse(results) -> Figure:
    """MSE against NFE, one panel per CFG; DC as the median over search seeds with a min-max band."""
    nfes, cfgs, table = results["nfes"], results["cfgs"], results["table"]
    fig = Figure(figsize=(4.2 * len(cfgs), 3.6))
    axes = fig.subplots(1, len(cfgs), squeeze=False)
    for ax, c in zip(axes[0], cfgs, strict=True):
        for m in METHODS:
            if m.startswith("dc"):
                med = [table[_key(n, c)][m]["median"] for n in nfes]
                lo = [table[_key(n, c)][m]["min"] for n in nfes]
                hi = [table[_key(n, c)][m]["max"] for n in nfes]
                (line,) = ax.plot(nfes, med, marker="o", label=LABELS[m])
                ax.fill_between(nfes, lo, hi, alpha=0.2, color=line.get_color())
            else:
                ax.plot(nfes, [table[_key(n, c)][m] for n in nfes], marker="o", label=LABELS[m])
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_title(f"CFG {c:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MSE to ground truth")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("DC-Solver vs. baselines (band: min-max over search seeds)")
    return fig


def _plot_ratios(results, ratios, cpr_coeffs) -> Figure:
    """Searched and CPR-predicted ratios per step at the largest CFG, one panel per NFE."""
    nfes, c = results["nfes"], max(results["cfgs"])
    fig = Figure(figsize=(3.6 * len(nfes), 3.2))
    axes = fig.subplots(1, len(nfes), squeeze=False)
    for ax, n in zip(axes[0], nfes, strict=True):
        steps = range(1, n + 1)
        for s in results["seeds"]:
            (line,) = ax.plot(
                steps,
                ratios[_ratio_key(n, c, s)],
                marker="o",
                alpha=0.8,
                label=f"searched, seed {s}",
            )
            ax.plot(
                steps,
                dcs.cpr_predict(cpr_coeffs[s], c, n),
                ls="--",
                color=line.get_color(),
                label=f"CPR, seed {s}",
            )
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"NFE {n}, CFG {c:g}")
        ax.set_xlabel("step i")
    axes[0][0].set_ylabel("ratio rho_i")
    axes[0][-1].legend(fontsize=7)
    return fig


def _plots(wd: runtime.Workdir, results, ratios, cpr_coeffs) -> None:
    wd.savefig(_plot_mse(results), "mse.png")
    wd.savefig(_plot_ratios(results, ratios, cpr_coeffs), "ratios.png")


# ------------------------------------------------------------------------------------------ report


def _fmt(v) -> str:
    if isinstance(v, dict):
        return f"{v['median']:.3g} [{v['min']:.3g}, {v['max']:.3g}]"
    return f"{v:.3g}"


def report(results: dict, workdir: str) -> str:
    """A markdown section: MSE table (median [min, max] over search seeds for DC), the paper's, plots."""
    model = (
        f"a class-conditional Gaussian mixture in {results['dim']} dimensions (exact noise prediction)"
        if results["model"] == "mixture"
        else f"a learned noise-prediction MLP ({results['dim']} dimensions)"
    )
    lines = [
        "## DC-Solver",
        "",
        f"MSE of each sampler's output to the ground-truth sample, on {model}; "
        f"{results.get('solver', 'UniPC-3 (bh1) and DC-Solver on time_uniform steps, DPM-Solver++ 2M')}, "
        "ground truth "
        f"{results.get('gt', 'DDIM with 1000 steps')}. "
        f"DC-Solver: median [min, max] over {len(results['seeds'])} search seeds (10 search noises each); "
        + (
            "CPR: ratios predicted from a fit on a disjoint (NFE, CFG) grid."
            if results.get("cpr_disjoint", True)
            else "CPR: ratios predicted from a fit on a grid that includes these settings."
        ),
        "",
        "| NFE | CFG | " + " | ".join(LABELS[m] for m in METHODS) + " |",
        "|---|---|" + "---|" * len(METHODS),
    ]
    for n in results["nfes"]:
        for c in results["cfgs"]:
            row = results["table"][_key(n, c)]
            best = min(
                [(row[m]["median"] if isinstance(row[m], dict) else row[m], m) for m in METHODS]
            )[1]
            cells = [("**" + _fmt(row[m]) + "**") if m == best else _fmt(row[m]) for m in METHODS]
            lines.append(f"| {n} | {c:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The paper (Stable Diffusion 2.1 latents, CFG 7.5, MSE to a 999-step DDIM; second-hand numbers), "
        "and DC-Solver's MSE as a multiple of the baseline's (below 1: DC is better):",
        "",
        "| NFE | DPM-Solver++ | UniPC | DC-Solver | DC vs UniPC (paper) | DC vs UniPC (ours, CFG 7.5) "
        "| DC vs best baseline (ours, CFG 7.5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, p in PAPER_SD21.items():
        key = _key(n, 7.5)
        ours = vs_best = "n/a"
        if key in results["table"]:
            r = results["table"][key]
            ours = f"x{r['dc_searched']['median'] / r['unipc']:.2f}"
            best = min(r["ddim"], r["dpmsolver++"], r["unipc"])
            vs_best = f"x{r['dc_searched']['median'] / best:.2f}"
        paper = f"x{p['dc_searched'] / p['unipc']:.2f}"
        lines.append(
            f"| {n} | {p['dpmsolver++']} | {p['unipc']} | {p['dc_searched']} | {paper} | {ours} "
            f"| {vs_best} |"
        )
    times = results["search_seconds_warm_median"]
    first = results["search_seconds_first_call"]
    lines += [
        "",
        "Ratio search time (10 datapoints, 40 AdamW iterations per step, whole search one jit): "
        + ", ".join(
            f"NFE {n}: {times[n]:.2f} s warm / {first[n]:.1f} s with compilation"
            for n in sorted(times, key=int)
        )
        + ". The paper reports ~22 s per step on a GPU for Stable Diffusion (second-hand).",
    ]
    if results["gt_error_mse"]:
        lines += [
            "",
            "Ground-truth error (MSE of the ground truth to a many-step DPM-Solver++ 3M solve): "
            + ", ".join(
                f"CFG {k.split('cfg=')[1]}: {v:.1e}" for k, v in results["gt_error_mse"].items()
            )
            + ".",
        ]
    if results.get("targets"):
        lines += [
            "",
            "Targets: " + ", ".join(f"{k}: {v}" for k, v in results["targets"].items()) + ".",
        ]
    if results.get("cpr_holdout"):
        h = results["cpr_holdout"]
        lines += [
            "",
            f"CPR leave-one-setting-out RMS ratio error: median {h['rms_median']:.3f}, max {h['rms_max']:.3f} "
            f"({h['n']} fits).",
        ]
    lines += [
        "",
        f"CPR fitted on {len(results['cpr_settings'])} (CFG, NFE) settings; coefficients in the official "
        "36-number layout: `cpr_coeffs_seed<k>.npy`; searched ratios: `ratios.json`.",
    ]
    lines += ["", "![MSE vs NFE](./mse.png)", "", "![searched and CPR ratios](./ratios.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    runtime.main(run)
