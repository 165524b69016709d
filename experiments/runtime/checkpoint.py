"""Orbax checkpoints of a training state, with fingerprints and the errors that name what failed."""

from __future__ import annotations

import logging
import os
import shutil
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from theorax.experiments.runtime.errors import CheckpointError, _free_space, _reason, _size, warn
from theorax.experiments.runtime.processes import _barrier, _every_process, is_main_process


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

    def _remove_partial(self, step: int, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
        """Deletes what a failed save of `step` left (orbax's temporary directory), freeing its space.

        When the first write fails, orbax's and TensorStore's other writes are still running, and a late one
        recreates the directory it writes into. So the directory is removed again whenever it reappears, until
        it has stayed absent for `quiet_s` seconds (for at most `limit_s`; a fresh manager deletes any debris
        left after that when the workdir is next opened, as `cleanup_tmp_directories` asks)."""
        if not is_main_process() or not os.path.isdir(self.directory):
            return
        prefix = f"{step}.orbax-checkpoint-tmp"
        start = quiet_since = time.monotonic()
        while (now := time.monotonic()) - quiet_since < quiet_s and now - start < limit_s:
            partial = [n for n in os.listdir(self.directory) if n.startswith(prefix)]
            for name in partial:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            if partial:
                quiet_since = time.monotonic()
            time.sleep(0.05)

    def close(self) -> None:
        self._manager.close()
