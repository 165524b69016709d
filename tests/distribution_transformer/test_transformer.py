"""models.distribution_transformer and its training: valid GMM outputs (also for extreme inputs), permutation
equivariance, clear errors for bad input before compiling, and convergence on task (a) to the exact posterior."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.inference.distribution_transformer import evaluation as dt_evaluation
from theorax.inference.distribution_transformer import exact
from theorax.inference.distribution_transformer import tasks as dt_tasks
from theorax.inference.distribution_transformer import training as dt_training
from theorax.models.distribution_transformer import (
    DistributionTransformer,
    ModelInputError,
    init_params,
)
from theorax.models.gmm import GMM, GMMError

SMALL = dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64)


def _assert_valid_gmm(gmm: GMM, check_eigenvalues: bool = True):
    """Weights on the simplex; covariances L L^T positive definite: L finite, lower triangular with a
    strictly positive diagonal (a valid Cholesky factor) and, for ordinary inputs, positive eigenvalues in
    float64. The density is finite at every component mean."""
    w = np.asarray(gmm.weights)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(gmm.means)))
    L = np.asarray(gmm.scale_tril, dtype=np.float64)
    assert np.all(np.isfinite(L))
    assert np.all(np.triu(L, 1) == 0)
    assert np.all(np.diagonal(L, axis1=-2, axis2=-1) > 0)
    if check_eigenvalues:
        assert np.all(np.linalg.eigvalsh(L @ np.swapaxes(L, -1, -2)) > 0)
    means = jnp.moveaxis(gmm.means, -2, 0)  # [k, ..., d]
    assert np.all(np.isfinite(np.asarray(gmm.log_prob(means))))


def _gmm_model(dim=2, k=3, max_obs=3, **kw):
    return DistributionTransformer(
        dim=dim,
        num_components=k,
        observation_dims={"a": 1, "b": 2},
        max_observations=max_obs,
        **{**SMALL, **kw},
    )


def _params_with_nonzero_residuals(model, prior, obs):
    """Init, then perturb every parameter: zero-initialised projections would hide bugs in some tests."""

    @jax.jit
    def init(prior, obs):
        params = model.init(jax.random.key(0), prior, obs)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        leaves = [
            x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)
        ]
        return jax.tree.unflatten(tree, leaves)

    return init(prior, obs)


@pytest.fixture(scope="module")
def gmm_setup():
    """One small GMM-prior model (2-D, 3 components, sources a and b), its parameters and a jitted apply,
    shared by the tests below so it compiles once."""
    model = _gmm_model()
    prior = dt_tasks.GMMMetaPrior().sample(jax.random.key(2), 4, 3, 2)
    obs = {"a": jax.random.normal(jax.random.key(3), (4, 2, 1)), "b": jnp.ones((4, 1, 2))}
    params = _params_with_nonzero_residuals(model, prior, obs)
    apply = jax.jit(model.apply, static_argnames="return_prior")
    return model, params, apply, prior, obs


def test_outputs_are_valid_gmms_for_ordinary_and_extreme_inputs(gmm_setup):
    model, params, apply, prior, obs = gmm_setup
    _assert_valid_gmm(apply(params, prior, obs))
    # extreme: huge and tiny scales, far means, vanishing weights, huge observations
    extreme = GMM(
        logits=jnp.array([[0.0, -60.0, -1e4]] * 4),
        means=jnp.array([[[1e6, -1e6], [0.0, 0.0], [-1e5, 3e5]]] * 4),
        scale_tril=jnp.array(
            [
                [
                    jnp.diag(jnp.array([1e-6, 1e6])),
                    jnp.eye(2) * 1e-5,
                    jnp.array([[1e5, 0.0], [-1e5, 1e-4]]),
                ]
            ]
            * 4
        ),
    )
    big_obs = {"a": jnp.full((4, 2, 1), 1e6), "b": jnp.full((4, 1, 2), -1e6)}
    prior_out, post_out = apply(params, extreme, big_obs, return_prior=True)
    _assert_valid_gmm(post_out, check_eigenvalues=False)
    _assert_valid_gmm(prior_out, check_eigenvalues=False)


@pytest.mark.slow  # ~40 s of compilation; the GMM-prior validity checks stay fast
def test_outputs_are_valid_for_non_gmm_priors():
    task = dt_tasks.InverseGammaTask.wide()
    model = DistributionTransformer(**task.model_kwargs(2), **SMALL)
    prob = task.sample(jax.random.key(4), 2)
    params = _params_with_nonzero_residuals(model, prob.prior, prob.observations)
    extreme = jnp.array([[0.5, 1.0], [20.0, -20.0]])
    out = jax.jit(model.apply)(params, extreme, {"z": jnp.array([[[0.3]], [[1e7]]])})
    _assert_valid_gmm(out[:1])
    _assert_valid_gmm(out[1:], check_eigenvalues=False)


def test_permuting_prior_components_permutes_the_output_and_keeps_the_density(gmm_setup):
    model, params, apply, prior, obs = gmm_setup
    perm = jnp.array([2, 0, 1])
    permuted = jax.tree.map(lambda a: jnp.take(a, perm, axis=1), prior)
    out, out_p = apply(params, prior, obs), apply(params, permuted, obs)
    permuted_out = jax.tree.map(lambda a: jnp.take(a, perm, axis=1), out)
    chex.assert_trees_all_close(permuted_out, out_p, rtol=1e-4, atol=1e-5)
    x = jax.random.normal(jax.random.key(7), (10, 4, 2))
    np.testing.assert_allclose(out.log_prob(x), out_p.log_prob(x), rtol=1e-5, atol=1e-5)
    # the output does depend on the prior (so the equality above is not vacuous) ...
    shifted = prior.replace(means=prior.means + 1.0)
    assert not np.allclose(apply(params, shifted, obs).means, out.means, atol=1e-3)
    # ... and permuting the observations of a source leaves it unchanged
    obs_p = {"a": obs["a"][:, ::-1], "b": obs["b"]}
    np.testing.assert_allclose(apply(params, prior, obs_p).means, out.means, rtol=1e-4, atol=1e-5)


def test_bad_input_gives_clear_errors_before_compiling(gmm_setup):
    model, params, apply, prior, obs = gmm_setup
    # shape errors come from tracing the jitted apply, i.e. before XLA compiles anything
    with pytest.raises(ModelInputError, match="dimension 3 but the model was built for dim=2"):
        apply(params, dt_tasks.GMMMetaPrior().sample(jax.random.key(9), 4, 3, 3), obs)
    with pytest.raises(ModelInputError, match="4 components"):
        apply(params, dt_tasks.GMMMetaPrior().sample(jax.random.key(9), 4, 4, 2), obs)
    with pytest.raises(ModelInputError, match="unknown observation source"):
        apply(params, prior, {"c": jnp.zeros((4, 1, 1))})
    with pytest.raises(ModelInputError, match="max_observations=3"):
        apply(params, prior, {"a": jnp.zeros((4, 3, 1)), "b": jnp.zeros((4, 1, 2))})
    with pytest.raises(ModelInputError, match="observations\\['b'\\] has shape"):
        apply(params, prior, {"a": jnp.zeros((4, 1, 1)), "b": jnp.zeros((4, 1, 3))})
    with pytest.raises(ModelInputError, match="batch = \\(4,\\)"):
        apply(params, prior, {"a": jnp.zeros((5, 1, 1))})
    with pytest.raises(ModelInputError, match="takes a GMM prior"):
        apply(params, jnp.zeros((4, 2)), obs)
    # malformed values are checked when concrete (the un-jitted apply), still before any computation
    bad_tril = prior.scale_tril.at[0, 0, 0, 0].set(-1.0)
    with pytest.raises(GMMError, match="positive diagonal"):
        model.apply(params, GMM(prior.logits, prior.means, bad_tril), obs)
    with pytest.raises(GMMError, match="sum to one"):
        GMM.from_weights(jnp.array([0.2, 0.2, 0.2]), prior.means[0], prior.scale_tril[0])
    with pytest.raises(GMMError, match="positive definite"):
        GMM.from_covariance(jnp.zeros(3), prior.means[0], -jnp.tile(jnp.eye(2), (3, 1, 1)))
    with pytest.raises(ModelInputError, match="must be finite"):
        model.apply(params, prior, {"a": jnp.full((4, 1, 1), jnp.nan)})


def test_init_params_validates_first_and_gives_the_init_tree(gmm_setup):
    """`init_params` is `model.init` compiled as one program: the same parameter tree (shapes and dtypes, from
    abstract evaluation of the eager init), and concrete bad values still fail with `check_inputs`'s messages
    (which a plain `jax.jit(model.init)` would trace past)."""
    model, _, _, prior, obs = gmm_setup
    params = init_params(model, jax.random.key(0), prior, obs)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        params, jax.eval_shape(model.init, jax.random.key(0), prior, obs)
    )
    assert not np.allclose(
        np.asarray(params["params"]["component_embedding"]["dense_0"]["kernel"]), 0
    )
    with pytest.raises(ModelInputError, match="must be finite"):
        init_params(model, jax.random.key(0), prior, {"a": jnp.full((4, 1, 1), jnp.nan)})
    bad_tril = prior.scale_tril.at[0, 0, 0, 0].set(-1.0)
    with pytest.raises(GMMError, match="positive diagonal"):
        init_params(model, jax.random.key(0), GMM(prior.logits, prior.means, bad_tril), obs)


def test_training_does_not_import_numpyro_and_models_do_not_import_inference():
    """Training a transformer needs jax, flax and optax only (numpyro is the baselines' dependency), and the
    import direction is experiments -> inference -> models."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import theorax.models.distribution_transformer, theorax.models.gmm\n"
        "assert not [m for m in sys.modules if m.startswith('theorax.inference')], sys.modules\n"
        "import theorax.inference.distribution_transformer.training\n"
        "import theorax.inference.distribution_transformer.filters\n"
        "assert 'numpyro' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_train_step_is_a_pure_function_of_state_and_step():
    task = dt_tasks.GMMLinearGaussianTask()
    model = DistributionTransformer(**task.model_kwargs(), **SMALL)
    opt = dt_training.make_optimizer(1e-3, 10, 2)
    key = jax.random.key(0)
    step = dt_training.make_train_step(model, task, opt, batch_size=8, key=key)
    state0 = dt_training.init_state(model, task, opt, key)
    fresh = lambda: jax.tree.map(jnp.copy, state0)  # noqa: E731 (the step donates its state)
    s1, m1 = step(fresh(), 3)
    s2, m2 = step(fresh(), 3)
    np.testing.assert_array_equal(m1["loss"], m2["loss"])
    chex.assert_trees_all_equal(s1, s2)
    _, m3 = step(fresh(), 4)
    assert float(m3["loss"]) != float(m1["loss"])


def _train_task_a(num_steps, batch_size, lr, seed=0, **size):
    task = dt_tasks.GMMLinearGaussianTask()
    model = DistributionTransformer(**task.model_kwargs(), **size)
    opt = dt_training.make_optimizer(lr, num_steps, num_steps // 10)
    key = jax.random.key(seed)
    state = dt_training.init_state(model, task, opt, key)
    step = dt_training.make_train_step(model, task, opt, batch_size=batch_size, key=key)
    for i in range(num_steps):
        state, _ = step(state, i)
    return task, model, state["params"]


def _expected_kl(task, model, params, n_problems=1000):
    prob = task.sample(jax.random.key(1234), n_problems)
    post = dt_training.make_posterior_fn(model)(params, prob.prior, prob.observations)
    kl = dt_evaluation.monte_carlo_kl(task, prob, post.log_prob, jax.random.key(5), 2000)
    prior_kl = dt_evaluation.monte_carlo_kl(
        task, prob, prob.prior.log_prob, jax.random.key(5), 2000
    )
    return float(kl.mean()), float(prior_kl.mean())


@pytest.mark.slow  # a training run (~75 s here); the learning claim itself
def test_small_transformer_learns_task_a_posterior():
    """Expected KL(exact || q) over 1000 fresh problems < 0.05 (the prior itself scores about 0.48)."""
    task, model, params = _train_task_a(
        2000, 256, 1e-2, d_model=32, num_heads=4, num_layers=2, dim_feedforward=128
    )
    kl, prior_kl = _expected_kl(task, model, params)
    assert prior_kl > 0.3
    assert kl < 0.05, kl


@pytest.mark.slow
def test_transformer_learns_task_a_posterior_closely_and_sequentially():
    task, model, params = _train_task_a(
        6000, 512, 5e-3, d_model=64, num_heads=4, num_layers=2, dim_feedforward=256
    )
    kl, _ = _expected_kl(task, model, params)
    assert kl < 0.015, kl
    # sequential use (needs the prior-consistency loss): two updates with the posterior fed back as the
    # next prior against the exact posterior given both readings
    prob = task.sample(jax.random.key(77), 1000)
    z1 = prob.observations["z"]
    z2 = prob.target[:, None, :] + jax.random.normal(jax.random.key(78), z1.shape)  # a 2nd reading
    posts = dt_training.sequential_posterior(model, params, prob.prior, {"z": jnp.stack([z1, z2])})
    final = jax.tree.map(lambda a: a[-1], posts)
    ref = exact.sequential_linear_gaussian_posterior(
        prob.prior, jnp.eye(1), jnp.eye(1), jnp.concatenate([z1, z2], 1)
    )
    y = ref.sample(jax.random.key(79), 2000)
    seq_kl = float(jnp.mean(ref.log_prob(y) - final.log_prob(y)))
    assert seq_kl < 0.05, seq_kl


def test_smoke_experiment_writes_results_and_is_not_redone(tmp_path, monkeypatch):
    import ml_collections
    from theorax.configs import distribution_transformer as cfg
    from theorax.experiments import distribution_transformer as dtx
    from theorax.experiments import runtime

    config = cfg.get_config("smoke")
    entry = config.tasks.gmm_linear
    entry.baselines.update(nuts_problems=0, svi_problems=0)
    entry.eval.extra_problem_sets = 2
    config.tasks = ml_collections.ConfigDict({"gmm_linear": entry})
    results = dtx.run(config, str(tmp_path))
    methods = results["tasks"]["gmm_linear"]["methods"]
    assert {"DT-2", "prior (no update)"} <= set(methods)
    assert np.isfinite(methods["DT-2"]["kl"]["mean"])
    sets = results["tasks"]["gmm_linear"]["dt_problem_sets"]
    assert (
        sets["set_means"][0] == methods["DT-2"]["kl"]["mean"] and len(set(sets["set_means"])) == 3
    )
    assert sets["mean"] == pytest.approx(np.mean(sets["set_means"])) and sets["sem"] > 0
    assert (tmp_path / "distribution_transformer.png").exists()
    text = dtx.report(results, str(tmp_path))
    assert "](./distribution_transformer.png)" in text and "3 independent sets" in text
    # a finished run is read back, not redone
    monkeypatch.setattr(dtx, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert dtx.run(config, str(tmp_path)) == results
    # bad config values are refused before anything compiles
    config.tasks.gmm_linear.model.num_heads = 3
    with pytest.raises(runtime.ConfigError, match="divisible by num_heads"):
        dtx.run(config, str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="unknown preset"):
        cfg.get_config("gpu")


def test_posterior_fn_in_slices_equals_the_whole_batch(gmm_setup):
    model, params, apply, prior, obs = gmm_setup
    whole = apply(params, prior, obs)
    for slices in (1, 3, 4, 9):  # uneven slices, one problem each, more slices than problems
        sliced = dt_training.make_posterior_fn(model, slices=slices)(params, prior, obs)
        chex.assert_trees_all_close(sliced, whole, rtol=1e-5, atol=1e-6)
    one = jax.tree.map(lambda a: a[0], (prior, obs))
    single = dt_training.make_posterior_fn(model, slices=2)(params, *one)
    np.testing.assert_allclose(single.means, whole.means[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_keys", [0, 1, 3])  # 0: self-attention
def test_attention_equals_flax_multi_head_attention_with_the_same_parameters(num_keys):
    """`Attention` (fused projections, broadcast-sum core, the one-key shortcut) is Flax's
    MultiHeadDotProductAttention: the same parameter tree from the same key, and the same outputs for it."""
    import flax.linen as nn
    from theorax.models.distribution_transformer import Attention

    kx, km, kp, kn = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (7, 5, 32))
    memory = jax.random.normal(km, (7, num_keys, 32)) if num_keys else None
    ours = Attention(num_heads=4, d_model=32)
    peer = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
    params = ours.init(kp, x, memory)
    peer_params = peer.init(kp, x, x if memory is None else memory)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, peer_params)
    chex.assert_trees_all_equal(params, peer_params)
    params = jax.tree.map(  # non-zero biases too
        lambda a: a + 0.1 * jax.random.normal(kn, a.shape), params
    )
    got = ours.apply(params, x, memory)
    want = peer.apply(params, x, x if memory is None else memory)
    assert got.shape[-1] == 32
    np.testing.assert_allclose(jnp.broadcast_to(got, want.shape), want, rtol=1e-5, atol=1e-5)
