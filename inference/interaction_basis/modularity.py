"""Modularity of the interaction graph: Leiden clustering (leidenalg on igraph) of log-normalised edges.

As rib's `run_modularity.py` (reference notes Sec. 2.8): the graph's nodes are the basis directions of every
node layer but the constant ones; the weight of edge (i, j) of transition l is `max(0, log10(E_ij / eps_l))`,
where eps_l is the smallest edge the bisect edge ablation kept (`ByLayerLogEdgeNorm`), so edges the network can
lose without changing its accuracy weigh nothing. Clusters come from the Leiden algorithm with the
configuration (RB) quality at resolution gamma (1.0 in the paper's scripts, 0.5 in its appendix); the
Newman modularity of the partition is reported. igraph and leidenalg are imported only here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Modules:
    """A clustering of the interaction graph.

    Attributes:
      nodes: (layer, index) of each graph node, in graph order.
      membership: the module of each node.
      modularity: Newman's modularity Q of the partition on the weighted graph (resolution 1).
      quality: the Leiden objective at the requested resolution.
      weights: the log-normalised edge weight matrices, one per transition (constant rows and columns 0).
    """

    nodes: list[tuple[int, int]]
    membership: list[int]
    modularity: float
    quality: float
    weights: list[np.ndarray]

    @property
    def num_modules(self) -> int:
        return len(set(self.membership))

    @property
    def num_nontrivial(self) -> int:
        """Modules of two or more nodes (rib's drawings hide the singletons: nodes without kept edges)."""
        return int(np.sum(np.bincount(self.membership) >= 2))

    def module_sizes(self) -> list[int]:
        """Sizes of the modules, largest first."""
        return sorted(np.bincount(self.membership).tolist(), reverse=True)


def log_normalised(edges: np.ndarray, epsilon: float) -> np.ndarray:
    """max(0, log10(E / epsilon)): rib's ByLayerLogEdgeNorm.

    >>> log_normalised(np.array([[100.0, 0.5], [1.0, 0.0]]), 1.0).tolist()
    [[2.0, 0.0], [0.0, 0.0]]
    """
    if not epsilon > 0:
        raise ValueError(
            f"epsilon={epsilon} must be > 0 (the smallest edge kept by the bisect ablation)"
        )
    e = np.asarray(edges, np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(0.0, np.log10(np.maximum(e, 0.0) / epsilon))


def leiden_modules(
    edges: Sequence[np.ndarray],
    epsilons: Sequence[float],
    constant_indices: Sequence[int | None],
    *,
    gamma: float = 1.0,
    seed: int = 0,
    n_iterations: int = 10,
) -> Modules:
    """Leiden modules of the log-normalised interaction graph.

    Args:
      edges: L edge matrices, `edges[l]` of shape (size_{l+1}, size_l) (`interaction_edges`).
      epsilons: per transition, the smallest edge kept by the bisect edge ablation (rib's epsilon).
      constant_indices: the L + 1 node layers' constant direction (excluded with its edges), or None.
      gamma: the resolution of the configuration (RB) quality.
      seed: Leiden's random seed.
      n_iterations: Leiden iterations (rib: 10).

    Returns:
      `Modules`.

    Example: two disconnected chains form two modules.

    >>> e = [np.array([[10.0, 0.0], [0.0, 10.0]]), np.array([[10.0, 0.0], [0.0, 10.0]])]
    >>> leiden_modules(e, [1.0, 1.0], [None, None, None]).num_modules
    2
    """
    import igraph
    import leidenalg

    if len(epsilons) != len(edges) or len(constant_indices) != len(edges) + 1:
        raise ValueError(
            f"need one epsilon per transition ({len(edges)}) and one constant index per node layer "
            f"({len(edges) + 1}); got {len(epsilons)} and {len(constant_indices)}"
        )
    sizes = [edges[0].shape[1]] + [e.shape[0] for e in edges]
    nodes = [
        (layer, i)
        for layer, n in enumerate(sizes)
        for i in range(n)
        if i != constant_indices[layer]
    ]
    index = {node: k for k, node in enumerate(nodes)}
    weights, pairs, values = [], [], []
    for layer, (e, eps) in enumerate(zip(edges, epsilons, strict=True)):
        w = log_normalised(e, eps)
        if constant_indices[layer] is not None:
            w[:, constant_indices[layer]] = 0.0
        if constant_indices[layer + 1] is not None:
            w[constant_indices[layer + 1], :] = 0.0
        weights.append(w)
        for i, j in zip(*np.nonzero(w), strict=True):
            pairs.append((index[(layer, int(j))], index[(layer + 1, int(i))]))
            values.append(float(w[i, j]))
    graph = igraph.Graph(n=len(nodes), edges=pairs)
    graph.es["weight"] = values
    partition = leidenalg.find_partition(
        graph,
        leidenalg.RBConfigurationVertexPartition,
        weights="weight",
        resolution_parameter=gamma,
        n_iterations=n_iterations,
        seed=seed,
    )
    membership = list(partition.membership)
    q = graph.modularity(membership, weights="weight") if values else 0.0
    return Modules(nodes, membership, float(q), float(partition.quality()), weights)


def draw_modules(
    ax, modules: Modules, layer_names: Sequence[str], nodes_per_layer: int = 30
) -> None:
    """Draws the interaction graph on a matplotlib `Axes`: one column per node layer (its first
    `nodes_per_layer` directions, top = largest eigenvalue), edges with opacity by weight, nodes coloured by
    module (modules outside the ten largest in grey)."""
    import matplotlib as mpl

    pos = {}
    for layer, i in modules.nodes:
        pos.setdefault(layer, []).append(i)
    shown = {(layer, i) for layer, idx in pos.items() for i in sorted(idx)[:nodes_per_layer]}
    rank = {
        (layer, i): r
        for layer, idx in pos.items()
        for r, i in enumerate(sorted(idx)[:nodes_per_layer])
    }
    wmax = max((float(w.max()) for w in modules.weights if w.size), default=1.0) or 1.0
    for layer, w in enumerate(modules.weights):
        for i, j in zip(*np.nonzero(w), strict=True):
            a, b = (layer, int(j)), (layer + 1, int(i))
            if a in shown and b in shown:
                ax.plot(
                    [layer, layer + 1], [-rank[a], -rank[b]], color="k",
                    alpha=0.1 + 0.8 * float(w[i, j]) / wmax, lw=0.3 + 2.0 * float(w[i, j]) / wmax,
                    zorder=1,
                )  # fmt: skip
    sizes = np.bincount(modules.membership)
    top = {int(m): k for k, m in enumerate(np.argsort(-sizes)[:10])}
    cmap = mpl.colormaps["tab10"]
    for node, module in zip(modules.nodes, modules.membership, strict=True):
        if node in shown:
            colour = cmap(top[module]) if module in top else (0.7, 0.7, 0.7, 1.0)
            ax.scatter(node[0], -rank[node], color=colour, s=25, zorder=2, edgecolors="k", lw=0.3)
    ax.set_xticks(range(len(layer_names)))
    ax.set_xticklabels(layer_names)
    ax.set_yticks([])
    ax.set_ylabel(f"basis direction (top {nodes_per_layer} per layer)")
