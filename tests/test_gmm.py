"""models.gmm: densities, moments, marginals, sampling, KL, transforms and validation, each against something
independent (numpyro's MixtureSameFamily, grid integration, closed forms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from theorax.models.gmm import GMM, GMMError, SampleSpaceTransform, kl_gmm, validate_gmm


def _random_gmm(key, batch=(), k=3, d=2, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    logits = jax.random.normal(k1, (*batch, k)).astype(dtype)
    means = 2.0 * jax.random.normal(k2, (*batch, k, d)).astype(dtype)
    A = 0.5 * jax.random.normal(k3, (*batch, k, d, d)).astype(dtype)
    cov = A @ jnp.swapaxes(A, -1, -2) + 0.3 * jnp.eye(d, dtype=dtype)
    return GMM.from_covariance(logits, means, cov)


def _grid_2d(lo, hi, n):
    g = np.linspace(lo, hi, n)
    X, Y = np.meshgrid(g, g, indexing="ij")
    return g, np.stack([X, Y], -1), (g[1] - g[0]) ** 2


def test_log_prob_matches_numpyro_mixture():
    gmm = _random_gmm(jax.random.key(0), batch=(4,))
    x = jax.random.normal(jax.random.key(1), (7, 4, 2)) * 3
    ours = gmm.log_prob(x)
    theirs = gmm.to_numpyro().log_prob(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.shape == (7, 4)


def test_density_integrates_to_one_and_moments_match_grid():
    with jax.enable_x64(True):
        gmm = _random_gmm(jax.random.key(2), dtype=jnp.float64)
        g, pts, cell = _grid_2d(-14, 14, 401)
        p = np.exp(np.asarray(gmm.log_prob(jnp.asarray(pts))))
        np.testing.assert_allclose(p.sum() * cell, 1.0, atol=1e-6)
        mean_grid = (p[..., None] * pts).sum((0, 1)) * cell
        np.testing.assert_allclose(gmm.mean(), mean_grid, atol=1e-5)
        centred = pts - mean_grid
        cov_grid = (p[..., None, None] * centred[..., :, None] * centred[..., None, :]).sum(
            (0, 1)
        ) * cell
        np.testing.assert_allclose(gmm.covariance(), cov_grid, atol=1e-4)


def test_marginal_equals_integrating_out_the_other_dimension():
    with jax.enable_x64(True):
        gmm = _random_gmm(jax.random.key(3), dtype=jnp.float64)
        g, pts, cell = _grid_2d(-14, 14, 401)
        p = np.exp(np.asarray(gmm.log_prob(jnp.asarray(pts))))
        marg_grid = p.sum(0) * (g[1] - g[0])  # integrate over x0 -> density of x1
        marg = np.exp(np.asarray(gmm.marginal(1).log_prob(jnp.asarray(g)[:, None])))
        np.testing.assert_allclose(marg, marg_grid, atol=1e-6)


def test_samples_have_the_mixture_moments():
    gmm = _random_gmm(jax.random.key(4), batch=(2,))
    x = gmm.sample(jax.random.key(5), 200_000)
    assert x.shape == (200_000, 2, 2)
    np.testing.assert_allclose(x.mean(0), gmm.mean(), atol=0.03)
    emp_cov = jnp.einsum("nbi,nbj->bij", x - x.mean(0), x - x.mean(0)) / x.shape[0]
    np.testing.assert_allclose(emp_cov, gmm.covariance(), rtol=0.03, atol=0.03)


def test_weights_are_softmax_of_logits_and_sum_to_one():
    gmm = GMM(jnp.array([0.0, jnp.log(3.0)]), jnp.zeros((2, 1)), jnp.ones((2, 1, 1)))
    np.testing.assert_allclose(gmm.weights, [0.25, 0.75], rtol=1e-6)


def test_kl_between_gaussians_matches_closed_form():
    m1, m2, s1, s2 = 0.3, -0.5, 0.7, 1.6
    p = GMM.gaussian(jnp.array([m1]), jnp.array([[s1]]))
    q = GMM.gaussian(jnp.array([m2]), jnp.array([[s2]]))
    exact = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    np.testing.assert_allclose(kl_gmm(jax.random.key(6), p, q, 400_000), exact, atol=5e-3)


def test_kl_between_mixtures_matches_grid_quadrature():
    """KL(p || q) of two bimodal 1-D mixtures (no closed form) against the grid integral of p log(p / q) with
    scipy's normal density; also KL(q || p), which differs (KL is not symmetric)."""
    p = GMM.from_stddevs(
        jnp.log(jnp.array([0.3, 0.7])), jnp.array([[-2.0], [1.0]]), jnp.array([[0.5], [1.0]])
    )
    q = GMM.from_stddevs(
        jnp.log(jnp.array([0.6, 0.4])), jnp.array([[-1.0], [2.0]]), jnp.array([[1.2], [0.7]])
    )
    g = np.linspace(-15, 15, 200_001)

    def density(w, m, s):
        return sum(wi * scipy.stats.norm.pdf(g, mi, si) for wi, mi, si in zip(w, m, s, strict=True))

    dp = density([0.3, 0.7], [-2.0, 1.0], [0.5, 1.0])
    dq = density([0.6, 0.4], [-1.0, 2.0], [1.2, 0.7])
    kl_pq, kl_qp = (np.trapezoid(a * np.log(a / b), g) for a, b in ((dp, dq), (dq, dp)))
    assert abs(kl_pq - kl_qp) > 0.03
    np.testing.assert_allclose(kl_gmm(jax.random.key(7), p, q, 400_000), kl_pq, atol=5e-3)
    np.testing.assert_allclose(kl_gmm(jax.random.key(8), q, p, 400_000), kl_qp, atol=5e-3)


def test_from_stddevs_equals_from_covariance_of_the_squared_scales():
    key = jax.random.split(jax.random.key(9), 3)
    logits = jax.random.normal(key[0], (4, 3))
    means = jax.random.normal(key[1], (4, 3, 2))
    stddevs = jnp.exp(jax.random.normal(key[2], (4, 3, 2)))
    diag = GMM.from_stddevs(logits, means, stddevs)
    full = GMM.from_covariance(logits, means, jax.vmap(jax.vmap(jnp.diag))(stddevs**2))
    np.testing.assert_allclose(diag.scale_tril, full.scale_tril, rtol=1e-5, atol=1e-6)
    x = 2.0 * jax.random.normal(jax.random.key(10), (5, 4, 2))
    np.testing.assert_allclose(diag.log_prob(x), full.log_prob(x), rtol=1e-5, atol=1e-5)
    one_d = GMM.from_stddevs(jnp.zeros(2), jnp.array([[0.0], [1.0]]), jnp.array([[2.0], [0.5]]))
    np.testing.assert_allclose(one_d.covariances[:, 0, 0], [4.0, 0.25])
    with pytest.raises(GMMError, match="strictly positive"):
        GMM.from_stddevs(jnp.zeros(2), jnp.zeros((2, 1)), jnp.array([[1.0], [0.0]]))
    with pytest.raises(GMMError, match="stddevs have shape"):
        GMM.from_stddevs(jnp.zeros(2), jnp.zeros((2, 2)), jnp.ones((2, 1)))


@pytest.mark.parametrize("kind,lo,hi", [("log", 1e-6, 60.0), ("logit", 1e-7, 1 - 1e-7)])
def test_transformed_density_integrates_to_one(kind, lo, hi):
    with jax.enable_x64(True):
        t = SampleSpaceTransform((kind,))
        gmm = GMM.from_weights(
            jnp.array([0.4, 0.6]), jnp.array([[-0.5], [1.0]]), jnp.array([[[0.5]], [[0.8]]])
        )
        x = jnp.asarray(
            np.geomspace(lo, hi, 400_001) if kind == "log" else np.linspace(lo, hi, 400_001)
        )
        dens = np.exp(np.asarray(t.log_prob(gmm, x[:, None])))
        np.testing.assert_allclose(np.trapezoid(dens, np.asarray(x)), 1.0, atol=2e-4)
        np.testing.assert_allclose(t.inverse(t.forward(x[:, None]))[:, 0], x, rtol=1e-9)


def test_transform_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown sample-space transform"):
        SampleSpaceTransform(("exp",))


# ------------------------------------------------------------------------------------------ validation


def test_weights_not_summing_to_one_raise():
    with pytest.raises(GMMError, match="sum to one"):
        GMM.from_weights(jnp.array([0.5, 0.6]), jnp.zeros((2, 1)), jnp.ones((2, 1, 1)))


def test_non_positive_definite_covariance_raises():
    cov = jnp.array([[[1.0, 2.0], [2.0, 1.0]]])  # eigenvalues 3, -1
    with pytest.raises(GMMError, match="positive definite"):
        GMM.from_covariance(jnp.zeros(1), jnp.zeros((1, 2)), cov)


def test_bad_cholesky_factors_raise():
    upper = jnp.array([[[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(GMMError, match="lower triangular"):
        validate_gmm(GMM(jnp.zeros(1), jnp.zeros((1, 2)), upper))
    neg = jnp.array([[[-1.0, 0.0], [0.3, 1.0]]])
    with pytest.raises(GMMError, match="positive diagonal"):
        validate_gmm(GMM(jnp.zeros(1), jnp.zeros((1, 2)), neg))


def test_dimension_mismatches_raise():
    with pytest.raises(GMMError, match="logits has shape"):
        validate_gmm(GMM(jnp.zeros(3), jnp.zeros((2, 1)), jnp.ones((2, 1, 1))))
    with pytest.raises(GMMError, match="scale_tril has shape"):
        validate_gmm(GMM(jnp.zeros(2), jnp.zeros((2, 2)), jnp.ones((2, 1, 1))))


def test_nan_logits_raise():
    with pytest.raises(GMMError, match="logits"):
        validate_gmm(GMM(jnp.array([0.0, jnp.nan]), jnp.zeros((2, 1)), jnp.ones((2, 1, 1))))
