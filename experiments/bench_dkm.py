r"""Sparse-DKM training speed against GPyTorch's SVGP and the exact GP's cubic cost, in one process run.

    python -m theorax.experiments.bench_dkm --out=results/bench
    python -m theorax.experiments.bench_dkm --sizes=1000,8000 --dtype=float32 --allow_loaded_machine

Measures, on synthetic 8-feature regression data (interleaved, after a warm-up call each):

* one sparse-DKM training epoch (2 hidden layers, ReLU kernel, M inducing points, minibatches of B, Adam;
  one compiled `lax.scan` over the epoch's minibatches, the data on the device) for every N in `--sizes`: the
  cost should grow linearly in N at fixed M (the target: N = 8,000 at most 10x N = 1,000). An epoch drops its
  last incomplete minibatch (as the official loader), so B = 250 by default: it divides every default N, and
  each epoch then sees all N points (with B = 256, N = 1,000 would train on 768 points in 3 steps and N = 8,000
  on 7,936 in 31: 10.3x the work for 8x the data). The table also gives the time per minibatch step;
* the epoch's floor: the factorisations and matrix products of the same epoch (every layer's M x M
  factorisation, in float64 its inverse, and the (B, M) by (M, M) products, forward and backward; `floor_epoch`)
  timed alone in one scan, without the kernels' elementwise work, the optimiser or the minibatch gather;
* GPyTorch's SVGP epoch with the same M, B, N and dtype (`ApproximateGP` + `VariationalStrategy` with learned
  inducing points, Adam, a Python loop over minibatches as GPyTorch is used): the target is a DKM epoch at least
  as fast;
* the same SVGP in JAX: the sparse DKM with no hidden layer and the squared-exponential kernel (one kernel
  layer where the 2-layer DKM has three), so that the implementations are compared on the same model;
* the exact GP's cost: one evaluation of the exact marginal likelihood and its gradient (an RBF GP: the
  DKM with no hidden layer; and GPyTorch's `ExactGP`, one Adam iteration), for N in `--exact_sizes`, with the
  fitted exponent of N.

Starts with `timing.machine` (refuses a loaded machine unless `--allow_loaded_machine`) and writes
`OUT/dkm.json`. From Python the same is `benchmark(Settings(...))`; `device_workload(tiny)` is the accelerator
check's DKM workload.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.scipy.linalg import solve_triangular
from theorax.experiments import runtime, timing
from theorax.experiments.dkm import blas_threads
from theorax.inference import dkm
from theorax.inference.dkm import linalg
from theorax.inference.dkm import model as dkm_model


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to time; the command line's flags, field for field."""

    sizes: tuple[int, ...] = (1000, 2000, 4000, 8000)
    exact_sizes: tuple[int, ...] = (500, 1000, 2000, 4000)
    dim: int = 8
    num_inducing: int = 100
    batch: int = 250
    depth: int = 2
    dtype: str = "float64"
    repeats: int = 7
    torch: bool = True
    blas_threads: int = (
        1  # numpy/scipy OpenBLAS threads for JAX's triangular solves (0: as they are)
    )
    allow_loaded_machine: bool = False


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as a script."""
    d = Settings()
    flags.DEFINE_string("out", "results/bench", "Directory for dkm.json.")
    flags.DEFINE_list(
        "sizes", [str(s) for s in d.sizes], "Training-set sizes N of the epoch timings."
    )
    flags.DEFINE_list("exact_sizes", [str(s) for s in d.exact_sizes], "N of the exact-GP timings.")
    flags.DEFINE_integer("dim", d.dim, "Input features.")
    flags.DEFINE_integer("num_inducing", d.num_inducing, "Inducing points M.")
    flags.DEFINE_integer("batch", d.batch, "Minibatch size B.")
    flags.DEFINE_integer("depth", d.depth, "Hidden layers.")
    flags.DEFINE_enum("dtype", d.dtype, ["float32", "float64"], "Precision of both sides.")
    flags.DEFINE_integer("repeats", d.repeats, "Timed repeats (min and median reported).")
    flags.DEFINE_bool("torch", d.torch, "Also time GPyTorch.")
    flags.DEFINE_integer(
        "blas_threads", d.blas_threads, "OpenBLAS threads of numpy/scipy (0: as they are)."
    )
    flags.DEFINE_bool(
        "allow_loaded_machine", d.allow_loaded_machine, "Measure even on a busy machine."
    )


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    y = np.sin(x @ rng.normal(size=dim) / np.sqrt(dim)) + 0.1 * rng.normal(size=n)
    return x, (y - y.mean()) / y.std()


def _precision(dtype: str):
    return dkm.precision(dtype)


def dkm_epoch(x, y, *, num_inducing: int, batch: int, depth: int, dtype: str, kernel: str = "relu"):
    """A callable that runs one sparse-DKM training epoch (blocking), its first call compiling."""
    trainer = dkm.make_trainer(
        x, y, depth=depth, nu=1.0, kernel=kernel, num_inducing=num_inducing,
        model=dkm.ModelOptions(dtype=dtype), options=dkm.FitOptions(batch_size=batch, chunk=1, steps=1),
    )  # fmt: skip
    holder = {"state": trainer.init_state}

    def run():
        holder["state"], metrics = trainer.step(holder["state"], 0)
        return jax.block_until_ready(metrics)

    return run


def floor_epoch(n: int, *, num_inducing: int, batch: int, depth: int, dtype: str):
    """The epoch's factorisations and matrix products alone (forward and backward), one scan.

    Per kernel layer (every hidden layer's and the output's, each on its own blocks so that XLA cannot share
    one layer's work with another) what `objectives.conditional` does with a batch, without the kernels'
    elementwise work: in float64 the inverse of the M x M block (`linalg.factorize`, with its derivative), Q =
    `linalg.outer(chol_q)` and the (B, M) products A = K_ti K^-1 and A Q; in float32 the factor, L^-1 K_it and
    the two products after it.
    """
    m, steps = num_inducing, n // batch
    layers = depth + 1  # every hidden layer's kernel and the output's
    dt = jnp.float64 if dtype == "float64" else jnp.float32
    rng = np.random.default_rng(0)
    a = rng.normal(size=(layers, m, 2 * m))
    k = a @ a.transpose(0, 2, 1) / (2 * m) + 0.1 * np.eye(m)  # a distinct block per layer
    k_ii, chol_q = jnp.asarray(k, dt), jnp.asarray(np.linalg.cholesky(k), dt)
    k_ti = jnp.asarray(rng.normal(size=(steps, layers, batch, m)) / m, dt)

    def core(k_ii, k_ti, chol_q):
        total = 0.0
        for layer in range(layers):
            f = linalg.factorize(k_ii[layer], 0.0)
            if f.inv is not None:
                cross = (k_ti[layer] @ f.inv) @ linalg.outer(chol_q[layer])
            else:
                half = solve_triangular(f.chol, k_ti[layer].T, lower=True)
                white_q = solve_triangular(f.chol, chol_q[layer], lower=True)
                cross = (white_q.T @ half).T @ chol_q[layer].T
            total = total + jnp.sum(cross**2) + f.logdet
        return total

    @jax.jit
    def epoch(k_ii, k_ti, chol_q):
        def one(carry, kt):
            g = jax.grad(core, (0, 1, 2))(k_ii, kt, chol_q)
            return carry + sum(jnp.sum(x[..., 0, 0]) for x in g), None

        return jax.lax.scan(one, jnp.zeros((), dt), k_ti)[0]

    return lambda: epoch(k_ii, k_ti, chol_q).block_until_ready()


def svgp_epoch(x, y, *, num_inducing: int, batch: int, dtype: str):
    """A callable that runs one GPyTorch SVGP training epoch with the same M, B and dtype."""
    import torch
    from theorax.experiments import gpytorch_baselines as gpb

    tdt = torch.float64 if dtype == "float64" else torch.float32
    xt, yt = torch.as_tensor(x, dtype=tdt), torch.as_tensor(y, dtype=tdt)
    fitted = gpb.make_svgp(xt, x[:num_inducing], dtype=tdt)
    fitted.model.train()
    fitted.likelihood.train()
    params = list(fitted.model.parameters()) + list(fitted.likelihood.parameters())
    opt = torch.optim.Adam(params, lr=0.01)
    gen = torch.Generator().manual_seed(0)
    return lambda: gpb.svgp_epoch(fitted, xt, yt, batch_size=batch, optimizer=opt, generator=gen)


def exact_gp_evaluation(x, y, dtype: str):
    """A callable: one exact marginal likelihood and gradient of an RBF GP (the DKM with no hidden layer)."""
    spec, xj, yj = dkm_model.make_spec(
        x, y, depth=0, nu=(), kernel="sqexp", likelihood="gaussian", num_inducing=None,
        options=dkm.ModelOptions(dtype=dtype),
    )  # fmt: skip
    params = dkm_model.init_params(spec, xj, yj, jax.random.key(0))
    # The data are arguments, not constants that XLA would fold (the input Gram) while compiling.
    grad = jax.jit(jax.value_and_grad(lambda p, x, y: dkm_model.full_objective(spec, p, x, y)[0]))
    return lambda: jax.block_until_ready(grad(params, xj, yj))


def gpytorch_exact_iteration(x, y, dtype: str):
    """A callable: one Adam iteration of GPyTorch's ExactGP on its exact marginal likelihood (Cholesky)."""
    import gpytorch
    import torch
    from theorax.experiments import gpytorch_baselines as gpb

    tdt = torch.float64 if dtype == "float64" else torch.float32
    xt, yt = torch.as_tensor(x, dtype=tdt), torch.as_tensor(y, dtype=tdt)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(tdt)
    model = gpb.ExactRBF(xt, yt, likelihood).to(tdt)
    model.train()
    likelihood.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)

    def run():
        with gpytorch.settings.max_cholesky_size(len(yt) + 1):
            opt.zero_grad()
            loss = -mll(model(xt), yt)
            loss.backward()
            opt.step()

    return run


def _slope(ns, ts) -> float:
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def benchmark(settings: Settings, record: dict | None = None) -> dict:
    """Times everything the module docstring lists; returns what `dkm.json` holds."""
    s = settings
    result: dict = {
        "settings": dataclasses.asdict(s),
        "machine": record
        if record is not None
        else timing.machine(allow_loaded=s.allow_loaded_machine),
        "backend": jax.default_backend(),
        "epochs": {},
        "exact": {},
    }
    with _precision(s.dtype), blas_threads(s.blas_threads):
        for n in s.sizes:
            x, y = synthetic(n, s.dim)
            fns = {
                "dkm": dkm_epoch(x, y, num_inducing=s.num_inducing, batch=s.batch, depth=s.depth, dtype=s.dtype),
                "floor": floor_epoch(n, num_inducing=s.num_inducing, batch=s.batch, depth=s.depth, dtype=s.dtype),
                "jax_svgp": dkm_epoch(x, y, num_inducing=s.num_inducing, batch=s.batch, depth=0, dtype=s.dtype, kernel="sqexp"),
            }  # fmt: skip
            if s.torch:
                fns["gpytorch_svgp"] = svgp_epoch(
                    x, y, num_inducing=s.num_inducing, batch=s.batch, dtype=s.dtype
                )
            start = time.perf_counter()
            fns["dkm"]()
            compile_s = time.perf_counter() - start
            row = timing.interleaved(fns, s.repeats)
            row["dkm_first_call_s"] = compile_s
            row["steps_per_epoch"] = n // s.batch
            result["epochs"][str(n)] = row
    # Outside the run-time limit: the exact GPs' large factorisations get the OpenBLAS threads the process started
    # with (`runtime.tune_process` starts it with one; the JSON records OPENBLAS_NUM_THREADS).
    with _precision(s.dtype):
        for n in s.exact_sizes:
            x, y = synthetic(n, s.dim)
            fns = {"jax_exact": exact_gp_evaluation(x, y, s.dtype)}
            if s.torch:
                fns["gpytorch_exact"] = gpytorch_exact_iteration(x, y, s.dtype)
            result["exact"][str(n)] = timing.interleaved(fns, max(2, s.repeats // 2))
    epochs = result["epochs"]
    ns = [int(n) for n in epochs]
    dkm_t = [epochs[str(n)]["dkm"]["min_s"] for n in ns]
    result["dkm_epoch_slope_in_n"] = _slope(ns, dkm_t) if len(ns) > 1 else None
    if len(ns) > 1:
        result["dkm_epoch_ratio_largest_to_smallest"] = dkm_t[-1] / dkm_t[0]
        result["size_ratio"] = ns[-1] / ns[0]
    result["dkm_over_floor"] = {
        str(n): epochs[str(n)]["dkm"]["min_s"] / epochs[str(n)]["floor"]["min_s"] for n in ns
    }
    result["jax_svgp_over_dkm"] = {
        str(n): epochs[str(n)]["jax_svgp"]["min_s"] / epochs[str(n)]["dkm"]["min_s"] for n in ns
    }
    if s.torch:
        result["gpytorch_svgp_over_jax_svgp"] = {
            str(n): epochs[str(n)]["gpytorch_svgp"]["min_s"] / epochs[str(n)]["jax_svgp"]["min_s"]
            for n in ns
        }
        result["svgp_over_dkm"] = {
            str(n): epochs[str(n)]["gpytorch_svgp"]["min_s"] / epochs[str(n)]["dkm"]["min_s"]
            for n in ns
        }
    exact_ns = [int(n) for n in result["exact"]]
    if len(exact_ns) > 1:
        for peer in ("jax_exact", "gpytorch_exact"):
            if peer in result["exact"][str(exact_ns[0])]:
                ts = [result["exact"][str(n)][peer]["min_s"] for n in exact_ns]
                result[f"{peer}_slope_in_n"] = _slope(exact_ns, ts)
    return result


def device_workload(tiny: bool) -> dict:
    """The accelerator check's DKM workload: sparse-DKM training epochs at accelerator scale (float32).

    Not tiny: N = 200,000 points of 16 features, M = 1,024 inducing points, batches of 4,096, 2 hidden layers;
    tiny: N = 2,048, M = 64, batches of 256. Returns, in the device check's row fields, the first call's
    seconds (`compile_s`, compilation included), the min / median of 3 further epochs (`seconds`, `median_s`),
    points per second, the sizes and the device.
    """
    n, dim, m, b = (2048, 8, 64, 256) if tiny else (200_000, 16, 1024, 4096)
    x, y = synthetic(n, dim)
    with blas_threads(1 if jax.default_backend() == "cpu" else 0):
        run = dkm_epoch(x, y, num_inducing=m, batch=b, depth=2, dtype="float32")
        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        times = timing.time_calls(run, 3)
    return {
        "workload": "sparse DKM training epoch (2 hidden layers, ReLU, Adam)",
        "n": n, "dim": dim, "num_inducing": m, "batch": b, "steps_per_epoch": n // b,
        "compile_s": first, "seconds": times["min_s"], "median_s": times["median_s"],
        "rate": n / times["min_s"], "unit": "points/s",
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
    }  # fmt: skip


def table(result: dict, s: Settings, record: dict) -> list[str]:
    """The printed report: the epoch time per N beside the SVGP's and the floor, then the exact GPs."""
    load = " (UNDER LOAD: not a result)" if record["under_load"] else ""
    lines = [
        f"sparse DKM epoch, M={s.num_inducing}, B={s.batch}, {s.depth} layers, {s.dtype}{load}:",
        f"{'N':>7} {'steps':>6} {'DKM min/median ms':>20} {'ms/step':>8} {'floor ms':>10} "
        f"{'SVGP min/median ms':>20} {'SVGP/DKM':>9} {'JAX SVGP ms':>12} {'GPyTorch/JAX SVGP':>18}",
    ]
    for n, row in result["epochs"].items():
        sv = row.get("gpytorch_svgp")
        svs = f"{sv['min_s'] * 1e3:8.1f}/{sv['median_s'] * 1e3:8.1f}" if sv else "-"
        ratio = f"{sv['min_s'] / row['dkm']['min_s']:.2f}x" if sv else "-"
        peer = f"{sv['min_s'] / row['jax_svgp']['min_s']:.2f}x" if sv else "-"
        per_step = row["dkm"]["min_s"] * 1e3 / max(row["steps_per_epoch"], 1)
        lines.append(f"{n:>7} {row['steps_per_epoch']:>6} {row['dkm']['min_s'] * 1e3:9.1f}/{row['dkm']['median_s'] * 1e3:8.1f} "
                     f"{per_step:8.2f} {row['floor']['min_s'] * 1e3:10.1f} {svs:>20} {ratio:>9} "
                     f"{row['jax_svgp']['min_s'] * 1e3:12.1f} {peer:>18}")  # fmt: skip
    if result.get("dkm_epoch_ratio_largest_to_smallest"):
        lines.append(f"DKM epoch at N={s.sizes[-1]} / N={s.sizes[0]}: {result['dkm_epoch_ratio_largest_to_smallest']:.2f}x "
                     f"(N ratio {result['size_ratio']:.0f}x; target <= 10x); slope in N {result['dkm_epoch_slope_in_n']:.2f}")  # fmt: skip
    for n, row in result["exact"].items():
        cells = ", ".join(f"{k} {v['min_s'] * 1e3:.1f} ms" for k, v in row.items())
        lines.append(f"exact GP, N={n}: {cells}")
    for peer in ("jax_exact", "gpytorch_exact"):
        if f"{peer}_slope_in_n" in result:
            lines.append(f"{peer}: cost ~ N^{result[f'{peer}_slope_in_n']:.2f}")
    return lines


def main(argv):
    del argv
    record = timing.machine(allow_loaded=FLAGS.allow_loaded_machine)
    settings = Settings(
        sizes=tuple(int(v) for v in FLAGS.sizes), exact_sizes=tuple(int(v) for v in FLAGS.exact_sizes),
        dim=FLAGS.dim, num_inducing=FLAGS.num_inducing, batch=FLAGS.batch, depth=FLAGS.depth,
        dtype=FLAGS.dtype, repeats=FLAGS.repeats, torch=FLAGS.torch, blas_threads=FLAGS.blas_threads,
        allow_loaded_machine=FLAGS.allow_loaded_machine,
    )  # fmt: skip
    result = benchmark(settings, record)
    timing.write_results(FLAGS.out, "dkm.json", result, table(result, settings, record))


if __name__ == "__main__":
    runtime.tune_process()
    define_flags()
    app.run(main)
