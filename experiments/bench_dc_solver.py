r"""Sampling speed of our DC-Solver / UniPC beside diffusers' scheduler loop, each against its own model's cost.

    python -m theorax.experiments.bench_dc_solver --out=results/bench
    python -m theorax.experiments.bench_dc_solver --points=1000 --nfe=10 --cfg=7.5

It first records the machine (`timing.machine`: load, CPU, cores, versions) and refuses to run when the 1-minute
load is above 0.5, unless `--allow_loaded_machine` (then every figure is marked as taken under load). Float32 on
the CPU (both sides), on the analytic class-conditional Gaussian mixture of the `cpu` preset (64 dimensions, 10
classes x 3 components), classifier-free guidance 7.5 (two model evaluations per step). Timed interleaved after
warm-up (min and median over `--repeats` rounds; each timed call is the first after a 0.3 s pause, or with
`--settle=1` comes right after one untimed call of the same program, as when sampling batch after batch):

* `ours_unipc`, `ours_dc`: NFE-10 sampling of `--points` points with `sample(solver="unipc")` and
  `sample(solver="dc")` (the whole call: host-side checks, the program, the non-finite flag read back);
* `ours_model_alone`: the sampler's model evaluations alone (the guided evaluations at the sampler's times,
  2 x NFE calls of the model, one after another) in one jit: the floor of any sampler of this model;
* `diffusers_unipc`: diffusers' `UniPCMultistepScheduler` (order 3, bh1, linspace timesteps, final sigma =
  sigma_min) stepped in a Python loop with the same model written in PyTorch
  (`third_party.dc_solver.TorchMixtureEps`); the outputs of the two are compared;
* `diffusers_model_alone`: that loop's model evaluations alone (the same calls, in the same Python loop).

A sampler's own cost is its time minus its model's (`*_own_s`, from medians and from minima); the targets are
ours at most 25% of the model time and at least 10x below diffusers' own cost, each also judged on a 90%
bootstrap interval over the rounds (`own_cost_intervals`); the end-to-end ratio is reported beside them. Then scaling: our DC-Solver's time and memory (`memory_analysis()` of the compiled program) at
1,000, 10,000 and 100,000 points (`--scaling_points`), and the NFE-10 ratio search on 10 datapoints, cold (with
compilation) and warm. Writes `OUT/dc_solver.json` and prints a table.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from theorax.configs import dc_solver as dc_config
from theorax.experiments import runtime, timing
from theorax.experiments.dc_solver import make_mixture
from theorax.inference import dc_solver as dcs
from theorax.inference.dc_solver import solvers
from theorax.models import diffusion

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags, defined only when this module runs as a script (importing it defines none,
    so that it imports beside any other experiment module)."""
    flags.DEFINE_string("out", "results/bench", "Directory for dc_solver.json.")
    flags.DEFINE_integer("points", 1000, "Number of samples.", lower_bound=1)
    flags.DEFINE_integer("nfe", 10, "Number of steps (at least the order, 3).", lower_bound=3)
    flags.DEFINE_float("cfg", 7.5, "Guidance scale.")
    flags.DEFINE_integer(
        "repeats", 30, "Interleaved rounds; min and median over them.", lower_bound=1
    )
    flags.DEFINE_integer(
        "settle",
        0,
        "Untimed calls of the same program right before each timed one, after the pause (0: time the first "
        "call after it; 1: a sampler called back to back, batch after batch).",
        lower_bound=0,
    )
    flags.DEFINE_bool("torch", True, "Also time diffusers' scheduler loop.")
    flags.DEFINE_list(
        "scaling_points", ["1000", "10000", "100000"], "Batch sizes of the scaling measurement."
    )
    flags.DEFINE_bool(
        "allow_loaded_machine",
        False,
        "Measure even on a busy machine (every figure is then marked as taken under load).",
    )


def model_alone(eps_fn, x, schedule, config: dcs.SolverConfig, nfe: int, guidance):
    """A call that runs the guided model evaluations of the sampler `config` (at its times, NFE of them:
    the initial one and one per step but the last) one after another in one jit, nothing else."""
    plan = solvers.make_plan(config, schedule, config.time_steps(schedule, nfe))
    ts = jnp.asarray(plan.ts[:-1], x.dtype)
    scale = jnp.asarray(guidance.scale, x.dtype)

    @jax.jit
    def evaluations(eps_fn, x, ts, labels, scale):
        g = dcs.Guidance(labels, scale)
        for i in range(nfe):
            x = solvers.model_eps(eps_fn, x, ts[i], g)
        return x

    eps_fn = (
        jax.tree_util.Partial(eps_fn) if not isinstance(eps_fn, jax.tree_util.Partial) else eps_fn
    )
    return lambda: evaluations(eps_fn, x, ts, guidance.labels, scale).block_until_ready()


def diffusers_calls(mixture, schedule, x_np, y_np, nfe: int, cfg: float):
    """diffusers' UniPC loop with the PyTorch twin of the mixture, and the same loop's model calls alone."""
    import torch
    from diffusers import UniPCMultistepScheduler
    from theorax.third_party.dc_solver import TorchMixtureEps

    twin = TorchMixtureEps(mixture, schedule, dtype=torch.float32)
    scheduler = UniPCMultistepScheduler(
        trained_betas=diffusion.sd_scaled_linear_betas(),
        solver_order=3,
        solver_type="bh1",
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
    )
    labels = torch.from_numpy(y_np)

    def loop():
        scheduler.set_timesteps(nfe)
        xt = torch.from_numpy(x_np)
        with torch.no_grad():
            for t in scheduler.timesteps:
                xt = scheduler.step(twin.guided(xt, t, labels, cfg), t, xt).prev_sample
        return xt

    scheduler.set_timesteps(nfe)
    timesteps = list(scheduler.timesteps)

    def model():
        xt = torch.from_numpy(x_np)
        with torch.no_grad():
            for t in timesteps:
                xt = twin.guided(xt, t, labels, cfg)
        return xt

    return loop, model, torch.get_num_threads()


def scaling(eps_fn, schedule, mixture, points, nfe: int, cfg: float, ratios, repeats: int) -> dict:
    """Our DC-Solver at several batch sizes: seconds (min, median) and the compiled program's memory."""
    out = {}
    for n in points:
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.normal(size=(n, mixture.dim)).astype(np.float32))
        y = jnp.asarray(rng.integers(0, mixture.num_classes, size=n))
        kw = dict(
            nfe=nfe,
            solver="dc",
            order=3,
            variant="bh1",
            spacing="linspace",
            ratios=ratios,
            guidance=dcs.Guidance(y, cfg),
        )
        lower = getattr(dcs, "lower_sample", None)  # absent before issue 12 (its "before" figures)
        memory = lower(eps_fn, x, schedule, **kw).compile().memory_analysis() if lower else None
        t = timing.time_calls(
            lambda x=x, kw=kw: dcs.sample(eps_fn, x, schedule, **kw).block_until_ready(),
            max(3, repeats // 5),
        )
        fields = ("argument", "output", "temp", "alias", "generated_code")
        mem = {
            f"{k}_bytes": int(getattr(memory, f"{k}_size_in_bytes")) if memory else None
            for k in fields
        }
        out[str(n)] = {
            **t,
            **mem,
            "seconds_per_point": t["median_s"] / n,
            "temp_bytes_per_point": mem["temp_bytes"] / n if memory else None,
        }
    return out


def own_cost_intervals(rounds) -> dict:
    """The own-cost figures of the targets (from medians) with 90% bootstrap intervals over the rounds
    (`timing.bootstrap`) and each target's verdict on its interval: a difference of two medians of programs
    of a few milliseconds moves by ~10 points of the model time from run to run on a 2-core VM."""
    median = lambda t, k: np.median(t[k])
    own = lambda t, name, model: median(t, name) - median(t, model)
    out = {}
    for name in ("ours_unipc", "ours_dc"):
        out[f"{name}_own_over_model"] = timing.judge(
            lambda t, n=name: own(t, n, "ours_model_alone") / median(t, "ours_model_alone"),
            rounds,
            at_most=0.25,
        )
        if "diffusers_unipc" not in rounds:
            continue
        # Ours over theirs (no division by an own cost near zero), reported inverted: 1 / x keeps the order
        # of positive numbers, so the interval's ends invert with it.
        ci = timing.bootstrap(
            lambda t, n=name: (
                own(t, n, "ours_model_alone") / own(t, "diffusers_unipc", "diffusers_model_alone")
            ),
            rounds,
        )
        inverted = {
            "estimate": 1 / ci["estimate"] if ci["estimate"] > 0 else np.inf,
            "low": 1 / ci["high"] if ci["high"] > 0 else np.inf,
            "high": 1 / ci["low"] if ci["low"] > 0 else np.inf,
            "level": ci["level"],
        }
        out[f"{name}_own_cost_ratio_vs_diffusers"] = inverted | {
            "verdict": timing.verdict(ci, at_most=0.1)
        }
    return out


def main(argv):
    del argv
    record = timing.machine(allow_loaded=FLAGS.allow_loaded_machine)
    config = dc_config.get_config("cpu")
    mixture = make_mixture(config)
    schedule = diffusion.VPSchedule.named("sd_scaled_linear")
    eps_fn = mixture.eps_fn(schedule)
    nfe, n, dim = FLAGS.nfe, FLAGS.points, mixture.dim
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(n, dim)).astype(np.float32)
    y_np = rng.integers(0, mixture.num_classes, size=n)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    guidance = dcs.Guidance(y, FLAGS.cfg)
    solver = dcs.SolverConfig("unipc", order=3, variant="bh1", spacing="linspace")
    ratios = np.array([1.0, 1.0] + [0.9, 1.1] * ((nfe - 2) // 2) + [1.0] * ((nfe - 2) % 2))

    def ours_unipc():
        return dcs.sample(eps_fn, x, schedule, nfe=nfe, solver=solver, guidance=guidance)

    dc_solver = dcs.SolverConfig("dc", order=3, variant="bh1", spacing="linspace")

    def ours_dc():
        return dcs.sample(
            eps_fn, x, schedule, nfe=nfe, solver=dc_solver, ratios=ratios, guidance=guidance
        )

    fns = {
        "ours_unipc": lambda: ours_unipc().block_until_ready(),
        "ours_dc": lambda: ours_dc().block_until_ready(),
        "ours_model_alone": model_alone(eps_fn, x, schedule, solver, nfe, guidance),
    }
    results = {
        "machine": record,
        "under_load": record["under_load"],
        "device": jax.devices()[0].device_kind,
        "points": n,
        "dim": dim,
        "nfe": nfe,
        "cfg": FLAGS.cfg,
        "repeats": FLAGS.repeats,
        "settle": FLAGS.settle,
        "model_evaluations": 2 * nfe,
    }
    if FLAGS.torch:
        loop, model, threads = diffusers_calls(mixture, schedule, x_np, y_np, nfe, FLAGS.cfg)
        fns["diffusers_unipc"], fns["diffusers_model_alone"] = loop, model
        results["torch_threads"] = threads
        theirs, ours = loop().numpy(), np.asarray(ours_unipc())
        results["max_abs_diff_vs_diffusers"] = float(np.max(np.abs(ours - theirs)))
        results["rel_diff_vs_diffusers"] = float(
            np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        )
    rounds = timing.interleaved_rounds(fns, FLAGS.repeats, FLAGS.settle)
    times = timing.summarize(rounds)
    results["times_s"] = times
    results["rounds_s"] = rounds
    model_t = times["ours_model_alone"]
    own = {}
    for name in ("ours_unipc", "ours_dc"):
        own[name] = {k: times[name][k] - model_t[k] for k in model_t}
        results[f"{name}_own_over_model"] = {k: own[name][k] / model_t[k] for k in model_t}
    if FLAGS.torch:
        theirs_model = times["diffusers_model_alone"]
        own["diffusers_unipc"] = {
            k: times["diffusers_unipc"][k] - theirs_model[k] for k in theirs_model
        }
        for name in ("ours_unipc", "ours_dc"):
            results[f"{name}_own_cost_ratio_vs_diffusers"] = {
                k: own["diffusers_unipc"][k] / own[name][k] for k in model_t
            }
            results[f"{name}_end_to_end_speedup_vs_diffusers"] = {
                k: times["diffusers_unipc"][k] / times[name][k] for k in model_t
            }
    results["own_cost_s"] = own
    results["targets"] = {
        "own_cost_at_most_25%_of_model (median, DC)": results["ours_dc_own_over_model"]["median_s"]
        <= 0.25,
    }
    if FLAGS.torch:
        results["targets"]["own_cost_10x_below_diffusers (median, DC)"] = (
            results["ours_dc_own_cost_ratio_vs_diffusers"]["median_s"] >= 10
        )
    results["intervals"] = own_cost_intervals(rounds)

    points = [int(p) for p in FLAGS.scaling_points]
    results["scaling_dc"] = scaling(
        eps_fn, schedule, mixture, points, nfe, FLAGS.cfg, ratios, FLAGS.repeats
    )

    # Ratio search, NFE 10, 10 datapoints: cold (first call compiles the DDIM ground truth and the search) and
    # warm (new datapoints, same shapes).
    xs, ys = jax.random.normal(jax.random.key(1), (10, dim)), jnp.arange(10) % mixture.num_classes
    start = time.perf_counter()
    dcs.search_ratios(eps_fn, xs, schedule, nfe=nfe, guidance=dcs.Guidance(ys, FLAGS.cfg))
    results["search_cold_s"] = time.perf_counter() - start
    xs2 = jax.random.normal(jax.random.key(2), (10, dim))
    results["search_warm_s"] = timing.time_calls(
        lambda: dcs.search_ratios(
            eps_fn, xs2, schedule, nfe=nfe, guidance=dcs.Guidance(ys, FLAGS.cfg)
        ),
        5,
    )

    timing.write_results(FLAGS.out, "dc_solver.json", results, table(results))


def table(r: dict) -> list[str]:
    """The printed report: every program's min and median, the own costs and the targets."""
    t = r["times_s"]
    lines = [
        f"NFE-{r['nfe']} sampling of {r['points']} x {r['dim']}, CFG {r['cfg']} "
        f"({r['model_evaluations']} model evaluations), {r['repeats']} interleaved rounds, each timed call "
        f"after {r.get('settle', 0)} untimed:"
    ]
    if r["under_load"]:
        lines.append(
            f"  !! TAKEN UNDER LOAD (1-minute load {r['machine']['load_1min']:.2f} > "
            f"{r['machine']['load_limit']}): these figures are not results"
        )
    lines.append(f"  {'program':24s} {'min ms':>9s} {'median ms':>10s}  own cost (median) / note")
    for name, v in t.items():
        note = ""
        if name in r["own_cost_s"]:
            own = r["own_cost_s"][name]["median_s"]
            note = f"{1e3 * own:.2f} ms"
            if name.startswith("ours"):
                note += f" = {100 * r[f'{name}_own_over_model']['median_s']:.0f}% of the model (target <= 25%)"
                if f"{name}_own_cost_ratio_vs_diffusers" in r:
                    note += (
                        f"; {r[f'{name}_own_cost_ratio_vs_diffusers']['median_s']:.1f}x below "
                        "diffusers' own cost (target >= 10x), end to end "
                        f"{r[f'{name}_end_to_end_speedup_vs_diffusers']['median_s']:.1f}x"
                    )
        elif name.endswith("model_alone"):
            note = "the model evaluations alone"
        lines.append(f"  {name:24s} {1e3 * v['min_s']:9.3f} {1e3 * v['median_s']:10.3f}  {note}")
    if "intervals" in r:
        level = 100 * next(iter(r["intervals"].values()))["level"]
        lines.append(f"  the targets with {level:.0f}% bootstrap intervals over the rounds:")
        for name in ("ours_unipc", "ours_dc"):
            share = r["intervals"][f"{name}_own_over_model"]
            pct = lambda k, share=share: f"{100 * share[k]:.0f}%"
            line = (
                f"    {name:22s} own cost {pct('estimate')} [{pct('low')}, {pct('high')}] of the model "
                f"(<= 25%: {share['verdict']})"
            )
            if f"{name}_own_cost_ratio_vs_diffusers" in r["intervals"]:
                ratio = r["intervals"][f"{name}_own_cost_ratio_vs_diffusers"]
                line += (
                    f"; {ratio['estimate']:.1f}x [{ratio['low']:.1f}x, {ratio['high']:.1f}x] below "
                    f"diffusers' (>= 10x: {ratio['verdict']})"
                )
            lines.append(line)
    if "max_abs_diff_vs_diffusers" in r:
        lines.append(
            f"  our UniPC vs diffusers: max |diff| {r['max_abs_diff_vs_diffusers']:.2e} (float32)"
        )
    lines.append("  our DC-Solver by batch size (time, compiled memory):")
    for n, s in r["scaling_dc"].items():
        memory = (
            f"temp {s['temp_bytes'] / 2**20:7.1f} MiB ({s['temp_bytes_per_point']:.0f} B per point), "
            f"arguments {s['argument_bytes'] / 2**20:.1f} MiB"
            if s["temp_bytes"] is not None
            else "memory n/a (no lower_sample in this version)"
        )
        lines.append(
            f"    {int(n):>7,d} points {1e3 * s['median_s']:9.2f} ms ({1e9 * s['seconds_per_point']:.0f} ns "
            f"per point), {memory}"
        )
    lines.append(
        f"  ratio search NFE {r['nfe']}: cold (with compile) {r['search_cold_s']:.2f} s "
        f"(target < 30 s), warm {1e3 * r['search_warm_s']['median_s']:.1f} ms"
    )
    return lines


if __name__ == "__main__":
    runtime.tune_process()
    _define_flags()
    app.run(main)
