"""VP schedules, time grids, model wrappers and the analytic Gaussian mixture, against closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import multivariate_normal
from scipy import integrate
from theorax.models import diffusion as D

# ------------------------------------------------------------------------------------ schedules


def test_sd_betas_and_discrete_alpha_at_knots():
    betas = D.sd_scaled_linear_betas()
    assert betas.shape == (1000,)
    np.testing.assert_allclose([betas[0], betas[-1]], [0.00085, 0.012], rtol=1e-12)
    s = D.VPSchedule.discrete(betas)
    knots = np.arange(1, 1001) / 1000
    alphabar = np.cumprod(1 - betas)
    np.testing.assert_allclose(s.alpha(knots), np.sqrt(alphabar), rtol=1e-12)
    np.testing.assert_allclose(s.sigma(knots), np.sqrt(1 - alphabar), rtol=1e-12)
    np.testing.assert_allclose(
        s.lambda_(knots), 0.5 * np.log(alphabar) - 0.5 * np.log(1 - alphabar), rtol=1e-10
    )
    ldm = D.ldm_linear_betas()
    np.testing.assert_allclose([ldm[0], ldm[-1]], [0.0015, 0.0195], rtol=1e-12)


def test_discrete_log_alpha_is_piecewise_linear_and_extrapolates():
    s = D.VPSchedule.named("sd_scaled_linear")
    la = s.log_alpha
    # Between knots 0.500 and 0.501 log alpha is the chord; past the ends the outer chord continues.
    np.testing.assert_allclose(la(0.5004), 0.6 * la(0.500) + 0.4 * la(0.501), rtol=1e-12)
    slope = (la(0.002) - la(0.001)) / 0.001
    np.testing.assert_allclose(la(0.0), la(0.001) - 0.001 * slope, rtol=1e-10)
    # jnp path agrees with the numpy path.
    np.testing.assert_allclose(
        s.alpha(jnp.asarray([0.3217, 0.9])), s.alpha(np.array([0.3217, 0.9])), rtol=1e-6
    )


def test_linear_schedule_matches_integrated_beta():
    s = D.VPSchedule.linear()
    for t in (0.01, 0.3, 0.77, 1.0):
        integral, _ = integrate.quad(lambda u: 0.1 + u * (20.0 - 0.1), 0.0, t)
        np.testing.assert_allclose(s.alpha(t), math.exp(-0.5 * integral), rtol=1e-12)
        np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=1e-12)


def test_cosine_schedule_matches_improved_ddpm():
    s = D.VPSchedule.cosine()
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0.0, 0.2, 0.5, 0.9946):
        np.testing.assert_allclose(s.alpha(t), math.sqrt(f(t) / f(0.0)), rtol=1e-12)
    assert s.t_max == 0.9946


@pytest.mark.parametrize("name", ["sd_scaled_linear", "ldm_linear", "linear", "cosine"])
def test_inverse_lambda_inverts_lambda(name):
    s = D.VPSchedule.named(name)
    ts = np.linspace(s.t_min, s.t_max, 37)
    np.testing.assert_allclose(s.inverse_lambda(s.lambda_(ts)), ts, rtol=1e-9, atol=1e-12)
    tj = jnp.asarray(ts[1:-1], jnp.float32)
    np.testing.assert_allclose(s.inverse_lambda(s.lambda_(tj)), tj, rtol=2e-4, atol=1e-5)


def test_unknown_schedule_and_bad_betas():
    with pytest.raises(ValueError, match="unknown schedule 'sd'"):
        D.VPSchedule.named("sd")
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        D.VPSchedule.discrete(np.array([0.1, 1.5]))


# ------------------------------------------------------------------------------------ time grid


def test_time_steps_spacings():
    s = D.VPSchedule.named("sd_scaled_linear")
    np.testing.assert_allclose(D.time_steps(s, 4), [1.0, 0.75025, 0.5005, 0.25075, 0.001])
    lam = s.lambda_(D.time_steps(s, 6, "logSNR"))
    np.testing.assert_allclose(np.diff(lam), np.full(6, (lam[-1] - lam[0]) / 6), rtol=1e-9)
    q = D.time_steps(s, 5, "time_quadratic")
    np.testing.assert_allclose(
        np.diff(np.sqrt(q)), np.full(5, (np.sqrt(0.001) - 1) / 5), rtol=1e-12
    )
    # diffusers' integer timesteps (UniPCMultistepScheduler.set_timesteps), then t = 1/N.
    np.testing.assert_allclose(
        D.time_steps(s, 5, "linspace") * 1000 - 1, [999, 799, 599, 400, 200, 0]
    )
    np.testing.assert_allclose(D.time_steps(s, 4, "trailing") * 1000 - 1, [999, 749, 499, 249, 0])
    np.testing.assert_allclose(D.time_steps(s, 4, "leading") * 1000 - 1, [800, 600, 400, 200, 0])


def test_time_steps_errors():
    s = D.VPSchedule.named("sd_scaled_linear")
    with pytest.raises(ValueError, match="unknown spacing 'uniform'"):
        D.time_steps(s, 5, "uniform")
    with pytest.raises(ValueError, match="needs a discrete schedule"):
        D.time_steps(D.VPSchedule.linear(), 5, "linspace")


# ---------------------------------------------------------------------------- analytic mixture


def _mixtures(rng, d=3):
    k = 4
    means = rng.normal(size=(k, d))
    a = rng.normal(size=(k, d, d))
    covs = a @ np.swapaxes(a, 1, 2) / d + 0.1 * np.eye(d)
    diag = rng.uniform(0.2, 0.9, size=(k, d))
    class_w = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.2, 0.5, 0.3]])
    return {
        "isotropic": (
            D.GaussianMixture([0.1, 0.2, 0.3, 0.4], means, [0.3, 0.5, 0.2, 0.7]),
            np.stack([s**2 * np.eye(d) for s in [0.3, 0.5, 0.2, 0.7]]),
        ),
        "diagonal": (
            D.GaussianMixture(np.ones(k), means, diag),
            np.stack([np.diag(v**2) for v in diag]),
        ),
        "full": (D.GaussianMixture(np.ones(k), means, covs=covs), covs),
        "conditional": (
            D.GaussianMixture.class_conditional(means, diag, class_w),
            np.stack([np.diag(v**2) for v in diag]),
        ),
    }


def _mixture_and_points(seed, kind, n):
    """`kind` of `_mixtures` (and its covariances), the SD schedule and n points in 3-d (call under x64)."""
    rng = np.random.default_rng(seed)
    mix, covs = _mixtures(rng)[kind]
    return mix, covs, D.VPSchedule.named("sd_scaled_linear"), jnp.asarray(rng.normal(size=(n, 3)))


def _log_density(mix, covs, x, t, schedule, labels=None):
    """An independent log p_t: logsumexp over N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) densities."""
    a, s = schedule.alpha(t), schedule.sigma(t)
    d = x.shape[-1]
    w = mix.weights if labels is None else mix.class_weights[labels]
    terms = [
        jnp.log(w[k])
        + multivariate_normal.logpdf(x, a * mix.means[k], a**2 * covs[k] + s**2 * jnp.eye(d))
        for k in range(len(mix.weights))
        if w[k] > 0
    ]
    return jax.nn.logsumexp(jnp.stack(terms))


@pytest.mark.parametrize(
    "kind,schedule_name",
    [
        ("isotropic", "sd_scaled_linear"),
        ("diagonal", "cosine"),
        ("full", "linear"),
        ("full", "sd_scaled_linear"),
        ("conditional", "sd_scaled_linear"),
    ],
)
def test_eps_is_minus_sigma_times_autograd_score(kind, schedule_name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        mix, covs = _mixtures(rng)[kind]
        s = D.VPSchedule.named(schedule_name)
        x = jnp.asarray(rng.normal(size=(5, 3)))
        for labels in [None] if kind != "conditional" else [None, 0, 1]:

            @jax.jit
            def check(x, t, labels=labels):
                score = jax.vmap(jax.grad(lambda z: _log_density(mix, covs, z, t, s, labels)))(x)
                ours = jax.vmap(lambda z: mix.log_prob(z, t, s, labels))(x)
                ref = jax.vmap(lambda z: _log_density(mix, covs, z, t, s, labels))(x)
                return mix.eps(x, t, s, labels), -s.sigma(t) * score, ours, ref

            for t in (0.02, 0.4, 0.95):
                eps, expected, logp, logp_ref = check(x, t)
                np.testing.assert_allclose(eps, expected, rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(logp, logp_ref, rtol=1e-10)


@pytest.mark.parametrize("kind", ["isotropic", "full"])
def test_posterior_mean_is_tweedie(kind):
    """E[x0 | x_t] = (x + sigma^2 grad log p_t(x)) / alpha (Tweedie's formula) with an autograd score."""
    with jax.enable_x64(True):
        mix, covs, s, x = _mixture_and_points(1, kind, 6)
        t = 0.3
        score = jax.jit(jax.vmap(jax.grad(lambda z: _log_density(mix, covs, z, t, s))))(x)
        tweedie = (x + s.sigma(t) ** 2 * score) / s.alpha(t)
        np.testing.assert_allclose(mix.posterior_mean(x, t, s), tweedie, rtol=1e-9, atol=1e-12)


def test_posterior_mean_by_monte_carlo():
    """A second, sampling-based check: the average x0 of (x0, x_t) pairs in a thin slice around a point."""
    s = D.VPSchedule.named("sd_scaled_linear")
    mix = D.GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.3, 0.3])
    t = 0.5
    rng = np.random.default_rng(0)
    x0 = rng.choice([-1.0, 1.0], size=400_000) + 0.3 * rng.normal(size=400_000)
    xt = s.alpha(t) * x0 + s.sigma(t) * rng.normal(size=x0.shape)
    points = np.array([-0.3, 0.1, 0.4])
    exact = np.asarray(mix.posterior_mean(jnp.asarray(points[:, None], jnp.float32), t, s))[:, 0]
    for point, e in zip(points, exact, strict=True):
        near = np.abs(xt - point) < 0.01
        assert abs(x0[near].mean() - e) < 0.03


def test_unconditional_is_the_class_average_and_guidance_is_cfg():
    with jax.enable_x64(True):
        mix, covs, s, x = _mixture_and_points(2, "conditional", 3)
        t = 0.6

        def log_marginal(z):  # log sum_c p(c) p_t(z | c), p(c) = 1/2
            return jax.nn.logsumexp(
                jnp.stack([_log_density(mix, covs, z, t, s, c) for c in (0, 1)])
            ) + math.log(0.5)

        score = jax.jit(jax.vmap(jax.grad(log_marginal)))(x)
        np.testing.assert_allclose(mix.eps(x, t, s), -s.sigma(t) * score, rtol=1e-9)
        labels = jnp.array([0, 1, 1])
        fn = mix.eps_fn(s)
        for w in (0.0, 1.0, 7.5):
            cfg = D.classifier_free_guidance(fn, x, t, labels, w)
            expected = mix.eps(x, t, s) + w * (mix.eps(x, t, s, labels) - mix.eps(x, t, s))
            np.testing.assert_allclose(cfg, expected, rtol=1e-12)
        np.testing.assert_allclose(
            D.classifier_free_guidance(fn, x, t, labels, 1.0), mix.eps(x, t, s, labels), rtol=1e-12
        )


def test_labels_on_unconditional_mixture_raise():
    mix = D.GaussianMixture([1.0], [[0.0, 0.0]], [1.0])
    s = D.VPSchedule.named("sd_scaled_linear")
    with pytest.raises(ValueError, match="without class_weights"):
        mix.eps(jnp.zeros((1, 2)), 0.5, s, labels=jnp.array([0]))


def test_model_wrappers_convert_data_and_v_predictions():
    with jax.enable_x64(True):
        mix, _, s, x = _mixture_and_points(3, "isotropic", 4)
        t = 0.37
        eps = mix.eps(x, t, s)
        data_model = lambda z, tt: mix.posterior_mean(z, tt, s)
        v_model = lambda z, tt: (
            s.alpha(tt) * mix.eps(z, tt, s) - s.sigma(tt) * mix.posterior_mean(z, tt, s)
        )
        np.testing.assert_allclose(D.noise_prediction(data_model, s, "data")(x, t), eps, rtol=1e-9)
        np.testing.assert_allclose(D.noise_prediction(v_model, s, "v")(x, t), eps, rtol=1e-9)
        np.testing.assert_allclose(
            D.data_from_noise_prediction(eps, x, t, s), mix.posterior_mean(x, t, s), rtol=1e-9
        )
        with pytest.raises(ValueError, match="unknown model_type 'x_start'"):
            D.noise_prediction(data_model, s, "x_start")


def test_eps_mlp_shapes_and_null_class():
    model = D.EpsMLP(features=16, depth=1, num_classes=10)
    x = jnp.ones((5, 64))
    params = jax.jit(model.init)(jax.random.key(0), x, 0.5, jnp.zeros(5, jnp.int32))
    # The output head is initialised to zero (every prediction 0, whatever the label): perturb every parameter
    # so that the checks below can fail.
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
    apply = jax.jit(model.apply)
    out = apply(params, x, jnp.full((5,), 0.3), jnp.arange(5))
    chex.assert_shape(out, (5, 64))
    # Every row has the same x and t, so rows differ only through their labels.
    gaps = [float(jnp.max(jnp.abs(out[i] - out[j]))) for i in range(5) for j in range(i)]
    assert min(gaps) > 1e-3, gaps
    # labels=None is the null class (index 10) of the same embedding table, and not class 0.
    null = apply(params, x, 0.3, None)
    np.testing.assert_allclose(null, apply(params, x, 0.3, jnp.full(5, 10)), rtol=1e-6)
    assert float(jnp.max(jnp.abs(null[0] - out[0]))) > 1e-3  # out[0]: class 0 at the same x and t
    with pytest.raises(ValueError, match="num_classes=None"):
        D.EpsMLP(features=8, depth=1).init(jax.random.key(0), x, 0.5, jnp.zeros(5, jnp.int32))
