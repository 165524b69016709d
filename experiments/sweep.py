r"""Runs every point of a config's `get_sweep()` and gathers their results into one table.

    python -m theorax.experiments.sweep --config=configs/scaled_mlp.py:cpu --workdir=results/sweep
    python -m theorax.experiments.sweep --config=configs/scaled_mlp.py:cpu --workdir=DIR --print_commands
    python -m theorax.experiments.sweep --config=configs/scaled_mlp.py:cpu --workdir=DIR --slurm_array=sweep.sbatch \
        --slurm_partition=gpu --slurm_gpus_per_node=1 --slurm_cpus_per_task=8 --slurm_mem=64G --slurm_time=04:00:00
    python -m theorax.experiments.sweep --config=... --workdir=DIR --slurm_array=sweep.sbatch \
        --slurm_nodes=2 --slurm_gpus_per_node=4          # each point on 2 nodes x 4 GPUs: 8 processes via srun
    python -m theorax.experiments.sweep --config=... --workdir=SHARED_DIR --print_commands \
        --tpu_name=my-v5p-64 --tpu_zone=us-east5-a       # one gcloud command per point, run on every worker

`get_sweep(arg)` (or `get_sweep()`) in the config file returns a list of override dicts, e.g.
`[{"model.width": 128, "seed": 0}, ...]`. Each point runs as its own process in `DIR/<point name>/` with the
overrides passed as `--config.key=value` flags, one after another; a finished point is skipped and an
interrupted one resumes, so rerunning the sweep is safe: SIGTERM or SIGINT to the sweep reaches the running point,
which saves its step, and the sweep stops with status 75 (`runtime.EXIT_PREEMPTED`). Afterwards every point's `results.json` is gathered into
`DIR/sweep.json` and `DIR/sweep.md`, and the system's `summarize_sweep(rows, workdir)` hook, if it has one (the
scaling-law fit of the scaled MLPs, say), runs over them. From Python the same is
`run_sweep(config_spec, workdir)`; the flags exist only when this module runs as a script.

On a cluster:

* `--slurm_array=PATH` writes an array job whose task i runs point i, with the resources of `SlurmResources`
  (the `--slurm_*` flags: partition, nodes, GPUs per node as `--gres=gpu:N` or `--gpus-per-task`, tasks per
  node, CPUs per task, memory, time limit, log files `DIR/logs/%x_%A_%a.{out,err}`, extra `#SBATCH` lines, a
  limit on the tasks running at once). A point of one task runs as a plain process of the batch script; a point
  of several tasks (several nodes, or several GPUs with one process each) is started by `srun`, one process per
  task, and `runtime.initialize_distributed` hands it to `jax.distributed.initialize()`, which reads the job
  step from SLURM's environment (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID, the node list). JAX gives each
  such process the GPU at SLURM_LOCALID, so the layout is one task per GPU, every task seeing its node's GPUs.
  Submit with `sbatch PATH`; afterwards `--gather_only` collects the table.
* `--print_commands --tpu_name=NAME --tpu_zone=ZONE` prints, per point, the one command a multi-host TPU VM
  runs on every worker (`gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="..."`), with
  `THEORAX_DISTRIBUTED=auto` so that every worker calls `jax.distributed.initialize()`, which finds the others
  from the TPU metadata. The checkout must exist on every worker (`--tpu_dir`) and the workdir must be storage
  every worker shares (process 0 writes the files, every process writes its checkpoint shards).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

from absl import app, flags
from theorax.experiments import runtime

FLAGS = flags.FLAGS


def load_sweep(config_spec: str) -> tuple[str, str, list[dict]]:
    """Returns (config path, system name, list of override dicts) for `path.py[:arg]`."""
    path, _, arg = config_spec.partition(":")
    if not os.path.exists(path):
        raise app.UsageError(f"--config={config_spec}: no file {path}")
    spec = importlib.util.spec_from_file_location("_sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise app.UsageError(f"{path} defines no get_sweep(); nothing to sweep")
    takes_arg = len(inspect.signature(module.get_sweep).parameters) > 0
    points = module.get_sweep(arg or None) if takes_arg else module.get_sweep()
    system = os.path.splitext(os.path.basename(path))[0]
    return path, system, [dict(p) for p in points]


def point_name(overrides: dict) -> str:
    name = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items())) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def point_command(config_spec: str, system: str, workdir: str, overrides: dict) -> list[str]:
    cmd = [sys.executable, "-m", f"theorax.experiments.{system}", f"--config={config_spec}"]
    cmd.append(f"--workdir={os.path.join(workdir, point_name(overrides))}")
    cmd += [f"--config.{k}={v}" for k, v in sorted(overrides.items())]
    return cmd


def gather(system: str, workdir: str, points: list[dict]) -> list[dict]:
    rows = []
    for overrides in points:
        path = os.path.join(workdir, point_name(overrides), "results.json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append({"point": point_name(overrides), **overrides, **json.load(f)})
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    scalar_keys = sorted(
        {k for r in rows for k, v in r.items() if isinstance(v, int | float | str)}
    )
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write("| " + " | ".join(scalar_keys) + " |\n|" + "---|" * len(scalar_keys) + "\n")
        for r in rows:
            cells = [
                f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                for k in scalar_keys
            ]
            f.write("| " + " | ".join(cells) + " |\n")
    module = importlib.import_module(f"theorax.experiments.{system}")
    if rows and hasattr(module, "summarize_sweep"):
        module.summarize_sweep(rows, workdir)
    print(f"gathered {len(rows)}/{len(points)} points into {workdir}/sweep.md")
    return rows


# --------------------------------------------------------------------------------------------- SLURM

# A SLURM duration: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS.
_SLURM_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")
GPU_DIRECTIVES = ("gres", "gpus-per-task")


@dataclasses.dataclass(frozen=True)
class SlurmResources:
    """What each array task (one sweep point) asks SLURM for; the `--slurm_<field>` flags, field for field.

    Attributes:
      partition: `--partition`; empty for the cluster's default.
      nodes: `--nodes` per point.
      gpus_per_node: GPUs per node; 0 asks for none.
      gpu_directive: "gres" (`--gres=gpu:N`, per node) or "gpus-per-task" (`--gpus-per-task=N / tasks`).
      ntasks_per_node: processes per node; 0 means one per GPU (one when there are none). A point of more
        than one task in all is launched by `srun`.
      cpus_per_task: `--cpus-per-task`; 0 leaves it to the cluster.
      mem: `--mem` per node (e.g. "64G"); empty leaves it to the cluster.
      time: `--time` limit (minutes, HH:MM:SS, D-HH:MM:SS, ...); empty leaves it to the partition.
      output, error: log paths (SLURM's patterns: %x job name, %A array job id, %a task id); empty for
        `WORKDIR/logs/%x_%A_%a.out` / `.err` (the directory is created with the script).
      extra: further `#SBATCH` lines, each an option as sbatch takes it (e.g. "--account=proj").
      max_parallel: at most this many array tasks at once (`--array=0-N%M`); 0 for no limit.
    """

    partition: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    gpu_directive: str = "gres"
    ntasks_per_node: int = 0
    cpus_per_task: int = 0
    mem: str = ""
    time: str = ""
    output: str = ""
    error: str = ""
    extra: tuple[str, ...] = ()
    max_parallel: int = 0

    def __post_init__(self):
        check = runtime.check
        check(self.nodes >= 1, f"--slurm_nodes={self.nodes} must be at least 1")
        check(self.gpus_per_node >= 0, f"--slurm_gpus_per_node={self.gpus_per_node} must be >= 0")
        runtime.check_choice("--slurm_gpu_directive", self.gpu_directive, GPU_DIRECTIVES)
        check(
            self.ntasks_per_node >= 0,
            f"--slurm_ntasks_per_node={self.ntasks_per_node} must be >= 0",
        )
        check(self.cpus_per_task >= 0, f"--slurm_cpus_per_task={self.cpus_per_task} must be >= 0")
        check(self.max_parallel >= 0, f"--slurm_max_parallel={self.max_parallel} must be >= 0")
        check(
            not self.time or bool(_SLURM_TIME.match(self.time)),
            f"--slurm_time={self.time!r} is not a SLURM time limit; use minutes, HH:MM:SS or D-HH:MM:SS "
            "(e.g. 04:00:00)",
        )
        check(
            not self.mem or bool(_SLURM_MEM.match(self.mem)),
            f"--slurm_mem={self.mem!r} is not a SLURM memory size; use a number with K, M, G or T (e.g. 64G)",
        )
        for line in self.extra:
            check(
                line.startswith("-"),
                f"--slurm_extra={line!r} must be an sbatch option such as --account=NAME",
            )
        gpus, tasks = self.gpus_per_node, self.tasks_per_node
        check(
            gpus == 0 or self.num_tasks == 1 or tasks == gpus,
            f"--slurm_ntasks_per_node={self.ntasks_per_node} with --slurm_gpus_per_node={gpus} on "
            f"{self.nodes} node(s): each process of a multi-task job gets only the GPU at its SLURM_LOCALID "
            f"(jax.distributed's SLURM layout), so run one task per GPU: --slurm_ntasks_per_node={gpus} "
            "(or 0, the default)",
        )

    @property
    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or max(self.gpus_per_node, 1)

    @property
    def num_tasks(self) -> int:
        """Processes per point: nodes x tasks per node."""
        return self.nodes * self.tasks_per_node

    def log_paths(self, workdir: str) -> tuple[str, str]:
        """The stdout and stderr paths (`output`, `error`, or their defaults under `workdir/logs/`)."""
        logs = os.path.join(os.path.abspath(workdir), "logs")
        return (
            self.output or os.path.join(logs, "%x_%A_%a.out"),
            self.error or os.path.join(logs, "%x_%A_%a.err"),
        )

    def directives(self, system: str, num_points: int, workdir: str) -> list[str]:
        """The `#SBATCH` lines of the array job."""
        array = f"0-{num_points - 1}" + (f"%{self.max_parallel}" if self.max_parallel else "")
        options = [f"--job-name=theorax-{system}", f"--array={array}"]
        if self.partition:
            options.append(f"--partition={self.partition}")
        options += [f"--nodes={self.nodes}", f"--ntasks-per-node={self.tasks_per_node}"]
        if self.gpus_per_node and self.gpu_directive == "gres":
            options.append(f"--gres=gpu:{self.gpus_per_node}")
        elif self.gpus_per_node:
            options.append(f"--gpus-per-task={self.gpus_per_node // self.tasks_per_node}")
        if self.cpus_per_task:
            options.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.mem:
            options.append(f"--mem={self.mem}")
        if self.time:
            options.append(f"--time={self.time}")
        out, err = self.log_paths(workdir)
        options += [f"--output={out}", f"--error={err}", *self.extra]
        return [f"#SBATCH {o}" for o in options]

    def launcher(self) -> list[str]:
        """The `srun` prefix of a multi-task point (none for a single task). `--gpu-bind=none` keeps every
        node's GPUs visible to each of its tasks, which `--gpus-per-task` would otherwise bind one each."""
        if self.num_tasks == 1:
            return []
        bind = ["--gpu-bind=none"] if self.gpus_per_node and self.gpu_directive != "gres" else []
        return ["srun", "--kill-on-bad-exit=1", *bind]


def slurm_array_script(
    system: str,
    commands: list[list[str]],
    resources: SlurmResources | None = None,
    workdir: str = ".",
) -> str:
    """A SLURM array job whose task i runs `commands[i]` from the current directory, with `resources`."""
    resources = resources or SlurmResources()
    launch = resources.launcher()
    n = len(commands)
    how = (
        f"srun starts {resources.num_tasks} processes ({resources.nodes} node(s) x "
        f"{resources.tasks_per_node}), which jax.distributed.initialize() finds from SLURM's environment"
        if launch
        else "one process in the batch script"
    )
    lines = [
        "#!/bin/bash",
        *resources.directives(system, n, workdir),
        f"# Written by theorax.experiments.sweep: array task i runs sweep point i ({n} points); {how}.",
        "# A finished point is skipped and an interrupted one resumes, so resubmitting is safe.",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        'case "${SLURM_ARRAY_TASK_ID:?not an array task: set SLURM_ARRAY_TASK_ID}" in',
    ]
    lines += [f"  {i}) {shlex.join([*launch, *c])} ;;" for i, c in enumerate(commands)]
    lines += [
        f'  *) echo "no sweep point $SLURM_ARRAY_TASK_ID (0-{n - 1})" >&2; exit 2 ;;',
        "esac",
        "",
    ]
    return "\n".join(lines)


def run_point(cmd: list[str]) -> int:
    """Runs one point's command and returns its exit status.

    SIGTERM or SIGINT to the sweep is passed on to the point as SIGTERM and the sweep waits for it, so the point
    saves the step in flight and exits with `runtime.EXIT_PREEMPTED` (a point signalled twice, by the terminal
    and by this forwarding, ignores the second).
    """
    proc = subprocess.Popen(cmd)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(
                sig, lambda signum, frame: proc.send_signal(signal.SIGTERM)
            )
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------- TPU VMs


@dataclasses.dataclass(frozen=True)
class TpuVm:
    """A (multi-host) Cloud TPU VM that runs each point on every worker; the `--tpu_<field>` flags.

    Attributes:
      name: the TPU VM's name.
      zone: its zone.
      project: its Google Cloud project; empty for gcloud's default.
      dir: the checkout on every worker, from the ssh login's directory.
      python: the workers' Python that has theorax installed.
    """

    name: str
    zone: str
    project: str = ""
    dir: str = "theorax"
    python: str = "python3"

    def __post_init__(self):
        runtime.check(bool(self.name), "--tpu_name is empty; name the TPU VM")
        runtime.check(
            bool(self.zone), f"--tpu_zone is empty; give the zone of TPU VM {self.name!r}"
        )

    def command(self, point: list[str]) -> list[str]:
        """The gcloud command that runs `point` (an entry point's argv) on every worker at once."""
        remote = [self.python, *point[1:]]
        inner = f"cd {shlex.quote(self.dir)} && THEORAX_DISTRIBUTED=auto {shlex.join(remote)}"
        project = [f"--project={self.project}"] if self.project else []
        return [
            *("gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name),
            f"--zone={self.zone}",
            *project,
            "--worker=all",
            f"--command={inner}",
        ]


def run_sweep(
    config_spec: str,
    workdir: str,
    *,
    print_commands: bool = False,
    slurm_array: str | None = None,
    gather_only: bool = False,
    slurm: SlurmResources | None = None,
    tpu: TpuVm | None = None,
) -> list[dict] | None:
    """Runs (or prints, or writes as a SLURM array) every point of `config_spec`'s sweep, then gathers.

    Args:
      config_spec: `path.py[:arg]` of a config file with `get_sweep()`.
      workdir: the sweep's directory; point i runs in `workdir/<point name>/`.
      print_commands: print one command per point (with `tpu`, the TPU VM's gcloud form) and run nothing.
      slurm_array: write a SLURM array script to this path, with `slurm`'s resources, and run nothing.
      gather_only: only gather the finished points' results.
      slurm: the resources of the array script (default: none requested, one task per point).
      tpu: the TPU VM that `print_commands` prints for.

    Returns:
      The gathered rows, or None after `print_commands` / `slurm_array`, which run nothing.
    """
    _, system, points = load_sweep(config_spec)
    os.makedirs(workdir, exist_ok=True)
    commands = [point_command(config_spec, system, workdir, p) for p in points]
    if print_commands:
        for cmd in commands:
            print(shlex.join(tpu.command(cmd) if tpu else cmd))
        return None
    if slurm_array:
        slurm = slurm or SlurmResources()
        for path in slurm.log_paths(workdir):  # SLURM does not create the logs' directories
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(slurm_array, "w") as f:
            f.write(slurm_array_script(system, commands, slurm, workdir))
        print(f"wrote {slurm_array}: sbatch it, then rerun with --gather_only")
        return None
    if not gather_only:
        for i, (overrides, cmd) in enumerate(zip(points, commands, strict=True)):
            done = os.path.exists(os.path.join(workdir, point_name(overrides), "results.json"))
            print(f"[{i + 1}/{len(points)}] {point_name(overrides)}" + (" (done)" if done else ""))
            if done:
                continue
            status = run_point(cmd)
            if status == runtime.EXIT_PREEMPTED:
                raise runtime.Preempted(
                    f"the sweep stopped at point {point_name(overrides)} (its checkpoint is saved); "
                    "rerun the sweep to continue"
                )
            if status:
                raise subprocess.CalledProcessError(status, cmd)
    return gather(system, workdir, points)


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as a script."""
    flags.DEFINE_string(
        "config", None, "Config file and preset, as for the entry point: path.py:preset."
    )
    flags.DEFINE_string("workdir", None, "Sweep directory; one sub-directory per point.")
    flags.DEFINE_bool("print_commands", False, "Print one command per point and exit.")
    flags.DEFINE_string("slurm_array", None, "Write a SLURM array script to this path and exit.")
    flags.DEFINE_bool("gather_only", False, "Only gather the results of finished points.")
    defaults = SlurmResources()
    help_texts = {
        "partition": "SLURM partition (empty: the cluster's default).",
        "nodes": "Nodes per point; more than one task in all is launched with srun.",
        "gpus_per_node": "GPUs per node for each point (0: none).",
        "gpu_directive": f"How GPUs are asked for: one of {list(GPU_DIRECTIVES)}.",
        "ntasks_per_node": "Processes per node (0: one per GPU, or one without GPUs).",
        "cpus_per_task": "CPUs per task (0: the cluster's default).",
        "mem": "Memory per node, e.g. 64G (empty: the cluster's default).",
        "time": "Time limit, e.g. 04:00:00 or 1-00:00:00 (empty: the partition's).",
        "output": "stdout log path (default WORKDIR/logs/%x_%A_%a.out).",
        "error": "stderr log path (default WORKDIR/logs/%x_%A_%a.err).",
        "max_parallel": "At most this many array tasks at once (0: no limit).",
    }
    for field in dataclasses.fields(SlurmResources):
        name, default = f"slurm_{field.name}", getattr(defaults, field.name)
        if field.name == "extra":
            flags.DEFINE_multi_string(
                name, [], "An extra #SBATCH line (repeatable), e.g. --account=X."
            )
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_texts[field.name])
        else:
            flags.DEFINE_string(name, default, help_texts[field.name])
    flags.DEFINE_string("tpu_name", None, "With --print_commands: the multi-host TPU VM's name.")
    flags.DEFINE_string("tpu_zone", "", "The TPU VM's zone.")
    flags.DEFINE_string("tpu_project", "", "The TPU VM's project (empty: gcloud's default).")
    flags.DEFINE_string("tpu_dir", "theorax", "The checkout on every TPU worker.")
    flags.DEFINE_string("tpu_python", "python3", "The TPU workers' Python.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        values = {
            f.name: FLAGS[f"slurm_{f.name}"].value for f in dataclasses.fields(SlurmResources)
        }
        with runtime.exit_status_on_errors():
            slurm = SlurmResources(**{**values, "extra": tuple(values["extra"])})
            tpu = None
            if FLAGS.tpu_name is not None:
                tpu = TpuVm(
                    FLAGS.tpu_name,
                    FLAGS.tpu_zone,
                    FLAGS.tpu_project,
                    FLAGS.tpu_dir,
                    FLAGS.tpu_python,
                )
            run_sweep(
                FLAGS.config,
                FLAGS.workdir,
                print_commands=FLAGS.print_commands,
                slurm_array=FLAGS.slurm_array,
                gather_only=FLAGS.gather_only,
                slurm=slurm,
                tpu=tpu,
            )
    except subprocess.CalledProcessError as e:
        print(
            f"error: a point exited with status {e.returncode} (its message is above)",
            file=sys.stderr,
        )
        sys.exit(runtime.EXIT_ERROR)


if __name__ == "__main__":
    runtime.tune_process()
    define_flags()
    app.run(main)
