"""Multi-host start-up and the agreement of every process on a step's outcome."""

from __future__ import annotations

import os

import jax
import numpy as np
from theorax.experiments.runtime.errors import ConfigChangedError, ConfigError, WorkdirError


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
