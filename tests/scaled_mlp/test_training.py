"""The recipe's steps: loss, Lion, accumulation, fine-tuning groups, linear probe, TTA, scaling-law fit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import logsumexp, softmax
from theorax.inference.scaled_mlp import augment
from theorax.inference.scaled_mlp import training as lib
from theorax.inference.scaled_mlp.scaling_law import ScalingLaw, fit_scaling_law, pareto_frontier
from theorax.models.scaled_mlp import ScaledMLP

RES = 8


def setup(n=16, classes=5, seed=0):
    model = ScaledMLP(num_classes=classes, depth=2, width=16, input_shape=(RES, RES, 3))
    params = model.init(jax.random.key(seed), jnp.zeros((1, RES, RES, 3)))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 256, (n, RES, RES, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, n), jnp.int32)
    return model, params, x, y


def recipe(**kw):
    return lib.Recipe(res=RES, mean=(0.5,) * 3, std=(0.25,) * 3, **kw)


def test_smoothed_cross_entropy_matches_torch_formula():
    logits = np.random.default_rng(0).normal(size=(4, 7))
    labels = np.array([0, 3, 6, 2])
    a = 0.3
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # torch: (1 - a) * NLL + a * mean_k(-log p_k)
    expected = (1 - a) * -logp[np.arange(4), labels] + a * -logp.mean(-1)
    out = lib.smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), a)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_lion_matches_official_update():
    rng = np.random.default_rng(0)
    p, g1, g2 = (rng.normal(size=5) for _ in range(3))
    lr, wd, b1, b2 = 0.1, 0.5, 0.9, 0.99
    opt = lib.make_optimizer(lib.OptimizerConfig("lion", weight_decay=wd), lr)
    params = jnp.asarray(p)
    state = opt.init(params)
    # Official: p *= 1 - lr wd; p -= lr sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g.
    m, ref = np.zeros(5), p.copy()
    for g in (g1, g2):
        updates, state = opt.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        ref = ref * (1 - lr * wd) - lr * np.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    np.testing.assert_allclose(params, ref, rtol=1e-6)


def run_step(opt, rec, params, x, y, model, **kw):
    step = lib.make_train_step(model, opt, rec, jax.random.key(0), **kw)
    state = {"params": params, "opt_state": opt.init(params)}
    state = jax.tree.map(jnp.copy, state)
    return step(state, x, y, np.int32(0))


def test_gradient_accumulation_equals_one_big_batch():
    model, params, x, y = setup(n=16)
    opt = lib.make_optimizer(lib.OptimizerConfig("sgd", momentum=0.0), 0.1)
    plain = dict(augment=False, mixup_alpha=0.0)
    s1, m1 = run_step(opt, recipe(**plain), params, x, y, model)
    s4, m4 = run_step(opt, recipe(accum_steps=4, **plain), params, x, y, model)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    chex.assert_trees_all_close(s1["params"], s4["params"], rtol=1e-7, atol=1e-6)


def test_finetune_body_learning_rate_multiplier():
    model, params, x, y = setup()
    lr = 0.5
    opt = lib.make_optimizer(lib.OptimizerConfig("sgd", momentum=0.0, body_lr_multiplier=0.1), lr)
    rec = recipe(augment=False, mixup_alpha=0.0)
    x_in = lib.train_inputs(jax.random.key(0), x, y, rec)[0]

    def loss(p):
        return lib.smoothed_cross_entropy(model.apply(p, x_in), y, 0.3).mean()

    grads = jax.grad(loss)(params)
    state, _ = run_step(opt, rec, params, x, y, model)
    new, old, g = state["params"]["params"], params["params"], grads["params"]
    for name, factor in (("linear_out", 1.0), ("block_0_expand", 0.1), ("linear_in", 0.1)):
        np.testing.assert_allclose(
            new[name]["kernel"] - old[name]["kernel"], -lr * factor * g[name]["kernel"], atol=1e-6
        )


def test_linear_probe_freezes_body():
    model, params, x, y = setup()
    opt = lib.make_optimizer(lib.OptimizerConfig("lion", linear_probe=True), 1e-2)
    state, _ = run_step(opt, recipe(), params, x, y, model, linear_probe=True)
    for name, value in state["params"]["params"].items():
        changed = any(
            np.any(a != b)
            for a, b in zip(
                jax.tree.leaves(value), jax.tree.leaves(params["params"][name]), strict=True
            )
        )
        assert changed == (name == "linear_out"), name


def test_training_learns_a_separable_problem():
    # Labels are a function of the mean brightness: a few Lion steps must fit it from near chance.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (64, RES, RES, 3)), jnp.float32)
    y = jnp.asarray(x.mean((1, 2, 3)) > 127.5, jnp.int32)
    model = ScaledMLP(num_classes=2, depth=2, width=32, input_shape=(RES, RES, 3))
    params = model.init(jax.random.key(0), x[:1])
    opt = lib.make_optimizer(lib.OptimizerConfig("lion"), 3e-3)
    rec = recipe(augment=False, mixup_alpha=0.0, label_smoothing=0.0)
    step = lib.make_train_step(model, opt, rec, jax.random.key(0))
    state = {"params": params, "opt_state": opt.init(params)}
    losses = []
    for i in range(60):
        state, m = step(state, x, y, np.int32(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.2 * losses[0]
    sums = lib.make_eval_step(model, rec)(state["params"], x, y, jnp.ones(64, bool))
    assert float(sums["top1"]) / 64 > 0.95


def test_tta_averages_probabilities_and_masks():
    model, params, x, y = setup(n=8, classes=10)
    rec = recipe(crop_scale=(0.4, 1.0), crop_ratio=(1.0, 1.0))
    mask = jnp.array([True] * 6 + [False] * 2)
    key, crops = jax.random.key(0), 4
    sums = lib.make_tta_step(model, rec, crops, key)(params, x, y, mask)
    assert float(sums["count"]) == 6
    assert 0 <= float(sums["top1"]) <= float(sums["top5"]) <= 6

    # By hand: the same crops and flips (one key per crop, split into crop and flip keys), each crop's
    # logits from the plain model, softmax per crop in float64, the probabilities averaged over crops.
    logits = []
    for k in jax.random.split(key, crops):
        k_crop, k_flip = jax.random.split(k)
        view = augment.random_resized_crop(k_crop, x, RES, rec.crop_scale, rec.crop_ratio)
        view = augment.normalize(augment.random_flip(k_flip, view), rec.mean, rec.std)
        logits.append(np.asarray(model.apply(params, view), np.float64))
    logits = np.stack(logits)
    chex.assert_shape(logits, (crops, 8, 10))
    assert np.ptp(logits, axis=0).max() > 0.1  # the crops differ, so how they are combined matters
    probs = softmax(logits, axis=-1).mean(0)
    rows, labels, m = np.arange(8), np.asarray(y), np.asarray(mask, np.float64)
    rank = (probs > probs[rows, labels][:, None]).sum(-1)  # classes scored above the true one
    expected = {
        "top1": ((rank == 0) * m).sum(),
        "top5": ((rank < 5) * m).sum(),
        "loss": -(np.log(probs[rows, labels]) * m).sum(),
        "count": m.sum(),
    }
    chex.assert_trees_all_close(jax.device_get(sums), expected, rtol=1e-5)
    # Averaging logits instead (the paper's wording) gives a different loss, so the check can tell.
    mean_logits = logits.mean(0)
    log_q = mean_logits - logsumexp(mean_logits, axis=-1, keepdims=True)
    assert abs(-(log_q[rows, labels] * m).sum() - expected["loss"]) > 1e-3 * expected["loss"]


def test_cosine_schedule_is_stepped_per_epoch():
    sched = lib.learning_rate_schedule(1.0, "cosine", steps_per_epoch=10, epochs=4)
    values = [float(sched(s)) for s in (0, 9, 10, 25, 39)]
    np.testing.assert_allclose(
        values,
        [1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="schedule"):
        lib.learning_rate_schedule(1.0, "linear", 10, 4)


def test_scaling_law_fit_recovers_parameters():
    law = ScalingLaw(a=0.8, b=2.0, alpha=0.35, e_inf=0.1, c_scale=1e12)
    compute = np.geomspace(1e12, 1e17, 12)
    error = law(compute) * (1 + 0.002 * np.random.default_rng(0).normal(size=12))
    fit = fit_scaling_law(compute, error)
    assert abs(fit.alpha - 0.35) < 0.05 and abs(fit.e_inf - 0.1) < 0.02
    np.testing.assert_allclose(fit(compute), error, rtol=0.02)


def test_pareto_frontier_and_bad_fits():
    np.testing.assert_array_equal(pareto_frontier([1, 2, 3, 4], [0.5, 0.6, 0.4, 0.45]), [0, 2])
    with pytest.raises(ValueError, match=">= 4 runs"):
        fit_scaling_law([1, 2, 3], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="positive"):
        fit_scaling_law([0, 2, 3, 4], [0.5, 0.4, 0.3, 0.2])
