"""Wall-clock timing shared by the `experiments/bench_*.py` benchmarks.

Every timing function calls what it times once first (compilation, warm caches) and expects each call to block
on its result (`jax.block_until_ready`, or a torch call, which is synchronous on the CPU).

A timing taken while anything else runs is not a result: PyTorch's OpenMP threads collapse when the cores are
shared, which once made a lead look 40x bigger than it was. So every bench starts with `machine(...)`, which
reads the 1-minute load average and refuses to go on above `LOAD_LIMIT` unless the user says
`--allow_loaded_machine`; the record it returns (load, CPU, cores, library versions, whether the figures were
taken under load, and `core_rates`) goes into the bench's JSON beside its figures. `write_results` adds what
other processes took of the cores during the run (`foreign_cpu`) and marks a run that shared them.

On a VM the load average does not see the host: a busy host (or two vCPUs that are one core's hyperthreads)
slows every core while the load stays near 0, and threaded peers (torch's OpenMP) suffer more than others.
`core_rates` measures it: the same small single-threaded matmul loop on one core alone and on every core at
once. The record keeps both rates, and a share below `CORE_SHARE_WARN` is printed as a warning: same-run
ratios can still be read, but not absolute times, and a threaded peer's numbers are suspect.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata

import numpy as np

LOAD_LIMIT = 0.5  # 1-minute load average above which a bench refuses to run unless allowed
CORE_SHARE_WARN = 0.8  # every core at once below this fraction of one core's rate alone: warn
# Other processes' share of every core during a run above which the run's figures are not results.
FOREIGN_CPU_LIMIT = 0.1

# argv: the CPU to run on, the wall-clock time to start at, the seconds to run. Prints matmuls per second.
_CORE_PROBE = """
import os, sys, time
import numpy as np
cpu, start, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
os.sched_setaffinity(0, {cpu})
a = np.random.default_rng(0).random((200, 200))
while time.time() < start:
    time.sleep(0.005)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    a @ a
    n += 1
print(n / (time.perf_counter() - t0))
"""


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


def _probe(cpus: Sequence[int], seconds: float) -> list[float]:
    """Runs `_CORE_PROBE` on each of `cpus` at once (one process each, started together)."""
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    start = time.time() + 1.0  # after every process has imported numpy
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CORE_PROBE, str(c), str(start), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in cpus
    ]
    return [float(p.communicate()[0]) for p in procs]


def core_rates(seconds: float = 0.5, max_cores: int = 8) -> dict | None:
    """How much the cores slow each other down now: a 200 x 200 float64 matmul loop (one thread) on the first
    core alone, then on each of the first `max_cores` cores this process may use, all at once.

    Returns {"cores", "alone_per_s", "together_per_s" (one rate per core), "share": the slowest core's rate
    together / the rate alone}, or None where CPU affinity is unavailable or there is one core. A quiet
    machine with a core per vCPU shows a share near 1; a busy host or hyperthread siblings, much less.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))[:max_cores]
    if len(cpus) < 2:
        return None
    (alone,) = _probe(cpus[:1], seconds)
    together = _probe(cpus, seconds)
    return {
        "cores": cpus,
        "alone_per_s": alone,
        "together_per_s": together,
        "share": min(together) / alone,
    }


def machine(
    allow_loaded: bool = False, limit: float = LOAD_LIMIT, probe_cores: bool = True
) -> dict:
    """The record of the machine a benchmark runs on, checked before anything is timed.

    Raises `LoadedMachineError` when the 1-minute load average exceeds `limit` and `allow_loaded` is False;
    with `allow_loaded`, the record says `"under_load": True` and every figure beside it must be read as taken
    under load. With `probe_cores` (~3 s) it also measures `core_rates` and warns when the cores slow each
    other down (the share below `CORE_SHARE_WARN`).
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    under_load = bool(load > limit)
    if under_load and not allow_loaded:
        raise LoadedMachineError(
            f"the 1-minute load average is {load:.2f} (> {limit}): something else is running, and timings "
            "taken now are not results. Stop it and rerun, or pass --allow_loaded_machine to measure anyway "
            "(the JSON then marks every figure as taken under load)"
        )
    rates = core_rates() if probe_cores else None
    if rates is not None and rates["share"] < CORE_SHARE_WARN:
        print(
            f"warning: with every core busy each runs at {rates['share']:.0%} of one core's rate alone (a busy "
            "host, or vCPUs that share a core): same-run ratios hold, absolute times and threaded peers' "
            "figures do not",
            file=sys.stderr,
        )
    return {
        "load_1min": load,
        "load_limit": limit,
        "under_load": under_load,
        "core_rates": rates,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "torch": _version("torch"),
        "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "when": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_at_start": cpu_seconds(),
    }


def cpu_seconds() -> dict | None:
    """Where the machine's CPU time has gone so far: {"wall" (seconds, monotonic), "busy_s" (CPU seconds all
    cores have been busy since boot: user, nice, system, irq and softirq in /proc/stat; not idle, iowait or the
    host's steal), "ours_s" (CPU seconds of this process and every process below it: each one's own time and its
    reaped children's, from /proc/<pid>/stat)}. None where there is no /proc (not Linux)."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
        parents, cpu = {}, {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # the process ended meanwhile
                continue
            # The fields from the 3rd on (the 2nd, the name in parentheses, may hold spaces).
            fields = stat[stat.rindex(")") + 2 :].split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
            cpu[int(entry)] = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    except (OSError, ValueError):
        return None
    ours, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        ours += cpu.get(pid, 0)
        todo += parents.get(pid, [])
    return {
        "wall": time.monotonic(),
        "busy_s": (user + nice + system + irq + softirq) / tick,
        "ours_s": ours / tick,
    }


def foreign_cpu(start: Mapping[str, float] | None) -> dict | None:
    """What other processes took of the cores since `start` (a `cpu_seconds()` record): {"seconds", "share" (of
    every core over the wall time)}. The load average only says what ran when a bench started; this catches a
    test suite, a training job or another bench that started beside it. A little is the kernel's own threads."""
    end = cpu_seconds()
    if start is None or end is None or end["wall"] <= start["wall"]:
        return None
    foreign = (end["busy_s"] - start["busy_s"]) - (end["ours_s"] - start["ours_s"])
    foreign = max(0.0, foreign)
    return {
        "seconds": foreign,
        "share": foreign / ((end["wall"] - start["wall"]) * (os.cpu_count() or 1)),
    }


def write_results(out: str, filename: str, result: dict, lines: Sequence[str]) -> str:
    """Writes a bench's `result` as JSON to `out/filename`, prints its table `lines`; returns the path.

    When `result["machine"]` is `machine()`'s record, it first adds what other processes took of the cores
    since then (`foreign_cpu`); above `FOREIGN_CPU_LIMIT` the result is marked `under_load` and the table says
    its figures are not results."""
    import json

    record = result.get("machine")
    if isinstance(record, dict) and "cpu_at_start" in record:
        foreign = record["foreign_cpu"] = foreign_cpu(record["cpu_at_start"])
        if foreign is not None and foreign["share"] > FOREIGN_CPU_LIMIT:
            result["under_load"] = record["under_load"] = True
            lines = [
                *lines,
                f"!! OTHER PROCESSES TOOK {foreign['share']:.0%} OF THE CORES DURING THE RUN (> "
                f"{FOREIGN_CPU_LIMIT:.0%}): these figures are not results",
            ]
        elif foreign is not None:
            lines = [
                *lines,
                f"other processes took {foreign['share']:.1%} of the cores during the run",
            ]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, filename)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("\n" + "\n".join(lines))
    print(f"wrote {path}")
    return path


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
    fns: Mapping[str, Callable[[], object]], repeats: int, settle: int = 0
) -> dict[str, dict[str, float]]:
    """`time_calls` for several peers, timed in turn within every repeat and in alternating order: {peer:
    {"min_s", "median_s"}} (`summarize` of `interleaved_rounds`, which says how)."""
    return summarize(interleaved_rounds(fns, repeats, settle))


def interleaved_rounds(
    fns: Mapping[str, Callable[[], object]], repeats: int, settle: int = 0
) -> dict[str, list[float]]:
    """Every peer's seconds in every round, {peer: [round 0, round 1, ...]}: the peers timed in turn within
    each round, in alternating order, a pause before each call.

    Load from other processes then hits them alike, and the pause before each call lets the previous library's
    idle worker threads (torch's OpenMP pool spins for a while after a call) stop before the next one starts.
    A round's calls are neighbours in time, so `bootstrap` can resample whole rounds for an interval of a ratio
    between peers. With `settle`, each timed call comes right after that many untimed calls of the same peer
    (after the pause): the steady state of a loop that runs its calls back to back, as training steps do. It
    matters on some VMs: on the Zen 5 VM (2026-12-04) the scaled-MLP train step's first call after an idle pause
    of 0.1-1 s took 15-25 ms (~25%) longer than the calls after it, while its matmuls alone did not slow.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    order = list(fns)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            time.sleep(0.3)
            for _ in range(settle):
                fns[k]()
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return times


def summarize(rounds: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """{peer: {"min_s", "median_s"}} of `interleaved_rounds`' times."""
    return {
        k: {"min_s": float(np.min(v)), "median_s": float(np.median(v))} for k, v in rounds.items()
    }


def bootstrap(
    statistic: Callable[[Mapping[str, np.ndarray]], float],
    rounds: Mapping[str, Sequence[float]],
    level: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """A statistic of interleaved timings with a bootstrap confidence interval.

    `rounds` are `interleaved`'s per-round times ({peer: seconds of round 0, 1, ...}); `statistic` maps such a
    dict of arrays to a number (say, one peer's median over another's). The rounds are resampled with
    replacement, whole: every peer keeps the calls of the same rounds, so a slow stretch of the machine that hit
    both peers of a ratio stays paired. Returns {"estimate" (the statistic of the rounds themselves), "low",
    "high" (the percentile interval holding `level` of the resampled statistics), "level"}.
    """
    arrays = {k: np.asarray(v, np.float64) for k, v in rounds.items()}
    (n,) = {len(v) for v in arrays.values()}
    rng = np.random.default_rng(seed)
    samples = [
        statistic({k: v[idx] for k, v in arrays.items()})
        for idx in rng.integers(0, n, size=(resamples, n))
    ]
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return {
        "estimate": float(statistic(arrays)),
        "low": float(low),
        "high": float(high),
        "level": level,
    }


def judge(
    statistic: Callable[[Mapping[str, np.ndarray]], float],
    rounds: Mapping[str, Sequence[float]],
    *,
    at_most: float | None = None,
    at_least: float | None = None,
) -> dict:
    """`bootstrap(statistic, rounds)` with the `verdict` of the target `statistic <= at_most` (or `>= at_least`)
    on its interval, as "verdict"."""
    interval = bootstrap(statistic, rounds)
    return interval | {"verdict": verdict(interval, at_most, at_least)}


def verdict(
    interval: Mapping[str, float], at_most: float | None = None, at_least: float | None = None
) -> str:
    """ "met", "not met" or "within the noise": whether a target's bound holds for the whole `bootstrap`
    interval, for none of it, or only for part of it."""
    low, high = interval["low"], interval["high"]
    if at_most is not None:
        return "met" if high <= at_most else "not met" if low > at_most else "within the noise"
    return "met" if low >= at_least else "not met" if high < at_least else "within the noise"


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


def _hlo_instructions(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """{instruction name: (its op_name metadata, whether it is or wraps a matrix product)} of an optimised HLO
    module's text (`compiled.as_text()`), leaving out while loops, conditionals and calls (the instructions of
    their bodies are listed themselves)."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%([\w.-]+) \(.*\{$", line)
        if head:
            current = computations.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    has_dot = {
        name: any(re.search(r" (dot|convolution)\(", b) for b in body)
        for name, body in computations.items()
    }
    out = {}
    for body in computations.values():
        for line in body:
            m = re.match(r"\s*(?:ROOT )?%([\w.-]+) = .*? ([\w-]+)\(", line)
            if not m:
                continue
            if m.group(2) in ("while", "conditional", "call"):
                continue  # containers: the instructions of their bodies are timed themselves
            called = re.findall(r"calls=%([\w.-]+)", line)
            op_name = re.search(r'op_name="([^"]*)"', line)
            matmul = m.group(2) in ("dot", "convolution") or any(
                has_dot.get(c, False) for c in called
            )
            out[m.group(1)] = (op_name.group(1) if op_name else "", matmul)
    return out


def thunk_profile(fn: Callable[[], object], hlo_text: str, calls: int = 10) -> list[dict]:
    """Where a compiled XLA:CPU program's time goes: one `jax.profiler` trace of `calls` calls of `fn` (after
    one warm-up call), each instruction of the program (`hlo_text`, its optimised HLO) with its median time
    per call times how many times a call runs it.

    Returns rows {"name", "ms_per_call", "count_per_call", "op_name", "matmul"} (the instruction, its JAX
    source from the HLO metadata, and whether it is or wraps a matrix product), slowest first. Loops and
    conditionals are not rows (their bodies' instructions are). Thunks that run concurrently overlap, so the
    rows can sum to more than the wall time; and a thunk's event can end before its work does (on the 2-core
    Zen 5 VM a plain `dot` thunk of a 0.54 GFLOP weight gradient lasted 65 us, its work running on for ~2 ms
    in thread-pool regions that no instruction's event covers), so they can also sum to less. For where a
    program's time goes, time it with its parts taken away (as `bench_scaled_mlp --ablate` does).
    """
    import glob
    import gzip
    import json
    import tempfile

    import jax

    instructions = _hlo_instructions(hlo_text)
    fn()
    durations: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    for e in events:
        if e.get("ph") == "X" and e.get("name") in instructions:
            durations.setdefault(e["name"], []).append(e["dur"] * 1e-3)
    rows = [
        {
            "name": name,
            "ms_per_call": float(np.median(d)) * len(d) / calls,
            "count_per_call": len(d) / calls,
            "op_name": instructions[name][0],
            "matmul": instructions[name][1],
        }
        for name, d in durations.items()
    ]
    return sorted(rows, key=lambda r: -r["ms_per_call"])
