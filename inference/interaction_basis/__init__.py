"""Interaction-basis analysis (Bushnaq et al.): the local interaction basis, interaction graphs, ablations,
modularity, degeneracy measures and the local learning coefficient.

* `basis`: `interaction_basis` (LIB, PCA and neuron bases of every node layer, built from the output backwards).
* `edges`: `interaction_edges` (rib's squared gradient x activation edges; integrated-gradient variants).
* `ablation`: node and edge ablation curves (exponential, linear, bisect schedules), edge-mass concentration.
* `modularity`: Leiden modules of the log-normalised interaction graph (leidenalg / igraph), their drawing.
* `degeneracy`: the three sources of degeneracy (activation and Jacobian rank, synchronised ReLUs).
* `llc`: the local learning coefficient by localised SGLD (devinterp's estimator).
* `sections`: the network as a list of sections (shape checks, `with_constant`).
"""

from theorax.inference.interaction_basis.ablation import (
    SCHEDULES,
    bisect,
    edge_ablation,
    edge_order,
    mass_concentration,
    node_ablation,
    schedule,
)
from theorax.inference.interaction_basis.basis import (
    BASES,
    INTEGRATION,
    LayerBasis,
    integration_points,
    interaction_basis,
)
from theorax.inference.interaction_basis.degeneracy import (
    LayerDegeneracy,
    ReluSync,
    linear_degeneracy,
    numerical_rank,
    synchronised_relus,
)
from theorax.inference.interaction_basis.edges import interaction_edges
from theorax.inference.interaction_basis.llc import LLCEstimate, default_nbeta, llc
from theorax.inference.interaction_basis.modularity import (
    Modules,
    draw_modules,
    leiden_modules,
    log_normalised,
)
from theorax.inference.interaction_basis.sections import (
    SectionError,
    linear_then,
    split_linear,
    with_constant,
)

__all__ = [
    "BASES",
    "INTEGRATION",
    "SCHEDULES",
    "LLCEstimate",
    "LayerBasis",
    "LayerDegeneracy",
    "Modules",
    "ReluSync",
    "SectionError",
    "bisect",
    "default_nbeta",
    "draw_modules",
    "edge_ablation",
    "edge_order",
    "integration_points",
    "interaction_basis",
    "interaction_edges",
    "leiden_modules",
    "linear_then",
    "linear_degeneracy",
    "llc",
    "log_normalised",
    "mass_concentration",
    "node_ablation",
    "numerical_rank",
    "schedule",
    "split_linear",
    "synchronised_relus",
    "with_constant",
]
