"""Test-session set-up, before JAX initialises: 4 simulated CPU devices, one compilation cache, and the fast
tier's XLA optimisation level."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the session, which the xdist workers and the subprocesses the tests
# start inherit: a program that several tests (or a test and its subprocess) compile is compiled once. It
# starts empty and is removed at exit, so a run does not depend on an earlier one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="theorax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import jax  # noqa: E402
from absl import flags  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Libraries that read absl flags must not fail under pytest.
flags.FLAGS.mark_as_parsed()

# The fast tier's programs are small, so compiling them is most of its time, and LLVM's optimisation was about
# half of that: it compiles with XLA's backend optimisation level 0 (the same HLO passes and fusions, the same
# library calls for matrix products, unoptimised LLVM code for the loops), which halved the tier's time. The
# slow and interop tiers, whose training runs are compute-bound, and a level the caller set keep theirs.
FAST_TIER = "not slow and not interop"


def pytest_configure(config):
    flags_now = os.environ.get("XLA_FLAGS", "")
    if config.option.markexpr != FAST_TIER or "xla_backend_optimization_level" in flags_now:
        return
    from jax._src import xla_bridge

    assert not xla_bridge.backends_are_initialized(), "XLA_FLAGS must be set before JAX starts"
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_backend_optimization_level=0".strip()
