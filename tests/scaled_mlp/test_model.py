"""ScaledMLP: the paper's parameter counts, an independent numpy forward pass, init, names, bad input."""

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf
from theorax.models.scaled_mlp import ScaledMLP, forward_flops, num_params, parse_architecture

# Paper Table 5 / README: 64x64x3 inputs, the 11,230-class ImageNet-21k head (exact counts, reference notes).
PAPER_COUNTS = {
    "B-6/Wi-512": 24_657_374,
    "B-12/Wi-512": 37_261_790,
    "B-6/Wi-1024": 74_469_342,
    "B-12/Wi-1024": 124_843_998,
}


def count(model, shape):
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


@pytest.mark.parametrize("name,expected", PAPER_COUNTS.items())
def test_parameter_counts_match_paper(name, expected):
    model = ScaledMLP.from_name(name, num_classes=11230)
    assert count(model, (64, 64, 3)) == expected
    depth, width, k = parse_architecture(name)
    assert num_params(depth, width, 11230, 64 * 64 * 3, k) == expected
    # fvcore-style MACs are within a few LayerNorm/bias terms of the parameter count (paper App. B.2).
    assert abs(forward_flops(depth, width, 11230, 12288) - expected) / expected < 0.01


def test_names_official_and_paper_spelling():
    assert parse_architecture("B-12/Wi-1024") == (12, 1024, 4)
    assert parse_architecture("B_12-Wi_1024") == (12, 1024, 4)
    assert parse_architecture("B_6-Wi_256-Ex_2") == (6, 256, 2)
    for bad in ("B-12", "ResNet-18", "B-0/Wi-64", "b-12/wi-1024x"):
        with pytest.raises(ValueError, match="architecture"):
            parse_architecture(bad)


def numpy_forward(params, images, depth):
    """Independent re-statement of the official forward pass: NCHW flatten, pre-LN, exact GELU."""
    p = jax.tree.map(np.asarray, params)["params"]
    x = images.transpose(0, 3, 1, 2).reshape(len(images), -1).astype(np.float64)
    x = x @ p["linear_in"]["kernel"] + p["linear_in"]["bias"]
    for i in range(depth):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        h = (x - mu) / np.sqrt(var + 1e-5) * p[f"layernorms_{i}"]["scale"] + p[f"layernorms_{i}"][
            "bias"
        ]
        h = h @ p[f"block_{i}_expand"]["kernel"] + p[f"block_{i}_expand"]["bias"]
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = x + h @ p[f"block_{i}_collapse"]["kernel"] + p[f"block_{i}_collapse"]["bias"]
    return x @ p["linear_out"]["kernel"] + p["linear_out"]["bias"]


def test_forward_matches_independent_numpy():
    model = ScaledMLP(num_classes=5, depth=3, width=24, input_shape=(6, 5, 3))
    images = np.random.default_rng(0).normal(size=(4, 6, 5, 3)).astype(np.float32)
    params = model.init(jax.random.key(1), images)
    # Non-trivial LayerNorm parameters, so a missing affine or wrong epsilon would show.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.3 if "layernorms" in str(path) else v, params
    )
    np.testing.assert_allclose(
        model.apply(params, images), numpy_forward(params, images, 3), rtol=2e-5, atol=2e-5
    )


def test_pytorch_default_init():
    model = ScaledMLP(num_classes=10, depth=1, width=256, input_shape=(16, 16, 3))
    p = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
    for name, fan_in in (("linear_in", 768), ("block_0_expand", 256), ("block_0_collapse", 1024)):
        w, b = np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"])
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
        assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound  # uniform, not normal
        assert b.std() > 0.3 * bound  # biases are random, not zero (Flax's default)
    np.testing.assert_array_equal(p["layernorms_0"]["scale"], 1.0)
    np.testing.assert_array_equal(p["layernorms_0"]["bias"], 0.0)


def test_standard_mlp_is_the_official_smlp():
    model = ScaledMLP(num_classes=10, depth=6, width=64, bottleneck=False)
    n = count(model, (8, 8, 3))
    assert n == num_params(6, 64, 10, 192, bottleneck=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    assert sum(k.endswith("_linear") for k in shapes) == 5  # depth - 1 hidden Linear(m, m)


def test_bfloat16_compute_close_to_float32():
    kw = dict(num_classes=10, depth=2, width=64, input_shape=(8, 8, 3))
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    params = ScaledMLP(**kw).init(jax.random.key(0), x)
    out32 = ScaledMLP(**kw).apply(params, x)
    out16 = ScaledMLP(**kw, dtype=jnp.bfloat16).apply(params, x)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=0.1)


def test_bad_images_are_rejected_before_tracing():
    model = ScaledMLP(num_classes=10, depth=1, width=16, input_shape=(32, 32, 3))
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="rank 4"):
        model.apply(params, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"\(32, 32, 3\)"):
        model.apply(params, jnp.zeros((2, 64, 64, 3)))


def test_from_name_names_expected_and_given_image_shape_before_compiling():
    # No input_shape: the embedding's parameters fix H * W * C, and a wrong image says so in plain words
    # while tracing (lower), before XLA compiles anything, instead of Flax's ScopeParamShapeError.
    model = ScaledMLP.from_name("B-2/Wi-16", num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    chex.assert_shape(model.apply(params, jnp.zeros((2, 8, 8, 3))), (2, 10))
    for wrong in ((2, 16, 16, 3), (2, 8, 8, 1)):
        given = re.escape(str(wrong[1:]))
        with pytest.raises(
            ValueError, match=rf"expect images of shape \(8, 8, 3\).*got images of shape {given}"
        ):
            jax.jit(model.apply).lower(params, jnp.zeros(wrong))
    # A non-square embedding cannot be guessed; the message still names its size and the given shape.
    model = ScaledMLP.from_name("B_1-Wi_8", num_classes=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 6, 3)))
    with pytest.raises(ValueError, match=r"H \* W \* C = 72.*got images of shape \(6, 6, 3\)"):
        model.apply(params, jnp.zeros((1, 6, 6, 3)))


def test_gelu_is_the_exact_erf_form_with_its_gradient():
    from theorax.models.layers import gelu

    x = np.linspace(-8.0, 8.0, 4001)
    np.testing.assert_allclose(
        gelu(jnp.asarray(x)), 0.5 * x * (1 + erf(x / math.sqrt(2))), atol=1e-6
    )
    phi = np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    grad = jax.vmap(jax.grad(gelu))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(grad, 0.5 * (1 + erf(x / math.sqrt(2))) + x * phi, atol=1e-6)
    assert gelu(jnp.ones(2, jnp.bfloat16)).dtype == jnp.bfloat16
