"""The experiment's DGP part end to end at the smoke preset's sizes (slow: NUTS compiles for each width)."""

import pytest
from theorax.configs import dkm as configs
from theorax.experiments import dkm as experiment


@pytest.mark.slow
def test_dgp_part_runs_and_reports(tmp_path):
    config = configs.get_config("smoke")
    config.parts = ("dgp",)
    results = experiment.run(config, str(tmp_path))
    d = results["dgp"]
    assert d["widths"] == [2, 4] and len(d["rows"]) == 2
    assert all(0 < v for row in d["rows"] for v in row["dist_to_dkm"] + row["dist_to_nngp"])
    assert (tmp_path / "dgp.png").exists()
    assert "DGP check" in experiment.report(results, str(tmp_path))
