"""A tiny training run through the experiment runtime, for the fault tests (tests/test_runtime_faults.py).

    python -m theorax.tests.runtime_job --config=tests/runtime_job.py --workdir=DIR [--config.num_steps=N ...]

Gradient descent on a 4-parameter least-squares problem whose batch at step t is drawn from `fold_in(key, t)`,
so a resumed run must end with the same parameters as an uninterrupted one. The state also carries a block of
random numbers (`config.ballast_kb`), which gives its checkpoints a size that compression cannot remove.
"""

import resource
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from theorax.experiments import runtime

TARGET = np.array([1.0, -2.0, 3.0, 0.5], np.float32)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.num_steps = 40
    c.checkpoint_every = 10
    c.log_every = 1
    c.lr = 0.05
    c.step_seconds = 0.0  # a host-side pause in every step: time for a signal to land mid-run
    c.ballast_kb = 1
    c.file_limit_kb = (
        0  # > 0: after the first checkpoint, no file may grow past this size (RLIMIT_FSIZE)
    )
    return c


def initial_state(config) -> dict:
    ballast = np.random.default_rng(0).random(config.ballast_kb * 256, dtype=np.float32)
    state = {"w": np.zeros(4, np.float32), "ballast": ballast}
    return jax.device_put(state, runtime.replicated(runtime.data_mesh()))


def make_step(config):
    key = jax.random.key(0)

    @jax.jit
    def step(state, t):
        x = jax.random.normal(jax.random.fold_in(key, t), (8, 4))

        def loss_fn(w):
            return jnp.mean((x @ w - x @ TARGET) ** 2)

        loss, grad = jax.value_and_grad(loss_fn)(state["w"])
        return {**state, "w": state["w"] - config.lr * grad}, {"loss": loss}

    return step


def weights_after(config, steps: int) -> np.ndarray:
    """The parameters after `steps` steps, without the runtime: what every resumed run must reproduce."""
    state, step = initial_state(config), make_step(config)
    for t in range(steps):
        state, _ = step(state, np.int32(t))
    return np.asarray(state["w"])


def limit_file_sizes(kilobytes: int) -> None:
    """From now on writes that would grow a file past `kilobytes` fail with EFBIG, as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (kilobytes * 1024, hard))


def run(config, workdir: str) -> dict:
    wd = runtime.Workdir(workdir, config)
    if wd.finished:
        return wd.read_results()
    step = make_step(config)

    def step_fn(state, t):
        time.sleep(config.step_seconds)
        return step(state, np.int32(t))

    def on_checkpoint(t, state):
        if config.file_limit_kb:
            limit_file_sizes(config.file_limit_kb)

    state = runtime.train(
        wd,
        initial_state(config),
        step_fn,
        num_steps=config.num_steps,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        on_checkpoint=on_checkpoint,
    )
    wd.close()
    return wd.write_results({"w": np.asarray(state["w"]).tolist()})


if __name__ == "__main__":
    runtime.main(run)
