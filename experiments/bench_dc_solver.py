r"""Sampling and ratio-search speed of our DC-Solver / UniPC beside diffusers' scheduler loop, in one process run.

    python -m theorax.experiments.bench_dc_solver --out=results/bench
    python -m theorax.experiments.bench_dc_solver --points=1000 --nfe=10 --cfg=7.5

Measures, float32 on the CPU (both sides), on the analytic class-conditional Gaussian mixture of the `cpu`
preset (64 dimensions, 10 classes x 3 components), classifier-free guidance 7.5 (two model evaluations per step):

* NFE-10 sampling of `--points` points: our `sample(solver="unipc")` and `sample(solver="dc")` (one jit each,
  timed after compilation, including the host-side checks and the non-finite flag read back), against
  diffusers' `UniPCMultistepScheduler` (same order 3, bh1, linspace timesteps, final sigma = sigma_min) stepped
  in a Python loop with the same model written in PyTorch (`third_party.dc_solver.TorchMixtureEps`). The two
  outputs are compared (they solve the same ODE with the same algorithm).
* The NFE-10 ratio search on 10 datapoints (40 AdamW iterations per step, 200-step DDIM ground truth): cold (a
  fresh compile, as a user's first call) and warm.

Writes `OUT/dc_solver.json` and prints a table.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from theorax.configs import dc_solver as dc_config
from theorax.experiments import runtime, timing
from theorax.experiments.dc_solver import make_mixture
from theorax.inference import dc_solver as dcs
from theorax.models import diffusion

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The command line's flags, defined only when this module runs as a script (importing it defines none,
    so that it imports beside any other experiment module)."""
    flags.DEFINE_string("out", "results/bench", "Directory for dc_solver.json.")
    flags.DEFINE_integer("points", 1000, "Number of samples.", lower_bound=1)
    flags.DEFINE_integer("nfe", 10, "Number of steps (at least the order, 3).", lower_bound=3)
    flags.DEFINE_float("cfg", 7.5, "Guidance scale.")
    flags.DEFINE_integer("repeats", 15, "Timed repeats; the median is reported.", lower_bound=1)
    flags.DEFINE_bool("torch", True, "Also time diffusers' scheduler loop.")


def main(argv):
    del argv
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
    kw = dict(nfe=nfe, order=3, variant="bh1", spacing="linspace", guidance=guidance)
    ratios = np.array([1.0, 1.0] + [0.9, 1.1] * ((nfe - 2) // 2) + [1.0] * ((nfe - 2) % 2))

    def ours_unipc():
        return dcs.sample(eps_fn, x, schedule, solver="unipc", **kw).block_until_ready()

    def ours_dc():
        return dcs.sample(eps_fn, x, schedule, solver="dc", ratios=ratios, **kw).block_until_ready()

    fns = {"ours_unipc_s": ours_unipc, "ours_dc_s": ours_dc}
    results = {
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "points": n,
        "dim": dim,
        "nfe": nfe,
        "cfg": FLAGS.cfg,
    }
    if FLAGS.torch:
        import torch
        from diffusers import UniPCMultistepScheduler
        from theorax.third_party.dc_solver import TorchMixtureEps

        twin = TorchMixtureEps(mixture, schedule, dtype=torch.float32)
        betas = diffusion.sd_scaled_linear_betas()
        scheduler = UniPCMultistepScheduler(
            trained_betas=betas,
            solver_order=3,
            solver_type="bh1",
            final_sigmas_type="sigma_min",
            timestep_spacing="linspace",
        )
        labels = torch.from_numpy(y_np)

        def diffusers_loop():
            scheduler.set_timesteps(nfe)
            xt = torch.from_numpy(x_np)
            with torch.no_grad():
                for t in scheduler.timesteps:
                    xt = scheduler.step(twin.guided(xt, t, labels, FLAGS.cfg), t, xt).prev_sample
            return xt

        fns["diffusers_unipc_s"] = diffusers_loop
        results["torch_threads"] = torch.get_num_threads()
        theirs = diffusers_loop().numpy()
        ours = np.asarray(ours_unipc())
        results["max_abs_diff_vs_diffusers"] = float(np.max(np.abs(ours - theirs)))
        results["rel_diff_vs_diffusers"] = float(
            np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
        )
    for name, t in timing.interleaved(fns, FLAGS.repeats).items():
        results[name], results[name.replace("_s", "_min_s")] = t["median_s"], t["min_s"]
    if FLAGS.torch:
        results["speedup_unipc"] = results["diffusers_unipc_s"] / results["ours_unipc_s"]
        results["speedup_dc"] = results["diffusers_unipc_s"] / results["ours_dc_s"]

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
        FLAGS.repeats,
    )["median_s"]

    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "dc_solver.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    rows = [
        (f"our UniPC, NFE {nfe}, {n} x {dim}", results["ours_unipc_s"], ""),
        ("our DC-Solver, same", results["ours_dc_s"], ""),
    ]
    if "diffusers_unipc_s" in results:
        rows.append(("diffusers UniPCMultistepScheduler loop", results["diffusers_unipc_s"], ""))
        rows[0] = (*rows[0][:2], f"{results['speedup_unipc']:.1f}x faster (target >= 10x)")
        rows[1] = (*rows[1][:2], f"{results['speedup_dc']:.1f}x faster")
    rows.append(
        (
            f"ratio search NFE {nfe}, cold (with compile)",
            results["search_cold_s"],
            "target < 30 s",
        )
    )
    rows.append((f"ratio search NFE {nfe}, warm", results["search_warm_s"], ""))
    print(f"\n{'what':<48} {'seconds':>10}  note")
    for name, sec, note in rows:
        print(f"{name:<48} {sec:>10.4f}  {note}")
    if "max_abs_diff_vs_diffusers" in results:
        print(
            f"our UniPC vs diffusers: max |diff| {results['max_abs_diff_vs_diffusers']:.2e} (float32)"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    runtime.use_huge_pages()
    _define_flags()
    app.run(main)
