"""Experiment modules are importable together and callable from plain Python (a notebook), without absl.

(a) One process imports every `theorax.experiments.*` module; none may define absl flags at import time (two
modules defining `--out` in one process raise `DuplicateFlagError`), so each module's flags live under its
`if __name__ == "__main__":`. (b) Each system's `run(get_config("smoke"), workdir)` runs in a fresh process
that never parses absl flags, with a Jupyter kernel's `sys.argv`, and returns the results it wrote.
"""

import functools
import importlib.util
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import theorax.experiments
from theorax.experiments.demo import SYSTEMS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(
    f"theorax.experiments.{m.name}" for m in pkgutil.iter_modules(theorax.experiments.__path__)
)
# Peers that only the `interop` extra installs; a module that needs a missing one is skipped.
OPTIONAL = ("torch", "diffusers")

# argv: the optional peers (comma-separated), then the modules, imported in this order in one process.
IMPORT_ALL = """
import importlib, json, sys
from absl import flags

optional, report = sys.argv[1].split(","), {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        report[name] = {"missing": e.name} if e.name in optional else {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:
        report[name] = {"error": f"{type(e).__name__}: {e}"}
    else:
        report[name] = {"flags": [f.name for f in flags.FLAGS.flags_by_module_dict().get(name, [])]}
print(json.dumps(report))
"""

# argv: the system and the workdir. Then the notebook's view: a Jupyter kernel's argv, no absl parsing.
NOTEBOOK = """
import importlib, json, sys
system, workdir = sys.argv[1:]
sys.argv = ["ipykernel_launcher.py", "-f", "/tmp/kernel-theorax.json"]
from absl import flags

config = importlib.import_module(f"theorax.configs.{system}").get_config("smoke")
experiment = importlib.import_module(f"theorax.experiments.{system}")
results = experiment.run(config, workdir)
section = experiment.report(results, workdir)
assert not flags.FLAGS.is_parsed(), "something parsed absl flags"
print(json.dumps({"results": results, "report": section}))
"""


def python(script: str, *args: str, cwd) -> dict:
    """Runs `script` in a fresh interpreter on one CPU device; returns the JSON of its last line."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def _import_report() -> dict:
    return python(IMPORT_ALL, ",".join(OPTIONAL), *MODULES, cwd=ROOT)


@pytest.mark.parametrize("module", MODULES)
def test_every_experiment_module_imports_in_one_process_without_absl_flags(module):
    outcome = _import_report()[module]
    if "missing" in outcome:
        assert importlib.util.find_spec(outcome["missing"]) is None, outcome
        pytest.skip(f"{module} needs {outcome['missing']} (the interop extra)")
    assert "error" not in outcome, f"importing {module} after the others: {outcome['error']}"
    assert not outcome["flags"], (
        f"{module} defines absl flags at import time: {outcome['flags']}; define them only when it runs "
        "as a script (a define_flags() called under `if __name__ == '__main__':`)"
    )


# One system in the fast tier (the notebook path is the shared runtime's; each system's smoke run is tested
# in its own directory); every system under -m slow (~25-55 s each here).
@pytest.mark.parametrize(
    "system", [s if s == "scaled_mlp" else pytest.param(s, marks=pytest.mark.slow) for s in SYSTEMS]
)
def test_run_is_callable_from_a_notebook(system, tmp_path):
    workdir = str(tmp_path / system)
    out = python(NOTEBOOK, system, workdir, cwd=tmp_path)
    assert out["results"], f"{system}.run returned no results"
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f) == out["results"]
    assert out["report"].startswith("## ")
