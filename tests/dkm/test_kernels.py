"""Kernels of a Gram matrix alone (models/dkm.py), checked against formulas written out independently here, a
wide random network, and their own full-matrix versions on inducing blocks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.inference import dkm
from theorax.models import dkm as kernels
from theorax.models.dkm import GramBlocks


def _gram(rng, p, n0=4):
    x = rng.normal(size=(p, n0))
    return x, x @ x.T / n0


def _arccos_numpy(g, w, b):
    """Cho and Saul's degree-1 arc-cosine kernel, entry by entry: (1/pi) |x||y| (sin t + (pi - t) cos t)."""
    p = g.shape[0]
    k = np.empty_like(g)
    for i in range(p):
        for j in range(p):
            nx, ny = math.sqrt(g[i, i]), math.sqrt(g[j, j])
            cos = min(max(g[i, j] / (nx * ny), -1.0), 1.0)
            t = math.acos(cos)
            k[i, j] = w * nx * ny * (math.sin(t) + (math.pi - t) * cos) / math.pi + b
    return k


def test_relu_kernel_is_the_arc_cosine_formula_and_keeps_the_diagonal():
    rng = np.random.default_rng(0)
    _, g = _gram(rng, 7)
    with jax.enable_x64(True):
        k = np.asarray(kernels.relu_kernel(jnp.asarray(g), weight_var=1.3, bias_var=0.2))
    np.testing.assert_allclose(k, _arccos_numpy(g, 1.3, 0.2), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.diag(k), 1.3 * np.diag(g) + 0.2, rtol=1e-14)


def test_relu_kernel_is_twice_a_wide_relu_layers_empirical_gram():
    # features f ~ N(0, G): 2 E[relu(f) relu(f)^T] is the DKM's ReLU kernel with w = 1, b = 0.
    rng = np.random.default_rng(1)
    _, g = _gram(rng, 5)
    f = np.linalg.cholesky(g + 1e-12 * np.eye(5)) @ rng.normal(size=(5, 400_000))
    empirical = 2 * np.maximum(f, 0) @ np.maximum(f, 0).T / f.shape[1]
    with jax.enable_x64(True):
        k = np.asarray(kernels.relu_kernel(jnp.asarray(g)))
    np.testing.assert_allclose(k, empirical, rtol=0.02, atol=0.01 * np.max(np.diag(g)))


def test_sqexp_kernel_is_the_rbf_kernel_of_the_inputs():
    rng = np.random.default_rng(2)
    x, g = _gram(rng, 6, n0=3)
    ell = 0.7
    d2 = np.sum((x[:, None] - x[None]) ** 2, -1)
    rbf = 1.5 * np.exp(-d2 / (2 * (ell * math.sqrt(3)) ** 2))
    with jax.enable_x64(True):
        k = np.asarray(kernels.sqexp_kernel(jnp.asarray(g), lengthscale=ell, variance=1.5))
    np.testing.assert_allclose(k, rbf, rtol=1e-12, atol=1e-14)


def test_normalised_gaussian_kernel_formula():
    rng = np.random.default_rng(3)
    _, g = _gram(rng, 5)
    d = np.sqrt(np.diag(g))
    want = 0.8 * np.outer(d, d) * np.exp(g / np.outer(d, d) - 1) + 0.3
    with jax.enable_x64(True):
        k = np.asarray(kernels.normalised_gaussian_kernel(jnp.asarray(g), 0.8, 0.3))
    np.testing.assert_allclose(k, want, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_kernels_on_inducing_blocks_are_the_blocks_of_the_full_kernel(name):
    rng = np.random.default_rng(4)
    z, x = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    fn = kernels.KERNELS[name]
    params = kernels.KERNEL_DEFAULTS[name]
    with jax.enable_x64(True):
        full = jax.jit(lambda a: fn(kernels.input_gram(a), **params))(np.concatenate([z, x]))
        blocks = jax.jit(lambda a, b: fn(kernels.input_blocks(a, b), **params))(z, x)
        full = np.asarray(full)
    np.testing.assert_allclose(blocks.ii, full[:4, :4], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(blocks.ti, full[4:, :4], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(blocks.t, np.diag(full)[4:], rtol=1e-12, atol=1e-14)


def test_relu_kernel_gradient_is_finite_at_collinear_points():
    # A duplicated point and a test point on an inducing point: cos theta = 1, where sqrt and arccos have
    # infinite slopes but the kernel does not.
    x = jnp.array([[1.0, 0.5], [1.0, 0.5], [2.0, 1.0], [-1.0, 0.3]])

    def total(x):
        k = kernels.relu_kernel(kernels.input_gram(x), 1.0, 0.1)
        kb = kernels.relu_kernel(kernels.input_blocks(x[:2], x), 1.0, 0.1)
        return jnp.sum(k) + jnp.sum(kb.ti) + jnp.sum(kb.t)

    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(total))(x))))
    # and it matches central differences (float64)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x, np.float64))
        g64 = np.asarray(jax.jit(jax.grad(total))(x64))
        eps = 1e-6
        steps = eps * np.eye(8).reshape(8, 4, 2)
        batched = jax.jit(jax.vmap(total))
        fd = (np.asarray(batched(x64 + steps)) - np.asarray(batched(x64 - steps))) / (2 * eps)
    np.testing.assert_allclose(g64, fd.reshape(4, 2), rtol=1e-5, atol=1e-6)


def test_relu_kernel_derivative_rule_matches_autodiff_of_the_formula():
    """The ReLU kernel's closed-form derivative (w.r.t. the Gram blocks and w, b) against JAX's autodiff of
    w [sqrt(g_xx g_yy - g_xy^2) + (pi - arccos(c)) g_xy] / pi + b with `jnp.arccos`, away from c = +-1."""
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        z, x = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(7, 3)))

        def formula(ti, t, ii, w, b):
            d = jnp.diagonal(ii)
            c = ti / jnp.sqrt(t[:, None] * d[None, :])
            root = jnp.sqrt(t[:, None] * d[None, :] - ti**2)
            return w * (root + (jnp.pi - jnp.arccos(c)) * ti) / jnp.pi + b

        def ours(ti, t, ii, w, b):
            return kernels.relu_kernel(GramBlocks(ii, ti, t), w, b).ti

        blocks = kernels.input_blocks(z, x)
        args = (blocks.ti, blocks.t, blocks.ii, 1.3, 0.2)
        cot = jnp.asarray(rng.normal(size=(7, 5)))
        np.testing.assert_allclose(ours(*args), formula(*args), rtol=1e-12)
        got = jax.vjp(ours, *args)[1](cot)
        want = jax.vjp(formula, *args)[1](cot)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def _relu_recursion(x, depth, w, b):
    """The NNGP recursion written out: G_0 = X X^T / N_0, G_l = the arc-cosine formula of G_{l-1}."""
    g = x @ x.T / x.shape[1]
    for _ in range(depth):
        g = _arccos_numpy(g, w, b)
    return g


def test_nngp_gram_is_the_arc_cosine_recursion():
    x = np.random.default_rng(5).normal(size=(6, 5))
    with jax.enable_x64(True):
        g = np.asarray(
            dkm.nngp_gram(jnp.asarray(x), 3, "relu", {"weight_var": 1.0, "bias_var": 0.1})
        )
    np.testing.assert_allclose(g, _relu_recursion(x, 3, 1.0, 0.1), rtol=1e-12)


def test_nngp_gram_is_a_wide_random_relu_networks_empirical_gram():
    # h_1 = X W_0 / sqrt(N_0); h_{l+1} = sqrt(2 w) relu(h_l) W_l / sqrt(N) + sqrt(b) beta_l, W, beta ~ N(0, 1):
    # h_L h_L^T / N -> G_L as the width N grows (the NNGP limit); the error is O(1 / sqrt(N)).
    rng = np.random.default_rng(6)
    x, width, w, b = rng.normal(size=(5, 4)), 4000, 1.0, 0.1
    h = x @ rng.normal(size=(4, width)) / math.sqrt(4)
    for _ in range(2):
        weights = rng.standard_normal((width, width), dtype=np.float32)
        h = math.sqrt(2 * w) * np.maximum(h, 0) @ weights / math.sqrt(width)
        h = h + math.sqrt(b) * rng.normal(size=(1, width))
    empirical = h @ h.T / width
    with jax.enable_x64(True):
        g = np.asarray(dkm.nngp_gram(jnp.asarray(x), 2, "relu", {"weight_var": w, "bias_var": b}))
    np.testing.assert_allclose(empirical, g, rtol=0.1, atol=0.05 * np.max(np.diag(g)))
    # the plain NNGP convention (half the kernel) is far off: the check can fail
    assert np.max(np.abs(empirical - (g - b) / 2 - b)) > 0.2 * np.max(np.diag(g))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_polynomial_arccos_matches_libm_to_a_few_ulp(dtype):
    # The ReLU kernel's arccos is a polynomial (vectorised); numpy's libm arccos is the reference.
    c = np.concatenate([np.linspace(-1.0, 1.0, 200_001), [0.5, -0.5, np.nextafter(0.5, 1.0)],
                        1.0 - np.logspace(-16, -1, 200), -1.0 + np.logspace(-16, -1, 200)])  # fmt: skip
    with jax.enable_x64(dtype == "float64"):
        c = c.astype(dtype)
        got = np.asarray(jax.jit(kernels._arccos)(jnp.asarray(c)), np.float64)
    ref = np.arccos(c.astype(np.float64))
    ulp = float(np.spacing(np.asarray(np.pi, dtype)))  # the spacing at the largest value, pi
    assert np.max(np.abs(got - ref)) <= 4 * ulp
    assert got[0] == pytest.approx(np.pi, abs=ulp) and got[200_000] == 0.0
