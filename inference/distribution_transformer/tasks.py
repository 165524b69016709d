"""The paper's tasks as inference problems: meta-priors p(phi), priors p(x | phi), likelihoods p(z | x), the exact or
reference posteriors, and how the baselines see each task.

A task is one class that meets the `Task` contract (below): it draws fresh training triples (phi, x, z)
(Distribution Transformers, Sec. 3.3; reference notes Sec. 3) and says how the transformer sees them (a GMM prior
or a prior feature vector, observation sources and sizes, the sample-space transform f that puts the latent on
R^d); it scores approximate posteriors through its reference posterior (closed form or quadrature, the maths in
`exact`), and it gives the numpyro baselines its model and arguments. Adding a task is one class here and its
entry in `TASKS` (plus a config).

* `GMMLinearGaussianTask`, task (a): w ~ Dir(1/k), mu_j ~ N(0, I), Lambda_j ~ Wishart(d + 1, I), Sigma_j =
  Lambda_j^{-1}; x ~ GMM; z = H x + N(0, R). Exact posterior: `exact.linear_gaussian_posterior`.
* `InverseGammaTask`, task (b) (paper Sec. 4.1): alpha, beta ~ IG(a, b) each (wide: IG(4, 6); narrow:
  IG(1e4, 2e4)); sigma^2 ~ IG(alpha, beta); z ~ N(0, sigma^2). The GMM lives on log sigma^2.
* `SensorFusionTask`, task (c) (Sec. 4.3.1): a 4-D state (px, vx, py, vy) with the official config's GMM
  meta-prior (`default_scale_multiple: 16` scales both the means' covariance and the Wishart's scale matrix),
  a rangefinder (0.7 N(r, (0.1 (r + 1))^2) + 0.2 Exp(1) + 0.1 U(0, 10), clipped to [0, 10]) and a bearing
  sensor (atan2(px, py) + N(0, 0.1^2), wrapped). `rangefinder_log_prob` orders the mixture components exactly as the
  sampler does; the official code stacks them as [normal, uniform, exp] against weights for [normal, exp,
  uniform], a bug fixed here. The LTI motion model of the filtering experiment (`dynamics`) is here too.
* `GPHyperpriorTask`, task (d) (Sec. 4.2.1): y* ~ N(m, s), l ~ Gamma(3, 6), 10 noisy points from the GP
  conditioned on f(x*) = y*; the latent is (y*, l) with the GMM on (y*, log l).
* `QuantumTask`, task (e) (Sec. 4.2.2): H = delta sigma_x + (1 - delta) sigma_z, delta ~ Beta(c1, c0),
  c1, c0 ~ IG(4, 6); 10 binary measurements of noisy initial states after noisy times; the GMM lives on
  logit delta.

All sampling is done in log space where it matters (Dirichlet weights as log-gamma draws, log sigma^2 =
log beta - log Gamma(alpha)), so tiny shapes do not underflow. The numpyro models are imported lazily (inside
`numpyro_model`), so training a transformer does not import numpyro.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from theorax.inference.distribution_transformer import exact
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


class BaselineProblem(NamedTuple):
    """How the numpyro baselines (NUTS, SVI) see the first P problems of a batch.

    Attributes:
      model: the task's numpyro model, `model(*args_b)` for one problem.
      args: its arguments with a leading problem axis `[P, ...]`.
      to_sample_space: NUTS samples `{site: [P, S, ...]}` (numpyro's unconstrained space) -> `[S, P, d]` in the
        GMM's sample space, dimensions in the task's order.
      site_order: the dimensions of an SVI guide (flattened in numpyro's site order) that give the task's
        order (`GMM.marginal(site_order)`), or None when the orders agree.
    """

    model: Callable
    args: tuple
    to_sample_space: Callable
    site_order: tuple[int, ...] | None = None


class Task:
    """The contract every task meets; the defaults here are for a static task without a reference.

    Every task:
      name, dim (of the latent), num_components (of its GMM priors) or prior_feature_dim (the length of its
      prior feature vectors), observation_dims `{source: size}`, max_observations (tokens per problem),
      transform (f, onto R^dim);
      `sample(key, batch) -> Problem`; `model_kwargs(num_components)`: the `DistributionTransformer`
      arguments it fixes.

    Static tasks (scored on independent problems):
      `reference_log_prob(problem, y)`: the exact or near-exact posterior density in the sample space;
      `reference_sample(problem, key, n)` where `has_exact_sampler`; `marginal_nlls(q, y)` and
      `reference_marginal_nlls(problem, y)`: NLLs of named parts of the latent, where the task reports them;
      `baseline_problem(problem, n)`: the numpyro view; `importance_proposal(problem)`: a prior proposal and
      log-likelihood for importance sampling, where the task has that baseline.

    Filtering tasks (`filtering = True`, scored along simulated series): `dynamics` (an
    `exact.LinearGaussianDynamics`), `initial_prior(batch, k)`, `simulate(key, batch, num_steps)`,
    `sample_given_prior(key, prior)`, `log_likelihood(x, observations)`, and the EKF's
    `ekf_observation_model()` and `ekf_observations(observations)`.
    """

    name: str = "task"
    dim: int = 1
    num_components: int | None = None  # of the GMM priors (None: feature priors)
    prior_feature_dim: int | None = None
    filtering: bool = False
    has_exact_sampler: bool = False

    @property
    def observation_dims(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def max_observations(self) -> int:
        raise NotImplementedError

    @property
    def transform(self) -> SampleSpaceTransform:
        return SampleSpaceTransform(("identity",) * self.dim)

    def sample(self, key: jax.Array, batch: int) -> Problem:
        raise NotImplementedError

    def model_kwargs(self, num_components: int | None = None) -> dict:
        """The `DistributionTransformer` arguments this task fixes: dim, components, sources, prior features.

        GMM-prior tasks fix the number of components (`num_components` may only repeat it); feature-prior
        tasks need it given.
        """
        own = self.num_components if self.prior_feature_dim is None else None
        if own is not None and num_components not in (None, own):
            raise ValueError(
                f"{type(self).__name__} draws priors with {own} components; the model cannot have "
                f"num_components={num_components}"
            )
        k = own if own is not None else num_components
        if k is None:
            raise ValueError(f"{type(self).__name__} needs num_components for the model")
        return {
            "dim": self.dim,
            "num_components": k,
            "observation_dims": dict(self.observation_dims),
            "max_observations": self.max_observations,
            "prior_feature_dim": self.prior_feature_dim,
        }

    def reference_log_prob(self, problem: Problem, y: jax.Array) -> jax.Array:
        """log p(y | z, phi) of the (near-)exact posterior in the GMM's sample space, `y` `[*S, B, d]` ->
        `[*S, B]`."""
        raise ValueError(f"no exact reference density for task {type(self).__name__}")

    def reference_sample(self, problem: Problem, key: jax.Array, n: int) -> jax.Array:
        """n exact posterior draws in the sample space, `[n, B, d]`."""
        raise ValueError(f"no exact posterior sampler for task {type(self).__name__}")

    def marginal_nlls(self, q: GMM, y: jax.Array) -> dict[str, jax.Array]:
        """`{part: [B]}` NLLs of named parts of the latent under `q`, each in the part's own space."""
        return {}

    def reference_marginal_nlls(self, problem: Problem, y: jax.Array) -> dict[str, jax.Array]:
        """`marginal_nlls` under the reference posterior."""
        return {}

    def baseline_problem(self, problem: Problem, n: int) -> BaselineProblem | None:
        """The first `n` problems as the numpyro baselines see them (None: the task has no numpyro model)."""
        return None

    def importance_proposal(self, problem: Problem) -> tuple[Callable, Callable] | None:
        """`(sample_prior(key, n) -> [n, B, d], log_likelihood([n, B, d]) -> [n, B])` in the sample space, for
        `baselines.importance_sampling`; None when the task has no importance-sampling baseline."""
        return None


def _per_problem(x, n: int) -> jax.Array:
    """A setting shared by every problem, repeated along a leading problem axis of size n."""
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (n, *x.shape))


def _first(problem: Problem, n: int) -> Problem:
    return jax.tree.map(lambda a: a[:n], problem)


# -------------------------------------------------------------------------------------- GMM meta-prior


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


@dataclasses.dataclass(frozen=True)
class GMMMetaPrior:
    """The conjugate meta-prior over GMM priors of the paper's code (reference notes Sec. 3):
    w ~ Dir(1/k), mu_j ~ N(loc_mean, loc_scale^2 I), Sigma_j^{-1} ~ Wishart(df, precision_scale I) with
    df = d + 1 by default, the Wishart's Bartlett diagonal floored at sqrt(min_precision).

    `official(m, eps)` is the official `GaussianMixtureModelConjugateMetaPrior(default_scale_multiple=m,
    scale_eps=eps)`, which multiplies *both* default scale matrices by m: the means' covariance
    (loc_scale = sqrt(m)) and the Wishart's scale matrix (precision_scale = m, so the components' covariances
    shrink by 1 / m).
    """

    loc_mean: float = 0.0
    loc_scale: float = 1.0
    wishart_df: float | None = None
    precision_scale: float = 1.0
    min_precision: float = 1e-6

    @classmethod
    def official(cls, default_scale_multiple: float = 1.0, scale_eps: float = 1e-6) -> GMMMetaPrior:
        return cls(
            loc_scale=math.sqrt(default_scale_multiple),
            precision_scale=float(default_scale_multiple),
            min_precision=float(scale_eps),
        )

    def sample(self, key: jax.Array, batch: int, num_components: int, dim: int) -> GMM:
        """`batch` GMM priors with `num_components` components in `dim` dimensions (normalised logits)."""
        k_w, k_mu, k_cov = jax.random.split(key, 3)
        logits = _dirichlet_logits(k_w, 1.0 / num_components, (batch, num_components))
        means = jnp.asarray(self.loc_mean) + self.loc_scale * jax.random.normal(
            k_mu, (batch, num_components, dim)
        )
        df = dim + 1.0 if self.wishart_df is None else self.wishart_df
        tril = _inverse_wishart_cholesky(
            k_cov, dim, df, (batch, num_components), self.min_precision, self.precision_scale
        )
        return GMM(logits - jax.scipy.special.logsumexp(logits, -1, keepdims=True), means, tril)


# ------------------------------------------------------------------------------------------ task (a)


@dataclasses.dataclass(frozen=True)
class GMMLinearGaussianTask(Task):
    """Task (a): GMM prior, linear-Gaussian observations z_i = H x + N(0, R), i = 1..num_observations.

    The paper's toy config: d = 1, k = 2, H = R = [[1]], one observation. The exact posterior is a GMM
    (`exact.linear_gaussian_posterior` of the stacked observations).
    """

    dim: int = 1
    num_components: int = 2
    H: tuple = ((1.0,),)
    R: tuple = ((1.0,),)
    num_observations: int = 1
    loc_scale: float = 1.0
    name: str = "gmm_linear"

    has_exact_sampler = True

    @property
    def obs_dim(self) -> int:
        return len(self.H)

    @property
    def observation_dims(self) -> dict[str, int]:
        return {"z": self.obs_dim}

    @property
    def max_observations(self) -> int:
        return self.num_observations

    def sample(self, key, batch: int) -> Problem:
        k_prior, k_x, k_z = jax.random.split(key, 3)
        meta_prior = GMMMetaPrior(loc_scale=self.loc_scale)
        prior = meta_prior.sample(k_prior, batch, self.num_components, self.dim)
        x = prior.sample(k_x, 1)[0]
        H, R_chol = jnp.asarray(self.H), jnp.linalg.cholesky(jnp.asarray(self.R))
        eps = jax.random.normal(k_z, (batch, self.num_observations, self.obs_dim))
        z = jnp.einsum("md,bd->bm", H, x)[:, None, :] + eps @ R_chol.T
        return Problem(prior, x, {"z": z}, {})

    def exact_posterior(self, problem: Problem) -> GMM:
        """The exact posterior GMM after all of the problem's observations (one stacked update)."""
        H, R, z = exact.stack_observations(self.H, self.R, problem.observations["z"])
        return exact.linear_gaussian_posterior(problem.prior, H, R, z)

    def reference_log_prob(self, problem, y):
        return self.exact_posterior(problem).log_prob(y)

    def reference_sample(self, problem, key, n):
        return self.exact_posterior(problem).sample(key, n)

    @staticmethod
    def numpyro_model(logits, means, scale_tril, H, R, z):
        """x ~ GMM prior, z_i ~ N(H x, R) for the rows z_i of `z` `[n, m]`."""
        import numpyro
        import numpyro.distributions as dist

        x = numpyro.sample("x", GMM(logits, means, scale_tril).to_numpyro())
        with numpyro.plate("obs", z.shape[0]):
            numpyro.sample("z", dist.MultivariateNormal(H @ x, covariance_matrix=R), obs=z)

    def baseline_problem(self, problem, n):
        p = _first(problem, n)
        args = (p.prior.logits, p.prior.means, p.prior.scale_tril)
        args += (_per_problem(self.H, n), _per_problem(self.R, n), p.observations["z"])
        return BaselineProblem(self.numpyro_model, args, lambda s: jnp.moveaxis(s["x"], 0, 1))


# ------------------------------------------------------------------------------------------ task (b)


@dataclasses.dataclass(frozen=True)
class InverseGammaTask(Task):
    """Task (b): sigma^2 ~ IG(alpha, beta) with alpha ~ IG(a_alpha, b_alpha), beta ~ IG(a_beta, b_beta), and
    z_i ~ N(loc, sigma^2). The transformer sees the features [log alpha, log beta] and the GMM lives on
    log sigma^2; the exact posterior is IG(alpha + n / 2, beta + sum (z_i - loc)^2 / 2). Presets: `wide()`
    (IG(4, 6) each) and `narrow()` (IG(1e4, 2e4) each, i.e. about 2)."""

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
    has_exact_sampler = True

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

    def posterior_params(self, problem: Problem) -> tuple[jax.Array, jax.Array]:
        """(alpha', beta') of the conjugate posterior."""
        return exact.inverse_gamma_posterior(
            problem.info["alpha"], problem.info["beta"], problem.observations["z"][..., 0], self.loc
        )

    def reference_log_prob(self, problem, y):
        a, b = self.posterior_params(problem)
        return exact.inverse_gamma_log_prob_log_space(y[..., 0], a, b)

    def reference_sample(self, problem, key, n):
        a, b = self.posterior_params(problem)
        return exact.inverse_gamma_sample_log_space(key, a, b, n)[..., None]

    @staticmethod
    def numpyro_model(alpha, beta, z, loc=0.0):
        """sigma^2 ~ IG(alpha, beta), z_i ~ N(loc, sigma^2)."""
        import numpyro
        import numpyro.distributions as dist

        var = numpyro.sample("var", dist.InverseGamma(alpha, beta))
        with numpyro.plate("obs", z.shape[0]):
            numpyro.sample("z", dist.Normal(loc, jnp.sqrt(var)), obs=z)

    def baseline_problem(self, problem, n):
        p = _first(problem, n)
        args = (p.info["alpha"], p.info["beta"], p.observations["z"][..., 0])
        return BaselineProblem(
            self.numpyro_model, args, lambda s: jnp.moveaxis(s["var"], 0, 1)[..., None]
        )


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
class SensorFusionTask(Task):
    """Task (c): 4-D state (px, vx, py, vy), a rangefinder r = ||(px, py)|| and a bearing atan2(px, py).

    Training draws GMM priors from the official config's conjugate meta-prior (`default_scale_multiple: 16`,
    `scale_eps: 1e-4`): means ~ N(0, 16 I) and precisions ~ Wishart(5, 16 I), i.e. component covariances
    1/16 of those of Wishart(5, I) (`GMMMetaPrior.official`); then x ~ prior and one reading of each sensor.
    The filtering experiment uses the LTI motion model `dynamics`: x0 ~ N(x0_mean, I), x' = A x + F eps.
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
    filtering = True

    @property
    def observation_dims(self) -> dict[str, int]:
        return {"range": 1, "bearing": 1}

    @property
    def max_observations(self) -> int:
        return 2

    @property
    def dynamics(self) -> exact.LinearGaussianDynamics:
        """The LTI motion model: x_0 ~ N(x0_mean, I), x_{t+1} = A x_t + F eps_t."""
        return exact.LinearGaussianDynamics(self.A, self.Q_factor, self.x0_mean)

    @property
    def meta_prior(self) -> GMMMetaPrior:
        """The training meta-prior over GMM priors."""
        meta_prior = GMMMetaPrior.official(self.default_scale_multiple, self.scale_eps)
        if self.wishart_scale is not None:
            meta_prior = dataclasses.replace(meta_prior, precision_scale=float(self.wishart_scale))
        return meta_prior

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

    def initial_prior(self, batch: int, num_components: int) -> GMM:
        """The filter's first prior: x0 ~ N(x0_mean, I) as k identical components with weights proportional
        to 1..k (distinct tokens for the permutation-equivariant model, as the official `LTIFilter`)."""
        w = jnp.arange(1, num_components + 1, dtype=jnp.float32)
        logits = jnp.broadcast_to(jnp.log(w / w.sum()), (batch, num_components))
        means = jnp.broadcast_to(jnp.asarray(self.x0_mean), (batch, num_components, 4))
        tril = jnp.broadcast_to(jnp.eye(4), (batch, num_components, 4, 4))
        return GMM(logits, means, tril)

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
        prior = self.meta_prior.sample(k_prior, batch, self.num_components, 4)
        return self.sample_given_prior(k_rest, prior)

    def range_moments(self, r) -> tuple[jax.Array, jax.Array]:
        """Mean and variance of the rangefinder mixture (unclipped) at true range `r`."""
        w0, w1, w2 = self.range_weights
        m = jnp.stack(
            [r, jnp.full_like(r, 1.0 / self.range_rate), jnp.full_like(r, self.max_range / 2)]
        )
        v = jnp.stack(
            [
                (self.range_scale * (r + 1.0)) ** 2,
                jnp.full_like(r, 1.0 / self.range_rate**2),
                jnp.full_like(r, self.max_range**2 / 12.0),
            ]
        )
        w = jnp.asarray([w0, w1, w2]).reshape((3,) + (1,) * r.ndim)
        mean = jnp.sum(w * m, 0)
        return mean, jnp.sum(w * (v + m**2), 0) - mean**2

    def ekf_observation_model(self) -> tuple[Callable, Callable, Callable]:
        """The EKF's `(h, R, residual)`: h(x) = (moment-matched mean range, bearing), R(x) = diag(rangefinder
        mixture variance at r(x), bearing_scale^2), and the residual with a wrapped bearing (as the official
        EKF, which uses the rangefinder's mean and variance)."""

        def h(x):
            mean_r, _ = self.range_moments(self.true_range(x))
            return jnp.stack([mean_r, self.true_bearing(x)])

        def noise_covariance(x):
            _, var_r = self.range_moments(self.true_range(x))
            return jnp.diag(jnp.stack([var_r, jnp.asarray(self.bearing_scale**2)]))

        def residual(z, z_pred):
            innov = z - z_pred
            return innov.at[1].set(wrap_angle(innov[1]))

        return h, noise_covariance, residual

    def ekf_observations(self, observations) -> jax.Array:
        """The readings `{source: [T, B, 1, 1]}` as the EKF's `[T, B, 2]` (range, bearing)."""
        return jnp.stack([observations["range"][..., 0, 0], observations["bearing"][..., 0, 0]], -1)


# ------------------------------------------------------------------------------------------ task (d)

# The quadrature grid (lo, hi, points) over u = log l of the GP reference posterior.
GP_GRID = (math.log(1e-3), math.log(20.0), 3001)


@dataclasses.dataclass(frozen=True)
class GPHyperpriorTask(Task):
    """Task (d): f ~ GP(m, s k_l) with an RBF kernel, y* = f(x*), data y_i = f(x_i) + N(0, noise_var).

    Meta-prior m ~ U(-0.5, 0.5), s ~ U(0.9, 1.1); hyperprior l ~ Gamma(3, rate 6); x*, x_i ~ U(0, 1).
    The data are drawn from the GP conditioned on f(x*) = y* (reference notes Sec. 3). The transformer sees
    prior features [m, log s], one token per data point (x_i, y_i) and a query token x*; the latent is (y*, l)
    with the GMM on (y*, log l). The reference is `exact.gp_hyperprior_log_posterior` (quadrature over log l
    on `GP_GRID`); the task also reports the predictive NLL of y* and the NLL of l.
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
        k_star = exact.rbf_kernel(x, x_star[:, None], ls)[..., 0]
        K = exact.rbf_kernel(x, x, ls)
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

    def _reference(self, problem: Problem) -> tuple[exact.GPData, exact.GPHyperprior]:
        i = problem.info
        data = exact.GPData(i["x"], i["y"], i["x_star"], i["m"], i["s"])
        lo, hi, n = GP_GRID
        hyper = exact.GPHyperprior(
            self.noise_var, self.ls_shape, self.ls_rate, jnp.linspace(lo, hi, n)
        )
        return data, hyper

    def reference_log_prob(self, problem, y):
        return exact.gp_hyperprior_log_posterior(y[..., 0], y[..., 1], *self._reference(problem))

    def marginal_nlls(self, q, y):
        return {
            "y_star": -q.marginal(0).log_prob(y[..., :1]),
            "lengthscale": -q.marginal(1).log_prob(y[..., 1:]) + y[..., 1],
        }

    def reference_marginal_nlls(self, problem, y):
        lpy, lpu = exact.gp_hyperprior_log_marginals(
            y[..., 0], y[..., 1], *self._reference(problem)
        )
        return {"y_star": -lpy, "lengthscale": -lpu + y[..., 1]}

    @staticmethod
    def numpyro_model(x, y, x_star, m, s, noise_var, ls_shape, ls_rate):
        """l ~ Gamma(a, b); y ~ N(m, s K_l + noise I); y* | l, y from the GP predictive."""
        import numpyro
        import numpyro.distributions as dist

        ls = numpyro.sample("ls", dist.Gamma(ls_shape, ls_rate))
        loglik, mean, var = exact.gp_conditionals(exact.GPData(x, y, x_star, m, s), ls, noise_var)
        numpyro.factor("data", loglik)
        numpyro.sample("y_star", dist.Normal(mean, jnp.sqrt(var)))

    def baseline_problem(self, problem, n):
        i = _first(problem, n).info
        args = (i["x"], i["y"], i["x_star"], i["m"], i["s"])
        args += tuple(_per_problem(v, n) for v in (self.noise_var, self.ls_shape, self.ls_rate))

        def to_sample_space(s):
            return jnp.moveaxis(jnp.stack([s["y_star"], s["ls"]], -1), 0, 1)

        return BaselineProblem(self.numpyro_model, args, to_sample_space, (1, 0))  # sites (ls, y*)


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

# The grid (lo, hi, points) over u = logit delta on which the reference tabulates the success probabilities.
QUANTUM_GRID = (-40.0, 40.0, 2001)


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


@functools.lru_cache(maxsize=8)
def _quantum_success_grid(task: QuantumTask, num_draws: int, seed: int):
    lo, hi, n = QUANTUM_GRID
    grid = jnp.linspace(lo, hi, n)
    key = jax.random.key(seed)
    p = jax.lax.map(
        lambda u: task.success_probability(key, jax.nn.sigmoid(u), num_draws), grid, batch_size=32
    )
    return np.asarray(grid), np.clip(np.asarray(p), 1e-7, 1 - 1e-7)


@dataclasses.dataclass(frozen=True)
class QuantumTask(Task):
    """Task (e): infer delta of H = delta sigma_x + (1 - delta) sigma_z from 10 binary measurements.

    delta ~ Beta(c1, c0), c1, c0 ~ IG(4, 6); measurement j starts from a noisy, normalised state
    psi0 ~ N(loc_j, 0.01 I) (loc_j in |0>, |1>, |+>), evolves for t ~ N(t0_j, 0.05^2), and reads |0> with
    probability |<0|psi(t)>|^2. Each measurement is its own observation source, as in the official config.
    The transformer sees [log c1, log c0]; the GMM lives on logit delta. The reference posterior is normalised
    by quadrature on `QUANTUM_GRID`, with each measurement's success probability averaged over common random
    draws of (t, psi0) (`success_grid`); importance sampling from the prior is a baseline. Deviation: the
    official observation model applies a sigmoid to its input before forming H; here H uses delta itself, as
    the paper writes it.
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

    def success_grid(self, num_draws: int = 4096, seed: int = 12345):
        """p_j(delta) = E_{t, psi0}[|<0| e^{-i H t} psi0|^2] on the grid `QUANTUM_GRID` of u = logit delta.

        Averaged over `num_draws` common random draws of (t, psi0), the same for every grid point, so p_j is a
        smooth deterministic function of delta. Returns numpy `(grid [G], p [G, J])`; cached per task.
        """
        return _quantum_success_grid(self, num_draws, seed)

    def log_likelihood(self, u, z) -> jax.Array:
        """log p(z | delta) at u = logit delta, `u` `[*S, B]`, `z` `[B, J]` -> `[*S, B]`; p_j is linearly
        interpolated from `success_grid`."""
        grid, p = self.success_grid()
        return exact.bernoulli_log_likelihood(exact.interpolate_columns(u, grid, p), z)

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

    def reference_log_prob(self, problem, y):
        i = problem.info
        return exact.grid_bernoulli_log_posterior(
            y[..., 0], i["c1"], i["c0"], i["z"], *self.success_grid()
        )

    @staticmethod
    def numpyro_model(c1, c0, z, grid, success_grid):
        """delta ~ Beta(c1, c0), z_j ~ Bernoulli(p_j(delta)), p_j interpolated on a logit grid."""
        import numpyro
        import numpyro.distributions as dist

        delta = numpyro.sample("delta", dist.Beta(c1, c0))
        u = jnp.log(delta) - jnp.log1p(-delta)
        p = exact.interpolate_columns(u, grid, success_grid)
        numpyro.sample("z", dist.Bernoulli(probs=p), obs=z)

    def baseline_problem(self, problem, n):
        i = _first(problem, n).info
        grid, p = self.success_grid()
        args = (i["c1"], i["c0"], i["z"], _per_problem(grid, n), _per_problem(p, n))
        return BaselineProblem(
            self.numpyro_model, args, lambda s: jnp.moveaxis(s["delta"], 0, 1)[..., None]
        )

    def importance_proposal(self, problem):
        c1, c0, z = problem.info["c1"], problem.info["c0"], problem.info["z"]

        def sample_prior(key, n):  # u = logit delta = log Gamma(c1) - log Gamma(c0)
            k1, k2 = jax.random.split(key)
            shape = (n, *jnp.shape(c1))
            u = jax.random.loggamma(k1, c1, shape) - jax.random.loggamma(k2, c0, shape)
            return u[..., None]

        return sample_prior, lambda y: self.log_likelihood(y[..., 0], z)


TASKS = {
    "gmm_linear": GMMLinearGaussianTask,
    "invgamma_wide": InverseGammaTask.wide,
    "invgamma_narrow": InverseGammaTask.narrow,
    "sensor_fusion": SensorFusionTask,
    "gp_hyperprior": GPHyperpriorTask,
    "quantum": QuantumTask,
}


def make_task(name: str, **kwargs) -> Task:
    """Builds a task by its preset name (one of `TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](**kwargs)


def task_class(name: str) -> type[Task]:
    """The task class behind a preset name (one of `TASKS`)."""
    factory = TASKS[name]
    return getattr(factory, "__self__", factory)  # a class, or the class of a classmethod preset
