r"""The LIB of the MNIST-size MLP (784-100-100-10) over 10,000 examples, beside two peers, in one process run.

    python -m theorax.experiments.bench_interaction_basis --out=results/bench
    python -m theorax.experiments.bench_interaction_basis --n=2000 --allow_loaded_machine

Times, float64 on the CPU, the whole basis (Grams, Jacobian Grams from the output backwards, eigendecompositions,
C and C+ of every layer):

* ours: `theorax.inference.interaction_basis.interaction_basis(..., basis="lib")`: compiled, donated batch steps;
  the MLP's sections are declared `linear_then` (x @ [[W, 0], [b, 1]] then ReLU), so each Jacobian Gram is
  accumulated at the layer's output width from vmapped VJPs along the next layer's basis directions and mapped
  back, M' = W K W^T, without per-example Jacobians with respect to the 785 inputs;
* (a) a straightforward per-example-Jacobian JAX implementation: `vmap(jacrev(section))` of the full section,
  projected on the next basis, and each example's J^T J summed;
* (b) the same accumulation in PyTorch with `torch.func` (vmap of jacrev, as rib does it), float64.

All three share the eigendecompositions (numpy, float64), so the comparison is the accumulation. Two floors are
timed: the input Gram as one float64 GEMM per batch (any basis reads the data once at its width) and the
generic route's layer-0 J^T J (what every per-example-Jacobian implementation must at least do). The network's weights
are a seeded random initialisation (timings do not depend on training); the inputs are MNIST's first `--n`
training images with `--data_dir`, else uniform noise with MNIST's always-zero border (67 pixels) so the input
Gram is rank deficient as on MNIST. Writes `OUT/interaction_basis.json` (with `timing.machine`'s record).

`device_workload(tiny)` is the same LIB on whatever accelerator JAX sees (experiments/device_check.py).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from theorax.experiments import runtime, timing
from theorax.inference.interaction_basis import basis as basis_lib
from theorax.inference.interaction_basis import interaction_basis
from theorax.models import interaction_basis as models

FLAGS = flags.FLAGS
SIZES = (784, 100, 100, 10)


def _define_flags() -> None:
    """The command line's flags, defined only when this module runs as a script."""
    flags.DEFINE_string("out", "results/bench", "Directory for interaction_basis.json.")
    flags.DEFINE_integer("n", 10_000, "Examples the basis is built on.", lower_bound=10)
    flags.DEFINE_integer(
        "batch_size", 256, "Examples per accumulation step (every implementation)."
    )
    flags.DEFINE_integer("repeats", 3, "Timed repeats (interleaved); min and median reported.")
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: MNIST-like noise).")
    flags.DEFINE_bool("torch", True, "Also time the torch.func peer.")
    flags.DEFINE_bool("allow_loaded_machine", False, "Measure even when the machine is busy.")


def workload(n: int, sizes=SIZES, data_dir: str = "", seed: int = 0):
    """(params (float64 numpy), folded inputs (n, d + 1)) of the benchmark."""
    params = models.init_mlp(jax.random.key(seed), sizes)
    params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    if data_dir:
        from theorax.experiments import data

        images = data.load_idx_dataset(data_dir, "mnist").train_images[:n]
        x = images.reshape(len(images), -1).astype(np.float64) / 255.0
    else:
        rng = np.random.default_rng(seed)
        x = rng.uniform(size=(n, sizes[0]))
        side = int(round(np.sqrt(sizes[0])))
        if side * side == sizes[0] and side > 4:
            mask = np.ones((side, side), bool)
            mask[2:-2, 2:-2] = False
            border = np.nonzero(mask.reshape(-1))[0][:67]
            x[:, border] = 0.0
    return params, np.concatenate([x, np.ones((len(x), 1))], axis=1)


# ------------------------------------------------------------------------------------------ peers


def _bases_from(grams, means, jacobian_gram, num_layers, options) -> list[np.ndarray]:
    """The LIB's Cs from the Grams and a peer's `jacobian_gram(layer, c_next) -> M'` (shared linear algebra)."""
    cs, c_next = [], None
    for k in range(num_layers - 2, -1, -1):
        pca = basis_lib.pca_step(grams[k], means[k], options)
        w, w_pinv = pca.Y @ pca.U, pca.U.T @ pca.Y_inv
        sqrt_d = np.sqrt(pca.D)
        r_mat, r_pinv = w / sqrt_d, sqrt_d[:, None] * w_pinv
        m = r_pinv @ jacobian_gram(k, c_next) @ r_pinv.T
        v, lam = basis_lib.lib_step(m, options)
        c_next = (r_mat @ v) * np.sqrt(lam)
        cs.append((c_next, lam))
    return cs[::-1]


def jax_per_example_lib(params, x, batch_size: int) -> list:
    """Peer (a): per-example full Jacobians of each section (`vmap(jacrev)`), projected on the next basis,
    each example's J^T J summed; float64."""
    options = basis_lib.Options()
    with jax.enable_x64(True):
        net = basis_lib.prepare(models.mlp_sections(params), x)
        means, grams = basis_lib.layer_moments(net, batch_size, center=True)

        @jax.jit
        def gram_of_batch(layer_params, c_next, f):
            def jac(e):
                return jax.jacrev(lambda z: models._mlp_hidden_section(layer_params, z))(e)

            def jac_out(e):
                return jax.jacrev(lambda z: models._mlp_output_section(layer_params, z))(e)

            js = jax.vmap(jac if c_next is not None else jac_out)(f)  # (B, d_out, d_in)
            if c_next is not None:
                js = jnp.einsum("boi,ok->bki", js, c_next)
            return jnp.sum(jax.vmap(lambda j: j.T @ j)(js), axis=0)

        layers = params["layers"]

        def jacobian_gram(k, c_next):
            acts = _activations(layers, x, k)
            total = 0.0
            for start in range(0, len(acts), batch_size):
                total = total + gram_of_batch(
                    layers[k], None if c_next is None else jnp.asarray(c_next),
                    jnp.asarray(acts[start : start + batch_size]),
                )  # fmt: skip
            return np.asarray(total) / len(acts)

        return _bases_from(grams, means, jacobian_gram, len(layers) + 1, options)


def _activations(layers, x, k):
    f = x
    for layer in layers[:k]:
        h = np.maximum(f[:, :-1] @ layer["W"] + f[:, -1:] * layer["b"], 0.0)
        f = np.concatenate([h, f[:, -1:]], axis=1)
    return f


def torch_func_lib(params, x, batch_size: int) -> list:
    """Peer (b): torch.func vmap(jacrev) of each section times the next basis, J^T J accumulated in float64."""
    import torch
    from torch.func import jacrev, vmap

    options = basis_lib.Options()
    with jax.enable_x64(True):
        net = basis_lib.prepare(models.mlp_sections(params), x)
        means, grams = basis_lib.layer_moments(net, batch_size, center=True)
    layers = [
        {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in layer.items()}
        for layer in params["layers"]
    ]
    last = len(layers) - 1

    def section(k, f):
        h = f[:-1] @ layers[k]["W"] + f[-1] * layers[k]["b"]
        if k == last:
            return h
        return torch.relu(torch.cat([h, f[-1:]]))

    def jacobian_gram(k, c_next):
        c = None if c_next is None else torch.from_numpy(c_next)
        fn = (lambda f: section(k, f)) if c is None else (lambda f: section(k, f) @ c)
        acts = torch.from_numpy(_activations(params["layers"], x, k))
        total = torch.zeros(acts.shape[1], acts.shape[1], dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(acts), batch_size):
                j = vmap(jacrev(fn))(acts[start : start + batch_size])  # (B, out, d)
                total += torch.einsum("boi,boj->ij", j, j)
        return (total / len(acts)).numpy()

    return _bases_from(grams, means, jacobian_gram, len(layers) + 1, options)


def ours_lib(params, x, batch_size: int, dtype: str = "float64"):
    return interaction_basis(models.mlp_sections(params), x, batch_size=batch_size, dtype=dtype)


def floor_gemm(params, x, batch_size: int, rows_per_example: int = 1):
    """One float64 GEMM a^T a per batch, a of shape (batch * rows_per_example, 785): with 1 row per example
    the input Gram (the floor of any basis: one pass over the data at the input's width), with 101 the
    generic route's layer-0 J^T J (the floor of every implementation that forms per-example Jacobians)."""
    n, d = x.shape
    with jax.enable_x64(True):
        j = jnp.asarray(np.random.default_rng(0).normal(size=(batch_size * rows_per_example, d)))
        gemm = jax.jit(lambda a: a.T @ a)
        gemm(j).block_until_ready()

    def run():  # in its own x64 scope: called outside this one, the GEMM would be retraced in float32
        with jax.enable_x64(True):
            acc = 0.0
            for _ in range(int(np.ceil(n / batch_size))):
                acc = gemm(j)
            return jax.block_until_ready(acc)

    return run


def _lambdas(result) -> list[np.ndarray]:
    if isinstance(result[0], basis_lib.LayerBasis):
        return [b.eigenvalues for b in result[:-1]]
    return [lam for _, lam in result]


def benchmark(
    n: int, batch_size: int, repeats: int, data_dir: str = "", with_torch: bool = True
) -> dict:
    params, x = workload(n, data_dir=data_dir)
    fns = {
        "ours_s": lambda: ours_lib(params, x, batch_size),
        "jax_per_example_s": lambda: jax_per_example_lib(params, x, batch_size),
        "floor_gram_s": floor_gemm(params, x, batch_size),
        "floor_jtj_s": floor_gemm(params, x, batch_size, params["layers"][0]["W"].shape[1] + 1),
    }
    if with_torch:
        import torch

        fns["torch_func_s"] = lambda: torch_func_lib(params, x, batch_size)
    start = time.perf_counter()
    ours = ours_lib(params, x, batch_size)
    cold = time.perf_counter() - start
    check = {"sizes": [b.size for b in ours]}
    ref = _lambdas(ours)
    for name in ("jax_per_example_s", "torch_func_s"):
        if name in fns:
            other = _lambdas(fns[name]())
            check[name.replace("_s", "_max_rel_lambda_diff")] = max(
                float(np.max(np.abs(a[: len(b)] - b[: len(a)]) / a.max()))
                for a, b in zip(ref, other, strict=True)
            )
    times = timing.interleaved(fns, repeats)
    results = {"n": n, "sizes": list(SIZES), "batch_size": batch_size, "dtype": "float64",
               "ours_cold_s": cold, **check}  # fmt: skip
    for name, t in times.items():
        results[name], results[name.replace("_s", "_min_s")] = t["median_s"], t["min_s"]
    results["ratio_vs_jax_per_example"] = results["jax_per_example_s"] / results["ours_s"]
    if with_torch:
        results["ratio_vs_torch_func"] = results["torch_func_s"] / results["ours_s"]
        results["torch_threads"] = torch.get_num_threads()
    results["ours_vs_floor_gram"] = results["ours_s"] / results["floor_gram_s"]
    return results


def device_workload(tiny: bool) -> dict:
    """The LIB of the MNIST-size MLP on the default JAX device (an accelerator when there is one): 10,000
    examples at 784-100-100-10 (tiny: 256 examples at 64-16-16-10), float64; returns its timings."""
    n, sizes = (256, (64, 16, 16, 10)) if tiny else (10_000, SIZES)
    params, x = workload(n, sizes)
    start = time.perf_counter()
    bases = ours_lib(params, x, 256 if tiny else 1024)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    bases = ours_lib(params, x, 256 if tiny else 1024)
    warm = time.perf_counter() - start
    return {"workload": f"LIB of the {'-'.join(map(str, sizes))} MLP over {n:,} examples, float64",
            "device": str(jax.devices()[0]), "n": n, "layer_sizes": list(sizes),
            "basis_sizes": [b.size for b in bases], "compile_s": cold, "seconds": warm,
            "rate": n / warm, "unit": "examples/s"}  # fmt: skip


def main(argv):
    del argv
    record = timing.machine(allow_loaded=FLAGS.allow_loaded_machine)
    results = benchmark(FLAGS.n, FLAGS.batch_size, FLAGS.repeats, FLAGS.data_dir, FLAGS.torch)
    results["machine"] = record
    results["target_s"] = 60.0
    timing.write_results(FLAGS.out, "interaction_basis.json", results, table(results, FLAGS.n))


def table(results: dict, n: int) -> list[str]:
    """The printed report: ours, both peers with their ratios, the floors and the load."""
    record = results["machine"]
    lines = [
        f"LIB of the {'-'.join(map(str, SIZES))} MLP over {n} examples (float64):",
        f"  ours                {results['ours_s']:8.2f} s (min {results['ours_min_s']:.2f}; target < 60 s)",
        f"  JAX per-example     {results['jax_per_example_s']:8.2f} s  ratio {results['ratio_vs_jax_per_example']:.2f}x",
    ]
    if "torch_func_s" in results:
        lines.append(
            f"  torch.func          {results['torch_func_s']:8.2f} s  ratio {results['ratio_vs_torch_func']:.2f}x"
        )
    lines += [
        f"  floor: input Gram  {results['floor_gram_s']:8.2f} s; generic J^T J {results['floor_jtj_s']:.2f} s",
        f"  load {record['load_1min']:.2f}{' (UNDER LOAD)' if record['under_load'] else ''}",
    ]
    return lines


if __name__ == "__main__":
    runtime.tune_process()
    _define_flags()
    app.run(main)
