"""A network as a list of sections: shape checks, batched forward passes and the explicit constant direction.

A *section* maps ONE example's activations at node layer l, an array of shape `(d_l,)` or `(P_l, d_l)`
(positions, features), to node layer l + 1's. Node layer 0 is the input of the first section, node layer L
the output of the last. With biases folded (reference notes Sec. 2.0), every node layer but the output ends in
a constant coordinate, 1 on the data. Sections should be `jax.tree_util.Partial`s over their parameters (the
models in `theorax.models.interaction_basis` give them so): the compiled passes take them as arguments and are
reused for new parameter values; any other callable is wrapped and compiled once per callable object.

Internally every activation is handled as `(P, d)`; a layer without positions has P = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial
from theorax.models.interaction_basis import linear_then, split_linear
from theorax.models.validation import check_finite

__all__ = ["SectionError", "linear_then", "split_linear", "with_constant"]


class SectionError(ValueError):
    """Sections or their data are malformed: the message names the layer, what was expected and the fix."""


def as_partials(sections: Sequence[Callable]) -> list[Partial]:
    """Every section as a `Partial` (a pytree whose arrays are traced, whose function is static)."""
    if isinstance(sections, Callable) or not isinstance(sections, Sequence) or len(sections) == 0:
        raise SectionError(
            f"sections must be a non-empty list of functions (one per transition between node layers), "
            f"got {type(sections).__name__}"
        )
    out = []
    for k, s in enumerate(sections):
        if not callable(s):
            raise SectionError(f"section {k} is not callable: {type(s).__name__}")
        out.append(s if isinstance(s, Partial) else Partial(s))
    return out


def layer_names(num_sections: int, names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"layer {k}" for k in range(num_sections)] + ["output"]
    names = [str(n) for n in names]
    if len(names) != num_sections + 1:
        raise SectionError(
            f"names lists {len(names)} node layers but {num_sections} sections join {num_sections + 1}; "
            "give one name per node layer, input first and output last"
        )
    return names


def check_inputs(inputs, what: str = "inputs") -> np.ndarray:
    """Node layer 0's activations as a host array `(N, d)` or `(N, P, d)`; empty or non-finite data fails."""
    x = np.asarray(inputs)
    if x.ndim not in (2, 3):
        raise SectionError(
            f"{what} must be node layer 0's activations of shape (N, d) or (N, positions, d), "
            f"got shape {x.shape}"
        )
    if x.shape[0] == 0 or x.size == 0:
        raise SectionError(
            f"{what} is an empty dataset (shape {x.shape}); pass at least one example"
        )
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    check_finite(x, f"{what} (node layer 0's activations)", SectionError)
    return x


def layer_shapes(sections: Sequence[Partial], example_shape, dtype, names) -> list[tuple[int, ...]]:
    """Every node layer's per-example shape, found by abstract evaluation (nothing is compiled).

    Raises `SectionError` naming the section whose input shape does not chain.
    """
    shapes = [tuple(example_shape)]
    for k, section in enumerate(sections):
        spec = jax.ShapeDtypeStruct(shapes[-1], dtype)
        try:
            out = jax.eval_shape(section, spec)
        except Exception as e:  # noqa: BLE001 - any failure here is a shape that does not chain
            raise SectionError(
                f"section {k} ({names[k]} -> {names[k + 1]}) fails on one example of node layer {names[k]}, "
                f"shape {shapes[-1]}: {type(e).__name__}: {str(e).splitlines()[0][:300]}. Sections must "
                "chain: each maps one example of its node layer (shape (d,) or (positions, d)) to the next's"
            ) from None
        if not isinstance(out, jax.ShapeDtypeStruct) or len(out.shape) not in (1, 2):
            raise SectionError(
                f"section {k} ({names[k]} -> {names[k + 1]}) must return one array of shape (d,) or "
                f"(positions, d) per example, got {out}"
            )
        shapes.append(tuple(out.shape))
    return shapes


def as_2d(shape) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else tuple(shape)


def forward_2d(sections: Sequence[Partial], shapes, x: jax.Array, upto: int) -> list[jax.Array]:
    """One example's activations at node layers 0..upto, each reshaped to (P, d)."""
    acts = [x.reshape(as_2d(shapes[0]))]
    for k in range(upto):
        x = sections[k](x)
        acts.append(x.reshape(as_2d(shapes[k + 1])))
    return acts


def section_2d(sections, shapes, k: int) -> Callable[[jax.Array], jax.Array]:
    """Section k as a function (P_k, d_k) -> (P_{k+1}, d_{k+1})."""
    return lambda f: sections[k](f.reshape(shapes[k])).reshape(as_2d(shapes[k + 1]))


def batches(x: np.ndarray, batch_size: int, dtype) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(batch, weights) with a fixed batch shape: the last batch is padded with copies of its first row
    and weight 0, so one compiled step serves every batch."""
    n = x.shape[0]
    b = min(batch_size, n)
    for start in range(0, n, b):
        chunk = x[start : start + b].astype(dtype, copy=False)
        w = np.ones(b, dtype)
        if len(chunk) < b:
            w[len(chunk) :] = 0.0
            pad = np.repeat(chunk[:1], b - len(chunk), axis=0)
            chunk = np.concatenate([chunk, pad])
        yield chunk, w


def with_constant(sections: Sequence[Callable]) -> list[Partial]:
    """Sections without folded biases, given the explicit constant direction instead.

    Each wrapped section takes its node layer's activations with a constant coordinate appended, applies the
    original section to the rest, and appends the constant again (the last section's output, the network's
    output, gets none). Node layer 0's data needs the constant too (`theorax.models.interaction_basis.fold_input`).
    With gradients (alpha = 1, the paper configs) this gives the same bases and edges as folded biases except
    for the constant direction itself (its Lambda_0 and its edges, which with folded biases also carry each
    bias's contribution); under integrated gradients the biases are not scaled with alpha.

    >>> f = with_constant([lambda x: 2.0 * x, lambda x: x.sum(-1, keepdims=True)])
    >>> f[0](jnp.array([1.0, 3.0, 1.0])).tolist(), f[1](jnp.array([2.0, 6.0, 1.0])).tolist()
    ([2.0, 6.0, 1.0], [8.0])
    """
    sections = as_partials(sections)
    last = len(sections) - 1
    return [
        Partial(_drop_constant if k == last else _keep_constant, s) for k, s in enumerate(sections)
    ]


def _drop_constant(section, x):
    return section(x[..., :-1])


def _keep_constant(section, x):
    out = section(x[..., :-1])
    c = x.reshape(-1, x.shape[-1])[0, -1]  # the constant, the same at every position
    return jnp.concatenate(
        [out, jnp.broadcast_to(c, (*out.shape[:-1], 1)).astype(out.dtype)], axis=-1
    )
