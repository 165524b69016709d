"""Task (c), sensor-fusion filtering: the meta-prior the transformer is trained on (against the official config's
scales) and the filtering evaluation (predict step, time alignment of states and readings, NLL of the true state
under the filtering distribution after each update)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.inference.distribution_transformer import filters
from theorax.inference.distribution_transformer import tasks as dt_tasks
from theorax.inference.distribution_transformer import training as dt_training
from theorax.models.distribution_transformer import DistributionTransformer
from theorax.models.gmm import GMM


def _precisions(gmm: GMM) -> np.ndarray:
    L = np.asarray(gmm.scale_tril, dtype=np.float64)
    return np.linalg.inv(L @ np.swapaxes(L, -1, -2))


def test_meta_prior_precision_scale_is_the_wishart_scale_matrix():
    """Lambda ~ Wishart(df, s I) has mean df s I; means ~ N(0, loc_scale^2 I)."""
    meta_prior = dt_tasks.GMMMetaPrior(loc_scale=2.0, wishart_df=6.0, precision_scale=3.0)
    prior = meta_prior.sample(jax.random.key(0), 20_000, 2, 3)
    lam = _precisions(prior).reshape(-1, 3, 3)
    np.testing.assert_allclose(lam.mean(0), 18.0 * np.eye(3), atol=0.6)
    np.testing.assert_allclose(np.asarray(prior.means).reshape(-1, 3).var(0), 4.0, rtol=0.05)


def test_sensor_fusion_meta_prior_has_the_official_scales():
    """The official config's `default_scale_multiple: 16` multiplies both default scale matrices of
    `GaussianMixtureModelConjugateMetaPrior`: the means' covariance (16 I) and the Wishart's scale matrix
    (16 I, so E[Lambda] = (d + 1) 16 I = 80 I). Reading it for the means only (as this port first did) gives
    E[Lambda] = 5 I: component covariances 16 times too wide for the filter's priors."""
    task = dt_tasks.SensorFusionTask()
    prob = task.sample(jax.random.key(1), 20_000)
    lam = _precisions(prob.prior).reshape(-1, 4, 4)
    np.testing.assert_allclose(lam.mean(0), 80.0 * np.eye(4), atol=3.0)
    np.testing.assert_allclose(np.asarray(prob.prior.means).reshape(-1, 4).var(0), 16.0, rtol=0.05)


def test_filter_predict_and_scoring_are_aligned_with_the_states():
    """With an update that ignores the readings (posterior = prior), the DT filter's NLL at step t must be
    -log N(x_t; A^t m0, A^t A^t' + sum_{s<t} A^s Q A^s') in closed form: this pins the exact per-component
    predict step, the initial prior N(x0_mean, I), and that step t's state is scored after step t's update
    (before the predict)."""
    task = dt_tasks.SensorFusionTask()
    T, B = 6, 5
    states, obs = task.simulate(jax.random.key(2), B, T)
    nll = filters.dt_filter(lambda p, prior, o: prior, None, task, states, obs, 4)
    A, Q = np.asarray(task.A, np.float64), np.asarray(task.dynamics.Q, np.float64)
    mean, cov = np.asarray(task.x0_mean, np.float64), np.eye(4)
    for t in range(T):
        expected = -np.asarray(
            GMM.gaussian(jnp.asarray(mean, jnp.float32), jnp.linalg.cholesky(cov)).log_prob(
                states[t]
            )
        )
        np.testing.assert_allclose(np.asarray(nll[t]), expected, rtol=1e-4, atol=1e-4)
        mean, cov = A @ mean, A @ cov @ A.T + Q


def test_simulated_readings_are_of_the_simulated_states():
    """Readings at step t come from x_t: the bearing residual is the sensor noise (sd 0.1)."""
    task = dt_tasks.SensorFusionTask()
    states, obs = task.simulate(jax.random.key(3), 400, 10)
    resid = dt_tasks.wrap_angle(obs["bearing"][..., 0, 0] - task.true_bearing(states))
    np.testing.assert_allclose(float(jnp.std(resid)), task.bearing_scale, rtol=0.05)


@pytest.mark.slow  # ~55 s of compilation
def test_self_fed_priors_are_the_models_predicted_posteriors():
    """With PriorFeedback the pool holds the filter's initial prior at first and while step < start_step;
    after a step without restarts every entry is the model's posterior for the entry's prior (under the
    parameters before the step, on the readings the step drew) pushed through the predict step, recomputed
    here in float64 numpy: mu <- A mu, Sigma <- A Sigma A^T + Q. Bad settings are refused."""
    task = dt_tasks.SensorFusionTask()
    model = DistributionTransformer(
        **task.model_kwargs(), d_model=16, num_heads=2, num_layers=1, dim_feedforward=32
    )
    opt = dt_training.make_optimizer(1e-3, 10, 2)
    key = jax.random.key(0)
    init = np.asarray(task.initial_prior(4, 4).means)
    fb = dt_training.PriorFeedback(fraction=0.25, reset_prob=0.0, start_step=1)
    state = dt_training.init_state(model, task, opt, key, feedback=fb, batch_size=16)
    np.testing.assert_array_equal(np.asarray(state["pool"].means), init)
    step = dt_training.make_train_step(model, task, opt, batch_size=16, key=key, feedback=fb)
    state, metrics = step(state, 0)  # step < start_step: every entry restarts
    np.testing.assert_array_equal(np.asarray(state["pool"].means), init)
    assert float(metrics["feedback_resets"]) == 1.0
    before = jax.tree.map(np.array, state)  # the step donates its state
    state, metrics = step(state, 1)
    assert float(metrics["feedback_resets"]) == 0.0
    assert np.isfinite(float(metrics["feedback_posterior_nll"]))
    pool = state["pool"]
    assert not np.allclose(np.asarray(pool.means), init)
    # the readings step 1 drew for the pool's priors (make_train_step: fold_in(fold_in(key, step), 1))
    fed = task.sample_given_prior(jax.random.fold_in(jax.random.fold_in(key, 1), 1), before["pool"])
    post = model.apply(before["params"], fed.prior, fed.observations)
    A, Q = np.asarray(task.A, np.float64), np.asarray(task.dynamics.Q, np.float64)
    L = np.asarray(post.scale_tril, np.float64)
    want_cov = A @ (L @ np.swapaxes(L, -1, -2)) @ A.T + Q
    want_means = np.asarray(post.means, np.float64) @ A.T
    np.testing.assert_allclose(np.asarray(pool.means), want_means, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pool.covariances), want_cov, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pool.weights), np.asarray(post.weights), atol=1e-6)
    rest = np.asarray(pool.covariances, np.float64) - Q  # = A Sigma' A^T: positive definite
    assert np.all(np.linalg.eigvalsh(rest) > 0)
    with pytest.raises(ValueError, match="filtering task"):
        dt_training.init_state(
            model, dt_tasks.GMMLinearGaussianTask(), opt, key, feedback=fb, batch_size=16
        )
    with pytest.raises(ValueError, match="fraction"):
        dt_training.make_train_step(
            model, task, opt, batch_size=16, key=key, feedback=dt_training.PriorFeedback(1.5)
        )


@pytest.mark.slow
def test_transformer_filter_trained_with_self_fed_priors_beats_the_ekf():
    """A small DT-4 (3 layers, 2,000 steps of batch 256, 3/4 of each batch self-fed) filters 50 series of 60
    steps with a mean NLL of the true state below 1.5 and at least 1 nat below the EKF's (4.4 on these
    series). Trained on meta-prior draws alone the filter scores far worse at this budget (14.4 after 3,000
    steps in our runs: its posteriors blow up on the filter's priors)."""
    task = dt_tasks.SensorFusionTask()
    model = DistributionTransformer(
        **task.model_kwargs(),
        d_model=64,
        num_heads=8,
        num_layers=3,
        dim_feedforward=256,
        jitter=1e-5,
    )
    num_steps, batch = 2000, 256
    opt = dt_training.make_optimizer(1e-3, num_steps, 200)
    fb = dt_training.PriorFeedback(fraction=0.75, reset_prob=0.02, start_step=200)
    key = jax.random.key(0)
    state = dt_training.init_state(model, task, opt, key, feedback=fb, batch_size=batch)
    step = dt_training.make_train_step(model, task, opt, batch_size=batch, key=key, feedback=fb)
    for i in range(num_steps):
        state, _ = step(state, i)
    params = state["params"]
    states, obs = task.simulate(jax.random.key(10), 50, 60)
    posterior_fn = jax.jit(model.apply)
    dt_nll = float(jnp.mean(filters.dt_filter(posterior_fn, params, task, states, obs, 4)))
    ekf_nll = float(jnp.mean(filters.extended_kalman_filter(task, states, obs)))
    assert dt_nll < 1.5 and dt_nll < ekf_nll - 1.0, (dt_nll, ekf_nll)
