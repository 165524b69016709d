r"""Runs every point of a config's `get_sweep()` and gathers their results into one table.

    python -m theorax.experiments.sweep --config=configs/scaled_mlp.py:cpu --workdir=results/sweep
    python -m theorax.experiments.sweep --config=configs/scaled_mlp.py:cpu --workdir=DIR --print_commands
    python -m theorax.experiments.sweep --config=configs/scaled_mlp.py:cpu --workdir=DIR --slurm_array=sweep.sbatch

`get_sweep(arg)` (or `get_sweep()`) in the config file returns a list of override dicts, e.g.
`[{"model.width": 128, "seed": 0}, ...]`. Each point runs as its own process in `DIR/<point name>/` with the
overrides passed as `--config.key=value` flags, one after another; a finished point is skipped and an
interrupted one resumes, so rerunning the sweep is safe: SIGTERM or SIGINT to the sweep reaches the running point,
which saves its step, and the sweep stops with status 75 (`runtime.EXIT_PREEMPTED`). Afterwards every point's `results.json` is gathered into
`DIR/sweep.json` and `DIR/sweep.md`, and the system's `summarize_sweep(rows, workdir)` hook, if it has one (the
scaling-law fit of the scaled MLPs, say), runs over them. From Python the same is
`run_sweep(config_spec, workdir)`; the flags exist only when this module runs as a script.
"""

from __future__ import annotations

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


def slurm_array_script(system: str, commands: list[list[str]]) -> str:
    """A SLURM array job whose task i runs `commands[i]` from the current directory."""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --array=0-{len(commands) - 1}",
        f"#SBATCH --job-name=theorax-{system}",
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        "case $SLURM_ARRAY_TASK_ID in",
    ]
    lines += [f"  {i}) {shlex.join(c)} ;;" for i, c in enumerate(commands)]
    lines += ["esac", ""]
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


def run_sweep(
    config_spec: str,
    workdir: str,
    *,
    print_commands: bool = False,
    slurm_array: str | None = None,
    gather_only: bool = False,
) -> list[dict] | None:
    """Runs (or prints, or writes as a SLURM array) every point of `config_spec`'s sweep, then gathers.

    Returns the gathered rows, or None after `print_commands` / `slurm_array`, which run nothing.
    """
    _, system, points = load_sweep(config_spec)
    os.makedirs(workdir, exist_ok=True)
    commands = [point_command(config_spec, system, workdir, p) for p in points]
    if print_commands:
        for cmd in commands:
            print(shlex.join(cmd))
        return None
    if slurm_array:
        with open(slurm_array, "w") as f:
            f.write(slurm_array_script(system, commands))
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
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    try:
        with runtime.exit_status_on_errors():
            run_sweep(
                FLAGS.config,
                FLAGS.workdir,
                print_commands=FLAGS.print_commands,
                slurm_array=FLAGS.slurm_array,
                gather_only=FLAGS.gather_only,
            )
    except subprocess.CalledProcessError as e:
        print(
            f"error: a point exited with status {e.returncode} (its message is above)",
            file=sys.stderr,
        )
        sys.exit(runtime.EXIT_ERROR)


if __name__ == "__main__":
    runtime.use_huge_pages()
    define_flags()
    app.run(main)
