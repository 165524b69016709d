r"""Trains, fine-tunes and evaluates the scaled MLPs of "Scaling MLPs: A Tale of Inductive Bias".

    python -m theorax.experiments.scaled_mlp --config=configs/scaled_mlp.py:cpu --workdir=results/scaled_mlp_cpu
    python -m theorax.experiments.scaled_mlp --config=configs/scaled_mlp.py:cifar10 --workdir=DIR \
        --config.data.dir=/path/with/cifar-10-batches-py [--config.epochs=100]

The workdir gets config.json, metrics.jsonl, TensorBoard events, orbax checkpoints, params.msgpack (the final
parameters, loadable with `--config.init.params_file`), results.json and learning-curve plots. Rerunning the
same command resumes from the newest checkpoint; a finished run is not redone. Data parallel over every device
(`data` mesh axis); multi-host with `--coordinator_address/--num_processes/--process_id`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from theorax.experiments import runtime
from theorax.experiments.data import EpochBatches, ImageDataset, load_image_dataset
from theorax.inference.scaled_mlp import training as recipe_lib
from theorax.inference.scaled_mlp.scaling_law import fit_scaling_law
from theorax.models.scaled_mlp import ScaledMLP, forward_flops, num_params, parse_architecture

# From-scratch CIFAR-10 numbers the paper reports (Table 1, B-6/Wi-1024; quoted from the reference notes,
# which could not re-verify them) and the released fine-tuned checkpoints (README, verified).
PAPER = {
    "B-MLP C10 scratch, no DA, 100 ep": 58.2,
    "B-MLP C10 scratch + DA, 1000 ep": 70.1,
    "B-MLP C10 scratch + DA, 5000 ep": 75.4,
    "B-12/Wi-1024 IN21k -> C10 fine-tune": 94.2,
    "B-12/Wi-1024 IN21k -> C10 fine-tune + TTA": 95.5,
}


# ---------------------------------------------------------------------------------------------- run


def run(config, workdir: str) -> dict:
    """Trains (or fine-tunes) one scaled MLP as `config` says; returns and writes results.json.

    Each step is a function of its own, defined below in this order (sections 1-7). A finished workdir is
    read back, not redone; an unfinished one resumes from its newest checkpoint.
    """
    wd = runtime.Workdir(workdir, config)
    if wd.finished:
        return wd.read_results()
    validate(config)
    dataset = load_data(config)
    exp = build_experiment(config, dataset)
    state = initial_state(config, exp)
    state, train_seconds = train(config, wd, exp, state)
    results = final_evaluation(config, exp, state["params"])
    results |= run_summary(config, exp, state["params"], train_seconds)
    save_outputs(wd, state["params"])
    wd.close()
    return wd.write_results(results)


# ------------------------------------------------------------------------------ 1. check the config


def validate(config) -> None:
    """Plain-Python checks of the config, before any data is read or anything compiles."""
    check = runtime.check
    try:
        parse_architecture(config.model.name)
    except ValueError as e:
        raise runtime.ConfigError(f"model.name: {e}") from None
    runtime.check_choice("model.compute_dtype", config.model.compute_dtype, ("float32", "bfloat16"))
    runtime.check_choice("optim.name", config.optim.name, ("lion", "sgd", "adamw"))
    runtime.check_choice("optim.schedule", config.optim.schedule, ("constant", "cosine"))
    check(config.batch_size > 0, f"batch_size={config.batch_size} must be positive")
    check(config.optim.lr > 0, f"optim.lr={config.optim.lr} must be positive")
    check(
        config.optim.accum_steps >= 1 and config.batch_size % config.optim.accum_steps == 0,
        f"optim.accum_steps={config.optim.accum_steps} must be >= 1 and divide "
        f"batch_size={config.batch_size}",
    )
    check(config.data.res > 0, f"data.res={config.data.res} must be positive")
    check(
        0 <= config.recipe.label_smoothing < 1,
        f"recipe.label_smoothing={config.recipe.label_smoothing} must be in [0, 1)",
    )
    check(config.recipe.mixup_alpha >= 0, f"recipe.mixup_alpha={config.recipe.mixup_alpha} < 0")
    lo, hi = config.recipe.crop_scale
    check(
        0 < lo <= hi <= 1,
        f"recipe.crop_scale={tuple(config.recipe.crop_scale)} must satisfy 0 < lo <= hi <= 1",
    )
    check(config.num_steps > 0 or config.epochs > 0, "set epochs > 0 or num_steps > 0")
    check(
        not (config.init.params_file and config.init.torch_checkpoint),
        "set at most one of init.params_file and init.torch_checkpoint",
    )
    for key in ("params_file", "torch_checkpoint"):
        path = config.init[key]
        check(not path or os.path.exists(path), f"init.{key}={path!r}: no such file")


# --------------------------------------------------------------------------------- 2. load the data


def load_data(config) -> ImageDataset:
    """The dataset `data.name` (from `data.dir`), cut to its first `data.n_train` training images if set."""
    dataset = load_image_dataset(config.data.name, config.data.dir or None)
    if config.data.n_train > 0:
        dataset = dataset.subset(config.data.n_train)
    return dataset


# -------------------------------------------------------------------------- 3. build the experiment


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What one run trains and evaluates with, built from the config before anything is compiled.

    `key` is the run's root key: `fold_in(key, 0)` initialises the parameters, `fold_in(key, 1)` drives the
    training step's augmentation (itself folded with the step number), `fold_in(key, 2)` the TTA crops.
    """

    dataset: ImageDataset
    model: ScaledMLP
    recipe: recipe_lib.Recipe
    optimizer: optax.GradientTransformation
    batches: EpochBatches
    num_steps: int
    mesh: jax.sharding.Mesh
    key: jax.Array
    train_step: Callable  # (state, images, labels, step) -> (state, metrics), jitted, state donated
    eval_step: Callable  # (params, images, labels, mask) -> sums, jitted


def build_experiment(config, dataset: ImageDataset) -> Experiment:
    """The run's model, batches, optimiser, recipe and jitted steps (plain Python: nothing compiles yet)."""
    check_batch_sizes(config)
    model = build_model(config, dataset)
    mesh = runtime.data_mesh()
    batches = EpochBatches(
        dataset.train_images,
        dataset.train_labels,
        config.batch_size,
        config.seed,
        jax.process_index(),
        jax.process_count(),
    )
    num_steps = total_steps(config, batches.steps_per_epoch)
    optimizer = build_optimizer(config.optim, batches.steps_per_epoch, num_steps)
    recipe = build_recipe(config, dataset)
    key = jax.random.key(config.seed)
    train_step = recipe_lib.make_train_step(
        model,
        optimizer,
        recipe,
        jax.random.fold_in(key, 1),
        linear_probe=config.optim.linear_probe,
        compiler_options=cpu_tuning()["compiler_options"],
    )
    return Experiment(
        dataset=dataset,
        model=model,
        recipe=recipe,
        optimizer=optimizer,
        batches=batches,
        num_steps=num_steps,
        mesh=mesh,
        key=key,
        train_step=train_step,
        eval_step=recipe_lib.make_eval_step(model, recipe),
    )


# -------------------------------------------------------------------------------------- hardware tuning

# XLA:CPU's copy insertion, without region analysis, cannot see that the in-place Lion update of a donated
# parameter (or of its momentum) may run after every other read of the old value, so it copies the whole
# donated state at the start of each step (the parameters the backward pass reads and every momentum: 27 copies,
# ~110 MB on B-6/Wi-512) before updating it in place. With region analysis those copies are gone.
_CPU_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


@functools.cache
def cpu_tuning() -> dict:
    """The train step's hardware knobs for this machine, as keyword arguments of `make_train_step`:
    `compiler_options` (the option above, on the CPU backend when this jaxlib knows it; else none). They change
    how the step is compiled, not what it computes (the step's outputs are bitwise the same)."""
    return {"compiler_options": runtime.cpu_compiler_options(_CPU_COMPILER_OPTIONS)}


def check_batch_sizes(config) -> None:
    """The training and evaluation batches must split over the devices (and processes) there are."""
    runtime.local_batch_size(config.batch_size)
    runtime.check(
        config.eval.batch_size % jax.device_count() == 0,
        f"eval.batch_size={config.eval.batch_size} must be a multiple of {jax.device_count()} devices",
    )


def build_model(config, dataset: ImageDataset) -> ScaledMLP:
    channels = dataset.image_shape[-1]
    dtype = jnp.bfloat16 if config.model.compute_dtype == "bfloat16" else None
    return ScaledMLP.from_name(
        config.model.name,
        dataset.num_classes,
        bottleneck=config.model.bottleneck,
        input_shape=(config.data.res, config.data.res, channels),
        dtype=dtype,
    )


def total_steps(config, steps_per_epoch: int) -> int:
    """`num_steps` if set, else `epochs` (possibly fractional) of `steps_per_epoch`, at least one step."""
    if config.num_steps > 0:
        return config.num_steps
    return max(1, math.ceil(config.epochs * steps_per_epoch))


def build_optimizer(optim, steps_per_epoch: int, num_steps: int) -> optax.GradientTransformation:
    """The config's `optim` section as the recipe's optimiser, with its learning-rate schedule."""
    schedule = recipe_lib.learning_rate_schedule(
        optim.lr,
        optim.schedule,
        steps_per_epoch,
        max(1, math.ceil(num_steps / steps_per_epoch)),
        optim.warmup_steps,
    )
    settings = recipe_lib.OptimizerConfig(
        name=optim.name,
        weight_decay=optim.weight_decay,
        clip=optim.clip,
        body_lr_multiplier=optim.body_lr_multiplier,
        linear_probe=optim.linear_probe,
        b1=optim.b1,
        b2=optim.b2,
        momentum=optim.momentum,
    )
    return recipe_lib.make_optimizer(settings, schedule)


def build_recipe(config, dataset: ImageDataset) -> recipe_lib.Recipe:
    """The config's `recipe` section (and the data's statistics) as the steps' data-side settings."""
    return recipe_lib.Recipe(
        res=config.data.res,
        mean=dataset.mean,
        std=dataset.std,
        label_smoothing=config.recipe.label_smoothing,
        augment=config.recipe.augment,
        mixup_alpha=config.recipe.mixup_alpha,
        crop_scale=tuple(config.recipe.crop_scale),
        crop_ratio=tuple(config.recipe.crop_ratio),
        flip=config.recipe.flip,
        accum_steps=config.optim.accum_steps,
    )


# --------------------------------------------------------------------------------- 4. initial state


def initial_state(config, exp: Experiment) -> dict:
    """The training state `{"params", "opt_state"}`, replicated over the mesh."""
    params = initial_params(config, exp.model, jax.random.fold_in(exp.key, 0))
    state = {"params": params, "opt_state": exp.optimizer.init(params)}
    return jax.device_put(state, runtime.replicated(exp.mesh))


def initial_params(config, model: ScaledMLP, key: jax.Array):
    """Fresh PyTorch-default parameters, or a checkpoint's (with a fresh head if `init.new_head`)."""
    dummy = jnp.zeros((1, *model.input_shape), jnp.float32)
    params = model.init(key, dummy)
    loaded = None
    if config.init.torch_checkpoint:
        from theorax.third_party.scaling_mlps import load_checkpoint

        _, loaded = load_checkpoint(config.init.torch_checkpoint, model.input_shape)
    elif config.init.params_file:
        with open(config.init.params_file, "rb") as f:
            loaded = serialization.msgpack_restore(f.read())
    if loaded is None:
        return params
    body = {
        k: v for k, v in loaded["params"].items() if k != "linear_out" or not config.init.new_head
    }
    fresh = params["params"]
    mismatched = [
        k
        for k in body
        if k not in fresh or jax.tree.map(jnp.shape, body[k]) != jax.tree.map(jnp.shape, fresh[k])
    ]
    if mismatched:
        raise runtime.ConfigError(
            f"the checkpoint does not fit model.name={config.model.name} at data.res="
            f"{config.data.res}: mismatched parameters {sorted(mismatched)[:6]}"
        )
    return {"params": {**fresh, **jax.tree.map(jnp.asarray, body)}}


# ----------------------------------------------------------------------------------------- 5. train


def train(config, wd: runtime.Workdir, exp: Experiment, state) -> tuple[dict, float]:
    """Runs (or resumes) the training loop, evaluating at every checkpoint; returns (state, seconds)."""

    def step_fn(state, step):
        images, labels = runtime.global_batch(exp.batches.batch(step), exp.mesh)
        return exp.train_step(state, images, labels, np.int32(step))

    def on_checkpoint(step, state):
        return evaluate(
            exp.eval_step, state["params"], exp.dataset, config.eval.batch_size, exp.mesh
        )

    start = time.perf_counter()
    state = runtime.train(
        wd,
        state,
        step_fn,
        num_steps=exp.num_steps,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        desc=f"{config.model.name} on {exp.dataset.name}",
        on_checkpoint=on_checkpoint,
    )
    return state, time.perf_counter() - start


# -------------------------------------------------------------------------------------- 6. evaluate


def final_evaluation(config, exp: Experiment, params) -> dict:
    """Test top-1 / top-5 / loss on centre crops, and with `eval.tta_crops` random crops if set."""
    batch_size = config.eval.batch_size
    final = evaluate(exp.eval_step, params, exp.dataset, batch_size, exp.mesh)
    results = {f"test_{k}": v for k, v in final.items()}
    if config.eval.tta_crops > 0:
        tta_fn = recipe_lib.make_tta_step(
            exp.model, exp.recipe, config.eval.tta_crops, jax.random.fold_in(exp.key, 2)
        )
        tta = evaluate(tta_fn, params, exp.dataset, batch_size, exp.mesh)
        results |= {f"test_tta_{k}": v for k, v in tta.items()}
    return results


def evaluate(eval_fn, params, dataset: ImageDataset, batch_size: int, mesh) -> dict:
    totals = None
    for batch in eval_batches(dataset.test_images, dataset.test_labels, batch_size):
        sums = eval_fn(params, *runtime.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    t = {k: float(v) for k, v in jax.device_get(totals).items()}
    return {
        "top1": t["top1"] / t["count"],
        "top5": t["top5"] / t["count"],
        "loss": t["loss"] / t["count"],
    }


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Fixed-size batches (the last padded and masked), this process's rows of each global batch."""
    n, p, n_proc = len(labels), jax.process_index(), jax.process_count()
    local = batch_size // n_proc
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)[p * local : (p + 1) * local]
        mask = idx < n
        idx = np.where(mask, idx, 0)
        yield images[idx], labels[idx], mask


# ---------------------------------------------------------------------------- 7. summarise and save


def run_summary(config, exp: Experiment, params, train_seconds: float) -> dict:
    """What ran: the model, data, parameters, and the paper's compute C = FLOP(f) x 3 x examples."""
    model, n_train = exp.model, len(exp.dataset.train_labels)
    macs = forward_flops(
        model.depth,
        model.width,
        model.num_classes,
        math.prod(model.input_shape),
        model.expansion,
        model.bottleneck,
    )
    examples = exp.num_steps * config.batch_size
    return {
        "model": config.model.name,
        "dataset": exp.dataset.name,
        "n_train": n_train,
        "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "forward_macs": macs,
        "compute_flops": recipe_lib.compute_flops(macs, examples),
        "examples_seen": examples,
        "epochs": examples / n_train,
        "steps": exp.num_steps,
        "train_seconds_this_session": train_seconds,
    }


def save_outputs(wd: runtime.Workdir, params) -> None:
    """params.msgpack (loadable with `init.params_file`) and the learning curves, from process 0."""
    if not wd.is_main:
        return
    with open(wd.file("params.msgpack"), "wb") as f:
        f.write(serialization.msgpack_serialize(jax.device_get(params)))
    plot_learning_curves(wd)


def plot_learning_curves(wd: runtime.Workdir) -> None:
    from matplotlib.figure import Figure

    rows = wd.read_metrics()
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval/top1" in r]
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    ax1.set(xlabel="step", ylabel="train loss (smoothed CE, mixup)", title="training loss")
    ax2.plot([r["step"] for r in evals], [100 * r["eval/top1"] for r in evals], "o-", ms=3)
    ax2.set(xlabel="step", ylabel="test top-1 (%)", title="test accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    wd.savefig(fig, "learning_curves.png")


# -------------------------------------------------------- the demo's report and the sweep's summary


# Table 5 / README parameter counts (millions) at 64x64x3 with the 11,230-class ImageNet-21k head.
PAPER_PARAMS_M = {"B-6/Wi-512": 24, "B-12/Wi-512": 37, "B-6/Wi-1024": 74, "B-12/Wi-1024": 124}


def report(results: dict, workdir: str) -> str:
    """The demo report's section: our run beside the paper's numbers."""
    rows = "\n".join(f"| paper: {k} | {v:.1f} |" for k, v in PAPER.items())
    counts = "\n".join(
        f"| {name} | {paper} | {num_params(*parse_architecture(name)[:2], 11230, 12288):,} |"
        for name, paper in PAPER_PARAMS_M.items()
    )
    return f"""## Scaled MLPs (Bachmann et al., 2023)

{results["model"]} trained from scratch with the paper's recipe (Lion, label smoothing 0.3, random-resized
crops, flips, mixup 0.8) on {results["dataset"]} ({results["n_train"]} training images, {results["epochs"]:.0f}
epochs, {results["num_params"]:,} parameters, {results["compute_flops"]:.3g} FLOPs by the paper's C = FLOP(f) x
3 x examples).

| run | test top-1 (%) |
|---|---|
| **ours: {results["model"]} on {results["dataset"]}** | **{100 * results["test_top1"]:.1f}** (top-5 {100 * results["test_top5"]:.1f}) |
{rows}

The paper's numbers are CIFAR-10 at 32x32 (from scratch) and 64x64 (fine-tuned); the demo's 8x8 digits need no
download and finish in minutes, so they check the pipeline, not the paper's accuracy. See the README for the
CIFAR-10 run on this CPU.

![learning curves](./learning_curves.png)

Parameter counts of the paper's models as built here (64x64x3 input, 11,230 classes):

| model | paper (M) | ours |
|---|---|---|
{counts}
"""


def summarize_sweep(rows: list[dict], workdir: str) -> None:
    """Fits E(C) = a (b + C)^-alpha + E_inf to a sweep's compute-optimal frontier and plots it."""
    from matplotlib.figure import Figure

    compute = np.array([r["compute_flops"] for r in rows])
    error = np.array([1 - r["test_top1"] for r in rows])
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for name in sorted({r["model"] for r in rows}):
        sel = [i for i, r in enumerate(rows) if r["model"] == name]
        ax.scatter(compute[sel], error[sel], s=14, label=name)
    try:
        law = fit_scaling_law(compute, error)
        grid = np.geomspace(compute.min(), compute.max(), 100)
        ax.plot(grid, law(grid), "k--", label=f"fit: alpha={law.alpha:.2f}, E_inf={law.e_inf:.3f}")
        fit = {
            "a": law.a,
            "b": law.b,
            "alpha": law.alpha,
            "e_inf": law.e_inf,
            "c_scale": law.c_scale,
        }
    except (ValueError, RuntimeError) as e:
        fit = {"error": str(e)}
    ax.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="test error", title="scaling law")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "scaling_law.png"), dpi=150)
    import json

    with open(os.path.join(workdir, "scaling_law.json"), "w") as f:
        json.dump(fit, f, indent=1)


if __name__ == "__main__":
    runtime.main(run, reuse_memory=True)
