"""The benchmarks' machine record: a busy machine is refused unless allowed, and then marked; cores that slow
each other down are measured and warned about."""

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
