"""Test-session set-up: 4 simulated CPU devices, set before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Libraries that read absl flags must not fail under pytest.
flags.FLAGS.mark_as_parsed()
