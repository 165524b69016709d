r"""Benchmark: Distribution-Transformer posteriors against numpyro NUTS on task (b), in the same process.

    python -m theorax.experiments.bench_distribution_transformer --out=results/bench
    python -m theorax.experiments.bench_distribution_transformer \
        --dt_workdir=results/dt_invgamma_wide/invgamma_wide      # a trained entry of the experiment

Measures (issue targets in brackets):
1. Wall time of the posteriors of a batch of 1,000 problems after compilation, for the paper's DT-5
   architecture (64/8/6/256, k = 5; [< 50 ms]) and for the trained model scored below.
2. On task (b) (inverse-gamma, wide meta-prior unless the trained entry says otherwise): wall time per problem
   of the trained transformer and of numpyro NUTS (4 chains, 500 warm-up steps each, chains vectorised), each
   with its expected KL(exact || q) on the same problems, NUTS scored through a Silverman KDE-GMM of its draws
   (as the paper does). NUTS runs one problem per call (the usual use) and all problems in one call (problems
   vectorised too, the most favourable case for NUTS), each on a ladder of 1,000, 4,000 and 16,000 draws per
   chain. The time NUTS needs to match the transformer's KL is that of the first rung whose KL is at most the
   transformer's; when no rung gets there it is at least the top rung's time (more draws only cost more), so
   the ratio is reported as a lower bound ">=". Target [>= 1000x] for both ways of running NUTS.

Without `--dt_workdir` the `cpu` preset's `invgamma_wide` entry is trained first (resumably) in
`OUT/distribution_transformer_model`. Writes `OUT/distribution_transformer.json` and prints a table.
"""

from __future__ import annotations

import json
import os
import platform

import jax
import ml_collections
import numpy as np
from absl import app, flags
from theorax.experiments import distribution_transformer as dtx
from theorax.experiments import runtime, timing
from theorax.inference.distribution_transformer import baselines
from theorax.inference.distribution_transformer import evaluation as dt_evaluation
from theorax.inference.distribution_transformer import training as dt_training
from theorax.models.distribution_transformer import DistributionTransformer, init_params

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The bench's command-line flags (defined only when it runs as a script, so that importing this module
    beside other experiments defines nothing)."""
    flags.DEFINE_string("out", "results/bench", "Directory for distribution_transformer.json.")
    flags.DEFINE_string(
        "dt_workdir", None, "A trained experiment entry (with config.json and checkpoints)."
    )
    flags.DEFINE_integer(
        "num_problems", 1000, "Batch size of the latency measurement and the DT scoring."
    )
    flags.DEFINE_integer(
        "nuts_problems", 20, "Problems NUTS is run on (one per call, then all at once)."
    )
    flags.DEFINE_list(
        "nuts_draws", ["1000", "4000", "16000"], "The ladder of NUTS draws per chain (ascending)."
    )
    flags.DEFINE_integer("repeats", 50, "Timed repetitions of the transformer's batch.")
    flags.DEFINE_integer(
        "kl_samples", 4000, "Exact posterior draws per problem for the KL estimates."
    )


def _load_entry(path: str | None, out: str):
    if path is None:
        from theorax.configs import distribution_transformer as cfg

        c = cfg.get_config("cpu").tasks.invgamma_wide
        path = os.path.join(out, "distribution_transformer_model")
    else:
        with open(os.path.join(path, "config.json")) as f:
            c = ml_collections.ConfigDict(json.load(f))
    return c, path


def trained_model(dt_workdir: str | None, out: str):
    """The entry's task, model and config, and its parameters (trained first, resumably, when needed)."""
    c, path = _load_entry(dt_workdir, out)
    task, model = dtx.build(c)
    if c.task not in ("invgamma_wide", "invgamma_narrow"):
        raise app.UsageError(f"--dt_workdir must hold a task (b) entry, got task {c.task!r}")
    wd = runtime.Workdir(path, c)
    params, _ = dtx.train(c, task, model, wd, desc="train (bench model)")
    wd.close()
    return c, task, model, params


def latencies(task, model, params, prob, repeats: int) -> tuple[dict, dict]:
    """Batch latency of the paper's DT-5 architecture (weights do not change the cost) and of the trained
    model, both with the experiment's hardware tuning."""
    paper_model = DistributionTransformer(
        **task.model_kwargs(5), d_model=64, num_heads=8, num_layers=6, dim_feedforward=256
    )
    paper_params = init_params(paper_model, jax.random.key(0), prob.prior, prob.observations)

    def latency(m, p):
        fn = dt_training.make_posterior_fn(m, **dtx.cpu_tuning())
        return timing.time_calls(
            lambda: jax.block_until_ready(fn(p, prob.prior, prob.observations)), repeats
        )

    return latency(paper_model, paper_params), latency(model, params)


def expected_kl_per_problem(task, problems, posterior, num_samples: int) -> float:
    """Mean KL(exact || posterior) over `problems`, one problem per call with its own key, so every method is
    scored on the same exact draws."""
    n = problems.target.shape[0]
    kls = [
        dt_evaluation.monte_carlo_kl(
            task,
            dtx.slice_batch(problems, i, i + 1),
            posterior[i : i + 1].log_prob,
            jax.random.fold_in(jax.random.key(4), i),
            num_samples,
        )
        for i in range(n)
    ]
    return float(np.concatenate(kls).mean())


def nuts_ladder(task, sub, kl_dt: float, dt_per_problem: float, draws, num_samples: int):
    """NUTS one problem per call and all problems in one call, each up a ladder of draws per chain until its KL
    reaches the transformer's; returns (every run, the time ratio at the transformer's KL per mode)."""
    n = sub.target.shape[0]
    model_fn, args, to_y, _ = task.baseline_problem(sub, n)
    runs, at_equal_kl = {}, {}
    for mode, per_call in (("one problem per call", 1), ("all problems in one call", n)):
        for num in draws:
            samples, nuts_time = baselines.nuts(
                model_fn,
                args,
                jax.random.key(3),
                num_warmup=500,
                num_samples=num,
                num_chains=4,
                problems_per_call=per_call,
            )
            q_nuts = dtx.silverman_kde(to_y(samples))
            kl_nuts = expected_kl_per_problem(task, sub, q_nuts, num_samples)
            run = runs[f"4x(500+{num}), {mode}"] = {
                **nuts_time,
                "problems": n,
                "problems_per_call": per_call,
                "draws_per_problem": 4 * num,
                "expected_kl": kl_nuts,
                "dt_expected_kl_same_problems": kl_dt,
                "time_ratio_nuts_over_dt": nuts_time["per_problem_s"] / dt_per_problem,
            }
            at_equal_kl[mode] = {
                "time_ratio": run["time_ratio_nuts_over_dt"],
                "reached": kl_nuts <= kl_dt,  # else the ratio is a lower bound
                "draws_per_chain": num,
            }
            if kl_nuts <= kl_dt:
                break
    return runs, at_equal_kl


def _table(result: dict) -> list[tuple[str, str, str, str]]:
    paper, trained = result["paper_dt5_architecture_batch_latency"], result["trained_model"]
    lat, dt_per_problem = trained["batch_latency"], trained["per_problem_s"]
    rows = [
        ("DT-5 paper architecture, batch of 1000", f"{1e3 * paper['min_s']:.1f} ms "
         f"(median {1e3 * paper['median_s']:.1f})", "-", "< 50 ms"),
        ("trained DT, batch of 1000", f"{1e3 * lat['min_s']:.1f} ms "
         f"(median {1e3 * lat['median_s']:.1f})", f"{trained['expected_kl']:.5f}", ""),
        ("trained DT, per problem", f"{1e6 * dt_per_problem:.1f} us", "", ""),
    ]  # fmt: skip
    for label, r in result["nuts"]["runs"].items():
        rows.append(
            (f"NUTS {label}", f"{1e3 * r['per_problem_s']:.1f} ms / problem",
             f"{r['expected_kl']:.5f}", "")
        )  # fmt: skip
        rows.append(
            (f"  DT on the same {r['problems']} problems; NUTS/DT time",
             f"{r['time_ratio_nuts_over_dt']:,.0f}x", f"{r['dt_expected_kl_same_problems']:.5f}", "")
        )  # fmt: skip
    for mode, r in result["nuts_over_dt_time_at_equal_kl"].items():
        rows.append(
            (f"NUTS/DT time at the DT's KL, {mode}",
             f"{'' if r['reached'] else '>= '}{r['time_ratio']:,.0f}x", "", ">= 1000x")
        )  # fmt: skip
    return rows


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)
    load = os.getloadavg()
    c, task, model, params = trained_model(FLAGS.dt_workdir, FLAGS.out)
    prob = task.sample(jax.random.key(2024), FLAGS.num_problems)

    # 1. latency: the paper's DT-5 architecture and the trained model
    paper_latency, trained_latency = latencies(task, model, params, prob, FLAGS.repeats)

    # 2. accuracy and time per problem against NUTS on the same problems
    q = dt_training.make_posterior_fn(model, **dtx.cpu_tuning())(
        params, prob.prior, prob.observations
    )
    kl_all = dt_evaluation.monte_carlo_kl(
        task, prob, q.log_prob, jax.random.key(1), FLAGS.kl_samples
    )
    sub = dtx.slice_batch(prob, 0, FLAGS.nuts_problems)
    dt_per_problem = trained_latency["min_s"] / FLAGS.num_problems
    kl_dt = expected_kl_per_problem(task, sub, q, FLAGS.kl_samples)
    nuts_runs, at_equal_kl = nuts_ladder(
        task, sub, kl_dt, dt_per_problem, list(map(int, FLAGS.nuts_draws)), FLAGS.kl_samples
    )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {jax.default_backend()}",
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "task": c.task,
        "num_problems": FLAGS.num_problems,
        "paper_dt5_architecture_batch_latency": paper_latency,
        "trained_model": {
            "model": c.model.to_dict(),
            "train_steps": c.train.num_steps,
            "batch_size": c.train.batch_size,
            "batch_latency": trained_latency,
            "per_problem_s": dt_per_problem,
            "expected_kl": float(kl_all.mean()),
        },
        "nuts": {"chains": 4, "warmup": 500, "runs": nuts_runs},
        "nuts_over_dt_time_at_equal_kl": at_equal_kl,
        "targets": {
            "paper_architecture_batch_latency_under_50ms": paper_latency["min_s"] < 0.05,
            "ratio_at_least_1000_at_equal_kl": all(
                r["time_ratio"] >= 1000 for r in at_equal_kl.values()
            ),
        },
    }
    path = os.path.join(FLAGS.out, "distribution_transformer.json")
    with open(path, "w") as f:
        json.dump(runtime._jsonable(result), f, indent=2)
    print(f"\nDistribution Transformer bench ({result['machine']}; load {load[0]:.1f} at start)")
    print(f"{'':52s} {'time':>26s} {'expected KL':>12s} {'target':>10s}")
    for r in _table(result):
        print(f"{r[0]:52s} {r[1]:>26s} {r[2]:>12s} {r[3]:>10s}")
    print(f"wrote {path}")


if __name__ == "__main__":
    _define_flags()
    runtime.use_huge_pages()
    app.run(main)
