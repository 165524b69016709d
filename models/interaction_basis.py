"""The two networks the interaction-basis papers analyse, as pure functions, and their sections.

* `MLP`: Linear -> ReLU hidden layers and a linear read-out (the official MNIST MLP is 784-100-100-10; on
  scikit-learn digits it is 64-100-100-10).
* `Transformer`: the one-layer modular-addition transformer of Nanda et al. that rib analyses (d_model 128,
  4 heads x 32, d_mlp 512, ReLU, no LayerNorm, learned positions, vocabulary p + 1 with '=' = p, three positions
  a, b, '='), with TransformerLens's parameter names and initialisation.

Each model also gives its *sections*: the functions between consecutive node layers, with the biases folded in
(reference notes Sec. 2.0). At every node layer but the output, one example's activations end in a constant
coordinate (1 on the data), and every bias is multiplied by it, so scaling a layer's input by alpha scales its
biases too; the output layer (the logits) has no constant. A section maps ONE example's activations, shape
`(d,)` or `(positions, d)`, to the next node layer's. Sections are `jax.tree_util.Partial`s over the parameters,
so compiled code that takes them as arguments is reused across parameter values.

Node layers (rib's names): MLP `layers.0` (the input), `layers.1`, `layers.2`, ..., `output`; transformer `ln1.0`
(the residual stream after the embeddings, 3 positions), `ln2.0` (after the attention block, last position only:
rib's `last_pos_module_type: add_resid1`), `unembed` (after the MLP block) and `output` (the logits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

# ------------------------------------------------------------------------------------------- sections


def linear_then(weight, then: Callable) -> Partial:
    """The section `x -> then(x @ weight)`: a linear map of the node layer's last axis, then the rest.

    Declaring the linear start lets the Jacobian Gram take the cheaper route: with z = f W,
    J_f = J_then(z) W^T, so M' = W (sum_b J_then^T J_then) W^T is accumulated at the width of z, and the
    per-example Jacobians with respect to f are never formed (for the MNIST MLP's first layer, 101 instead of
    785 columns). The folded MLP layers below are given this way.

    >>> f = linear_then(jnp.eye(2) * 3.0, jnp.tanh)
    >>> [round(v, 3) for v in f(jnp.array([0.0, 1.0])).tolist()]
    [0.0, 0.995]
    """
    then = then if isinstance(then, Partial) else Partial(then)
    return Partial(_linear_then, weight, then)


def _linear_then(weight, then, x):
    return then(x @ weight)


def split_linear(section) -> tuple[jax.Array, Partial] | None:
    """(weight, then) of a `linear_then` section, else None."""
    if isinstance(section, Partial) and section.func is _linear_then:
        return section.args[0], section.args[1]
    return None


# ------------------------------------------------------------------------------------------------ MLP


def init_mlp(key: jax.Array, sizes: tuple[int, ...], dtype=jnp.float32) -> dict:
    """Parameters of an MLP with layer widths `sizes` (input first), PyTorch `nn.Linear`'s default initialisation.

    W and b of layer k are uniform in +-1/sqrt(fan_in), as rib's torch MLP had them.

    >>> params = init_mlp(jax.random.key(0), (64, 100, 100, 10))
    >>> [p["W"].shape for p in params["layers"]]
    [(64, 100), (100, 100), (100, 10)]
    """
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(
            f"sizes={sizes} must list at least two positive widths (input, ..., output)"
        )
    layers = []
    keys = jax.random.split(key, len(sizes) - 1)
    for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:], strict=True):
        kw, kb = jax.random.split(k)
        bound = 1.0 / math.sqrt(n_in)
        layers.append(
            {
                "W": jax.random.uniform(kw, (n_in, n_out), dtype, -bound, bound),
                "b": jax.random.uniform(kb, (n_out,), dtype, -bound, bound),
            }
        )
    return {"layers": layers}


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    """Logits of the MLP: ReLU after every layer but the last. `x`: (..., d_in)."""
    layers = params["layers"]
    for layer in layers[:-1]:
        x = jax.nn.relu(x @ layer["W"] + layer["b"])
    return x @ layers[-1]["W"] + layers[-1]["b"]


def mlp_node_layers(params: dict) -> list[str]:
    """rib's node-layer names: `layers.0` (the input) .. `layers.{L-1}`, then `output`."""
    return [f"layers.{k}" for k in range(len(params["layers"]))] + ["output"]


def _mlp_hidden_section(layer, x):
    """Folded Linear -> ReLU: weight [[W, 0], [b, 1]] on (x, c), the activation on every column (ReLU(c) = c)."""
    return jax.nn.relu(x @ folded_weight(layer, constant=True))


def _mlp_output_section(layer, x):
    return x @ folded_weight(layer, constant=False)


def folded_weight(layer: dict, constant: bool) -> jax.Array:
    """[[W, 0], [b, 1]] (hidden layers, the constant carried on) or [[W], [b]] (the read-out)."""
    w = jnp.concatenate([layer["W"], layer["b"][None]], axis=0)
    if not constant:
        return w
    carry = jnp.zeros((w.shape[0], 1), w.dtype).at[-1, 0].set(1.0)
    return jnp.concatenate([w, carry], axis=1)


def _identity(z):
    return z


def mlp_sections(params: dict) -> list[Partial]:
    """The MLP's sections between its node layers, biases folded (each hidden layer ends in the constant).

    Each is declared as a linear map then the rest (`x @ [[W, 0], [b, 1]]` then ReLU), so the interaction
    basis accumulates its Jacobian Gram at the layer's output width.

    >>> params = init_mlp(jax.random.key(0), (4, 3, 2))
    >>> x = jnp.ones(4)
    >>> f0, f1 = mlp_sections(params)
    >>> bool(jnp.allclose(f1(f0(fold_input(x))), mlp_apply(params, x), atol=1e-6))
    True
    """
    layers = params["layers"]
    sections = [linear_then(folded_weight(layer, True), jax.nn.relu) for layer in layers[:-1]]
    return sections + [linear_then(folded_weight(layers[-1], False), Partial(_identity))]


def fold_input(x: jax.Array) -> jax.Array:
    """Appends the constant coordinate 1 to the last axis: node layer 0's folded activations."""
    return jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)


# ---------------------------------------------------------------------------------------- transformer


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The one-layer attention + MLP transformer (no LayerNorm, learned positions, causal attention).

    Defaults are the paper's modular-addition model: vocabulary p + 1 = 114, 3 positions, d_model 128, 4 heads
    of 32, d_mlp 512, ReLU.
    """

    d_vocab: int = 114
    n_ctx: int = 3
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512

    def __post_init__(self):
        for name in ("d_vocab", "n_ctx", "d_model", "n_heads", "d_head", "d_mlp"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TransformerConfig.{name}={getattr(self, name)} must be >= 1")

    @property
    def init_range(self) -> float:
        """TransformerLens's default initialiser range, 0.8 / sqrt(d_model)."""
        return 0.8 / math.sqrt(self.d_model)


def init_transformer(key: jax.Array, config: TransformerConfig, dtype=jnp.float32) -> dict:
    """TransformerLens-named parameters: every `W_*` normal(0, 0.8/sqrt(d_model)) (its "gpt2" init), biases 0.

    >>> params = init_transformer(jax.random.key(0), TransformerConfig())
    >>> params["W_Q"].shape, params["W_U"].shape
    ((4, 128, 32), (128, 114))
    """
    c = config
    shapes = {
        "W_E": (c.d_vocab, c.d_model),
        "W_pos": (c.n_ctx, c.d_model),
        "W_Q": (c.n_heads, c.d_model, c.d_head),
        "W_K": (c.n_heads, c.d_model, c.d_head),
        "W_V": (c.n_heads, c.d_model, c.d_head),
        "W_O": (c.n_heads, c.d_head, c.d_model),
        "W_in": (c.d_model, c.d_mlp),
        "W_out": (c.d_mlp, c.d_model),
        "W_U": (c.d_model, c.d_vocab),
    }
    keys = jax.random.split(key, len(shapes))
    params = {
        name: c.init_range * jax.random.normal(k, shape, dtype)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }
    biases = {
        "b_Q": (c.n_heads, c.d_head),
        "b_K": (c.n_heads, c.d_head),
        "b_V": (c.n_heads, c.d_head),
        "b_O": (c.d_model,),
        "b_in": (c.d_mlp,),
        "b_out": (c.d_model,),
        "b_U": (c.d_vocab,),
    }
    params.update({name: jnp.zeros(shape, dtype) for name, shape in biases.items()})
    return params


def embed(params: dict, tokens: jax.Array) -> jax.Array:
    """The residual stream after the token and position embeddings: (..., n_ctx, d_model)."""
    return params["W_E"][tokens] + params["W_pos"][: tokens.shape[-1]]


def _attend_last(params: dict, resid: jax.Array, c: jax.Array) -> jax.Array:
    """The attention block's output at the last position (causal attention: it sees every position).

    `resid`: (n_ctx, d_model); `c`: the constant coordinate of each position, (n_ctx, 1), multiplying every
    bias (b_Q, b_K, b_V per head, b_O).
    """
    q = jnp.einsum("d,hde->he", resid[-1], params["W_Q"]) + c[-1] * params["b_Q"]
    k = jnp.einsum("pd,hde->phe", resid, params["W_K"]) + c[:, :, None] * params["b_K"]
    v = jnp.einsum("pd,hde->phe", resid, params["W_V"]) + c[:, :, None] * params["b_V"]
    scores = jnp.einsum("he,phe->hp", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    pattern = jax.nn.softmax(scores, axis=-1)
    z = jnp.einsum("hp,phe->he", pattern, v)
    return jnp.einsum("he,hed->d", z, params["W_O"]) + c[-1, 0] * params["b_O"]


def _mlp_block(params: dict, resid: jax.Array, c: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(resid @ params["W_in"] + c * params["b_in"])
    return hidden @ params["W_out"] + c * params["b_out"]


def transformer_logits(params: dict, tokens: jax.Array) -> jax.Array:
    """Logits at the last position: (..., d_vocab) for tokens (..., n_ctx); what the task is trained on.

    The same function as TransformerLens's `HookedTransformer(tokens)[..., -1, :]` with no LayerNorm (and as
    the composed `transformer_sections`), computed through per-token tables: keys, queries and value-output
    vectors depend on one token and its position only, so they are computed once per vocabulary entry and
    gathered; only the last position's MLP and unembedding run per example (half the FLOPs of a step).

    >>> config = TransformerConfig(d_vocab=6, d_model=8, n_heads=2, d_head=4, d_mlp=16)
    >>> params = init_transformer(jax.random.key(0), config)
    >>> transformer_logits(params, jnp.array([[1, 2, 5]])).shape
    (1, 6)
    """
    n_ctx = tokens.shape[-1]
    flat = tokens.reshape(-1, n_ctx)
    emb = params["W_E"][None] + params["W_pos"][:n_ctx, None]  # (n_ctx, vocab, d)
    keys = jnp.einsum("pvd,hde->pvhe", emb, params["W_K"]) + params["b_K"]
    vo = jnp.einsum("pvd,hde->pvhe", emb, params["W_V"]) + params["b_V"]
    vo = jnp.einsum("pvhe,hed->pvhd", vo, params["W_O"])  # each head's value through W_O
    queries = jnp.einsum("vd,hde->vhe", emb[-1], params["W_Q"]) + params["b_Q"]
    pos = jnp.arange(n_ctx)
    k = keys[pos, flat]  # (B, n_ctx, h, e)
    q = queries[flat[:, -1]]  # (B, h, e)
    scores = jnp.einsum("bhe,bphe->bhp", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    pattern = jax.nn.softmax(scores, axis=-1)
    attn = jnp.einsum("bhp,bphd->bd", pattern, vo[pos, flat]) + params["b_O"]
    last = emb[-1][flat[:, -1]] + attn
    hidden = jax.nn.relu(last @ params["W_in"] + params["b_in"])
    last = last + hidden @ params["W_out"] + params["b_out"]
    logits = last @ params["W_U"] + params["b_U"]
    return logits.reshape(*tokens.shape[:-1], -1)


def transformer_node_layers() -> list[str]:
    return ["ln1.0", "ln2.0", "unembed", "output"]


def transformer_inputs(params: dict, tokens: jax.Array) -> jax.Array:
    """Node layer `ln1.0` folded: the embedded residual stream with the constant appended, (..., n_ctx, d+1)."""
    return fold_input(embed(params, tokens))


def _attention_section(params, x):
    """ln1.0 (n_ctx, d+1) -> ln2.0 (1, d+1): resid + attention, the last position only (rib's add_resid1)."""
    resid, c = x[:, :-1], x[:, -1:]
    out = resid[-1] + _attend_last(params, resid, c)
    return jnp.concatenate([out, c[-1]])[None]


def _mlp_block_section(params, x):
    """ln2.0 (1, d+1) -> unembed (1, d+1): resid + MLP; the constant coordinate passes through."""
    resid, c = x[0, :-1], x[0, -1:]
    return jnp.concatenate([resid + _mlp_block(params, resid, c), c])[None]


def _unembed_section(params, x):
    """unembed (1, d+1) -> output (1, d_vocab): the logits."""
    return x[:, :-1] @ params["W_U"] + x[:, -1:] * params["b_U"]


def transformer_sections(params: dict) -> list[Partial]:
    """The three sections between `ln1.0`, `ln2.0`, `unembed` and `output`, biases folded.

    >>> config = TransformerConfig(d_vocab=6, d_model=8, n_heads=2, d_head=4, d_mlp=16)
    >>> params = init_transformer(jax.random.key(0), config)
    >>> tokens = jnp.array([1, 2, 5])
    >>> x = transformer_inputs(params, tokens)
    >>> for section in transformer_sections(params):
    ...     x = section(x)
    >>> bool(jnp.allclose(x[0], transformer_logits(params, tokens), atol=1e-6))
    True
    """
    attn = {k: params[k] for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
    mlp = {k: params[k] for k in ("W_in", "b_in", "W_out", "b_out")}
    unembed = {k: params[k] for k in ("W_U", "b_U")}
    return [
        Partial(_attention_section, attn),
        Partial(_mlp_block_section, mlp),
        Partial(_unembed_section, unembed),
    ]


# ------------------------------------------------------------------------------------------- the task


@dataclasses.dataclass(frozen=True)
class ModularAddition:
    """Every pair (a, b) of Z_p as tokens (a, b, '=') with '=' = p, labels (a + b) mod p, and a train split."""

    p: int
    tokens: np.ndarray  # (p^2, 3) int32
    labels: np.ndarray  # (p^2,) int32
    train: np.ndarray  # (p^2,) bool

    @property
    def vocab_size(self) -> int:
        return self.p + 1


def modular_addition(p: int = 113, frac_train: float = 0.3, seed: int = 0) -> ModularAddition:
    """The modular-addition task of Nanda et al. / rib: all p^2 pairs, a random `frac_train` of them to train on.

    >>> task = modular_addition(7, 0.3, seed=0)
    >>> task.tokens.shape, int(task.train.sum()), task.tokens[9].tolist(), int(task.labels[9])
    ((49, 3), 15, [1, 2, 7], 3)
    """
    if int(p) < 2:
        raise ValueError(f"p={p} must be >= 2")
    if not 0.0 < frac_train < 1.0:
        raise ValueError(f"frac_train={frac_train} must be in (0, 1)")
    a, b = np.divmod(np.arange(p * p), p)
    tokens = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    labels = ((a + b) % p).astype(np.int32)
    order = np.random.default_rng(seed).permutation(p * p)
    train = np.zeros(p * p, bool)
    train[order[: int(round(frac_train * p * p))]] = True
    return ModularAddition(int(p), tokens, labels, train)
