r"""Interaction-basis analysis (Bushnaq et al.): the local interaction basis of trained networks, its interaction
graph, ablations, modularity, degeneracy measures and the LLC.

    python -m theorax.experiments.interaction_basis --config=configs/interaction_basis.py:cpu --workdir=results/ib_cpu
    python -m theorax.experiments.interaction_basis --config=configs/interaction_basis.py:mnist --workdir=DIR \
        --config.mlp.data.name=mnist --config.mlp.data.dir=../shared/data/mnist
    python -m theorax.experiments.interaction_basis --config=configs/interaction_basis.py:modadd --workdir=DIR
    python -m theorax.experiments.sweep --config=configs/interaction_basis.py:modadd --workdir=DIR   # one seed each

Presets:
  smoke    seconds: a tiny MLP on digits (tests; its tiny modular-addition settings serve the slow test).
  cpu      the demo: the 64-100-100-10 MLP on scikit-learn digits (the official MNIST recipe:
           Adam 1e-3, batch 64, 12 epochs) and a small modular-addition transformer (p = 31, 70% train,
           d_model 64, 4 x 16 heads, d_mlp 256, the paper's AdamW recipe, 3,000 epochs), seeds 0-2 (0 and 2
           grok; seed 1 reached test accuracy 0.88 in 3,000 epochs).
  mnist    the official MLP recipe, 784-100-100-10 with data.name=mnist (digits by default: 64 inputs).
  modadd   the paper's modular addition: p = 113, 30% train, the one-layer transformer (d_model 128, 4 x 32
           heads, d_mlp 512, ReLU, no LayerNorm), AdamW lr 1e-3, weight decay 1, betas (0.9, 0.98), 10 warm-up
           steps, full batch, 60,000 epochs (rib_scripts/train_modular_arithmetic), seeds 0-2; LIB and PCA
           built on the train split, ablations on the test split.

`get_sweep()` runs the modadd seeds 0-4 one per point (their `summarize_sweep` gathers the mean over seeds).
Any key can be overridden, e.g. `--config.modadd.seeds=(0,1,2,3,4) --config.analysis.threshold=1e-10`.
"""

import ml_collections

PRESETS = ("smoke", "cpu", "mnist", "modadd")


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.tasks = ("mlp", "modadd")  # which networks to train and analyse
    c.train_only = False  # train (resumably) and stop: no analysis, no results.json
    c.write_results = (
        True  # False: analyse each seed (kept in <task>_seed<k>/analysis.json), no results.json
    )

    # The MLP (rib_scripts/train_mlp): Linear -> ReLU hidden layers, Adam, cross-entropy.
    c.mlp = ml_collections.ConfigDict()
    c.mlp.data = ml_collections.ConfigDict()
    c.mlp.data.name = "digits"  # digits | mnist | fashion_mnist
    c.mlp.data.dir = ""
    c.mlp.hidden = (100, 100)
    c.mlp.epochs = 12
    c.mlp.batch_size = 64
    c.mlp.lr = 1e-3
    c.mlp.seeds = (0,)
    c.mlp.n_basis = 10_000  # training examples the basis is built on (all of them when fewer)
    c.mlp.checkpoint_every = 2000

    # Modular addition (rib_scripts/train_modular_arithmetic, Nanda et al.'s grokking recipe).
    c.modadd = ml_collections.ConfigDict()
    c.modadd.p = 113
    c.modadd.frac_train = 0.3
    c.modadd.data_seed = 0  # the train/test split (the same for every model seed, as rib)
    c.modadd.d_model = 128
    c.modadd.n_heads = 4
    c.modadd.d_head = 32
    c.modadd.d_mlp = 512
    c.modadd.epochs = 60_000  # full batch: one step per epoch
    c.modadd.lr = 1e-3
    c.modadd.weight_decay = 1.0
    c.modadd.b1 = 0.9
    c.modadd.b2 = 0.98
    c.modadd.warmup_steps = 10
    c.modadd.seeds = (0, 1, 2)
    c.modadd.eval_every = 500
    c.modadd.checkpoint_every = 2000
    # Early stop (0 = off): once test accuracy has stayed >= stop_accuracy for stop_patience epochs.
    c.modadd.stop_accuracy = 0.0
    c.modadd.stop_patience = 2000

    # The analysis (rib's paper configs: jacobian basis, squared edges, gradient (alpha = 1), centred, float64).
    c.analysis = ml_collections.ConfigDict()
    c.analysis.bases = ("lib", "pca", "neuron")
    c.analysis.threshold = (
        1e-12  # relative: keep eigenvalues > threshold * the largest (Gram and Lambda)
    )
    c.analysis.absolute_threshold = (
        0.0  # > 0: rib's absolute threshold instead (its paper configs: 1e-15)
    )
    c.analysis.dtype = "float64"
    c.analysis.batch_size = 512  # examples per accumulation step (memory is bounded by it)
    c.analysis.integration = "gradient"  # gradient | trapezoidal | gauss-legendre
    c.analysis.n_intervals = 0
    c.analysis.node_schedule = "exponential"  # exponential | linear
    c.analysis.node_points = 12
    c.analysis.edge_schedule = "bisect"  # bisect | exponential | linear
    c.analysis.edge_points = 12
    c.analysis.score_target_difference = 0.001  # accuracy, as rib's bisect configs
    c.analysis.modularity_gamma = 1.0
    c.analysis.modularity_seed = 0
    c.analysis.draw_nodes_per_layer = 30

    # The local learning coefficient by SGLD (devinterp's estimator: localised, n beta = n / log n).
    c.llc = ml_collections.ConfigDict()
    c.llc.enabled = True
    c.llc.num_chains = 4
    c.llc.num_draws = 400
    c.llc.num_burnin = 100
    c.llc.step_size = 1e-4
    c.llc.localization = 100.0
    c.llc.batch_size = 256
    return c


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    c = base()
    c.preset = arg
    if arg == "smoke":
        c.tasks = ("mlp",)
        c.analysis.bases = ("lib", "pca")
        c.mlp.hidden = (16, 16)
        c.mlp.epochs = 2
        c.mlp.n_basis = 300
        c.modadd.update(
            dict(p=11, frac_train=0.5, d_model=16, n_heads=2, d_head=8, d_mlp=32, epochs=50, seeds=(0,),
                 eval_every=25, checkpoint_every=50)
        )  # fmt: skip
        c.analysis.node_points = 4
        c.analysis.edge_points = 4
        c.llc.num_chains = 2
        c.llc.num_draws = 20
        c.llc.num_burnin = 5
    elif arg == "cpu":
        c.modadd.update(
            dict(p=31, frac_train=0.7, d_model=64, d_head=16, d_mlp=256, epochs=3000, eval_every=250,
                 checkpoint_every=1000)
        )  # fmt: skip
    elif arg == "mnist":
        c.tasks = ("mlp",)
    elif arg == "modadd":
        c.tasks = ("modadd",)
        # 60,000 epochs do not fit a session on 2 shared cores: stop once grokked (a documented deviation).
        c.modadd.stop_accuracy = 0.99
        c.modadd.stop_patience = 1000
    else:
        raise ValueError(f"unknown preset {arg!r}; choose one of {list(PRESETS)}")
    return c


def get_sweep():
    """The modadd preset's seeds, one per point (`python -m theorax.experiments.sweep ...:modadd`)."""
    return [{"modadd.seeds": (s,)} for s in range(5)]
