"""DC-Solver and the multistep samplers it builds on (DDIM, DPM-Solver++, UniPC), the ratio search and CPR.

* `config`: `SolverConfig`, the solver and its options as one frozen, validated, hashable value.
* `solvers`: the solvers' coefficient plans (`make_plan`, immutable, cached by value) and the one scan that
  runs every solver and the ratio search.
* `sampling`: `sample` and `sample_with_trajectory` (and `lower_sample`, the program `sample` runs).
* `search`: the greedy `search_ratios` and its many-step DDIM ground truth (`ddim_reference`).
* `cpr`: cascade polynomial regression, `cpr_fit` / `cpr_predict` in the official 36-number layout.
"""

from theorax.inference.dc_solver.config import SOLVERS, VARIANTS, SolverConfig
from theorax.inference.dc_solver.cpr import cpr_features, cpr_fit, cpr_predict
from theorax.inference.dc_solver.sampling import lower_sample, sample, sample_with_trajectory
from theorax.inference.dc_solver.search import (
    GT_MODES,
    ddim_reference,
    ldm_reference_index,
    search_ratios,
)
from theorax.inference.dc_solver.solvers import Guidance, Plan, make_plan

__all__ = [
    "Guidance",
    "SolverConfig",
    "SOLVERS",
    "VARIANTS",
    "GT_MODES",
    "Plan",
    "make_plan",
    "lower_sample",
    "sample",
    "sample_with_trajectory",
    "search_ratios",
    "ddim_reference",
    "ldm_reference_index",
    "cpr_fit",
    "cpr_predict",
    "cpr_features",
]
