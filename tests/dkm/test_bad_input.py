"""Bad input gets a clear error naming the value before anything compiles: nu <= 0, Gram matrices that are not
positive semi-definite, data and targets of different lengths, more inducing points than data, a UCI directory
in the wrong layout. Ill-conditioned kernels escalate the jitter with a warning (test_objective.py)."""

import os

import numpy as np
import pytest
from theorax.configs import dkm as configs
from theorax.experiments import dkm as experiment
from theorax.experiments import runtime
from theorax.inference import dkm
from theorax.inference.dkm import fitting, objectives


def _data(p=8, n0=2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(p, n0))
    return x, np.sin(x[:, 0])


def _never_compiles(monkeypatch):
    """Fails the test if the compiled initialisation or objective is reached."""

    def boom(*args, **kwargs):
        raise AssertionError("reached compiled code before the input was checked")

    monkeypatch.setattr(fitting, "_init", boom)
    monkeypatch.setattr(objectives, "_objective_jit", boom)


@pytest.mark.parametrize("nu", [0.0, -1.0, float("nan"), (1.0, 0.0)])
def test_non_positive_nu_is_refused(nu):
    x, y = _data()
    with pytest.raises(ValueError, match=r"nu\[\d\]=.* must be > 0"):
        dkm.fit(x, y, depth=2, nu=nu)
    with pytest.raises(ValueError, match="must be > 0"):
        dkm.objective([np.eye(8), np.eye(8)], x, y, nu=nu)


def test_wrong_number_of_nu_values_is_refused():
    x, y = _data()
    with pytest.raises(ValueError, match="3 values for 2 hidden layers"):
        dkm.fit(x, y, depth=2, nu=(1.0, 1.0, 1.0))


def test_gram_that_is_not_positive_semi_definite_is_refused():
    x, y = _data(4)
    bad = np.diag([1.0, 1.0, 1.0, -0.5])
    with pytest.raises(ValueError, match=r"grams\[0\] is not positive semi-definite: .*-0.5"):
        dkm.objective([bad], x, y, nu=1.0)
    with pytest.raises(ValueError, match="not symmetric"):
        dkm.objective([np.triu(np.ones((4, 4)))], x, y, nu=1.0)
    with pytest.raises(ValueError, match=r"shape \(3, 3\); expected \(4, 4\)"):
        dkm.objective([np.eye(3)], x, y, nu=1.0)
    with pytest.raises(ValueError, match="NaN|finite"):
        dkm.objective([np.full((4, 4), np.nan)], x, y, nu=1.0)


def test_data_and_targets_of_different_lengths_are_refused(monkeypatch):
    x, y = _data()
    _never_compiles(monkeypatch)
    with pytest.raises(ValueError, match="x has 8 points but y has shape \\(7,\\)"):
        dkm.fit(x, y[:7], depth=1, nu=1.0)
    with pytest.raises(ValueError, match="x has 8 points"):
        dkm.objective([np.eye(8)], x, y[:5], nu=1.0)


def test_more_inducing_points_than_data_is_refused(monkeypatch):
    x, y = _data()
    _never_compiles(monkeypatch)
    with pytest.raises(ValueError, match="num_inducing=9 exceeds the 8 training points"):
        dkm.fit(x, y, depth=1, nu=1.0, num_inducing=9)


def test_other_bad_arguments_are_named(monkeypatch):
    x, y = _data()
    _never_compiles(monkeypatch)
    with pytest.raises(ValueError, match="kernel='tanh' is not one of"):
        dkm.fit(x, y, depth=1, nu=1.0, kernel="tanh")
    with pytest.raises(ValueError, match="2-D array"):
        dkm.fit(x[:, 0], y, depth=1, nu=1.0)
    with pytest.raises(ValueError, match="batch_size=9 exceeds the 8 training points"):
        dkm.fit(x, y, depth=1, nu=1.0, num_inducing=4, options=dkm.FitOptions(batch_size=9))
    with pytest.raises(ValueError, match="categorical labels must lie in"):
        dkm.fit(x, -np.ones(8, int), depth=1, nu=1.0, likelihood="categorical")
    with pytest.raises(ValueError, match="depth=-1"):
        dkm.nngp_gram(x, -1)
    with pytest.raises(ValueError, match="NaN|finite"):
        dkm.fit(np.where(x > 1, np.nan, x), y, depth=1, nu=1.0)


def test_uci_directory_in_the_wrong_layout_is_a_config_error(tmp_path):
    # data.txt directly under <name>/ instead of <name>/data/
    os.makedirs(tmp_path / "yacht")
    np.savetxt(tmp_path / "yacht" / "data.txt", np.ones((4, 3)))
    config = configs.get_config("uci")
    config.regression.data_dir = str(tmp_path)
    config.regression.datasets = ("yacht",)
    with pytest.raises(
        runtime.ConfigError, match=r"'yacht' is missing \['data.txt'.*expected layout"
    ):
        experiment.validate(config)
    config = configs.get_config("cpu")
    config.regression.dkm.nu = 0.0
    with pytest.raises(runtime.ConfigError, match="regression.dkm.nu=0.0 must be > 0"):
        experiment.validate(config)


def test_a_uci_set_runs_at_most_the_splits_it_has(tmp_path):
    # protein has 5 standard splits where the other sets have 20: the preset's 20 must not refuse it
    root = tmp_path / "protein-tertiary-structure" / "data"
    os.makedirs(root)
    for f in ("data.txt", "index_features.txt", "index_target.txt"):
        (root / f).write_text("0\n")
    for k in range(5):
        for s in ("train", "test"):
            (root / f"index_{s}_{k}.txt").write_text("0\n")
    (root / "n_splits.txt").write_text("5\n")
    config = configs.get_config("uci")
    config.regression.data_dir = str(tmp_path)
    config.regression.datasets = ("protein-tertiary-structure",)
    assert experiment.num_splits(config, "protein-tertiary-structure") == 5
    experiment.validate(config)
    config.regression.splits = 3
    assert experiment.num_splits(config, "protein-tertiary-structure") == 3
