"""Samplers, dynamic compensation, the ratio search and CPR: against closed forms and a second implementation."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import solve_ivp
from theorax.inference import dc_solver as dcs
from theorax.inference.dc_solver import solvers as ds
from theorax.models import diffusion as D
from theorax.third_party import dc_solver as tp

# The official Stable Diffusion 2.1 CPR coefficients (DC-Solver repository,
# diffusers/dc_solver/cpr_coeffs_path/sd2.1.npy; shared/reference/dc_solver_cpr_sd21.npy), 36 float64.
SD21_CPR = np.array([
    1523.67661966, -1111.47464508, 198.38349618, -1346.08900228, 1007.19494126, -186.25475774,
    168.39730243, -128.03894894, 24.88478975, -8140.64401858, 5906.74827912, -1035.99411231,
    6941.4138994, -5193.98065982, 950.3205653, -848.21046751, 650.69033333, -121.28674277,
    13309.27038462, -9616.67032053, 1668.76859621, -11037.10779439, 8256.66668566, -1503.79920359,
    1293.97404351, -999.56293282, 188.22170414, -6747.42182161, 4853.15305335, -835.51167928,
    5489.11518378, -4096.89721821, 743.09534131, -619.56127633, 480.14971466, -90.89633129,
])  # fmt: skip


def _problem(seed=0, d=4, batch=6, classes=True):
    rng = np.random.default_rng(seed)
    means = 1.5 * rng.normal(size=(6, d))
    stds = rng.uniform(0.2, 0.5, size=6)
    if classes:
        mix = D.GaussianMixture.class_conditional(means, stds, np.kron(np.eye(3), np.ones((1, 2))))
    else:
        mix = D.GaussianMixture(np.ones(6), means, stds)
    x_T = jnp.asarray(rng.normal(size=(batch, d)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=batch))
    return mix, x_T, labels


SCHED = D.VPSchedule.named("sd_scaled_linear")


# ------------------------------------------------------------------- a second implementation


def _official_loop(eps, x, schedule, ts, ratios, order, variant):
    """UniPC-bh + DC in float64 numpy, written as the official `DCSolver.sample` loop (lists, pops)."""
    lam = lambda t: float(schedule.lambda_(t))
    al = lambda t: float(schedule.alpha(t))
    sg = lambda t: float(schedule.sigma(t))
    model = lambda x, t: (x - sg(t) * eps(x, t)) / al(t)

    def update(x, ms, tps, t, p, corrector):
        h = lam(t) - lam(tps[-1])
        rks, d1s = [], []
        for i in range(1, p):
            rk = (lam(tps[-(i + 1)]) - lam(tps[-1])) / h
            rks.append(rk)
            d1s.append((ms[-(i + 1)] - ms[-1]) / rk)
        rks.append(1.0)
        hh = -h
        h_phi_1 = math.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else math.expm1(hh)
        big_r, b, fac = [], [], 1
        for i in range(1, p + 1):
            big_r.append(np.power(rks, i - 1))
            b.append(h_phi_k * fac / b_h)
            fac *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fac
        big_r, b = np.array(big_r), np.array(b)
        x_base = sg(t) / sg(tps[-1]) * x - al(t) * h_phi_1 * ms[-1]
        pred = 0
        if d1s:
            rp = np.array([0.5]) if p == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1])
            pred = sum(r * dd for r, dd in zip(rp, d1s, strict=True))
        x_t = x_base - al(t) * b_h * pred
        if not corrector:
            return x_t, None
        m_t = model(x_t, t)
        rc = np.array([0.5]) if p == 1 else np.linalg.solve(big_r, b)
        corr = sum(r * dd for r, dd in zip(rc[:-1], d1s, strict=True)) if d1s else 0
        return x_base - al(t) * b_h * (corr + rc[-1] * (m_t - ms[-1])), m_t

    def compensate(ms, tps, ratio):
        tp_ = tps[-1] * ratio + tps[-2] * (1 - ratio)
        out = 0
        for i in range(3):
            term = ms[-(i + 1)]
            for j in range(3):
                if i != j:
                    term = term * (tp_ - tps[-(j + 1)]) / (tps[-(i + 1)] - tps[-(j + 1)])
            out = out + term
        return out

    ratios = list(ratios)
    nfe = len(ts) - 1
    ms, tps = [model(x, ts[0])], [ts[0]]
    for step in range(1, nfe + 1):
        ratio = ratios.pop(0)
        if ratio != 1.0 and len(ms) >= 3:
            ms[-1] = compensate(ms, tps, ratio)
        p = min(order, step, nfe + 1 - step)
        x, m_new = update(x, ms, tps, ts[step], p, corrector=step < nfe)
        ms.append(m_new)
        tps.append(ts[step])
    return x


@pytest.mark.parametrize("order,variant,nfe", [(3, "bh1", 6), (2, "bh2", 7)])
def test_dc_matches_the_official_loop(order, variant, nfe):
    mix, x_T, _ = _problem(classes=False)
    ratios = np.array([1.0, 1.0, 1.2, 0.85, 1.1, 0.95, 1.3])[:nfe]
    with jax.enable_x64(True):
        x64 = jnp.asarray(x_T, jnp.float64)
        ours = dcs.sample(
            mix.eps_fn(SCHED),
            x64,
            SCHED,
            nfe=nfe,
            solver="dc",
            order=order,
            variant=variant,
            ratios=ratios,
        )
        eps = lambda x, t: np.asarray(mix.eps(jnp.asarray(x), t, SCHED))
        ref = _official_loop(
            eps, np.asarray(x64), SCHED, D.time_steps(SCHED, nfe), ratios, order, variant
        )
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-11)


def test_dc_with_unit_ratios_equals_unipc_exactly():
    mix, x_T, labels = _problem()
    fn = mix.eps_fn(SCHED)
    for order, variant in [(3, "bh1"), (2, "bh2")]:
        g = dcs.Guidance(labels, 7.5)
        unipc = dcs.sample(
            fn, x_T, SCHED, nfe=7, solver="unipc", order=order, variant=variant, guidance=g
        )
        dc = dcs.sample(
            fn,
            x_T,
            SCHED,
            nfe=7,
            solver="dc",
            order=order,
            variant=variant,
            guidance=g,
            ratios=np.ones(7),
        )
        np.testing.assert_array_equal(np.asarray(dc), np.asarray(unipc))
        moved = dcs.sample(
            fn, x_T, SCHED, nfe=7, solver="dc", order=order, variant=variant, guidance=g,
            ratios=np.array([1, 1, 1.1, 1, 1, 1, 1.0]),
        )  # fmt: skip
        assert not np.allclose(moved, unipc)  # and the ratios do act


def test_dc_plug_in_on_dpm_solver_pp():
    """DC as a plug-in on the predictor-only DPM-Solver++: unit ratios change nothing, others act."""
    mix, x_T, labels = _problem(seed=11, batch=10)
    fn = mix.eps_fn(SCHED)
    g = dcs.Guidance(labels, 3.0)
    base = dcs.sample(fn, x_T, SCHED, nfe=6, solver="dpmsolver++", order=2, guidance=g)
    same = dcs.sample(
        fn, x_T, SCHED, nfe=6, solver="dpmsolver++", order=2, guidance=g, ratios=np.ones(6)
    )
    np.testing.assert_array_equal(np.asarray(same), np.asarray(base))
    moved = dcs.sample(
        fn, x_T, SCHED, nfe=6, solver="dpmsolver++", order=2, guidance=g,
        ratios=np.array([1, 1, 1.2, 1, 1, 1.0]),
    )  # fmt: skip
    assert not np.allclose(moved, base)


@pytest.mark.slow
def test_search_on_dpm_solver_pp_plug_in():
    mix, x_T, labels = _problem(seed=11, batch=10)
    fn = mix.eps_fn(SCHED)
    g = dcs.Guidance(labels, 3.0)
    gt = dcs.ddim_reference(fn, x_T, SCHED, D.time_steps(SCHED, 6), steps=120, guidance=g)
    r = dcs.search_ratios(
        fn, x_T, SCHED, nfe=6, solver="dpmsolver++", order=2, guidance=g, targets=gt
    )
    assert r.shape == (6,) and np.all(np.isfinite(r)) and r[0] == r[1] == 1.0
    base = dcs.sample(fn, x_T, SCHED, nfe=6, solver="dpmsolver++", order=2, guidance=g)
    dc = dcs.sample(fn, x_T, SCHED, nfe=6, solver="dpmsolver++", order=2, guidance=g, ratios=r)
    assert float(jnp.mean((dc - gt[-1]) ** 2)) < float(jnp.mean((base - gt[-1]) ** 2))


def test_compensation_weights_interpolate_quadratics():
    times = jnp.array([0.4, 0.6, 0.8])
    np.testing.assert_array_equal(ds.compensation_weights(1.0, times), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(ds.compensation_weights(0.0, times), [0.0, 1.0, 0.0], atol=1e-7)
    q = lambda t: 3.0 * t**2 - 2.0 * t + 0.5
    for rho in (0.3, 1.0, 1.7):
        tp = rho * 0.4 + (1 - rho) * 0.6
        w = ds.compensation_weights(rho, times)
        np.testing.assert_allclose(w @ q(times), q(tp), rtol=1e-5)
        np.testing.assert_allclose(jnp.sum(w), 1.0, rtol=1e-6)


# -------------------------------------------------------------------------------- convergence


def _ode_reference(mix, schedule, x_T):
    """x_0 by DOP853 (rtol 1e-12) on d(x / sigma)/d lambda = e^lambda x0(x, lambda) (DPM-Solver++ Eq. 9)."""
    post = jax.jit(lambda x, t: mix.posterior_mean(x, t, schedule))
    shape = x_T.shape

    def f(lam, y):
        t = float(schedule.inverse_lambda(np.float64(lam)))
        x = schedule.sigma(t) * y.reshape(shape)
        return math.exp(lam) * np.asarray(post(jnp.asarray(x), t)).reshape(-1)

    lam_T, lam_0 = schedule.lambda_(schedule.t_max), schedule.lambda_(schedule.t_min)
    y0 = (np.asarray(x_T) / schedule.sigma(schedule.t_max)).reshape(-1)
    sol = solve_ivp(f, (lam_T, lam_0), y0, method="DOP853", rtol=1e-12, atol=1e-12)
    return sol.y[:, -1].reshape(shape) * schedule.sigma(schedule.t_min)


def _slopes(configs, nfes):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        mix = D.GaussianMixture([0.3, 0.7], rng.normal(size=(2, 3)), [0.5, 0.8])
        schedule = D.VPSchedule.linear()
        x_T = jnp.asarray(rng.normal(size=(4, 3)))
        ref = _ode_reference(mix, schedule, x_T)
        out = {}
        for solver, order, variant in configs:
            errs = []
            for n in nfes:
                x = dcs.sample(
                    mix.eps_fn(schedule), x_T, schedule, nfe=n, solver=solver, order=order,
                    variant=variant, spacing="logSNR", lower_order_final=False,
                )  # fmt: skip
                errs.append(float(np.max(np.abs(np.asarray(x) - ref))))
            out[(solver, order, variant)] = -np.polyfit(np.log(nfes), np.log(errs), 1)[0], errs
        return out


# Theory: DDIM order 1; DPM-Solver++ 2M order 2; UniPC-p order p + 1 (UniPC Thm. 3.1), here with its warm-up
# (UniPC-1 on the first step, itself of order 2). Multistep warm-up steps of order q cap the global order at
# q + 1, so DPM-Solver++ 3M, warmed up by one DDIM step, converges with order 2 (as in diffusers). Each config
# compiles three samplers (~20 s), so the fast tier checks the two the experiments use most.
FAST = [
    (("dpmsolver++", 2, "bh1"), 2.0),
    (("unipc", 2, "bh2"), 3.0),
]
LOW_ORDER = [
    (("ddim", 1, "bh1"), 1.0),
    (("unipc", 1, "bh1"), 2.0),
    (("unipc", 2, "bh1"), 3.0),
]


def _check_orders(configs):
    res = _slopes([c for c, _ in configs], [20, 40, 80])
    for config, expected in configs:
        slope, errs = res[config]
        assert abs(slope - expected) < 0.2, (config, slope, errs)
        assert errs[-1] < 0.06


def test_convergence_orders():
    _check_orders(FAST)


@pytest.mark.slow
def test_convergence_orders_low_order():
    _check_orders(LOW_ORDER)


@pytest.mark.slow
def test_convergence_orders_high_order():
    res = _slopes(
        [("dpmsolver++", 3, "bh1"), ("unipc", 3, "bh1"), ("unipc", 3, "bh2")], [80, 160, 320]
    )
    slope, errs = res[("dpmsolver++", 3, "bh1")]
    assert abs(slope - 2.0) < 0.15, (slope, errs)  # capped by the first-order warm-up
    for variant in ("bh1", "bh2"):
        slope, errs = res[("unipc", 3, variant)]
        assert slope > 3.0, (variant, slope, errs)
        assert errs[-1] < 1e-6


# ------------------------------------------------------------------------- configs and plans


def test_solver_config_is_validated_canonical_and_hashable():
    a = dcs.SolverConfig("unipc", order=np.int64(2), disable_corrector=[3, 0, 3])
    b = dcs.SolverConfig("unipc", order=2, disable_corrector=(0, 3))
    assert a == b and hash(a) == hash(b) and type(a.order) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.order = 3
    cases = [
        (dict(solver="heun"), "unknown solver 'heun'"),
        (dict(solver="unipc", order=4), "order=4 must be 1, 2 or 3"),
        (dict(solver="unipc", order=True), "order=True must be 1, 2 or 3"),
        (dict(solver="unipc", spacing="uniform"), "unknown spacing 'uniform'"),
        (dict(solver="dpmsolver++", dpm_solver_type="euler"), "unknown dpm_solver_type 'euler'"),
        (dict(solver="unipc", disable_corrector=0), "disable_corrector must be a sequence"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            dcs.SolverConfig(**kwargs)
    mix, x_T, _ = _problem(seed=8, classes=False)
    with pytest.raises(TypeError, match="give its options there"):
        dcs.sample(mix.eps_fn(SCHED), x_T, SCHED, nfe=5, solver=a, order=3)
    with pytest.raises(TypeError, match=r"unknown solver options \['ordr'\]"):
        dcs.sample(mix.eps_fn(SCHED), x_T, SCHED, nfe=5, solver="unipc", ordr=3)


def test_sample_takes_a_config_or_its_keywords():
    mix, x_T, labels = _problem(seed=2)
    fn, g = mix.eps_fn(SCHED), dcs.Guidance(labels, 3.0)
    kw = dict(order=2, variant="bh2", spacing="logSNR", disable_corrector=(0,))
    config = dcs.SolverConfig("unipc", **kw)
    chex.assert_trees_all_equal(
        dcs.sample(fn, x_T, SCHED, nfe=6, solver=config, guidance=g),
        dcs.sample(fn, x_T, SCHED, nfe=6, solver="unipc", guidance=g, **kw),
    )
    searched = dcs.search_ratios(
        fn, x_T, SCHED, nfe=5, solver=dataclasses.replace(config, solver="dc"), guidance=g,
        gt_steps=20, num_iters=3,
    )  # fmt: skip
    np.testing.assert_array_equal(
        searched,
        dcs.search_ratios(fn, x_T, SCHED, nfe=5, guidance=g, gt_steps=20, num_iters=3, **kw),
    )


def test_plans_are_immutable_and_cached_by_value():
    config = dcs.SolverConfig("dc")
    ts = config.time_steps(SCHED, 6)
    plan = dcs.make_plan(config, SCHED, ts)
    # An equal schedule built anew, and an equal config, give the same plan; other values do not.
    same = dcs.make_plan(dcs.SolverConfig("dc"), D.VPSchedule.named("sd_scaled_linear"), ts.copy())
    assert same is plan
    other = dcs.make_plan(config, D.VPSchedule.named("ldm_linear"), ts)
    assert not np.allclose(other.pred_m, plan.pred_m)
    for name, array in plan._asdict().items():
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0
        assert array.dtype == (bool if name == "dc_valid" else np.float64)
    chex.assert_shape([plan.pred_m, plan.corr_m], (6, 3))
    np.testing.assert_array_equal(plan.corrector, [1, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        dcs.make_plan(config, SCHED, ts[::-1])


# ------------------------------------------------------------------------------ compilation


def _counting_model(mix):
    """mix's eps as a `Partial` over a function that counts its traces (each trace of a sampler calls it)."""
    traces = []

    def eps(mixture, x, t, labels=None):
        traces.append(1)
        return mixture.eps(x, t, SCHED, labels)

    return eps, jax.tree_util.Partial(eps, mix), traces


def test_new_ratios_and_guidance_scales_do_not_recompile():
    mix, x_T, labels = _problem(seed=5)
    eps, fn, traces = _counting_model(mix)
    dcs.sample(
        fn, x_T, SCHED, nfe=6, solver="dc", ratios=np.ones(6), guidance=dcs.Guidance(labels, 2.0)
    )
    before = len(traces)
    assert before > 0
    for k in range(3):
        ratios = np.array([1, 1, 0.9 + 0.1 * k, 1.1, 1.0, 1.2 - 0.1 * k])
        g = dcs.Guidance(labels, 3.0 + k)
        dcs.sample(fn, x_T + k, SCHED, nfe=6, solver="dc", ratios=ratios, guidance=g)
    # A new mixture of the same shapes (traced through the Partial) does not recompile either.
    mix2, _, _ = _problem(seed=6)
    fn2 = jax.tree_util.Partial(eps, mix2)
    dcs.sample(fn2, x_T, SCHED, nfe=6, solver="dc", ratios=np.ones(6), guidance=g)
    assert len(traces) == before


def test_ratio_and_scale_forms_share_one_program_and_a_new_lambda_does_not():
    """What the docstring of `sample` promises: the forms a user passes are normalised before the jit."""
    mix, x_T, labels = _problem(seed=5)
    _, fn, traces = _counting_model(mix)
    r = [1.0, 1.0, 0.9, 1.1, 1.0, 1.2]
    forms = [r, tuple(r), np.asarray(r, np.float64), np.asarray(r, np.float32), jnp.asarray(r)]
    scales = [2.0, np.float64(2.0), np.asarray(2.0, np.float32), jnp.asarray(2.0), 2]
    outs = []
    for ratios, scale in zip(forms, scales, strict=True):
        g = dcs.Guidance(labels, scale)
        outs.append(dcs.sample(fn, x_T, SCHED, nfe=6, solver="dc", ratios=ratios, guidance=g))
        if len(outs) == 1:
            first = len(traces)
    assert len(traces) == first  # one program for all five forms
    chex.assert_trees_all_equal(*outs)
    # The same options as a SolverConfig are the same program too.
    config = dcs.SolverConfig("dc", order=3, variant="bh1")
    dcs.sample(fn, x_T, SCHED, nfe=6, solver=config, ratios=r, guidance=g)
    assert len(traces) == first
    # A new callable object is a new program (the function is static): a lambda per call recompiles.
    counts = [len(traces)]
    for _ in range(2):
        dcs.sample(lambda x, t: fn(x, t), x_T, SCHED, nfe=6, solver="unipc")
        counts.append(len(traces))
    assert counts[2] - counts[1] == counts[1] - counts[0] > 0


def test_unrolled_sampler_reads_grow_linearly_with_nfe():
    """Each step's combinations are computed once (`solvers._materialize`): without it XLA:CPU fuses them into
    every later step, and the bytes the compiled program reads grow ~3.3x per doubling of NFE (measured)."""
    mix = D.GaussianMixture([0.5, 0.5], [[-1.0] * 8, [1.0] * 8], [0.2, 0.2])
    x_T = jnp.ones((256, 8))
    read = {
        nfe: dcs.lower_sample(
            mix.eps_fn(SCHED), x_T, SCHED, nfe=nfe, solver="dc", ratios=np.ones(nfe)
        )
        .compile()
        .cost_analysis()["bytes accessed"]
        for nfe in (16, 32)
    }
    assert read[32] / read[16] < 2.5, read


# --------------------------------------------------------------------------------- the search


def test_search_recovers_known_ratios_and_beats_unipc():
    """(a) Targets made by DC itself with ratios rho* are reached exactly at rho*: the search must find them.
    (b) Against a DDIM ground truth, the searched ratios beat UniPC (same compiled search, new data)."""
    mix, x_T, labels = _problem(seed=3, batch=10)
    fn = mix.eps_fn(SCHED)
    g = dcs.Guidance(labels, 3.0)
    nfe = 6
    true = np.array([1.0, 1.0, 1.25, 0.85, 1.15, 0.9])
    _, traj = dcs.sample_with_trajectory(
        fn, x_T, SCHED, nfe=nfe, solver="dc", ratios=true, guidance=g
    )
    found, losses = dcs.search_ratios(
        fn, x_T, SCHED, nfe=nfe, guidance=g, targets=traj, return_losses=True
    )
    assert found.shape == (nfe,) and found[0] == 1.0 and found[1] == 1.0
    np.testing.assert_allclose(found, true, atol=0.03)
    assert np.all(losses[2:, -1] <= losses[2:, 0])

    mix, x_T, labels = _problem(seed=4, batch=10)
    fn = mix.eps_fn(SCHED)
    g = dcs.Guidance(labels, 5.0)
    gt = dcs.ddim_reference(fn, x_T, SCHED, D.time_steps(SCHED, nfe), steps=120, guidance=g)
    ratios = dcs.search_ratios(fn, x_T, SCHED, nfe=nfe, guidance=g, targets=gt)
    assert np.all(np.isfinite(ratios)) and not np.allclose(ratios[2:], 1.0)
    unipc = dcs.sample(fn, x_T, SCHED, nfe=nfe, solver="unipc", guidance=g)
    dc = dcs.sample(fn, x_T, SCHED, nfe=nfe, solver="dc", ratios=ratios, guidance=g)
    assert float(jnp.mean((dc - gt[-1]) ** 2)) < float(jnp.mean((unipc - gt[-1]) ** 2))


def test_ddim_reference_modes():
    mix, x_T, _ = _problem(seed=7, classes=False)
    fn = mix.eps_fn(SCHED)
    ts = D.time_steps(SCHED, 5)
    aligned = dcs.ddim_reference(fn, x_T, SCHED, ts, steps=100)
    chex.assert_shape(aligned, (5, *x_T.shape))
    final = dcs.sample_with_trajectory(fn, x_T, SCHED, ts=np.linspace(1.0, 0.001, 101))[0]
    np.testing.assert_allclose(aligned[-1], final, rtol=1e-5, atol=1e-5)
    # The LDM lookup: max{j : ref_ts[j] > t}, strict (reference notes Sec. 1.6).
    ref_ts = (np.arange(0, 1000, 5) + 1)[::-1] / 1000
    assert ref_ts[dcs.ldm_reference_index(ref_ts, 0.001)] == 0.006
    assert ref_ts[dcs.ldm_reference_index(ref_ts, 0.5005)] == 0.501


def test_ddim_reference_ldm_mode_is_compvis_ddim_with_the_official_lookup():
    """mode="ldm" against CompVis' DDIM (eta = 0) written out in float64 numpy from the betas, its states
    labelled as the official search labels them, and the official lookup done by hand."""
    with jax.enable_x64(True):
        mix, x_T, _ = _problem(seed=7, classes=False)
        x_T = np.asarray(x_T, np.float64)
        ts = D.time_steps(SCHED, 5)
        ours = dcs.ddim_reference(
            mix.eps_fn(SCHED), jnp.asarray(x_T), SCHED, ts, steps=200, mode="ldm"
        )
        eps = jax.jit(lambda x, t: mix.eps(x, t, SCHED))
        abar = np.cumprod(1.0 - D.sd_scaled_linear_betas())
        timesteps = (np.arange(0, 1000, 5) + 1)[
            ::-1
        ]  # make_ddim_timesteps("uniform", 200, 1000) + 1
        x, labelled = x_T, []
        for j, k in enumerate(timesteps):
            labelled.append(
                (k / 1000, x)
            )  # x_inter[:-1], each labelled with its step's timestep / N
            a_prev = abar[timesteps[j + 1]] if j + 1 < len(timesteps) else abar[0]
            e = np.asarray(eps(x, (k + 1) / 1000))  # timestep k is continuous t = (k + 1) / N
            x0 = (x - np.sqrt(1 - abar[k]) * e) / np.sqrt(abar[k])
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
        expected = [[s for label, s in labelled if label > t][-1] for t in ts[1:]]
        np.testing.assert_allclose(ours, np.stack(expected), rtol=1e-9, atol=1e-12)
        # The lookup is one step early: t_5 = 1/N takes the state before the last two DDIM steps.
        np.testing.assert_array_equal(expected[-1], labelled[-2][1])


# ------------------------------------------------------------------------------------------- CPR


def test_cpr_reproduces_the_official_reference_vectors():
    cases = {
        (7.5, 5): [1, 1, 1.0271, 0.7392, 1.2263],
        (7.5, 10): [1, 1, 0.4446, 0.8980, 1.0628, 1.0426, 0.9408, 0.8610, 0.9068, 1.1816],
        (1.5, 5): [1, 1, 0.9098, 1.1564, 1.3079],
        (4.5, 8): [1, 1, 0.7683, 1.1055, 1.0577, 0.8945, 0.8858, 1.3013],
    }
    for (cfg, nfe), expected in cases.items():
        np.testing.assert_allclose(dcs.cpr_predict(SD21_CPR, cfg, nfe), expected, atol=5e-5)


def test_cpr_fit_recovers_coefficients_and_file_round_trip(tmp_path):
    settings = [(c, n) for c in (1.0, 3.0, 5.0, 7.5, 10.0) for n in (5, 6, 8, 10, 12)]
    ratios = [dcs.cpr_predict(SD21_CPR, c, n) for c, n in settings]
    coeffs = dcs.cpr_fit(settings, ratios)
    for cfg, nfe in [(2.0, 7), (6.0, 9)]:  # unseen settings
        np.testing.assert_allclose(
            dcs.cpr_predict(coeffs, cfg, nfe), dcs.cpr_predict(SD21_CPR, cfg, nfe), atol=1e-6
        )
    path = tp.save_cpr_coeffs(str(tmp_path / "fit.npy"), coeffs)
    np.testing.assert_array_equal(tp.load_cpr_coeffs(path), coeffs)
    with pytest.raises(ValueError, match="must have shape \\(5,\\)"):
        dcs.cpr_fit([(7.5, 5)], [np.ones(4)])


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_before_tracing():
    mix, x_T, labels = _problem(seed=8)
    calls = []

    def counting(x, t):
        calls.append(1)
        return mix.eps(x, t, SCHED)

    uncond = D.GaussianMixture(np.ones(2), np.zeros((2, 4)), [1.0, 0.5])
    cases = [
        (dict(nfe=2, solver="unipc", order=3), "nfe=2 is smaller than order=3"),
        (dict(nfe=5, solver="dc", ratios=np.ones(4)), r"ratios must have shape \(5,\)"),
        (dict(nfe=5, solver="dc"), "solver='dc' needs ratios"),
        (dict(nfe=5, solver="unipc", ratios=np.ones(5)), "ratios apply to solver='dc'"),
        (dict(nfe=5, solver="dc", ratios=np.array([1, 1, np.nan, 1, 1])), "ratios must be finite"),
        (dict(nfe=5, solver="unipc", spacing="uniform"), "unknown spacing 'uniform'"),
        (dict(nfe=5, solver="heun"), "unknown solver 'heun'"),
        (dict(nfe=5, solver="unipc", variant="bh3"), "unknown variant 'bh3'"),
        (
            dict(nfe=5, solver="unipc", guidance=dcs.Guidance(labels, 2.0)),
            "takes no labels argument",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            dcs.sample(counting, x_T, SCHED, **kwargs)
    assert not calls  # nothing was traced
    with pytest.raises(ValueError, match="has no class_weights"):
        dcs.sample(
            uncond.eps_fn(SCHED),
            x_T,
            SCHED,
            nfe=5,
            solver="unipc",
            guidance=dcs.Guidance(labels, 2.0),
        )
    with pytest.raises(ValueError, match="unknown schedule 'sd15'"):
        D.VPSchedule.named("sd15")
    with pytest.raises(ValueError, match="nfe=2 is smaller than order=3"):
        dcs.search_ratios(counting, x_T, SCHED, nfe=2)


def test_non_finite_model_output_raises():
    mix, x_T, _ = _problem(seed=9, classes=False)

    def broken(x, t):
        eps = mix.eps(x, t, SCHED)
        return jnp.where(t < 0.5, jnp.nan, eps)

    with pytest.raises(FloatingPointError, match="non-finite values at evaluation 3"):
        dcs.sample(broken, x_T, SCHED, nfe=5, solver="unipc")


# ------------------------------------------------------------------------------------ experiment


def test_experiment_smoke_and_config_errors(tmp_path):
    from theorax.configs import dc_solver as cfg_lib
    from theorax.experiments import dc_solver as exp
    from theorax.experiments import runtime

    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        cfg_lib.get_config("gpu")
    bad = cfg_lib.get_config("smoke")
    bad.eval.nfes = (2,)
    with pytest.raises(runtime.ConfigError, match="smaller than the solver order 3"):
        exp.run(bad, str(tmp_path / "bad"))

    config = cfg_lib.get_config("smoke")
    results = exp.run(config, str(tmp_path / "run"))
    row = results["table"]["nfe=5,cfg=7.5"]
    assert set(row) == set(exp.METHODS)
    assert all(np.isfinite(v) for v in (row["ddim"], row["unipc"], row["dc_searched"]["median"]))
    # The ground truth is accurate far beyond the samplers' errors.
    assert results["gt_error_mse"]["nfe=0,cfg=7.5"] < 0.05 * row["ddim"]
    ratios = exp.load_ratios(str(tmp_path / "run" / "ratios.json"))
    assert ratios["nfe=5,cfg=7.5,seed=0"].shape == (5,)
    assert tp.load_cpr_coeffs(str(tmp_path / "run" / "cpr_coeffs_seed0.npy")).shape == (36,)
    md = exp.report(results, str(tmp_path / "run"))
    assert "| 5 | 7.5 |" in md and "](./mse.png)" in md
    assert (tmp_path / "run" / "mse.png").exists()
    assert exp.run(config, str(tmp_path / "run")) == results  # a finished run is not redone
