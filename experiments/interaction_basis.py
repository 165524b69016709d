r"""Interaction-basis analysis of trained networks: the MLP on digits / MNIST and grokked modular addition.

    python -m theorax.experiments.interaction_basis --config=configs/interaction_basis.py:cpu --workdir=results/ib_cpu
    python -m theorax.experiments.interaction_basis --config=configs/interaction_basis.py:modadd --workdir=DIR

For every task (`tasks`: mlp, modadd) and training seed, trains the network here (resumable orbax checkpoints in
`DIR/<task>_seed<k>/checkpoints`), then builds the LIB, PCA and neuron bases on the training data and reports
basis sizes, Lambda spectra, node- and edge-ablation curves, the edges needed to keep accuracy within 0.001
(bisect), edge-mass concentration, modularity (Leiden), the degeneracy measures and the LLC, beside the paper's
numbers. Writes results.json and PNG plots; a finished workdir is not redone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from theorax.experiments import runtime
from theorax.models import interaction_basis as models

TASKS = ("mlp", "modadd")

# ------------------------------------------------------------------------------------------ checks


def validate(config) -> None:
    """Plain-Python checks of the config, before anything is built or compiled."""
    check = runtime.check
    check(len(config.tasks) >= 1, "tasks must name at least one of mlp, modadd")
    for task in config.tasks:
        runtime.check_choice("tasks", task, TASKS)
    runtime.check_choice("mlp.data.name", config.mlp.data.name, ("digits", "mnist", "fashion_mnist"))
    if config.mlp.data.name != "digits":
        check(
            bool(config.mlp.data.dir),
            f"mlp.data.name={config.mlp.data.name!r} needs mlp.data.dir (the IDX files)",
        )
    for key in ("mlp.epochs", "mlp.batch_size", "modadd.epochs", "modadd.p", "analysis.batch_size"):
        value = config[key.split(".")[0]][key.split(".")[1]]
        check(int(value) >= 1, f"{key}={value} must be >= 1")
    check(len(config.mlp.hidden) >= 1, "mlp.hidden must list at least one hidden width")
    check(len(config.modadd.seeds) >= 1, "modadd.seeds must name at least one seed")
    check(len(config.mlp.seeds) >= 1, "mlp.seeds must name at least one seed")
    check(
        0.0 < config.modadd.frac_train < 1.0,
        f"modadd.frac_train={config.modadd.frac_train} must be in (0, 1)",
    )
    check(
        0.0 < config.analysis.threshold < 1.0,
        f"analysis.threshold={config.analysis.threshold} must be in (0, 1) (relative to the largest "
        "eigenvalue); for rib's absolute threshold set analysis.absolute_threshold",
    )


# ----------------------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained network: its parameters, sections, node layers and how to read its data."""

    task: str
    seed: int
    params: dict
    train_accuracy: float
    test_accuracy: float
    history: list[dict]


def _accuracy(logits_fn, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(logits_fn(params, x), axis=-1) == y))


def modadd_task(config) -> models.ModularAddition:
    mc = config.modadd
    return models.modular_addition(mc.p, mc.frac_train, mc.data_seed)


def modadd_model(config) -> models.TransformerConfig:
    mc = config.modadd
    return models.TransformerConfig(
        d_vocab=mc.p + 1, n_ctx=3, d_model=mc.d_model, n_heads=mc.n_heads, d_head=mc.d_head,
        d_mlp=mc.d_mlp,
    )  # fmt: skip


def modadd_optimizer(config) -> optax.GradientTransformation:
    """AdamW with a linear warm-up over `warmup_steps` (rib: LambdaLR min(step / 10, 1)), decoupled decay."""
    mc = config.modadd
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, mc.lr, mc.warmup_steps), optax.constant_schedule(mc.lr)],
        [mc.warmup_steps],
    )
    return optax.adamw(lr, b1=mc.b1, b2=mc.b2, weight_decay=mc.weight_decay)


def train_modadd(config, seed: int, wd: runtime.Workdir) -> Trained:
    """Full-batch AdamW on the training pairs, cross-entropy on the last position's logits (rib's script)."""
    task = modadd_task(config)
    tx = modadd_optimizer(config)
    params = models.init_transformer(jax.random.key(seed), modadd_model(config))
    state = {"params": params, "opt": tx.init(params)}
    x_train, y_train = jnp.asarray(task.tokens[task.train]), jnp.asarray(task.labels[task.train])
    x_test, y_test = jnp.asarray(task.tokens[~task.train]), jnp.asarray(task.labels[~task.train])

    def loss_fn(params):
        logits = models.transformer_logits(params, x_train)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(state):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

    logits_fn = jax.jit(models.transformer_logits)

    def evaluate(step, state):
        return {
            "train_accuracy": _accuracy(logits_fn, state["params"], x_train, y_train),
            "test_accuracy": _accuracy(logits_fn, state["params"], x_test, y_test),
        }

    mc = config.modadd
    done = wd.file("trained.json")
    if os.path.exists(done):  # an earlier run stopped early: its last checkpoint is the trained network
        state, _ = wd.checkpointer(mc.eval_every).restore(state)
    else:
        state = _train_until_grokked(wd, state, step_fn, evaluate, mc, desc=f"modadd seed {seed}")
    final = evaluate(None, state)
    history = _eval_history(wd)
    if wd.is_main:
        with open(done, "w") as f:
            json.dump({"step": history[-1]["step"] if history else mc.epochs, **final}, f)
    return Trained("modadd", seed, state["params"], final["train_accuracy"],
                   final["test_accuracy"], history)  # fmt: skip


class _Grokked(Exception):
    """Raised from the checkpoint hook to stop training early; carries the step and the state."""

    def __init__(self, step: int, state):
        super().__init__(step)
        self.step, self.state = step, state


def _train_until_grokked(wd, state, step_fn, evaluate, mc, desc: str):
    """`runtime.train` for `mc.epochs` steps, evaluating every `eval_every`; with `stop_accuracy` > 0 it stops
    once test accuracy has stayed at or above it for `stop_patience` epochs (decided from the logged history,
    so a resumed run stops where an uninterrupted one would)."""
    def on_checkpoint(step, state):
        row = evaluate(step, state)
        if mc.stop_accuracy > 0:
            history = _eval_history(wd) + [{"step": step, **row}]
            held = [h["step"] for h in history if h.get("test_accuracy", 0.0) < mc.stop_accuracy]
            since = max(held, default=0)
            first_above = min((h["step"] for h in history if h["step"] > since), default=None)
            if first_above is not None and step - first_above >= mc.stop_patience:
                wd.log(step, row, prefix="eval/")
                raise _Grokked(step, state)
        return row

    try:
        return runtime.train(
            wd, state, lambda s, i: step_fn(s), num_steps=mc.epochs,
            checkpoint_every=min(mc.checkpoint_every, mc.eval_every),
            log_every=min(100, mc.epochs), desc=desc, on_checkpoint=on_checkpoint,
        )  # fmt: skip
    except _Grokked as stop:
        return stop.state


def _eval_history(wd: runtime.Workdir) -> list[dict]:
    """The accuracies logged at every checkpoint (across resumptions), from metrics.jsonl."""
    return [
        {"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
        for r in wd.read_metrics()
        if any(k.startswith("eval/") for k in r)
    ]


def mlp_data(config):
    """(x_train, y_train, x_test, y_test): images flattened, on the 0-1 scale (torchvision's ToTensor)."""
    from theorax.experiments import data

    dc = config.mlp.data
    ds = data.load_digits() if dc.name == "digits" else data.load_idx_dataset(dc.dir, dc.name)

    def flat(images):
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    return flat(ds.train_images), ds.train_labels, flat(ds.test_images), ds.test_labels


def train_mlp(config, seed: int, wd: runtime.Workdir, data) -> Trained:
    """Adam, batch 64, cross-entropy, `mlp.epochs` epochs (rib_scripts/train_mlp)."""
    from theorax.experiments.data import EpochBatches

    mc = config.mlp
    x_train, y_train, x_test, y_test = data
    sizes = (x_train.shape[1], *mc.hidden, int(y_train.max()) + 1)
    tx = optax.adam(mc.lr)
    params = models.init_mlp(jax.random.key(seed), sizes)
    state = {"params": params, "opt": tx.init(params)}
    batches = EpochBatches(x_train, y_train, mc.batch_size, seed=seed)

    @functools.partial(jax.jit, donate_argnums=0)
    def step_fn(state, x, y):
        def loss_fn(p):
            logits = models.mlp_apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, {"loss": loss}

    num_steps = mc.epochs * batches.steps_per_epoch
    state = runtime.train(
        wd, state, lambda s, i: step_fn(s, *batches.batch(i)), num_steps=num_steps,
        checkpoint_every=min(mc.checkpoint_every, num_steps), log_every=min(50, num_steps),
        desc=f"mlp seed {seed}",
    )  # fmt: skip
    logits_fn = jax.jit(models.mlp_apply)
    return Trained(
        "mlp", seed, state["params"],
        _accuracy(logits_fn, state["params"], x_train, y_train),
        _accuracy(logits_fn, state["params"], x_test, y_test), [],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the run


def run(config, workdir: str) -> dict:
    """Trains and analyses every task and seed of `config`; returns (and writes) results.json."""
    wd = runtime.Workdir(workdir, config)
    if wd.finished:
        return wd.read_results()
    validate(config)
    runs = {}
    for task in config.tasks:
        data = mlp_data(config) if task == "mlp" else None
        for seed in config[task].seeds:
            sub = runtime.Workdir(os.path.join(workdir, f"{task}_seed{seed}"))
            if task == "mlp":
                trained = train_mlp(config, int(seed), sub, data)
            else:
                trained = train_modadd(config, int(seed), sub)
            runs[f"{task}_seed{seed}"] = {
                "train_accuracy": trained.train_accuracy,
                "test_accuracy": trained.test_accuracy,
            }
    if config.train_only:
        return runs
    return wd.write_results({"preset": config.preset, "runs": runs})


def report(results: dict, workdir: str) -> str:
    lines = ["## Interaction basis", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    runtime.main(run)
