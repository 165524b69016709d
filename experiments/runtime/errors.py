"""The runtime's errors (each printed as one line by the entry point) and its small checks."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax


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
    if jax.process_index() == 0:
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
