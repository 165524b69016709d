r"""Distribution Transformers on the paper's tasks, against exact references and numpyro / filtering baselines.

    python -m theorax.experiments.distribution_transformer \
        --config=configs/distribution_transformer.py:cpu --workdir=results/distribution_transformer_cpu

For every entry of `config.tasks` (each in `WORKDIR/<entry>/`, resumable): train a `DistributionTransformer` on
fresh draws from the task's meta-prior (`inference.distribution_transformer.training`, through `runtime.train`),
then evaluate it on `eval.num_problems` unseen problems beside the baselines, everything task-specific coming from
the task (`inference.distribution_transformer.tasks.Task`):

* tasks (a), (b), (d), (e): expected KL(exact || q) (Monte Carlo with exact posterior draws where they exist,
  otherwise the exact-posterior gap at the true latents), NLL of the true latent, and wall time per problem
  after compilation, for the transformer, numpyro NUTS (vectorised chains, scored through a KDE-GMM of its
  samples), SVI with a full-rank Gaussian guide (numpyro) and with a K-component Gaussian-mixture guide
  (`baselines.svi_gmm`, K = `baselines.svi_gmm_components`, default 4; 0 skips it), and, where the task has
  one (task (e)), importance sampling from the prior;
* filtering tasks (c): filtering NLL of the true state over `filter_steps` steps of `filter_series` series and
  time per step, for the transformer filter, a bootstrap particle filter and an EKF.

The hardware tuning of the transformer's programs is set here, not in the library: `cpu_tuning()`.
`results.json` holds every number; `report()` writes one table beside the paper's numbers and one plot.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np
from matplotlib.figure import Figure
from theorax.experiments import runtime
from theorax.inference.distribution_transformer import baselines, filters
from theorax.inference.distribution_transformer import evaluation as dt_evaluation
from theorax.inference.distribution_transformer import tasks as dt_tasks
from theorax.inference.distribution_transformer import training as dt_training
from theorax.models.distribution_transformer import DistributionTransformer
from theorax.models.gmm import GMM

# The paper's numbers (arXiv v3, Sec. 4; reference notes Sec. 4): (value, time). Times: seconds for a batch of 1000
# problems (inverse gamma) or per filtering step for a batch of 100 series (sensor fusion).
_INVGAMMA_TIMES = {"DT-5": 0.016, "DT-2": 0.014, "SVI": 148.0, "ACE-5": 0.037, "TabPFNv2": 1.52}
_INVGAMMA_KL = {
    "invgamma_narrow": (0.0004, 0.0044, 0.0425, 0.0094, 0.0112),
    "invgamma_wide": (0.0003, 0.0058, 0.0558, 0.0048, 0.1513),
}
PAPER = {
    **{
        name: {
            "metric": "KL",
            **{m: (kl, _INVGAMMA_TIMES[m]) for m, kl in zip(_INVGAMMA_TIMES, kls, strict=True)},
        }
        for name, kls in _INVGAMMA_KL.items()
    },
    "sensor_fusion": {
        "metric": "NLL",
        "DT-4": (-0.197, 0.017),
        "PF": (-0.244, 0.818),
        "EKF": (95.9, 0.010),
    },
    "gp_hyperprior": {"metric": "NLL", "DT (y*)": (0.81, None), "DT (l)": (0.31, None)},
}


# Components of the Gaussian-mixture SVI guide when a config has no `baselines.svi_gmm_components`.
SVI_GMM_COMPONENTS = 4

# ------------------------------------------------------------------------------------------- config


def _check_config(config) -> None:
    runtime.check(len(config.tasks) > 0, "config.tasks is empty; pick a preset, e.g. :cpu")
    for name, c in config.tasks.items():
        runtime.check_choice(f"tasks.{name}.task", c.task, dt_tasks.TASKS)
        for key in ("batch_size", "num_steps", "checkpoint_every", "log_every"):
            runtime.check(
                c.train[key] >= 1, f"tasks.{name}.train.{key}={c.train[key]} must be >= 1"
            )
        runtime.check(
            0 <= c.train.warmup_steps <= c.train.num_steps,
            f"tasks.{name}.train.warmup_steps={c.train.warmup_steps} must lie in [0, num_steps]",
        )
        runtime.check(c.train.learning_rate > 0, f"tasks.{name}.train.learning_rate must be > 0")
        runtime.check(
            c.model.d_model % c.model.num_heads == 0,
            f"tasks.{name}.model.d_model={c.model.d_model} must be divisible by num_heads="
            f"{c.model.num_heads}",
        )
        runtime.check(
            c.model.num_components >= 1, f"tasks.{name}.model.num_components must be >= 1"
        )
        runtime.check(c.eval.num_problems >= 2, f"tasks.{name}.eval.num_problems must be >= 2")
        fb = c.train.get("feedback_fraction", 0.0)
        runtime.check(
            0.0 <= fb < 1.0, f"tasks.{name}.train.feedback_fraction={fb} must lie in [0, 1)"
        )
        runtime.check(
            fb == 0.0 or dt_tasks.task_class(c.task).filtering,
            f"tasks.{name}.train.feedback_fraction={fb}: self-fed priors need a filtering task "
            f"(sensor_fusion), not {c.task!r}; set it to 0",
        )
        for key in ("nuts_problems", "svi_problems"):
            runtime.check(
                0 <= c.baselines[key] <= c.eval.num_problems,
                f"tasks.{name}.baselines.{key}={c.baselines[key]} must lie in [0, eval.num_problems]",
            )
        k_gmm = c.baselines.get("svi_gmm_components", SVI_GMM_COMPONENTS)
        runtime.check(
            k_gmm >= 0,
            f"tasks.{name}.baselines.svi_gmm_components={k_gmm} must be >= 0 (0 skips it)",
        )


# -------------------------------------------------------------------------------------- hardware tuning

# XLA:CPU's YNNPACK fusions pull a whole post-LN layer of this model (attention core, three LayerNorms, FFN) into
# one library call, which materialises every broadcast constant at full size and runs the small-token maths slowly.
# Plain XLA fusions with library dots are faster for this model (DT-5 on 1,000 problems: 34 -> 27 ms; a training
# step at batch 384: 71 -> 58 ms) but not for the scaled MLPs' large matmuls, so it is set per program, not per
# process.
_CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def cpu_tuning() -> dict:
    """The transformer's hardware knobs for this machine, as keyword arguments of `training.make_posterior_fn`:
    `compiler_options` (the option above, on the CPU backend when this jaxlib knows it; else none) and `slices`
    (the batch cut into 2 parts inside one program on the CPU, which keeps 2 cores busier; 1 elsewhere).
    The train step and the filter take the same `compiler_options`."""
    if jax.default_backend() != "cpu":
        return {"compiler_options": None, "slices": 1}
    return {"compiler_options": runtime.cpu_compiler_options(_CPU_COMPILER_OPTIONS), "slices": 2}


def compiler_options() -> dict | None:
    return cpu_tuning()["compiler_options"]


def build(c) -> tuple:
    """The task and the model an entry describes."""
    kw = {}
    cls = dt_tasks.task_class(c.task)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "num_components" in fields:
        kw["num_components"] = c.model.num_components
    for k, v in c.get("task_kwargs", {}).items():
        runtime.check(k in fields, f"task_kwargs.{k}: {cls.__name__} has no field {k!r}")
        kw[k] = v
    task = dt_tasks.make_task(c.task, **kw)
    m = c.model.to_dict()
    model = DistributionTransformer(
        **task.model_kwargs(c.model.num_components),
        d_model=m["d_model"],
        num_heads=m["num_heads"],
        num_layers=m["num_layers"],
        dim_feedforward=m["dim_feedforward"],
        component_hidden=tuple(m["component_hidden"]),
        observation_hidden=tuple(m["observation_hidden"]),
        prior_hidden=tuple(m["prior_hidden"]),
        conversion_hidden=tuple(m["conversion_hidden"]),
        jitter=m["jitter"],
    )
    return task, model


# ------------------------------------------------------------------------------------------ training


def training_setup(c, task, model) -> tuple[dict, Callable]:
    """An entry's initial train state and its jitted `step_fn(state, step)` (state donated), the batch split
    over every device when it divides evenly (parameters replicated)."""
    t = c.train
    optimizer = dt_training.make_optimizer(
        t.learning_rate, t.num_steps, t.warmup_steps, t.weight_decay
    )
    key = jax.random.key(c.seed)
    feedback = None
    if t.get("feedback_fraction", 0.0) > 0:
        feedback = dt_training.PriorFeedback(
            fraction=t.feedback_fraction,
            reset_prob=t.feedback_reset_prob,
            start_step=t.feedback_start,
        )
    state = dt_training.init_state(
        model, task, optimizer, key, feedback=feedback, batch_size=t.batch_size
    )
    sharding = None
    n_dev = jax.device_count()
    if n_dev > 1 and t.batch_size % n_dev == 0:
        mesh = runtime.data_mesh()
        sharding = runtime.batch_sharding(mesh)
        state = jax.device_put(state, runtime.replicated(mesh))
    step = dt_training.make_train_step(
        model,
        task,
        optimizer,
        batch_size=t.batch_size,
        key=key,
        use_prior_loss=t.use_prior_loss,
        batch_sharding=sharding,
        feedback=feedback,
        compiler_options=compiler_options(),
    )
    return state, step


def train(c, task, model, wd: runtime.Workdir, desc: str):
    """Trains through `runtime.train` (resumable); returns (params, train seconds this session)."""
    t = c.train
    state, step = training_setup(c, task, model)
    start = time.perf_counter()
    state = runtime.train(
        wd,
        state,
        step,
        num_steps=t.num_steps,
        checkpoint_every=t.checkpoint_every,
        log_every=t.log_every,
        desc=desc,
    )
    return jax.device_get(state["params"]), time.perf_counter() - start


# ---------------------------------------------------------------------------------------- evaluation


def chunks(n: int, size: int):
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def slice_batch(tree, i, j):
    return jax.tree.map(lambda a: a[i:j], tree)


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    sem = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "median": float(np.median(v)), "n": int(len(v))}


def _add_marginal_stats(out: dict, parts: list[dict]) -> None:
    """`nll_<part>` statistics of the task's named parts of the latent (e.g. y* and l of task (d))."""
    for name in parts[0] if parts else ():
        out[f"nll_{name}"] = _stats(np.concatenate([np.asarray(p[name]) for p in parts]))


def score(task, prob, q: GMM, key, n_kl: int, chunk: int) -> dict:
    """KL (Monte Carlo where exact posterior draws exist; the exact-posterior gap otherwise) and NLL of the
    true latent in its own space (with the Jacobian of f), per problem, chunked over problems."""
    transform = task.transform
    kl, gap, nll, marg = [], [], [], []
    B = prob.target.shape[0]
    for i, j in chunks(B, chunk):
        p, qq = slice_batch(prob, i, j), q[i:j]
        if task.has_exact_sampler:
            kl.append(
                dt_evaluation.monte_carlo_kl(task, p, qq.log_prob, jax.random.fold_in(key, i), n_kl)
            )
        gap.append(dt_evaluation.gap_kl(task, p, qq.log_prob))
        nll.append(-qq.log_prob(p.target) - transform.log_abs_det_jacobian_at(p.target))
        marg.append(task.marginal_nlls(qq, p.target))
    out = {"gap_kl": _stats(np.concatenate(gap)), "nll": _stats(np.concatenate(nll))}
    _add_marginal_stats(out, [m for m in marg if m])
    out["kl"] = _stats(np.concatenate(kl)) if kl else out["gap_kl"]
    out["kl_estimator"] = "monte_carlo" if kl else "gap"
    return out


def reference_nll(task, prob, chunk: int) -> dict:
    """NLL of the true latents under the (near-)exact posterior: the floor for every method."""
    out, marg = [], []
    for i, j in chunks(prob.target.shape[0], chunk):
        p = slice_batch(prob, i, j)
        lp = task.reference_log_prob(p, p.target)
        out.append(-lp - task.transform.log_abs_det_jacobian_at(p.target))
        marg.append(task.reference_marginal_nlls(p, p.target))
    res = _stats(np.concatenate(out))
    _add_marginal_stats(res, [m for m in marg if m])
    return res


def _timed_posteriors(posterior_fn, params, prob, repeats: int) -> tuple[GMM, dict]:
    """The transformer's posteriors for a batch, and its wall times: the first call (with compilation), then
    `repeats` timed calls."""
    start = time.perf_counter()
    q = jax.block_until_ready(posterior_fn(params, prob.prior, prob.observations))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(posterior_fn(params, prob.prior, prob.observations))
        times.append(time.perf_counter() - start)
    n = prob.target.shape[0]
    timing = dict(
        batch_s_min=min(times),
        batch_s_median=float(np.median(times)),
        per_problem_s=min(times) / n,
        compile_s=compile_s,
        num_problems=n,
    )
    return q, timing


def _extra_problem_sets(task, posterior_fn, params, e, key, first_kl: dict) -> dict:
    """The transformer's expected KL on `e.extra_problem_sets` more independent sets, pooled with the first."""
    means, sems = [first_kl["mean"]], [first_kl["sem"]]
    for s in range(1, e.extra_problem_sets + 1):
        extra = task.sample(jax.random.fold_in(key, 100 + s), e.num_problems)
        q_extra = posterior_fn(params, extra.prior, extra.observations)
        kl = score(
            task, extra, q_extra, jax.random.fold_in(key, 200 + s), e.num_kl_samples, e.chunk
        )
        means.append(kl["kl"]["mean"])
        sems.append(kl["kl"]["sem"])
    return {
        "problems_per_set": e.num_problems,
        "set_means": means,
        "mean": float(np.mean(means)),
        "sem": float(np.sqrt(np.sum(np.square(sems))) / len(means)),
    }


def silverman_kde(samples) -> GMM:
    """KDE-GMM of equally weighted samples with Silverman's bandwidth h = 1.06 N^{-1/5} applied to the standard
    deviation (kernel covariance h^2 (Cov + 1e-3 I))."""
    return dt_evaluation.kde_gmm(samples, bandwidth="std")


def _nuts_baseline(task, prob, q, c, key) -> dict:
    """NUTS (vectorised chains) on the first `nuts_problems` problems, scored through a Silverman KDE-GMM; and
    the transformer's KL on the same problems."""
    e, b = c.eval, c.baselines
    model_fn, args, to_y, _ = task.baseline_problem(prob, b.nuts_problems)
    chains = dict(num_warmup=b.nuts_warmup, num_samples=b.nuts_samples, num_chains=b.nuts_chains)
    samples, timing = baselines.nuts(model_fn, args, jax.random.fold_in(key, 2), **chains)
    ys = to_y(samples)
    sub = slice_batch(prob, 0, b.nuts_problems)
    k_score = jax.random.fold_in(key, 3)
    nuts = score(task, sub, silverman_kde(ys), k_score, min(e.num_kl_samples, 2000), 5)
    nuts.update(timing, num_problems=b.nuts_problems, samples=int(ys.shape[0]))
    dt_sub = score(task, sub, q[: b.nuts_problems], k_score, e.num_kl_samples, e.chunk)
    return {"methods": {"NUTS": nuts}, "dt_on_nuts_problems": dt_sub["kl"]}


def _svi_baselines(task, prob, c, key) -> dict:
    """SVI with a full-rank Gaussian guide and (unless `svi_gmm_components` is 0) with a Gaussian-mixture guide,
    on the first `svi_problems` problems; same steps and step size, about the same log-joint evaluations per
    step."""
    e, b = c.eval, c.baselines
    kb = jax.random.fold_in(key, 2)
    model_fn, args, _, order = task.baseline_problem(prob, b.svi_problems)
    sub = slice_batch(prob, 0, b.svi_problems)

    def scored(q: GMM, timing: dict) -> dict:
        q = q if order is None else q.marginal(order)  # guide dims in the task's sample order
        res = score(task, sub, q, jax.random.fold_in(key, 4), e.num_kl_samples, e.chunk)
        return {**res, **timing, "num_problems": b.svi_problems}

    steps = dict(num_steps=b.svi_steps, learning_rate=b.svi_learning_rate)
    loc, tril, timing = baselines.svi_gaussian(
        model_fn, args, jax.random.fold_in(kb, 1), num_particles=b.svi_particles, **steps
    )
    methods = {"SVI (full-rank Gaussian)": scored(GMM.gaussian(loc, tril), timing)}
    k_gmm = b.get("svi_gmm_components", SVI_GMM_COMPONENTS)
    if k_gmm > 0:
        guide = baselines.MixtureGuide(num_components=k_gmm)
        # about the full-rank guide's log-joint evaluations per step
        particles = -(-b.svi_particles // k_gmm)
        q_mix, timing = baselines.svi_gmm(
            model_fn, args, jax.random.fold_in(kb, 4), guide=guide, num_particles=particles, **steps
        )
        methods[f"SVI (GMM guide, K={k_gmm})"] = scored(q_mix, timing)
    return methods


def _importance_sampling_baseline(task, prob, c, key) -> dict:
    """Self-normalised importance sampling from the prior on the first problems (tasks that offer it), scored
    through a Silverman KDE-GMM of the weighted draws; {} for other tasks."""
    e, b = c.eval, c.baselines
    n = min(b.nuts_problems or 20, e.num_problems)
    sub = slice_batch(prob, 0, n)
    proposal = task.importance_proposal(sub)
    if proposal is None:
        return {}
    kb = jax.random.fold_in(key, 2)
    run_is = jax.jit(lambda k: baselines.importance_sampling(k, *proposal, b.is_samples))
    jax.block_until_ready(run_is(jax.random.fold_in(kb, 2)))
    start = time.perf_counter()
    ys, logw = jax.block_until_ready(run_is(jax.random.fold_in(kb, 3)))
    is_s = time.perf_counter() - start
    q_is = dt_evaluation.kde_gmm(ys, logw, bandwidth="std")
    imp = score(task, sub, q_is, jax.random.fold_in(key, 5), 0, 2)
    imp.update(per_problem_s=is_s / n, num_problems=n, samples=b.is_samples)
    return {"importance sampling": imp}


def evaluate_static(name, c, task, model, params, key) -> dict:
    """Transformer and baselines on `eval.num_problems` unseen problems of a static task."""
    e, b = c.eval, c.baselines
    prob = task.sample(jax.random.fold_in(key, 0), e.num_problems)
    posterior_fn = dt_training.make_posterior_fn(model, **cpu_tuning())
    q, timing = _timed_posteriors(posterior_fn, params, prob, e.latency_repeats)
    dt = score(task, prob, q, jax.random.fold_in(key, 1), e.num_kl_samples, e.chunk)
    res = {"methods": {f"DT-{c.model.num_components}": {**dt, **timing}}}
    res["num_problems"] = e.num_problems
    if e.get("extra_problem_sets", 0) > 0:
        res["dt_problem_sets"] = _extra_problem_sets(task, posterior_fn, params, e, key, dt["kl"])
    try:
        res["reference_nll"] = reference_nll(task, prob, e.chunk)
    except ValueError:  # a task without a reference density
        pass
    if isinstance(prob.prior, GMM):  # a GMM prior is itself a posterior to score: no update
        prior_kl = score(
            task, prob, prob.prior, jax.random.fold_in(key, 1), e.num_kl_samples, e.chunk
        )
        res["methods"]["prior (no update)"] = {**prior_kl, "per_problem_s": 0.0}
    if b.nuts_problems > 0 and task.baseline_problem(prob, 1) is not None:
        nuts = _nuts_baseline(task, prob, q, c, key)
        res["methods"].update(nuts["methods"])
        res["dt_on_nuts_problems"] = nuts["dt_on_nuts_problems"]
    if b.svi_problems > 0 and task.baseline_problem(prob, 1) is not None:
        res["methods"].update(_svi_baselines(task, prob, c, key))
    if b.is_samples > 0:
        res["methods"].update(_importance_sampling_baseline(task, prob, c, key))
    return res


def evaluate_filtering(name, c, task, model, params, key) -> dict:
    """The transformer filter, a bootstrap PF and an EKF on simulated series of a filtering task's LTI model."""
    b = c.baselines
    states, obs = task.simulate(jax.random.fold_in(key, 0), b.filter_series, b.filter_steps)
    k = c.model.num_components
    runs = {
        f"DT-{k}": jax.jit(
            lambda s, o: filters.dt_filter(model.apply, params, task, s, o, k),
            compiler_options=compiler_options(),
        ),
        "EKF": jax.jit(lambda s, o: filters.extended_kalman_filter(task, s, o)),
    }
    if b.pf_particles > 0:  # pf_particles=0 skips the (slow) particle filter
        runs[f"PF-{b.pf_particles}"] = jax.jit(
            lambda s, o: filters.bootstrap_particle_filter(
                jax.random.fold_in(key, 1), task, s, o, b.pf_particles
            )
        )
    res = {"methods": {}, "series": b.filter_series, "steps": b.filter_steps}
    for label, fn in runs.items():
        jax.block_until_ready(fn(states, obs))
        start = time.perf_counter()
        nll = np.asarray(jax.block_until_ready(fn(states, obs)))
        seconds = time.perf_counter() - start
        per_series = nll.mean(0)
        res["methods"][label] = {
            "nll": _stats(per_series),
            "nll_per_step": nll.mean(1).tolist(),
            "per_step_s": seconds / b.filter_steps,
        }
    return res


# ----------------------------------------------------------------------------------------------- run


def run_entry(name: str, c, path: str) -> dict:
    wd = runtime.Workdir(path, c)
    if wd.finished:
        return wd.read_results()
    task, model = build(c)
    params, train_s = train(c, task, model, wd, desc=f"train {name}")
    metrics = wd.read_metrics()
    key = jax.random.key(10_000 + c.seed)
    if task.filtering:
        res = evaluate_filtering(name, c, task, model, params, key)
    else:
        res = evaluate_static(name, c, task, model, params, key)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    res.update(
        task=c.task,
        train_s=train_s,
        train_steps=c.train.num_steps,
        batch_size=c.train.batch_size,
        num_params=n_params,
        final_loss=metrics[-1].get("loss") if metrics else None,
        device=f"{jax.devices()[0].platform} x{jax.device_count()}",
    )
    wd.close()
    return wd.write_results(res)


def run(config, workdir: str) -> dict:
    """Trains and evaluates every entry of `config.tasks`; returns (and writes) results.json."""
    _check_config(config)
    wd = runtime.Workdir(workdir, config)
    if wd.finished:
        return wd.read_results()
    results = {"preset": config.preset, "tasks": {}}
    for name, c in config.tasks.items():
        results["tasks"][name] = run_entry(name, c, os.path.join(wd.path, name))
    _plot(results, wd)
    return wd.write_results(results)


# -------------------------------------------------------------------------------------------- report


def _plot(results: dict, wd: runtime.Workdir) -> None:
    tasks = results["tasks"]
    fig = Figure(figsize=(4.5 * len(tasks), 3.6))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, (name, r) in zip(axes[0], tasks.items(), strict=True):
        if "steps" in r:  # filtering
            for label, m in r["methods"].items():
                ax.plot(np.arange(1, len(m["nll_per_step"]) + 1), m["nll_per_step"], label=label)
            ax.set_yscale("symlog")
            ax.set_xlabel("step")
            ax.set_ylabel("NLL of the true state")
        else:
            for label, m in r["methods"].items():
                t = m.get("per_problem_s", 0.0) or 1e-7
                ax.errorbar(
                    t, max(m["kl"]["mean"], 1e-6), yerr=m["kl"]["sem"], fmt="o", label=label
                )
            paper = [(k, v) for k, v in PAPER.get(name, {}).items() if k != "metric" and v[1]]
            for i, (label, (value, batch_s)) in enumerate(paper):
                marker = "*" if label.startswith("DT") else "x"
                ax.plot(
                    batch_s / 1000, value, "k" + marker, label="paper (GPU)" if i == 0 else None
                )
                ax.annotate(label, (batch_s / 1000, value), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.margins(0.15)
            ax.set_xlabel("wall time per problem [s]")
            ax.set_ylabel("expected KL(exact || q)")
        ax.set_title(name)
        ax.legend(fontsize=7)
    if wd.is_main:
        fig.savefig(wd.file("distribution_transformer.png"), dpi=150, bbox_inches="tight")


def _fmt(x, digits=4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 1e4 or (abs(x) < 1e-3 and x != 0):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _nll_cell(m: dict) -> str:
    if "nll_y_star" in m:
        return f"y*: {_fmt(m['nll_y_star']['mean'])}; l: {_fmt(m['nll_lengthscale']['mean'])}"
    return _fmt(m["nll"]["mean"])


def report(results: dict, workdir: str) -> str:
    lines = [
        "## Distribution Transformers",
        "",
        "GMM-to-GMM amortised posteriors (Whittle et al., arXiv 2502.02463) trained on fresh draws of each "
        f"task's meta-prior; preset `{results.get('preset')}`. Expected KL(exact || q) is a Monte Carlo "
        "estimate with exact posterior draws (tasks a, b) or the exact-posterior gap at the true latents "
        "(d, e); NLL is of the true latent. Times are wall time per problem after compilation on this "
        "machine's CPU (the paper's are on a GPU, for a batch of 1000). NUTS, importance sampling and the PF "
        "are scored through a KDE-GMM of their samples, as in the paper. For the GP task the NLL column gives "
        "the predictive NLL of y* and the NLL of the lengthscale l.",
        "",
        "| task | method | expected KL (mean ± sem, median) | NLL | time / problem [s] | paper KL or NLL | paper time / problem [s] |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        paper = PAPER.get(name, {})
        for label, m in r["methods"].items():
            pkey = next(
                (k for k in paper if k != "metric" and label.split(" ")[0].startswith(k)), None
            )
            pval, ptime = paper.get(pkey, (None, None)) if pkey else (None, None)
            if "steps" in r:
                t = m["per_step_s"] / r["series"]
                lines.append(
                    f"| {name} | {label} | - | {_fmt(m['nll']['mean'])} ± {_fmt(m['nll']['sem'])} | "
                    f"{_fmt(t)} (per step per series) | {_fmt(pval)} | "
                    f"{_fmt(ptime / 100 if ptime else None)} |"
                )
            else:
                if name == "gp_hyperprior" and label.startswith("DT"):
                    pval = "y*: 0.81; l: 0.31"
                lines.append(
                    f"| {name} | {label} | {_fmt(m['kl']['mean'])} ± {_fmt(m['kl']['sem'])} "
                    f"(median {_fmt(m['kl']['median'])}) | "
                    f"{_nll_cell(m)} | {_fmt(m.get('per_problem_s'))} | "
                    f"{pval if isinstance(pval, str) else _fmt(pval)} | "
                    f"{_fmt(ptime / 1000 if ptime else None)} |"
                )
        if "reference_nll" in r:
            lines.append(
                f"| {name} | exact reference | 0 | {_nll_cell({'nll': r['reference_nll'], **r['reference_nll']})}"
                " | - | - | - |"
            )
    lines += ["", "![KL against time per problem](./distribution_transformer.png)", ""]
    for name, r in results["tasks"].items():
        lines.append(
            f"- `{name}`: {r['num_params']:,} parameters, {r['train_steps']} steps of batch "
            f"{r['batch_size']} ({r['train_s']:.0f} s this session)."
        )
        dt = next(iter(r["methods"].values()))
        if "batch_s_min" in dt:
            lines.append(
                f"  Posteriors for {dt['num_problems']} problems in {1e3 * dt['batch_s_min']:.1f} ms "
                f"(median {1e3 * dt['batch_s_median']:.1f} ms)."
            )
        if "dt_problem_sets" in r:
            sets = r["dt_problem_sets"]
            lines.append(
                f"  Over {len(sets['set_means'])} independent sets of {sets['problems_per_set']} problems "
                f"its expected KL is {_fmt(sets['mean'])} ± {_fmt(sets['sem'])} (set means "
                f"{_fmt(min(sets['set_means']))} to {_fmt(max(sets['set_means']))})."
            )
        if "NUTS" in r["methods"] and "batch_s_min" in dt:
            ratio = r["methods"]["NUTS"]["per_problem_s"] / dt["per_problem_s"]
            lines.append(
                f"  NUTS takes {ratio:,.0f}x longer per problem; on the same problems the transformer's KL "
                f"is {_fmt(r['dt_on_nuts_problems']['mean'])} vs NUTS's "
                f"{_fmt(r['methods']['NUTS']['kl']['mean'])}."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    runtime.main(run)
