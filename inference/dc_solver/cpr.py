"""Cascade polynomial regression (DC-Solver Sec. 3.4): the compensation ratios as a polynomial in (CFG, NFE, step).

Fitted by least squares on ratios searched for a few (NFE, CFG) settings, it predicts the ratios of unseen
settings without a search. The 36 coefficients are in the official layout (`sd2.1.npy` of the DC-Solver
repository; `third_party.dc_solver` reads and writes those files).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["CPR_SHAPE", "cpr_features", "cpr_fit", "cpr_predict"]

CPR_SHAPE = (4, 3, 3)  # (power of i/NFE: 0..3, CFG term: c^2, c, 1, NFE term: n^2, n, 1)


def cpr_features(cfg: float, nfe: int, step: int) -> np.ndarray:
    """The 36 monomials multiplying the CPR coefficients, in the official (4, 3, 3) layout, flattened.

    rho^_i = sum_j P_j x^j, P_j = A_j0 c^2 + A_j1 c + A_j2, A_jq = C_jq0 n^2 + C_jq1 n + C_jq2 with
    c = CFG / 12, n = NFE / 50, x = i / NFE, i the 1-based step (DC-Solver Sec. 3.4; reference Sec. 1.7), so
    the feature of C[j, q, r] is x^j c^(2 - q) n^(2 - r).
    """
    c, n, x = cfg / 12.0, nfe / 50.0, step / nfe
    xp = x ** np.arange(4)
    cp = c ** np.array([2.0, 1.0, 0.0])
    nn_ = n ** np.array([2.0, 1.0, 0.0])
    return (xp[:, None, None] * cp[None, :, None] * nn_[None, None, :]).reshape(-1)


def cpr_predict(coeffs, cfg: float, nfe: int) -> np.ndarray:
    """Ratios predicted by cascade polynomial regression for (CFG, NFE): (nfe,), the first two equal 1.

    Args:
      coeffs: 36 coefficients in the official layout (`sd2.1.npy` of DC-Solver; reshape (4, 3, 3)).
      cfg: guidance scale.
      nfe: number of steps.

    With the official SD 2.1 coefficients, CFG 7.5 and NFE 5 give [1, 1, 1.0271, 0.7392, 1.2263] (tested).

    Example (a fit that reproduces ratios it was given, then a prediction for an unseen NFE):
      >>> import numpy as np
      >>> from theorax.inference.dc_solver import cpr_fit, cpr_predict
      >>> true = np.zeros(36)
      >>> true[[8, 23]] = 1.0, 0.5  # rho_i = 1 + 0.5 (CFG / 12) (i / NFE)^2: C[0, 2, 2], C[2, 1, 2]
      >>> settings = [(c, n) for c in (1.0, 3.0, 7.5) for n in (5, 6, 8)]
      >>> coeffs = cpr_fit(settings, [cpr_predict(true, c, n) for c, n in settings])
      >>> np.round(cpr_predict(coeffs, 6.0, 4), 4).tolist()
      [1.0, 1.0, 1.1406, 1.25]
    """
    coeffs = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if coeffs.shape != (36,):
        raise ValueError(
            f"CPR coefficients must be 36 numbers ((4, 3, 3) flattened), got {coeffs.size}"
        )
    if int(nfe) < 1:
        raise ValueError(f"nfe={nfe} must be a positive integer")
    out = np.array([cpr_features(cfg, nfe, i) @ coeffs for i in range(1, nfe + 1)])
    out[: min(2, nfe)] = 1.0
    return out


def cpr_fit(
    settings: Sequence[tuple[float, int]], ratios: Sequence, *, ridge: float = 0.0
) -> np.ndarray:
    """Fits the 36 CPR coefficients to searched ratios by least squares.

    The model is linear in its coefficients, so the fit is one (regularised) linear least-squares problem over
    every searched step i >= 3 of every setting (the first two ratios are fixed to 1 and carry no information).
    The official fit used `scipy.optimize.curve_fit` on pairs not published; on a linear model it has the same
    minimiser. With too few distinct settings the system is rank-deficient and the minimum-norm solution is
    returned: use at least 3 NFEs x 3 CFGs (and NFE >= 6 somewhere, for the cubic in i/NFE), or set `ridge`.

    Args:
      settings: (cfg, nfe) for each searched setting.
      ratios: the searched ratios of each setting, (nfe,) each.
      ridge: optional L2 penalty on the coefficients.

    Returns:
      (36,) coefficients in the official layout.
    """
    if len(settings) != len(ratios) or not settings:
        raise ValueError(
            f"need one ratio vector per setting; got {len(settings)} settings, {len(ratios)} vectors"
        )
    rows, targets = [], []
    for (cfg, nfe), r in zip(settings, ratios, strict=True):
        r = np.asarray(r, dtype=np.float64)
        if r.shape != (nfe,):
            raise ValueError(
                f"ratios for (cfg={cfg}, nfe={nfe}) must have shape ({nfe},), got {r.shape}"
            )
        for i in range(3, nfe + 1):
            rows.append(cpr_features(cfg, nfe, i))
            targets.append(r[i - 1])
    a, y = np.asarray(rows), np.asarray(targets)
    if ridge > 0:
        a = np.concatenate([a, math.sqrt(ridge) * np.eye(36)])
        y = np.concatenate([y, np.zeros(36)])
    coeffs, *_ = np.linalg.lstsq(a, y, rcond=None)
    return coeffs
