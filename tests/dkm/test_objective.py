"""The DKM objective and its limits: KL(G = K) = 0, the NNGP as nu -> infinity and at initialisation, the
closed-form optimum of a one-layer linear DKM, the sparse DKM with inducing points at the data equal to the full
one, and non-negative propagated diagonals."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.inference import dkm
from theorax.inference.dkm import linalg, model, objectives
from theorax.models import dkm as kernels
from theorax.models.dkm import GramBlocks

INF = float("inf")


def _data(seed=0, p=12, n0=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(p, n0))
    return x, np.sin(x[:, 0]) + 0.1 * rng.normal(size=p)


def test_gaussian_kl_is_zero_at_g_equal_k_and_matches_the_formula_elsewhere():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    g, k = a @ a.T / 7, b @ b.T / 7 + 0.1 * np.eye(5)
    with jax.enable_x64(True):
        kl0, _ = linalg.gaussian_kl(jnp.asarray(k), jnp.asarray(k))
        kl, _ = linalg.gaussian_kl(jnp.asarray(g), jnp.asarray(k))
    ratio = np.linalg.solve(k, g)
    want = 0.5 * (np.trace(ratio) - np.linalg.slogdet(ratio)[1] - 5)
    assert abs(float(kl0)) < 1e-12
    np.testing.assert_allclose(float(kl), want, rtol=1e-10)
    assert want > 0.1


def test_log_marginal_gradient_matches_autodiff_of_the_dense_formula():
    """The closed-form gradient of `gaussian_log_marginal_of` (through the jitter) against autodiff of
    -1/2 tr(Y^T K_j^-1 Y) - C/2 log det K_j - PC/2 log 2 pi with `jnp.linalg.solve` / `slogdet`."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 8))
    with jax.enable_x64(True):
        k, y = jnp.asarray(a @ a.T / 8 + 0.3 * np.eye(8)), jnp.asarray(rng.normal(size=(8, 2)))
        j = 1e-4

        def dense(k, y):
            kj = 0.5 * (k + k.T)
            kj = kj + jnp.diag(j * jnp.diagonal(kj) + j)
            quad = jnp.sum(y * jnp.linalg.solve(kj, y))
            return -0.5 * (quad + 2 * jnp.linalg.slogdet(kj)[1] + 16 * math.log(2 * math.pi))

        ours = lambda k, y: objectives.gaussian_log_marginal_of(k, y, j)[0]
        np.testing.assert_allclose(ours(k, y), dense(k, y), rtol=1e-12)
        (gk, gy), (wk, wy) = jax.grad(ours, (0, 1))(k, y), jax.grad(dense, (0, 1))(k, y)
        np.testing.assert_allclose(gk, 0.5 * (wk + wk.T), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(gy, wy, rtol=1e-10)


def test_factorize_inverse_and_its_derivative_match_the_dense_inverse_and_the_cholesky_path():
    """`linalg.factorize(inverse=True)` (K_j^-1 and log det K_j with their own derivative rule) against
    `jnp.linalg.inv` / `slogdet` of the jittered matrix differentiated by JAX, in reverse and forward mode; and
    its conditional and KL equal the Cholesky factor's (`inverse=False`), values and gradients."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 3))
    j = 1e-4
    with jax.enable_x64(True):
        k, c = jnp.asarray(a @ a.T / 6 + 0.2 * np.eye(6)), jnp.asarray(b)
        dk = jnp.asarray(rng.normal(size=(6, 6)))

        def dense(k):
            kj = 0.5 * (k + k.T)
            kj = kj + jnp.diag(j * jnp.diagonal(kj) + j)
            return jnp.linalg.inv(kj), jnp.linalg.slogdet(kj)[1]

        def ours(k):
            f = linalg.factorize(k, j, inverse=True)
            return f.inv, f.logdet

        scalar = lambda fn: lambda k: jnp.sum(jnp.sin(fn(k)[0] @ c)) + fn(k)[1] ** 2
        for got, want in zip(ours(k), dense(k), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            jax.grad(scalar(ours))(k), jax.grad(scalar(dense))(k), rtol=1e-8, atol=1e-11
        )
        for got, want in zip(
            jax.jvp(ours, (k,), (dk,))[1], jax.jvp(dense, (k,), (dk,))[1], strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-11)

        k_ti, k_t = jnp.asarray(rng.normal(size=(4, 6))), jnp.full(4, 50.0)
        chol_q = jnp.linalg.cholesky(jnp.asarray(b @ b.T + 0.5 * np.eye(6)))

        def through(inverse):
            def value(k, chol_q, mean):
                f = linalg.factorize(k, j, inverse)
                mean_t, cross, var = objectives.conditional(
                    GramBlocks(k, k_ti, k_t), f, chol_q, mean
                )
                return (
                    jnp.sum(mean_t**2)
                    + jnp.sum(jnp.cos(cross))
                    + jnp.sum(var)
                    + linalg.kl(chol_q, f, mean)
                )

            return jax.value_and_grad(value, (0, 1, 2))(k, chol_q, c[:, :2])

        (v_inv, g_inv), (v_chol, g_chol) = through(True), through(False)
        np.testing.assert_allclose(v_inv, v_chol, rtol=1e-10)
        for got, want in zip(g_inv, g_chol, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


def test_outer_and_a_shared_covariance_have_the_plain_products_derivatives():
    """`linalg.outer` (one backward product) against autodiff of L @ L.T, in reverse and forward mode; and a
    covariance formed once and passed as `q` to `conditional` and `kl` gives the gradients of each forming
    its own."""
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        chol = jnp.tril(jnp.asarray(rng.normal(size=(5, 5))))
        dchol, w = jnp.asarray(rng.normal(size=(5, 5))), jnp.asarray(rng.normal(size=(5, 5)))
        plain = lambda c: c @ c.T
        np.testing.assert_allclose(linalg.outer(chol), plain(chol), rtol=1e-14)
        np.testing.assert_allclose(
            jax.jvp(linalg.outer, (chol,), (dchol,))[1],
            jax.jvp(plain, (chol,), (dchol,))[1],
            rtol=1e-12,
        )
        scalar = lambda fn: lambda c: jnp.sum(jnp.sin(fn(c) @ w))
        np.testing.assert_allclose(
            jax.grad(scalar(linalg.outer))(chol), jax.grad(scalar(plain))(chol), rtol=1e-12
        )

        a = rng.normal(size=(5, 5))
        k = jnp.asarray(a @ a.T / 5 + 0.3 * np.eye(5))
        blocks = GramBlocks(k, jnp.asarray(rng.normal(size=(3, 5))), jnp.full(3, 20.0))
        chol_q = jnp.linalg.cholesky(jnp.asarray(a.T @ a / 5 + 0.2 * np.eye(5)))

        def value(k, chol_q, shared):
            f = linalg.factorize(k, 1e-4, inverse=True)
            q = linalg.outer(chol_q) if shared else None
            _, cross, var = objectives.conditional(GramBlocks(k, *blocks[1:]), f, chol_q, q=q)
            return jnp.sum(jnp.cos(cross)) + jnp.sum(var) + linalg.kl(chol_q, f, q=q)

        shared = jax.grad(value, (0, 1))(k, chol_q, True)
        separate = jax.grad(value, (0, 1))(k, chol_q, False)
        for got, want in zip(shared, separate, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)


def test_nu_infinity_fit_is_the_nngp_exactly():
    x, y = _data()
    params = {"weight_var": 1.0, "bias_var": 0.1}
    state = dkm.fit(x, y, depth=2, nu=INF, kernel="relu", options=dkm.FitOptions(steps=1),
                    model=dkm.ModelOptions(learn_kernel=False, kernel_params=params))  # fmt: skip
    grams, k_out = dkm.gram_matrices(state)
    with jax.enable_x64(True):
        g2 = np.asarray(dkm.nngp_gram(jnp.asarray(x), 2, "relu", params))
        g3 = np.asarray(dkm.nngp_gram(jnp.asarray(x), 3, "relu", params))
    np.testing.assert_array_equal(np.asarray(grams[1]), g2)
    np.testing.assert_allclose(np.asarray(k_out), g3, rtol=1e-14)


def _relu_two_layers():
    """Data, fixed ReLU hyper-parameters and their NNGP Grams G_1, G_2."""
    x, y = _data(1)
    params = {"weight_var": 1.0, "bias_var": 0.1}
    opts = dkm.ModelOptions(learn_kernel=False, learn_noise=False, kernel_params=params, jitter=0.0)
    with jax.enable_x64(True):
        nngp = [np.asarray(dkm.nngp_gram(jnp.asarray(x), d, "relu", params)) for d in (1, 2)]
    return x, y, params, opts, nngp


def test_nngp_initialisation_reproduces_the_nngp_and_zeroes_every_kl():
    x, y, params, opts, nngp = _relu_two_layers()
    with jax.enable_x64(True):
        trainer = dkm.make_trainer(x, y, depth=2, nu=1.0, model=opts)
        init = dkm.gram_matrices(trainer.state(trainer.init_state))[0]
        for g, want in zip(init, nngp, strict=True):
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-10, atol=1e-12)
        # every KL term is 0 there: the objective does not depend on nu
        values = [
            float(dkm.objective(nngp, x, y, nu=nu, kernel_params=params, jitter=0.0))
            for nu in (0.1, 10)
        ]
        np.testing.assert_allclose(values[0], values[1], rtol=1e-12)


@pytest.mark.slow
def test_large_nu_keeps_the_optimum_at_the_nngp_and_nu_one_moves_away():
    x, y, _, opts, nngp = _relu_two_layers()
    # a large finite nu keeps the optimum at the NNGP (to O(1 / nu))
    fitted = dkm.fit(
        x, y, depth=2, nu=1e6, model=opts, options=dkm.FitOptions(optimizer="lbfgs", steps=40)
    )
    for g, want in zip(dkm.gram_matrices(fitted)[0], nngp, strict=True):
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5)
    # while nu = 1 learns a different representation
    learned = dkm.fit(
        x, y, depth=2, nu=1.0, model=opts, options=dkm.FitOptions(optimizer="lbfgs", steps=40)
    )
    assert np.max(np.abs(np.asarray(dkm.gram_matrices(learned)[0][0]) - nngp[0])) > 1e-3


def _closed_form_linear(k0, y, nu):
    """h = [-(N_y - nu) + sqrt((N_y - nu)^2 + 4 nu s)] / (2 nu) per eigenvalue s of L^-1 Y Y^T L^-T."""
    n_y = y.shape[1]
    chol = np.linalg.cholesky(k0)
    white = np.linalg.solve(chol, y)
    s, u = np.linalg.eigh(white @ white.T)
    h = (-(n_y - nu) + np.sqrt((n_y - nu) ** 2 + 4 * nu * s)) / (2 * nu)
    return chol @ (u * h) @ u.T @ chol.T


@pytest.mark.parametrize("n_y, nu", [(8, 2.0), pytest.param(3, 5.0, marks=pytest.mark.slow)])
def test_one_linear_layer_reaches_the_closed_form_optimum(n_y, nu):
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 10)), rng.normal(size=(6, n_y))
    opts = dkm.ModelOptions(kernel_params={"weight_var": 1.0, "bias_var": 0.0}, learn_kernel=False,
                            noise_var=0.0, learn_noise=False, jitter=0.0)  # fmt: skip
    state = dkm.fit(x, y, depth=1, nu=nu, kernel="linear", model=opts,
                    options=dkm.FitOptions(optimizer="lbfgs", steps=300))  # fmt: skip
    g = np.asarray(dkm.gram_matrices(state)[0][0])
    want = _closed_form_linear(x @ x.T / 10, y, nu)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)))
    # and it is not the prior's
    assert np.max(np.abs(want - x @ x.T / 10)) > 0.1 * np.max(np.abs(want))


def _wishart(rng, m, dof=None):
    a = rng.normal(size=(m, dof or 2 * m))
    return a @ a.T / a.shape[1]


def test_propagated_test_diagonals_are_non_negative_and_consistent():
    # [G_ii, G_it; G_ti, g_t] must be positive semi-definite point by point: g_t - G_ti G_ii^-1 G_it equals the
    # kernel's Schur complement k_t - K_ti K_ii^-1 K_it >= 0, for any inducing Gram, near and far points.
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 3))
    x = np.concatenate([z[:2], rng.normal(size=(5, 3)), 30 * rng.normal(size=(3, 3))])
    with jax.enable_x64(True):
        k = kernels.relu_kernel(kernels.input_blocks(jnp.asarray(z), jnp.asarray(x)), 1.0, 0.1)
        chol_k, _ = linalg.cholesky(k.ii, 1e-4)
        factors = [linalg.factorize(k.ii, 1e-4, inverse) for inverse in (False, True)]
        # a rank-deficient-ish and a well-conditioned G_ii, each through both factorisations
        for dof, factor in itertools.product((2, 12), factors):
            chol_g, _ = linalg.cholesky(
                jnp.asarray(_wishart(np.random.default_rng(dof), 6, dof)), 1e-6
            )
            g = objectives.propagate(k, factor, chol_g)
            g_t, g_ti, g_ii = np.asarray(g.t), np.asarray(g.ti), np.asarray(g.ii)
            assert np.all(g_t >= 0)
            schur = g_t - np.einsum("bi,ij,bj->b", g_ti, np.linalg.inv(g_ii), g_ti)
            kernel_schur = np.asarray(k.t) - np.einsum(
                "bi,ij,bj->b",
                np.asarray(k.ti),
                np.linalg.inv(np.asarray(chol_k @ chol_k.T)),
                np.asarray(k.ti),
            )
            assert np.all(schur >= -1e-8 * np.max(g_t))
            np.testing.assert_allclose(schur, np.maximum(kernel_schur, 0), atol=1e-6 * np.max(g_t))
        # with G_ii = K_ii the points' blocks are the kernel's own
        for factor in factors:
            same = objectives.propagate(k, factor, chol_k)
            np.testing.assert_allclose(same.ti, k.ti, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(same.t, k.t, rtol=1e-8, atol=1e-10)


@pytest.mark.slow  # ~2 min of the loaded CPU: two float64 DKMs built, evaluated and predicted eagerly
def test_sparse_dkm_with_inducing_points_at_the_data_equals_the_full_dkm():
    x, y = _data(4, p=10)
    opts = dkm.ModelOptions(jitter=0.0, noise_var=0.05)
    with jax.enable_x64(True):
        full = dkm.make_trainer(x, y, depth=2, nu=(1.0, 3.0), model=opts)
        sparse = dkm.make_trainer(x, y, depth=2, nu=(1.0, 3.0), num_inducing=10,
                                  model=dataclasses.replace(opts, learn_inducing=False))  # fmt: skip
        # move both away from the NNGP the same way: new Grams, new kernel hyper-parameters
        rng = np.random.default_rng(0)
        p_full = full.init_state["params"]
        for layer in ("0", "1"):
            p_full["grams"][layer] = p_full["grams"][layer] + 0.1 * jnp.tril(
                jnp.asarray(rng.normal(size=(10, 10)))
            )
        p_full["kernel"][1]["weight_var"] = p_full["kernel"][1]["weight_var"] + 0.3
        p_sparse = dict(sparse.init_state["params"], grams=p_full["grams"], kernel=p_full["kernel"])
        np.testing.assert_array_equal(p_sparse["inducing"], x)
        chain = model.inducing_chain(
            sparse.spec, p_sparse, model._input(sparse.spec, p_sparse, x).ii
        )
        mean, chol_a = model._optimal_output(sparse.spec, p_sparse, chain, full.x, full.y, 4)
        p_sparse["output"] = {"mean": mean, "chol": model._encode_cholesky(chol_a)}
        value_full, _ = model.full_objective(full.spec, p_full, full.x, full.y)
        value_sparse, _ = model.sparse_objective(sparse.spec, p_sparse, full.x, full.y, 10, None)
        np.testing.assert_allclose(float(value_sparse) * 10, float(value_full), rtol=1e-9)
        # and their predictions agree
        x_test = np.random.default_rng(1).normal(size=(7, 3))
        m_full, v_full = dkm.predict(full.state({"params": p_full}), x_test)
        m_sparse, v_sparse = dkm.predict(sparse.state({"params": p_sparse}), x_test)
    np.testing.assert_allclose(m_sparse, m_full, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(v_sparse, v_full, rtol=1e-6, atol=1e-9)


def test_ill_conditioned_kernels_escalate_the_jitter_with_a_warning_not_nan():
    # duplicated points make K(G) singular; without jitter the first factorisation fails
    x = np.repeat(np.random.default_rng(0).normal(size=(4, 2)), 2, axis=0)
    y = np.sin(x[:, 0])
    opts = dkm.ModelOptions(jitter=0.0, noise_var=1e-3)
    with pytest.warns(RuntimeWarning, match="jitter was escalated"):
        state = dkm.fit(x, y, depth=1, nu=1.0, model=opts, options=dkm.FitOptions(steps=3))
    with pytest.warns(RuntimeWarning, match="jitter was escalated"):
        mean, var = dkm.predict(state, x)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(var))


def test_objective_matches_a_direct_numpy_computation():
    x, y = _data(5, p=6)
    rng = np.random.default_rng(2)
    g1 = _wishart(rng, 6, 9)
    params = {"weight_var": 1.2, "bias_var": 0.1}
    with jax.enable_x64(True):
        value = float(
            dkm.objective([g1], x, y, nu=2.5, kernel_params=params, noise_var=0.1, jitter=0.0)
        )
        k0 = np.asarray(kernels.relu_kernel(kernels.input_gram(jnp.asarray(x)), **params))
        k1 = np.asarray(kernels.relu_kernel(jnp.asarray(g1), **params))
    ky = k1 + 0.1 * np.eye(6)
    log_lik = -0.5 * (
        y @ np.linalg.solve(ky, y) + np.linalg.slogdet(ky)[1] + 6 * math.log(2 * math.pi)
    )
    ratio = np.linalg.solve(k0, g1)
    kl = 0.5 * (np.trace(ratio) - np.linalg.slogdet(ratio)[1] - 6)
    np.testing.assert_allclose(value, log_lik - 2.5 * kl, rtol=1e-10)


def test_blocks_carry_none_when_only_the_inducing_block_is_needed():
    g = kernels.relu_kernel(GramBlocks(jnp.eye(3)))
    assert g.ti is None and g.t is None
