"""Cluster forms of `experiments.sweep`: the SLURM array script's text (resources, logs, multi-host srun) and
what it runs when bash executes it with SLURM_ARRAY_TASK_ID set by hand (with srun faked, and once for real),
the TPU VM's gcloud commands, bad resource values refused with the flag's name, and the processes those launch
starting `jax.distributed` from the cluster's environment."""

import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap

import jax
import pytest
from theorax.experiments import runtime, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A sweep of two cheap points: the scaled-MLP smoke preset for 2 steps, seeds 0 and 1.
CONFIG = """
from theorax.configs.scaled_mlp import get_config as _base


def get_config(arg=None):
    config = _base("smoke")
    config.num_steps = 2
    return config


def get_sweep():
    return [{"seed": 0}, {"seed": 1}]
"""


@pytest.fixture
def config_spec(tmp_path):
    path = tmp_path / "cfg" / "scaled_mlp.py"  # the file's name is the system's
    path.parent.mkdir()
    path.write_text(CONFIG)
    return f"{path}:smoke"


def executable(path, body: str) -> str:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def fake_python(tmp_path) -> str:
    """Stands in for the interpreter in the written commands: appends its argv (and whether srun started it) to
    ran.jsonl."""
    log = tmp_path / "ran.jsonl"
    return executable(
        tmp_path / "python",
        f"""
        {sys.executable} -c 'import json, os, sys; print(json.dumps({{"argv": sys.argv[1:],
            "srun": os.environ.get("FAKE_SRUN_ARGS")}}))' "$@" >> {log}
        """,
    )


def ran(tmp_path) -> list[dict]:
    log = tmp_path / "ran.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def run_array_task(script: str, task, path_dirs=(), cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), env["PATH"]])
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    return subprocess.run(
        ["bash", script], env=env, capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_array_script_asks_for_the_resources_and_logs(tmp_path, config_spec):
    resources = sweep.SlurmResources(
        partition="gpu",
        gpus_per_node=1,
        cpus_per_task=8,
        mem="64G",
        time="04:00:00",
        extra=("--account=theory", "--qos=high"),
        max_parallel=1,
    )
    script = tmp_path / "sweep.sbatch"
    workdir = tmp_path / "sweep"
    sweep.run_sweep(config_spec, str(workdir), slurm_array=str(script), slurm=resources)
    text = script.read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=theorax-scaled_mlp",
        "#SBATCH --array=0-1%1",
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --time=04:00:00",
        f"#SBATCH --output={workdir}/logs/%x_%A_%a.out",
        f"#SBATCH --error={workdir}/logs/%x_%A_%a.err",
        "#SBATCH --account=theory",
        "#SBATCH --qos=high",
    ]
    # Every #SBATCH line comes before the first command (sbatch stops reading them there).
    lines = text.splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(lines.index(d) < first_command for d in directives)
    assert (workdir / "logs").is_dir(), "SLURM does not create the log directory; the sweep must"
    assert "srun" not in text, "a one-task point runs in the batch script itself"

    # GPUs bound per task: one task per GPU, each seeing its node's GPUs (JAX picks the one at SLURM_LOCALID).
    per_task = sweep.SlurmResources(gpus_per_node=2, gpu_directive="gpus-per-task")
    text = sweep.slurm_array_script("s", [["x"]], per_task)
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --gpus-per-task=1" in text
    assert "  0) srun --kill-on-bad-exit=1 --gpu-bind=none x ;;" in text


def test_array_task_runs_its_point_and_multi_host_points_go_through_srun(
    tmp_path, config_spec, monkeypatch
):
    monkeypatch.setattr(sys, "executable", fake_python(tmp_path))
    workdir = tmp_path / "sweep"
    script = str(tmp_path / "one.sbatch")
    sweep.run_sweep(config_spec, str(workdir), slurm_array=script)
    commands = [
        sweep.point_command(config_spec, "scaled_mlp", str(workdir), p)
        for p in ({"seed": 0}, {"seed": 1})
    ]

    done = run_array_task(script, 1)
    assert done.returncode == 0, done.stderr
    assert ran(tmp_path) == [{"argv": commands[1][1:], "srun": None}]

    # 2 nodes x 4 GPUs: one task per GPU, all 8 started by srun (faked: it records its options, then runs the
    # command as srun's task would).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(
        bin_dir / "srun",
        """
        args=()
        while [[ "$1" == --* ]]; do args+=("$1"); shift; done
        FAKE_SRUN_ARGS="${args[*]}" exec "$@"
        """,
    )
    multi = sweep.SlurmResources(nodes=2, gpus_per_node=4, partition="gpu")
    script = str(tmp_path / "multi.sbatch")
    sweep.run_sweep(config_spec, str(workdir), slurm_array=script, slurm=multi)
    text = open(script).read()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=4" in text
    assert "#SBATCH --gres=gpu:4" in text
    done = run_array_task(script, 0, [bin_dir])
    assert done.returncode == 0, done.stderr
    assert ran(tmp_path)[-1] == {"argv": commands[0][1:], "srun": "--kill-on-bad-exit=1"}

    # A task id outside the array, or none, fails with a message and runs nothing.
    for task, message in ((2, "no sweep point 2 (0-1)"), (None, "not an array task")):
        done = run_array_task(script, task, [bin_dir])
        assert done.returncode != 0 and message in done.stderr
    assert len(ran(tmp_path)) == 2


@pytest.mark.slow  # a real training run in a fresh interpreter: ~12 s quiet, ~40 s on a loaded 2-core machine
def test_written_array_script_runs_the_right_point_for_real(tmp_path, config_spec):
    """bash runs the written script as SLURM would run array task 1 (no srun: a one-task point)."""
    workdir = tmp_path / "sweep"
    script = str(tmp_path / "sweep.sbatch")
    sweep.run_sweep(config_spec, str(workdir), slurm_array=script)
    done = run_array_task(script, 1, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "seed=1" / "results.json").exists()
    assert not (workdir / "seed=0").exists()
    config = json.load(open(workdir / "seed=1" / "config.json"))
    assert config["seed"] == 1 and config["num_steps"] == 2
    rows = sweep.run_sweep(config_spec, str(workdir), gather_only=True)
    assert [r["point"] for r in rows] == ["seed=1"]


def test_tpu_vm_command_runs_the_point_on_every_worker(tmp_path, config_spec, capsys):
    tpu = sweep.TpuVm("my-v5p-64", "us-east5-a", project="proj", dir="src/theorax")
    sweep.run_sweep(config_spec, "gs-fuse/sweep", print_commands=True, tpu=tpu)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, seed in zip(lines, (0, 1), strict=True):
        argv = shlex.split(line)
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-64"]
        assert argv[6:9] == ["--zone=us-east5-a", "--project=proj", "--worker=all"]
        assert argv[9].startswith("--command=")
        remote = shlex.split(argv[9].removeprefix("--command="))
        assert remote[:4] == ["cd", "src/theorax", "&&", "THEORAX_DISTRIBUTED=auto"]
        point = sweep.point_command(config_spec, "scaled_mlp", "gs-fuse/sweep", {"seed": seed})
        assert remote[4:] == ["python3", *point[1:]]


@pytest.mark.parametrize(
    "fields, flag",
    [
        ({"time": "4h"}, "--slurm_time='4h'"),
        ({"mem": "lots"}, "--slurm_mem='lots'"),
        ({"nodes": 0}, "--slurm_nodes=0"),
        ({"gpu_directive": "gpus"}, "--slurm_gpu_directive='gpus'"),
        ({"extra": ("account=x",)}, "--slurm_extra='account=x'"),
        ({"nodes": 2, "gpus_per_node": 4, "ntasks_per_node": 1}, "one task per GPU"),
    ],
)
def test_bad_resources_are_refused_naming_the_flag(fields, flag):
    with pytest.raises(runtime.ConfigError, match="must|not a|one task per GPU|is not one of") as e:
        sweep.SlurmResources(**fields)
    assert flag in str(e.value)


def test_command_line_passes_every_resource_flag(tmp_path, config_spec):
    """The flags reach the script (one interpreter start; the refusals are tested above, in-process)."""
    script = tmp_path / "cli.sbatch"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "theorax.experiments.sweep", f"--config={config_spec}"),
            f"--workdir={tmp_path / 'w'}",
            f"--slurm_array={script}",
            "--slurm_partition=p",
            "--slurm_nodes=2",
            "--slurm_gpus_per_node=8",
            "--slurm_cpus_per_task=12",
            "--slurm_mem=500G",
            "--slurm_time=1-00:00:00",
            f"--slurm_output={tmp_path / 'o' / '%A_%a.out'}",
            f"--slurm_error={tmp_path / 'e' / '%A_%a.err'}",
            "--slurm_extra=--account=a",
            "--slurm_extra=--exclusive",
            "--slurm_max_parallel=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert directives[1:] == [
        "#SBATCH --array=0-1%3",
        "#SBATCH --partition=p",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --mem=500G",
        "#SBATCH --time=1-00:00:00",
        f"#SBATCH --output={tmp_path}/o/%A_%a.out",
        f"#SBATCH --error={tmp_path}/e/%A_%a.err",
        "#SBATCH --account=a",
        "#SBATCH --exclusive",
    ]
    assert (tmp_path / "o").is_dir() and (tmp_path / "e").is_dir()
    assert "srun --kill-on-bad-exit=1 " in script.read_text()


@pytest.mark.parametrize(
    "env, started",
    [
        ({}, False),
        ({"SLURM_NTASKS": "1"}, False),  # a one-task point: a plain process
        ({"SLURM_NTASKS": "8"}, True),  # a multi-task point under srun
        ({"THEORAX_DISTRIBUTED": "auto"}, True),  # the TPU VM form
    ],
)
def test_processes_start_jax_distributed_from_the_cluster_environment(monkeypatch, env, started):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)
    for name in ("SLURM_NTASKS", "THEORAX_DISTRIBUTED", "THEORAX_COORDINATOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    runtime.initialize_distributed()
    assert calls == ([((), {})] if started else [])  # no arguments: JAX's cluster detection
