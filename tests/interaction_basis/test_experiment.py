"""The experiment end to end on tiny modular addition: training (early stop), analysis, report, resumption."""

import json
import os

import pytest
from theorax.configs import interaction_basis as config_lib
from theorax.experiments import interaction_basis as experiment


@pytest.mark.slow
def test_modadd_run_analyses_every_seed_and_resumes(tmp_path):
    config = config_lib.get_config("smoke")
    config.tasks = ("modadd",)
    config.modadd.seeds = (0, 1)
    config.modadd.stop_accuracy = 0.01  # stops at the first evaluations: exercises the early stop
    config.modadd.stop_patience = 25
    config.llc.enabled = False
    results = experiment.run(config, str(tmp_path))
    assert set(results["runs"]) == {"modadd_seed0", "modadd_seed1"}
    for tag, row in results["runs"].items():
        assert row["trained_steps"] <= 50
        assert os.path.exists(tmp_path / tag / "analysis.json")
        assert set(row["bases"]) == {"lib", "pca"}
        assert row["bases"]["lib"]["sizes"][-1] == config.modadd.p + 1
        assert len(row["edges"]["lib"]) == 3
    assert "modadd" in results["summary"]
    section = experiment.report(results, str(tmp_path))
    assert section.startswith("## Interaction basis") and "](./modadd_seed1_graph.png)" in section
    # A rerun reuses results.json; without it, each seed's analysis.json.
    os.remove(tmp_path / "results.json")
    again = experiment.run(config, str(tmp_path))
    assert json.dumps(again["runs"], sort_keys=True) == json.dumps(results["runs"], sort_keys=True)
