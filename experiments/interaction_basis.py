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
from absl import logging
from matplotlib.figure import Figure
from theorax.experiments import runtime
from theorax.inference import interaction_basis as ib
from theorax.inference.interaction_basis import ablation, modularity
from theorax.models import interaction_basis as models

TASKS = ("mlp", "modadd")

# ------------------------------------------------------------------------------------------ checks


def validate(config) -> None:
    """Plain-Python checks of the config, before anything is built or compiled."""
    check = runtime.check
    check(len(config.tasks) >= 1, "tasks must name at least one of mlp, modadd")
    for task in config.tasks:
        runtime.check_choice("tasks", task, TASKS)
    runtime.check_choice(
        "mlp.data.name", config.mlp.data.name, ("digits", "mnist", "fashion_mnist")
    )
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
    if os.path.exists(
        done
    ):  # an earlier run stopped early: its last checkpoint is the trained network
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
        _accuracy(logits_fn, state["params"], x_test, y_test), [{"step": num_steps}],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- analysis

# The paper's modular-addition numbers (reference notes Sec. 3, computed from rib's committed graphs, 5 seeds).
PAPER_MODADD = {
    "sizes": {"lib": ["115", "96-126", "116"], "pca": ["115", "122-129", "129"]},
    "edges_first": {"lib": [133, 80, 71, 58, 91], "pca": [167, 76, 99, 115, 130]},
    "edges_mean": {"lib": [87, 74, 634], "pca": [117, 85, 663]},
    "concentration90": {"lib": [[17, 24, 27, 19, 40], [18, 23, 30, 20, 49]],
                        "pca": [[51, 29, 38, 23, 75], [37, 27, 39, 24, 85]]},
    "nodes99": {"lib": [[13, 9, 8, 8, 13], [17, 13, 15, 13, 17], [8, 10, 7, 7, 9]],
                "pca": [[13, 9, 10, 8, 13], [17, 13, 15, 13, 17], [8, 10, 7, 7, 9]]},
    "lambda_above_1e-4": [[14, 10, 12, 10, 15], [17, 15, 17, 13, 19], [9, 10, 10, 9, 12]],
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Network:
    """What the analysis needs of a trained network: sections, node layers and folded data."""

    sections: list
    names: list[str]
    basis_inputs: np.ndarray  # node layer 0 on the data the bases are built on (train)
    eval_inputs: np.ndarray  # node layer 0 on the data ablations are scored on (test)
    eval_labels: np.ndarray
    loss_fn: object  # (params, (x, y)) -> mean cross-entropy, for the LLC
    llc_data: tuple
    relu_layers: dict  # name -> (activations (N, d), d_in, d_out)


def mlp_network(config, trained: Trained, data) -> Network:
    x_train, y_train, x_test, y_test = data
    params = trained.params
    n = min(config.mlp.n_basis, len(x_train))
    sections = models.mlp_sections(params)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(
            models.mlp_apply(p, batch[0]), batch[1]
        ).mean()

    relu, h = {}, jnp.asarray(x_train[:n])
    layers = params["layers"]
    for k, layer in enumerate(layers[:-1]):
        h = jax.nn.relu(h @ layer["W"] + layer["b"])
        relu[f"layers.{k + 1}"] = (np.asarray(h), layer["W"].shape[0], layers[k + 1]["W"].shape[1])
    fold = lambda x: np.asarray(models.fold_input(jnp.asarray(x, jnp.float32)))  # noqa: E731
    return Network(sections, models.mlp_node_layers(params), fold(x_train[:n]), fold(x_test),
                   np.asarray(y_test), loss_fn, (jnp.asarray(x_train), jnp.asarray(y_train)),
                   relu)  # fmt: skip


def modadd_network(config, trained: Trained) -> Network:
    task = modadd_task(config)
    params = trained.params
    tokens = jnp.asarray(task.tokens)

    def loss_fn(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(
            models.transformer_logits(p, batch[0]), batch[1]
        ).mean()

    inputs = np.asarray(models.transformer_inputs(params, tokens))
    x_train = tokens[task.train]
    resid = models.embed(params, x_train)
    ones = jnp.ones((*resid.shape[:-1], 1))
    last = jax.vmap(lambda r, c: r[-1] + models._attend_last(params, r, c))(resid, ones)
    hidden = jax.nn.relu(last @ params["W_in"] + params["b_in"])
    relu = {"mlp hidden": (np.asarray(hidden), params["W_in"].shape[0], params["W_out"].shape[1])}
    return Network(models.transformer_sections(params), models.transformer_node_layers(),
                   inputs[task.train], inputs[~task.train], task.labels[~task.train], loss_fn,
                   (x_train, jnp.asarray(task.labels[task.train])), relu)  # fmt: skip


def _basis_kwargs(config) -> dict:
    ac = config.analysis
    return dict(
        threshold=ac.threshold,
        absolute_threshold=ac.absolute_threshold or None,
        integration=ac.integration,
        n_intervals=ac.n_intervals,
        batch_size=ac.batch_size,
        dtype=ac.dtype,
    )


def nodes_for_fraction(curve: dict, baseline: float, fraction: float = 0.99) -> int:
    """The fewest directions kept whose accuracy is >= fraction x baseline (on the evaluated points)."""
    ok = [n for n, acc in curve.items() if acc >= fraction * baseline]
    return min(ok) if ok else max(curve)


def analyse(config, net: Network, trained: Trained, wd: runtime.Workdir, tag: str) -> dict:
    """Bases, edges, ablations, modularity, degeneracy and LLC of one trained network."""
    ac = config.analysis
    kw = _basis_kwargs(config)
    out = {"node_layers": net.names, "bases": {}, "edges": {}, "nodes": {}, "modularity": {}}
    bases_all, edges_all = {}, {}
    for basis in ac.bases:
        bases = ib.interaction_basis(
            net.sections, net.basis_inputs, basis=basis, names=net.names, **kw
        )
        edges = ib.interaction_edges(net.sections, net.basis_inputs, bases, integration=ac.integration,
                                     n_intervals=ac.n_intervals, batch_size=ac.batch_size,
                                     dtype=ac.dtype)  # fmt: skip
        bases_all[basis], edges_all[basis] = bases, edges
        lam = [None if b.eigenvalues is None else b.eigenvalues.tolist() for b in bases]
        out["bases"][basis] = {
            "sizes": [b.size for b in bases],
            "eigenvalues": lam,
            "eigenvalue_max": [
                None if b.eigenvalues is None else float(b.eigenvalues.max()) for b in bases
            ],
            "gram_eigenvalue_max": [
                None if b.gram_eigenvalues is None else float(b.gram_eigenvalues.max())
                for b in bases
            ],
            "above_1e-4_of_max": [
                None
                if b.eigenvalues is None
                else int(np.sum(b.eigenvalues > 1e-4 * b.eigenvalues.max()))
                for b in bases
            ],
        }
        # Node ablation in every layer with a basis (float32, as rib's ablation configs).
        curves, needed = [], []
        for k, b in enumerate(bases[:-1]):
            n_kept = ablation.schedule(ac.node_schedule, b.size, ac.node_points, n_min=1)
            curve = ablation.node_ablation(net.sections, net.eval_inputs, net.eval_labels, bases, k,
                                           n_kept, dtype="float32")  # fmt: skip
            curves.append(curve)
            needed.append(nodes_for_fraction(curve, curve[b.size]))
        out["nodes"][basis] = {"curves": curves, "n_for_99pct": needed}
        # Edge ablation on every transition: the fewest edges within score_target_difference (bisect), and
        # the edge-mass concentration (edges holding 90% of the mass, the constant column excluded).
        transitions = []
        for k in range(len(bases) - 1):
            res = ablation.edge_ablation(
                net.sections, net.eval_inputs, net.eval_labels, bases, edges[k], k,
                schedule_kind=ac.edge_schedule,
                n_kept=ablation.schedule("exponential", len(ablation.edge_order(edges[k], bases[k].constant_index)), ac.edge_points)
                if ac.edge_schedule != "bisect" else None,
                score_target_difference=ac.score_target_difference, dtype="float32",
            )  # fmt: skip
            res["concentration90"] = ablation.mass_concentration(
                edges[k], 0.9, bases[k].constant_index
            )
            res["total_edges"] = int(edges[k].size)
            res["scores"] = {int(n): v for n, v in res["scores"].items()}
            transitions.append(res)
        out["edges"][basis] = transitions
        if ac.edge_schedule == "bisect":
            eps = [max(t["epsilon"], 1e-300) for t in transitions]
            mods = modularity.leiden_modules(edges, eps, [b.constant_index for b in bases],
                                             gamma=ac.modularity_gamma, seed=ac.modularity_seed)  # fmt: skip
            out["modularity"][basis] = {
                "modularity": mods.modularity, "num_modules": mods.num_modules,
                "num_nontrivial_modules": mods.num_nontrivial,
                "module_sizes": mods.module_sizes()[:10], "gamma": ac.modularity_gamma,
            }  # fmt: skip
            if basis == "lib":
                _plot_graph(wd, tag, mods, net.names, ac.draw_nodes_per_layer)
    out["degeneracy"] = degeneracy_measures(config, net)
    out["llc"] = llc_measure(config, net, trained)
    _plot_spectra(wd, tag, out)
    _plot_ablations(wd, tag, out)
    return out


def degeneracy_measures(config, net: Network) -> dict:
    ac = config.analysis
    layers = ib.linear_degeneracy(net.sections, net.basis_inputs, threshold=ac.threshold,
                                  batch_size=ac.batch_size, dtype=ac.dtype, names=net.names)  # fmt: skip
    relu = {}
    for name, (acts, d_in, d_out) in net.relu_layers.items():
        sync = ib.synchronised_relus(acts, d_in, d_out)
        relu[name] = {
            "width": int(acts.shape[1]),
            "groups": [len(g) for g in sync.groups],
            "dead": len(sync.dead),
            "always_on": len(sync.always_on),
            "free_directions": sync.free_directions,
        }
    return {"layers": [dataclasses.asdict(d) for d in layers], "relu": relu}


def llc_measure(config, net: Network, trained: Trained) -> dict | None:
    lc = config.llc
    if not lc.enabled:
        return None
    n = int(net.llc_data[1].shape[0])
    step_size, diverged = lc.step_size, None
    try:
        est = _llc(lc, net, trained, step_size, n)
    except FloatingPointError as e:
        # SGLD diverged: once more at a tenth of the step, reported as such
        diverged, step_size = str(e), lc.step_size / 10
        logging.warning("%s; retrying at step_size=%g", e, step_size)
        est = _llc(lc, net, trained, step_size, n)
    d = sum(int(np.size(p)) for p in jax.tree.leaves(trained.params))
    return {"llc_mean": est.llc_mean, "llc_std": est.llc_std, "llc_per_chain": est.llc_per_chain.tolist(),
            "nbeta": est.nbeta, "init_loss": est.init_loss, "num_parameters": d,
            "n_eff": 2 * est.llc_mean, "step_size": step_size, "diverged_at_config_step": diverged}  # fmt: skip


def _llc(lc, net: Network, trained: Trained, step_size: float, n: int):
    return ib.llc(net.loss_fn, trained.params, net.llc_data, jax.random.key(1000 + trained.seed),
                  num_chains=lc.num_chains, num_draws=lc.num_draws, num_burnin=lc.num_burnin,
                  step_size=step_size, localization=lc.localization,
                  batch_size=min(lc.batch_size, n))  # fmt: skip


# ------------------------------------------------------------------------------------------- plots


def _plot_spectra(wd, tag, out) -> None:
    names = out["node_layers"]
    bases = [b for b in ("lib", "pca") if b in out["bases"]]
    n = len(names) - 1
    fig = Figure(figsize=(4 * n, 3.3), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for k, ax in enumerate(axes):
        for b in bases:
            lam = out["bases"][b]["eigenvalues"][k]
            if lam:
                ax.semilogy(range(len(lam)), np.maximum(lam, 1e-300), marker=".", ms=3,
                            label=f"{b.upper()} ({len(lam)})")  # fmt: skip
        ax.set_title(names[k])
        ax.set_xlabel("direction (constant first)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Lambda (LIB) / Gram eigenvalue (PCA)")
    axes[-1].legend(fontsize=8)
    wd.savefig(fig, f"{tag}_spectra.png")


def _plot_ablations(wd, tag, out) -> None:
    names = out["node_layers"]
    n = len(names) - 1
    fig = Figure(figsize=(4 * n, 6.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for basis in out["nodes"]:
        for k in range(n):
            curve = out["nodes"][basis]["curves"][k]
            ks = sorted(curve)
            axes[0][k].plot(ks, [curve[i] for i in ks], marker="o", ms=3, label=basis)
            t = out["edges"][basis][k]
            es = sorted(t["scores"])
            axes[1][k].plot([max(e, 1) for e in es], [t["scores"][e] for e in es], marker="o", ms=3,
                            ls="", label=f"{basis}: {t.get('n_needed', '-')} needed")  # fmt: skip
    for k in range(n):
        axes[0][k].set_title(f"node ablation at {names[k]}")
        axes[0][k].set_xscale("log")
        axes[0][k].set_xlabel("directions kept")
        axes[1][k].set_title(f"edge ablation {names[k]} -> {names[k + 1]}")
        axes[1][k].set_xscale("log")
        axes[1][k].set_xlabel("edges kept (bisect points)")
        for row in axes:
            row[k].grid(alpha=0.3)
            row[k].legend(fontsize=7)
    axes[0][0].set_ylabel("test accuracy")
    axes[1][0].set_ylabel("test accuracy")
    wd.savefig(fig, f"{tag}_ablations.png")


def _plot_graph(wd, tag, mods, names, nodes_per_layer) -> None:
    fig = Figure(figsize=(2.2 * len(names) + 1, 7))
    ax = fig.subplots()
    modularity.draw_modules(ax, mods, names, nodes_per_layer)
    ax.set_title(
        f"LIB interaction graph, {mods.num_modules} Leiden modules, Q = {mods.modularity:.3f}"
    )
    wd.savefig(fig, f"{tag}_graph.png")


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
            tag = f"{task}_seed{seed}"
            sub = runtime.Workdir(os.path.join(workdir, tag))
            if not config.train_only and os.path.exists(sub.file("analysis.json")):
                with open(
                    sub.file("analysis.json")
                ) as f:  # this seed was analysed by an earlier run
                    runs[tag] = json.load(f)
                continue
            if task == "mlp":
                trained = train_mlp(config, int(seed), sub, data)
            else:
                trained = train_modadd(config, int(seed), sub)
            row = {"task": task, "seed": int(seed), "train_accuracy": trained.train_accuracy,
                   "test_accuracy": trained.test_accuracy,
                   "trained_steps": trained.history[-1]["step"] if trained.history else None}  # fmt: skip
            if not config.train_only:
                net = (
                    mlp_network(config, trained, data)
                    if task == "mlp"
                    else modadd_network(config, trained)
                )
                row.update(analyse(config, net, trained, wd, tag))
                row = runtime.jsonable(row)
                if sub.is_main:
                    with open(sub.file("analysis.json"), "w") as f:
                        json.dump(row, f)
            runs[tag] = row
    if config.train_only or not config.write_results:
        return runs
    return wd.write_results({"preset": config.preset, "runs": runs, "summary": summarise(runs)})


def summarise(runs: dict) -> dict:
    """Per task, each basis's mean over seeds of the edges needed per transition and of the basis sizes."""
    runs = {k: _int_keys(v) for k, v in runs.items()}
    out = {}
    for task in TASKS:
        rows = [r for r in runs.values() if r["task"] == task and "edges" in r]
        if not rows:
            continue
        t = {}
        for basis in rows[0]["edges"]:
            needed = np.array(
                [[e.get("n_needed", np.nan) for e in r["edges"][basis]] for r in rows], float
            )
            sizes = np.array([r["bases"][basis]["sizes"] for r in rows], float)
            t[basis] = {"edges_needed_mean": needed.mean(0).tolist(),
                        "edges_needed_per_seed": needed.T.tolist(),
                        "sizes_mean": sizes.mean(0).tolist()}  # fmt: skip
        if "lib" in t and "pca" in t:
            t["lib_sparser_first_transition"] = bool(
                t["lib"]["edges_needed_mean"][0] < t["pca"]["edges_needed_mean"][0]
            )
        t["seeds"] = [r["seed"] for r in rows]
        out[task] = t
    return out


def _int_keys(row: dict) -> dict:
    """Curves and bisect scores keyed by ints again after a JSON round trip."""
    for basis in row.get("nodes", {}).values():
        basis["curves"] = [{int(k): v for k, v in c.items()} for c in basis["curves"]]
    for transitions in row.get("edges", {}).values():
        for t in transitions:
            t["scores"] = {int(k): v for k, v in t["scores"].items()}
    return row


def summarize_sweep(rows: list[dict], workdir: str) -> None:
    """The sweep's gather hook: the mean over the points' seeds (sweep_summary.json)."""
    runs = {}
    for row in rows:
        runs.update(row.get("runs", {}))
    with open(os.path.join(workdir, "sweep_summary.json"), "w") as f:
        json.dump(runtime.jsonable(summarise(runs)), f, indent=2)


def _cells(values) -> str:
    return " / ".join(
        "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values
    )


def _task_section(task: str, rows: list[dict], summary: dict) -> list[str]:
    names = rows[0]["node_layers"]
    bases = list(rows[0]["bases"])
    trans = [f"{a} -> {b}" for a, b in zip(names[:-1], names[1:], strict=True)]
    lines = [
        f"### {'Modular addition' if task == 'modadd' else 'MLP'}",
        "",
        "| seed | train acc | test acc | steps | "
        + " | ".join(f"{b.upper()} sizes ({' / '.join(names)})" for b in bases) + " |",
        "|---|---|---|---|" + "---|" * len(bases),
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['train_accuracy']:.4f} | {r['test_accuracy']:.4f} | {r['trained_steps']} | "
            + " | ".join(_cells(r["bases"][b]["sizes"]) for b in bases) + " |"
        )  # fmt: skip
    lines += [
        "",
        f"Edges needed to keep test accuracy within 0.001 (bisect), per transition ({' / '.join(trans)}), "
        "the edges holding 90% of the edge mass, and the directions needed for 99% of the accuracy (node "
        "ablation, exponential schedule) per layer:",
        "",
        "| seed | basis | edges needed | of | 90% mass | nodes for 99% | Lambda > 1e-4 max | Leiden modules of >= 2 nodes, of all (Q) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        for b in bases:
            e = r["edges"][b]
            mod = r["modularity"].get(b)
            lines.append(
                f"| {r['seed']} | {b} | {_cells([t.get('n_needed') for t in e])} | "
                f"{_cells([t['n_edges'] for t in e])} | {_cells([t['concentration90'] for t in e])} | "
                f"{_cells(r['nodes'][b]['n_for_99pct'])} | {_cells(r['bases'][b]['above_1e-4_of_max'])} | "
                + (f"{mod.get('num_nontrivial_modules', '-')} of {mod['num_modules']} ({mod['modularity']:.3f})"
                   if mod else "-") + " |"
            )  # fmt: skip
    if summary:
        lines += ["", "Mean over seeds " + str(summary["seeds"]) + ": edges needed per transition "
                  + "; ".join(f"{b}: {_cells([round(v, 1) for v in summary[b]['edges_needed_mean']])}"
                              for b in bases) + "."]  # fmt: skip
        if "lib_sparser_first_transition" in summary:
            lines[-1] += (" LIB needs " + ("fewer" if summary["lib_sparser_first_transition"] else "no fewer")
                          + " edges than PCA on the first transition in the mean.")  # fmt: skip
    if task == "mlp":
        lines += ["", "rib commits no results for its MNIST MLP (reference notes Sec. 3), so there are no "
                  "paper numbers for this network to stand beside."]  # fmt: skip
    if task == "modadd":
        p = PAPER_MODADD
        lines += [
            "",
            "The paper's modular addition (p = 113; rib's committed float64 graphs, 5 seeds, reference notes "
            "Sec. 3): basis sizes LIB " + _cells(p["sizes"]["lib"]) + ", PCA " + _cells(p["sizes"]["pca"])
            + f"; edges needed on the first transition LIB {p['edges_first']['lib']} (mean 87), PCA "
            f"{p['edges_first']['pca']} (mean 117); means on all transitions LIB {p['edges_mean']['lib']}, "
            f"PCA {p['edges_mean']['pca']}; 90% edge mass on the first two transitions LIB "
            f"{p['concentration90']['lib']}, PCA {p['concentration90']['pca']}; nodes for 99% accuracy LIB "
            f"{p['nodes99']['lib']}, PCA {p['nodes99']['pca']}; Lambda > 1e-4 max per layer "
            f"{p['lambda_above_1e-4']}. The reference notes give no paper number for the modularity score or "
            "the LLC on modular addition (rib has no LLC code), so those have nothing to stand beside.",
        ]  # fmt: skip
    lines += ["", "Degeneracy (per node layer: width, activation-Gram rank, backward-Jacobian-Gram rank, the "
              "free parameter directions each implies; ReLU layers: synchronised groups, dead and always-on "
              "neurons) and the LLC (SGLD, n beta = n / log n):", ""]  # fmt: skip
    for r in rows:
        d = r["degeneracy"]
        layer_txt = "; ".join(
            f"{x['name']}: {x['dim']}, {x['activation_rank']}, {x['jacobian_rank']} "
            f"({x['free_from_activations']} + {x['free_from_jacobians']} free)"
            for x in d["layers"]
        )
        relu_txt = "; ".join(
            f"{k}: groups {v['groups'][:6]}, {v['dead']} dead, {v['always_on']} always on "
            f"({v['free_directions']} free)"
            for k, v in d["relu"].items()
        )
        llc_txt = ""
        if r.get("llc"):
            x = r["llc"]
            llc_txt = (f" LLC {x['llc_mean']:.1f} +- {x['llc_std']:.1f} over chains (N_eff = "
                       f"{x['n_eff']:.0f} of {x['num_parameters']} parameters).")  # fmt: skip
            if x.get("diverged_at_config_step"):
                llc_txt += (f" (SGLD diverged at the configured step, so the LLC was taken at step "
                            f"{x['step_size']:g}.)")  # fmt: skip
        lines.append(f"- seed {r['seed']}: {layer_txt}. {relu_txt}.{llc_txt}")
    for r in rows:
        tag = f"{task}_seed{r['seed']}"
        lines += ["", f"![{tag} spectra](./{tag}_spectra.png)", "",
                  f"![{tag} ablations](./{tag}_ablations.png)"]  # fmt: skip
        if "lib" in r["modularity"]:
            lines += ["", f"![{tag} LIB graph by module](./{tag}_graph.png)"]
    return lines


def report(results: dict, workdir: str) -> str:
    """A markdown section: per task and seed the basis sizes, edges needed, concentration, node ablation,
    modularity, degeneracy and LLC, beside the paper's modular-addition numbers, with the plots."""
    lines = [
        "## Interaction basis",
        "",
        "The local interaction basis (LIB) of networks trained here, against PCA and the neuron basis "
        "(rib's paper configs: jacobian basis, squared edges, alpha = 1, centred, float64; relative "
        "truncation threshold; bases built on the training data, ablations scored on the test data).",
        "",
    ]
    runs = list(results["runs"].values())
    for task in TASKS:
        rows = [r for r in runs if r["task"] == task and "bases" in r]
        if rows:
            lines += _task_section(task, rows, results.get("summary", {}).get(task)) + [""]
    return "\n".join(lines)


if __name__ == "__main__":
    runtime.main(run)
