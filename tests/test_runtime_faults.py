"""Faults the experiment runtime survives (issue 13): SIGTERM / SIGINT, a corrupted newest checkpoint, a failed
save, two runs on one workdir, a torn metrics.jsonl, a rerun with another config.

The training run is tests/runtime_job.py (4 parameters, a jitted step, `runtime.train`), run in this process
where no signal, kill or second process is needed and as a command (`runtime.main`) where one is. Every resumed
run is compared with `runtime_job.weights_after`, the same steps taken without the runtime.
"""

import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from theorax.experiments import runtime, sweep
from theorax.tests import runtime_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir, *overrides, devices=4):
    cmd = [
        sys.executable,
        "-m",
        "theorax.tests.runtime_job",
        "--config=tests/runtime_job.py",
        f"--workdir={workdir}",
        *overrides,
    ]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc):
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def wait_for_metrics(workdir, rows: int, procs) -> None:
    """Waits until metrics.jsonl has `rows` lines (the run is inside its training loop, past a checkpoint)."""
    path = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(path) and sum(1 for _ in open(path)) >= rows):
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)


def config(**overrides):
    c = runtime_job.get_config()
    c.update(overrides)
    return c


def metric_rows(workdir) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def steps_logged(workdir) -> list[int]:
    return [r["step"] for r in metric_rows(workdir) if "loss" in r]


def train(workdir, c, num_steps=None, **kwargs):
    """`runtime_job`'s loop on `workdir` in this process (no config check: `c` may differ between calls)."""
    step = runtime_job.make_step(c)
    return runtime.train(
        runtime.Workdir(str(workdir)),
        runtime_job.initial_state(c),
        lambda s, t: step(s, np.int32(t)),
        num_steps=num_steps or c.num_steps,
        checkpoint_every=c.checkpoint_every,
        log_every=c.log_every,
        **kwargs,
    )


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def snapshot(directory) -> dict:
    """Every file under `directory` with its bytes and modification time."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
        if os.path.isfile(path):
            out[path] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    return out


# ----------------------------------------------------------------------------------------- preemption


@pytest.mark.slow  # ~30 s; SIGTERM stays fast in the two-process test
def test_sigterm_saves_the_step_in_flight_and_the_rerun_loses_none(tmp_path):
    workdir = tmp_path / "run"
    proc = command(workdir, "--config.step_seconds=0.05")
    wait_for_metrics(workdir, 12, [proc])
    # A second run on the live workdir refuses at once, naming the owner.
    with pytest.raises(runtime.WorkdirLockedError, match=f"pid {proc.pid} on host"):
        runtime.Workdir(str(workdir))
    logged = len(steps_logged(workdir))
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == runtime.EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "stopped by" in line]
    stop = int(re.search(r"checkpoint of step (\d+) of 40", line).group(1))
    assert line.startswith("stopped by SIGTERM") and "rerun the same command" in line
    assert logged <= stop < 40, line  # no step that ran is lost
    assert os.path.isdir(workdir / "checkpoints" / str(stop))
    assert steps_logged(workdir)[-1] == stop
    assert not (workdir / runtime.LOCK_NAME).exists(), "the lock outlived the run"

    # The rerun (here from Python, with the command's config) continues from the stop step.
    c = config(step_seconds=0.05)
    results = runtime_job.run(c, str(workdir))
    np.testing.assert_array_equal(results["w"], runtime_job.weights_after(c, 40))
    assert steps_logged(workdir) == list(range(1, 41)), "a step lost or logged twice"

    # The finished workdir refuses a rerun with another config, naming the key, and stays as it was.
    before = snapshot(workdir)
    code, err = finish(command(workdir, "--config.step_seconds=0.05", "--config.lr=0.1"))
    assert code == runtime.EXIT_ERROR
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: ") and "lr: 0.05 there, 0.1 now" in line and "--fresh" in line
    assert snapshot(workdir) == before
    # ... unless asked to start afresh: the old run moves aside whole, and the new one runs from step 0.
    code, err = finish(command(workdir, "--fresh", "--config.lr=0.1", "--config.num_steps=5"))
    assert code == 0, err[-3000:]
    (old,) = glob.glob(f"{workdir}.old-*")
    assert snapshot(old) == {p.replace(str(workdir), old): v for p, v in before.items()}
    assert steps_logged(workdir) == [1, 2, 3, 4, 5]


def test_sigint_in_process_saves_then_raises_preempted(tmp_path):
    c = config(num_steps=20, checkpoint_every=5)
    step = runtime_job.make_step(c)

    def interrupted_at(t_signal, signals=(signal.SIGINT,)):
        def step_fn(state, t):
            if t == t_signal:
                for sig in signals:
                    os.kill(os.getpid(), sig)
                    time.sleep(0.01)  # the handler runs here, once per signal
            return step(state, np.int32(t))

        return step_fn

    wd = runtime.Workdir(str(tmp_path))
    state = runtime_job.initial_state(c)
    with pytest.raises(runtime.Preempted, match="stopped by SIGINT") as info:
        runtime.train(wd, state, interrupted_at(7), num_steps=20, checkpoint_every=5)
    assert info.value.step == 8 and info.value.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not (tmp_path / runtime.LOCK_NAME).exists()
    restored, step_restored = wd.checkpointer(5).restore(state)
    assert step_restored == 8
    np.testing.assert_array_equal(restored["w"], runtime_job.weights_after(c, 8))

    # Signals after the first are ignored while it stops (a launcher forwarding the scheduler's SIGTERM,
    # Ctrl-C pressed twice): the save is not cut short. The rerun resumes from step 12.
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGINT)
    with pytest.raises(
        runtime.Preempted, match="stopped by SIGINT: saved the checkpoint of step 12"
    ):
        runtime.train(wd, state, interrupted_at(11, signals), num_steps=20, checkpoint_every=5)

    # A signal after the last step (here during the evaluation at the final checkpoint) still stops the run.
    def evaluate(t, state):
        if t == 20:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)

    with pytest.raises(
        runtime.Preempted, match="stopped by SIGTERM: saved the checkpoint of step 20"
    ):
        train(tmp_path, c, on_checkpoint=evaluate)
    final = train(tmp_path, c)  # restores step 20; nothing left to run
    np.testing.assert_array_equal(final["w"], runtime_job.weights_after(c, 20))


# A point of a sweep: exits 75 on SIGTERM as runtime.train does, once it has told the test it is ready.
POINT = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
signal.signal(signal.SIGINT, lambda *a: None)
open(sys.argv[1], "w").close()
time.sleep(600)
"""


def test_sweep_passes_a_signal_on_to_the_running_point_and_waits_for_it(tmp_path):
    ready = tmp_path / "ready"

    def interrupt_when_ready():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C to the sweep

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    assert sweep.run_point([sys.executable, "-c", POINT, str(ready)]) == runtime.EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stop_together_when_one_gets_sigterm(tmp_path):
    workdir, port = tmp_path / "multi", free_port()
    procs = [
        command(
            workdir,
            "--config.step_seconds=0.05",
            "--config.num_steps=60",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
            devices=2,
        )
        for i in range(2)
    ]
    wait_for_metrics(workdir, 12, procs)
    procs[1].send_signal(signal.SIGTERM)  # process 0 gets no signal
    (code0, err0), (code1, err1) = [finish(p) for p in procs]
    assert code0 == code1 == runtime.EXIT_PREEMPTED, err0[-2000:] + err1[-2000:]
    pattern = r"checkpoint of step (\d+) of 60"
    (line0,) = [line for line in err0.splitlines() if "stopped by" in line]
    (line1,) = [line for line in err1.splitlines() if "stopped by" in line]
    assert "another process" in line0 and line1.startswith("stopped by SIGTERM")
    stop = int(re.search(pattern, line0).group(1))
    assert int(re.search(pattern, line1).group(1)) == stop and 12 <= stop < 60
    restored, step = runtime.Checkpointer(str(workdir / "checkpoints"), 10).restore(
        runtime_job.initial_state(config())
    )
    assert step == stop
    np.testing.assert_array_equal(restored["w"], runtime_job.weights_after(config(), stop))
    assert steps_logged(workdir)[-1] == stop
    assert not (workdir / runtime.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ checkpoints


def largest_file(step_dir) -> str:
    return max(glob.glob(f"{step_dir}/default/**/d/*", recursive=True), key=os.path.getsize)


def test_corrupted_newest_checkpoint_is_set_aside_and_the_one_before_resumes(tmp_path, capsys):
    c = config(num_steps=15, checkpoint_every=5, ballast_kb=4)
    train(tmp_path / "a", c)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    bad = largest_file(tmp_path / "a" / "checkpoints" / "15")
    with open(bad, "r+b") as f:
        f.truncate(100)  # a file cut short: orbax's own read fails
    capsys.readouterr()
    resumed = train(tmp_path / "a", c, num_steps=25)
    (line,) = warnings_in(capsys.readouterr().err)
    assert line.startswith("warning: checkpoint step 15 in") and "resuming from step 10" in line
    assert "OUT_OF_RANGE" in line  # the reason, in one line
    (aside,) = glob.glob(str(tmp_path / "a" / "checkpoints" / "15.corrupt-*"))
    kept = os.path.join(aside, os.path.relpath(bad, tmp_path / "a" / "checkpoints" / "15"))
    assert os.path.getsize(kept) == 100, "the bad checkpoint was not kept as it was"
    # The same as a run resumed from step 10 on purpose.
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "15")
    from_10 = train(tmp_path / "b", c, num_steps=25)
    np.testing.assert_array_equal(resumed["w"], from_10["w"])
    np.testing.assert_array_equal(resumed["w"], runtime_job.weights_after(c, 25))

    # Arrays that load without an error but are not the ones saved (here: step 20's, as a botched copy
    # would leave them) are caught by the checksums saved with each checkpoint.
    ckpts = tmp_path / "a" / "checkpoints"
    shutil.rmtree(ckpts / "25" / "default")
    shutil.copytree(ckpts / "20" / "default", ckpts / "25" / "default")
    capsys.readouterr()
    again = train(tmp_path / "a", c, num_steps=25)
    (line,) = warnings_in(capsys.readouterr().err)
    assert "checkpoint step 25" in line and "no longer match the checksums" in line
    assert "resuming from step 20" in line
    np.testing.assert_array_equal(again["w"], resumed["w"])

    # When no checkpoint loads, the error names the directory and every step, and moves nothing.
    ckpts = tmp_path / "b" / "checkpoints"
    for step in ("20", "25"):
        with open(largest_file(ckpts / step), "r+b") as f:
            f.truncate(10)
    with pytest.raises(runtime.CheckpointError, match=f"no checkpoint in {ckpts} loads") as info:
        train(tmp_path / "b", c, num_steps=25)
    assert "step 25: " in str(info.value) and "step 20: " in str(info.value)
    assert sorted(os.listdir(ckpts)) == ["20", "25"]


def test_failed_write_during_a_save_stops_with_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    # After the checkpoint of step 10 no file may grow past 64 KB: the save of step 20 fails inside orbax.
    workdir = tmp_path / "full"
    code, err = finish(
        command(
            workdir, "--config.ballast_kb=256", "--config.file_limit_kb=64", "--config.num_steps=30"
        )
    )
    assert code == runtime.EXIT_ERROR
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert f"saving the checkpoint of step 20 to {workdir / 'checkpoints'} failed" in line
    assert "File too large" in line and "needs about 262.2 KB" in line
    assert "checkpoint of step 10 and metrics.jsonl are intact" in line
    assert os.listdir(workdir / "checkpoints") == ["10"], "a partial checkpoint was left behind"
    assert steps_logged(workdir) == list(range(1, 21))  # every line loads
    assert not (workdir / runtime.LOCK_NAME).exists()
    c = config(ballast_kb=256, num_steps=30)
    np.testing.assert_array_equal(train(workdir, c)["w"], runtime_job.weights_after(c, 30))


def test_disk_full_at_commit_names_the_space_needed_and_leaves_no_partial_checkpoint(
    tmp_path, monkeypatch
):
    c = config(num_steps=10, checkpoint_every=5)
    train(tmp_path, c)
    ckpt = runtime.Checkpointer(str(tmp_path / "checkpoints"), 5)
    state, step = ckpt.restore(runtime_job.initial_state(c))
    rename = os.rename

    def full_disk(src, dst, *args, **kwargs):
        if ".orbax-checkpoint-tmp" in str(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(runtime.CheckpointError) as info:
        ckpt.save(15, state)
    monkeypatch.undo()
    message = str(info.value)
    assert f"saving the checkpoint of step 15 to {tmp_path / 'checkpoints'} failed" in message
    assert "No space left on device" in message and "needs about 1.0 KB" in message
    assert "are free there" in message and "resume from step 10" in message
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "5"]
    restored, step = runtime.Checkpointer(str(tmp_path / "checkpoints"), 5).restore(state)
    assert step == 10
    np.testing.assert_array_equal(restored["w"], runtime_job.weights_after(c, 10))


def test_a_partial_checkpoint_recreated_by_a_late_write_is_removed_again(tmp_path):
    # A failed save's other writers keep going: one recreates the temporary directory just after it is removed
    # (the CI failure of 2026-12-06, where '20.orbax-checkpoint-tmp' outlived the error).
    ckpt = runtime.Checkpointer(str(tmp_path / "checkpoints"), 5)
    top = tmp_path / "checkpoints" / "15.orbax-checkpoint-tmp"
    partial = top / "ocdbt.process_0" / "d"
    partial.mkdir(parents=True)
    recreated = threading.Event()

    def late_writer():
        while top.exists():  # removed whole, so the removal is over
            time.sleep(0.001)
        partial.mkdir(parents=True)
        (partial / "chunk").write_bytes(b"x" * 100)
        recreated.set()

    writer = threading.Thread(target=late_writer)
    writer.start()
    ckpt._remove_partial(15, quiet_s=2.0)
    writer.join()
    assert recreated.is_set()
    assert os.listdir(tmp_path / "checkpoints") == []
    ckpt.close()


# ------------------------------------------------------------------------------------------ the lock


def write_lock(workdir, **record):
    os.makedirs(workdir, exist_ok=True)
    base = {"token": "t", "host": socket.gethostname(), "pid": 1, "started": "then", "command": "x"}
    with open(os.path.join(workdir, runtime.LOCK_NAME), "w") as f:
        json.dump({**base, **record}, f)


def test_workdir_lock_stale_foreign_reentrant_and_released(tmp_path, capsys, monkeypatch):
    # A dead process of this host: taken over with a warning.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "stale", pid=dead.pid)
    wd = runtime.Workdir(str(tmp_path / "stale"))
    assert "taking over the stale lock" in capsys.readouterr().err
    assert json.load(open(tmp_path / "stale" / runtime.LOCK_NAME))["pid"] == os.getpid()
    # Re-entrant within one process (a notebook rerunning a cell); the file goes with the last holder.
    again = runtime.Workdir(str(tmp_path / "stale"))
    del wd
    assert (tmp_path / "stale" / runtime.LOCK_NAME).exists()
    del again
    assert not (tmp_path / "stale" / runtime.LOCK_NAME).exists()

    # Another host's lock is left alone: this host cannot tell whether that run is alive.
    write_lock(tmp_path / "remote", host="elsewhere", pid=os.getpid())
    before = snapshot(tmp_path / "remote")
    with pytest.raises(runtime.WorkdirLockedError, match="on host elsewhere.*delete"):
        runtime.Workdir(str(tmp_path / "remote"), config())
    assert snapshot(tmp_path / "remote") == before
    # ... unless it was this SLURM job's own earlier incarnation (requeued after a node failure).
    write_lock(tmp_path / "remote", host="elsewhere", slurm_job="77", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    runtime.Workdir(str(tmp_path / "remote"))
    assert "earlier run of SLURM job 77" in capsys.readouterr().err

    # An error out of train releases the lock (the run is over), so another process may go on.
    @jax.jit
    def blows_up(state, step):
        return state, {"loss": jax.numpy.where(step > 2, jax.numpy.nan, 1.0)}

    wd = runtime.Workdir(str(tmp_path / "error"))
    with pytest.raises(runtime.NonFiniteError):
        runtime.train(wd, {"w": np.zeros(2)}, blows_up, num_steps=9, checkpoint_every=3)
    assert not (tmp_path / "error" / runtime.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ metrics.jsonl


def test_torn_metrics_line_and_rows_past_the_checkpoint_are_dropped_on_resume(tmp_path, capsys):
    c = config(num_steps=10, checkpoint_every=5)
    train(tmp_path, c)
    # A run to 20 killed at step 13: rows 11-13 past its checkpoint (10) and a half-written row 14.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (11, 12, 13))
        f.write('{"step": 14, "lo')
    capsys.readouterr()
    train(tmp_path, c, num_steps=20)
    err = capsys.readouterr().err
    assert "dropped the torn last line" in err and '{"step": 14, "lo' in err
    assert steps_logged(tmp_path) == list(range(1, 21))
    assert all(r["loss"] != 1.0 for r in metric_rows(tmp_path))


# ---------------------------------------------------------------------------------- changed configs


def test_rerun_with_another_config_refuses_unless_fresh(tmp_path):
    c = config(num_steps=5, checkpoint_every=5)
    first = runtime_job.run(c, str(tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    assert runtime_job.run(c, str(tmp_path / "run")) == first  # the same config: read back
    assert snapshot(tmp_path / "run") == before, "a rerun with the same config rewrote files"
    changed = config(num_steps=7, checkpoint_every=5, lr=0.1)
    with pytest.raises(runtime.ConfigChangedError) as info:
        runtime_job.run(changed, str(tmp_path / "run"))
    assert "2 keys differ: lr: 0.05 there, 0.1 now; num_steps: 5 there, 7 now" in str(info.value)
    assert snapshot(tmp_path / "run") == before

    runtime.Workdir(str(tmp_path / "run"), changed, fresh=True)
    (old,) = glob.glob(str(tmp_path / "run.old-*"))
    assert json.load(open(os.path.join(old, "results.json"))) == first  # moved, never deleted
    results = runtime_job.run(changed, str(tmp_path / "run"))
    np.testing.assert_array_equal(results["w"], runtime_job.weights_after(changed, 7))
