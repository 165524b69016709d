"""The interaction basis and its edges: the invariants of reference notes Sec. 4, checked against independent
per-example Jacobians (jax.jacrev in the test) and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from theorax.inference.interaction_basis import (
    SectionError,
    integration_points,
    interaction_basis,
    interaction_edges,
    with_constant,
)
from theorax.models import interaction_basis as m

D_IN, HIDDEN, D_OUT, N = 6, 10, 4, 400


def _mlp(seed=0, sizes=(D_IN, HIDDEN, HIDDEN, D_OUT)):
    params = m.init_mlp(jax.random.key(seed), sizes)
    return jax.tree.map(lambda p: np.asarray(p, np.float64), params)


def _data(seed=1, n=N, d=D_IN):
    x = np.random.default_rng(seed).normal(size=(n, d))
    return np.concatenate([x, np.ones((n, 1))], axis=1)


def _activations(sections, x, upto):
    for s in sections[:upto]:
        x = _vmap(s, x)
    return x


def _vmap(section, x):
    with jax.enable_x64(True):
        return np.asarray(jax.vmap(section)(jnp.asarray(x)))


@pytest.fixture(scope="module")
def mlp_case():
    params = _mlp()
    sections = m.mlp_sections(params)
    x = _data()
    bases = interaction_basis(sections, x, batch_size=128)
    edges = interaction_edges(sections, x, bases, batch_size=128)
    return params, sections, x, bases, edges


def test_second_moment_is_lambda_and_pinv_is_left_inverse(mlp_case):
    _, sections, x, bases, _ = mlp_case
    for k, b in enumerate(bases[:-1]):
        f_hat = _activations(sections, x, k) @ b.C
        second = f_hat.T @ f_hat / len(f_hat)
        np.testing.assert_allclose(second, np.diag(b.eigenvalues), atol=1e-10 * b.eigenvalues.max())
        np.testing.assert_allclose(b.C_pinv @ b.C, np.eye(b.size), atol=1e-10)
        # Centring: the constant direction is coordinate 0, every other coordinate has mean 0.
        assert np.ptp(f_hat[:, 0]) < 1e-10
        np.testing.assert_allclose(f_hat[:, 1:].mean(0), 0.0, atol=1e-10)
        assert np.all(np.diff(b.eigenvalues[1:]) <= 1e-12)  # descending after the constant


def test_jacobian_gram_in_the_basis_is_the_identity_except_the_constant(mlp_case):
    _, sections, x, bases, _ = mlp_case
    for k in range(len(bases) - 1):
        b, nxt = bases[k], bases[k + 1]
        f = _activations(sections, x, k)
        c_next = np.eye(nxt.dim) if nxt.C is None else nxt.C
        with jax.enable_x64(True):
            jac = np.asarray(jax.vmap(jax.jacrev(lambda e, s=sections[k], c=c_next: s(e) @ c))(f))
        j_hat = jac @ b.C_pinv.T  # d g / d f-hat, per example
        gram = np.einsum("boi,boj->ij", j_hat, j_hat) / len(f)
        np.testing.assert_allclose(gram[1:, 1:], np.eye(b.size - 1), atol=1e-8)


def test_edges_match_a_direct_per_example_computation(mlp_case):
    _, sections, x, bases, edges = mlp_case
    for k in range(len(bases) - 1):
        b, nxt = bases[k], bases[k + 1]
        f_hat = _activations(sections, x, k) @ b.C
        c_next = np.eye(nxt.dim) if nxt.C is None else nxt.C
        with jax.enable_x64(True):
            g_hat = lambda fh, s=sections[k], b=b, c=c_next: s(fh @ b.C_pinv) @ c  # noqa: E731
            jac = np.asarray(jax.vmap(jax.jacrev(g_hat))(f_hat))
        expected = np.mean((jac * f_hat[:, None, :]) ** 2, axis=0)
        np.testing.assert_allclose(edges[k], expected, rtol=1e-9, atol=1e-14 * expected.max())
        assert np.all(edges[k] >= 0) and edges[k].max() > 0


def test_batch_size_does_not_change_the_basis(mlp_case):
    _, sections, x, bases, edges = mlp_case
    other = interaction_basis(sections, x, batch_size=37)
    other_edges = interaction_edges(sections, x, other, batch_size=1000)
    for a, b in zip(bases[:-1], other[:-1], strict=True):
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9)
    for a, b in zip(edges, other_edges, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14)


def _inserted(params, a):
    """Sections with an invertible map A (and A^-1) inserted between hidden layers 1 and 2."""
    a_inv = np.linalg.inv(a)
    layers = params["layers"]

    def s0(x):
        y = m._mlp_hidden_section(layers[0], x)
        return jnp.concatenate([y[:-1] @ a, y[-1:]])

    def s1(x):
        return m._mlp_hidden_section(layers[1], jnp.concatenate([x[:-1] @ a_inv, x[-1:]]))

    return [Partial(s0), Partial(s1), m.mlp_sections(params)[2]]


def test_an_inserted_invertible_map_leaves_lambda_edges_and_activations_unchanged(mlp_case):
    params, sections, x, bases, edges = mlp_case
    a = np.random.default_rng(3).normal(size=(HIDDEN, HIDDEN)) + 3 * np.eye(HIDDEN)
    other_sections = _inserted(params, a)
    other = interaction_basis(other_sections, x, batch_size=128)
    other_edges = interaction_edges(other_sections, x, other, batch_size=128)
    assert [b.size for b in other] == [b.size for b in bases]
    for b0, b1 in zip(bases[:-1], other[:-1], strict=True):
        np.testing.assert_allclose(b1.eigenvalues, b0.eigenvalues, rtol=1e-8)
    for e0, e1 in zip(edges, other_edges, strict=True):
        np.testing.assert_allclose(e1, e0, rtol=1e-6, atol=1e-12 * e0.max())
    f0 = _activations(sections, x, 1) @ bases[1].C
    f1 = _activations(other_sections, x, 1) @ other[1].C
    np.testing.assert_allclose(np.abs(f1), np.abs(f0), atol=1e-8 * np.abs(f0).max())


def test_a_duplicated_or_dead_neuron_changes_neither_sizes_nor_edges(mlp_case):
    params, _, x, bases, edges = mlp_case
    layers = params["layers"]
    w0, b0, w1 = layers[0]["W"], layers[0]["b"], layers[1]["W"]
    # Duplicate hidden neuron 0 (copy its incoming weights, split its outgoing weights in half) and add a
    # neuron that reads everything but is read by nothing.
    extra = np.random.default_rng(5).normal(size=(D_IN, 1))
    w0_new = np.concatenate([w0, w0[:, :1], extra], axis=1)
    b0_new = np.concatenate([b0, b0[:1], [0.3]])
    w1_new = np.concatenate([w1, w1[:1] / 2, np.zeros((1, HIDDEN))], axis=0)
    w1_new[0] /= 2
    changed = {
        "layers": [
            {"W": w0_new, "b": b0_new},
            {"W": w1_new, "b": layers[1]["b"]},
            layers[2],
        ]
    }
    sections = m.mlp_sections(changed)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            m.mlp_apply(changed, x[:, :-1]), m.mlp_apply(params, x[:, :-1]), atol=1e-10
        )
    other = interaction_basis(sections, x, batch_size=128)
    other_edges = interaction_edges(sections, x, other, batch_size=128)
    assert [b.size for b in other] == [b.size for b in bases]
    for e0, e1 in zip(edges, other_edges, strict=True):
        np.testing.assert_allclose(e1, e0, rtol=1e-6, atol=1e-12 * e0.max())


def _linear_section(w, b, x):
    return jnp.concatenate([x[:-1] @ w + x[-1] * b, x[-1:]])


def test_a_linear_network_has_diagonal_edges():
    rng = np.random.default_rng(0)
    sizes = (5, 5, 5)
    sections = [
        Partial(_linear_section, rng.normal(size=(a, b)), rng.normal(size=b))
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    sections.append(Partial(lambda w, x: x[:-1] @ w, rng.normal(size=(5, 3))))
    x = np.concatenate([rng.normal(size=(300, 5)) * [3, 2, 1, 0.5, 0.2], np.ones((300, 1))], axis=1)
    bases = interaction_basis(sections, x)
    edges = interaction_edges(sections, x, bases)
    for e in edges[:-1]:
        inner = e[1:, 1:]  # the constant node's row and column apart
        off = inner - np.diag(np.diag(inner))
        assert np.abs(off).max() < 1e-7 * e.max()


@pytest.mark.slow
def test_integration_rules_agree_on_a_linear_network():
    rng = np.random.default_rng(1)
    sections = [Partial(_linear_section, rng.normal(size=(4, 4)), rng.normal(size=4))]
    sections.append(Partial(lambda w, x: x[:-1] @ w, rng.normal(size=(4, 2))))
    x = np.concatenate([rng.normal(size=(100, 4)), np.ones((100, 1))], axis=1)
    ref_b = interaction_basis(sections, x)
    ref = interaction_edges(sections, x, ref_b)
    for rule, n in (
        ("trapezoidal", 0),
        ("trapezoidal", 1),
        ("trapezoidal", 5),
        ("gauss-legendre", 3),
    ):
        b = interaction_basis(sections, x, integration=rule, n_intervals=n)
        np.testing.assert_allclose(b[0].eigenvalues, ref_b[0].eigenvalues, rtol=1e-9)
        e = interaction_edges(sections, x, b, integration=rule, n_intervals=n)
        for e0, e1 in zip(ref, e, strict=True):
            np.testing.assert_allclose(e1, e0, rtol=1e-8, atol=1e-14)
    assert np.isclose(integration_points("gauss-legendre", 4)[1].sum(), 1.0)


def test_pca_and_neuron_bases(mlp_case):
    _, sections, x, lib, _ = mlp_case
    pca = interaction_basis(sections, x, basis="pca")
    neuron = interaction_basis(sections, x, basis="neuron")
    for b_lib, b_pca, b_n in zip(lib[:-1], pca[:-1], neuron[:-1], strict=True):
        assert b_lib.size <= b_pca.size <= b_n.size
        f_hat = _activations(sections, x, lib.index(b_lib)) @ b_pca.C
        second = f_hat.T @ f_hat / len(f_hat)
        np.testing.assert_allclose(second, np.diag(b_pca.eigenvalues), atol=1e-10 * second.max())
        np.testing.assert_array_equal(b_n.C, np.eye(b_n.dim))
    assert lib[-1].C is None and lib[-1].eigenvalues is None


@pytest.mark.slow
def test_positions_on_a_small_transformer_match_the_direct_formula():
    config = m.TransformerConfig(d_vocab=8, d_model=6, n_heads=2, d_head=3, d_mlp=12)
    params = jax.tree.map(
        lambda p: np.asarray(p, np.float64) + 0.3 * np.random.default_rng(0).normal(size=p.shape),
        m.init_transformer(jax.random.key(0), config),
    )
    task = m.modular_addition(7, 0.5)
    x = np.asarray(m.transformer_inputs(params, jnp.asarray(task.tokens)), np.float64)
    sections = m.transformer_sections(params)
    bases = interaction_basis(sections, x, batch_size=16)
    edges = interaction_edges(sections, x, bases, batch_size=16)
    b, nxt = bases[0], bases[1]
    f_hat = x @ b.C  # (N, 3 positions, k)
    with jax.enable_x64(True):
        g_hat = lambda fh: sections[0](fh @ b.C_pinv) @ nxt.C  # noqa: E731
        jac = np.asarray(jax.vmap(jax.jacrev(g_hat))(f_hat))  # (N, 1, k_out, 3, k_in)
    a = np.einsum("btisj,bsj->btij", jac, f_hat)  # summed over input positions inside the square
    expected = np.sum(a**2, axis=(0, 1)) / (len(x) * 3)
    np.testing.assert_allclose(edges[0], expected, rtol=1e-9, atol=1e-14 * expected.max())
    # The second moment over examples and positions is diag(Lambda).
    flat = f_hat.reshape(-1, b.size)
    np.testing.assert_allclose(
        flat.T @ flat / len(flat), np.diag(b.eigenvalues), atol=1e-9 * b.eigenvalues.max()
    )


def test_explicit_constant_direction_equals_folded_biases(mlp_case):
    params, sections, x, bases, edges = mlp_case
    layers = params["layers"]
    plain = [
        lambda h: jax.nn.relu(h @ layers[0]["W"] + layers[0]["b"]),
        lambda h: jax.nn.relu(h @ layers[1]["W"] + layers[1]["b"]),
        lambda h: h @ layers[2]["W"] + layers[2]["b"],
    ]
    wrapped = with_constant(plain)
    other = interaction_basis(wrapped, x)
    other_edges = interaction_edges(wrapped, x, other)
    # Equal but for the constant direction (folded biases add each bias's share to it).
    for b0, b1 in zip(bases[:-1], other[:-1], strict=True):
        np.testing.assert_allclose(b1.eigenvalues[1:], b0.eigenvalues[1:], rtol=1e-9)
    for e0, e1 in zip(edges[:-1], other_edges[:-1], strict=True):
        np.testing.assert_allclose(e1[1:, 1:], e0[1:, 1:], rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(other_edges[-1][:, 1:], edges[-1][:, 1:], rtol=1e-8, atol=1e-14)


def test_folded_sections_give_the_models_outputs():
    params = _mlp()
    x = _data(n=20)
    out = x
    for s in m.mlp_sections(params):
        out = _vmap(s, out)
    with jax.enable_x64(True):
        np.testing.assert_allclose(out, m.mlp_apply(params, x[:, :-1]), atol=1e-10)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_names_the_problem():
    sections = m.mlp_sections(_mlp())
    x = _data(n=10)
    with pytest.raises(SectionError, match=r"section 1 \(layer 1 -> layer 2\)"):
        broken = [sections[0], Partial(lambda e: e[:3] @ np.ones((4, 2))), sections[2]]
        interaction_basis(broken, x)
    with pytest.raises(ValueError, match=r"threshold=1.5 must be in \(0, 1\)"):
        interaction_basis(sections, x, threshold=1.5)
    with pytest.raises(ValueError, match="threshold=0.0"):
        interaction_basis(sections, x, threshold=0.0)
    with pytest.raises(SectionError, match="empty dataset"):
        interaction_basis(sections, x[:0])
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(SectionError, match="node layer 0"):
        interaction_basis(sections, bad)
    nan_params = _mlp()
    nan_params["layers"][1]["W"][0, 0] = np.inf
    with pytest.raises(
        SectionError, match=r"node layer 2 \('layer 2'\): its activations are not finite"
    ):
        interaction_basis(m.mlp_sections(nan_params), x)
    with pytest.raises(SectionError, match="last coordinate is not a non-zero constant"):
        interaction_basis(sections, np.concatenate([x[:, :-1], x[:, :1]], axis=1))
    with pytest.raises(ValueError, match="basis='ica'"):
        interaction_basis(sections, x, basis="ica")


def test_linear_then_route_equals_the_generic_jacobians(mlp_case):
    params, sections, x, bases, _ = mlp_case
    assert all(m.split_linear(s) is not None for s in sections)
    generic = [Partial(lambda s, e: s(e), s) for s in sections]  # hides the linear start
    assert all(m.split_linear(s) is None for s in generic)
    other = interaction_basis(generic, x, batch_size=128)
    for b0, b1 in zip(bases[:-1], other[:-1], strict=True):
        np.testing.assert_allclose(b1.eigenvalues, b0.eigenvalues, rtol=1e-9)
        np.testing.assert_allclose(
            np.abs(b1.C), np.abs(b0.C), rtol=1e-6, atol=1e-9 * np.abs(b0.C).max()
        )
