"""Packaging: one import name. The built wheel holds `theorax` alone, every subpackage on disk is declared, and
theorax works from a directory whose own `models/` and `configs/` packages would shadow generic names."""

import os
import subprocess
import sys
import tomllib
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _declared_packages():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"theorax": "."}
    return setuptools["packages"]


def test_every_package_folder_is_declared_under_theorax():
    on_disk = {"theorax"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith((".", "_")) and d not in ("tests", "results", "build")
        ]
        rel = os.path.relpath(dirpath, ROOT)
        if rel != "." and "__init__.py" in filenames:
            on_disk.add("theorax." + rel.replace(os.sep, "."))
    assert sorted(_declared_packages()) == sorted(on_disk)


def test_wheel_has_theorax_as_its_only_top_level_package(tmp_path):
    # Build from a copy of the tracked files, so the checkout gets no build/ or egg-info.
    files = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    src = tmp_path / "src"
    for rel in files:
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(ROOT, rel), "rb") as f:
            dest.write_bytes(f.read())
    out = tmp_path / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(src),
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = out.glob("theorax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"theorax"}
    for pkg in _declared_packages():
        assert pkg.replace(".", "/") + "/__init__.py" in names
    assert "theorax/inference/dc_solver/sampling.py" in names
    assert not any(n.startswith("theorax/tests/") for n in names)


def test_imports_and_a_smoke_run_beside_decoy_models_and_configs(tmp_path):
    # A user's project with packages named like our layers: importing them at all is a failure.
    for name in ("models", "configs", "inference", "experiments"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(
            f"raise ImportError('decoy {name} imported')\n"
        )
        (tmp_path / name / "dc_solver.py").write_text(
            f"raise ImportError('decoy {name} imported')\n"
        )
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(tmp_path)}
    code = "import theorax.inference.dc_solver as d, theorax.models.diffusion as m; print(d.sample.__module__)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "theorax.inference.dc_solver.sampling"
    config = os.path.join(ROOT, "configs", "dc_solver.py")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "theorax.experiments.dc_solver",
            f"--config={config}:smoke",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "results.json").exists()
