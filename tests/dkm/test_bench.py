"""The benchmark's pieces run: the accelerator check's workload and a two-size benchmark (slow: it compiles the
sparse DKM's epoch and times it)."""

import pytest
from theorax.experiments import bench_dkm

pytestmark = pytest.mark.slow


def test_device_workload_tiny_returns_its_timings():
    out = bench_dkm.device_workload(tiny=True)
    assert out["n"] == 2048 and out["steps_per_epoch"] == 8
    assert 0 < out["seconds"] <= out["median_s"]


def test_benchmark_reports_the_epoch_slope_and_the_floor():
    settings = bench_dkm.Settings(
        sizes=(256, 512), exact_sizes=(64, 128), num_inducing=16, batch=64, repeats=2, torch=False,
        allow_loaded_machine=True,
    )  # fmt: skip
    result = bench_dkm.benchmark(settings)
    assert set(result["epochs"]) == {"256", "512"} and result["dkm_epoch_slope_in_n"] is not None
    assert result["machine"]["cpu_count"] >= 1 and "jax_exact_slope_in_n" in result
    assert all(v > 0 for v in result["dkm_over_floor"].values())
