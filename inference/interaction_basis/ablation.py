"""Node and edge ablations in a basis (reference notes Sec. 2.7), with rib's schedules.

* Node ablation at node layer l: keep the first n basis directions (the constant first, then by descending
  eigenvalue), zero the rest, `f -> f C_n C+` (identity when n is every direction). Because the coordinates are
  centred this is mean ablation.
* Edge ablation on transition l -> l+1: keep the n largest edges E_ij (the constant node's edges are kept for
  free and not counted); each output direction i of layer l+1 is recomputed from the input directions j whose
  edge (i, j) is kept, the others zeroed in basis coordinates, and the network runs on from layer l+1.
* Schedules: `exponential` and `linear` lists of how many to keep, and `bisect`, the fewest kept that keeps
  the score within `score_target_difference` of the unablated network's (rib's edge bisect: 0.001 accuracy).

The score is the accuracy of the argmax of the network's output, averaged over the data in batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.interaction_basis import basis as basis_lib
from theorax.inference.interaction_basis import sections as sec

SCHEDULES = ("exponential", "linear", "bisect")


def schedule(kind: str, n_max: int, num_points: int, n_min: int = 0) -> list[int]:
    """How many directions or edges to keep at each point of an `exponential` or `linear` schedule, descending.

    >>> schedule("exponential", 100, 5)
    [100, 32, 10, 3, 1, 0]
    >>> schedule("linear", 100, 5)
    [100, 75, 50, 25, 0]
    """
    if kind not in ("exponential", "linear"):
        raise ValueError(
            f"schedule={kind!r} must be 'exponential' or 'linear' here (bisect is a search)"
        )
    if n_max < n_min:
        raise ValueError(f"n_max={n_max} < n_min={n_min}")
    if kind == "linear":
        points = np.linspace(n_max, n_min, max(num_points, 2))
    else:
        points = np.geomspace(max(n_max, 1), max(n_min, 1), max(num_points, 2))
        points = np.append(points, n_min)
    return sorted({int(round(p)) for p in points}, reverse=True)


def bisect(
    score_at: Callable[[int], float],
    n_max: int,
    target: float,
    n_min: int = 0,
    start: int | None = None,
) -> tuple[int, dict]:
    """The fewest n in [n_min, n_max] with `score_at(n) >= target`, assuming the score rises with n.

    With `start`, the bracket is found from below first (start, 2 start, 4 start, ...), so that only small n
    are evaluated when the answer is small (cheaper edge ablations); then plain bisection.

    Returns (n, {n: score} of every point evaluated).

    >>> bisect(lambda n: n / 10, 10, 0.55)[0], bisect(lambda n: n / 1000, 1000, 0.055, start=4)[0]
    (6, 55)
    """
    seen: dict[int, float] = {}

    def score(n):
        if n not in seen:
            seen[n] = float(score_at(n))
        return seen[n]

    lo, hi = n_min, n_max
    if start is not None:
        n = max(int(start), n_min)
        while n < n_max and score(n) < target:
            lo, n = n + 1, 2 * n
        hi = min(n, n_max)
    if hi == n_max and score(hi) < target:
        return hi, seen
    while lo < hi:
        mid = (lo + hi) // 2
        if score(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return hi, seen


def _correct(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.argmax(outputs.reshape(outputs.shape[0], -1), axis=-1) == labels


# ----------------------------------------------------------------------------------- node ablation


@functools.partial(jax.jit, static_argnums=(0, 1))
def _node_step(shapes, layer, sections, rotation, x, y, w):
    def one(e):
        acts = sec.forward_2d(sections, shapes, e, layer)
        f = acts[layer] @ rotation
        for k in range(layer, len(sections)):
            f = sec.section_2d(sections, shapes, k)(f)
        return f

    return jnp.sum(w * _correct(jax.vmap(one)(x), y))


def _score(step, net: basis_lib.Network, labels, batch_size, *args) -> float:
    total = 0.0
    y_all = np.asarray(labels)
    n = net.inputs.shape[0]
    b = min(batch_size, n)
    for start, (xb, wb) in zip(range(0, n, b), sec.batches(net.inputs, b, net.dtype), strict=True):
        yb = y_all[start : start + b]
        yb = np.concatenate([yb, np.repeat(yb[:1], b - len(yb))])
        total += float(step(*args, xb, yb, wb))
    return total / n


def _check_labels(net, labels):
    labels = np.asarray(labels)
    if labels.shape != (net.inputs.shape[0],):
        raise ValueError(
            f"labels must have one entry per example, shape ({net.inputs.shape[0]},), got {labels.shape}"
        )
    return labels


def node_ablation(
    sections: Sequence[Callable],
    inputs,
    labels,
    bases: Sequence[basis_lib.LayerBasis],
    layer: int,
    n_kept: Sequence[int],
    *,
    batch_size: int = 1024,
    dtype: str = "float64",
) -> dict[int, float]:
    """Accuracy with only the first n directions of node layer `layer` kept, for each n in `n_kept`.

    Example:

    >>> import jax
    >>> from theorax.models import interaction_basis as m
    >>> from theorax.inference.interaction_basis import interaction_basis
    >>> params = m.init_mlp(jax.random.key(0), (5, 8, 3))
    >>> x = m.fold_input(jax.random.normal(jax.random.key(1), (100, 5)))
    >>> y = jax.numpy.argmax(m.mlp_apply(params, x[:, :-1]), -1)
    >>> bases = interaction_basis(m.mlp_sections(params), x)
    >>> node_ablation(m.mlp_sections(params), x, y, bases, 1, [4, 0])
    {4: 1.0, 0: ...}
    """
    net = basis_lib.prepare(sections, inputs, None, dtype)
    labels = _check_labels(net, labels)
    b = bases[layer]
    if b.C is None:
        raise ValueError(f"node layer {layer} ({b.name}) has no basis to ablate in (C is None)")
    out = {}
    with jax.enable_x64(net.dtype == np.float64):
        for n in n_kept:
            if not 0 <= n <= b.size:
                raise ValueError(f"n_kept={n} must be in [0, {b.size}] for node layer {b.name}")
            if n == b.size:
                rotation = np.eye(b.dim)
            else:
                rotation = b.C[:, :n] @ b.C_pinv[:n]
            out[int(n)] = _score(_node_step, net, labels, batch_size, tuple(net.shapes), layer,
                                 net.sections, jnp.asarray(rotation, net.dtype))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------- edge ablation


@functools.partial(jax.jit, static_argnums=(0, 1))
def _edge_step(shapes, layer, sections, c_in, c_in_pinv, c_out, c_out_pinv, masks, pick, x, y, w):
    """Accuracy with output direction i recomputed from the input directions `masks[pick[i]]` keeps: each
    distinct mask row runs the section once (`masks` holds the distinct rows, padded)."""
    section = sec.section_2d(sections, shapes, layer)
    k_out = pick.shape[0]

    def one(e):
        f = sec.forward_2d(sections, shapes, e, layer)[layer]
        f_hat = f @ c_in  # (P_in, k_in)

        def run(m):
            g = section((f_hat * m) @ c_in_pinv)
            return g if c_out is None else g @ c_out  # (P_out, k_out)

        g_u = jax.vmap(run)(masks)  # (U, P_out, k_out)
        g_hat = g_u[
            pick, :, jnp.arange(k_out)
        ].T  # output i from its own mask's run: (P_out, k_out)
        f_next = g_hat if c_out_pinv is None else g_hat @ c_out_pinv
        for k in range(layer + 1, len(sections)):
            f_next = sec.section_2d(sections, shapes, k)(f_next)
        return f_next

    return jnp.sum(w * _correct(jax.vmap(one)(x), y))


def _distinct_rows(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of a mask, padded to a power of two (few compilations), and each row's index."""
    rows, inverse = np.unique(mask, axis=0, return_inverse=True)
    size = min(1 << int(np.ceil(np.log2(max(len(rows), 1)))), mask.shape[0])
    size = max(size, len(rows))
    padded = np.concatenate([rows, np.repeat(rows[:1], size - len(rows), axis=0)])
    return padded, inverse.reshape(-1).astype(np.int32)


def edge_order(edges: np.ndarray, constant_in: int | None) -> np.ndarray:
    """Flat indices of the edges from largest to smallest, the constant input node's column excluded."""
    e = np.array(edges, np.float64)
    if constant_in is not None:
        e[:, constant_in] = -np.inf
    order = np.argsort(-e, axis=None, kind="stable")
    return order[: e.size - (e.shape[0] if constant_in is not None else 0)]


def edge_ablation(
    sections: Sequence[Callable],
    inputs,
    labels,
    bases: Sequence[basis_lib.LayerBasis],
    edges: np.ndarray,
    layer: int,
    n_kept: Sequence[int] | None = None,
    *,
    schedule_kind: str = "bisect",
    score_target_difference: float = 0.001,
    batch_size: int = 512,
    dtype: str = "float64",
) -> dict:
    """Accuracy with only the n largest edges of transition `layer` -> `layer + 1` kept.

    With `schedule_kind="bisect"`, finds the fewest edges that keep the accuracy within
    `score_target_difference` of the unablated network's; otherwise scores every n in `n_kept`.

    Returns {"scores": {n: accuracy}, "baseline": accuracy of the unablated network, "n_edges": the countable
    edges, and for bisect "n_needed" and "epsilon" (the smallest edge kept, rib's modularity epsilon)}.
    """
    net = basis_lib.prepare(sections, inputs, None, dtype)
    labels = _check_labels(net, labels)
    b_in, b_out = bases[layer], bases[layer + 1]
    if b_in.C is None:
        raise ValueError(f"node layer {layer} ({b_in.name}) has no basis (C is None)")
    edges = np.asarray(edges, np.float64)
    if edges.shape != (b_out.size, b_in.size):
        raise ValueError(
            f"edges of transition {layer} must have shape {(b_out.size, b_in.size)}, got {edges.shape}"
        )
    order = edge_order(edges, b_in.constant_index)
    with jax.enable_x64(net.dtype == np.float64):
        dt = net.dtype
        c_in, c_in_pinv = jnp.asarray(b_in.C, dt), jnp.asarray(b_in.C_pinv, dt)
        c_out = None if b_out.C is None else jnp.asarray(b_out.C, dt)
        c_out_pinv = None if b_out.C_pinv is None else jnp.asarray(b_out.C_pinv, dt)

        def score_at(n: int) -> float:
            mask = np.zeros(edges.size)
            mask[order[:n]] = 1.0
            mask = mask.reshape(edges.shape)
            if b_in.constant_index is not None:
                mask[:, b_in.constant_index] = 1.0
            rows, pick = _distinct_rows(mask)
            return _score(_edge_step, net, labels, batch_size, tuple(net.shapes), layer, net.sections,
                          c_in, c_in_pinv, c_out, c_out_pinv, jnp.asarray(rows, dt),
                          jnp.asarray(pick))  # fmt: skip

        baseline = _score(
            _node_step, net, labels, batch_size, tuple(net.shapes), layer, net.sections,
            jnp.eye(b_in.dim, dtype=dt),
        )  # fmt: skip
        result = {"baseline": baseline, "n_edges": int(len(order))}
        if schedule_kind == "bisect":
            n, seen = bisect(score_at, len(order), baseline - score_target_difference, start=16)
            result.update(n_needed=int(n), scores=dict(sorted(seen.items())))
            kept = edges.reshape(-1)[order[:n]]
            result["epsilon"] = float(kept.min()) if n > 0 else float(edges.max())
        else:
            if n_kept is None:
                raise ValueError(f"schedule_kind={schedule_kind!r} needs n_kept (see `schedule`)")
            result["scores"] = {int(n): score_at(int(n)) for n in n_kept}
    return result


def mass_concentration(
    edges: np.ndarray, fraction: float = 0.9, constant_in: int | None = None
) -> int:
    """The fewest edges holding `fraction` of the total edge mass (sum of E), the constant column excluded.

    >>> mass_concentration(np.array([[8.0, 1.0], [1.0, 0.0]]), 0.8)
    1
    """
    e = np.array(edges, np.float64)
    if constant_in is not None:
        e = np.delete(e, constant_in, axis=1)
    flat = np.sort(e.reshape(-1))[::-1]
    total = flat.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(flat), fraction * total - 1e-12 * total) + 1)
