"""The degeneracy paper's three sources of degeneracy, measured on a trained network (reference notes Sec. 2).

1. Linearly dependent activations: node layer l's centred activation Gram has rank r_l < d_l, so the weights
   reading layer l act freely on its null space: d_{l+1} (d_l - r_l) free parameter directions (the constant
   direction counted in d_l and r_l).
2. Linearly dependent Jacobians: the Gram of the Jacobians of the network's output with respect to layer l,
   E[J^T J], has rank q_l < d_l; weight changes that move layer l only along the null space of every backward
   Jacobian leave the output unchanged to first order: d_{l-1} (d_l - q_l) free directions in the weights
   writing layer l.
3. Synchronised nonlinearities: ReLUs that fire on exactly the same inputs act as one linear block on the data,
   so an invertible mixing of a group of k of them (and the inverse on their outgoing weights) near the identity
   keeps the function: k (k - 1) free directions beyond each neuron's own rescaling; a neuron that never fires
   frees all its d_in + 1 + d_out weights.

Ranks use the relative threshold of `interaction_basis` (eigenvalues above threshold x the largest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.tree_util import Partial
from theorax.inference.interaction_basis import basis as basis_lib


def numerical_rank(matrix: np.ndarray, threshold: float = 1e-12) -> int:
    """The number of |eigenvalues| of a symmetric matrix above `threshold` x the largest.

    >>> numerical_rank(np.diag([1.0, 1e-3, 1e-16]))
    2
    """
    vals, _ = basis_lib.eigh_descending(np.asarray(matrix, np.float64))
    return int(np.sum(vals > threshold * float(np.max(vals, initial=0.0)))) if vals.size else 0


def _composed(sections, x):
    for s in sections:
        x = s(x)
    return x


@dataclasses.dataclass(frozen=True)
class LayerDegeneracy:
    """Sources 1 and 2 at one node layer: width, ranks and the free parameter directions each implies."""

    name: str
    dim: int
    activation_rank: int
    jacobian_rank: int
    free_from_activations: int
    free_from_jacobians: int


def linear_degeneracy(
    sections: Sequence[Callable],
    inputs,
    *,
    threshold: float = 1e-12,
    batch_size: int = 256,
    dtype: str = "float64",
    names: Sequence[str] | None = None,
) -> list[LayerDegeneracy]:
    """Sources 1 and 2 at every node layer but the output.

    Example: a duplicated hidden neuron lowers the activation rank by one.

    >>> import jax.numpy as jnp
    >>> from theorax.models import interaction_basis as m
    >>> params = m.init_mlp(jax.random.key(0), (3, 4, 2))
    >>> layer0 = params["layers"][0]
    >>> params["layers"][0] = {"W": layer0["W"].at[:, 1].set(layer0["W"][:, 0]), "b": layer0["b"].at[1].set(layer0["b"][0])}
    >>> x = m.fold_input(jax.random.normal(jax.random.key(1), (100, 3)))
    >>> [(d.dim, d.activation_rank) for d in linear_degeneracy(m.mlp_sections(params), x)]
    [(4, 4), (5, 4)]
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold={threshold} must be in (0, 1)")
    net = basis_lib.prepare(sections, inputs, names, dtype)
    options = basis_lib.Options(
        basis="lib", threshold=threshold, batch_size=batch_size, dtype=dtype
    )
    out = []
    with jax.enable_x64(net.dtype == np.float64):
        _, grams = basis_lib.layer_moments(net, batch_size, center=False)
        last = net.num_layers - 1
        for k in range(last):
            rest = Partial(_composed, net.sections[k:])
            sub = basis_lib.Network([rest], [net.shapes[k], net.shapes[last]],
                                    [net.names[k], net.names[last]], _layer_inputs(net, k, batch_size),
                                    net.dtype)  # fmt: skip
            m = basis_lib.jacobian_gram(sub, 0, None, None, options)
            d = net.dim(k)
            r, q = numerical_rank(grams[k], threshold), numerical_rank(m, threshold)
            d_next = net.dim(k + 1)
            d_prev = net.dim(k - 1) if k > 0 else 0
            out.append(LayerDegeneracy(net.names[k], d, r, q, d_next * (d - r), d_prev * (d - q)))
    return out


def _layer_inputs(net: basis_lib.Network, layer: int, batch_size: int) -> np.ndarray:
    """Node layer `layer`'s activations on the data (host), in batches."""
    if layer == 0:
        return net.inputs
    shapes = tuple(net.shapes)
    fn = jax.jit(
        jax.vmap(lambda e: basis_lib.sec.forward_2d(net.sections, shapes, e, layer)[layer])
    )
    parts = [np.asarray(fn(xb))[wb > 0] for xb, wb in basis_lib.sec.batches(net.inputs, batch_size,
                                                                           net.dtype)]  # fmt: skip
    acts = np.concatenate(parts)
    return acts.reshape(len(acts), *net.shapes[layer])


@dataclasses.dataclass(frozen=True)
class ReluSync:
    """Source 3 at one ReLU layer: groups of neurons with identical firing patterns on the data.

    Attributes:
      groups: the groups of size >= 2 (neuron indices), largest first; always-on neurons form one group.
      dead: neurons that never fire.
      always_on: neurons that fire on every input.
      free_directions: sum over groups of k (k - 1), plus (d_in + 1 + d_out) per dead neuron.
    """

    groups: list[list[int]]
    dead: list[int]
    always_on: list[int]
    free_directions: int


def synchronised_relus(activations, d_in: int, d_out: int) -> ReluSync:
    """Groups of ReLUs that fire (activation > 0) on exactly the same inputs.

    Args:
      activations: (N, d) post-ReLU activations of one layer on the data (no constant coordinate).
      d_in: width of the layer's input (for the dead neurons' free weights).
      d_out: width of what reads the layer.

    >>> a = np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
    >>> s = synchronised_relus(a, d_in=5, d_out=3)
    >>> s.groups, s.dead, s.free_directions
    ([[0, 1]], [3], 11)
    """
    fires = np.asarray(activations) > 0
    if fires.ndim != 2:
        raise ValueError(f"activations must be (N, d), got shape {fires.shape}")
    dead = [int(i) for i in np.nonzero(~fires.any(0))[0]]
    always = [int(i) for i in np.nonzero(fires.all(0))[0]]
    alive = [i for i in range(fires.shape[1]) if i not in set(dead)]
    patterns: dict[bytes, list[int]] = {}
    for i in alive:
        patterns.setdefault(np.packbits(fires[:, i]).tobytes(), []).append(i)
    groups = sorted((g for g in patterns.values() if len(g) > 1), key=len, reverse=True)
    free = sum(len(g) * (len(g) - 1) for g in groups) + len(dead) * (d_in + 1 + d_out)
    return ReluSync(groups, dead, always, int(free))
