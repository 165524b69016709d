"""The DT bench's latency table: the paper's DT-5 timed beside its matmul floor, its targets judged on
bootstrap intervals that hold the medians."""

import jax
import numpy as np
import pytest
from theorax.configs import distribution_transformer as cfg
from theorax.experiments import bench_distribution_transformer as bench
from theorax.experiments import distribution_transformer as dtx


@pytest.mark.slow  # ~15 s: DT-5 and its library-default twin compiled
def test_latencies_report_the_median_with_its_interval_and_verdict():
    task, _ = dtx.build(cfg.get_config("cpu").tasks.invgamma_wide)
    prob = task.sample(jax.random.key(0), 8)
    lat = bench.latencies(task, prob, 5, peers=False)
    ci = lat["intervals"]["dt5_median_s"]
    assert ci["estimate"] == np.median(lat["rounds_s"]["dt5"]) == lat["times_s"]["dt5"]["median_s"]
    assert min(lat["rounds_s"]["dt5"]) <= ci["low"] <= ci["estimate"] <= ci["high"]
    assert ci["verdict"] == "met"  # 8 problems take a few milliseconds, far below 50
    first = bench._latency_rows(lat)[0][0]
    assert first.startswith("dt5, batch of 8 (") and "< 50 ms: met" in first
