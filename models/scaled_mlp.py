"""Inverted-bottleneck MLPs of "Scaling MLPs: A Tale of Inductive Bias" (Bachmann et al., NeurIPS 2023).

The B-MLP (paper Sec. 3) embeds the flattened image linearly and stacks pre-LN residual blocks

    x <- x + W_c GELU(W_e LN(x)),    W_e: m -> k m,  W_c: k m -> m,  k = 4,

followed by a linear head on the residual stream (no final norm, no pooling). Faithful to the official code:

* exact (erf) GELU, LayerNorm eps 1e-5 with affine parameters, biases on every Linear;
* PyTorch-default initialisation: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LN weight 1, bias 0;
* the image (N, H, W, C) is flattened in channel, row, column order, as the official NCHW tensors are, so the
  official checkpoints load without permuting rows (see `third_party.scaling_mlps`).

`bottleneck=False` gives the S-MLP as the official code builds it (not as the paper's prose describes it):
the embedding, then `depth - 1` blocks LN -> GELU -> Linear(m, m) without residuals, then the head.

Example: the paper's largest model, by shapes alone (`model.init` gives the values; no compilation here)

    >>> model = ScaledMLP.from_name("B-12/Wi-1024", num_classes=11230)  # or the official "B_12-Wi_1024"
    >>> images = jnp.zeros((2, 64, 64, 3))  # (N, H, W, C), normalised with the dataset's statistics
    >>> params = jax.eval_shape(model.init, jax.random.key(0), images)
    >>> f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters"  # Table 5: 124M
    '124,843,998 parameters'
    >>> jax.eval_shape(model.apply, params, images).shape
    (2, 11230)
"""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange
from flax.linen.dtypes import promote_dtype
from jaxtyping import Array, Float
from theorax.models.layers import gelu

LAYERNORM_EPS = 1e-5

_NAME = re.compile(r"^B[-_](\d+)[-/]Wi[-_](\d+)(?:[-/]Ex[-_](\d+))?$")


def parse_architecture(name: str) -> tuple[int, int, int]:
    """Parses `B-L/Wi-m[/Ex-k]` (paper) or `B_L-Wi_m[-Ex_k]` (official code) into (depth, width, expansion)."""
    match = _NAME.match(name.strip())
    if match is None:
        raise ValueError(
            f"unknown architecture name {name!r}: expected 'B-<depth>/Wi-<width>' as in the paper "
            "(e.g. 'B-12/Wi-1024'), or the official code's 'B_<depth>-Wi_<width>[-Ex_<k>]'"
        )
    depth, width, expansion = (int(g) if g else None for g in match.groups())
    if depth < 1 or width < 1 or (expansion is not None and expansion < 1):
        raise ValueError(f"architecture {name!r}: depth, width and expansion must be positive")
    return depth, width, expansion or 4


def torch_default_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear weights (kaiming-uniform a=sqrt 5)
    and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TorchLinear(nn.Module):
    """`y = x W + b` with PyTorch's default initialisation of W (in, out) and b."""

    features: int
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        init = torch_default_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        return x @ kernel + bias


def flatten_chw(images: Float[Array, "n h w c"]) -> Float[Array, "n chw"]:
    """Flattens NHWC images in channel, row, column order (the official NCHW `reshape(B, -1)`)."""
    return rearrange(images, "n h w c -> n (c h w)")


def _image_shape(inputs: int, channels: int) -> str:
    """The square image of `inputs` = H * W * C values, with the given channels or else RGB or grey."""
    for c in (channels, 3, 1):
        side = math.isqrt(inputs // c) if c > 0 else 0
        if side * side * c == inputs:
            return str((side, side, c))
    return f"(H, W, C) with H * W * C = {inputs}"


class ScaledMLP(nn.Module):
    """The paper's MLP classifier on images.

    Attributes:
      num_classes: size of the linear head.
      depth: number of blocks L.
      width: residual width m.
      expansion: inverted-bottleneck factor k (hidden width k m); the paper uses 4.
      bottleneck: True for the B-MLP (residual inverted bottleneck), False for the official S-MLP.
      input_shape: optional (H, W, C) the embedding expects; images of another shape raise a `ValueError`
        naming both shapes before anything is traced. Without it, `apply` makes the same check against the
        embedding's parameters, which fix H * W * C (the message names the square image that fits).
      dtype: computation dtype (e.g. `jnp.bfloat16`); parameters stay float32.
    """

    num_classes: int
    depth: int
    width: int
    expansion: int = 4
    bottleneck: bool = True
    input_shape: tuple[int, int, int] | None = None
    dtype: jnp.dtype | None = None

    @classmethod
    def from_name(cls, name: str, num_classes: int, **kwargs) -> ScaledMLP:
        """`ScaledMLP.from_name("B-12/Wi-1024", 10)`; also the official `"B_12-Wi_1024"` spelling."""
        depth, width, expansion = parse_architecture(name)
        return cls(num_classes, depth, width, expansion, **kwargs)

    def _check_input(self, images) -> None:
        """Rank and image-shape checks in plain Python, so a wrong image fails before any tracing."""
        if images.ndim != 4:
            raise ValueError(
                f"ScaledMLP expects images of rank 4 (N, H, W, C), got shape {tuple(images.shape)}; "
                "add a batch axis with images[None] for a single image"
            )
        given = tuple(images.shape[1:])
        if self.input_shape is not None and given != tuple(self.input_shape):
            raise ValueError(
                f"ScaledMLP was built for images of shape {tuple(self.input_shape)} (H, W, C), got "
                f"{given}; resize or crop the images to that resolution"
            )
        kernel = self.variables.get("params", {}).get("linear_in", {}).get("kernel")
        if kernel is not None and kernel.shape[0] != math.prod(given):
            inputs = kernel.shape[0]
            raise ValueError(
                f"ScaledMLP's parameters expect images of shape {_image_shape(inputs, given[-1])} "
                f"(linear_in takes H * W * C = {inputs} inputs), got images of shape {given} "
                f"({math.prod(given)} values); resize or crop the images to that resolution, or "
                "initialise the parameters at this one"
            )

    @nn.compact
    def __call__(self, images: Float[Array, "n h w c"], *, features: bool = False):
        """Returns logits (N, num_classes), or the residual stream (N, width) when `features=True`."""
        self._check_input(images)
        ln = lambda name: nn.LayerNorm(epsilon=LAYERNORM_EPS, dtype=self.dtype, name=name)
        x = TorchLinear(self.width, self.dtype, name="linear_in")(flatten_chw(images))
        if self.bottleneck:
            for i in range(self.depth):
                h = ln(f"layernorms_{i}")(x)
                h = TorchLinear(self.expansion * self.width, self.dtype, name=f"block_{i}_expand")(
                    h
                )
                h = gelu(h)
                x = x + TorchLinear(self.width, self.dtype, name=f"block_{i}_collapse")(h)
        else:
            for i in range(self.depth - 1):
                h = gelu(ln(f"layernorms_{i}")(x))
                x = TorchLinear(self.width, self.dtype, name=f"block_{i}_linear")(h)
        if features:
            return x
        return TorchLinear(self.num_classes, self.dtype, name="linear_out")(x)


def num_params(
    depth: int, width: int, num_classes: int, input_dim: int, expansion: int = 4, bottleneck=True
) -> int:
    """Exact parameter count, P = (d_in + 1) m + L (2 k m^2 + (k + 3) m) + (m + 1) C for the B-MLP."""
    m, k = width, expansion
    embed, head = (input_dim + 1) * m, (m + 1) * num_classes
    if bottleneck:
        return embed + depth * (2 * k * m * m + (k + 3) * m) + head
    return embed + (depth - 1) * (m * m + 3 * m) + head


def forward_flops(
    depth: int, width: int, num_classes: int, input_dim: int, expansion: int = 4, bottleneck=True
) -> int:
    """Multiply-accumulates of one forward pass on one image: the matmul weights, as fvcore counts them.

    The paper's compute C = FLOP(f) x 3 x examples seen uses this count (Sec. 4.4, App. A.4).
    """
    m, k = width, expansion
    blocks = depth * 2 * k * m * m if bottleneck else (depth - 1) * m * m
    return input_dim * m + blocks + m * num_classes
