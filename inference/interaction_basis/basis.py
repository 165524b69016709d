"""The local interaction basis (LIB), and the PCA and neuron bases it is compared with.

For node layer l with (bias-folded) activations f (rows, the constant 1 last), reference notes Sec. 2:

1. mean mu = E[f] (over examples and positions) and the centred Gram G = E[(f - c)^T (f - c)], c = (mu_1..d, 0),
   so G[-1, -1] = 1 and G[-1, :-1] = 0;
2. G = U' D' U'^T in float64, |eigenvalues| descending, the constant direction first, truncated to D > threshold;
   the centring matrix Y (f Y = f - c), W = Y U, R = W D^-1/2 (whitening), R+ = D^1/2 U^T Y^-1;
3. the Jacobian Gram M' = 1/(N P_in) sum_b sum_s J_s^T J_s of g(f) = section_l(f) C^{l+1} (C^{l+1} = identity at
   the output), J evaluated at alpha f and summed with quadrature weights (alpha = 1 for `gradient`), input
   positions s outside the square; in whitened coordinates M = R+ M' R+^T;
4. M = V Lambda V^T with the constant row and column kept apart (Lambda_0 = M_00), Lambda descending and
   truncated;
5. C = R V Lambda^1/2 = Y U D^-1/2 V Lambda^1/2 and C+ = Lambda^-1/2 V^T D^1/2 U^T Y^-1, built from the output
   backwards. LIB activations are f C; E[(fC)^T (fC)] = diag(Lambda) and the Jacobian Gram in these coordinates
   is the identity (except the constant's row and column).

`pca` is C = Y U (rib's `svd` with `center: true`), `neuron` is C = I.

Thresholds are relative: a direction is kept when its eigenvalue exceeds `threshold` x the largest eigenvalue
of the same matrix (G, then M) other than the constant direction's (which is always kept). rib's paper configs use an absolute 1e-15 in float64; an absolute threshold
t corresponds to a relative t / max, and `absolute_threshold=` gives rib's rule exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.interaction_basis import sections as sec

BASES = ("lib", "pca", "neuron")
INTEGRATION = ("gradient", "trapezoidal", "gauss-legendre")


@dataclasses.dataclass(frozen=True)
class LayerBasis:
    """One node layer's basis: coordinates are `f @ C` for the layer's activations f (rows).

    Attributes:
      name: the node layer.
      C: (d, k) activations -> basis coordinates; None at the (unrotated) output layer.
      C_pinv: (k, d) its pseudo-inverse (C_pinv @ C = I); None at the output layer.
      eigenvalues: (k,) Lambda for `lib` (constant first, then descending), the Gram's eigenvalues D for `pca`,
        None for `neuron` and the output layer.
      gram_eigenvalues: the centred Gram's eigenvalues kept (constant first, then descending), or None.
      mean: (d,) the activations' mean, or None.
      constant_index: the coordinate that is the constant direction (0 for centred lib/pca, the last neuron for
        `neuron`), or None.
      dim: d, the layer's width (with the constant).
    """

    name: str
    C: np.ndarray | None
    C_pinv: np.ndarray | None
    eigenvalues: np.ndarray | None
    gram_eigenvalues: np.ndarray | None
    mean: np.ndarray | None
    constant_index: int | None
    dim: int

    @property
    def size(self) -> int:
        """The number of basis directions (the layer's width when C is None)."""
        return self.dim if self.C is None else int(self.C.shape[1])


@dataclasses.dataclass(frozen=True)
class Options:
    """How the bases are computed (see `interaction_basis`)."""

    basis: str = "lib"
    threshold: float = 1e-12
    absolute_threshold: float | None = None
    center: bool = True
    integration: str = "gradient"
    n_intervals: int = 0
    batch_size: int = 256
    dtype: str = "float64"


def integration_points(
    method: str = "gradient", n_intervals: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of rib's quadrature rules on [0, 1].

    `gradient`: alpha = 1 alone; `trapezoidal`: n + 1 evenly spaced points in [eps, 1 - eps], eps = 1e-3/(n+1),
    end points half-weighted (n = 0: alpha = 0.5); `gauss-legendre`: n + 1 Gauss-Legendre nodes on [0, 1].

    >>> integration_points("trapezoidal", 2)[1].tolist()
    [0.25, 0.5, 0.25]
    """
    if method not in INTEGRATION:
        raise ValueError(f"integration={method!r} is not one of {list(INTEGRATION)}")
    if int(n_intervals) != n_intervals or n_intervals < 0:
        raise ValueError(f"n_intervals={n_intervals} must be an integer >= 0")
    if method == "gradient":
        if n_intervals != 0:
            raise ValueError(f"integration='gradient' takes n_intervals=0, got {n_intervals}")
        return np.ones(1), np.ones(1)
    if method == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(n_intervals + 1)
        return (x + 1) / 2, w / 2
    if n_intervals == 0:
        return np.array([0.5]), np.ones(1)
    eps = 1e-3 / (n_intervals + 1)
    alphas = np.linspace(eps, 1 - eps, n_intervals + 1)
    weights = np.full(n_intervals + 1, 1.0 / n_intervals)
    weights[[0, -1]] /= 2
    return alphas, weights


def _check_options(o: Options) -> None:
    if o.basis not in BASES:
        raise ValueError(f"basis={o.basis!r} is not one of {list(BASES)}")
    if not 0.0 < float(o.threshold) < 1.0:
        raise ValueError(
            f"threshold={o.threshold} must be in (0, 1): it is relative to each matrix's largest eigenvalue "
            "(for rib's absolute rule pass absolute_threshold=)"
        )
    if o.absolute_threshold is not None and not o.absolute_threshold > 0:
        raise ValueError(f"absolute_threshold={o.absolute_threshold} must be > 0 (or None)")
    if int(o.batch_size) < 1:
        raise ValueError(f"batch_size={o.batch_size} must be >= 1")
    if o.dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={o.dtype!r} must be 'float32' or 'float64'")
    integration_points(o.integration, o.n_intervals)


@dataclasses.dataclass(frozen=True)
class Network:
    """Validated sections, their node layers' shapes and names, and the data (host numpy)."""

    sections: list
    shapes: list[tuple[int, ...]]
    names: list[str]
    inputs: np.ndarray
    dtype: np.dtype

    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    def dim(self, layer: int) -> int:
        return sec.as_2d(self.shapes[layer])[1]

    def positions(self, layer: int) -> int:
        return sec.as_2d(self.shapes[layer])[0]


def prepare(sections, inputs, names=None, dtype="float64") -> Network:
    """Checks sections and data in plain Python and by abstract evaluation, before anything compiles."""
    partials = sec.as_partials(sections)
    names = sec.layer_names(len(partials), names)
    x = sec.check_inputs(inputs)
    np_dtype = np.dtype(dtype)
    with jax.enable_x64(np_dtype == np.float64):
        shapes = sec.layer_shapes(partials, x.shape[1:], np_dtype, names)
    return Network(partials, shapes, names, x, np_dtype)


# ----------------------------------------------------------------------------------- compiled passes


def _acts(net_static, sections, x):
    """Activations of a batch at every node layer but the output, each (B, P, d)."""
    shapes, upto = net_static
    return jax.vmap(lambda e: sec.forward_2d(sections, shapes, e, upto))(x)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _moments_step(net_static, sections, x, w, acc):
    """Sums of f, finiteness and the range of the last coordinate, per node layer."""
    out = []
    for f, (s, finite, lo, hi) in zip(_acts(net_static, sections, x), acc, strict=True):
        wf = w[:, None, None]
        out.append(
            (
                s + jnp.sum(wf * f, axis=(0, 1)),
                finite & jnp.all(jnp.isfinite(f)),
                jnp.minimum(lo, jnp.min(jnp.where(wf[..., 0] > 0, f[..., -1], jnp.inf))),
                jnp.maximum(hi, jnp.max(jnp.where(wf[..., 0] > 0, f[..., -1], -jnp.inf))),
            )
        )
    return out


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def _gram_step(net_static, sections, x, w, shifts, acc):
    out = []
    for f, c, g in zip(_acts(net_static, sections, x), shifts, acc, strict=True):
        fc = (f - c) * jnp.sqrt(w)[:, None, None]
        out.append(g + jnp.einsum("bpi,bpj->ij", fc, fc))
    return out


def _jacobian_fn(fn, in_shape, out_size):
    """Per-example Jacobian of fn: (P, d) -> (out,), shape (out, P, d): reverse mode (vmapped VJPs along the
    next layer's basis directions) when there are fewer outputs than inputs, else forward mode."""
    return jax.jacrev(fn) if out_size <= in_shape[0] * in_shape[1] else jax.jacfwd(fn)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=8)
def _jacobian_gram_step(net_static, layer, sections, c_next, proj, alphas, x, w, acc):
    """Adds sum_b w_b sum_s (J_s P)^T (J_s P) for J = d/df [section(f) C_next] at alpha f, quadrature-weighted."""
    shapes, _ = net_static
    in_shape = sec.as_2d(shapes[layer])
    section = sec.section_2d(sections, shapes, layer)

    def h(f):
        out = section(f)
        return (out if c_next is None else out @ c_next).reshape(-1)

    out_size = (
        int(np.prod(sec.as_2d(shapes[layer + 1])))
        if c_next is None
        else (sec.as_2d(shapes[layer + 1])[0] * c_next.shape[1])
    )
    jac = _jacobian_fn(h, in_shape, out_size)
    weights = alphas[1]

    def one(f):
        js = jax.vmap(lambda a: jac(a * f))(alphas[0])  # (n_alpha, out, P, d)
        return jnp.einsum("a,aopd->opd", weights, js)

    f = _acts((shapes, layer), sections, x)[layer]
    j = jax.vmap(one)(f) * w[:, None, None, None]
    if proj is not None:
        j = j @ proj
    return acc + jnp.einsum("bosj,bosk->jk", j, j)


# ------------------------------------------------------------------------------------- accumulation


def layer_moments(
    net: Network, batch_size: int, center: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Means and centred Grams (float64) of every node layer but the output, two passes over the data.

    Raises `SectionError` naming a layer whose activations are not finite, or (with `center`) whose last
    coordinate is not a constant.
    """
    upto = net.num_layers - 2
    static = (tuple(net.shapes), upto)
    zeros = [
        (
            jnp.zeros(net.dim(k), net.dtype),
            jnp.asarray(True),
            jnp.asarray(jnp.inf, net.dtype),
            jnp.asarray(-jnp.inf, net.dtype),
        )
        for k in range(upto + 1)
    ]
    acc = zeros
    for xb, wb in sec.batches(net.inputs, batch_size, net.dtype):
        acc = _moments_step(static, net.sections, xb, wb, acc)
    n = net.inputs.shape[0]
    means = []
    for k, (s, finite, lo, hi) in enumerate(acc):
        if not bool(finite):
            raise sec.SectionError(
                f"node layer {k} ({net.names[k]!r}): its activations are not finite on the data (section {k - 1} "
                "produced NaN or inf); check the model's parameters and inputs"
            )
        lo, hi = float(lo), float(hi)
        if center and not (abs(hi - lo) <= 1e-6 * max(1.0, abs(hi)) and abs(hi) > 0):
            raise sec.SectionError(
                f"node layer {k} ({net.names[k]!r}): its last coordinate is not a non-zero constant (it ranges over "
                f"[{lo:.4g}, {hi:.4g}]): centring needs folded biases, i.e. every node layer but the output "
                "ending in the constant 1. Fold them (models.interaction_basis.fold_input and the models' "
                "sections), add the explicit constant direction (sections.with_constant), or pass center=False"
            )
        means.append(np.asarray(s, np.float64) / (n * net.positions(k)))
    shifts = []
    for mu in means:
        c = mu.copy()
        if center:
            c[-1] = 0.0
        else:
            c[:] = 0.0
        shifts.append(jnp.asarray(c, net.dtype))
    acc = [jnp.zeros((net.dim(k), net.dim(k)), net.dtype) for k in range(upto + 1)]
    for xb, wb in sec.batches(net.inputs, batch_size, net.dtype):
        acc = _gram_step(static, net.sections, xb, wb, shifts, acc)
    grams = [np.asarray(g, np.float64) / (n * net.positions(k)) for k, g in enumerate(acc)]
    return means, grams


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=9)
def _linear_gram_step(net_static, layer, sections, weight, then, c_next, alphas, x, w, acc):
    """The `linear_then` route: adds sum_b w_b sum_s K_s^T K_s for K = d/dz [then(z) C_next], z = f W."""
    shapes, _ = net_static
    z_shape = (*shapes[layer][:-1], weight.shape[1])
    out_shape = sec.as_2d(shapes[layer + 1])

    def h(z):
        out = then(z.reshape(z_shape)).reshape(out_shape)
        return (out if c_next is None else out @ c_next).reshape(-1)

    in_2d = sec.as_2d(z_shape)
    out_size = out_shape[0] * (out_shape[1] if c_next is None else c_next.shape[1])
    jac = _jacobian_fn(h, in_2d, out_size)

    def one(f):
        z = (f @ weight).reshape(in_2d)
        js = jax.vmap(lambda a: jac(a * z))(alphas[0])
        return jnp.einsum("a,aopd->opd", alphas[1], js)

    f = _acts((shapes, layer), sections, x)[layer]
    j = jax.vmap(one)(f) * w[:, None, None, None]
    return acc + jnp.einsum("bosj,bosk->jk", j, j)


def jacobian_gram(net: Network, layer: int, c_next, proj, options: Options) -> np.ndarray:
    """M' of node layer `layer` (projected by `proj`, (d, r), when given), float64.

    For a `sections.linear_then` section the Gram is accumulated at the width of its linear map's output and
    mapped back, M' = W K W^T (the cheaper route); otherwise from the section's Jacobians directly.
    """
    alphas, weights = integration_points(options.integration, options.n_intervals)
    alphas = (jnp.asarray(alphas, net.dtype), jnp.asarray(weights, net.dtype))
    c_next = None if c_next is None else jnp.asarray(c_next, net.dtype)
    linear = sec.split_linear(net.sections[layer])
    if linear is not None:
        weight, then = linear
        weight = jnp.asarray(weight, net.dtype)
        acc = jnp.zeros((weight.shape[1], weight.shape[1]), net.dtype)
        static = (tuple(net.shapes), layer)
        for xb, wb in sec.batches(net.inputs, options.batch_size, net.dtype):
            acc = _linear_gram_step(
                static, layer, net.sections, weight, then, c_next, alphas, xb, wb, acc
            )
        w64 = np.asarray(weight, np.float64)
        m_dash = w64 @ np.asarray(acc, np.float64) @ w64.T
        m_dash /= net.inputs.shape[0] * net.positions(layer)
        return m_dash if proj is None else proj.T @ m_dash @ proj
    proj_j = None if proj is None else jnp.asarray(proj, net.dtype)
    r = net.dim(layer) if proj is None else proj.shape[1]
    acc = jnp.zeros((r, r), net.dtype)
    static = (tuple(net.shapes), layer)
    for xb, wb in sec.batches(net.inputs, options.batch_size, net.dtype):
        acc = _jacobian_gram_step(static, layer, net.sections, c_next, proj_j, alphas, xb, wb, acc)
    return np.asarray(acc, np.float64) / (net.inputs.shape[0] * net.positions(layer))


# --------------------------------------------------------------------------------------- linear algebra


def eigh_descending(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (absolute, descending) and eigenvectors (columns) of a symmetric matrix, in float64."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    vals = np.abs(vals)
    order = np.argsort(-vals, kind="stable")
    return vals[order], vecs[:, order]


def _cut(values: np.ndarray, o: Options, keep_first: int) -> np.ndarray:
    """Mask of eigenvalues kept: > threshold x the largest one after the first `keep_first` (the constant
    direction, whose scale is its own), or > absolute_threshold; the first `keep_first` are always kept."""
    rest = values[keep_first:]
    limit = (
        o.absolute_threshold
        if o.absolute_threshold is not None
        else o.threshold * float(np.max(rest, initial=0.0))
    )
    keep = values > limit
    keep[:keep_first] = True
    return keep


def centering_matrix(mean: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Y with f Y = f - (mu_1..d, 0) for rows f ending in the constant 1 (Y^-1 adds the mean back)."""
    y = np.eye(len(mean))
    y[-1, :-1] = mean[:-1] if inverse else -mean[:-1]
    return y


@dataclasses.dataclass(frozen=True)
class _Pca:
    U: np.ndarray
    D: np.ndarray
    Y: np.ndarray
    Y_inv: np.ndarray


def pca_step(gram: np.ndarray, mean: np.ndarray, o: Options) -> _Pca:
    """Steps 1-2: the truncated eigenbasis of the centred Gram, the constant direction first."""
    d = gram.shape[0]
    if o.center:
        vals, vecs = eigh_descending(gram[:-1, :-1])
        vals = np.concatenate([[gram[-1, -1]], vals])
        vecs = np.block([[np.zeros((d - 1, 1)), vecs], [np.ones((1, 1)), np.zeros((1, d - 1))]])
        keep = _cut(vals, o, keep_first=1)
        y, y_inv = centering_matrix(mean), centering_matrix(mean, inverse=True)
    else:
        vals, vecs = eigh_descending(gram)
        keep = _cut(vals, o, keep_first=0)
        y = y_inv = np.eye(d)
    return _Pca(vecs[:, keep], vals[keep], y, y_inv)


def lib_step(m: np.ndarray, o: Options) -> tuple[np.ndarray, np.ndarray]:
    """Steps 4: (V, Lambda) of M with the constant direction kept apart, Lambda truncated and descending."""
    n_masked = 1 if o.center else 0
    vals, vecs = eigh_descending(m[n_masked:, n_masked:])
    lam = np.concatenate([np.diag(m)[:n_masked], vals])
    r = m.shape[0]
    v = np.zeros((r, r))
    v[:n_masked, :n_masked] = np.eye(n_masked)
    v[n_masked:, n_masked:] = vecs
    keep = _cut(lam, o, keep_first=n_masked)
    return v[:, keep], lam[keep]


# ------------------------------------------------------------------------------------------ the bases


def interaction_basis(
    sections: Sequence[Callable],
    inputs,
    *,
    basis: str = "lib",
    threshold: float = 1e-12,
    absolute_threshold: float | None = None,
    center: bool = True,
    integration: str = "gradient",
    n_intervals: int = 0,
    batch_size: int = 256,
    dtype: str = "float64",
    names: Sequence[str] | None = None,
) -> list[LayerBasis]:
    r"""The local interaction basis (or PCA / neuron basis) of every node layer of a network.

    Implements Sec. 2 of the reference notes (the LIB paper's construction as rib computes it):
    :math:`C^l = Y U D^{-1/2} V \Lambda^{1/2}`, with U, D the centred Gram's truncated eigenbasis, V,
    :math:`\Lambda` the eigenbasis of the Jacobian Gram :math:`M = D^{1/2} U^T Y^{-1} M' Y^{-T} U D^{1/2}` of
    :math:`f \mapsto \mathrm{section}_l(f) C^{l+1}`, built from the output backwards. Memory is bounded by
    `batch_size`: Grams and M' are accumulated over batches by compiled, donated steps; each M' is contracted
    from vmapped VJPs along the next layer's basis directions (forward mode when the section has more outputs
    than inputs), in the neuron basis or in the whitened PCA basis, whichever contraction is cheaper.

    Args:
      sections: L functions, section l mapping one example of node layer l, shape (d,) or (P, d), to node
        layer l + 1 (`jax.tree_util.Partial`s are compiled once for all parameter values). With `center`,
        every node layer but the output must end in the constant 1 (folded biases, or
        `sections.with_constant`).
      inputs: node layer 0 on the dataset, (N, d_0) or (N, P_0, d_0).
      basis: "lib" (the interaction basis), "pca" (centred PCA, rib's `svd` + `center`) or "neuron" (C = I).
      threshold: relative truncation in (0, 1): eigenvalues of G and of M at most `threshold` x their largest
        (the constant direction's apart) are dropped.
      absolute_threshold: rib's absolute rule instead (its paper configs: 1e-15 with float64).
      center: centre the activations (the constant direction becomes coordinate 0 and is kept apart).
      integration: "gradient" (alpha = 1, the paper configs), "trapezoidal" or "gauss-legendre".
      n_intervals: quadrature intervals (0 for "gradient").
      batch_size: examples per accumulation step.
      dtype: "float64" (the paper configs; computed inside a `jax.enable_x64` scope) or "float32" (activations
        and Jacobians in float32; eigendecompositions are always float64).
      names: the L + 1 node layers' names (defaults "layer 0", ..., "output").

    Returns:
      L + 1 `LayerBasis`, node layer 0 first; the output layer's has C = None (rib's unrotated output).

    Example:

    >>> import jax, jax.numpy as jnp
    >>> from theorax.models import interaction_basis as m
    >>> params = m.init_mlp(jax.random.key(0), (5, 8, 3))
    >>> x = m.fold_input(jax.random.normal(jax.random.key(1), (200, 5)))
    >>> bases = interaction_basis(m.mlp_sections(params), x)
    >>> [b.size for b in bases], bases[0].C.shape
    ([6, 4, 3], (6, 6))
    """
    o = Options(basis, float(threshold), absolute_threshold, bool(center), integration, int(n_intervals),
                int(batch_size), str(dtype))  # fmt: skip
    _check_options(o)
    net = prepare(sections, inputs, names, o.dtype)
    with jax.enable_x64(net.dtype == np.float64):
        return _bases(net, o)


def _bases(net: Network, o: Options) -> list[LayerBasis]:
    last = net.num_layers - 1
    output = LayerBasis(net.names[last], None, None, None, None, None, None, net.dim(last))
    if o.basis == "neuron":
        out = []
        for k in range(last):
            d = net.dim(k)
            const = d - 1 if o.center else None
            out.append(LayerBasis(net.names[k], np.eye(d), np.eye(d), None, None, None, const, d))
        return out + [output]
    means, grams = layer_moments(net, o.batch_size, o.center)
    result = [output]
    c_next = None
    for k in range(last - 1, -1, -1):
        pca = pca_step(grams[k], means[k], o)
        w, w_pinv = pca.Y @ pca.U, pca.U.T @ pca.Y_inv
        const = 0 if o.center else None
        if o.basis == "pca":
            layer = LayerBasis(net.names[k], w, w_pinv, pca.D, pca.D, means[k], const, net.dim(k))
        else:
            sqrt_d = np.sqrt(pca.D)
            r_mat, r_pinv = w / sqrt_d, sqrt_d[:, None] * w_pinv
            d, r = r_mat.shape
            linear = sec.split_linear(net.sections[k]) is not None
            if linear or d * d <= r * (d + r):  # contract J^T J in the neuron basis, then whiten
                m_dash = jacobian_gram(net, k, c_next, None, o)
                m = r_pinv @ m_dash @ r_pinv.T
            else:  # whiten each Jacobian first (r much smaller than d)
                m = jacobian_gram(net, k, c_next, r_pinv.T, o)
            v, lam = lib_step(m, o)
            sqrt_lam = np.sqrt(lam)
            c = (r_mat @ v) * sqrt_lam
            c_pinv = (v.T @ r_pinv) / sqrt_lam[:, None]
            layer = LayerBasis(net.names[k], c, c_pinv, lam, pca.D, means[k], const, net.dim(k))
        result.append(layer)
        c_next = layer.C
    return result[::-1]
