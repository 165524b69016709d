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


def test_exact_gps_take_a_fixed_random_subset_of_a_large_training_set():
    import numpy as np

    config = configs.get_config("smoke")
    config.regression.exact_gp.max_train = 25
    x = np.arange(80.0).reshape(40, 2)
    split = experiment.Split("toy", 0, x, x[:, 0], x[:5], x[:5, 0], 0.0, 1.0)
    xs, ys, info = experiment._exact_gp_subset(config, split)
    assert xs.shape == (25, 2) and np.array_equal(xs[:, 0], ys) and len(set(ys)) == 25
    assert info == {"subset_of": 40, "n_fitted": 25}
    assert np.array_equal(
        experiment._exact_gp_subset(config, split)[0], xs
    )  # the same for both exact GPs
    config.regression.exact_gp.max_train = 40
    assert experiment._exact_gp_subset(config, split)[2] == {}


@pytest.mark.slow
def test_exact_gp_fits_a_subset_of_a_large_training_set_and_the_table_says_so(tmp_path):
    config = configs.get_config("smoke")
    r = config.regression
    r.methods, r.exact_gp.max_train, r.exact_gp.iters = ("exact_gp",), 25, 3
    results = experiment.run(config, str(tmp_path))
    (row,) = results["regression"]["datasets"]["diabetes"]["splits"]["exact_gp"]
    assert row["n_fitted"] == 25 and row["subset_of"] == 40
    assert "exact GP, RBF (JAX) fitted on a random subset" in experiment.report(
        results, str(tmp_path)
    )
    r.exact_gp.subset = False  # the other choice: skipped, with the reason
    skipped = experiment._methods_to_run(config, 40)[1]
    assert "max_train=25" in skipped["exact_gp"]
