r"""Distribution Transformers (Whittle et al., arXiv 2502.02463): train on a task's meta-prior, score against exact
references and numpyro / filtering baselines.

    python -m theorax.experiments.distribution_transformer \
        --config=configs/distribution_transformer.py:cpu --workdir=results/distribution_transformer_cpu

Presets: `smoke` (task (a) alone, tiny, no baselines: ~15 s, for tests), `cpu` (tasks (a) and (b) in a few minutes; the demo), and one per task at
the paper's scale: `gmm_linear` (a), `invgamma_narrow` and `invgamma_wide` (b), `sensor_fusion` (c),
`gp_hyperprior` (d), `quantum` (e); `sensor_fusion_cpu` is task (c) sized for ~30 minutes of a 2-core CPU (with
self-fed priors). A run trains and evaluates every entry of `config.tasks`, each in
`WORKDIR/<entry>/`; override one with e.g. `--config.tasks.invgamma_wide.train.num_steps=4000`.
"""

import ml_collections

PRESETS = (
    "smoke",
    "cpu",
    "gmm_linear",
    "invgamma_narrow",
    "invgamma_wide",
    "sensor_fusion",
    "sensor_fusion_cpu",
    "gp_hyperprior",
    "quantum",
)


def _entry(
    task: str, *, k: int, d_model: int, heads: int, ff: int, layers: int = 6
) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = task
    c.seed = 0
    c.model = ml_collections.ConfigDict(
        dict(
            num_components=k,
            d_model=d_model,
            num_heads=heads,
            num_layers=layers,
            dim_feedforward=ff,
            component_hidden=(32,),
            observation_hidden=(32,),
            prior_hidden=(32,),
            conversion_hidden=(64,),
            jitter=1e-6,
        )
    )
    # The official code counts epochs of 100 steps; steps here = epochs * 100.
    c.train = ml_collections.ConfigDict(
        dict(
            batch_size=5000,
            num_steps=1000,
            warmup_steps=100,
            learning_rate=1e-3,
            weight_decay=0.0,
            use_prior_loss=True,
            checkpoint_every=500,
            log_every=50,
            # Self-fed priors (inference.distribution_transformer.training.PriorFeedback; filtering tasks
            # only, not in the paper): the share of each batch whose priors are the model's own predicted
            # posteriors.
            feedback_fraction=0.0,
            feedback_reset_prob=0.02,
            feedback_start=0,
        )
    )
    c.task_kwargs = ml_collections.ConfigDict()
    c.eval = ml_collections.ConfigDict()
    c.eval.update(num_problems=1000, num_kl_samples=10_000, latency_repeats=20, chunk=100)
    # more independent sets of num_problems the transformer alone is scored on: a mean KL pooled over them,
    # since a few extreme observations can move the mean of one set of 1,000 by 2x
    c.eval.extra_problem_sets = 0
    # NUTS, SVI (svi_gmm_components: the Gaussian-mixture guide; 0 skips it), importance sampling, filters
    c.baselines = ml_collections.ConfigDict()
    c.baselines.update(nuts_problems=100, nuts_warmup=500, nuts_samples=1000, nuts_chains=4)
    c.baselines.update(svi_problems=1000, svi_steps=2000, svi_learning_rate=0.01, svi_particles=10)
    c.baselines.update(svi_gmm_components=4, is_samples=20_000)
    c.baselines.update(pf_particles=1000, filter_series=100, filter_steps=100)
    return c


def gmm_linear() -> ml_collections.ConfigDict:
    """Task (a), the official toy config: d = 1, k = 2, H = R = 1; 32/8/2048, batch 5000, lr 1e-3, 10 epochs
    (5 warm-up)."""
    c = _entry("gmm_linear", k=2, d_model=32, heads=8, ff=2048)
    c.train.update(num_steps=1000, warmup_steps=500, learning_rate=1e-3)
    return c


def invgamma(which: str) -> ml_collections.ConfigDict:
    """Task (b), DT-5: 64/8/256, batch 5000, lr 5e-3, no prior loss; narrow 11 epochs (1 warm-up), wide 20 (5)."""
    c = _entry(f"invgamma_{which}", k=5, d_model=64, heads=8, ff=256)
    steps, warmup = (1100, 100) if which == "narrow" else (2000, 500)
    c.train.update(num_steps=steps, warmup_steps=warmup, learning_rate=5e-3, use_prior_loss=False)
    c.eval.extra_problem_sets = 9  # 10,000 problems in all
    return c


def sensor_fusion() -> ml_collections.ConfigDict:
    """Task (c), DT-4: 64/8/2048, batch 5000, lr 1e-3, 20 epochs (5 warm-up); jitter 1e-5; the official
    meta-prior (`default_scale_multiple: 16`, `scale_eps: 1e-4`, both for the means and the Wishart)."""
    c = _entry("sensor_fusion", k=4, d_model=64, heads=8, ff=2048)
    c.model.jitter = 1e-5
    c.task_kwargs = ml_collections.ConfigDict(
        dict(
            default_scale_multiple=16.0,
            scale_eps=1e-4,
            # the components' Wishart scale; None = default_scale_multiple (official), 1.0 = this port's
            # earlier means-only reading (an ablation)
            wishart_scale=ml_collections.config_dict.placeholder(float),
        )
    )
    c.train.update(num_steps=2000, warmup_steps=500, learning_rate=1e-3)
    return c


def sensor_fusion_cpu() -> ml_collections.ConfigDict:
    """Task (c) sized for about 30 minutes of training on a 2-core CPU: 64/8/512, 4 layers, 14,000 steps of
    batch 512 (7.2M problems; the paper's config draws 2.5M-10M), lr 1e-3, with self-fed priors on three
    quarters of each batch (not in the paper; `inference.distribution_transformer.training.PriorFeedback`)."""
    c = sensor_fusion()
    c.model.update(num_layers=4, dim_feedforward=512)
    c.train.update(batch_size=512, num_steps=14_000, warmup_steps=700, learning_rate=1e-3)
    c.train.update(checkpoint_every=1000, log_every=100, feedback_fraction=0.75, feedback_start=700)
    return c


def gp_hyperprior() -> ml_collections.ConfigDict:
    """Task (d), DT-20: 256/16/5096, batch 1000, lr 1e-4, 300 epochs (5 warm-up)."""
    c = _entry("gp_hyperprior", k=20, d_model=256, heads=16, ff=5096)
    c.train.update(batch_size=1000, num_steps=30_000, warmup_steps=500, learning_rate=1e-4)
    return c


def quantum() -> ml_collections.ConfigDict:
    """Task (e), DT-5: 64/8/2048, batch 2000, lr 1e-3, 50 epochs (10 warm-up); prior MLP [32, 64], conversion
    MLPs [64, 64]."""
    c = _entry("quantum", k=5, d_model=64, heads=8, ff=2048)
    c.model.update(prior_hidden=(32, 64), conversion_hidden=(64, 64))
    c.train.update(batch_size=2000, num_steps=5000, warmup_steps=1000, learning_rate=1e-3)
    return c


def _small(
    c: ml_collections.ConfigDict, *, steps: int, batch: int, lr: float, layers=2, d_model=32
):
    """Shrinks an entry to CPU scale (same task, smaller model, fewer samples)."""
    c.model.update(d_model=d_model, num_heads=4, num_layers=layers, dim_feedforward=128)
    c.train.update(
        batch_size=batch,
        num_steps=steps,
        warmup_steps=max(steps // 10, 1),
        learning_rate=lr,
        checkpoint_every=steps,
        log_every=max(steps // 20, 1),
    )
    c.eval.extra_problem_sets = 0
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "cpu"
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r}; choose from {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.preset = arg
    config.tasks = ml_collections.ConfigDict()
    if arg == "smoke":
        # One task and no baselines: compiling NUTS and the SVI fits took most of a minute, and each task's
        # train step compiles on its own; the `cpu` preset and tests/distribution_transformer/ run the rest.
        a = _small(gmm_linear(), steps=20, batch=32, lr=3e-3, layers=1, d_model=16)
        a.eval.update(num_problems=16, num_kl_samples=200, latency_repeats=2, chunk=16)
        a.baselines.update(nuts_problems=0, svi_problems=0, is_samples=0)
        config.tasks.gmm_linear = a
    elif arg == "cpu":
        a = _small(gmm_linear(), steps=1500, batch=256, lr=1e-2)
        narrow = _small(invgamma("narrow"), steps=1200, batch=256, lr=3e-3, layers=3, d_model=64)
        wide = _small(invgamma("wide"), steps=1200, batch=256, lr=3e-3, layers=3, d_model=64)
        for c in (a, narrow, wide):
            c.eval.update(num_problems=1000, num_kl_samples=2000)
            c.baselines.update(nuts_problems=20, svi_problems=200)
        config.tasks.gmm_linear = a
        config.tasks.invgamma_narrow = narrow
        config.tasks.invgamma_wide = wide
    elif arg == "gmm_linear":
        config.tasks.gmm_linear = gmm_linear()
    elif arg in ("invgamma_narrow", "invgamma_wide"):
        config.tasks[arg] = invgamma(arg.split("_")[1])
    elif arg == "sensor_fusion":
        config.tasks.sensor_fusion = sensor_fusion()
    elif arg == "sensor_fusion_cpu":
        config.tasks.sensor_fusion = sensor_fusion_cpu()
    elif arg == "gp_hyperprior":
        config.tasks.gp_hyperprior = gp_hyperprior()
    elif arg == "quantum":
        config.tasks.quantum = quantum()
    return config


def get_sweep():
    """DT-2 vs DT-5 on both inverse-gamma meta-priors (the paper's Table 1 ablation over k)."""
    return [
        {"tasks.invgamma_wide.model.num_components": k, "tasks.invgamma_wide.seed": s}
        for k in (2, 5)
        for s in (0, 1)
    ]
