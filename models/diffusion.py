"""Variance-preserving diffusion: noise schedules, time grids, model wrappers and an analytic model.

The forward process is q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with sigma_t = sqrt(1 - alpha_t^2) and the
half-logSNR lambda_t = log alpha_t - log sigma_t (DPM-Solver, Lu et al. 2022, Sec. 2; the DC-Solver notes,
reference/dc_solver.md Sec. 1.1). Everything here is a pure function or a pytree:

* `VPSchedule`: discrete (from betas; log alpha piecewise linear in t between the knots t_n = (n + 1) / N),
  continuous linear (beta 0.1 to 20) and cosine schedules, with `alpha`, `sigma`, `lambda_` and `inverse_lambda`
  on continuous t.
* `time_steps`: the sampler's time grid (time-uniform, logSNR, time-quadratic, and diffusers' linspace /
  leading / trailing integer timesteps mapped to t = (k + 1) / N).
* Model wrappers: noise / data / v prediction to noise prediction, and classifier-free guidance.
* `GaussianMixture`: a mixture of Gaussians whose noise prediction, posterior mean and log-density are exact at
  every t (isotropic, diagonal or full covariances; optionally class-conditional). It is the ground truth of the
  tests and the default benchmark.
* `EpsMLP`: a small learned noise-prediction network (Flax Linen) with a sinusoidal time embedding and an optional
  class embedding (with a null class for classifier-free guidance).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("sd_scaled_linear", "ldm_linear", "linear", "cosine")
SPACINGS = ("time_uniform", "logSNR", "time_quadratic", "linspace", "leading", "trailing")
MODEL_TYPES = ("noise", "data", "v")


# ------------------------------------------------------------------------------------------- betas


def sd_scaled_linear_betas(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000
) -> np.ndarray:
    """Stable Diffusion's "scaled_linear" betas: beta_n = linspace(beta_start^1/2, beta_end^1/2, N)_n^2.

    Args:
      beta_start: first beta (0.00085 for Stable Diffusion 1.x / 2.x).
      beta_end: last beta (0.012).
      num_steps: number of training steps N.

    Returns:
      float64 array of shape (N,).
    """
    return np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2


def ldm_linear_betas(
    beta_start: float = 0.0015, beta_end: float = 0.0195, num_steps: int = 1000
) -> np.ndarray:
    """The latent-diffusion "linear" betas (the LDM FFHQ / LSUN configs): the same squared linspace.

    CompVis' `make_beta_schedule("linear", ...)` squares a linspace of square roots, so this is
    `sd_scaled_linear_betas` with the LDM endpoints (0.0015, 0.0195).
    """
    return sd_scaled_linear_betas(beta_start, beta_end, num_steps)


# ---------------------------------------------------------------------------------------- schedule


def _xp(*arrays) -> Any:
    """numpy for numpy / Python inputs (float64 host maths), jax.numpy otherwise (traceable)."""
    return np if all(isinstance(a, np.ndarray | float | int | np.generic) for a in arrays) else jnp


def _interp(x, xs, ys, xp):
    """Piecewise-linear y(x) through (xs, ys) (xs increasing), extended linearly past both ends.

    The same function as the official `interpolate_fn`: outside [xs_0, xs_-1] the outermost segment is
    extrapolated, so the schedule is defined (and differentiable) for every t.
    """
    k = xs.shape[-1]
    idx = xp.clip(xp.searchsorted(xs, x, side="left") - 1, 0, k - 2)
    x0, x1 = xs[idx], xs[idx + 1]
    y0, y1 = ys[idx], ys[idx + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class VPSchedule:
    """A variance-preserving noise schedule on continuous time t in (0, T].

    Build one with `VPSchedule.discrete(betas)`, `VPSchedule.linear()`, `VPSchedule.cosine()` or
    `VPSchedule.named(name)`. It is a pytree (the discrete knots are its only leaf), so it can be passed
    through `jax.jit`; its methods accept numpy inputs (evaluated in float64 numpy) and jax inputs (traceable).

    * discrete: log alpha at the knots t_n = (n + 1) / N is 1/2 log(alphabar_n), alphabar_n = prod_{m<=n}
      (1 - beta_m); between knots log alpha is linear in t, and linear extrapolation is used outside them
      (as the official `NoiseScheduleVP('discrete')`). T = 1, t_min = 1 / N.
    * linear (VPSDE): log alpha_t = -t^2 (beta_1 - beta_0) / 4 - t beta_0 / 2, T = 1.
    * cosine: log alpha_t = log cos((t + s) / (1 + s) pi/2) - log cos(s / (1 + s) pi/2), s = 0.008,
      T = 0.9946 (the official cut-off, where alpha_t would otherwise vanish).

    For the continuous kinds t_min = 1e-3 (the official default end time 1 / N with N = 1000).
    """

    kind: str
    log_alpha_knots: Any = None  # (N,) float64, discrete only
    beta_0: float = 0.1
    beta_1: float = 20.0
    cosine_s: float = 0.008

    # --- constructors
    @classmethod
    def discrete(cls, betas) -> VPSchedule:
        """Discrete-time schedule from betas (N,); log alpha_n = 1/2 sum_{m<=n} log(1 - beta_m)."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 2:
            raise ValueError(
                f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}"
            )
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must lie in (0, 1); got values outside that range")
        return cls("discrete", 0.5 * np.cumsum(np.log1p(-betas)))

    @classmethod
    def linear(cls, beta_0: float = 0.1, beta_1: float = 20.0) -> VPSchedule:
        """Continuous linear VPSDE schedule beta(t) = beta_0 + t (beta_1 - beta_0)."""
        return cls("linear", None, beta_0=float(beta_0), beta_1=float(beta_1))

    @classmethod
    def cosine(cls, s: float = 0.008) -> VPSchedule:
        """Continuous cosine schedule of improved DDPM (Nichol & Dhariwal 2021)."""
        return cls("cosine", None, cosine_s=float(s))

    @classmethod
    def named(cls, name: str) -> VPSchedule:
        """One of `SCHEDULES`: "sd_scaled_linear", "ldm_linear" (discrete, N = 1000), "linear", "cosine"."""
        if name == "sd_scaled_linear":
            return cls.discrete(sd_scaled_linear_betas())
        if name == "ldm_linear":
            return cls.discrete(ldm_linear_betas())
        if name == "linear":
            return cls.linear()
        if name == "cosine":
            return cls.cosine()
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULES)}")

    # --- pytree
    def tree_flatten(self):
        return (self.log_alpha_knots,), (self.kind, self.beta_0, self.beta_1, self.cosine_s)

    @classmethod
    def tree_unflatten(cls, aux, children):
        kind, beta_0, beta_1, cosine_s = aux
        return cls(kind, children[0], beta_0=beta_0, beta_1=beta_1, cosine_s=cosine_s)

    # --- constants
    @property
    def total_n(self) -> int:
        """Number of training steps N (1000 for the continuous kinds, as the official code)."""
        return int(self.log_alpha_knots.shape[0]) if self.kind == "discrete" else 1000

    @property
    def t_max(self) -> float:
        """The start time T of sampling."""
        return 0.9946 if self.kind == "cosine" else 1.0

    @property
    def t_min(self) -> float:
        """The end time of sampling, 1 / N."""
        return 1.0 / self.total_n

    def _knots(self, xp):
        n = self.total_n
        t = np.arange(1, n + 1, dtype=np.float64) / n
        return (t, self.log_alpha_knots) if xp is np else (jnp.asarray(t), self.log_alpha_knots)

    # --- the schedule
    def log_alpha(self, t):
        """log alpha_t."""
        xp = _xp(t, *([self.log_alpha_knots] if self.kind == "discrete" else []))
        if self.kind == "discrete":
            tk, lk = self._knots(xp)
            if xp is jnp:
                t = jnp.asarray(t)
                tk, lk = tk.astype(t.dtype), jnp.asarray(lk, t.dtype)
            return _interp(t, tk, lk, xp)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0
        if self.kind == "cosine":
            s = self.cosine_s
            return xp.log(xp.cos((t + s) / (1.0 + s) * math.pi / 2.0)) - math.log(
                math.cos(s / (1.0 + s) * math.pi / 2.0)
            )
        raise ValueError(f"unknown schedule kind {self.kind!r}")

    def alpha(self, t):
        """alpha_t = exp(log alpha_t)."""
        la = self.log_alpha(t)
        return _xp(la).exp(la)

    def sigma(self, t):
        """sigma_t = sqrt(1 - alpha_t^2)."""
        la = self.log_alpha(t)
        xp = _xp(la)
        return xp.sqrt(-xp.expm1(2.0 * la))

    def lambda_(self, t):
        """lambda_t = log alpha_t - log sigma_t (half the log signal-to-noise ratio)."""
        la = self.log_alpha(t)
        xp = _xp(la)
        return la - 0.5 * xp.log(-xp.expm1(2.0 * la))

    def inverse_lambda(self, lam):
        """The t with lambda_t = lam (closed form for linear / cosine; knot interpolation for discrete)."""
        xp = _xp(lam)
        log_alpha = -0.5 * xp.logaddexp(0.0, -2.0 * lam)
        if self.kind == "linear":
            tmp = 2.0 * (self.beta_1 - self.beta_0) * xp.logaddexp(-2.0 * lam, 0.0)
            delta = self.beta_0**2 + tmp
            return tmp / (xp.sqrt(delta) + self.beta_0) / (self.beta_1 - self.beta_0)
        if self.kind == "cosine":
            s = self.cosine_s
            la0 = math.log(math.cos(s / (1.0 + s) * math.pi / 2.0))
            return xp.arccos(xp.exp(log_alpha + la0)) * 2.0 * (1.0 + s) / math.pi - s
        tk, lk = self._knots(xp)
        if xp is jnp:
            log_alpha = jnp.asarray(log_alpha)
            tk, lk = tk.astype(log_alpha.dtype), jnp.asarray(lk, log_alpha.dtype)
        return _interp(log_alpha, lk[::-1], tk[::-1], xp)

    def model_time_input(self, t):
        """The time label a network sees: (t - 1/N) * 1000 for discrete schedules, t otherwise."""
        return (t - 1.0 / self.total_n) * 1000.0 if self.kind == "discrete" else t


# -------------------------------------------------------------------------------------- time grid


def time_steps(
    schedule: VPSchedule,
    nfe: int,
    spacing: str = "time_uniform",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    steps_offset: int = 0,
) -> np.ndarray:
    """The sampler's time grid t_0 = T > t_1 > ... > t_nfe (float64 numpy, shape (nfe + 1,)).

    * "time_uniform": linspace(T, t_end, nfe + 1) (every DC-Solver experiment uses this);
    * "logSNR": uniform in lambda, mapped back with `inverse_lambda`;
    * "time_quadratic": linspace(sqrt T, sqrt t_end, nfe + 1)^2;
    * "linspace" / "leading" / "trailing": diffusers' integer timesteps k (discrete schedules only), as
      `UniPCMultistepScheduler.set_timesteps` makes them, mapped to t = (k + 1) / N, followed by t = 1 / N
      (diffusers' `final_sigmas_type="sigma_min"`; its default "zero" ends at t = 0, which this
      continuous-time parametrisation does not represent).

    Args:
      schedule: the noise schedule.
      nfe: number of steps (one model evaluation each for the multistep solvers).
      spacing: one of `SPACINGS`.
      t_start: start time (default `schedule.t_max`); the continuous spacings only.
      t_end: end time (default `schedule.t_min`); the continuous spacings only.
      steps_offset: diffusers' `steps_offset` for "leading".

    Returns:
      float64 array of shape (nfe + 1,), decreasing.

    Example:
      >>> from theorax.models.diffusion import VPSchedule, time_steps
      >>> schedule = VPSchedule.named("sd_scaled_linear")
      >>> time_steps(schedule, 4).round(5).tolist()
      [1.0, 0.75025, 0.5005, 0.25075, 0.001]
      >>> (time_steps(schedule, 5, "linspace") * 1000 - 1).round().astype(int).tolist()  # diffusers' k
      [999, 799, 599, 400, 200, 0]
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {list(SPACINGS)}")
    if int(nfe) < 1:
        raise ValueError(f"nfe={nfe} must be a positive integer")
    nfe = int(nfe)
    t_start = schedule.t_max if t_start is None else float(t_start)
    t_end = schedule.t_min if t_end is None else float(t_end)
    if spacing == "time_uniform":
        return np.linspace(t_start, t_end, nfe + 1)
    if spacing == "logSNR":
        lam = np.linspace(schedule.lambda_(t_start), schedule.lambda_(t_end), nfe + 1)
        return np.asarray(schedule.inverse_lambda(lam), dtype=np.float64)
    if spacing == "time_quadratic":
        return np.linspace(t_start**0.5, t_end**0.5, nfe + 1) ** 2
    if schedule.kind != "discrete":
        raise ValueError(
            f"spacing={spacing!r} builds diffusers' integer timesteps and needs a discrete schedule; "
            f"got kind={schedule.kind!r}. Use 'time_uniform', 'logSNR' or 'time_quadratic'."
        )
    n = schedule.total_n
    if spacing == "linspace":
        k = np.linspace(0, n - 1, nfe + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = n // (nfe + 1)
        k = (np.arange(0, nfe + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:  # trailing
        k = np.arange(n, 0, -n / nfe).round().astype(np.int64) - 1
    return np.concatenate([(k + 1.0) / n, [1.0 / n]])


# -------------------------------------------------------------------------------- model wrappers


def noise_from_data_prediction(x0, x, t, schedule: VPSchedule):
    """eps = (x - alpha_t x0) / sigma_t: a data-prediction model's output as a noise prediction."""
    return (x - schedule.alpha(t) * x0) / schedule.sigma(t)


def noise_from_v_prediction(v, x, t, schedule: VPSchedule):
    """eps = alpha_t v + sigma_t x (v = alpha_t eps - sigma_t x0, Salimans & Ho 2022, App. D)."""
    return schedule.alpha(t) * v + schedule.sigma(t) * x


def data_from_noise_prediction(eps, x, t, schedule: VPSchedule):
    """x0 = (x - sigma_t eps) / alpha_t: the data prediction a noise prediction implies."""
    return (x - schedule.sigma(t) * eps) / schedule.alpha(t)


def noise_prediction(
    model_fn: Callable, schedule: VPSchedule, model_type: str = "noise"
) -> Callable:
    """Wraps a noise- / data- / v-prediction model `model_fn(x, t, *cond)` into a noise predictor.

    The wrapper of the official `model_wrapper` (model_type "noise", "x_start", "v"), here "noise", "data"
    or "v". Time stays the continuous t: map it to a network's own time label inside `model_fn`
    (`VPSchedule.model_time_input`).

    Args:
      model_fn: `model_fn(x, t, *cond) -> output` with output of x's shape.
      schedule: the schedule that defines alpha_t and sigma_t.
      model_type: one of `MODEL_TYPES`.

    Returns:
      `eps_fn(x, t, *cond) -> eps`.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {list(MODEL_TYPES)}")
    if model_type == "noise":
        return model_fn

    def eps_fn(x, t, *cond):
        out = model_fn(x, t, *cond)
        if model_type == "data":
            return noise_from_data_prediction(out, x, t, schedule)
        return noise_from_v_prediction(out, x, t, schedule)

    return eps_fn


def classifier_free_guidance(eps_fn: Callable, x, t, labels, scale):
    """eps_cfg = eps(x, t, None) + w (eps(x, t, labels) - eps(x, t, None)) (Ho & Salimans 2022).

    `eps_fn(x, t, None)` must be the unconditional model. With w = 1 the result is the conditional
    prediction (up to rounding; the official code then skips the unconditional call).
    """
    eps_u = eps_fn(x, t, None)
    eps_c = eps_fn(x, t, labels)
    return eps_u + scale * (eps_c - eps_u)


# --------------------------------------------------------------------------------- analytic model


@jax.tree_util.register_pytree_node_class
class GaussianMixture:
    """p_0 = sum_k pi_k N(mu_k, Sigma_k) in R^d, with everything about its VP diffusion in closed form.

    Under q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) the marginal is p_t = sum_k pi_k N(alpha_t mu_k, V_k)
    with V_k = alpha_t^2 Sigma_k + sigma_t^2 I, so (reference/dc_solver.md Sec. 3):

        gamma_k  = softmax_k(log pi_k - 1/2 log det V_k - 1/2 (x - alpha_t mu_k)^T V_k^-1 (x - alpha_t mu_k))
        eps(x,t) = -sigma_t grad log p_t(x) = sigma_t sum_k gamma_k V_k^-1 (x - alpha_t mu_k)
        E[x_0 | x_t = x] = sum_k gamma_k (mu_k + alpha_t Sigma_k V_k^-1 (x - alpha_t mu_k))

    Class-conditional: row c of `class_weights` (C, K) gives p_0(x | c) = sum_k class_weights[c, k]
    N(mu_k, Sigma_k), and `weights` is the unconditional mixture (use `class_conditional` to make it the
    class-prior average, so that classifier-free guidance mixes the exact conditional and marginal scores).

    Args:
      weights: (K,) mixture weights (normalised here).
      means: (K, d) component means.
      stds: (K,) isotropic or (K, d) diagonal standard deviations; None when `covs` is given.
      class_weights: optional (C, K) per-class weights (rows normalised here); makes the model conditional.
      covs: optional (K, d, d) full covariance matrices (symmetric positive definite) instead of `stds`.

    Example (N(0, 1) data stays N(0, 1) under VP noising, so eps(x, t) = sigma_t x):
      >>> import jax.numpy as jnp
      >>> from theorax.models.diffusion import GaussianMixture, VPSchedule
      >>> schedule = VPSchedule.named("sd_scaled_linear")
      >>> standard = GaussianMixture([1.0], [[0.0]], [1.0])
      >>> x = jnp.array([[2.0], [-0.5]])
      >>> bool(jnp.allclose(standard.eps(x, 0.5, schedule), schedule.sigma(0.5) * x))
      True
    """

    def __init__(self, weights, means, stds=None, class_weights=None, *, covs=None):
        means = np.asarray(means, dtype=np.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        k, d = means.shape
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (k,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers, got shape {weights.shape}")
        self.weights = weights / weights.sum()
        self.means = means
        if (stds is None) == (covs is None):
            raise ValueError("give exactly one of stds ((K,) or (K, d)) and covs ((K, d, d))")
        if covs is not None:
            covs = np.asarray(covs, dtype=np.float64)
            if covs.shape != (k, d, d):
                raise ValueError(f"covs must have shape {(k, d, d)}, got {covs.shape}")
            evals, evecs = np.linalg.eigh(0.5 * (covs + np.swapaxes(covs, 1, 2)))
            if np.any(evals <= 0):
                raise ValueError("covs must be positive definite")
            self.variances, self.eigvecs = evals, evecs  # Sigma_k = U diag(variances) U^T
        else:
            stds = np.asarray(stds, dtype=np.float64)
            if stds.shape == (k,):
                stds = np.repeat(stds[:, None], d, axis=1)
            if stds.shape != (k, d) or np.any(stds <= 0):
                raise ValueError(
                    f"stds must be {k} positive numbers or shape {(k, d)}, got {stds.shape}"
                )
            self.variances, self.eigvecs = stds**2, None
        if class_weights is not None:
            class_weights = np.asarray(class_weights, dtype=np.float64)
            if class_weights.ndim != 2 or class_weights.shape[1] != k:
                raise ValueError(
                    f"class_weights must have shape (C, {k}), got {class_weights.shape}"
                )
            class_weights = class_weights / class_weights.sum(axis=1, keepdims=True)
        self.class_weights = class_weights

    @classmethod
    def class_conditional(cls, means, stds, class_weights, class_probs=None, *, covs=None):
        """A conditional mixture whose unconditional weights are sum_c p(c) class_weights[c]."""
        cw = np.asarray(class_weights, dtype=np.float64)
        cw = cw / cw.sum(axis=1, keepdims=True)
        probs = np.full(cw.shape[0], 1.0 / cw.shape[0]) if class_probs is None else class_probs
        return cls(np.asarray(probs) @ cw, means, stds, cw, covs=covs)

    # --- pytree
    def tree_flatten(self):
        return (self.weights, self.means, self.variances, self.eigvecs, self.class_weights), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.weights, obj.means, obj.variances, obj.eigvecs, obj.class_weights = children
        return obj

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    @property
    def num_classes(self) -> int | None:
        return None if self.class_weights is None else int(self.class_weights.shape[0])

    # --- closed forms
    def _log_weights(self, labels, dtype):
        if labels is None:
            return jnp.log(jnp.asarray(self.weights, dtype))
        if self.class_weights is None:
            raise ValueError(
                "labels were given to a GaussianMixture without class_weights (an unconditional model); "
                "build it with class_weights (C, K) to use labels or classifier-free guidance"
            )
        cw = jnp.asarray(self.class_weights, dtype)[jnp.asarray(labels)]
        return jnp.where(cw > 0, jnp.log(jnp.where(cw > 0, cw, 1.0)), -jnp.inf)

    def _parts(self, x, t, schedule, labels):
        """Returns gamma (..., K), V^-1 (x - alpha mu) (..., K, d) in the original basis, alpha, Sigma V^-1 r."""
        x = jnp.asarray(x)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        t = jnp.asarray(t, dtype)
        alpha = schedule.alpha(t)[..., None, None]
        sigma = schedule.sigma(t)[..., None, None]
        mu = jnp.asarray(self.means, dtype)
        var = jnp.asarray(self.variances, dtype)
        resid = x[..., None, :] - alpha * mu  # (..., K, d)
        if self.eigvecs is not None:
            u = jnp.asarray(self.eigvecs, dtype)
            resid = jnp.einsum("...ki,kij->...kj", resid, u)  # coordinates in the eigenbasis
        v = alpha**2 * var + sigma**2  # (..., K, d) eigenvalues of V_k
        white = resid / v
        logits = self._log_weights(labels, dtype) - 0.5 * (
            jnp.sum(jnp.log(v), -1) + jnp.sum(resid * white, -1)
        )
        gamma = jax.nn.softmax(logits, axis=-1)
        post = var * white  # Sigma V^-1 r in the eigenbasis
        if self.eigvecs is not None:
            white = jnp.einsum("...kj,kij->...ki", white, u)
            post = jnp.einsum("...kj,kij->...ki", post, u)
        return gamma, white, alpha[..., 0, 0], sigma[..., 0, 0], post, mu

    def eps(self, x, t, schedule: VPSchedule, labels=None):
        """The exact noise prediction eps(x, t) = -sigma_t grad_x log p_t(x [| labels]).

        Args:
          x: (..., d) noisy points.
          t: scalar or (...,) continuous times.
          schedule: the VP schedule.
          labels: None (the unconditional mixture) or integer classes broadcastable to x's batch shape.

        Returns:
          (..., d) noise prediction, in x's dtype.
        """
        if self._use_matmuls(t):
            gamma, w, alpha, sigma, mu = self._diagonal_parts(x, t, schedule, labels)
            return sigma * (x * (gamma @ w) - alpha * (gamma @ (mu * w)))
        gamma, white, _, sigma, _, _ = self._parts(x, t, schedule, labels)
        return sigma[..., None] * jnp.einsum("...k,...kd->...d", gamma, white)

    def posterior_mean(self, x, t, schedule: VPSchedule, labels=None):
        """E[x_0 | x_t = x] = sum_k gamma_k (mu_k + alpha_t Sigma_k V_k^-1 (x - alpha_t mu_k))."""
        if self._use_matmuls(t):
            gamma, w, alpha, _, mu = self._diagonal_parts(x, t, schedule, labels)
            var = jnp.asarray(self.variances, w.dtype)
            return gamma @ mu + alpha * (x * (gamma @ (var * w)) - alpha * (gamma @ (mu * var * w)))
        gamma, _, alpha, _, post, mu = self._parts(x, t, schedule, labels)
        return jnp.einsum("...k,...kd->...d", gamma, mu + alpha[..., None, None] * post)

    def _use_matmuls(self, t) -> bool:
        """Diagonal covariances at one time t (the samplers' case): sums over d become matrix products."""
        return self.eigvecs is None and jnp.ndim(t) == 0

    def _diagonal_parts(self, x, t, schedule, labels):
        """gamma (..., K) and w = 1 / diag(V_k) (K, d) at a scalar t, with the quadratic forms expanded,

            (x - alpha mu_k)^T W_k (x - alpha mu_k) = x^2 . w_k - 2 alpha x . (mu_k w_k) + alpha^2 mu_k^2 . w_k,

        so that the (batch, K, d) residuals are never formed (the same numbers up to rounding)."""
        x = jnp.asarray(x)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        x = x.astype(dtype)
        t = jnp.asarray(t, dtype)
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        mu = jnp.asarray(self.means, dtype)
        v = alpha**2 * jnp.asarray(self.variances, dtype) + sigma**2  # (K, d)
        w = 1.0 / v
        mw = mu * w
        quad = (x * x) @ w.T - 2.0 * alpha * (x @ mw.T) + alpha**2 * jnp.sum(mu * mw, -1)
        logits = self._log_weights(labels, dtype) - 0.5 * (jnp.sum(jnp.log(v), -1) + quad)
        return jax.nn.softmax(logits, axis=-1), w, alpha, sigma, mu

    def log_prob(self, x, t, schedule: VPSchedule, labels=None):
        """log p_t(x [| labels]), the exact log-density of the noised mixture."""
        x = jnp.asarray(x)
        dtype = x.dtype
        t = jnp.asarray(t, dtype)
        alpha = schedule.alpha(t)[..., None, None]
        sigma = schedule.sigma(t)[..., None, None]
        resid = x[..., None, :] - alpha * jnp.asarray(self.means, dtype)
        if self.eigvecs is not None:
            resid = jnp.einsum("...ki,kij->...kj", resid, jnp.asarray(self.eigvecs, dtype))
        v = alpha**2 * jnp.asarray(self.variances, dtype) + sigma**2
        comp = -0.5 * (
            jnp.sum(jnp.log(2 * jnp.pi * v), -1) + jnp.sum(resid**2 / v, -1)
        ) + self._log_weights(labels, dtype)
        return jax.nn.logsumexp(comp, axis=-1)

    def eps_fn(self, schedule: VPSchedule) -> Callable:
        """`eps_fn(x, t, labels=None)` as a `jax.tree_util.Partial`: the samplers trace the mixture's
        arrays as inputs, so a new mixture of the same shapes does not recompile them."""
        return jax.tree_util.Partial(_mixture_eps, self, schedule)

    def sample(self, key: jax.Array, n: int, labels=None) -> jax.Array:
        """n draws from p_0 (or p_0(. | labels) with labels of shape (n,))."""
        kc, kn = jax.random.split(key)
        logw = self._log_weights(labels, jnp.float32)
        comp = jax.random.categorical(kc, jnp.broadcast_to(logw, (n, self.weights.shape[0])))
        z = jax.random.normal(kn, (n, self.dim))
        scaled = z * jnp.sqrt(jnp.asarray(self.variances, jnp.float32)[comp])
        if self.eigvecs is not None:
            scaled = jnp.einsum("nij,nj->ni", jnp.asarray(self.eigvecs, jnp.float32)[comp], scaled)
        return jnp.asarray(self.means, jnp.float32)[comp] + scaled


def _mixture_eps(mixture: GaussianMixture, schedule: VPSchedule, x, t, labels=None):
    return mixture.eps(x, t, schedule, labels)


# ---------------------------------------------------------------------------------- learned model


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [cos(t f_j), sin(t f_j)], f_j = max_period^(-j / (dim/2)) (Vaswani et al.)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class EpsMLP(nn.Module):
    """A residual MLP noise predictor eps_theta(x, t[, label]) for flat data.

    The time label is `time_scale * t` (1000 t, the discrete-model convention) through a sinusoidal embedding
    and a two-layer MLP; it is added to the input projection, as is a learned class embedding when
    `num_classes` is set (index `num_classes` is the null class: `labels=None` means unconditional, the
    classifier-free-guidance convention).

    Attributes:
      features: hidden width.
      depth: number of residual blocks (LayerNorm, Dense, SiLU, Dense).
      num_classes: number of classes, or None for an unconditional model.
      time_scale: multiplies t before the embedding.
    """

    features: int = 256
    depth: int = 3
    num_classes: int | None = None
    time_scale: float = 1000.0

    @nn.compact
    def __call__(self, x, t, labels=None):
        x = jnp.asarray(x, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:-1])
        emb = timestep_embedding(self.time_scale * t, 128)
        emb = nn.Dense(self.features)(nn.silu(nn.Dense(self.features)(emb)))
        h = nn.Dense(self.features)(x) + emb
        if self.num_classes is not None:
            if labels is None:
                labels = jnp.full(x.shape[:-1], self.num_classes, jnp.int32)
            table = nn.Embed(self.num_classes + 1, self.features)
            h = h + table(jnp.broadcast_to(jnp.asarray(labels, jnp.int32), x.shape[:-1]))
        elif labels is not None:
            raise ValueError("labels were given to an EpsMLP with num_classes=None")
        for _ in range(self.depth):
            r = nn.Dense(4 * self.features)(nn.LayerNorm()(h))
            h = h + nn.Dense(self.features)(nn.silu(r))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(nn.LayerNorm()(h)))
