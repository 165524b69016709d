"""The paper's tasks: meta-priors p(phi), priors p(x | phi), latents and likelihoods p(z | x), sampled in JAX.

Every task draws fresh training triples (phi, x, z) (Distribution Transformers, Sec. 3.3; reference notes Sec. 3)
and says how the transformer sees them: a GMM prior or a prior feature vector, observation sources and sizes,
and the sample-space transform f that puts the latent on R^d.

* `GMMLinearGaussianTask`, task (a): w ~ Dir(1/k), mu_j ~ N(0, I), Lambda_j ~ Wishart(d + 1, I), Sigma_j =
  Lambda_j^{-1}; x ~ GMM; z = H x + N(0, R). Exact posterior: `inference.distribution_transformer.exact.linear_gaussian_posterior`.
* `InverseGammaTask`, task (b) (paper Sec. 4.1): alpha, beta ~ IG(a, b) each (wide: IG(4, 6); narrow:
  IG(1e4, 2e4)); sigma^2 ~ IG(alpha, beta); z ~ N(0, sigma^2). The GMM lives on log sigma^2.
* `SensorFusionTask`, task (c) (Sec. 4.3.1): a 4-D state (px, vx, py, vy) with the official config's GMM
  meta-prior (`default_scale_multiple: 16` scales both the means' covariance and the Wishart's scale matrix),
  a rangefinder (0.7 N(r, (0.1 (r + 1))^2) + 0.2 Exp(1) + 0.1 U(0, 10), clipped to [0, 10]) and a bearing
  sensor (atan2(px, py) + N(0, 0.1^2), wrapped). `rangefinder_log_prob` orders the mixture components exactly as the
  sampler does; the official code stacks them as [normal, uniform, exp] against weights for [normal, exp,
  uniform], a bug fixed here. The LTI motion model (A, Q, x0) of the filtering experiment is here too.
* `GPHyperpriorTask`, task (d) (Sec. 4.2.1): y* ~ N(m, s), l ~ Gamma(3, 6), 10 noisy points from the GP
  conditioned on f(x*) = y*; the latent is (y*, l) with the GMM on (y*, log l).
* `QuantumTask`, task (e) (Sec. 4.2.2): H = delta sigma_x + (1 - delta) sigma_z, delta ~ Beta(c1, c0),
  c1, c0 ~ IG(4, 6); 10 binary measurements of noisy initial states after noisy times; the GMM lives on
  logit delta.

All sampling is done in log space where it matters (Dirichlet weights as log-gamma draws, log sigma^2 =
log beta - log Gamma(alpha)), so tiny shapes do not underflow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from theorax.models.gmm import GMM, SampleSpaceTransform


@flax.struct.dataclass
class Problem:
    """A batch of inference problems drawn from a task's joint p(phi) p(x | phi) p(z | x).

    Attributes:
      prior: a `GMM` (batch `[B]`) or a prior feature array `[B, p]` (non-GMM priors).
      target: `[B, d]` the true latent in the GMM's sample space, y = f(x).
      observations: `{source: [B, n, m]}`.
      info: task parameters the exact references need (e.g. alpha, beta), each `[B, ...]`.
    """

    prior: Any
    target: jax.Array
    observations: dict
    info: dict


def _dirichlet_logits(key, concentration: float, shape) -> jax.Array:
    """Logits of w ~ Dir(concentration 1): log-gamma draws (normalised later by the softmax)."""
    return jax.random.loggamma(key, concentration, shape)


def _inverse_wishart_cholesky(
    key, dim: int, df: float, shape, min_precision: float = 1e-6, precision_scale: float = 1.0
):
    """Lower Cholesky factors L of Sigma = Lambda^{-1}, Lambda ~ Wishart(df, s I), `shape + (d, d)`.

    Bartlett: Lambda = s M M^T with M upper triangular (the reversed Bartlett factor, which has the same law
    since Wishart(df, I) is invariant to permutations), M_ii = sqrt(chi2(df - d + 1 + i)), M_ij ~ N(0, 1) for
    j > i; then L = M^{-T} / sqrt(s) is lower triangular with diagonal 1 / (sqrt(s) M_ii). The diagonal of
    sqrt(s) M is floored at sqrt(min_precision) (the role of the official meta-prior's `scale_eps`).
    """
    k_chi, k_off = jax.random.split(key)
    dofs = df - (dim - 1) + jnp.arange(dim, dtype=jnp.float32)  # chi2 dofs df - d + 1 .. df
    chi2 = 2.0 * jax.random.gamma(k_chi, dofs / 2.0, shape + (dim,))
    diag = jnp.sqrt(jnp.maximum(chi2, min_precision / precision_scale))
    off = jnp.triu(jax.random.normal(k_off, shape + (dim, dim)), 1)
    M = off + diag[..., None, :] * jnp.eye(dim)
    eye = jnp.broadcast_to(jnp.eye(dim), M.shape)
    L = solve_triangular(jnp.swapaxes(M, -1, -2), eye, lower=True)
    return L / math.sqrt(precision_scale)


def sample_gmm_meta_prior(
    key,
    batch: int,
    num_components: int,
    dim: int,
    *,
    loc_mean=0.0,
    loc_scale: float = 1.0,
    wishart_df: float | None = None,
    precision_scale: float = 1.0,
    min_precision: float = 1e-6,
) -> GMM:
    """Draws GMM priors from the conjugate meta-prior of the paper's code (reference notes Sec. 3):
    w ~ Dir(1/k), mu_j ~ N(loc_mean, loc_scale^2 I), Sigma_j^{-1} ~ Wishart(df = d + 1 by default,
    precision_scale I).

    The official `GaussianMixtureModelConjugateMetaPrior(default_scale_multiple=m)` multiplies *both* default
    scale matrices by m: the means' covariance (loc_scale = sqrt(m)) and the Wishart's scale matrix
    (precision_scale = m, so the components' covariances shrink by 1 / m). `meta_prior_kwargs` gives both.
    """
    k_w, k_mu, k_cov = jax.random.split(key, 3)
    logits = _dirichlet_logits(k_w, 1.0 / num_components, (batch, num_components))
    means = jnp.asarray(loc_mean) + loc_scale * jax.random.normal(
        k_mu, (batch, num_components, dim)
    )
    df = dim + 1.0 if wishart_df is None else wishart_df
    tril = _inverse_wishart_cholesky(
        k_cov, dim, df, (batch, num_components), min_precision, precision_scale
    )
    return GMM(logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True), means, tril)


def meta_prior_kwargs(default_scale_multiple: float = 1.0, scale_eps: float = 1e-6) -> dict:
    """`sample_gmm_meta_prior` arguments equivalent to the official meta-prior's `default_scale_multiple` m
    and `scale_eps`: mean covariance m I (loc_scale = sqrt(m)) and Wishart scale matrix m I."""
    return {
        "loc_scale": math.sqrt(default_scale_multiple),
        "precision_scale": float(default_scale_multiple),
        "min_precision": float(scale_eps),
    }


# ------------------------------------------------------------------------------------------ task (a)


@dataclasses.dataclass(frozen=True)
class GMMLinearGaussianTask:
    """Task (a): GMM prior, linear-Gaussian observations z_i = H x + N(0, R), i = 1..num_observations.

    The paper's toy config: d = 1, k = 2, H = R = [[1]], one observation.
    """

    dim: int = 1
    num_components: int = 2
    H: tuple = ((1.0,),)
    R: tuple = ((1.0,),)
    num_observations: int = 1
    loc_scale: float = 1.0
    name: str = "gmm_linear"

    @property
    def obs_dim(self) -> int:
        return len(self.H)

    @property
    def observation_dims(self) -> dict[str, int]:
        return {"z": self.obs_dim}

    @property
    def max_observations(self) -> int:
        return self.num_observations

    @property
    def prior_feature_dim(self) -> None:
        return None

    @property
    def transform(self) -> SampleSpaceTransform:
        return SampleSpaceTransform(("identity",) * self.dim)

    def sample(self, key, batch: int) -> Problem:
        k_prior, k_x, k_z = jax.random.split(key, 3)
        prior = sample_gmm_meta_prior(
            k_prior, batch, self.num_components, self.dim, loc_scale=self.loc_scale
        )
        x = prior.sample(k_x, 1)[0]
        H, R_chol = jnp.asarray(self.H), jnp.linalg.cholesky(jnp.asarray(self.R))
        eps = jax.random.normal(k_z, (batch, self.num_observations, self.obs_dim))
        z = jnp.einsum("md,bd->bm", H, x)[:, None, :] + eps @ R_chol.T
        return Problem(prior, x, {"z": z}, {})


# ------------------------------------------------------------------------------------------ task (b)


@dataclasses.dataclass(frozen=True)
class InverseGammaTask:
    """Task (b): sigma^2 ~ IG(alpha, beta) with alpha ~ IG(a_alpha, b_alpha), beta ~ IG(a_beta, b_beta), and
    z_i ~ N(loc, sigma^2). The transformer sees the features [log alpha, log beta] and the GMM lives on
    log sigma^2. Presets: `wide()` (IG(4, 6) each) and `narrow()` (IG(1e4, 2e4) each, i.e. about 2)."""

    alpha_shape: float = 4.0
    alpha_rate: float = 6.0
    beta_shape: float = 4.0
    beta_rate: float = 6.0
    num_observations: int = 1
    loc: float = 0.0
    name: str = "invgamma"

    @classmethod
    def wide(cls, **kw) -> InverseGammaTask:
        return cls(4.0, 6.0, 4.0, 6.0, name="invgamma_wide", **kw)

    @classmethod
    def narrow(cls, **kw) -> InverseGammaTask:
        return cls(1e4, 2e4, 1e4, 2e4, name="invgamma_narrow", **kw)

    dim = 1
    prior_feature_dim = 2

    @property
    def observation_dims(self) -> dict[str, int]:
        return {"z": 1}

    @property
    def max_observations(self) -> int:
        return self.num_observations

    @property
    def transform(self) -> SampleSpaceTransform:
        return SampleSpaceTransform(("log",))

    def sample(self, key, batch: int) -> Problem:
        k_a, k_b, k_s, k_z = jax.random.split(key, 4)
        log_alpha = jnp.log(self.alpha_rate) - jax.random.loggamma(k_a, self.alpha_shape, (batch,))
        log_beta = jnp.log(self.beta_rate) - jax.random.loggamma(k_b, self.beta_shape, (batch,))
        alpha, beta = jnp.exp(log_alpha), jnp.exp(log_beta)
        log_var = log_beta - jax.random.loggamma(k_s, alpha)  # log sigma^2
        eps = jax.random.normal(k_z, (batch, self.num_observations, 1))
        z = self.loc + jnp.exp(0.5 * log_var)[:, None, None] * eps
        features = jnp.stack([log_alpha, log_beta], -1)
        return Problem(features, log_var[:, None], {"z": z}, {"alpha": alpha, "beta": beta})


# ------------------------------------------------------------------------------------------ task (c)

_A = (
    (1.0, 0.6321, 0.0, 0.0),
    (0.0, 0.3679, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.6321),
    (0.0, 0.0, 0.0, 0.3679),
)
_Q_FACTOR = ((0.1, 0.0), (0.2, 0.0), (0.0, 0.1), (0.0, 0.2))


def rangefinder_log_prob(
    r, true_range, *, scale=0.1, rate=1.0, max_range=10.0, weights=(0.7, 0.2, 0.1)
):
    """log p(r | range) of the rangefinder: w0 N(range, (scale (range + 1))^2) + w1 Exp(rate) + w2 U(0, max).

    The components are in the sampler's order [normal, exponential, uniform], matching `weights` (fixes the
    official `log_prob`, which stacked [normal, uniform, exponential]). Like the official model this is the
    density of the unclipped mixture on [0, max_range].
    """
    std = scale * (true_range + 1.0)
    log_normal = -0.5 * ((r - true_range) / std) ** 2 - jnp.log(std) - 0.5 * math.log(2 * math.pi)
    log_exp = jnp.where(r >= 0, math.log(rate) - rate * r, -jnp.inf)
    log_unif = jnp.where((r >= 0) & (r <= max_range), -math.log(max_range), -jnp.inf)
    parts = jnp.broadcast_arrays(log_normal, log_exp, log_unif)
    stacked = jnp.stack(parts, -1) + jnp.log(jnp.asarray(weights))
    return jax.scipy.special.logsumexp(stacked, -1)


def wrap_angle(a):
    """Wraps angles to [-pi, pi)."""
    return (a + jnp.pi) % (2 * jnp.pi) - jnp.pi


def bearing_log_prob(b, true_bearing, *, scale=0.1):
    """log p(b | bearing) of the bearing sensor: N(wrap(b - bearing); 0, scale^2) (wrapped residual)."""
    d = wrap_angle(b - true_bearing)
    return -0.5 * (d / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class SensorFusionTask:
    """Task (c): 4-D state (px, vx, py, vy), a rangefinder r = ||(px, py)|| and a bearing atan2(px, py).

    Training draws GMM priors from the official config's conjugate meta-prior (`default_scale_multiple: 16`,
    `scale_eps: 1e-4`): means ~ N(0, 16 I) and precisions ~ Wishart(5, 16 I), i.e. component covariances
    1/16 of those of Wishart(5, I) (`meta_prior_kwargs`); then x ~ prior and one reading of each sensor. The
    filtering experiment uses the LTI motion model `A`, `Q = F F^T`, x0 ~ N(x0_mean, I).
    """

    num_components: int = 4
    default_scale_multiple: float = 16.0
    scale_eps: float = 1e-4
    wishart_scale: float | None = None  # None: default_scale_multiple; 1.0: the means-only reading
    range_scale: float = 0.1
    range_rate: float = 1.0
    max_range: float = 10.0
    range_weights: tuple = (0.7, 0.2, 0.1)
    bearing_scale: float = 0.1
    A: tuple = _A
    Q_factor: tuple = _Q_FACTOR
    x0_mean: tuple = (1.0, 0.0, 1.0, 0.0)
    name: str = "sensor_fusion"

    dim = 4
    prior_feature_dim = None

    @property
    def observation_dims(self) -> dict[str, int]:
        return {"range": 1, "bearing": 1}

    @property
    def max_observations(self) -> int:
        return 2

    @property
    def transform(self) -> SampleSpaceTransform:
        return SampleSpaceTransform(("identity",) * 4)

    @property
    def Q(self) -> jax.Array:
        F = jnp.asarray(self.Q_factor)
        return F @ F.T

    def true_range(self, x):
        return jnp.sqrt(x[..., 0] ** 2 + x[..., 2] ** 2)

    def true_bearing(self, x):
        return jnp.arctan2(x[..., 0], x[..., 2])

    def sample_observations(self, key, x) -> dict[str, jax.Array]:
        """One rangefinder and one bearing reading per state `x` `[..., 4]` -> `{source: [..., 1, 1]}`."""
        k_c, k_n, k_e, k_u, k_b = jax.random.split(key, 5)
        shape = x.shape[:-1]
        r = self.true_range(x)
        comp = jax.random.categorical(k_c, jnp.log(jnp.asarray(self.range_weights)), shape=shape)
        normal = r + self.range_scale * (r + 1.0) * jax.random.normal(k_n, shape)
        expo = jax.random.exponential(k_e, shape) / self.range_rate
        unif = jax.random.uniform(k_u, shape, maxval=self.max_range)
        reading = jnp.choose(comp, [normal, expo, unif], mode="clip")
        reading = jnp.clip(reading, 0.0, self.max_range)
        bearing = wrap_angle(
            self.true_bearing(x) + self.bearing_scale * jax.random.normal(k_b, shape)
        )
        return {"range": reading[..., None, None], "bearing": bearing[..., None, None]}

    def log_likelihood(self, x, observations) -> jax.Array:
        """log p(range, bearing | x) for states `[..., 4]` and readings broadcastable to `[...]`."""
        r = observations["range"][..., 0, 0]
        b = observations["bearing"][..., 0, 0]
        lr = rangefinder_log_prob(
            r,
            self.true_range(x),
            scale=self.range_scale,
            rate=self.range_rate,
            max_range=self.max_range,
            weights=self.range_weights,
        )
        return lr + bearing_log_prob(b, self.true_bearing(x), scale=self.bearing_scale)

    def simulate(self, key, batch: int, num_steps: int) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Trajectories of the LTI motion model and their readings: x_0 ~ N(x0_mean, I),
        x_{t+1} = A x_t + F eps_t. Returns states `[T, B, 4]` and `{source: [T, B, 1, 1]}`."""
        k0, k_dyn, k_obs = jax.random.split(key, 3)
        A, F = jnp.asarray(self.A), jnp.asarray(self.Q_factor)
        x0 = jnp.asarray(self.x0_mean) + jax.random.normal(k0, (batch, 4))

        def step(x, k):
            return x @ A.T + jax.random.normal(k, (batch, F.shape[1])) @ F.T, x

        _, xs = jax.lax.scan(step, x0, jax.random.split(k_dyn, num_steps))
        obs = jax.vmap(self.sample_observations)(jax.random.split(k_obs, num_steps), xs)
        return xs, obs

    def sample_given_prior(self, key, prior: GMM) -> Problem:
        """Training triples for given GMM priors (batch `[B]`): x ~ prior and one reading of each sensor."""
        k_x, k_z = jax.random.split(key)
        x = prior.sample(k_x, 1)[0]
        return Problem(prior, x, self.sample_observations(k_z, x), {})

    def sample(self, key, batch: int) -> Problem:
        k_prior, k_rest = jax.random.split(key)
        prior = sample_gmm_meta_prior(
            k_prior,
            batch,
            self.num_components,
            4,
            **self.meta_prior_kwargs(),
        )
        return self.sample_given_prior(k_rest, prior)

    def meta_prior_kwargs(self) -> dict:
        """`sample_gmm_meta_prior` arguments of the training meta-prior."""
        kw = meta_prior_kwargs(self.default_scale_multiple, self.scale_eps)
        if self.wishart_scale is not None:
            kw["precision_scale"] = float(self.wishart_scale)
        return kw


# ------------------------------------------------------------------------------------------ task (d)


@dataclasses.dataclass(frozen=True)
class GPHyperpriorTask:
    """Task (d): f ~ GP(m, s k_l) with an RBF kernel, y* = f(x*), data y_i = f(x_i) + N(0, noise_var).

    Meta-prior m ~ U(-0.5, 0.5), s ~ U(0.9, 1.1); hyperprior l ~ Gamma(3, rate 6); x*, x_i ~ U(0, 1).
    The data are drawn from the GP conditioned on f(x*) = y* (reference notes Sec. 3). The transformer sees
    prior features [m, log s], one token per data point (x_i, y_i) and a query token x*; the latent is (y*, l)
    with the GMM on (y*, log l).
    """

    num_points: int = 10
    noise_var: float = 1e-3
    ls_shape: float = 3.0
    ls_rate: float = 6.0
    name: str = "gp_hyperprior"

    dim = 2
    prior_feature_dim = 2

    @property
    def observation_dims(self) -> dict[str, int]:
        return {"data": 2, "query": 1}

    @property
    def max_observations(self) -> int:
        return self.num_points + 1

    @property
    def transform(self) -> SampleSpaceTransform:
        return SampleSpaceTransform(("identity", "log"))

    def sample(self, key, batch: int) -> Problem:
        ks = jax.random.split(key, 7)
        m = jax.random.uniform(ks[0], (batch,), minval=-0.5, maxval=0.5)
        s = jax.random.uniform(ks[1], (batch,), minval=0.9, maxval=1.1)
        ls = jax.random.gamma(ks[2], self.ls_shape, (batch,)) / self.ls_rate
        x_star = jax.random.uniform(ks[3], (batch,))
        y_star = m + jnp.sqrt(s) * jax.random.normal(ks[4], (batch,))
        x = jax.random.uniform(ks[5], (batch, self.num_points))
        # f(x) | f(x*) = y*: mean m + k(x, x*) (y* - m), cov s (K - k k^T), then observation noise.
        k_star = jnp.exp(-0.5 * ((x - x_star[:, None]) / ls[:, None]) ** 2)
        K = jnp.exp(-0.5 * ((x[:, :, None] - x[:, None, :]) / ls[:, None, None]) ** 2)
        cov = s[:, None, None] * (K - k_star[:, :, None] * k_star[:, None, :])
        cov = cov + self.noise_var * jnp.eye(self.num_points)
        mean = m[:, None] + k_star * (y_star - m)[:, None]
        chol = jnp.linalg.cholesky(cov)
        y = mean + jnp.einsum(
            "bij,bj->bi", chol, jax.random.normal(ks[6], (batch, self.num_points))
        )
        features = jnp.stack([m, jnp.log(s)], -1)
        obs = {"data": jnp.stack([x, y], -1), "query": x_star[:, None, None]}
        target = jnp.stack([y_star, jnp.log(ls)], -1)
        info = {"m": m, "s": s, "x": x, "y": y, "x_star": x_star}
        return Problem(features, target, obs, info)


# ------------------------------------------------------------------------------------------ task (e)

# (initial state before noise and normalisation, mean measurement time) of the ten measurements.
_QUANTUM_MEASUREMENTS = (
    ((1.0, 0.0), 1.0),
    ((1.0, 0.0), 2.0),
    ((1.0, 0.0), 3.0),
    ((1.0, 0.0), 4.0),
    ((1.0, 0.0), 5.0),
    ((0.0, 1.0), 1.0),
    ((0.0, 1.0), 2.0),
    ((1.0, 1.0), 1.0),
    ((1.0, 1.0), 2.0),
    ((1.0, 1.0), 3.0),
)


def quantum_probability_zero(delta, t, psi0):
    r"""P(outcome |0>) = |<0| exp(-i H t) psi0|^2 for H = delta sigma_x + (1 - delta) sigma_z, real psi0.

    H^2 = omega^2 I with omega^2 = delta^2 + (1 - delta)^2, so exp(-i H t) = cos(omega t) I - i sin(omega t) H /
    omega and <0|psi(t)> = cos(omega t) psi0_0 - i sin(omega t) ((1 - delta) psi0_0 + delta psi0_1) / omega.
    `psi0` is `[..., 2]` (normalised here); returns the broadcast shape of delta, t and psi0[..., 0].
    """
    psi0 = psi0 / jnp.linalg.norm(psi0, axis=-1, keepdims=True)
    omega = jnp.sqrt(delta**2 + (1.0 - delta) ** 2)
    c, s = jnp.cos(omega * t), jnp.sin(omega * t)
    h0 = (1.0 - delta) * psi0[..., 0] + delta * psi0[..., 1]
    return jnp.clip((c * psi0[..., 0]) ** 2 + (s * h0 / omega) ** 2, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class QuantumTask:
    """Task (e): infer delta of H = delta sigma_x + (1 - delta) sigma_z from 10 binary measurements.

    delta ~ Beta(c1, c0), c1, c0 ~ IG(4, 6); measurement j starts from a noisy, normalised state
    psi0 ~ N(loc_j, 0.01 I) (loc_j in |0>, |1>, |+>), evolves for t ~ N(t0_j, 0.05^2), and reads |0> with
    probability |<0|psi(t)>|^2. Each measurement is its own observation source, as in the official config.
    The transformer sees [log c1, log c0]; the GMM lives on logit delta. Deviation: the official observation
    model applies a sigmoid to its input before forming H; here H uses delta itself, as the paper writes it.
    """

    conc_shape: float = 4.0
    conc_rate: float = 6.0
    state_var: float = 0.01
    t_std: float = 0.05
    measurements: tuple = _QUANTUM_MEASUREMENTS
    name: str = "quantum"

    dim = 1
    prior_feature_dim = 2

    @property
    def observation_dims(self) -> dict[str, int]:
        return {f"m{j}": 1 for j in range(len(self.measurements))}

    @property
    def max_observations(self) -> int:
        return len(self.measurements)

    @property
    def transform(self) -> SampleSpaceTransform:
        return SampleSpaceTransform(("logit",))

    def _locs_times(self):
        locs = jnp.asarray([m[0] for m in self.measurements])
        times = jnp.asarray([m[1] for m in self.measurements])
        return locs, times

    def success_probability(self, key, delta, n: int | None = None):
        """p_j(delta) = P(z_j = 1 | delta) for the ten measurements, one draw of (t, psi0) per entry when
        `n` is None (`delta` `[...]` -> `[..., 10]`), else the Monte Carlo mean over `n` common draws."""
        locs, times = self._locs_times()
        J = len(self.measurements)
        shape = (*jnp.shape(delta), J) if n is None else (n, J)
        k_t, k_s = jax.random.split(key)
        t = times + self.t_std * jax.random.normal(k_t, shape)
        psi0 = locs + math.sqrt(self.state_var) * jax.random.normal(k_s, (*shape, 2))
        if n is None:
            return quantum_probability_zero(jnp.asarray(delta)[..., None], t, psi0)
        p = quantum_probability_zero(jnp.asarray(delta)[..., None, None], t, psi0)  # [..., n, J]
        return jnp.mean(p, axis=-2)

    def sample(self, key, batch: int) -> Problem:
        k_c1, k_c0, k_g1, k_g0, k_p, k_z = jax.random.split(key, 6)
        log_c1 = math.log(self.conc_rate) - jax.random.loggamma(k_c1, self.conc_shape, (batch,))
        log_c0 = math.log(self.conc_rate) - jax.random.loggamma(k_c0, self.conc_shape, (batch,))
        c1, c0 = jnp.exp(log_c1), jnp.exp(log_c0)
        logit_delta = jax.random.loggamma(k_g1, c1) - jax.random.loggamma(k_g0, c0)
        delta = jax.nn.sigmoid(logit_delta)
        p = self.success_probability(k_p, delta)  # [B, J]
        z = jax.random.bernoulli(k_z, p).astype(jnp.float32)
        obs = {f"m{j}": z[:, j, None, None] for j in range(len(self.measurements))}
        features = jnp.stack([log_c1, log_c0], -1)
        return Problem(features, logit_delta[:, None], obs, {"c1": c1, "c0": c0, "z": z})


TASKS = {
    "gmm_linear": GMMLinearGaussianTask,
    "invgamma_wide": InverseGammaTask.wide,
    "invgamma_narrow": InverseGammaTask.narrow,
    "sensor_fusion": SensorFusionTask,
    "gp_hyperprior": GPHyperpriorTask,
    "quantum": QuantumTask,
}


def make_task(name: str, **kwargs):
    """Builds a task by its preset name (one of `TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def model_kwargs(task) -> dict:
    """The `DistributionTransformer` arguments a task fixes: dim, components, sources, prior features."""
    kw = {
        "dim": task.dim,
        "observation_dims": dict(task.observation_dims),
        "max_observations": task.max_observations,
        "prior_feature_dim": task.prior_feature_dim,
    }
    if hasattr(task, "num_components") and task.prior_feature_dim is None:
        kw["num_components"] = task.num_components
    return kw


__all__ = [
    "Problem",
    "GMMLinearGaussianTask",
    "InverseGammaTask",
    "SensorFusionTask",
    "GPHyperpriorTask",
    "QuantumTask",
    "TASKS",
    "make_task",
    "model_kwargs",
    "sample_gmm_meta_prior",
    "meta_prior_kwargs",
]
