"""The checks and normalisations at the boundary of `sample` and `search_ratios`, in plain Python.

Bad input raises here, before anything is traced. What passes is put in one canonical form, so that equal
values given in different forms (a list, numpy float64 or jnp float32 ratios; a Python or numpy guidance scale)
reach the compiled functions as arrays of one dtype and share one program.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.dc_solver.solvers import Guidance
from theorax.models import diffusion
from theorax.models.validation import check_finite


def check_schedule(schedule) -> None:
    if not isinstance(schedule, diffusion.VPSchedule):
        raise TypeError(
            f"schedule must be a models.diffusion.VPSchedule, got {type(schedule).__name__}"
        )


def noise(x_T) -> jax.Array:
    """The initial noise as a float JAX array with a leading batch axis."""
    if not hasattr(x_T, "shape") or len(x_T.shape) < 1:
        raise ValueError("x_T must be an array with a leading batch axis")
    if not isinstance(x_T, jax.Array):
        x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"x_T must be a float array, got dtype {x_T.dtype}")
    return x_T


def ratios(values, solver: str, nfe: int) -> np.ndarray | None:
    """The compensation ratios as float64 numpy (nfe,), or None for no compensation."""
    if values is None:
        if solver == "dc":
            raise ValueError(
                "solver='dc' needs ratios of shape (nfe,): search them with search_ratios(...) or predict "
                "them with cpr_predict(...); all-ones ratios give UniPC"
            )
        return None
    if solver not in ("dc", "dpmsolver++"):
        raise ValueError(
            f"ratios apply to solver='dc' (UniPC + DC) or 'dpmsolver++' (DC as a plug-in); got "
            f"solver={solver!r}. Drop ratios or change the solver."
        )
    shape = np.shape(values)
    if shape != (nfe,):
        raise ValueError(
            f"ratios must have shape ({nfe},) (one per step, nfe={nfe}); got shape {shape}"
        )
    check_finite(values, "ratios")
    return np.asarray(values, dtype=np.float64)


def eps_fn_and_guidance(eps_fn, guidance, dtype) -> tuple[jax.tree_util.Partial, Guidance | None]:
    """Checks the model against the guidance; returns the model as a `Partial` and the guidance with its
    scale as a numpy array of the state's dtype.

    Model functions travel through jit as `jax.tree_util.Partial` pytrees: the function is static (a new
    function object compiles anew), its bound arguments are traced (new values of the same shapes do not).
    """
    if not callable(eps_fn):
        raise TypeError(f"eps_fn must be callable as eps_fn(x, t), got {type(eps_fn).__name__}")
    partial = eps_fn if isinstance(eps_fn, jax.tree_util.Partial) else jax.tree_util.Partial(eps_fn)
    if guidance is None:
        return partial, None
    if not isinstance(guidance, Guidance):
        raise TypeError(
            f"guidance must be a Guidance(labels, scale) or None, got {type(guidance).__name__}"
        )
    for arg in partial.args:
        if isinstance(arg, diffusion.GaussianMixture) and arg.num_classes is None:
            raise ValueError(
                "guidance was given but the GaussianMixture has no class_weights (a model without "
                "conditions); build it with GaussianMixture.class_conditional(...) or pass guidance=None"
            )
    signature = (partial.func, len(partial.args), tuple(partial.keywords))
    try:
        takes_labels = _takes_labels(*signature)
    except TypeError:  # an unhashable callable: check it uncached (jit will reject it anyway)
        takes_labels = _takes_labels.__wrapped__(*signature)
    if not takes_labels:
        name = getattr(partial.func, "__name__", partial.func)
        raise ValueError(
            f"guidance was given but eps_fn {name!r} takes no labels argument "
            "(a model without conditions); classifier-free guidance calls eps_fn(x, t, labels) and "
            "eps_fn(x, t, None). Pass guidance=None or a conditional model."
        )
    check_finite(guidance.scale, "guidance scale")
    return partial, Guidance(guidance.labels, np.asarray(guidance.scale, dtype=dtype))


@functools.lru_cache(maxsize=64)
def _takes_labels(func, num_bound: int, keywords: tuple[str, ...]) -> bool:
    """Whether func(*bound, x, t, labels) binds (cached: `inspect.signature` costs ~0.1 ms a call)."""
    try:
        inspect.signature(func).bind(*[None] * (num_bound + 3), **dict.fromkeys(keywords))
    except TypeError:
        return False
    except ValueError:  # no signature available (builtins): let tracing report it
        pass
    return True


def raise_non_finite(bad, ts: np.ndarray, what: str) -> None:
    """Raises `FloatingPointError` when the compiled run flagged a non-finite model output."""
    bad = int(bad)
    if bad >= 0:
        raise FloatingPointError(
            f"{what}: the model returned non-finite values at evaluation {bad} (t={ts[bad]:.6g}); "
            "check the model (and its inputs' scale) and the guidance scale"
        )
