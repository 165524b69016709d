r"""Benchmark: Distribution-Transformer posteriors beside a PyTorch twin, and against numpyro NUTS on task (b).

    python -m theorax.experiments.bench_distribution_transformer --out=results/bench
    python -m theorax.experiments.bench_distribution_transformer --latency_only --out=results/bench   # ~2 min
    python -m theorax.experiments.bench_distribution_transformer \
        --dt_workdir=results/dt_invgamma_wide/invgamma_wide      # a trained entry of the experiment

It first records the machine (`timing.machine`: load, CPU, cores, versions) and refuses to run when the 1-minute
load is above 0.5, unless `--allow_loaded_machine` (then every figure is marked as taken under load).
Measures (issue targets in brackets):
1. Latency, timed interleaved after warm-up (min and median over `--repeats` rounds), on the same batch of
   1,000 task (b) problems: the paper's DT-5 architecture (64/8/6/256, k = 5; weights do not change the cost)
   as the experiment compiles it (`cpu_tuning()`; [< 50 ms]) and with the library's defaults; its PyTorch twin
   (`experiments.torch_peers.TorchDistributionTransformer`, the official `nn.TransformerDecoder` layout, loaded
   with the same parameters and checked equal to ours), eager and under `torch.compile` [ours faster than
   both]; the forward pass's matrix products alone in one jit (its matmul floor); and, without
   `--latency_only`, the trained model scored below. `--latency_only` stops here (no training, no NUTS).
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
import time

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
    flags.DEFINE_integer("repeats", 30, "Interleaved rounds of the latency measurement.")
    flags.DEFINE_integer(
        "kl_samples", 4000, "Exact posterior draws per problem for the KL estimates."
    )
    flags.DEFINE_bool(
        "latency_only", False, "Only the latency part (1.): no trained model, no NUTS ladder."
    )
    flags.DEFINE_bool("torch", True, "Also time the PyTorch twin (eager and torch.compile).")
    flags.DEFINE_bool(
        "allow_loaded_machine",
        False,
        "Measure even on a busy machine (every figure is then marked as taken under load).",
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


def paper_dt5(task, prob):
    """The paper's DT-5 architecture for `task` (64/8/6/256, k = 5) and its initial parameters."""
    model = DistributionTransformer(
        **task.model_kwargs(5), d_model=64, num_heads=8, num_layers=6, dim_feedforward=256
    )
    return model, init_params(model, jax.random.key(0), prob.prior, prob.observations)


def forward_matmul_shapes(model: DistributionTransformer, batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matrix product of the forward pass of a feature-prior model with one observation
    token (task (b)): the prior embedding, the k conversions, the observation embedding, per layer the fused
    QKV, self-attention output, the cross-attention's value and output (one key), the FFN, and the head. The
    attention core over the few component tokens is broadcast products, not matmuls, and is left out."""
    d, k, t = model.d_model, model.num_components, batch * model.num_components
    mlp = lambda rows, widths: [(rows, a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
    shapes = mlp(batch, [model.prior_feature_dim, *model.prior_hidden, d])
    shapes += k * mlp(batch, [d, *model.conversion_hidden, d])
    (obs_dim,) = model.observation_dims.values()
    shapes += mlp(batch, [obs_dim, *model.observation_hidden, d])
    per_layer = [(t, d, 3 * d), (t, d, d), (batch, d, d), (batch, d, d)]
    per_layer += mlp(t, [d, model.dim_feedforward, d])
    shapes += model.num_layers * per_layer
    n_in = 1 + model.dim + model.dim * (model.dim + 1) // 2
    shapes += mlp(t, [d, *reversed(tuple(model.component_hidden)), n_in])
    return shapes


def torch_twin_calls(model, params, prob, q) -> tuple[dict, dict]:
    """The PyTorch twin of `model`, eager and compiled, as calls on the same problems; checks it against our
    posterior `q` first."""
    import torch
    from theorax.experiments.torch_peers import TorchDistributionTransformer

    twin = TorchDistributionTransformer(model, params)
    (source,) = model.observation_dims
    features = torch.from_numpy(np.array(prob.prior, np.float32))
    observations = torch.from_numpy(np.array(prob.observations[source], np.float32))
    compiled = torch.compile(twin)

    def call(module):
        with torch.inference_mode():
            return module(features, observations)

    ours = (q.logits, q.means, q.scale_tril)
    info = {
        "torch_threads": torch.get_num_threads(),
        "torch_twin_max_abs_diff": max(
            float(np.max(np.abs(np.asarray(a) - b.numpy())))
            for a, b in zip(ours, call(twin), strict=True)
        ),
    }
    fns = {"torch_eager": lambda: call(twin)}
    try:
        start = time.perf_counter()
        for _ in range(3):
            call(compiled)
        info["torch_compile_warmup_s"] = time.perf_counter() - start
        fns["torch_compile"] = lambda: call(compiled)
    except Exception as e:  # noqa: BLE001 - a broken torch.compile toolchain is reported, not fatal
        info["torch_compile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return fns, info


def latencies(task, prob, repeats: int, trained=None, peers: bool = True) -> dict:
    """Batch latency of the paper's DT-5 architecture (tuned and library defaults), its PyTorch twin (eager,
    compiled), the forward pass's matmul floor and, when given, the trained `(model, params)`: all interleaved
    on the same problems."""
    model, params = paper_dt5(task, prob)
    posterior = lambda m, **kw: dt_training.make_posterior_fn(m, **kw)
    tuned, default = posterior(model, **dtx.cpu_tuning()), posterior(model)
    q = tuned(params, prob.prior, prob.observations)
    fns = {
        "dt5": lambda: jax.block_until_ready(tuned(params, prob.prior, prob.observations)),
        "dt5_library_defaults": lambda: jax.block_until_ready(
            default(params, prob.prior, prob.observations)
        ),
        "dt5_matmul_floor": timing.matmuls_alone(
            forward_matmul_shapes(model, prob.target.shape[0])
        ),
    }
    info = {}
    if trained is not None:
        trained_fn = posterior(trained[0], **dtx.cpu_tuning())
        fns["trained"] = lambda: jax.block_until_ready(
            trained_fn(trained[1], prob.prior, prob.observations)
        )
    if peers:
        torch_fns, info = torch_twin_calls(model, params, prob, q)
        fns |= torch_fns
    rounds = timing.interleaved_rounds(fns, repeats)
    times = timing.summarize(rounds)
    out = {"problems": int(prob.target.shape[0]), "times_s": times, "rounds_s": rounds, **info}
    ours = times["dt5"]
    out["dt5_over_matmul_floor"] = {k: ours[k] / times["dt5_matmul_floor"][k] for k in ours}
    # The targets with 90% bootstrap intervals over the rounds and a verdict on each (`timing.judge`).
    out["intervals"] = {
        "dt5_median_s": timing.judge(lambda t: np.median(t["dt5"]), rounds, at_most=0.05)
    }
    for name in ("torch_eager", "torch_compile"):
        if name in times:
            out[f"speedup_vs_{name}"] = {k: times[name][k] / ours[k] for k in ours}
            out["intervals"][f"speedup_vs_{name}"] = timing.judge(
                lambda t, n=name: np.median(t[n]) / np.median(t["dt5"]), rounds, at_least=1.0
            )
    return out


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


def _latency_rows(lat: dict) -> list[tuple[str, str, str, str]]:
    notes = {
        "dt5": ("< 50 ms; faster than both torch peers", ""),
        "dt5_library_defaults": ("", "no compiler options, one slice"),
        "dt5_matmul_floor": (
            "",
            f"DT-5 is {lat['dt5_over_matmul_floor']['median_s']:.2f}x its floor",
        ),
    }
    iv = lat.get("intervals", {})
    if "dt5_median_s" in iv:
        ci = iv["dt5_median_s"]
        notes["dt5"] = (
            notes["dt5"][0],
            f"median's 90% interval [{1e3 * ci['low']:.1f}, {1e3 * ci['high']:.1f}] ms, "
            f"< 50 ms: {ci['verdict']}",
        )
    for name in ("torch_eager", "torch_compile"):
        if f"speedup_vs_{name}" in lat:
            note = f"DT-5 is {lat[f'speedup_vs_{name}']['median_s']:.2f}x faster"
            if f"speedup_vs_{name}" in iv:
                ci = iv[f"speedup_vs_{name}"]
                note += f" [{ci['low']:.2f}, {ci['high']:.2f}], faster: {ci['verdict']}"
            notes[name] = ("", note)
    rows = []
    for name, t in lat["times_s"].items():
        target, note = notes.get(name, ("", ""))
        batch = f"{name}, batch of {lat.get('problems', 1000)}"
        rows.append(
            (f"{batch} ({note})" if note else batch,
             f"{1e3 * t['min_s']:.1f} ms (median {1e3 * t['median_s']:.1f})", "-", target)
        )  # fmt: skip
    return rows


def _table(result: dict) -> list[tuple[str, str, str, str]]:
    rows = _latency_rows(result["latency"])
    if "trained_model" not in result:
        return rows
    trained = result["trained_model"]
    dt_per_problem = trained["per_problem_s"]
    rows += [
        ("trained DT, expected KL", "", f"{trained['expected_kl']:.5f}", ""),
        ("trained DT, per problem", f"{1e6 * dt_per_problem:.1f} us", "", ""),
    ]
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
    record = timing.machine(allow_loaded=FLAGS.allow_loaded_machine)
    os.makedirs(FLAGS.out, exist_ok=True)
    result = {
        "machine": record,
        "under_load": record["under_load"],
        "num_problems": FLAGS.num_problems,
        "repeats": FLAGS.repeats,
    }
    if FLAGS.latency_only:
        from theorax.configs import distribution_transformer as cfg

        task, _ = dtx.build(cfg.get_config("cpu").tasks.invgamma_wide)
        prob = task.sample(jax.random.key(2024), FLAGS.num_problems)
        result["task"] = "invgamma_wide"
        result["latency"] = latencies(task, prob, FLAGS.repeats, peers=FLAGS.torch)
    else:
        result |= full_benchmark()
    paper = result["latency"]["times_s"]["dt5"]
    result["targets"] = {
        "paper_architecture_batch_latency_under_50ms (median)": paper["median_s"] < 0.05,
    }
    for name in ("torch_eager", "torch_compile"):
        if f"speedup_vs_{name}" in result["latency"]:
            result["targets"][f"faster_than_{name} (median)"] = (
                result["latency"][f"speedup_vs_{name}"]["median_s"] > 1
            )
    if "nuts_over_dt_time_at_equal_kl" in result:
        result["targets"]["ratio_at_least_1000_at_equal_kl"] = all(
            r["time_ratio"] >= 1000 for r in result["nuts_over_dt_time_at_equal_kl"].values()
        )
    lines = [
        f"Distribution Transformer bench ({record['cpu_model']}, {record['cpu_count']} cores, jax "
        f"{record['jax']}; load {record['load_1min']:.2f} at start; {FLAGS.repeats} interleaved rounds)"
    ]
    if record["under_load"]:
        lines.append(
            f"!! TAKEN UNDER LOAD (1-minute load {record['load_1min']:.2f}): these figures are not results"
        )
    lines.append(f"{'':64s} {'time':>26s} {'expected KL':>12s} {'target':>10s}")
    lines += [f"{r[0]:64s} {r[1]:>26s} {r[2]:>12s} {r[3]:>10s}" for r in _table(result)]
    timing.write_results(
        FLAGS.out, "distribution_transformer.json", runtime.jsonable(result), lines
    )


def full_benchmark() -> dict:
    """The latency part with the trained model, then its KL and the NUTS ladder (section 2 of the docstring)."""
    c, task, model, params = trained_model(FLAGS.dt_workdir, FLAGS.out)
    prob = task.sample(jax.random.key(2024), FLAGS.num_problems)
    lat = latencies(task, prob, FLAGS.repeats, trained=(model, params), peers=FLAGS.torch)
    q = dt_training.make_posterior_fn(model, **dtx.cpu_tuning())(
        params, prob.prior, prob.observations
    )
    kl_all = dt_evaluation.monte_carlo_kl(
        task, prob, q.log_prob, jax.random.key(1), FLAGS.kl_samples
    )
    sub = dtx.slice_batch(prob, 0, FLAGS.nuts_problems)
    dt_per_problem = lat["times_s"]["trained"]["min_s"] / FLAGS.num_problems
    kl_dt = expected_kl_per_problem(task, sub, q, FLAGS.kl_samples)
    nuts_runs, at_equal_kl = nuts_ladder(
        task, sub, kl_dt, dt_per_problem, list(map(int, FLAGS.nuts_draws)), FLAGS.kl_samples
    )
    return {
        "task": c.task,
        "latency": lat,
        "trained_model": {
            "model": c.model.to_dict(),
            "train_steps": c.train.num_steps,
            "batch_size": c.train.batch_size,
            "batch_latency": lat["times_s"]["trained"],
            "per_problem_s": dt_per_problem,
            "expected_kl": float(kl_all.mean()),
        },
        "nuts": {"chains": 4, "warmup": 500, "runs": nuts_runs},
        "nuts_over_dt_time_at_equal_kl": at_equal_kl,
        "load_average_at_end": os.getloadavg(),
    }


if __name__ == "__main__":
    _define_flags()
    runtime.tune_process()
    app.run(main)
