"""Interaction edges between the basis directions of consecutive node layers (rib's `squared` edges).

With f-hat = f C^l the basis coordinates of node layer l and g-hat(f-hat) = section_l(f-hat C^l+) C^{l+1} the
section in basis coordinates (C^{l+1} = identity at the output), reference notes Sec. 2.6:

    A[b, t, i, j] = sum_alpha w_alpha sum_s (d g-hat_{t,i} / d f-hat_{s,j} at alpha f-hat_b) f-hat_{b,s,j}
    E_ij = 1 / (N P_in) sum_b sum_t A[b, t, i, j]^2

gradient x activation (attribution patching) summed over input positions s inside the square; E >= 0, shape
(size_{l+1}, size_l), the constant direction's column included. `gradient` is alpha = 1 (the paper configs);
`trapezoidal` and `gauss-legendre` are integrated-gradient variants.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.interaction_basis import basis as basis_lib
from theorax.inference.interaction_basis import sections as sec


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=9)
def _edge_step(net_static, layer, sections, c_in, c_in_pinv, c_out, alphas, x, w, acc):
    shapes, _ = net_static
    section = sec.section_2d(sections, shapes, layer)

    def g_hat(f_hat):
        out = section(f_hat @ c_in_pinv)
        return (out if c_out is None else out @ c_out).reshape(-1)

    n_out = acc.shape[0] * sec.as_2d(shapes[layer + 1])[0]
    n_in = c_in.shape[1] * sec.as_2d(shapes[layer])[0]
    jac = jax.jacrev(g_hat) if n_out <= n_in else jax.jacfwd(g_hat)

    def one(f):
        f_hat = f @ c_in  # (P_in, k_in)
        js = jax.vmap(lambda a: jac(a * f_hat))(alphas[0])  # (n_alpha, T * k_out, P_in, k_in)
        j = jnp.einsum("a,aosk->osk", alphas[1], js)
        a = jnp.einsum("osk,sk->ok", j, f_hat)  # gradient x activation, summed over input positions
        return jnp.sum(
            a.reshape(-1, acc.shape[0], acc.shape[1]) ** 2, axis=0
        )  # sum over output positions

    f = basis_lib._acts((shapes, layer), sections, x)[layer]
    return acc + jnp.einsum("b,bij->ij", w, jax.vmap(one)(f))


def _matrices(layer: basis_lib.LayerBasis, dim: int, dtype):
    if layer.C is None:
        eye = np.eye(dim)
        return jnp.asarray(eye, dtype), jnp.asarray(eye, dtype)
    return jnp.asarray(layer.C, dtype), jnp.asarray(layer.C_pinv, dtype)


def interaction_edges(
    sections: Sequence[Callable],
    inputs,
    bases: Sequence[basis_lib.LayerBasis],
    *,
    integration: str = "gradient",
    n_intervals: int = 0,
    batch_size: int = 256,
    dtype: str = "float64",
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    r"""The interaction graph's edge strengths between consecutive node layers' basis directions.

    :math:`E^l_{ij} = \frac{1}{N P} \sum_{b,t} \big(\sum_s \partial \hat g_{t,i} / \partial \hat f_{s,j} \,
    \hat f_{s,j}\big)^2` (reference notes Sec. 2.6), accumulated over batches of `batch_size` by a compiled,
    donated step.

    Args:
      sections: the network's sections, as for `interaction_basis`.
      inputs: node layer 0 on the dataset, (N, d_0) or (N, P_0, d_0).
      bases: the L + 1 bases `interaction_basis` returned for these sections (any of lib / pca / neuron).
      integration: "gradient" (alpha = 1), "trapezoidal" or "gauss-legendre".
      n_intervals: quadrature intervals (0 for "gradient").
      batch_size: examples per accumulation step.
      dtype: "float64" or "float32".
      names: node-layer names (for error messages).

    Returns:
      L matrices, `E[l]` of shape (bases[l + 1].size, bases[l].size), float64.

    Example:

    >>> import jax
    >>> from theorax.models import interaction_basis as m
    >>> from theorax.inference.interaction_basis import interaction_basis
    >>> params = m.init_mlp(jax.random.key(0), (5, 8, 3))
    >>> x = m.fold_input(jax.random.normal(jax.random.key(1), (200, 5)))
    >>> bases = interaction_basis(m.mlp_sections(params), x)
    >>> [e.shape for e in interaction_edges(m.mlp_sections(params), x, bases)]
    [(4, 6), (3, 4)]
    """
    alphas, weights = basis_lib.integration_points(integration, n_intervals)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    net = basis_lib.prepare(sections, inputs, names, dtype)
    if len(bases) != net.num_layers:
        raise ValueError(
            f"got {len(bases)} bases for {net.num_layers} node layers; pass what interaction_basis returned "
            "for these sections"
        )
    for k, b in enumerate(bases):
        if b.dim != net.dim(k):
            raise ValueError(
                f"basis {k} ({b.name}) is for a layer of width {b.dim}, but node layer {k} ({net.names[k]!r}) has "
                f"width {net.dim(k)}"
            )
    with jax.enable_x64(net.dtype == np.float64):
        quad = (jnp.asarray(alphas, net.dtype), jnp.asarray(weights, net.dtype))
        static = (tuple(net.shapes), None)
        edges = []
        for k in range(net.num_layers - 1):
            c_in, c_in_pinv = _matrices(bases[k], net.dim(k), net.dtype)
            nxt = bases[k + 1]
            c_out = None if nxt.C is None else jnp.asarray(nxt.C, net.dtype)
            acc = jnp.zeros((nxt.size, bases[k].size), net.dtype)
            for xb, wb in sec.batches(net.inputs, int(batch_size), net.dtype):
                acc = _edge_step(static, k, net.sections, c_in, c_in_pinv, c_out, quad, xb, wb, acc)
            edges.append(np.asarray(acc, np.float64) / (net.inputs.shape[0] * net.positions(k)))
    return edges
