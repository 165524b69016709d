"""The experiment runtime that every system's entry point shares.

An entry point is a module `experiments/<system>.py` with

    def run(config: ml_collections.ConfigDict, workdir: str) -> dict: ...   # returns results.json
    def report(results: dict, workdir: str) -> str: ...                     # markdown for the demo
    if __name__ == "__main__":
        runtime.main(run)

and is launched as

    python -m theorax.experiments.<system> --config=configs/<system>.py:<preset> --workdir=DIR [--config.key=value]

What this module gives such a `run`:

* `Workdir`: `config.json`, `metrics.jsonl`, TensorBoard events, `results.json`, PNG plots and an orbax
  `Checkpointer` under `DIR/checkpoints/`, written by process 0 alone (checkpoints by every process, as orbax
  requires). A workdir is held by one run at a time (`DIR/workdir.lock`), and a rerun whose config differs from
  `DIR/config.json` is refused unless asked to start afresh (`fresh=True`, `--fresh`).
* `train(...)`: the one training loop: resume from the newest checkpoint that loads, a progress bar with ETA and
  the latest metrics, metrics read one step behind, periodic checkpoints, a stop with `NonFiniteError` on a
  non-finite loss that never overwrites the last good checkpoint, and a clean stop on SIGTERM / SIGINT that
  first saves the current step (`Preempted`).
* Sharding helpers: a 1-D `data` mesh over every device of every process, the batch / replicated shardings, and
  `global_batch` (process-local numpy -> global `jax.Array` via `make_array_from_process_local_data`).
* Multi-host start-up: `jax.distributed.initialize` from flags (`--coordinator_address`, `--num_processes`,
  `--process_id`) or, with none given, from a cluster environment that JAX detects itself (a multi-task SLURM
  step, or a TPU VM's workers with `THEORAX_DISTRIBUTED=auto`).
* Device memory: `compile_within_memory` compiles ahead of time and refuses a program that cannot fit with the
  size it needs and the device's free memory (`DeviceMemoryError`), not XLA's out-of-memory trace.
* Errors that the entry point prints as one line (`error: ...`, exit status 2): `ConfigError` (bad or changed
  config values), `NonFiniteError`, `WorkdirError` (a workdir held by another run, no checkpoint that loads, a
  failed write). `Preempted` exits with status 75 (`EXIT_PREEMPTED`): rerunning the same command continues.
* `use_huge_pages()`: every entry point re-executes itself once with glibc's malloc backing its large buffers by
  transparent huge pages (see its docstring; `THEORAX_SYSTEM_MALLOC=1` opts out).

Faults, and what survives them (README, "Running experiments", has the table): a SIGKILL loses the steps since the
newest checkpoint; SIGTERM / SIGINT lose none; a newest checkpoint that does not load is renamed
`<step>.corrupt-<time>` and the run resumes from the one before; a failed save (a full disk) stops the run with
the path and the space needed, leaving the previous checkpoint and metrics.jsonl as they were; a torn last line of
metrics.jsonl is dropped on resume, and lines past the restored step are removed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Exit statuses of the entry points. 2: the run stopped on an error its one-line message names (config,
# non-finite loss, workdir). 75 (sysexits' EX_TEMPFAIL): stopped by SIGTERM / SIGINT, rerun to continue.
EXIT_ERROR = 2
EXIT_PREEMPTED = 75

# --------------------------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A config value is wrong. The message names the key, the value, what was expected and the fix."""


class ConfigChangedError(ConfigError):
    """A rerun's config differs from the one its workdir was run with; the message names the keys."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used as the run needs; the message names the path, the cause and the fix."""


class WorkdirLockedError(WorkdirError):
    """Another live run holds the workdir; the message names it (pid, host, start time, command)."""


class CheckpointError(WorkdirError):
    """No checkpoint of the workdir loads, or a checkpoint could not be written."""


class Preempted(BaseException):
    """Training stopped on SIGTERM or SIGINT; the checkpoint of the stop step was saved first.

    A `BaseException` (like `KeyboardInterrupt`): a request to stop is not an error for `except Exception` to
    swallow. Rerunning the same command (or `run(config, workdir)`) continues from `step`.
    """

    def __init__(self, message: str, *, signal_name: str | None = None, step: int | None = None):
        super().__init__(message)
        self.signal_name = signal_name
        self.step = step


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds (plain Python, before any compilation)."""
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices) -> None:
    """Raises a `ConfigError` naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(choices)}")


def warn(message: str) -> None:
    """One `warning: ...` line on stderr, from process 0 only."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _reason(error: BaseException) -> str:
    """The innermost cause of `error` as one short line (tensorstore's errors run to 40 lines of spec)."""
    while error.__cause__ is not None or (
        error.__context__ is not None and not error.__suppress_context__
    ):
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return (
        text if len(text) <= 320 else f"{text[:120]} ... {text[-190:]}"
    )  # the OS error is at the end


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _free_space(path: str) -> str:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return _size(shutil.disk_usage(path or ".").free)
    except OSError:
        return "an unknown amount"


# ------------------------------------------------------------------------------------------ processes


def is_main_process() -> bool:
    return jax.process_index() == 0


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts multi-host JAX when asked for; a no-op for a single process.

    Explicit arguments win. Without them `THEORAX_COORDINATOR`, `THEORAX_NUM_PROCESSES` and
    `THEORAX_PROCESS_ID` are read. Otherwise JAX's own cluster detection starts it: inside a multi-task SLURM
    job step (`srun`, one process per task; SLURM_NTASKS > 1), and wherever `THEORAX_DISTRIBUTED=auto` is set
    (the multi-host TPU VM form of `experiments.sweep --print_commands --tpu_name=...`, whose workers JAX finds
    from the TPU metadata). On the CPU the collectives go through gloo.

    Under SLURM, JAX gives each process the one local device at index SLURM_LOCALID, so a multi-task job runs
    one task per GPU, each task seeing all of its node's GPUs (what `experiments.sweep --slurm_array` writes).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("THEORAX_COORDINATOR")
    if num_processes is None and "THEORAX_NUM_PROCESSES" in env:
        num_processes = int(env["THEORAX_NUM_PROCESSES"])
    if process_id is None and "THEORAX_PROCESS_ID" in env:
        process_id = int(env["THEORAX_PROCESS_ID"])
    auto = env.get("THEORAX_DISTRIBUTED", "") == "auto" or int(env.get("SLURM_NTASKS", "1")) > 1
    if coordinator_address or auto:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()


def _agree(error: BaseException | None, what: str) -> None:
    """Makes every process share process 0's verdict on a step only it performs (locking, moving files).

    Process 0 passes the error it met (or None); every other process raises an error of the same kind, pointing
    to process 0's message, so that no process goes on alone into a collective the others never reach.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        code = 0 if error is None else 1 if isinstance(error, ConfigError) else 2
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if not is_main_process() and code:
            kind = ConfigChangedError if code == 1 else WorkdirError
            raise kind(f"process 0 refused {what}; its error message says why")
    if error is not None:
        raise error


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _every_process(flag: bool) -> bool:
    """True when `flag` holds on every process (a blocking all-gather; a no-op for one process)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


# ------------------------------------------------------------------------------------------- sharding


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh named `data` over every device of every process."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return jax.sharding.NamedSharding(mesh, jax.P("data"))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.P())


def global_batch(local_batch, mesh: jax.sharding.Mesh):
    """Assembles each process's slice of the batch (numpy, leading axis) into global jax Arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch; the batch must split evenly over processes and devices."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if global_batch_size % n_dev:
        raise ConfigError(
            f"batch_size={global_batch_size} does not split over {n_dev} devices; "
            f"use a multiple of {n_dev}"
        )
    return global_batch_size // n_proc


# -------------------------------------------------------------------------------------- device memory


class DeviceMemoryError(MemoryError):
    """A compiled program needs more memory than the device has free; raised before the program runs."""


def format_bytes(n: float) -> str:
    """`n` bytes in binary units: '512 B', '1.5 MiB', '139.8 GiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.{1 if abs(n) >= 10 * size else 2}f} {unit}"
    return f"{int(n)} B"


def device_memory(device: jax.Device | None = None) -> dict[str, int] | None:
    """A device's memory as XLA's allocator reports it: `{"limit", "in_use", "free"}` in bytes.

    None where the backend reports nothing (the CPU). On a GPU `limit` is the allocator's pool (by default 75%
    of the card, `XLA_PYTHON_CLIENT_MEM_FRACTION`), so `free` is what JAX programs can still have.
    """
    device = device or jax.local_devices()[0]
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    limit, in_use = int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
    return {"limit": limit, "in_use": in_use, "free": limit - in_use}


def program_memory(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """What one device needs to run a compiled program, from XLA's buffer assignment (bytes).

    `total` = arguments + outputs - donated (outputs written into donated arguments) + temporaries +
    generated code; the parts are given too. None when the backend gives no analysis.
    """
    m = compiled.memory_analysis()
    if m is None:
        return None
    parts = {
        "arguments": int(m.argument_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "donated": int(m.alias_size_in_bytes),
        "temporaries": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes),
    }
    parts["total"] = (
        parts["arguments"]
        + parts["outputs"]
        - parts["donated"]
        + parts["temporaries"]
        + parts["code"]
    )
    return parts


def compile_within_memory(
    jitted, *args, what: str, limit_bytes: int | None = None, **kwargs
) -> jax.stages.Compiled:
    """Compiles `jitted` for `args` ahead of time and refuses, with sizes, a program the device cannot hold.

    `jitted.lower(*args, **kwargs).compile()`, then `program_memory` against `device_memory`: a program that
    needs more than the free memory raises `DeviceMemoryError` naming what it needs (and its parts) and what
    the device has, instead of XLA's out-of-memory trace at the first call. Arguments may be
    `jax.ShapeDtypeStruct`s (with their shardings), so a workload is checked before its inputs are allocated;
    the figures are per device (a batch sharded over the mesh counts its local shard). `limit_bytes` caps the
    free memory assumed: headroom on an accelerator, or a stand-in on the CPU, which reports none (where,
    without it, nothing is refused).

    Returns:
      The `jax.stages.Compiled` program; call it with arguments of the lowered shapes and shardings.

    Example:
      >>> double = jax.jit(lambda x: 2 * x)
      >>> vector = jax.ShapeDtypeStruct((1024,), np.float32)
      >>> compile_within_memory(double, vector, what="doubling")(np.ones(1024, np.float32))[:2]
      Array([2., 2.], dtype=float32)
      >>> compile_within_memory(double, vector, what="doubling", limit_bytes=1000)
      Traceback (most recent call last):
      theorax.experiments.runtime.DeviceMemoryError: doubling does not fit the device's memory: it needs 8.00 KiB per device ...
    """
    compiled = jitted.lower(*args, **kwargs).compile()
    need = program_memory(compiled)
    have = device_memory()
    if need is None or (have is None and limit_bytes is None):
        return compiled
    free = have["free"] if have is not None else limit_bytes
    if limit_bytes is not None:
        free = min(free, limit_bytes)
    if need["total"] > free:
        parts = ", ".join(
            f"{k} {'-' if k == 'donated' else ''}{format_bytes(v)}"
            for k, v in need.items()
            if k != "total" and v
        )
        device = jax.local_devices()[0]
        of = f" of {format_bytes(have['limit'])}" if have is not None else ""
        raise DeviceMemoryError(
            f"{what} does not fit the device's memory: it needs {format_bytes(need['total'])} per device "
            f"({parts}), and {device.device_kind} {device.id} has {format_bytes(free)} free{of}. Use a "
            f"smaller batch or model, or more devices (the batch is split over {jax.device_count()})"
        )
    return compiled


# ------------------------------------------------------------------------------------------- progress


class _Quiet:
    """Stands in for a progress bar on processes other than 0."""

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...
    def __iter__(self):
        return iter(())


def progress(total: int, *, desc: str, initial: int = 0):
    """A tqdm bar with ETA on process 0 (quieter, one line every 10 s, when stderr is not a terminal)."""
    if not is_main_process():
        return _Quiet()
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.5 if tty else 10.0,
        leave=True,
        file=sys.stderr,
    )


def format_metrics(metrics: Mapping[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in metrics.items()}


# -------------------------------------------------------------------------------------------- workdir


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def config_to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _config_json(config) -> str:
    return json.dumps(_jsonable(config_to_dict(config)), indent=2, sort_keys=True)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(old: Mapping, new: Mapping) -> list[str]:
    """The dotted keys whose values differ between two config dicts, one `key: old there, new now` each.

    >>> config_differences({"lr": 0.1, "model": {"depth": 4}}, {"lr": 0.1, "model": {"depth": 6}, "seed": 1})
    ['model.depth: 4 there, 6 now', 'seed: absent there, 1 now']
    """
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if key not in b:
            out.append(f"{key}: {a[key]!r} there, absent now")
        elif key not in a:
            out.append(f"{key}: absent there, {b[key]!r} now")
        elif a[key] != b[key]:
            out.append(f"{key}: {a[key]!r} there, {b[key]!r} now")
    return out


def _write_atomically(path: str, text: str) -> None:
    """Writes `path` through a temporary file and a rename: a kill or a full disk never leaves it half written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WorkdirError(
            f"writing {path} failed ({_reason(e)}; {_free_space(path)} free there); "
            "the previous version of the file is unchanged"
        ) from e


# The lock: DIR/workdir.lock, a JSON record of its owner, created atomically (a complete temporary file
# hard-linked into place, which fails if the lock exists, on local disks and NFS alike). A lock whose owner is a
# dead process of this host (or an earlier incarnation of this SLURM job) is stale and taken over; one from another
# host is left alone, since this host cannot tell whether that process still runs.
LOCK_NAME = "workdir.lock"
_HELD: dict[str, list] = {}  # lock path -> [token of this process's lock file, number of holds]
_HOST = socket.gethostname()


def _process_start(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from /proc, telling a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def _lock_record() -> dict:
    info = _process_start(os.getpid())
    return {
        "token": os.urandom(8).hex(),
        "host": _HOST,
        "pid": os.getpid(),
        "process_start": info[1] if info else None,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:300],
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
    }


def _is_ours(record: dict) -> bool:
    return record.get("host") == _HOST and record.get("pid") == os.getpid()


def _owner_is_dead(record: dict) -> str | None:
    """Why the lock's owner is known to be gone (None: alive, or unknowable from here)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and record.get("slurm_job") == job:
        if record.get("slurm_restart", 0) < int(os.environ.get("SLURM_RESTART_COUNT", "0")):
            return f"it was an earlier run of SLURM job {job}, which has been requeued"
    if record.get("host") != _HOST:
        return None
    pid = record.get("pid")
    if not isinstance(pid, int):
        return "it names no process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} has exited"
    except PermissionError:
        pass  # alive, another user's
    info = _process_start(pid)
    if info is not None:
        if info[0] in ("Z", "X"):
            return f"process {pid} has exited"
        if record.get("process_start") not in (None, info[1]):
            return f"process {pid} has exited (its pid now belongs to another process)"
    return None


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _create_lock(path: str, record: dict) -> bool:
    """Creates the lock file holding `record`, atomically; False if it exists already."""
    tmp = f"{path}.{_HOST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: exclusive creation, then the record
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True
    finally:
        os.remove(tmp)


def _remove_stale_lock(path: str, stale: dict) -> None:
    """Deletes the lock file if it still holds `stale`; concurrent takers are serialised by flock on it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no flock here: the race it closes needs two takers in the same instant
        if os.fstat(fd).st_ino == os.stat(path).st_ino and _read_lock(path) == stale:
            os.remove(path)
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


def _describe(record: dict) -> str:
    if not record:
        return "an unreadable owner record"
    text = f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"
    return text + (f" ({record['command']})" if record.get("command") else "")


def acquire_lock(path: str) -> tuple[str, str]:
    """Takes `path`'s workdir lock for this process (re-entrant within it); returns (lock file, token).

    Raises `WorkdirLockedError` naming the owner when a live run (or a run on another host) holds it; a stale
    lock (its owner is dead) is taken over with a warning.
    """
    lock = os.path.join(os.path.abspath(path), LOCK_NAME)
    if lock in _HELD:
        _HELD[lock][1] += 1
        return lock, _HELD[lock][0]
    for _ in range(10):
        record = _lock_record()
        try:
            created = _create_lock(lock, record)
        except OSError as e:
            raise WorkdirError(f"could not create the lock {lock}: {_reason(e)}") from e
        if created:
            _HELD[lock] = [record["token"], 1]
            return lock, record["token"]
        record = _read_lock(lock)
        if record is None:
            continue  # released in the meantime
        if _is_ours(record):  # a lock file of this process that outlived its bookkeeping
            _HELD[lock] = [record.get("token"), 1]
            return lock, record.get("token")
        dead = _owner_is_dead(record)
        if dead is None:
            remote = record.get("host") not in (None, _HOST)
            hint = (
                f"This host cannot tell whether that process still runs; if it is gone, delete {lock} "
                "and rerun."
                if remote
                else "Wait for it to finish or stop it (SIGTERM saves a checkpoint), or use another workdir."
            )
            raise WorkdirLockedError(f"{path} is in use by {_describe(record)}. {hint}")
        warn(f"taking over the stale lock {lock} of {_describe(record)}: {dead}")
        _remove_stale_lock(lock, record)
    raise WorkdirLockedError(f"could not take the lock {lock}: other processes keep taking it")


def release_lock(lock: str, token: str) -> None:
    """Gives back one hold of a lock from `acquire_lock`; the file goes with the last one.

    A hold whose lock file has been replaced since (its workdir was set aside) gives back nothing.
    """
    held = _HELD.get(lock)
    if held is None or held[0] != token:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[lock]
    record = _read_lock(lock)
    if record and _is_ours(record) and record.get("token") == token:
        try:
            os.remove(lock)
        except OSError:
            pass


def set_aside(path: str) -> str | None:
    """Moves the workdir `path` to `<path>.old-<time>` so that the next run there starts from step 0.

    Nothing is deleted. Returns the new name, or None when `path` is missing or empty. Refuses (with
    `WorkdirLockedError`) while a live run holds the workdir. Process 0 only; `Workdir(..., fresh=True)` and the
    entry point's `--fresh` call it and make every process wait for it.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path) or not os.listdir(path):
        return None
    lock, token = acquire_lock(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{path}.old-{stamp}", 1
    while os.path.exists(target):
        target, n = f"{path}.old-{stamp}-{n}", n + 1
    try:
        os.rename(path, target)
    except OSError as e:
        release_lock(lock, token)
        raise WorkdirError(f"could not move {path} aside to {target}: {_reason(e)}") from e
    _HELD.pop(lock, None)  # every hold of this process on the moved run is void now
    moved_lock = os.path.join(target, LOCK_NAME)
    if os.path.exists(moved_lock):
        os.remove(moved_lock)
    warn(f"moved the previous contents of {path} to {target}; starting afresh")
    return target


class Workdir:
    """One run's directory: config, metrics, TensorBoard, checkpoints, results and plots.

    Only process 0 writes files here (every process takes part in checkpointing). Opening a workdir:

    * refuses (`ConfigChangedError`, a `ConfigError`) when `config` differs from the `config.json` of an earlier
      run there, naming the keys, before anything in the workdir changes; `fresh=True` instead moves the old
      run aside (`set_aside`) and starts from step 0;
    * takes `DIR/workdir.lock` (pid, host, start time, command) for as long as this object lives, released at
      exit, on errors and on signals; a second process refuses at once (`WorkdirLockedError`, naming the
      owner), a stale lock of a dead process is taken over with a warning. In a multi-host run process 0 holds
      it for all, and every process shares its verdict;
    * drops a torn last line of metrics.jsonl (a kill mid-write) with a warning.
    """

    def __init__(self, path: str, config=None, *, fresh: bool = False):
        self.path = os.path.abspath(path)
        self.is_main = is_main_process()
        self._tb = None
        self._purge_step: int | None = None
        self._lock: tuple[str, str] | None = None
        error = None
        if self.is_main:
            try:
                self._open(config, fresh)
            except (ConfigError, WorkdirError) as e:
                error = e
        _agree(error, f"the workdir {self.path}")

    def _open(self, config, fresh: bool) -> None:
        if fresh:
            set_aside(self.path)
        new = _config_json(config) if config is not None else None
        if new is not None and os.path.exists(self.file("config.json")):
            self._check_same_config(json.loads(new))
        os.makedirs(self.path, exist_ok=True)
        self.acquire()
        if new is not None and not os.path.exists(self.file("config.json")):
            _write_atomically(self.file("config.json"), new)
        self._drop_torn_metrics_line()

    def _check_same_config(self, new: dict) -> None:
        try:
            with open(self.file("config.json")) as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigChangedError(
                f"{self.file('config.json')} is unreadable ({_reason(e)}), so this rerun cannot be checked "
                "against it; start anew with --fresh (from Python: runtime.set_aside(workdir) first)"
            ) from e
        differences = config_differences(old, new)
        if differences:
            n = len(differences)
            shown = "; ".join(differences[:12]) + ("; ..." if n > 12 else "")
            raise ConfigChangedError(
                f"{self.path} holds a run with another config ({n} {'keys differ' if n > 1 else 'key differs'}: "
                f"{shown}). Rerun with that config, use another workdir, or start anew with --fresh (from "
                "Python: runtime.set_aside(workdir) first), which moves the old run aside"
            )

    def acquire(self) -> None:
        """Takes the workdir's lock if this object does not hold it (process 0; see the class docstring)."""
        if self.is_main and self._lock is None:
            self._lock = acquire_lock(self.path)
            self._finalizer = weakref.finalize(self, release_lock, *self._lock)

    def release(self) -> None:
        """Gives the workdir's lock back (also done when this object is garbage collected, and at exit)."""
        if self._lock is not None:
            self._finalizer()
            self._lock = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # --- results
    @property
    def finished(self) -> bool:
        """A run that wrote results.json is finished and is not redone."""
        return os.path.exists(self.file("results.json"))

    def write_results(self, results: Mapping[str, Any]) -> dict:
        results = _jsonable(dict(results))
        if self.is_main:
            _write_atomically(
                self.file("results.json"), json.dumps(results, indent=2, sort_keys=True)
            )
        return results

    def read_results(self) -> dict:
        with open(self.file("results.json")) as f:
            return json.load(f)

    # --- metrics
    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Appends one JSON line to metrics.jsonl and writes TensorBoard scalars.

        A failed write (a full disk) is undone, so the file keeps only whole lines, and raises `WorkdirError`.
        """
        if not self.is_main:
            return
        row = {"step": int(step), **{prefix + k: float(v) for k, v in metrics.items()}}
        path = self.file("metrics.jsonl")
        size = os.path.getsize(path) if os.path.exists(path) else 0
        try:
            with open(path, "a") as f:
                f.write(json.dumps(_jsonable(row)) + "\n")
        except OSError as e:
            os.truncate(path, size)
            raise WorkdirError(
                f"writing {path} failed ({_reason(e)}; {_free_space(path)} free there); its lines up to "
                f"step {step} are intact"
            ) from e
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.path, flush_secs=30, purge_step=self._purge_step)
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, int(step))

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.jsonl; an unreadable line (one torn by a kill) is skipped with a warning."""
        rows, bad = self._read_metric_lines()
        if bad:
            warn(f"skipped unreadable line(s) {bad} of {self.file('metrics.jsonl')}")
        return rows

    def _read_metric_lines(self) -> tuple[list[dict], list[int]]:
        if not os.path.exists(self.file("metrics.jsonl")):
            return [], []
        rows, bad = [], []
        with open(self.file("metrics.jsonl")) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if isinstance(row, dict) and isinstance(row.get("step"), int):
                    rows.append(row)
                else:
                    bad.append(number)
        return rows, bad

    def _drop_torn_metrics_line(self) -> None:
        """Cuts a last line without its newline (its write was cut short by a kill) off metrics.jsonl."""
        path = self.file("metrics.jsonl")
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
        keep = data.rfind(b"\n") + 1
        warn(
            f"dropped the torn last line of {path} ({data[keep:][:60]!r}...): its write was cut short"
        )
        os.truncate(path, keep)

    def truncate_metrics(self, after_step: int) -> None:
        """Drops metric rows past `after_step` (written before a kill, after the last checkpoint) and torn lines.

        The file is rewritten atomically; TensorBoard is told to hide the events past `after_step` as well.
        """
        if not self.is_main:
            return
        self._purge_step = after_step + 1
        if not os.path.exists(self.file("metrics.jsonl")):
            return
        rows, bad = self._read_metric_lines()
        kept = [r for r in rows if r["step"] <= after_step]
        if bad:
            warn(f"dropped unreadable line(s) {bad} of {self.file('metrics.jsonl')}")
        if bad or len(kept) < len(rows):
            _write_atomically(
                self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept)
            )

    # --- plots
    def savefig(self, fig, name: str) -> str:
        """Writes a `matplotlib.figure.Figure` as `name`.png (process 0 only); returns the path.

        Plots are drawn on `Figure(...)` objects, never through pyplot, so nothing global is touched (a
        notebook's backend stays as it is) and nothing needs closing.
        """
        path = self.file(name if name.endswith(".png") else name + ".png")
        if self.is_main:
            fig.savefig(path, dpi=150, bbox_inches="tight")
        return path

    def checkpointer(self, every_steps: int, max_to_keep: int = 2) -> Checkpointer:
        return Checkpointer(self.file("checkpoints"), every_steps, max_to_keep)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ----------------------------------------------------------------------------------------- checkpoint


def fingerprint(state) -> dict[str, int]:
    """The CRC-32 of the bytes of each array of `state` that this process holds whole, keyed by pytree path.

    Written with every checkpoint and compared on restore, so a checkpoint whose bytes changed on disk is caught
    even where the storage format has no checksum of its own (altered bytes inside orbax's zstd chunks load
    without an error). Arrays sharded over processes (none here: parameters are replicated) are left out; a
    replicated array is read from this process's copy.
    About 2.5 GB/s on one CPU core.

    >>> fingerprint({"w": jnp.zeros(3)}) == fingerprint({"w": jnp.zeros(3).at[1].set(1e-30)})
    False
    """
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        if isinstance(x, jax.Array):
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            if not x.is_fully_addressable:
                if not x.is_fully_replicated:
                    continue
                x = x.addressable_data(0)  # this process's whole copy
        elif not isinstance(x, np.ndarray | np.generic):
            continue
        data = np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
        out[jax.tree_util.keystr(path)] = zlib.crc32(data)
    return out


class _HeldErrors(logging.Filter):
    """Holds back the ERROR log records of one library (`with` scope) and lets them through afterwards, unless
    an exception ends the scope: then the error raised says it all, in one line."""

    def __init__(self, library: str):
        super().__init__()
        self._library = f"{os.sep}{library}{os.sep}"
        self._held: list[logging.LogRecord] = []
        self._logger = logging.getLogger("absl")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and self._library in record.pathname:
            self._held.append(record)
            return False
        return True

    def __enter__(self):
        self._logger.addFilter(self)

    def __exit__(self, kind, value, traceback) -> None:
        self._logger.removeFilter(self)
        if kind is None:
            for record in self._held:
                self._logger.handle(record)


class Checkpointer:
    """Orbax checkpoints of a state pytree, written atomically (a killed save leaves no loadable debris).

    `restore(target)` returns `(state, step)`: the newest checkpoint that loads, restored into `target`'s
    structure, dtypes and shardings, or `(target, 0)` when there is none. A newer one that does not load (an
    error, or bytes that no longer match the checksums saved with them) is named with the reason in one line
    and renamed `<step>.corrupt-<time>` (never deleted); when none loads, `CheckpointError` names the directory.
    A failed save (a full disk) raises `CheckpointError` with the path and the space needed, after removing its
    partial files; the checkpoints before it are untouched.
    """

    FINGERPRINT_KEY = "theorax_fingerprint"

    def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        self.every_steps = max(int(every_steps), 1)
        self._ocp = ocp
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=self._options)

    def _reopen(self) -> None:
        """A fresh manager: a failed restore can leave orbax's one misjudging the next checkpoint's layout."""
        self._manager.close()
        self._manager = self._ocp.CheckpointManager(self.directory, options=self._options)

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target, step: int | None = None):
        steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            return target, 0
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target)
        failed: list[tuple[int, str]] = []
        for s in map(int, steps):
            state, reason = self._try(self._restore, s, abstract)
            if _every_process(reason is None):  # every process goes on with the same step, or none
                _, reason = self._try(self._check, s, state)
                if _every_process(reason is None):
                    self._set_aside(failed, resumed_from=s)
                    return state, s
            failed.append((s, reason or "it failed to load on another process"))
            self._reopen()
        listing = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise CheckpointError(
            f"no checkpoint in {self.directory} loads ({listing}). They are left as they are; to start from "
            f"step 0, move {self.directory} aside (or rerun with --fresh, which moves the whole workdir)"
        )

    @staticmethod
    def _try(fn, *args):
        try:
            return fn(*args), None
        except Exception as e:  # every way a checkpoint can fail to load
            return None, _reason(e)

    def _restore(self, step: int, abstract):
        return self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))

    def _check(self, step: int, state) -> None:
        """Compares the restored arrays with the checksums saved with them (absent before they were saved)."""
        expected = (self._manager.metadata(step).custom_metadata or {}).get(self.FINGERPRINT_KEY)
        if expected is None:
            return
        actual = fingerprint(state)
        changed = [k for k in sorted(expected) if actual.get(k) != expected[k]]
        if changed:
            raise CheckpointError(
                f"the bytes of {', '.join(changed[:3])} no longer match the checksums saved with them"
            )

    def _set_aside(self, failed: list[tuple[int, str]], resumed_from: int) -> None:
        """Renames the checkpoints that failed to load to `<step>.corrupt-<time>`, each named with its reason."""
        if not failed:
            return
        if is_main_process():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step, reason in failed:
                source = os.path.join(self.directory, str(step))
                target = f"{source}.corrupt-{stamp}"
                try:
                    os.rename(source, target)
                except OSError as e:
                    raise CheckpointError(
                        f"checkpoint step {step} in {self.directory} does not load ({reason}), and renaming it "
                        f"aside failed ({_reason(e)}); move it away by hand and rerun"
                    ) from e
                warn(
                    f"checkpoint step {step} in {self.directory} does not load ({reason}); renamed it "
                    f"{os.path.basename(target)} and resuming from step {resumed_from}"
                )
        _barrier("theorax_checkpoints_set_aside")
        self._manager.reload()

    def save(self, step: int, state) -> None:
        previous = self.latest_step
        # orbax logs a failed write from each of its threads, with tracebacks; the error raised here says it all
        held = _HeldErrors("orbax")
        try:
            with held:
                self._manager.save(
                    int(step),
                    args=self._ocp.args.StandardSave(state),
                    force=True,
                    custom_metadata={self.FINGERPRINT_KEY: fingerprint(state)},
                )
                self._manager.wait_until_finished()
        except Exception as e:
            self._remove_partial(int(step))
            nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
            kept = (
                f"The checkpoint of step {previous} and metrics.jsonl are intact: free some space (or "
                f"move the workdir) and rerun the same command to resume from step {previous}"
                if previous is not None
                else "There is no earlier checkpoint: a rerun starts from step 0"
            )
            raise CheckpointError(
                f"saving the checkpoint of step {step} to {self.directory} failed ({_reason(e)}). A checkpoint of "
                f"this state needs about {_size(nbytes)} (its arrays, before compression; older ones are deleted "
                f"only once it is committed), and {_free_space(self.directory)} are free there. {kept}"
            ) from e

    def _remove_partial(self, step: int) -> None:
        """Deletes what a failed save of `step` left (orbax's temporary directory), freeing its space.

        orbax's other writer threads can still be adding files to it when the first one's error reaches us, so
        the removal is retried until the directory is gone (for at most about 2 s)."""
        if not is_main_process() or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                path = os.path.join(self.directory, name)
                for _ in range(20):
                    shutil.rmtree(path, ignore_errors=True)
                    if not os.path.exists(path):
                        break
                    time.sleep(0.1)

    def close(self) -> None:
        self._manager.close()


# ----------------------------------------------------------------------------------------- preemption


class _StopSignals:
    """SIGTERM and SIGINT as a request to stop after the step in flight, at a step every process agrees on.

    A handler (installed from the main thread for the duration of the loop) records the first signal and
    ignores the ones after it, so that a scheduler or launcher that signals twice (to the process and to its
    parent, say) does not cut the save short; SIGKILL (or Ctrl-\\ in a terminal) stops at once. One process
    stops after the step in flight. Several processes agree through a small collective: after each step, the maximum over
    processes of "a signal arrived here" is dispatched asynchronously and read one step later, when that step
    has finished anyway (its metrics are read then), so every process sees the same verdict after the same
    step at no extra synchronisation, and all save that step together.

    (JAX's own preemption service, `multihost_utils.reached_preemption_sync_point`, works with the CPU/gloo
    set-up too, but watches SIGTERM alone, loses a notice that arrives before a resumed run's first call, and
    shares its step counter with orbax's own calls inside `CheckpointManager.save`; the entry point and this
    handler replace its C-level SIGTERM handler.)
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._verdict = None  # the agreement dispatched after the previous step (several processes)
        self._multihost = jax.process_count() > 1
        if self._multihost:
            mesh = data_mesh()
            self._sharding = batch_sharding(mesh)
            self._any = jax.jit(jnp.max, out_shardings=replicated(mesh))

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Whether every process stops after the step just dispatched (called once per step on each)."""
        if not self._multihost:
            return self.received is not None
        flag = np.full(jax.local_device_count(), self.received is not None, np.int32)
        verdict = self._any(jax.make_array_from_process_local_data(self._sharding, flag))
        previous, self._verdict = self._verdict, verdict
        return previous is not None and bool(previous)

    def stop_at_end(self) -> bool:
        """Whether a stop was asked for by the end of the loop (the last verdict, on every process)."""
        if not self._multihost:
            return self.received is not None
        return self._verdict is not None and bool(self._verdict)

    def preempted(self, step: int, num_steps: int, directory: str) -> Preempted:
        cause = self.received or "a signal to another process of this run"
        return Preempted(
            f"stopped by {cause}: saved the checkpoint of step {step} of {num_steps} in {directory}; "
            "rerun the same command to continue from there",
            signal_name=self.received,
            step=step,
        )

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


# ------------------------------------------------------------------------------------------ the loop


def _finite(metrics: Mapping[str, float], keys) -> bool:
    return all(math.isfinite(float(metrics[k])) for k in keys if k in metrics)


def train(
    workdir: Workdir,
    state,
    step_fn: Callable[[Any, int], tuple[Any, Mapping[str, jax.Array]]],
    *,
    num_steps: int,
    checkpoint_every: int,
    log_every: int = 10,
    desc: str = "train",
    finite_keys=("loss",),
    on_checkpoint: Callable[[int, Any], Mapping[str, float] | None] | None = None,
):
    """Runs `state, metrics = step_fn(state, step)` for step = start .. num_steps - 1, resumably.

    Resumes from the newest checkpoint that loads (see `Checkpointer.restore`), after dropping the rows of
    metrics.jsonl past it. SIGTERM or SIGINT during the loop stops it after the step in flight: that step's
    metrics are checked and logged, its checkpoint saved (every process of a multi-host run stops at the same
    step), and `Preempted` is raised; the entry point prints one line and exits with status 75, and rerunning
    the same command continues from that step with no step lost. Signals after the first are ignored until
    then (SIGKILL stops at once).

    Args:
      workdir: the run's `Workdir`; checkpoints go to `workdir/checkpoints`.
      state: the initial state pytree (also the restore target: structure, dtypes, shardings).
      step_fn: one training step; must be a pure function of (state, step) for resumption to be exact
        (data order and randomness derived from `step`), and should donate `state`.
      num_steps: total number of steps of the run.
      checkpoint_every: save every this many steps and at the end.
      log_every: write metrics.jsonl / TensorBoard every this many steps: each metric's mean over the
        steps since the last write, and the steps per second.
      finite_keys: metrics that must stay finite; a non-finite one raises `NonFiniteError` and nothing
        after the last good checkpoint is saved.
      on_checkpoint: optional `(step, state) -> metrics` run at each periodic checkpoint (an evaluation, say);
        its metrics are logged with the prefix `eval/`. Not run at a checkpoint saved to stop on a signal.

    Returns:
      The final state.

    Raises:
      Preempted: on SIGTERM / SIGINT, after saving the checkpoint of the step it stopped at.
      NonFiniteError: on a non-finite `finite_keys` metric.
      CheckpointError: when no checkpoint loads, or a save fails (a full disk); the message names the path.
    """
    workdir.acquire()
    ckpt = workdir.checkpointer(checkpoint_every)
    stop = _StopSignals()
    stop.install()
    bar = _Quiet()
    pending: tuple[int, Mapping[str, jax.Array]] | None = None
    t_last, n_last = time.perf_counter(), 0
    window: dict[str, float] = {}
    window_steps = 0

    def emit(step: int, metrics, flush: bool = False) -> None:
        """Checks one step's metrics; every `log_every` steps (and when `flush`) logs the window's means."""
        nonlocal t_last, n_last, window_steps
        host = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        if not _finite(host, finite_keys):
            raise NonFiniteError(
                f"non-finite {finite_keys} at step {step}: {host}. Training stopped; the last good "
                f"checkpoint (step {ckpt.latest_step}) in {ckpt.directory} is kept. "
                "Lower the learning rate or enable gradient clipping."
            )
        for k, v in host.items():
            window[k] = window.get(k, 0.0) + v
        window_steps += 1
        if step % log_every == 0 or step == num_steps or flush:
            now = time.perf_counter()
            means = {k: v / window_steps for k, v in window.items()}
            means["steps_per_sec"] = (step - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, step
            window.clear()
            window_steps = 0
            workdir.log(step, means)
            bar.set_postfix(format_metrics(means), refresh=False)

    try:
        state, start = ckpt.restore(state)
        workdir.truncate_metrics(after_step=start)
        t_last, n_last = time.perf_counter(), start
        bar = progress(num_steps, desc=desc, initial=start)
        for step in range(start, num_steps):
            state, metrics = step_fn(state, step)
            # Asked before the previous step's metrics are read, so a multi-host verdict costs no wait.
            stopping = stop.should_stop()
            if pending is not None:
                emit(*pending)  # the previous step's metrics: the device is one step ahead
            pending = (step + 1, metrics)
            bar.update(1)
            due = (step + 1) % ckpt.every_steps == 0 or step + 1 == num_steps
            if due or stopping:
                emit(*pending, flush=stopping)
                pending = None
                ckpt.save(step + 1, state)
                if stopping:
                    raise stop.preempted(step + 1, num_steps, ckpt.directory)
                if on_checkpoint is not None:
                    extra = on_checkpoint(step + 1, state)
                    if extra:
                        workdir.log(step + 1, extra, prefix="eval/")
        if pending is not None:
            emit(*pending)
        if stop.stop_at_end():  # a signal in the last step or save: training is done; stop anyway
            raise stop.preempted(max(num_steps, start), num_steps, ckpt.directory)
    except BaseException:
        workdir.release()  # the run ends here: another process may take the workdir now
        raise
    finally:
        stop.uninstall()
        bar.close()
        ckpt.close()
    return state


# --------------------------------------------------------------------------------------- entry point

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def cpu_compiler_options(options: Mapping[str, Any]) -> dict | None:
    """`options` (XLA compiler options for `jax.jit(..., compiler_options=...)`) when JAX runs on the CPU backend
    and this jaxlib knows them; None otherwise (other backends, or an XLA without them keeps its defaults).

    The experiments' hardware tuning (`scaled_mlp.cpu_tuning`, `distribution_transformer.cpu_tuning`) goes
    through here, so that a tuning for XLA:CPU is never passed to another backend.
    """
    if jax.default_backend() != "cpu":
        return None
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    except Exception:  # an XLA without the option
        return None
    return dict(options)


def use_huge_pages() -> None:
    """Re-executes this process once (same pid, same command line) with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

    XLA's CPU runtime frees and reallocates its large temporaries on every call; glibc serves those from fresh
    `mmap`s, so each step page-faults all of them again in 4 KiB pages. On the B-6/Wi-512 training step that was
    24,600 faults and ~60 ms of kernel time per 170 ms step; with malloc advising transparent huge pages it is
    ~480 faults and the step took ~25% less (`experiments/bench_scaled_mlp.py` records the faults per step). The tunable has to be set before
    the process starts, hence the re-exec; call this first thing in `__main__`. A no-op off glibc Linux, when the
    tunable is already set (the Makefile exports it), or with `THEORAX_SYSTEM_MALLOC=1`.
    """
    import platform

    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or "glibc.malloc.hugetlb" in tunables
        or os.environ.get("THEORAX_SYSTEM_MALLOC")
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE])))
    os.execve(sys.executable, sys.orig_argv, env)


def _stop_outside_the_loop(signum, frame) -> None:
    """The entry point's SIGTERM handler outside `train`: unwinds (releasing the workdir) as Ctrl-C does.

    Once: a second SIGTERM must not cut the unwinding short.
    """
    signal.signal(signum, signal.SIG_IGN)
    raise Preempted(
        f"stopped by {signal.Signals(signum).name} outside the training loop (its checkpoints are kept): "
        "rerun the same command to continue",
        signal_name=signal.Signals(signum).name,
    )


@contextlib.contextmanager
def exit_status_on_errors():
    """Turns the runtime's errors into one line on stderr and the exit status `main` documents (2 or 75)."""
    try:
        yield
    except (ConfigError, NonFiniteError, WorkdirError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        print(
            "stopped by SIGINT outside the training loop (its checkpoints are kept): rerun the same "
            "command to continue",
            file=sys.stderr,
        )
        sys.exit(EXIT_PREEMPTED)


def main(run: Callable[[Any, str], Mapping[str, Any]]) -> None:
    """The absl entry point of `experiments/<system>.py`: flags, multi-host start-up, clear errors.

    Exit status: 0 when the run finished; 2 (`EXIT_ERROR`) with one `error: ...` line on a bad command line or
    config, a config that differs from the workdir's, a non-finite loss, a workdir held by another run, no
    checkpoint that loads or a failed write; 75 (`EXIT_PREEMPTED`) with one line when SIGTERM or SIGINT stopped
    it, after saving a checkpoint when it came during training: rerunning the same command continues.
    """
    use_huge_pages()
    from absl import app, flags, logging
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config file and preset: configs/<system>.py:<preset>.", lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Run directory (created; a rerun resumes it).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
    flags.DEFINE_bool(
        "fresh",
        False,
        "Move an earlier run in --workdir aside (to WORKDIR.old-<time>) and start anew.",
    )
    flags.mark_flags_as_required(["config", "workdir"])
    FLAGS = flags.FLAGS

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _stop_outside_the_loop)
        with exit_status_on_errors():
            if FLAGS.fresh:
                error = None
                if is_main_process():
                    try:
                        set_aside(FLAGS.workdir)
                    except WorkdirError as e:
                        error = e
                _agree(error, f"to move {FLAGS.workdir} aside")
            results = run(FLAGS.config, FLAGS.workdir)
        if is_main_process() and results is not None:
            print(json.dumps(_jsonable(dict(results)), indent=1, sort_keys=True)[:4000])

    def _parse(argv):
        try:
            return FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
            lines = [
                line.strip() for line in str(e).replace("\\n", "\n").splitlines() if line.strip()
            ]
            message = lines[-1] if any("Traceback" in line for line in lines) else " ".join(lines)
            if len(message) > 1 and message[0] == message[-1] == "'":
                message = message[1:-1]
            message = message.replace("\\'", "'")
            print(f"error: bad command line: {message}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, flags_parser=_parse)
