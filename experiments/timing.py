"""Wall-clock timing shared by the `experiments/bench_*.py` benchmarks.

Every timing function calls what it times once first (compilation, warm caches) and expects each call to block
on its result (`jax.block_until_ready`, or a torch call, which is synchronous on the CPU).

A timing taken while anything else runs is not a result: PyTorch's OpenMP threads collapse when the cores are
shared, which once made a lead look 40x bigger than it was. So every bench starts with `machine(...)`, which
reads the 1-minute load average and refuses to go on above `LOAD_LIMIT` unless the user says
`--allow_loaded_machine`; the record it returns (load, CPU, cores, library versions, whether the figures were
taken under load) goes into the bench's JSON beside its figures.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata

import numpy as np

LOAD_LIMIT = 0.5  # 1-minute load average above which a bench refuses to run unless allowed


class LoadedMachineError(RuntimeError):
    """The machine is busy, so timings taken now would not be results."""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(allow_loaded: bool = False, limit: float = LOAD_LIMIT) -> dict:
    """The record of the machine a benchmark runs on, checked before anything is timed.

    Raises `LoadedMachineError` when the 1-minute load average exceeds `limit` and `allow_loaded` is False;
    with `allow_loaded`, the record says `"under_load": True` and every figure beside it must be read as taken
    under load.
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    under_load = bool(load > limit)
    if under_load and not allow_loaded:
        raise LoadedMachineError(
            f"the 1-minute load average is {load:.2f} (> {limit}): something else is running, and timings "
            "taken now are not results. Stop it and rerun, or pass --allow_loaded_machine to measure anyway "
            "(the JSON then marks every figure as taken under load)"
        )
    return {
        "load_1min": load,
        "load_limit": limit,
        "under_load": under_load,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "when": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


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


def matmuls_alone(shapes: Sequence[tuple[int, int, int]], seed: int = 0) -> Callable[[], object]:
    """A call that runs the float32 matrix products (m, k) @ (k, n) of `shapes` in one jit and nothing else:
    the floor of a workload made of those products (a benchmark times it beside the workload).

    Operands are random and already in the row-major layout the matmul library wants; each product is summed
    to a scalar so that none can be dropped (the sums are a small fraction of the products' cost).
    """
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), 2 * len(shapes))
    operands = [
        (jax.random.normal(k1, (m, k)), jax.random.normal(k2, (k, n)))
        for (m, k, n), k1, k2 in zip(shapes, keys[::2], keys[1::2], strict=True)
    ]
    products = jax.jit(lambda ops: [jnp.sum(a @ w) for a, w in ops])
    return lambda: jax.block_until_ready(products(operands))
