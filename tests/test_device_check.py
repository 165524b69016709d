"""The device check on the CPU with tiny sizes: the code path that goes to an accelerator, end to end (every
system's rows, the JSON and the table, the mesh over the 4 simulated devices), a workload too big for the device
refused with its size and the free memory, a missing torch skipped and said so, systems that join through
`device_workload`, and task (d)'s budgeted run scored against the quadrature reference."""

import importlib.machinery
import json
import os
import shlex
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from theorax.experiments import device_check, runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # every system's workload compiled on 4 fake CPU devices: ~100 s (the wiring tests below stay)
def test_tiny_check_runs_every_system_and_writes_json_and_table(tmp_path):
    result = device_check.run_device_check(
        str(tmp_path), tiny=True, torch_compile=False, allow_loaded=True
    )
    on_disk = json.load(open(tmp_path / "device_check.json"))
    assert on_disk["rows"] == json.loads(json.dumps(runtime.jsonable(result["rows"])))
    assert on_disk["devices"]["device_count"] == 4 and on_disk["devices"]["mesh"] == {"data": 4}
    rows = result["rows"]
    by_system = {s: [r for r in rows if r["system"] == s] for s in device_check.SYSTEMS}
    assert all(by_system.values()), {s: len(r) for s, r in by_system.items()}
    for r in rows:
        joining = r["system"] in ("deep kernel machines", "interaction basis")
        torch_row = "torch" in r["workload"]
        if r["status"] == "skipped":
            assert joining or torch_row, r
            assert r["note"], "a skipped row says why"
        else:
            assert r["status"] == "ok", r
    # Each JAX workload was compiled within the memory check and timed; the MLP rows have their fraction.
    timed = [r for r in rows if r["system"] not in ("chip",) and r["status"] == "ok"]
    jax_rows = [r for r in timed if "torch" not in r["workload"] and "memory_bytes" in r]
    assert len(jax_rows) == 2 + 1 + 2, [r["workload"] for r in jax_rows]
    for r in jax_rows:
        assert r["seconds"] > 0 and r["memory_bytes"]["total"] > 0 and r["compile_s"] > 0
    mlp = [r for r in jax_rows if r["system"] == "scaled MLPs"]
    assert [r["workload"].rsplit(", ", 1)[-1] for r in mlp] == ["float32", "bfloat16"]
    assert all(0 < r["fraction_of_matmul_rate"] for r in mlp)
    search = next(r for r in rows if "ratio search" in r["workload"])
    assert len(search["ratios"]) == device_check.TINY.dc_nfe
    assert np.all(np.isfinite(search["ratios"]))

    table = (tmp_path / "device_check.md").read_text()
    assert table == device_check.table(result)
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(body) == 1 + len(rows)  # the header and one line per row
    assert "4 x cpu" in table


def test_a_workload_that_does_not_fit_names_its_size_and_the_free_memory(tmp_path):
    result = device_check.run_device_check(
        str(tmp_path),
        tiny=True,
        memory_limit_bytes=100_000,
        allow_loaded=True,
        workloads=(device_check.scaled_mlp,),
    )
    [r] = result["rows"]
    assert r["status"] == "does not fit"
    assert "does not fit the device's memory: it needs 1.8" in r["note"]
    assert "97.7 KiB free" in r["note"] and "smaller batch" in r["note"]
    assert "RESOURCE_EXHAUSTED" not in r["note"]


def test_memory_refusal_reads_the_accelerators_free_memory(monkeypatch):
    """Where the backend reports memory (a GPU), the refusal compares with its free bytes and names the pool."""
    monkeypatch.setattr(
        runtime.memory,
        "device_memory",
        lambda device=None: {"limit": 8192, "in_use": 6144, "free": 2048},
    )
    f = jax.jit(lambda x: x + 1)
    small = jax.ShapeDtypeStruct((64,), np.float32)  # 512 B in and out
    runtime.compile_within_memory(f, small, what="small")
    with pytest.raises(runtime.DeviceMemoryError) as e:
        runtime.compile_within_memory(f, jax.ShapeDtypeStruct((1024,), np.float32), what="big")
    assert "big does not fit the device's memory: it needs 8.00 KiB per device" in str(e.value)
    assert "(arguments 4.00 KiB, outputs 4.00 KiB)" in str(e.value)
    assert "has 2.00 KiB free of 8.00 KiB" in str(e.value)


def test_missing_torch_skips_its_rows_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    result = device_check.run_device_check(
        str(tmp_path),
        tiny=True,
        allow_loaded=True,
        workloads=(device_check.matmul, device_check.scaled_mlp_torch),
    )
    matmul = [r for r in result["rows"] if r["system"] == "chip"]
    assert len(matmul) == 2 and all(r["status"] == "ok" for r in matmul)
    assert all("torch is not installed" in r["note"] for r in matmul)
    peers = [r for r in result["rows"] if "torch" in r["workload"]]
    assert len(peers) == 4  # eager and compile, float32 and bfloat16
    assert all(r["status"] == "skipped" and "torch is not installed" in r["note"] for r in peers)


def test_systems_join_through_their_device_workload(tmp_path, monkeypatch):
    name = "theorax.experiments.bench_dkm"
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.device_workload = lambda tiny: {
        "full DKM fit": {"seconds": 0.5, "rate": 2.0, "unit": "fits/s", "tiny": tiny},
        "sparse DKM step": {"seconds": 0.01},
    }
    monkeypatch.setitem(sys.modules, name, module)
    ib = device_check.joining("interaction basis", "theorax.experiments.bench_interaction_basis_x")
    result = device_check.run_device_check(
        str(tmp_path),
        tiny=True,
        allow_loaded=True,
        workloads=(device_check.joining("deep kernel machines", name), ib),
    )
    dkm, missing = result["rows"][:2], result["rows"][2]
    assert [r["workload"] for r in dkm] == ["full DKM fit", "sparse DKM step"]
    assert dkm[0]["tiny"] is True and dkm[0]["status"] == "ok"
    assert missing["status"] == "skipped" and "not in this tree yet" in missing["note"]
    assert "| deep kernel machines | full DKM fit | ok | 500 ms |" in device_check.table(result)


@pytest.mark.interop
def test_tiny_check_with_torch_compile(tmp_path):
    """The PyTorch peers eager and compiled (torch.compile takes minutes on a CPU)."""
    result = device_check.run_device_check(
        str(tmp_path),
        tiny=True,
        allow_loaded=True,
        workloads=(device_check.matmul, device_check.scaled_mlp_torch),
    )
    peers = [r for r in result["rows"] if "torch" in r["workload"]]
    assert len(peers) == 4 and all(r["status"] == "ok" and r["seconds"] > 0 for r in peers), peers


@pytest.mark.slow  # two compilations of the transformer's train step and the quadrature reference: ~40 s
def test_task_d_budgeted_run_is_scored_against_the_quadrature_reference(tmp_path):
    out, workdir = tmp_path / "out", tmp_path / "run"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "theorax.experiments.device_check", f"--out={out}"),
            "--tiny",
            "--gp_hyperprior_budget_s=0.2",
            "--gp_max_steps=20",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        env={**os.environ, "JAX_NUM_CPU_DEVICES": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.load(open(out / "gp_hyperprior.json"))
    steps = report["overrides"]["train.num_steps"]
    assert 10 <= steps <= 20 and report["probe_step_s"]["seconds"] > 0
    # The run is the plain experiment with those overrides: its resolved config and the printed command agree.
    entry = json.load(open(workdir / "gp_hyperprior" / "config.json"))
    assert entry["train"]["num_steps"] == steps and entry["baselines"]["nuts_problems"] == 0
    command = shlex.split(report["command"])
    assert command[:3] == ["python", "-m", "theorax.experiments.distribution_transformer"]
    assert f"--config.tasks.gp_hyperprior.train.num_steps={steps}" in command
    r = report["results"]
    dt = r["methods"]["DT-2"]
    assert dt["kl_estimator"] == "gap" and np.isfinite(dt["kl"]["mean"])
    ref = r["reference_nll"]
    # The quadrature reference is the floor of the NLL of the true latents (up to Monte Carlo noise).
    assert ref["mean"] < dt["nll"]["mean"]
    assert np.isfinite(ref["nll_y_star"]["mean"]) and np.isfinite(ref["nll_lengthscale"]["mean"])
    row = (out / "gp_hyperprior.md").read_text().strip()
    assert row == device_check.gp_hyperprior_row(report) and row in done.stdout
    assert row.startswith(f"| (d) GP, tiny, {steps} steps x 32 on 1 x cpu")
    assert "y* 0.81, l 0.31 |" in row
