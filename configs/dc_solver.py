r"""DC-Solver (Zhao et al., ECCV 2024): MSE of fast samplers to the ground-truth sample, with searched ratios.

    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:cpu --workdir=results/dc_solver_cpu
    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:grid --workdir=results/dc_solver_grid
    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:learned --workdir=results/dc_solver_digits
    python -m theorax.experiments.dc_solver --config=configs/dc_solver.py:learned --workdir=DIR \
        --config.data.name=mnist --config.data.dir=../shared/data/mnist

Presets:
  smoke    seconds: an 8-dimensional mixture, one setting, a 5-iteration search (tests).
  cpu      the demo, a few minutes: a class-conditional Gaussian mixture in 64 dimensions (10 classes x 3
           components), NFE 5/6/8/10 x CFG 1/3/7.5, DDIM / DPM-Solver++ 2M / UniPC / DC (searched, 3 seeds) /
           DC (CPR fitted on a disjoint (NFE, CFG) grid).
  learned  the same comparison on a small learned noise-prediction MLP trained on scikit-learn digits
           (data.name=mnist / fashion_mnist with data.dir for the IDX files).
  grid     the CPR fit: ratios searched on a dense (NFE, CFG) grid, held-out prediction error, coefficients
           written in the official 36-number layout (cpr_coeffs.npy).

Any key can be overridden, e.g. `--config.eval.cfgs=(1.0,7.5) --config.search.seeds=(0,1,2,3,4)`.
"""

import ml_collections

PRESETS = ("smoke", "cpu", "learned", "grid")


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = "mixture"  # mixture | learned
    c.schedule = "sd_scaled_linear"  # sd_scaled_linear | ldm_linear | linear | cosine

    # The analytic benchmark: a class-conditional mixture, components_per_class per class.
    c.mixture = ml_collections.ConfigDict()
    c.mixture.dim = 64
    c.mixture.num_classes = 10
    c.mixture.components_per_class = 3
    c.mixture.mean_scale = 1.0  # means ~ N(0, mean_scale^2 I)
    c.mixture.std_min = 0.3
    c.mixture.std_max = 0.6
    c.mixture.seed = 0

    # The learned model (model=learned).
    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"  # digits | mnist | fashion_mnist
    c.data.dir = ""
    c.train = ml_collections.ConfigDict()
    c.train.steps = 6000
    c.train.batch_size = 256
    c.train.lr = 2e-3
    c.train.features = 256
    c.train.depth = 3
    c.train.label_dropout = 0.1
    c.train.checkpoint_every = 2000

    # The samplers (the LDM setting of the paper: UniPC-3 bh1, time-uniform steps).
    c.solver = ml_collections.ConfigDict()
    c.solver.order = 3
    c.solver.variant = "bh1"
    c.solver.spacing = "time_uniform"
    c.solver.dpm_order = 2  # DPM-Solver++ 2M, the recommended guided sampler

    c.eval = ml_collections.ConfigDict()
    c.eval.nfes = (5, 6, 8, 10)
    c.eval.cfgs = (1.0, 3.0, 7.5)
    c.eval.num_samples = 500
    c.eval.seed = 1234
    c.eval.gt_solver = (
        "ddim"  # the ground-truth sample: DDIM with gt_nfe steps (the paper's protocol)
    )
    c.eval.gt_nfe = 1000
    c.eval.check_nfe = (
        300  # DPM-Solver++ 3M with this many steps estimates the ground truth's error
    )

    # The ratio search (DC-Solver Sec. 3.3).
    c.search = ml_collections.ConfigDict()
    c.search.seeds = (0, 1, 2)
    c.search.num_points = 10
    c.search.gt_steps = 200
    c.search.gt_mode = "aligned"  # aligned | ldm (the official nearest-neighbour lookup)
    c.search.num_iters = 40
    c.search.lr = 0.1
    c.search.weight_decay = 0.01

    # CPR: searched on this grid (disjoint from eval's settings), then predicted for eval's settings.
    c.cpr = ml_collections.ConfigDict()
    c.cpr.nfes = (4, 7, 9, 12)
    c.cpr.cfgs = (2.0, 5.0, 9.0)
    c.cpr.ridge = 0.0
    c.cpr.holdout = False  # grid: also report held-out error of a leave-one-setting-out fit
    return c


def get_config(arg: str = "cpu") -> ml_collections.ConfigDict:
    c = base()
    c.preset = arg
    if arg == "smoke":
        c.mixture.dim = 8
        c.mixture.num_classes = 3
        c.mixture.components_per_class = 2
        c.eval.nfes = (5,)
        c.eval.cfgs = (1.0, 7.5)
        c.eval.num_samples = 32
        c.eval.gt_nfe = 60
        c.eval.check_nfe = 30
        c.search.seeds = (0,)
        c.search.gt_steps = 30
        c.search.num_iters = 5
        c.cpr.nfes = (5,)
        c.cpr.cfgs = (2.0, 9.0)
        c.cpr.ridge = 1e-3
    elif arg == "cpu":
        pass
    elif arg == "learned":
        c.model = "learned"
        c.eval.num_samples = 300
        c.cpr.nfes = (5, 7, 9)
        c.cpr.cfgs = (2.0, 5.0, 9.0)
    elif arg == "grid":
        c.eval.nfes = (5, 6, 8, 10)
        c.eval.cfgs = (1.0, 3.0, 7.5)
        c.search.seeds = (0,)
        c.cpr.nfes = (4, 5, 6, 7, 8, 9, 10, 12)
        c.cpr.cfgs = (1.0, 2.0, 3.0, 5.0, 7.5, 9.0)
        c.cpr.holdout = True
    else:
        raise ValueError(f"unknown preset {arg!r}; choose one of {list(PRESETS)}")
    return c
