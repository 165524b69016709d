"""The DC-Solver bench's verdicts: own costs from the rounds' medians, with intervals that decide a target only
when the whole interval is on one side of it."""

import numpy as np
from theorax.experiments import bench_dc_solver


def test_own_cost_intervals_recover_known_own_costs():
    rng = np.random.default_rng(0)
    drift = np.linspace(1.0, 1.5, 30)  # the machine slows over the run; every program alike
    noise = lambda: 1 + 0.002 * rng.standard_normal(30)
    model = 5e-3 * drift
    their_model = 10e-3 * drift
    rounds = {
        "ours_model_alone": model * noise(),
        "ours_dc": (model + 1e-3 * drift) * noise(),  # own cost 20% of the model, 20x below theirs
        "ours_unipc": (model + 2.5e-3 * drift) * noise(),  # 50%, 8x below theirs
        "diffusers_model_alone": their_model * noise(),
        "diffusers_unipc": (their_model + 20e-3 * drift) * noise(),
    }
    out = bench_dc_solver.own_cost_intervals(rounds)
    near = lambda ci, value: (
        ci["low"] <= ci["estimate"] <= ci["high"] and np.isclose(ci["estimate"], value, rtol=0.03)
    )
    dc, unipc = out["ours_dc_own_over_model"], out["ours_unipc_own_over_model"]
    assert near(dc, 0.2) and dc["high"] < 0.25 and dc["verdict"] == "met"
    assert near(unipc, 0.5) and unipc["verdict"] == "not met"
    dc, unipc = (out[f"{n}_own_cost_ratio_vs_diffusers"] for n in ("ours_dc", "ours_unipc"))
    assert near(dc, 20) and dc["low"] > 10 and dc["verdict"] == "met"
    assert near(unipc, 8) and unipc["high"] < 10 and unipc["verdict"] == "not met"
    # Without diffusers' rounds only the shares are reported.
    mine = {k: v for k, v in rounds.items() if k.startswith("ours")}
    assert set(bench_dc_solver.own_cost_intervals(mine)) == {
        "ours_unipc_own_over_model",
        "ours_dc_own_over_model",
    }


def test_a_noisy_own_cost_near_the_target_is_within_the_noise():
    rng = np.random.default_rng(1)
    model = 5e-3 * (1 + 0.1 * rng.standard_normal(30))
    sampler = 1.25 * 5e-3 * (1 + 0.1 * rng.standard_normal(30))
    rounds = {"ours_model_alone": model, "ours_dc": sampler, "ours_unipc": sampler}
    assert bench_dc_solver.own_cost_intervals(rounds)["ours_dc_own_over_model"]["verdict"] == (
        "within the noise"
    )
