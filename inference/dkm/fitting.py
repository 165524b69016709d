r"""Fitting deep kernel machines: Adam over minibatch epochs (the paper's optimiser) and full-batch L-BFGS.

* Adam (optax) with the official settings: learning rate 0.01, betas (0.8, 0.9), optionally the official
  MultiStepLR decay (x0.1 at given epochs). One epoch is one compiled program: a `lax.scan` over the epoch's
  minibatches (a fresh permutation per epoch from the seed and the epoch number), the data on the device, the
  training state donated. The full DKM takes one full-batch step per epoch.
* L-BFGS (optax's `lbfgs`, zoom line search) on the full-batch objective, for small problems; `chunk`
  iterations per compiled call. For a categorical likelihood its Monte Carlo draws are fixed (common random
  numbers) so that the objective is deterministic.

`make_trainer` returns the pieces an experiment drives through its own resumable loop
(`theorax.experiments.runtime.train`); `fit` runs them to the end and returns a `DKMState`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax
from theorax.inference.dkm import _checks, linalg
from theorax.inference.dkm.model import (
    DKMSpec,
    DKMState,
    ModelOptions,
    full_objective,
    init_params,
    make_spec,
    sparse_objective,
)

__all__ = ["FitOptions", "Trainer", "make_trainer", "fit", "precision"]

OPTIMIZERS = ("adam", "lbfgs")


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How a DKM is fitted.

    Attributes:
      optimizer: "adam" or "lbfgs".
      steps: Adam: epochs (one full-batch step each for the full DKM); L-BFGS: iterations.
      lr: Adam's learning rate (official 0.01).
      b1, b2: Adam's betas (official 0.8, 0.9).
      batch_size: the sparse DKM's minibatch (None: all training points); each epoch drops the last
        incomplete batch, as the official loader.
      lr_milestones: epochs at which Adam's learning rate is multiplied by 0.1 (official MultiStepLR).
      chunk: epochs (Adam) or iterations (L-BFGS) per compiled call; None: Adam enough epochs for >= 32
        minibatch steps, L-BFGS 50.
      seed: the PRNG seed (inducing-point subset, permutations, Monte Carlo draws).
    """

    optimizer: str = "adam"
    steps: int = 500
    lr: float = 0.01
    b1: float = 0.8
    b2: float = 0.9
    batch_size: int | None = None
    lr_milestones: tuple[int, ...] = ()
    chunk: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of {list(OPTIMIZERS)}")
        _checks.positive_int(self.steps, "steps")
        _checks.positive(self.lr, "lr")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie in [0, 1)")
        if self.batch_size is not None:
            _checks.positive_int(self.batch_size, "batch_size")
        if self.chunk is not None:
            _checks.positive_int(self.chunk, "chunk")
        object.__setattr__(self, "lr_milestones", tuple(int(m) for m in self.lr_milestones))


def precision(spec_or_dtype) -> contextlib.AbstractContextManager:
    """The scope a DKM computes in: `jax.enable_x64(True)` for float64, nothing for float32."""
    dtype = spec_or_dtype.options.dtype if isinstance(spec_or_dtype, DKMSpec) else spec_or_dtype
    return jax.enable_x64(True) if str(dtype) == "float64" else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A DKM's training, as pieces a loop drives.

    Attributes:
      spec: the `DKMSpec`.
      init_state: {"params", "opt"}: the NNGP-initialised parameters and the optimiser state.
      step: (state, i) -> (state, metrics): chunk i of `FitOptions.chunk` epochs (Adam) or iterations
        (L-BFGS), one compiled call; metrics (device scalars) are the objective per datapoint of the chunk's
        last epoch ("objective"), the loss (its negative) and the largest jitter escalation ("jitter_level").
        It donates `state`.
      num_steps: calls to `step` that make the whole fit.
      x, y: the training data on the device (as the spec's dtype / labels).
    """

    spec: DKMSpec
    init_state: dict
    step: Callable
    num_steps: int
    x: jax.Array
    y: jax.Array

    def state(self, train_state: dict) -> DKMState:
        """The `DKMState` of a training state."""
        full = not self.spec.sparse
        return DKMState(
            train_state["params"], self.x if full else None, self.y if full else None, self.spec
        )


def _loss(spec: DKMSpec, n_train: int, params, x, y, key):
    """The loss minimised: minus the objective per training point, and the jitter level."""
    if spec.sparse:
        value, level = sparse_objective(spec, params, x, y, n_train, key)
    else:
        value, level = full_objective(spec, params, x, y)
        value = value / n_train
    return -value, level


def _adam(options: FitOptions, steps_per_epoch: int) -> optax.GradientTransformation:
    lr = options.lr
    if options.lr_milestones:
        lr = optax.piecewise_constant_schedule(
            options.lr, {m * steps_per_epoch: 0.1 for m in options.lr_milestones}
        )
    return optax.adam(lr, b1=options.b1, b2=options.b2)


@functools.partial(
    jax.jit, static_argnames=("spec", "options", "batch", "epochs"), donate_argnums=0
)
def _adam_epochs(
    state, x, y, first_epoch, *, spec: DKMSpec, options: FitOptions, batch: int, epochs: int
):
    """`epochs` epochs of Adam from epoch `first_epoch`: a scan over epochs of a scan over minibatches."""
    n = x.shape[0]
    steps = n // batch
    tx = _adam(options, steps)
    grad_fn = jax.value_and_grad(functools.partial(_loss, spec, n), has_aux=True)

    def one(carry, inputs):
        params, opt = carry
        idx, k = inputs
        (loss, level), grads = grad_fn(params, x[idx], y[idx], k)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), (loss, level)

    def epoch(carry, e):
        key = jax.random.fold_in(jax.random.key(options.seed), first_epoch + e)
        k_perm, k_mc = jax.random.split(key)
        order = jax.random.permutation(k_perm, n) if batch < n else jnp.arange(n)
        order = order[: steps * batch].reshape(steps, batch)
        return lax.scan(one, carry, (order, jax.random.split(k_mc, steps)))

    carry = (state["params"], state["opt"])
    (params, opt), (losses, levels) = lax.scan(epoch, carry, jnp.arange(epochs))
    metrics = {
        "loss": jnp.mean(losses[-1]),
        "objective": -jnp.mean(losses[-1]),
        "jitter_level": jnp.max(levels),
    }
    return {"params": params, "opt": opt}, metrics


def _lbfgs() -> optax.GradientTransformationExtraArgs:
    return optax.lbfgs()


@functools.partial(jax.jit, static_argnames=("spec", "options", "iters"), donate_argnums=0)
def _lbfgs_chunk(state, x, y, *, spec: DKMSpec, options: FitOptions, iters: int):
    n = x.shape[0]
    key = jax.random.key(options.seed)  # fixed draws: a deterministic objective for the line search
    tx = _lbfgs()

    def fun(params):
        return _loss(spec, n, params, x, y, key)[0]

    value_and_grad = optax.value_and_grad_from_state(fun)

    def one(carry, _):
        params, opt = carry
        value, grad = value_and_grad(params, state=opt)
        updates, opt = tx.update(grad, opt, params, value=value, grad=grad, value_fn=fun)
        return (optax.apply_updates(params, updates), opt), value

    (params, opt), values = lax.scan(one, (state["params"], state["opt"]), None, length=iters)
    level = _loss(spec, n, params, x, y, key)[1]
    metrics = {"loss": values[-1], "objective": -values[-1], "jitter_level": level}
    return {"params": params, "opt": opt}, metrics


@functools.partial(jax.jit, static_argnames=("spec",))
def _init(spec: DKMSpec, x, y, key):
    return init_params(spec, x, y, key)


def make_trainer(
    x,
    y,
    *,
    depth: int,
    nu: float | Sequence[float],
    kernel: str | Callable = "relu",
    likelihood: str = "gaussian",
    num_inducing: int | None = None,
    model: ModelOptions | None = None,
    options: FitOptions | None = None,
) -> Trainer:
    """Validates everything (plain Python), initialises the DKM at the NNGP and returns its `Trainer`.

    Call it, and its `step`, inside `precision(trainer.spec)` when the model is float64 (`fit` does).
    Arguments as `fit`.
    """
    model = model or ModelOptions()
    options = options or FitOptions()
    spec, x, y = make_spec(
        x, y, depth=depth, nu=nu, kernel=kernel, likelihood=likelihood,
        num_inducing=num_inducing, options=model,
    )  # fmt: skip
    x = x.astype(spec.dtype)
    if likelihood == "gaussian":
        y = y.astype(spec.dtype)
    n = x.shape[0]
    batch = n if (options.batch_size is None or not spec.sparse) else options.batch_size
    if batch > n:
        raise ValueError(f"batch_size={batch} exceeds the {n} training points; use at most {n}")
    if options.optimizer == "lbfgs" and options.batch_size not in (None, n):
        raise ValueError("L-BFGS is full-batch: leave batch_size=None")
    params = _init(spec, x, y, jax.random.key(options.seed))
    if options.optimizer == "adam":
        opt = _adam(options, n // batch).init(params)
        chunk = options.chunk or min(options.steps, -(-32 // (n // batch)))
    else:
        opt = _lbfgs().init(params)
        chunk = options.chunk or 50
    num_steps = -(-options.steps // chunk)
    last = options.steps - (num_steps - 1) * chunk

    def step(state, i):
        size = chunk if i < num_steps - 1 else last
        if options.optimizer == "adam":
            first = jnp.asarray(i * chunk)
            return _adam_epochs(
                state, x, y, first, spec=spec, options=options, batch=batch, epochs=size
            )
        return _lbfgs_chunk(state, x, y, spec=spec, options=options, iters=size)

    # Fresh buffers: an optimiser state may alias the parameters, and the step donates both.
    opt = jax.tree.map(jnp.copy, opt)
    return Trainer(spec, {"params": params, "opt": opt}, step, num_steps, x, y)


def fit(
    x,
    y,
    *,
    depth: int,
    nu: float | Sequence[float],
    kernel: str | Callable = "relu",
    likelihood: str = "gaussian",
    num_inducing: int | None = None,
    model: ModelOptions | None = None,
    options: FitOptions | None = None,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> DKMState:
    r"""Fits a deep kernel machine: maximises the DKM objective from its NNGP initialisation.

    The objective (reference notes Sec. 2.1) is L(G_1..G_L) = log P(Y | G_L) - sum_l nu_l KL(N(0, G_l) ||
    N(0, K(G_{l-1}))); the full DKM maximises it exactly over Gram matrices on the P training points, the
    sparse DKM (`num_inducing=M`) maximises its inducing-point bound per datapoint (see
    `theorax.inference.dkm.model`). nu_l = inf makes layer l an NNGP layer (G_l = K(G_{l-1}) exactly), so
    nu = inf everywhere is the NNGP (a GP with the deep kernel); depth=0 is a GP with `kernel`.

    Args:
      x: training inputs (P, N_0).
      y: targets: (P,) or (P, C) floats for "gaussian", integer labels (P,) for "categorical".
      depth: hidden layers L >= 0.
      nu: nu_l > 0 per hidden layer: one number for all, or L of them (inf allowed).
      kernel: a kernel name of `theorax.models.dkm.KERNELS` ("relu", "sqexp", "normalised_gaussian",
        "linear") or a fixed function gram -> kernel.
      likelihood: "gaussian" (learned noise unless `model.learn_noise=False`) or "categorical".
      num_inducing: M inducing points (the sparse DKM), or None for the full DKM (Gaussian: the exact
        objective; categorical: the variational output at every training point).
      model: `ModelOptions` (initial hyper-parameters, what is learned, jitter, dtype, ...).
      options: `FitOptions` (optimizer, steps, lr, batch size, seed).
      callback: called as callback(i, metrics) after every chunk of epochs / L-BFGS iterations with host
        floats (one chunk behind the device).

    Returns:
      The fitted `DKMState` (use `predict`).

    Raises:
      ValueError: bad input (before anything compiles).
      FloatingPointError: a factorisation failed at every jitter level, or the objective became non-finite.

    >>> import numpy as np
    >>> from theorax.inference.dkm import predict
    >>> x = np.linspace(-2, 2, 12)[:, None]
    >>> state = fit(x, np.sin(2 * x[:, 0]), depth=1, nu=1.0, kernel="sqexp", options=FitOptions(steps=50))
    >>> mean, var = predict(state, x)
    >>> bool(np.mean((np.asarray(mean) - np.sin(2 * x[:, 0])) ** 2) < 0.05)
    True
    """
    model = model or ModelOptions()
    with precision(model.dtype):
        trainer = make_trainer(
            x, y, depth=depth, nu=nu, kernel=kernel, likelihood=likelihood,
            num_inducing=num_inducing, model=model, options=options,
        )  # fmt: skip
        state, worst, pending = trainer.init_state, 0, None

        def check(i, metrics):
            nonlocal worst
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(host["loss"]):
                raise FloatingPointError(
                    f"fit: the objective became non-finite at step {i} ({host}); lower the learning rate, "
                    "use float64 or a larger jitter"
                )
            worst = max(worst, int(host["jitter_level"]))
            if callback is not None:
                callback(i, host)

        for i in range(trainer.num_steps):
            state, metrics = trainer.step(state, i)
            if pending is not None:
                check(*pending)  # the previous step's metrics: the device runs one step ahead
            pending = (i, metrics)
        check(*pending)
        linalg.check_jitter(worst, "fit", trainer.spec.options.jitter)
        return trainer.state(state)
