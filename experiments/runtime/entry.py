"""The entry point: `main(run)`, its exit statuses, huge pages and per-program compiler options."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
from theorax.experiments.runtime.errors import ConfigError, NonFiniteError, Preempted, WorkdirError
from theorax.experiments.runtime.processes import _agree, initialize_distributed, is_main_process
from theorax.experiments.runtime.workdir import jsonable, set_aside

# Exit statuses of the entry points. 2: the run stopped on an error its one-line message names (config,
# non-finite loss, workdir). 75 (sysexits' EX_TEMPFAIL): stopped by SIGTERM / SIGINT, rerun to continue.
EXIT_ERROR = 2
EXIT_PREEMPTED = 75


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# glibc malloc keeping what XLA frees for the next call (see `tune_process`): one arena, no mmap'd chunks, no trimming.
MEMORY_REUSE_TUNABLES = (
    "glibc.malloc.arena_max=1",
    "glibc.malloc.mmap_max=0",
    "glibc.malloc.trim_threshold=1099511627776",
)


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


def tune_process(reuse_memory: bool = False) -> None:
    """Re-executes this process once (same pid, same command line) with what two libraries read when they load.

    * `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`. XLA's CPU runtime allocates its temporaries for every call (one
      block of 60 MB per B-6/Wi-512 training step) and frees them after it; glibc serves a block that large from
      a fresh `mmap`, so each step page-faulted all of it again in 4 KiB pages: 24,600 faults and ~60 ms of
      kernel time per 170 ms step (Xeon VM). With malloc advising transparent huge pages it is ~480 faults, the
      step took ~25% less, and on the Zen 5 VM 13.7 ms of kernel time per ~70 ms step remained.
      With `reuse_memory`, also `MEMORY_REUSE_TUNABLES`: malloc keeps what is freed (one arena, no mmap'd chunks,
      a 1 TiB trim threshold), so the next call reuses the same memory with no fault at all (0 faults, 0.8 ms of
      kernel time per step). It matters most on a VM whose freed memory goes back to the host (virtio-balloon
      free-page reporting), where touching a fresh page costs far more: a jitted `a * 0.5 + b` over 64 MB arrays
      took 6.4-14 ms (median ~9) with outliers of 28-76 ms about one call in three, and 4.6-5.9 ms with reuse once
      its first two calls had grown the heap; in three paired runs the scaled-MLP step's median over its matmul
      floor's went from 1.41 / 1.53 / 1.41x to 1.28 / 1.25 / 1.38x (2026-12-04, Zen 5 VM, loads 0.21-0.24).
      The price: the heap never shrinks below its peak, and the one arena's lock made the sparse-DKM epoch (many
      small allocations from XLA's threads) ~10% slower, so only the scaled-MLP entry points ask for it.
      `THEORAX_SYSTEM_MALLOC=1` opts out of both.
    * `OPENBLAS_NUM_THREADS=1`. XLA:CPU runs its LAPACK calls (Cholesky factors, triangular solves,
      eigendecompositions: scipy's OpenBLAS) on its own worker threads, which already keep every core busy;
      OpenBLAS's threads on top of them oversubscribe the cores. The sparse-DKM epoch of `bench_dkm` (N = 8,000,
      float64, 2 cores) took 233 / 241 ms (min / median) against 382 / 483 ms with OpenBLAS limited to one
      thread at run time by threadpoolctl (which does not reach the calls XLA's threads make) and 445 / 506 ms
      with OpenBLAS's default of a thread per core. The price: a large factorisation that has the cores to
      itself runs on one: the exact GP's marginal likelihood and gradient at N = 1,000 / 4,000 took 99.9 ms /
      3.87 s against 91.4 ms / 3.10 s with two threads.

    Both must be set before the process starts, hence the re-exec; call this first thing in `__main__`. A value
    the environment already has is kept (each of our tunables that it does not name is added; the Makefile
    exports both), and off glibc Linux only OpenBLAS's is set.
    """
    import platform

    env = dict(os.environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    named = {t.split("=")[0] for t in tunables.split(":")}
    ours = [HUGE_PAGES_TUNABLE, *(MEMORY_REUSE_TUNABLES if reuse_memory else ())]
    missing = [t for t in ours if t.split("=")[0] not in named]
    if (
        sys.platform == "linux"
        and platform.libc_ver()[0] == "glibc"
        and missing
        and not env.get("THEORAX_SYSTEM_MALLOC")
    ):
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *missing]))
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if env != dict(os.environ):
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


def main(run: Callable[[Any, str], Mapping[str, Any]], reuse_memory: bool = False) -> None:
    """The absl entry point of `experiments/<system>.py`: flags, multi-host start-up, clear errors.

    Exit status: 0 when the run finished; 2 (`EXIT_ERROR`) with one `error: ...` line on a bad command line or
    config, a config that differs from the workdir's, a non-finite loss, a workdir held by another run, no
    checkpoint that loads or a failed write; 75 (`EXIT_PREEMPTED`) with one line when SIGTERM or SIGINT stopped
    it, after saving a checkpoint when it came during training: rerunning the same command continues.
    `reuse_memory`: `tune_process`'s.
    """
    tune_process(reuse_memory)
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
            print(json.dumps(jsonable(dict(results)), indent=1, sort_keys=True)[:4000])

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
