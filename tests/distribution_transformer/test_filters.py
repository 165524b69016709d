"""inference.filters against independent references: on a linear-Gaussian state-space model the EKF must be the
Kalman filter (a numpy one written here) to float64 precision and the bootstrap particle filter's moments and
evidence must converge to it; on the sensor-fusion model the PF's first update must match 2-D grid quadrature
and the EKF's linearisation the analytic Jacobian of range and bearing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from theorax.inference.distribution_transformer import filters
from theorax.inference.distribution_transformer import tasks as dt_tasks
from theorax.inference.distribution_transformer.exact import LinearGaussianDynamics

# ------------------------------------------------------------------------------- linear-Gaussian model

RNG = np.random.default_rng(0)
D, M, T, B = 3, 2, 10, 8
A = np.array([[1.0, 0.5, 0.0], [0.0, 0.8, 0.3], [0.0, -0.2, 0.9]])
Q_FACTOR = np.array([[0.3, 0.0], [0.2, 0.4], [0.0, 0.5]])
H = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, -1.0]])
R = np.array([[2.0, 0.3], [0.3, 1.5]])
X0_MEAN = np.array([0.5, -1.0, 2.0])
X0_TRIL = np.array([[1.0, 0.0, 0.0], [0.3, 0.8, 0.0], [-0.2, 0.1, 1.2]])
DYNAMICS = LinearGaussianDynamics(A, Q_FACTOR, X0_MEAN, X0_TRIL)


def _simulate():
    x = X0_MEAN + RNG.standard_normal((B, D)) @ X0_TRIL.T
    states, obs = [], []
    for _ in range(T):
        states.append(x)
        obs.append(x @ H.T + RNG.multivariate_normal(np.zeros(M), R, size=B))
        x = x @ A.T + RNG.standard_normal((B, Q_FACTOR.shape[1])) @ Q_FACTOR.T
    return np.stack(states), np.stack(obs)


STATES, OBS = _simulate()


def kalman_filter(z):
    """Reference: the textbook Kalman filter in float64 numpy, one series at a time. Returns the filtering
    means `[T, B, D]`, covariances `[T, B, D, D]` and log p(z_t | z_{<t}) `[T, B]`."""
    Q = Q_FACTOR @ Q_FACTOR.T
    means, covs, logz = np.zeros((T, B, D)), np.zeros((T, B, D, D)), np.zeros((T, B))
    for b in range(B):
        m, P = X0_MEAN.copy(), X0_TRIL @ X0_TRIL.T
        for t in range(T):
            S = H @ P @ H.T + R
            logz[t, b] = scipy.stats.multivariate_normal(H @ m, S).logpdf(z[t, b])
            K = P @ H.T @ np.linalg.inv(S)
            m = m + K @ (z[t, b] - H @ m)
            P = (np.eye(D) - K @ H) @ P
            means[t, b], covs[t, b] = m, P
            m, P = A @ m, A @ P @ A.T + Q
    return means, covs, logz


@pytest.fixture(scope="module")
def kf():
    return kalman_filter(OBS)


def test_ekf_on_a_linear_model_is_the_kalman_filter(kf):
    means, covs, logz = kf
    with jax.enable_x64(True):
        Hj, Rj = jnp.asarray(H), jnp.asarray(R)
        out = filters.lti_extended_kalman_filter(
            lambda x: Hj @ x,
            lambda x: Rj,
            jnp.asarray(OBS),
            DYNAMICS,
            states=jnp.asarray(STATES),
        )
        assert out.mean.dtype == jnp.float64
        np.testing.assert_allclose(out.mean, means, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.covariance, covs, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.log_evidence, logz, rtol=1e-10, atol=1e-10)
        nll = [
            [-scipy.stats.multivariate_normal(means[t, b], covs[t, b]).logpdf(STATES[t, b])]
            for t in range(T)
            for b in range(B)
        ]
        np.testing.assert_allclose(np.ravel(out.nll), np.ravel(nll), rtol=1e-10, atol=1e-10)


def test_bootstrap_particle_filter_converges_to_the_kalman_filter(kf):
    means, covs, logz = kf
    n = 1000
    Hj, Rj = jnp.asarray(H, jnp.float32), jnp.asarray(R, jnp.float32)
    lik = jax.scipy.stats.multivariate_normal.logpdf

    def log_likelihood(particles, z):  # [B, N, D], [B, M] -> [B, N]
        return lik(z[:, None, :], particles @ Hj.T, Rj)

    out = jax.jit(
        lambda key, z: filters.particle_filter(
            key,
            log_likelihood,
            z,
            DYNAMICS,
            num_particles=n,
        )
    )(jax.random.key(0), jnp.asarray(OBS, jnp.float32))
    assert out.nll is None
    var = np.diagonal(covs, axis1=-2, axis2=-1)
    # Monte Carlo error of the filtering mean: sqrt(var / N) inflated by the weights' spread and the errors
    # carried over through resampling (a z-score RMS of ~2.2 over three seeds with this model)
    z_score = (np.asarray(out.mean) - means) / np.sqrt(var / n)
    assert abs(z_score.mean()) < 1.0, z_score.mean()
    assert np.sqrt(np.mean(z_score**2)) < 4.0, np.sqrt(np.mean(z_score**2))
    assert np.abs(z_score).max() < 15.0, np.abs(z_score).max()
    # variances: unbiased to a few per cent on average
    ratio = np.diagonal(np.asarray(out.covariance), axis1=-2, axis2=-1) / var
    assert abs(ratio.mean() - 1.0) < 0.03, ratio.mean()
    assert np.abs(ratio - 1.0).max() < 0.5, np.abs(ratio - 1.0).max()
    # the evidence estimate log mean w converges to the Kalman filter's log p(z_t | z_{<t})
    err = np.asarray(out.log_evidence) - logz
    assert np.abs(err).mean() < 0.1, np.abs(err).mean()
    assert abs(err.sum(0).mean()) < 0.25, err.sum(0).mean()


def test_particle_filter_refuses_observations_without_time_and_series_axes():
    with pytest.raises(ValueError, match=r"leading \[T, B\]"):
        filters.particle_filter(
            jax.random.key(0),
            lambda p, z: p[..., 0],
            jnp.zeros(5),
            DYNAMICS,
            num_particles=10,
        )


# ------------------------------------------------------------------------------------- sensor fusion


def test_particle_filter_first_update_on_sensor_fusion_matches_grid_quadrature():
    """At t = 0 the filtering posterior is N(x0_mean, I) x p(range, bearing | px, py): velocities keep their
    prior, and the positions' moments and the evidence are 2-D integrals done here on a grid."""
    task = dt_tasks.make_task("sensor_fusion")
    series, n = 6, 5000
    states, obs = task.simulate(jax.random.key(1), series, 1)
    out = jax.jit(
        lambda key: filters.particle_filter(
            key,
            filters.particle_log_likelihood(task),
            obs,
            task.dynamics,
            num_particles=n,
        )
    )(jax.random.key(2))
    g = np.linspace(-6.0, 8.0, 561)
    px, py = np.meshgrid(g, g, indexing="ij")
    pts = np.zeros(px.shape + (4,), np.float32)
    pts[..., 0], pts[..., 2] = px, py
    m0 = np.asarray(task.x0_mean)
    log_prior = -0.5 * ((px - m0[0]) ** 2 + (py - m0[2]) ** 2) - math.log(2 * math.pi)
    cell = (g[1] - g[0]) ** 2

    def log_integral(log_f):  # log of the grid integral of exp(log_f)
        top = log_f.max()
        return top + math.log(np.exp(log_f - top).sum() * cell)

    for b in range(series):
        ob = jax.tree.map(lambda o, b=b: o[0, b], obs)
        log_lik = np.asarray(task.log_likelihood(jnp.asarray(pts), ob), np.float64)
        evidence = log_integral(log_prior + log_lik)
        p = np.exp(log_prior + log_lik - evidence) * cell
        mean = np.array([np.sum(p * px), np.sum(p * py)])
        var = np.array([np.sum(p * px**2), np.sum(p * py**2)]) - mean**2
        # Monte Carlo error with prior proposals: E_prior[w^2] / E_prior[w]^2 = N / N_eff, also on the grid
        spread = math.exp(log_integral(log_prior + 2 * log_lik) - 2 * evidence)
        pf_mean = np.asarray(out.mean[0, b])
        pf_var = np.diagonal(np.asarray(out.covariance[0, b]))
        mean_err = np.abs(pf_mean[[0, 2]] - mean)
        assert np.all(mean_err < 4 * np.sqrt(var * spread / n)), (b, mean_err, var, spread)
        np.testing.assert_allclose(pf_var[[0, 2]], var, rtol=4 * math.sqrt(2 * spread / n))
        sd_log_evidence = math.sqrt((spread - 1) / n)
        assert abs(float(out.log_evidence[0, b]) - evidence) < 4 * sd_log_evidence, (b, evidence)
        # velocities are not observed: their prior N(0, 1) is untouched by the update
        np.testing.assert_allclose(pf_mean[[1, 3]], 0.0, atol=4 * math.sqrt(spread / n))
        np.testing.assert_allclose(pf_var[[1, 3]], 1.0, rtol=4 * math.sqrt(2 * spread / n))


def test_ekf_linearisation_is_the_analytic_jacobian_of_range_and_bearing():
    task = dt_tasks.make_task("sensor_fusion")
    h, noise_covariance, residual = task.ekf_observation_model()
    w_normal = task.range_weights[0]
    for x in ([1.0, 0.3, 2.0, -0.1], [-3.0, 0.0, 0.5, 1.0], [0.2, -1.0, -4.0, 0.0]):
        x = np.asarray(x)
        px, py = x[0], x[2]
        r2 = px**2 + py**2
        r = math.sqrt(r2)
        analytic = np.array(
            [
                [
                    w_normal * px / r,
                    0.0,
                    w_normal * py / r,
                    0.0,
                ],  # d(E[range])/dx: only the N part moves
                [py / r2, 0.0, -px / r2, 0.0],  # d atan2(px, py)/dx
            ]
        )
        np.testing.assert_allclose(jax.jacfwd(h)(jnp.asarray(x)), analytic, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h(jnp.asarray(x))[1], math.atan2(px, py), atol=1e-6)
        R = np.asarray(noise_covariance(jnp.asarray(x)))
        assert R[0, 1] == 0 and R[1, 1] == pytest.approx(task.bearing_scale**2)
    # a bearing innovation across the +-pi cut is wrapped to the short way round
    innov = residual(jnp.array([5.0, -3.1]), jnp.array([4.0, 3.1]))
    np.testing.assert_allclose(innov, [1.0, 2 * math.pi - 6.2], atol=1e-5)


def test_multinomial_resampling_draws_each_index_with_its_weight():
    w = jnp.asarray([[0.1, 0.0, 0.2, 0.7], [0.25, 0.25, 0.25, 0.25]])
    idx = jax.vmap(lambda k: filters._multinomial_resample(k, w))(
        jax.random.split(jax.random.key(0), 25000)
    )
    freq = np.stack([np.bincount(np.asarray(idx[:, b]).ravel(), minlength=4) for b in range(2)])
    np.testing.assert_allclose(freq / freq.sum(-1, keepdims=True), w, atol=0.005)
