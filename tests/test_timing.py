"""The benchmarks' machine record: a busy machine is refused unless allowed, and then marked; cores that slow
each other down are measured and warned about."""

import numpy as np
import pytest
from theorax.experiments import timing


def test_machine_refuses_a_loaded_machine_unless_allowed(monkeypatch):
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (1.7, 1.0, 0.5))
    with pytest.raises(
        timing.LoadedMachineError, match=r"load average is 1.70 .*--allow_loaded_machine"
    ):
        timing.machine()
    record = timing.machine(allow_loaded=True)
    assert record["under_load"] and record["load_1min"] == 1.7
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.2, 1.0, 0.5))
    record = timing.machine()
    assert not record["under_load"] and record["cpu_count"] >= 1 and record["jax"]


def test_core_rates_runs_one_probe_per_core_and_a_low_share_warns(monkeypatch, capsys):
    import os

    rates = timing.core_rates(seconds=0.1)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        assert rates is None
    else:
        assert rates["cores"] == cpus[:8] and len(rates["together_per_s"]) == len(rates["cores"])
        assert rates["alone_per_s"] > 0 and min(rates["together_per_s"]) > 0
        assert rates["share"] == min(rates["together_per_s"]) / rates["alone_per_s"]
    # Two cores, the second running at half the rate when both are busy: recorded and warned about.
    monkeypatch.setattr(timing.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(timing.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(timing, "_probe", lambda cpus, s: [100.0, 50.0][: len(cpus)])
    record = timing.machine()
    assert record["core_rates"]["share"] == 0.5 and "50% of one core" in capsys.readouterr().err
    monkeypatch.setattr(timing, "_probe", lambda cpus, s: [100.0, 95.0][: len(cpus)])
    assert timing.machine()["core_rates"]["share"] == 0.95 and not capsys.readouterr().err
    assert timing.machine(probe_cores=False)["core_rates"] is None


def test_interleaved_times_every_peer_in_alternating_order(monkeypatch):
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    calls = []
    out = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert set(out) == {"a", "b"} and all(v["min_s"] <= v["median_s"] for v in out.values())
    calls.clear()
    timing.interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, settle=1
    )
    assert (
        "".join(calls) == "ab" + "aabb" + "bbaa"
    )  # warm-up, then each timed call after one untimed


def test_thunk_profile_names_the_matmuls_and_the_rest():
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: jnp.tanh(a @ b) + 1.0)
    a = jnp.ones((64, 64))
    rows = timing.thunk_profile(
        lambda: f(a, a).block_until_ready(), f.lower(a, a).compile().as_text(), calls=3
    )
    assert rows and all(r["ms_per_call"] >= 0 and r["count_per_call"] > 0 for r in rows)
    assert any(r["matmul"] for r in rows)
    assert all(r["op_name"].startswith("jit(") for r in rows if r["matmul"])


def test_interleaved_rounds_attribute_each_call_to_its_peer(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    # Peer a's calls take 1 s of the fake clock, b's 2 s.
    ticks = lambda d: lambda: clock.__setitem__(0, clock[0] + d)
    rounds = timing.interleaved_rounds({"a": ticks(1.0), "b": ticks(2.0)}, 3)
    assert rounds == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    assert timing.summarize({"a": [3.0, 1.0, 2.0]}) == {"a": {"min_s": 1.0, "median_s": 2.0}}


def test_bootstrap_keeps_the_rounds_paired():
    """A peer twice as slow as another, both slowed alike by a machine that drifts 3x over the run: the ratio's
    interval is tight around 2 because resampling keeps each round's two calls together; the same times with
    the pairing broken (one peer's rounds shuffled) give an interval many times wider."""
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 3.0, 40)
    rounds = {
        "fast": drift * (1 + 0.01 * rng.standard_normal(40)),
        "slow": 2 * drift * (1 + 0.01 * rng.standard_normal(40)),
    }
    ratio = lambda t: np.median(t["slow"]) / np.median(t["fast"])
    paired = timing.bootstrap(ratio, rounds)
    assert paired["low"] <= 2 <= paired["high"] and paired["high"] - paired["low"] < 0.1
    assert paired["estimate"] == ratio(rounds) and paired["level"] == 0.9
    unpaired = timing.bootstrap(ratio, {**rounds, "fast": rng.permutation(rounds["fast"])})
    assert unpaired["high"] - unpaired["low"] > 5 * (paired["high"] - paired["low"])


def test_bootstrap_interval_covers_the_true_median_about_as_often_as_its_level():
    """The 90% interval of a median from 30 draws of an exponential (true median log 2) holds it in roughly
    90% of 200 independent data sets (a percentile bootstrap of a median runs a little off its level)."""
    rng = np.random.default_rng(1)
    hits = 0
    for seed in range(200):
        draws = {"t": rng.exponential(size=30)}
        ci = timing.bootstrap(lambda t: np.median(t["t"]), draws, resamples=400, seed=seed)
        hits += ci["low"] <= np.log(2) <= ci["high"]
    assert 0.8 <= hits / 200 <= 0.97


def test_verdict_needs_the_whole_interval_on_one_side_of_the_bound():
    ci = lambda low, high: {"low": low, "high": high}
    assert timing.verdict(ci(0.18, 0.24), at_most=0.25) == "met"
    assert timing.verdict(ci(0.20, 0.31), at_most=0.25) == "within the noise"
    assert timing.verdict(ci(0.26, 0.31), at_most=0.25) == "not met"
    assert timing.verdict(ci(1.12, 1.3), at_least=1.10) == "met"
    assert timing.verdict(ci(1.02, 1.12), at_least=1.10) == "within the noise"
    assert timing.verdict(ci(0.95, 1.05), at_least=1.10) == "not met"


_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}:\n    pass\n"


def test_cpu_seconds_counts_our_children_as_ours_and_foreign_cpu_the_rest(tmp_path):
    import subprocess
    import sys
    import time

    start = timing.cpu_seconds()
    if start is None:
        pytest.skip("no /proc")
    # A child of ours burns 0.6 s of CPU: ours.
    subprocess.run([sys.executable, "-c", _BURN.format(s=0.6)], check=True)
    middle = timing.cpu_seconds()
    assert middle["ours_s"] - start["ours_s"] >= 0.5
    # A process that is not below us (its parent exits at once, so it is reparented) burns 0.8 s: foreign.
    done = tmp_path / "done"
    burner = _BURN.format(s=0.8) + f"open({str(done)!r}, 'w').close()\n"
    launcher = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {burner!r}])"
    subprocess.run([sys.executable, "-c", launcher], check=True)
    while not done.exists():
        time.sleep(0.05)
    end = timing.cpu_seconds()
    assert end["ours_s"] - middle["ours_s"] < 0.5  # polling, not burning
    foreign = timing.foreign_cpu(middle)
    assert foreign["seconds"] >= 0.7 and 0 < foreign["share"] <= 1


def test_write_results_marks_a_run_that_shared_the_cores(tmp_path, monkeypatch, capsys):
    import json

    record = {"under_load": False, "cpu_at_start": {"wall": 0.0, "busy_s": 0.0, "ours_s": 0.0}}
    for share, marked in ((0.02, False), (0.4, True)):
        monkeypatch.setattr(
            timing, "foreign_cpu", lambda start, s=share: {"seconds": 1.0, "share": s}
        )
        result = {"machine": dict(record), "under_load": False}
        path = timing.write_results(str(tmp_path), "r.json", result, ["table"])
        saved = json.load(open(path))
        assert saved["under_load"] is marked and saved["machine"]["under_load"] is marked
        assert saved["machine"]["foreign_cpu"]["share"] == share
        out = capsys.readouterr().out
        assert ("not results" in out) is marked and "of the cores during the run" in out.lower()
