"""The solver options as one frozen, hashable value, validated once in plain Python.

`SolverConfig` names a multistep sampler and every option that shapes its coefficients: which solver, its order,
UniPC's B(h), the time grid's spacing, and the corrector switches. It is hashable, so it keys the plan cache
(`solvers.make_plan`) and can be a static argument of `jax.jit`; the number of steps is not part of it (one
config serves every NFE).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from theorax.models import diffusion

SOLVERS = ("ddim", "dpmsolver++", "unipc", "dc")
VARIANTS = ("bh1", "bh2")
DPM_SOLVER_TYPES = ("midpoint", "heun")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
    """A multistep diffusion ODE sampler and its options (the `solver=` of `sample` and `search_ratios`).

    Attributes:
      solver: one of `SOLVERS`: "ddim", "dpmsolver++" (multistep DPM-Solver++), "unipc" (UniPC-p), "dc"
        (DC-Solver: UniPC with dynamic compensation).
      order: the multistep order, 1-3 (DDIM is first order and ignores it).
      variant: UniPC's B(h): "bh1" (B(h) = -h, the LDM default) or "bh2" (B(h) = e^{-h} - 1).
      spacing: the time grid, one of `models.diffusion.SPACINGS` ("time_uniform", the paper's experiments).
      lower_order_final: lower the order on the final steps (the official default; see `solvers.step_orders`).
      use_corrector: UniPC's corrector (False gives the predictor-only UniP).
      disable_corrector: steps i whose corrector is skipped (diffusers' `disable_corrector`; the SD script of
        DC-Solver passes [0]); stored sorted and without repeats.
      dpm_solver_type: DPM-Solver++ 2M's "midpoint" (the diffusers default) or "heun".

    Example:
      >>> from theorax.inference.dc_solver import SolverConfig
      >>> config = SolverConfig("unipc", order=2, variant="bh2")
      >>> config.order, config.buffer_size
      (2, 3)
      >>> SolverConfig("unipc", variant="bh3")
      Traceback (most recent call last):
      ...
      ValueError: unknown variant 'bh3'; choose one of ['bh1', 'bh2']
    """

    solver: str
    order: int = 3
    variant: str = "bh1"
    spacing: str = "time_uniform"
    lower_order_final: bool = True
    use_corrector: bool = True
    disable_corrector: tuple[int, ...] = ()
    dpm_solver_type: str = "midpoint"

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; choose one of {list(SOLVERS)}")
        order = self.order
        if (
            isinstance(order, bool)
            or not isinstance(order, int | np.integer)
            or not 1 <= order <= 3
        ):
            raise ValueError(f"order={order!r} must be 1, 2 or 3")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if self.spacing not in diffusion.SPACINGS:
            raise ValueError(
                f"unknown spacing {self.spacing!r}; choose one of {list(diffusion.SPACINGS)}"
            )
        if self.dpm_solver_type not in DPM_SOLVER_TYPES:
            raise ValueError(
                f"unknown dpm_solver_type {self.dpm_solver_type!r}; choose one of "
                f"{list(DPM_SOLVER_TYPES)}"
            )
        try:
            disabled = tuple(sorted({int(i) for i in self.disable_corrector}))
        except (TypeError, ValueError):
            raise ValueError(
                f"disable_corrector must be a sequence of step indices, got {self.disable_corrector!r}"
            ) from None
        # Canonical types, so that equal options hash equally (numpy ints and bools, lists of steps).
        object.__setattr__(self, "order", int(order))
        object.__setattr__(self, "lower_order_final", bool(self.lower_order_final))
        object.__setattr__(self, "use_corrector", bool(self.use_corrector))
        object.__setattr__(self, "disable_corrector", disabled)

    @property
    def buffer_size(self) -> int:
        """M = max(order, 3) buffered predictions: three even for order 1-2, so that DC acts at every order."""
        return max(self.order, 3)

    def check_steps(self, nfe) -> int:
        """Checks that `nfe` is a number of steps this solver can take; returns it as an int."""
        if isinstance(nfe, bool) or not isinstance(nfe, int | np.integer) or nfe < 1:
            raise ValueError(f"nfe={nfe!r} must be a positive integer (the number of steps)")
        if self.solver != "ddim" and nfe < self.order:
            raise ValueError(
                f"nfe={nfe} is smaller than order={self.order}: a multistep solver of order "
                f"{self.order} needs at least {self.order} steps. Use nfe >= {self.order} or "
                f"order <= {nfe}."
            )
        return int(nfe)

    def time_steps(self, schedule: diffusion.VPSchedule, nfe: int) -> np.ndarray:
        """The grid t_0 = T > ... > t_nfe of `nfe` steps with this config's spacing (float64, (nfe + 1,))."""
        return diffusion.time_steps(schedule, self.check_steps(nfe), self.spacing)


def solver_config(solver: str | SolverConfig, **options) -> SolverConfig:
    """The `SolverConfig` of `solver=` as the public functions take it: a config, or a name and its options.

    Raises:
      TypeError: when a config and options are both given, or an option is not a `SolverConfig` field.
    """
    if isinstance(solver, SolverConfig):
        if options:
            raise TypeError(
                f"solver is a SolverConfig; give its options there, not as keywords too (got "
                f"{sorted(options)}). Use dataclasses.replace(config, ...) to change one."
            )
        return solver
    fields = {f.name for f in dataclasses.fields(SolverConfig)} - {"solver"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown solver options {unknown}; the options are {sorted(fields)}")
    return SolverConfig(solver, **options)
