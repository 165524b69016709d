"""The experiment runtime that every system's entry point shares.

An entry point is a module `experiments/<system>.py` with

    def run(config: ml_collections.ConfigDict, workdir: str) -> dict: ...   # returns results.json
    def report(results: dict, workdir: str) -> str: ...                     # markdown for the demo
    if __name__ == "__main__":
        runtime.main(run)

and is launched as

    python -m theorax.experiments.<system> --config=configs/<system>.py:<preset> --workdir=DIR [--config.key=value]

What this package gives such a `run` (one module per part, every name re-exported here):

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
* `tune_process()`: every entry point re-executes itself once with glibc's malloc backing its large buffers by
  transparent huge pages (and, for the scaled-MLP entry points, keeping freed memory for the next call;
  `THEORAX_SYSTEM_MALLOC=1` opts out) and OpenBLAS on one thread (XLA's worker threads
  make its LAPACK calls), unless the environment already says otherwise (see its docstring).

Faults, and what survives them (README, "Running experiments", has the table): a SIGKILL loses the steps since the
newest checkpoint; SIGTERM / SIGINT lose none; a newest checkpoint that does not load is renamed
`<step>.corrupt-<time>` and the run resumes from the one before; a failed save (a full disk) stops the run with
the path and the space needed, leaving the previous checkpoint and metrics.jsonl as they were; a torn last line of
metrics.jsonl is dropped on resume, and lines past the restored step are removed.
"""

from theorax.experiments.runtime.checkpoint import (
    Checkpointer,
    fingerprint,
)
from theorax.experiments.runtime.entry import (
    EXIT_ERROR,
    EXIT_PREEMPTED,
    HUGE_PAGES_TUNABLE,
    MEMORY_REUSE_TUNABLES,
    cpu_compiler_options,
    exit_status_on_errors,
    main,
    tune_process,
)
from theorax.experiments.runtime.errors import (
    CheckpointError,
    ConfigChangedError,
    ConfigError,
    NonFiniteError,
    Preempted,
    WorkdirError,
    WorkdirLockedError,
    check,
    check_choice,
    warn,
)
from theorax.experiments.runtime.loop import (
    train,
)
from theorax.experiments.runtime.memory import (
    DeviceMemoryError,
    compile_within_memory,
    device_memory,
    format_bytes,
    program_memory,
)
from theorax.experiments.runtime.processes import (
    initialize_distributed,
    is_main_process,
)
from theorax.experiments.runtime.progress import (
    format_metrics,
    progress,
)
from theorax.experiments.runtime.sharding import (
    batch_sharding,
    data_mesh,
    global_batch,
    local_batch_size,
    replicated,
)
from theorax.experiments.runtime.workdir import (
    LOCK_NAME,
    Workdir,
    acquire_lock,
    config_differences,
    config_to_dict,
    jsonable,
    release_lock,
    set_aside,
)

__all__ = [
    "CheckpointError",
    "ConfigChangedError",
    "ConfigError",
    "NonFiniteError",
    "Preempted",
    "WorkdirError",
    "WorkdirLockedError",
    "check",
    "check_choice",
    "warn",
    "initialize_distributed",
    "is_main_process",
    "batch_sharding",
    "data_mesh",
    "global_batch",
    "local_batch_size",
    "replicated",
    "DeviceMemoryError",
    "compile_within_memory",
    "device_memory",
    "format_bytes",
    "program_memory",
    "format_metrics",
    "progress",
    "LOCK_NAME",
    "Workdir",
    "acquire_lock",
    "config_differences",
    "config_to_dict",
    "jsonable",
    "release_lock",
    "set_aside",
    "Checkpointer",
    "fingerprint",
    "train",
    "EXIT_ERROR",
    "EXIT_PREEMPTED",
    "HUGE_PAGES_TUNABLE",
    "MEMORY_REUSE_TUNABLES",
    "cpu_compiler_options",
    "exit_status_on_errors",
    "main",
    "tune_process",
]
