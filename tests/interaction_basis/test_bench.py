"""The benchmark's peers compute the same LIB as ours, and the device check's workload runs (tiny sizes)."""

import numpy as np
import pytest
from theorax.experiments import bench_interaction_basis as bench

SIZES = (16, 8, 8, 4)


def _agree(ours, peer):
    for b, (c, lam) in zip(ours[:-1], peer, strict=True):
        np.testing.assert_allclose(lam, b.eigenvalues, rtol=1e-7, atol=1e-12 * b.eigenvalues.max())
        np.testing.assert_allclose(np.abs(c), np.abs(b.C), rtol=1e-5, atol=1e-8 * np.abs(b.C).max())


def test_the_per_example_jacobian_peer_computes_our_basis():
    params, x = bench.workload(120, SIZES)
    _agree(bench.ours_lib(params, x, 64), bench.jax_per_example_lib(params, x, 64))


@pytest.mark.interop
def test_the_torch_func_peer_computes_our_basis():
    pytest.importorskip("torch")
    params, x = bench.workload(120, SIZES)
    _agree(bench.ours_lib(params, x, 64), bench.torch_func_lib(params, x, 64))


def test_device_workload_tiny():
    out = bench.device_workload(tiny=True)
    assert out["n"] == 256 and out["layer_sizes"] == [64, 16, 16, 10]
    assert len(out["basis_sizes"]) == 4 and out["seconds"] > 0
