"""The Distribution Transformer: a permutation-equivariant map from a prior GMM and observations to a posterior GMM.

Whittle, Ziomek, Rawling, Osborne, "Distribution Transformers: Fast Approximate Bayesian Inference With On-The-Fly
Prior Adaptation" (arXiv 2502.02463), Sec. 3; reference notes Sec. 2. The forward pass:

1. **Component tokens.** Component j of the prior GMM (w_j, mu_j, L_j) becomes the vector
   [logit w_j, mu_j, log diag L_j, strict-lower L_j] of length 1 + d + d(d+1)/2, then an MLP (GELU) maps it to a
   `d_model` token. A prior that is not a GMM (inverse-gamma, Beta, GP hyperpriors) enters as a feature vector
   (its parameters, log-transformed where positive) through an MLP and then k separate conversion MLPs, one per
   output component, which deliberately break the symmetry between components (paper Sec. 3.2).
2. **Observation tokens.** Each observation source has its own MLP; every observation of a source is one token.
3. **Trunk.** `num_layers` decoder layers, each self-attention among the k component tokens, cross-attention to
   the observation tokens, and a feed-forward block. There is no positional encoding and no mask, so the map is
   equivariant to permutations of the prior's components and invariant to permutations of the observations.
   Like the official code (PyTorch `TransformerDecoderLayer`, `norm_first=False`) the layers are **post-LN**:
   x <- LN(x + SA(x)), x <- LN(x + CA(x, obs)), x <- LN(x + FFN(x)). The self-attention output projection and
   the second FFN layer are zero-initialised, as in the official code.
4. **De-embedding head**, shared by the prior tokens (before the trunk) and the posterior tokens (after it): an
   MLP back to [a_j, mu_j, log-diag_j, strict-lower_j], then w = softmax(a) over components and
   L_j = strict-lower + diag(exp(clip(log-diag, -11, 14)) + jitter). Every output is therefore a valid GMM: weights
   sum to one and every covariance L L^T is positive definite. Deviation: the official code uses
   sigmoid-then-renormalise for the weights; softmax is the same family and is computed in log space.

`DistributionTransformer.apply(params, prior, observations)` returns the posterior `GMM`;
`return_prior=True` also returns the decoded prior tokens (the prior-consistency term of the loss, Sec. 3.3).
`init_params(model, key, prior, observations)` initialises the parameters as one compiled program (an eager
`model.init` compiles each of the forward pass's small operations on its own: ~4.5 s on a 2-core CPU).
Input is checked in plain Python before anything compiles: dimensions, number of components, unknown observation
sources, more observation tokens than the model was built for, and (when concrete) malformed GMM parameters.

The tasks the model is trained on (meta-priors, likelihoods, exact references) are inference problems and live in
`theorax.inference.distribution_transformer.tasks`.

Example:
  >>> model = DistributionTransformer(dim=1, num_components=2, observation_dims={"z": 1}, d_model=8,
  ...                                 num_heads=2, num_layers=1, dim_feedforward=8)
  >>> prior = GMM.from_stddevs(jnp.zeros((3, 2)), jnp.zeros((3, 2, 1)), jnp.ones((3, 2, 1)))  # batch of 3
  >>> observations = {"z": jnp.ones((3, 1, 1))}  # one observation of source "z" per problem
  >>> params = init_params(model, jax.random.key(0), prior, observations)
  >>> posterior = jax.jit(model.apply)(params, prior, observations)
  >>> posterior.means.shape, bool(jnp.allclose(posterior.weights.sum(-1), 1.0))
  ((3, 2, 1), True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from theorax.models.gmm import GMM, GMMError, validate_gmm
from theorax.models.layers import gelu
from theorax.models.validation import check_finite


class ModelInputError(ValueError):
    """The prior or observations do not fit the model they are given to."""


def num_component_features(dim: int) -> int:
    """Length of a component's vector [logit w, mu, log diag L, strict-lower L]: 1 + d + d (d + 1) / 2."""
    return 1 + dim + dim * (dim + 1) // 2


def encode_components(gmm: GMM, logit_eps: float = 1e-6) -> jax.Array:
    """Maps each component to [logit w_j, mu_j, log diag L_j, strict-lower L_j], `[..., k, n_in]`.

    logit w = log w - log(1 - w), with w clipped to [eps, 1 - eps] (as `torch.logit(w, eps)`).
    """
    d = gmm.dim
    log_w = jnp.clip(gmm.log_weights, np.log(logit_eps), np.log1p(-logit_eps))
    logit_w = log_w - jnp.log1p(-jnp.exp(log_w))
    log_diag = jnp.log(jnp.diagonal(gmm.scale_tril, axis1=-2, axis2=-1))
    rows, cols = np.tril_indices(d, -1)
    strict = gmm.scale_tril[..., rows, cols]
    return jnp.concatenate([logit_w[..., None], gmm.means, log_diag, strict], axis=-1)


def decode_components(
    features: jax.Array, dim: int, jitter: float = 1e-6, log_diag_range=(-11.0, 14.0)
) -> GMM:
    """Inverse of the token vector: [a, mu, log-diag, strict-lower] `[..., k, n_in]` -> a valid GMM.

    w = softmax(a) over components; L = strict-lower + diag(exp(clip(log-diag)) + jitter).
    """
    logits = features[..., 0]
    means = features[..., 1 : 1 + dim]
    log_diag = jnp.clip(features[..., 1 + dim : 1 + 2 * dim], *log_diag_range)
    strict = features[..., 1 + 2 * dim :]
    rows, cols = np.tril_indices(dim, -1)
    tril = jnp.zeros(features.shape[:-1] + (dim, dim), features.dtype)
    tril = tril.at[..., rows, cols].set(strict)
    tril = tril + jnp.eye(dim, dtype=features.dtype) * (jnp.exp(log_diag) + jitter)[..., None, :]
    return GMM(logits, means, tril)


class MLP(nn.Module):
    """Dense layers with exact GELU between them; the last entry of `features` is the output width."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for i, f in enumerate(self.features):
            x = nn.Dense(f, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = gelu(x)
        return x


class _Projection(nn.Module):
    """Holds one projection's parameters in `nn.DenseGeneral`'s layout (kernel `[*in, *out]`, bias `[*out]`,
    kernel drawn flat as `[prod(in), prod(out)]` and reshaped) and returns them; `Attention` does the maths."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self):
        flat = (int(np.prod(self.in_shape)), int(np.prod(self.out_shape)))
        kernel = self.param(
            "kernel",
            lambda key: self.kernel_init(key, flat).reshape(self.in_shape + self.out_shape),
        )
        bias = self.param("bias", nn.initializers.zeros, self.out_shape)
        return kernel.reshape(flat), bias.reshape(-1)


class Attention(nn.Module):
    """Multi-head attention with the parameters of `nn.MultiHeadDotProductAttention` (same names, shapes and
    initialisation, so checkpoints are interchangeable) and two exact shortcuts for the small shapes of this model:

    * queries, keys and values that come from the same tokens are one matmul with the three kernels side by side
      (keys and values likewise when they come from the memory);
    * with a single key token (task (b): one observation) every attention weight is 1, so the output is
      out(value(memory)) for every query, computed once per problem; the query and key projections drop out.
    """

    num_heads: int
    d_model: int
    out_kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, memory=None):
        d, h = self.d_model, self.num_heads
        if d % h:
            raise ModelInputError(f"d_model={d} must be divisible by num_heads={h}")
        head = (h, d // h)
        (wq, bq), (wk, bk), (wv, bv) = (
            _Projection((x.shape[-1],), head, name=n)() for n in ("query", "key", "value")
        )
        wo, bo = _Projection(head, (d,), self.out_kernel_init, name="out")()
        if memory is None:  # self-attention
            qkv = x @ jnp.concatenate([wq, wk, wv], 1) + jnp.concatenate([bq, bk, bv])
            q, k, v = jnp.split(qkv, 3, axis=-1)
        elif memory.shape[-2] == 1:  # one key: softmax over it is 1
            return (memory @ wv + bv) @ wo + bo
        else:
            q = x @ wq + bq
            k, v = jnp.split(
                memory @ jnp.concatenate([wk, wv], 1) + jnp.concatenate([bk, bv]), 2, -1
            )
        q, k, v = (einops.rearrange(a, "... (h c) -> ... h c", h=h) for a in (q, k, v))
        q = q / np.sqrt(d // h)
        # [..., q, k, h]: broadcast products and sums, not batched dots (a few tokens per problem: XLA:CPU runs
        # these ~2.5x faster than thousands of 5x5 dot_generals)
        scores = (q[..., :, None, :, :] * k[..., None, :, :, :]).sum(-1)
        weights = jax.nn.softmax(scores, axis=-2)
        out = (weights[..., None] * v[..., None, :, :, :]).sum(-3)
        return einops.rearrange(out, "... h c -> ... (h c)") @ wo + bo


class DecoderLayer(nn.Module):
    """One post-LN trunk layer: self-attention over components, cross-attention to observations, FFN."""

    d_model: int
    num_heads: int
    dim_feedforward: int
    layer_norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, x, memory):
        sa = Attention(self.num_heads, self.d_model, nn.initializers.zeros, name="self_attention")(
            x
        )
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm1")(x + sa)
        ca = Attention(self.num_heads, self.d_model, name="cross_attention")(x, memory)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm2")(x + ca)
        h = nn.Dense(self.dim_feedforward, name="linear1")(x)
        h = gelu(h)
        h = nn.Dense(self.d_model, kernel_init=nn.initializers.zeros, name="linear2")(h)
        return nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm3")(x + h)


class DistributionTransformer(nn.Module):
    """Maps (prior, observations) to an approximate posterior GMM (paper Sec. 3; see the module docstring).

    Attributes:
      dim: dimension d of the latent (in the GMM's sample space).
      num_components: k, the number of prior and posterior components (fixed per model, "DT-k").
      observation_dims: `{source: observation size}`; each source has its own embedding MLP.
      max_observations: the largest number of observation tokens (all sources together) the model is meant
        for (what it was trained on); more raises `ModelInputError`.
      d_model, num_heads, num_layers, dim_feedforward: trunk sizes (paper: 64/8/6/256 for the inverse-gamma
        task, 32/8/6/2048 for the GMM toy task).
      component_hidden: hidden widths of the component embedding (mirrored in the de-embedding head).
      observation_hidden: hidden widths of each observation embedding.
      prior_feature_dim: `None` for GMM priors; otherwise the length of the non-GMM prior's feature vector.
      prior_hidden, conversion_hidden: hidden widths of the non-GMM prior embedding and of each of the k
        conversion MLPs.
      jitter: added to the diagonal of every output Cholesky factor.
      log_diag_range: clip of the output log-diagonal (the official code's [-11, 14]).
    """

    dim: int
    num_components: int
    observation_dims: Mapping[str, int]
    max_observations: int = 1
    d_model: int = 64
    num_heads: int = 8
    num_layers: int = 6
    dim_feedforward: int = 256
    component_hidden: Sequence[int] = (32,)
    observation_hidden: Sequence[int] = (32,)
    prior_feature_dim: int | None = None
    prior_hidden: Sequence[int] = (32,)
    conversion_hidden: Sequence[int] = (64,)
    jitter: float = 1e-6
    log_diag_range: tuple[float, float] = (-11.0, 14.0)

    # ------------------------------------------------------------------------------------ validation

    def check_inputs(self, prior, observations) -> tuple[tuple[int, ...], dict[str, jax.Array]]:
        """Validates `(prior, observations)` in plain Python; returns the batch shape and the observations
        reshaped to `{source: [*B, n, obs_dim]}`. Shapes are always checked, values when concrete."""
        if self.prior_feature_dim is None:
            if not isinstance(prior, GMM):
                raise ModelInputError(
                    f"this model takes a GMM prior (prior_feature_dim=None), got {type(prior).__name__}"
                )
            validate_gmm(prior, name="prior")
            if prior.dim != self.dim:
                raise ModelInputError(
                    f"prior has dimension {prior.dim} but the model was built for dim={self.dim}"
                )
            if prior.num_components != self.num_components:
                raise ModelInputError(
                    f"prior has {prior.num_components} components but the model was built for "
                    f"num_components={self.num_components}; pad or merge components to match"
                )
            batch = tuple(prior.batch_shape)
        else:
            if isinstance(prior, GMM):
                raise ModelInputError(
                    f"this model takes a prior feature vector of length {self.prior_feature_dim}, not a GMM"
                )
            shape = jnp.shape(prior)
            if len(shape) < 1 or shape[-1] != self.prior_feature_dim:
                raise ModelInputError(
                    f"prior features have shape {shape}; expected [..., {self.prior_feature_dim}]"
                )
            check_finite(prior, "prior features", ModelInputError)
            batch = tuple(shape[:-1])
        if not isinstance(observations, Mapping):
            raise ModelInputError(
                f"observations must be a dict {{source: array}}, got {type(observations).__name__}"
            )
        unknown = sorted(set(observations) - set(self.observation_dims))
        if unknown:
            raise ModelInputError(
                f"unknown observation source(s) {unknown}; the model knows {sorted(self.observation_dims)}"
            )
        if not observations:
            raise ModelInputError("at least one observation is needed")
        out, total = {}, 0
        for name in self.observation_dims:
            if name not in observations:
                continue
            z = observations[name]
            shape, m = tuple(jnp.shape(z)), self.observation_dims[name]
            if shape[:-1] == batch:  # a single observation
                z = jnp.asarray(z)[..., None, :]
                shape = tuple(z.shape)
            if len(shape) != len(batch) + 2 or shape[:-2] != batch or shape[-1] != m:
                raise ModelInputError(
                    f"observations[{name!r}] has shape {shape}; expected [*batch, n, {m}] or "
                    f"[*batch, {m}] with batch = {batch} (the prior's batch shape)"
                )
            check_finite(z, f"observations[{name!r}]", ModelInputError)
            total += shape[-2]
            out[name] = z
        if total > self.max_observations:
            raise ModelInputError(
                f"{total} observation tokens given but the model was built for at most "
                f"max_observations={self.max_observations}; split them into sequential updates "
                "(feed the posterior back as the prior) or retrain with more"
            )
        return batch, out

    # --------------------------------------------------------------------------------------- forward

    def setup(self):
        n_in = num_component_features(self.dim)
        self.component_embedding = MLP((*self.component_hidden, self.d_model))
        self.component_head = MLP((*reversed(tuple(self.component_hidden)), n_in))
        self.observation_embeddings = {
            name: MLP((*self.observation_hidden, self.d_model), name=f"observation_{name}")
            for name in self.observation_dims
        }
        if self.prior_feature_dim is not None:
            self.prior_embedding = MLP((*self.prior_hidden, self.d_model))
            self.conversions = [
                MLP((*self.conversion_hidden, self.d_model), name=f"conversion_{j}")
                for j in range(self.num_components)
            ]
        self.layers = [
            DecoderLayer(self.d_model, self.num_heads, self.dim_feedforward, name=f"layer_{i}")
            for i in range(self.num_layers)
        ]

    def decode(self, tokens: jax.Array) -> GMM:
        """The shared de-embedding head: tokens `[..., k, d_model]` -> a valid GMM."""
        return decode_components(
            self.component_head(tokens), self.dim, self.jitter, self.log_diag_range
        )

    def __call__(self, prior, observations: Mapping[str, jax.Array], return_prior: bool = False):
        """Posterior GMM q(x | prior, observations).

        Args:
          prior: a `GMM` with batch shape `B`, `dim` dimensions and `num_components` components, or (for
            models with `prior_feature_dim`) a feature array `[*B, prior_feature_dim]`.
          observations: `{source: [*B, n, obs_dim]}` (or `[*B, obs_dim]` for one observation).
          return_prior: also return the decoded prior tokens (before the trunk).

        Returns:
          The posterior `GMM` (batch shape `B`), or `(prior_gmm, posterior_gmm)` with `return_prior`.
        """
        _, observations = self.check_inputs(prior, observations)
        if self.prior_feature_dim is None:
            tokens = self.component_embedding(encode_components(prior))
        else:
            h = self.prior_embedding(jnp.asarray(prior, jnp.float32))
            tokens = jnp.stack([conv(h) for conv in self.conversions], axis=-2)
        memory = jnp.concatenate(
            [self.observation_embeddings[name](z) for name, z in observations.items()], axis=-2
        )
        prior_tokens = tokens
        for layer in self.layers:
            tokens = layer(tokens, memory)
        posterior = self.decode(tokens)
        if return_prior:
            return self.decode(prior_tokens), posterior
        return posterior


def init_params(model: DistributionTransformer, key: jax.Array, prior, observations):
    """`model.init(key, prior, observations)` as one compiled program.

    An eager `model.init` runs the forward pass op by op, and XLA compiles every distinct operation and shape
    on its first use: for this model's many small operations that is ~4.5 s on a 2-core CPU (0.02 s once
    they are cached), against about a second for the one program. The inputs are validated first, in
    plain Python, so malformed values still fail with `check_inputs`'s message.
    """
    model.check_inputs(prior, observations)
    return jax.jit(model.init)(key, prior, observations)


__all__ = [
    "DistributionTransformer",
    "ModelInputError",
    "GMMError",
    "init_params",
    "encode_components",
    "decode_components",
    "num_component_features",
]
