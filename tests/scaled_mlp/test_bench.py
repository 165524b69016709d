"""The scaled-MLP bench's ablation and floors: its plain-JAX twin is the model, the split telescopes to the step,
and the update floor is the optimiser's update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from theorax.experiments import bench_scaled_mlp
from theorax.inference.scaled_mlp import augment
from theorax.models.scaled_mlp import ScaledMLP, flatten_chw


def _model_and_images():
    model = ScaledMLP(10, 2, 16, 4, input_shape=(8, 8, 3))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    images = jax.random.randint(jax.random.key(1), (5, 8, 8, 3), 0, 256).astype(jnp.uint8)
    return model, params, images


def test_twin_with_layernorm_and_gelu_computes_the_model():
    model, params, images = _model_and_images()
    x = augment.normalize(images, (0.5,) * 3, (0.25,) * 3)
    np.testing.assert_allclose(
        bench_scaled_mlp.twin_logits(params, flatten_chw(x)),
        model.apply(params, x),
        rtol=1e-5,
        atol=1e-5,
    )
    # Without them it is the linear algebra alone: an affine map of the input.
    lin = lambda v: bench_scaled_mlp.twin_logits(params, v, layernorm=False, gelu=False)
    a, b = jax.random.normal(jax.random.key(2), (2, 1, 192))
    np.testing.assert_allclose(lin(a + b) - lin(b), lin(a) - lin(jnp.zeros_like(a)), atol=1e-4)
    # ...and the GELU-free twin is not the model.
    assert not np.allclose(
        bench_scaled_mlp.twin_logits(params, flatten_chw(x), gelu=False), model.apply(params, x)
    )


def test_twin_step_descends_the_loss():
    _, params, images = _model_and_images()
    x = flatten_chw(augment.normalize(images, (0.5,) * 3, (0.25,) * 3))
    labels = jnp.arange(5) % 10
    one = bench_scaled_mlp.twin_step(params, x, labels, True, True, None)
    losses = [float(one()) for _ in range(4)]  # the donated parameters carried from call to call
    assert np.all(np.diff(losses) < 0), losses


def test_ablation_telescopes_from_the_floor_to_the_step():
    names = [name for name, _ in bench_scaled_mlp.ABLATION]
    assert names[0] == "matmul_floor" and names[-1] == "theorax"
    times = {n: {"min_s": 0.01 * (i + 1), "median_s": 0.02 * (i + 1)} for i, n in enumerate(names)}
    rows = bench_scaled_mlp.ablation(times)
    assert rows[0]["extra_min_s"] is None
    total = sum(r["extra_median_s"] for r in rows[1:])
    assert np.isclose(rows[0]["median_s"] + total, times["theorax"]["median_s"])


def test_update_alone_is_the_optimisers_update_carried_from_call_to_call():
    _, params, _ = _model_and_images()
    opt = optax.lion(1e-2)
    grads = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params
    )
    one = bench_scaled_mlp.update_alone(params, opt, grads)
    got = [
        jax.tree.map(np.asarray, one()[0]) for _ in range(2)
    ]  # copies: the next call donates them
    state, expected = opt.init(params), params
    for g in got:
        updates, state = opt.update(grads, state, expected)
        expected = optax.apply_updates(expected, updates)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g, expected
        )
    assert not np.allclose(
        got[1]["params"]["linear_in"]["kernel"], params["params"]["linear_in"]["kernel"]
    )
