"""Ablations, modularity and degeneracy measures, on small networks with known answers."""

import jax
import numpy as np
import pytest
from theorax.inference import interaction_basis as ib
from theorax.models import interaction_basis as m


@pytest.fixture(scope="module")
def trained_mlp():
    params = m.init_mlp(jax.random.key(0), (4, 12, 3))
    x = np.random.default_rng(0).normal(size=(300, 4))
    y = np.asarray(np.argmax(m.mlp_apply(params, x), -1))
    xf = np.concatenate([x, np.ones((300, 1))], axis=1)
    sections = m.mlp_sections(params)
    bases = ib.interaction_basis(sections, xf)
    edges = ib.interaction_edges(sections, xf, bases)
    return sections, xf, y, bases, edges


def test_node_ablation_keeps_the_accuracy_with_every_direction_and_loses_it_with_none(trained_mlp):
    sections, x, y, bases, _ = trained_mlp
    k = bases[1].size
    scores = ib.node_ablation(sections, x, y, bases, 1, [k, 1])
    assert scores[k] == 1.0  # labels are the network's own predictions
    assert scores[1] < 0.9  # only the constant: one class everywhere


def test_edge_ablation_bisect_finds_the_fewest_edges_within_the_target(trained_mlp):
    sections, x, y, bases, edges = trained_mlp
    res = ib.edge_ablation(sections, x, y, bases, edges[0], 0, score_target_difference=0.05)
    n = res["n_needed"]
    assert res["baseline"] == 1.0 and 0 < n <= res["n_edges"]
    assert res["scores"][n] >= 0.95
    if n - 1 in res["scores"]:
        assert res["scores"][n - 1] < 0.95
    every = ib.edge_ablation(sections, x, y, bases, edges[0], 0, [res["n_edges"]],
                             schedule_kind="exponential")  # fmt: skip
    assert every["scores"][res["n_edges"]] == pytest.approx(1.0)


def test_schedules_and_mass_concentration():
    assert ib.schedule("exponential", 1000, 4) == [1000, 100, 10, 1, 0]
    assert ib.bisect(lambda n: float(n >= 37), 100, 1.0)[0] == 37
    e = np.array([[5.0, 100.0, 0.0], [1.0, 0.0, 3.0]])
    assert ib.mass_concentration(e, 0.9, constant_in=1) == 3
    assert list(ib.edge_order(e, 1)) == [0, 5, 3, 2]


def test_leiden_finds_two_blocks_of_a_block_diagonal_graph():
    rng = np.random.default_rng(0)
    block = lambda: np.kron(np.eye(2), np.ones((4, 4))) * rng.uniform(50, 100, (8, 8))  # noqa: E731
    edges = [block() + 1e-3, block() + 1e-3]
    mods = ib.leiden_modules(edges, [1.0, 1.0], [None, None, None])
    assert mods.num_modules == 2 and mods.module_sizes() == [12, 12]
    assert mods.modularity > 0.45
    # The constant node and its edges are left out.
    with_const = ib.leiden_modules(edges, [1.0, 1.0], [0, 0, 0])
    assert len(with_const.nodes) == 21


def test_degeneracy_counts_duplicated_and_dead_neurons():
    params = m.init_mlp(jax.random.key(1), (3, 5, 2))
    layer0 = params["layers"][0]
    w = np.array(layer0["W"])
    b = np.array(layer0["b"])
    w[:, 1], b[1] = w[:, 0], b[0]  # neuron 1 duplicates neuron 0
    w[:, 4], b[4] = 0.0, -1.0  # neuron 4 never fires
    params["layers"][0] = {"W": w, "b": b}
    x = np.random.default_rng(0).normal(size=(200, 3))
    xf = np.concatenate([x, np.ones((200, 1))], axis=1)
    layers = ib.linear_degeneracy(m.mlp_sections(params), xf)
    assert layers[1].dim == 6 and layers[1].activation_rank == 4  # duplicate + dead
    assert layers[1].free_from_activations == 2 * 2
    hidden = np.maximum(x @ w + b, 0.0)
    sync = ib.synchronised_relus(hidden, d_in=3, d_out=2)
    assert [0, 1] in sync.groups and sync.dead == [4]
    assert sync.free_directions >= 2 + (3 + 1 + 2)
