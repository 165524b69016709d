"""The experiment runtime end to end: resume after SIGKILL, device/process-count invariance, non-finite
losses, config errors, finished runs, sweeps. Entry points run as real subprocesses where that matters.
The other faults (signals, corrupted checkpoints, full disks, two writers, torn metrics, changed configs) are in
test_runtime_faults.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from theorax.configs import scaled_mlp as scaled_mlp_config
from theorax.experiments import runtime, sweep
from theorax.experiments import scaled_mlp as scaled_mlp_experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGD = ("--config.optim.name=sgd", "--config.optim.lr=0.05", "--config.num_steps=12")


def launch(workdir, *overrides, devices=4, extra_env=None, wait=True):
    cmd = [
        sys.executable,
        "-m",
        "theorax.experiments.scaled_mlp",
        "--config=configs/scaled_mlp.py:smoke",
        f"--workdir={workdir}",
        *overrides,
    ]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), **(extra_env or {})}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def params(workdir):
    with open(os.path.join(workdir, "params.msgpack"), "rb") as f:
        return serialization.msgpack_restore(f.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three training runs in subprocesses, ~100 s on a 2-core Zen 1 VM (the fast SIGTERM test stays)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    steps = ("--config.num_steps=40", "--config.checkpoint_every=10")
    launch(tmp_path / "full", *steps)
    killed = tmp_path / "killed"
    proc = launch(killed, *steps, wait=False)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
    ):
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside the training loop, possibly inside a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()
    # Every checkpoint left behind loads, and the newest one is a real step.
    manager = runtime.Checkpointer(str(ckpts), every_steps=10)
    assert manager.latest_step is not None and manager.latest_step % 10 == 0
    manager.close()
    # The killed run's lock is left behind; the rerun takes it over (its owner is dead) with a warning.
    assert json.load(open(killed / runtime.LOCK_NAME))["pid"] == proc.pid
    _, err = launch(killed, *steps)  # the same command resumes
    assert f"taking over the stale lock {killed / runtime.LOCK_NAME} of pid {proc.pid}" in err
    chex.assert_trees_all_close(params(killed), params(tmp_path / "full"), rtol=0, atol=0)
    rows = [json.loads(line) for line in open(killed / "metrics.jsonl")]
    logged = [r["step"] for r in rows if "loss" in r]
    assert logged == sorted(set(logged)), "metrics past the resumed checkpoint were not dropped"

    # A finished run is not redone: results.json stays as it was (the config must be the run's own; another
    # one is refused, test_runtime_faults.py).
    before = os.path.getmtime(tmp_path / "full" / "results.json")
    config = scaled_mlp_config.get_config("smoke")
    config.num_steps, config.checkpoint_every = 40, 10
    results = scaled_mlp_experiment.run(config, str(tmp_path / "full"))
    assert os.path.getmtime(tmp_path / "full" / "results.json") == before
    assert results == json.load(open(tmp_path / "full" / "results.json"))


@pytest.mark.slow  # four training runs in subprocesses, two of them jax.distributed processes: ~115 s
def test_one_device_equals_four_devices_equals_two_processes(tmp_path):
    launch(tmp_path / "four", *SGD, devices=4)
    launch(tmp_path / "one", *SGD, devices=1)
    chex.assert_trees_all_close(
        params(tmp_path / "one"), params(tmp_path / "four"), rtol=1e-4, atol=1e-5
    )

    port = free_port()
    procs = [
        launch(
            tmp_path / "multi",
            *SGD,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            devices=2,
            wait=False,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    chex.assert_trees_all_close(
        params(tmp_path / "multi"), params(tmp_path / "four"), rtol=1e-4, atol=1e-5
    )
    four = json.load(open(tmp_path / "four" / "results.json"))
    multi = json.load(open(tmp_path / "multi" / "results.json"))
    assert abs(four["test_top1"] - multi["test_top1"]) < 1e-6


def test_unknown_config_key_fails_with_one_clear_line(tmp_path):
    proc = launch(tmp_path / "bad", "--config.model.nam=B-2/Wi-8", wait=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "nam" in err and "Traceback" not in err


def test_bad_config_values_are_rejected_before_work(tmp_path):
    for key, value, match in (
        ("model", {"name": "B-2/Wide-32"}, "model.name"),
        ("optim", {"name": "adam"}, "optim.name"),
        (None, {"batch_size": 0}, "batch_size"),
        ("recipe", {"crop_scale": (0.5, 2.0)}, "crop_scale"),
    ):
        config = scaled_mlp_config.get_config("smoke")
        (config if key is None else config[key]).update(value)
        with pytest.raises(runtime.ConfigError, match=match):
            scaled_mlp_experiment.run(config, str(tmp_path / "bad"))
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(ValueError, match="unknown preset"):
        scaled_mlp_config.get_config("laptop")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    wd = runtime.Workdir(str(tmp_path), None)
    state = {"w": jnp.zeros(3)}

    @jax.jit
    def step_fn(state, step):
        loss = jnp.where(step >= 12, jnp.nan, 1.0 / (step + 1))
        return {"w": state["w"] + 1.0}, {"loss": loss}

    with pytest.raises(runtime.NonFiniteError, match="step 13"):
        runtime.train(
            wd,
            state,
            lambda s, i: step_fn(s, np.int32(i)),
            num_steps=30,
            checkpoint_every=5,
            log_every=1,
        )
    ckpt = wd.checkpointer(5)
    assert ckpt.latest_step == 10
    restored, step = ckpt.restore(state)
    np.testing.assert_array_equal(restored["w"], 10.0)


def test_non_finite_training_run_reports_error(tmp_path):
    config = scaled_mlp_config.get_config("smoke")
    config.optim.name, config.optim.lr = "sgd", 1e12
    with pytest.raises(runtime.NonFiniteError, match="non-finite"):
        scaled_mlp_experiment.run(config, str(tmp_path))
    assert not (tmp_path / "results.json").exists()


def test_sweep_commands_gather_and_scaling_fit(tmp_path):
    points = scaled_mlp_config.get_sweep()
    _, system, loaded = (
        sweep.load_sweep("configs/scaled_mlp.py:cpu")
        if os.getcwd() == ROOT
        else sweep.load_sweep(os.path.join(ROOT, "configs/scaled_mlp.py") + ":cpu")
    )
    assert system == "scaled_mlp" and loaded == points
    cmd = sweep.point_command("configs/scaled_mlp.py:cpu", system, str(tmp_path), points[0])
    assert cmd[1:3] == ["-m", "theorax.experiments.scaled_mlp"]
    assert any(c.startswith("--config.model.name=") for c in cmd)
    # Fake finished points following a known law; the gather fits it back.
    for i, p in enumerate(points):
        d = tmp_path / sweep.point_name(p)
        d.mkdir()
        compute = 1e12 * 3.0**i
        err = 0.5 * (1 + compute / 1e12) ** -0.3 + 0.05
        json.dump(
            {"compute_flops": compute, "test_top1": 1 - err, "model": p["model.name"]},
            open(d / "results.json", "w"),
        )
    rows = sweep.gather(system, str(tmp_path), points)
    assert len(rows) == len(points)
    fit = json.load(open(tmp_path / "scaling_law.json"))
    assert abs(fit["alpha"] - 0.3) < 0.05
    assert (tmp_path / "scaling_law.png").exists() and (tmp_path / "sweep.md").exists()


def test_finetune_from_own_checkpoint_with_new_head_and_tta(tmp_path):
    config = scaled_mlp_config.get_config("smoke")
    scaled_mlp_experiment.run(config, str(tmp_path / "pre"))
    pretrained = params(tmp_path / "pre")["params"]

    ft = scaled_mlp_config.get_config("smoke")
    ft.init.params_file = str(tmp_path / "pre" / "params.msgpack")
    ft.optim.name, ft.optim.lr, ft.optim.momentum = "sgd", 1e-3, 0.0
    ft.optim.body_lr_multiplier = 0.0  # a frozen body through the multiplier: only the head moves
    ft.num_steps, ft.eval.tta_crops = 5, 3
    results = scaled_mlp_experiment.run(ft, str(tmp_path / "ft"))
    tuned = params(tmp_path / "ft")["params"]
    for name in pretrained:
        same = all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(pretrained[name]), jax.tree.leaves(tuned[name]), strict=True
            )
        )
        assert same == (name != "linear_out"), name
    assert 0 <= results["test_tta_top1"] <= results["test_tta_top5"] <= 1

    bad = scaled_mlp_config.get_config("smoke")
    bad.init.params_file = ft.init.params_file
    bad.model.name = "B-2/Wi-64"
    with pytest.raises(runtime.ConfigError, match="does not fit"):
        scaled_mlp_experiment.run(bad, str(tmp_path / "bad"))


@pytest.mark.skipif(
    sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc", reason="glibc only"
)
def test_tune_process_reexecs_once_with_the_tunables_and_one_openblas_thread():
    script = (
        "import os, sys; from theorax.experiments import runtime; "
        "runtime.tune_process(reuse_memory=sys.argv[2] == 'reuse'); "
        "print(repr(sys.argv[1:2]), repr(os.environ.get('GLIBC_TUNABLES', '')), "
        "os.environ.get('OPENBLAS_NUM_THREADS'))"
    )

    def run(reuse="", **env):
        unset = ("GLIBC_TUNABLES", "THEORAX_SYSTEM_MALLOC", "OPENBLAS_NUM_THREADS")
        base = {k: v for k, v in os.environ.items() if k not in unset}
        out = subprocess.run(
            [sys.executable, "-c", script, "a b", reuse],
            env=base | env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    tunable = runtime.HUGE_PAGES_TUNABLE
    reuse = ":".join(runtime.MEMORY_REUSE_TUNABLES)
    assert run() == f"['a b'] '{tunable}' 1"
    assert run("reuse") == f"['a b'] '{tunable}:{reuse}' 1"
    assert run(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == (
        f"['a b'] 'glibc.malloc.arena_max=2:{tunable}' 1"
    )
    # the user's own value of one of ours is kept, the others added
    others = ":".join(runtime.MEMORY_REUSE_TUNABLES[1:])
    assert run("reuse", GLIBC_TUNABLES="glibc.malloc.arena_max=2") == (
        f"['a b'] 'glibc.malloc.arena_max=2:{tunable}:{others}' 1"
    )
    assert run(GLIBC_TUNABLES=tunable) == f"['a b'] '{tunable}' 1"  # the Makefile's value
    assert run("reuse", GLIBC_TUNABLES=tunable) == f"['a b'] '{tunable}:{reuse}' 1"
    assert run(THEORAX_SYSTEM_MALLOC="1") == "['a b'] '' 1"
    assert run("reuse", THEORAX_SYSTEM_MALLOC="1") == "['a b'] '' 1"
    assert run(OPENBLAS_NUM_THREADS="2") == f"['a b'] '{tunable}' 2"  # the user's value is kept
    assert (
        run(GLIBC_TUNABLES=tunable, OPENBLAS_NUM_THREADS="1") == f"['a b'] '{tunable}' 1"
    )  # no re-exec
