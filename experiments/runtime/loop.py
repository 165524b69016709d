"""The one training loop: resume, progress, checkpoints, a stop on non-finite metrics or on SIGTERM / SIGINT."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from theorax.experiments.runtime.errors import NonFiniteError, Preempted
from theorax.experiments.runtime.progress import _Quiet, format_metrics, progress
from theorax.experiments.runtime.sharding import batch_sharding, data_mesh, replicated
from theorax.experiments.runtime.workdir import Workdir


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
