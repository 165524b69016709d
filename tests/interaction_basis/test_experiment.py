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


def test_llc_measure_retries_once_at_a_tenth_of_the_step_when_sgld_diverges(monkeypatch):
    import types

    import jax.numpy as jnp
    from theorax.inference import interaction_basis as ib

    steps = []

    def fake_llc(loss_fn, params, data, key, *, step_size, **kwargs):
        steps.append(step_size)
        if len(steps) == 1:
            raise FloatingPointError("llc: SGLD diverged (a non-finite loss) in chains [2] of 4")
        return ib.LLCEstimate(5.0, 0.5, jnp.array([4.5, 5.5]), 0.1, jnp.zeros((2, 3)), 10.0)

    monkeypatch.setattr(experiment.ib, "llc", fake_llc)
    config = config_lib.get_config("smoke")
    net = types.SimpleNamespace(loss_fn=None, llc_data=(jnp.zeros((8, 2)), jnp.zeros(8)))
    trained = types.SimpleNamespace(params={"w": jnp.zeros(3)}, seed=0)
    out = experiment.llc_measure(config, net, trained)
    assert steps == [config.llc.step_size, config.llc.step_size / 10]
    assert (
        out["step_size"] == config.llc.step_size / 10
        and "chains [2]" in out["diverged_at_config_step"]
    )
    assert out["llc_mean"] == 5.0
