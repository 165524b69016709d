"""Wall-clock timing shared by the `experiments/bench_*.py` benchmarks.

Every function calls what it times once first (compilation, warm caches) and expects each call to block on its
result (`jax.block_until_ready`, or a torch call, which is synchronous on the CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def time_calls(fn: Callable[[], object], repeats: int, calls: int = 1) -> dict[str, float]:
    """Seconds per call: `min_s` and `median_s` over `repeats` measurements, each the mean of `calls` calls."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return {"min_s": float(np.min(times)), "median_s": float(np.median(times))}


def interleaved(
    fns: Mapping[str, Callable[[], object]], repeats: int
) -> dict[str, dict[str, float]]:
    """`time_calls` for several peers, timed in turn within every repeat and in alternating order.

    Load from other processes then hits them alike, and the pause before each call lets the previous library's
    idle worker threads (torch's OpenMP pool spins for a while after a call) stop before the next one starts.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            time.sleep(0.3)
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {
        k: {"min_s": float(np.min(v)), "median_s": float(np.median(v))} for k, v in times.items()
    }
