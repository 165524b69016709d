"""DC-Solver and the multistep samplers it builds on (DDIM, DPM-Solver++, UniPC), the ratio search and CPR.

* `solvers`: the solvers' coefficient plans and the one compiled scan that runs every solver.
* `sampling`: `sample`, the greedy `search_ratios`, the DDIM ground truth and cascade polynomial regression.
"""

from theorax.inference.dc_solver.sampling import (
    GT_MODES,
    cpr_features,
    cpr_fit,
    cpr_predict,
    ddim_reference,
    ldm_reference_index,
    plan_for,
    sample,
    sample_with_trajectory,
    search_ratios,
)
from theorax.inference.dc_solver.solvers import SOLVERS, VARIANTS, Guidance

__all__ = [
    "Guidance",
    "SOLVERS",
    "VARIANTS",
    "GT_MODES",
    "sample",
    "sample_with_trajectory",
    "search_ratios",
    "ddim_reference",
    "ldm_reference_index",
    "plan_for",
    "cpr_fit",
    "cpr_predict",
    "cpr_features",
]
