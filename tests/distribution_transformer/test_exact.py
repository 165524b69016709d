"""inference.exact and the task likelihoods against brute-force numerical integration on 1-D / 2-D grids,
sequential against batched updates, and closed forms against independent routes (matrix exponentials,
joint Gaussians, histograms of samples)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from theorax.inference.distribution_transformer import exact
from theorax.inference.distribution_transformer import tasks as dt_tasks
from theorax.models.gmm import GMM, GMMError


def _grid_posterior(log_prior, log_lik, cell):
    """Brute force: normalise prior x likelihood over the grid."""
    lj = log_prior + log_lik
    lj = lj - lj.max()
    p = np.exp(lj)
    return p / (p.sum() * cell)


def test_linear_gaussian_posterior_matches_1d_grid():
    with jax.enable_x64(True):
        prior = GMM.from_stddevs(
            jnp.log(jnp.array([0.2, 0.5, 0.3])),
            jnp.array([[-3.0], [0.5], [4.0]]),
            jnp.array([[0.8], [1.5], [0.4]]),
        )
        H, R, z = jnp.array([[2.0]]), jnp.array([[0.7]]), jnp.array([1.3])
        post = exact.linear_gaussian_posterior(prior, H, R, z)
        g = np.linspace(-15, 15, 60_001)
        lik = scipy.stats.norm.logpdf(1.3, 2.0 * g, math.sqrt(0.7))
        brute = _grid_posterior(
            np.asarray(prior.log_prob(jnp.asarray(g)[:, None])), lik, g[1] - g[0]
        )
        np.testing.assert_allclose(np.exp(post.log_prob(jnp.asarray(g)[:, None])), brute, atol=1e-6)
        np.testing.assert_allclose(post.weights.sum(), 1.0, atol=1e-12)


def test_linear_gaussian_posterior_matches_2d_grid_with_partial_observation():
    with jax.enable_x64(True):
        prior = GMM.from_covariance(
            jnp.log(jnp.array([0.6, 0.4])),
            jnp.array([[-1.0, 1.0], [2.0, -0.5]]),
            jnp.array([[[1.0, 0.6], [0.6, 1.2]], [[0.5, -0.2], [-0.2, 0.9]]]),
        )
        H, R, z = jnp.array([[1.0, -1.0]]), jnp.array([[0.3]]), jnp.array([0.4])
        post = exact.linear_gaussian_posterior(prior, H, R, z)
        g = np.linspace(-8, 8, 801)
        X, Y = np.meshgrid(g, g, indexing="ij")
        pts = np.stack([X, Y], -1)
        lik = scipy.stats.norm.logpdf(0.4, X - Y, math.sqrt(0.3))
        cell = (g[1] - g[0]) ** 2
        brute = _grid_posterior(np.asarray(prior.log_prob(jnp.asarray(pts))), lik, cell)
        ours = np.exp(np.asarray(post.log_prob(jnp.asarray(pts))))
        np.testing.assert_allclose(ours, brute, atol=2e-5)
        # the evidence is the grid integral of prior x likelihood
        ev = np.exp(np.asarray(prior.log_prob(jnp.asarray(pts))) + lik).sum() * cell
        np.testing.assert_allclose(
            np.exp(exact.linear_gaussian_log_evidence(prior, H, R, z)), ev, rtol=1e-5
        )


def test_far_away_components_do_not_underflow():
    """Weights are updated in log space: a component 1e3 standard deviations away gets weight ~0, no NaN."""
    prior = GMM.from_weights(
        jnp.array([0.5, 0.5]), jnp.array([[0.0], [1000.0]]), jnp.ones((2, 1, 1))
    )
    post = exact.linear_gaussian_posterior(prior, jnp.eye(1), jnp.eye(1), jnp.array([0.1]))
    assert np.all(np.isfinite(post.logits))
    np.testing.assert_allclose(post.weights, [1.0, 0.0], atol=1e-12)
    post2 = exact.linear_gaussian_posterior(prior, jnp.eye(1), jnp.eye(1), jnp.array([2000.0]))
    np.testing.assert_allclose(post2.weights, [0.0, 1.0], atol=1e-12)


def test_sequential_updates_equal_the_batched_update():
    with jax.enable_x64(True):
        key = jax.random.key(0)
        prior = dt_tasks.GMMMetaPrior().sample(key, 5, 3, 2)
        prior = jax.tree.map(lambda a: a.astype(jnp.float64), prior)
        H = jnp.array([[1.0, 0.5], [0.0, 2.0]])
        R = jnp.array([[0.5, 0.1], [0.1, 0.3]])
        zs = jax.random.normal(jax.random.key(1), (5, 4, 2), dtype=jnp.float64)
        seq = exact.sequential_linear_gaussian_posterior(prior, H, R, zs)
        batched = exact.linear_gaussian_posterior(prior, *exact.stack_observations(H, R, zs))
        np.testing.assert_allclose(seq.weights, batched.weights, atol=1e-9)
        np.testing.assert_allclose(seq.means, batched.means, rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(seq.covariances, batched.covariances, rtol=1e-8, atol=1e-10)


def test_linear_gaussian_bad_input_raises_before_compiling():
    prior = GMM.from_weights(
        jnp.array([0.5, 0.5]), jnp.zeros((2, 2)), jnp.tile(jnp.eye(2), (2, 1, 1))
    )
    with pytest.raises(GMMError, match="prior.dim"):
        exact.linear_gaussian_posterior(prior, jnp.ones((1, 3)), jnp.eye(1), jnp.zeros(1))
    with pytest.raises(GMMError, match="noise covariance R has shape"):
        exact.linear_gaussian_posterior(prior, jnp.ones((1, 2)), jnp.eye(2), jnp.zeros(1))
    with pytest.raises(GMMError, match="observation z"):
        exact.linear_gaussian_posterior(prior, jnp.ones((1, 2)), jnp.eye(1), jnp.zeros(2))
    with pytest.raises(GMMError, match="positive definite"):
        exact.linear_gaussian_posterior(prior, jnp.ones((1, 2)), -jnp.eye(1), jnp.zeros(1))


def test_inverse_gamma_posterior_matches_grid_in_log_space():
    with jax.enable_x64(True):
        alpha, beta, z = 2.3, 1.7, jnp.array([0.8, -1.9, 0.3])
        y = np.linspace(-12, 10, 200_001)
        log_prior = np.asarray(exact.inverse_gamma_log_prob_log_space(jnp.asarray(y), alpha, beta))
        np.testing.assert_allclose(np.trapezoid(np.exp(log_prior), y), 1.0, atol=1e-8)
        lik = scipy.stats.norm.logpdf(np.asarray(z)[:, None], 0.0, np.exp(0.5 * y)).sum(0)
        brute = _grid_posterior(log_prior, lik, y[1] - y[0])
        a, b = exact.inverse_gamma_posterior(alpha, beta, z)
        ours = np.exp(np.asarray(exact.inverse_gamma_log_prob_log_space(jnp.asarray(y), a, b)))
        np.testing.assert_allclose(ours, brute, atol=1e-6)
        # and the log-space sampler draws from it: mean of log sigma^2 = log b - digamma(a)
        draws = exact.inverse_gamma_sample_log_space(jax.random.key(3), a, b, 200_000)
        np.testing.assert_allclose(
            draws.mean(), np.log(float(b)) - scipy.special.digamma(float(a)), atol=0.01
        )


def test_gp_hyperprior_posterior_matches_2d_grid_of_the_joint_gaussian():
    """Independent route: the joint Gaussian of (f(x*), y_D) given l, times the hyperprior, normalised on a
    2-D grid over (y*, log l), against conditioning + 1-D quadrature."""
    with jax.enable_x64(True):
        task = dt_tasks.GPHyperpriorTask(num_points=4, noise_var=0.05)
        prob = task.sample(jax.random.key(4), 1)
        prob = jax.tree.map(lambda a: a.astype(jnp.float64), prob)
        i = {k: np.asarray(v[0]) for k, v in prob.info.items()}
        ys = np.linspace(-5, 5, 401)
        us = np.linspace(np.log(1e-3), np.log(20.0), 801)
        log_joint = np.zeros((len(ys), len(us)))
        pts = np.concatenate([[i["x_star"]], i["x"]])
        for j, u in enumerate(us):
            ls = np.exp(u)
            K = i["s"] * np.exp(-0.5 * ((pts[:, None] - pts[None, :]) / ls) ** 2)
            K[1:, 1:] += task.noise_var * np.eye(len(i["x"]))
            vals = np.concatenate([ys[:, None], np.broadcast_to(i["y"], (len(ys), len(i["y"])))], 1)
            log_joint[:, j] = scipy.stats.multivariate_normal(np.full(len(pts), i["m"]), K).logpdf(
                vals
            )
            log_joint[:, j] += (
                scipy.stats.gamma.logpdf(ls, task.ls_shape, scale=1 / task.ls_rate) + u
            )
        cell = (ys[1] - ys[0]) * (us[1] - us[0])
        brute = _grid_posterior(log_joint, 0.0, cell)
        Y, U = np.meshgrid(ys, us, indexing="ij")
        info = prob.info
        data = exact.GPData(info["x"], info["y"], info["x_star"], info["m"], info["s"])
        grid = jnp.linspace(np.log(1e-3), np.log(20.0), 3001)
        hyper = exact.GPHyperprior(task.noise_var, task.ls_shape, task.ls_rate, grid)
        ours = exact.gp_hyperprior_log_posterior(
            jnp.asarray(Y)[..., None], jnp.asarray(U)[..., None], data, hyper
        )[..., 0]
        np.testing.assert_allclose(np.exp(np.asarray(ours)), brute, atol=2e-3 * brute.max())
        # the marginals: sum the brute-force joint over the other variable
        lpy, lpu = exact.gp_hyperprior_log_marginals(
            jnp.asarray(ys)[:, None], jnp.asarray(us)[:, None], data, hyper
        )
        py_brute, pu_brute = brute.sum(1) * (us[1] - us[0]), brute.sum(0) * (ys[1] - ys[0])
        np.testing.assert_allclose(
            np.exp(np.asarray(lpy[:, 0])), py_brute, atol=2e-3 * py_brute.max()
        )
        np.testing.assert_allclose(
            np.exp(np.asarray(lpu[:, 0])), pu_brute, atol=2e-3 * pu_brute.max()
        )


def test_quantum_probability_matches_matrix_exponential():
    sx, sz = np.array([[0, 1], [1, 0]]), np.array([[1, 0], [0, -1]])
    rng = np.random.default_rng(0)
    for _ in range(5):
        delta, t = rng.uniform(), rng.uniform(0, 5)
        psi = rng.normal(size=2)
        psi /= np.linalg.norm(psi)
        U = scipy.linalg.expm(-1j * t * (delta * sx + (1 - delta) * sz))
        expected = abs((U @ psi)[0]) ** 2
        got = dt_tasks.quantum_probability_zero(
            jnp.asarray(delta), jnp.asarray(t), jnp.asarray(psi)
        )
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow  # ~40 s of importance sampling
def test_quantum_reference_is_normalised_and_agrees_with_importance_sampling():
    """The quadrature posterior over logit delta against self-normalised importance sampling from the prior,
    with the likelihood's success probabilities re-estimated from fresh random draws of (t, psi0)."""
    task = dt_tasks.QuantumTask()
    prob = task.sample(jax.random.key(5), 3)
    grid = jnp.linspace(-40, 40, 20_001)
    dens = np.exp(np.asarray(task.reference_log_prob(prob, grid[:, None, None])))
    np.testing.assert_allclose(np.trapezoid(dens, np.asarray(grid), axis=0), 1.0, atol=1e-3)
    grid_mean = np.trapezoid(dens * np.asarray(grid)[:, None], np.asarray(grid), axis=0)
    n = 20_000
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    c1, c0, z = prob.info["c1"], prob.info["c0"], prob.info["z"]
    u = jax.random.loggamma(k1, c1, (n, 3)) - jax.random.loggamma(k2, c0, (n, 3))
    p = jax.lax.map(
        lambda ui: task.success_probability(k3, jax.nn.sigmoid(ui), 256), u, batch_size=2000
    )  # [n, 3, J]
    p = jnp.clip(p, 1e-7, 1 - 1e-7)
    logw = jnp.sum(z * jnp.log(p) + (1 - z) * jnp.log1p(-p), -1)
    w = jax.nn.softmax(logw, axis=0)
    is_mean = np.asarray(jnp.sum(w * u, 0))
    is_sd = np.sqrt(np.asarray(jnp.sum(w * (u - is_mean) ** 2, 0)))
    ess = 1.0 / np.asarray(jnp.sum(w**2, 0))
    tol = 4 * is_sd / np.sqrt(ess) + 0.03
    assert np.all(np.abs(grid_mean - is_mean) < tol), (grid_mean, is_mean, tol)


def test_rangefinder_density_matches_its_sampler():
    """Histogram of sampled readings at a fixed range against the density integrated over bins. With the
    official code's component order ([normal, uniform, exp] against [normal, exp, uniform] weights) the
    mass in [0, 1] would be 0.083 instead of 0.136, which this test detects."""
    task = dt_tasks.SensorFusionTask()
    x = jnp.broadcast_to(jnp.array([3.0, 0.0, 4.0, 0.0]), (400_000, 4))  # range 5
    r = np.asarray(task.sample_observations(jax.random.key(6), x)["range"][:, 0, 0])
    edges = np.linspace(0, 10, 21)
    hist = np.histogram(r, edges)[0] / len(r)
    fine = np.linspace(0, 10, 200_001)
    dens = np.exp(np.asarray(dt_tasks.rangefinder_log_prob(jnp.asarray(fine), 5.0)))
    cdf = np.concatenate([[0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(fine))])
    mass = np.diff(np.interp(edges, fine, cdf))
    np.testing.assert_allclose(hist, mass, atol=3e-3)
    assert abs(hist[:2].sum() - (0.2 * (1 - np.exp(-1)) + 0.1 * 0.1)) < 3e-3
