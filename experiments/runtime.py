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
  requires).
* `train(...)`: the one training loop: resume from the newest checkpoint, a progress bar with ETA and the latest
  metrics, metrics read one step behind, periodic checkpoints, and a stop with `NonFiniteError` on a non-finite
  loss that never overwrites the last good checkpoint.
* Sharding helpers: a 1-D `data` mesh over every device of every process, the batch / replicated shardings, and
  `global_batch` (process-local numpy -> global `jax.Array` via `make_array_from_process_local_data`).
* Multi-host start-up: `jax.distributed.initialize` from flags (`--coordinator_address`, `--num_processes`,
  `--process_id`) or, with none given, from a cluster environment that JAX detects itself (SLURM, ...).
* `ConfigError`: bad config values; the entry point prints it as one line and exits with status 2.
* `use_huge_pages()`: every entry point re-executes itself once with glibc's malloc backing its large buffers by
  transparent huge pages (see its docstring; `THEORAX_SYSTEM_MALLOC=1` opts out).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

# --------------------------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A config value is wrong. The message names the key, the value, what was expected and the fix."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition` holds (plain Python, before any compilation)."""
    if not condition:
        raise ConfigError(message)


def check_choice(key: str, value: Any, choices) -> None:
    """Raises a `ConfigError` naming `key` unless `value` is one of `choices`."""
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {sorted(choices)}")


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
    `THEORAX_PROCESS_ID` are read, and inside a multi-task SLURM job JAX's own auto-detection is used.
    On the CPU the collectives go through gloo.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("THEORAX_COORDINATOR")
    if num_processes is None and "THEORAX_NUM_PROCESSES" in env:
        num_processes = int(env["THEORAX_NUM_PROCESSES"])
    if process_id is None and "THEORAX_PROCESS_ID" in env:
        process_id = int(env["THEORAX_PROCESS_ID"])
    if coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


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


class Workdir:
    """One run's directory: config, metrics, TensorBoard, checkpoints, results and plots.

    Only process 0 writes files here (every process takes part in checkpointing).
    """

    def __init__(self, path: str, config=None):
        self.path = os.path.abspath(path)
        self.is_main = is_main_process()
        self._tb = None
        if self.is_main:
            os.makedirs(self.path, exist_ok=True)
            if config is not None:
                with open(self.file("config.json"), "w") as f:
                    json.dump(_jsonable(config_to_dict(config)), f, indent=2, sort_keys=True)

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
            tmp = self.file("results.json.tmp")
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2, sort_keys=True)
            os.replace(tmp, self.file("results.json"))
        return results

    def read_results(self) -> dict:
        with open(self.file("results.json")) as f:
            return json.load(f)

    # --- metrics
    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """Appends one JSON line to metrics.jsonl and writes TensorBoard scalars."""
        if not self.is_main:
            return
        row = {"step": int(step), **{prefix + k: float(v) for k, v in metrics.items()}}
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(_jsonable(row)) + "\n")
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.path, flush_secs=30)
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, int(step))

    def read_metrics(self) -> list[dict]:
        if not os.path.exists(self.file("metrics.jsonl")):
            return []
        with open(self.file("metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """Drops metric rows past `after_step` (written before a kill, after the last checkpoint)."""
        if not self.is_main or not os.path.exists(self.file("metrics.jsonl")):
            return
        rows = [r for r in self.read_metrics() if r["step"] <= after_step]
        with open(self.file("metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

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


class Checkpointer:
    """Orbax checkpoints of a state pytree, written atomically (a killed save leaves no loadable debris).

    `restore(target)` returns `(state, step)`: the newest checkpoint restored into `target`'s structure,
    dtypes and shardings, or `(target, 0)` when there is none.
    """

    def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.every_steps = max(int(every_steps), 1)
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=False,
            ),
        )

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, target, step: int | None = None):
        step = self.latest_step if step is None else step
        if step is None:
            return target, 0
        abstract = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, target)
        state = self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        return state, int(step)

    def save(self, step: int, state) -> None:
        self._manager.save(int(step), args=self._ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


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
      on_checkpoint: optional `(step, state) -> metrics` run at each checkpoint (an evaluation, say); its
        metrics are logged with the prefix `eval/`.

    Returns:
      The final state.
    """
    ckpt = workdir.checkpointer(checkpoint_every)
    state, start = ckpt.restore(state)
    if start:
        workdir.truncate_metrics(after_step=start)
    bar = progress(num_steps, desc=desc, initial=start)
    pending: tuple[int, Mapping[str, jax.Array]] | None = None
    t_last, n_last = time.perf_counter(), start

    window: dict[str, float] = {}
    window_steps = 0

    def emit(step: int, metrics) -> None:
        """Checks one step's metrics; every `log_every` steps logs their means over the window."""
        nonlocal t_last, n_last, window_steps
        host = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        if not _finite(host, finite_keys):
            bar.close()
            raise NonFiniteError(
                f"non-finite {finite_keys} at step {step}: {host}. Training stopped; the last good "
                f"checkpoint (step {ckpt.latest_step}) in {workdir.file('checkpoints')} is kept. "
                "Lower the learning rate or enable gradient clipping."
            )
        for k, v in host.items():
            window[k] = window.get(k, 0.0) + v
        window_steps += 1
        if step % log_every == 0 or step == num_steps:
            now = time.perf_counter()
            means = {k: v / window_steps for k, v in window.items()}
            means["steps_per_sec"] = (step - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, step
            window.clear()
            window_steps = 0
            workdir.log(step, means)
            bar.set_postfix(format_metrics(means), refresh=False)

    try:
        for step in range(start, num_steps):
            state, metrics = step_fn(state, step)
            if pending is not None:
                emit(*pending)  # the previous step's metrics: the device is one step ahead
            pending = (step + 1, metrics)
            bar.update(1)
            if (step + 1) % ckpt.every_steps == 0 or step + 1 == num_steps:
                emit(*pending)
                pending = None
                ckpt.save(step + 1, state)
                if on_checkpoint is not None:
                    extra = on_checkpoint(step + 1, state)
                    if extra:
                        workdir.log(step + 1, extra, prefix="eval/")
        if pending is not None:
            emit(*pending)
    finally:
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


def main(run: Callable[[Any, str], Mapping[str, Any]]) -> None:
    """The absl entry point of `experiments/<system>.py`: flags, multi-host start-up, clear errors."""
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
    flags.mark_flags_as_required(["config", "workdir"])
    FLAGS = flags.FLAGS

    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        try:
            results = run(FLAGS.config, FLAGS.workdir)
        except (ConfigError, NonFiniteError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
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
