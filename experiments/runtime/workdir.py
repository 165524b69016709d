"""The workdir: config.json, metrics, TensorBoard events, results and plots, held by one run at a time."""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import sys
import time
import weakref
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from theorax.experiments.runtime.checkpoint import Checkpointer
from theorax.experiments.runtime.errors import (
    ConfigChangedError,
    ConfigError,
    WorkdirError,
    WorkdirLockedError,
    _free_space,
    _reason,
    warn,
)
from theorax.experiments.runtime.processes import _agree, is_main_process


def jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def config_to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _config_json(config) -> str:
    return json.dumps(jsonable(config_to_dict(config)), indent=2, sort_keys=True)


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
        results = jsonable(dict(results))
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
                f.write(json.dumps(jsonable(row)) + "\n")
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
