"""Memory architectures: pure ``init`` / ``apply`` pairs over a parameter pytree.

Axis letters: ``k`` key dim, ``v`` value dim, ``f`` hidden width of an MLP memory.
A memory maps one key ``x: [k]`` to a value ``[v]``; batch and tokens are added with
``jax.vmap``. Every weight is a 2-D matrix ``[out, in]`` so retention maps that act "per
matrix" or "per row" (l_q normalisation, softmax on the simplex) have one meaning.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

Params = Any  # a pytree of [out, in] matrices

INITS = ("zeros", "normal", "simplex", "unit_interval")
_GELU_C = 0.7978845608028654  # sqrt(2 / pi)
_GELU_A = 0.044715


def _gelu_parts(x):
    """``(t, u')`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)``, ``t = tanh(u)``."""
    t = jnp.tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return t, _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)


@jax.custom_jvp
def gelu_tanh(x):
    """``gelu(x) = x / 2 (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)`` (tanh approximation).

    Same values as ``jax.nn.gelu(x, approximate=True)``. The custom JVPs (``gelu'`` and ``gelu''``
    in closed form, below) make reverse mode keep one array per derivative instead of every
    intermediate of the tanh formula: the chunked engine differentiates the memory twice (the
    inner gradient, then the outer backward) and stores what it keeps for every chunk.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_slope(x, t, du):
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


def _gelu_curvature(x, t, du):
    return (1.0 - t * t) * (du + 3.0 * _GELU_A * _GELU_C * x * x - x * t * du * du)


@jax.custom_jvp
def gelu_tanh_slope(x):
    """``gelu'(x) = (1 + t) / 2 + x (1 - t^2) u' / 2``."""
    return _gelu_slope(x, *_gelu_parts(x))


def gelu_tanh_curvature(x):
    """``gelu''(x) = (1 - t^2) (u' + 3 0.044715 sqrt(2/pi) x^2 - x t u'^2)``."""
    return _gelu_curvature(x, *_gelu_parts(x))


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return gelu_tanh(x), gelu_tanh_slope(x) * dx


@gelu_tanh_slope.defjvp
def _gelu_tanh_slope_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return gelu_tanh_slope(x), gelu_tanh_curvature(x) * dx


ACTIVATIONS = {
    "gelu": gelu_tanh,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def activation_derivatives(name: str, x, n: int) -> list:
    """``[act(x), act'(x), act''(x)][:n]`` from one evaluation (gelu: one ``tanh`` for all three,
    where separate calls would each recompute it)."""
    if name == "gelu":
        t, du = _gelu_parts(x)
        return [0.5 * x * (1.0 + t), _gelu_slope(x, t, du), _gelu_curvature(x, t, du)][:n]
    out, f = [], ACTIVATIONS[name]
    for _ in range(n):
        out.append(f(x))
        f = (lambda g: lambda z: jax.jvp(g, (z,), (jnp.ones_like(z),))[1])(f)
    return out


def _init_matrix(key, shape, init: str, scale: float, dtype):
    """One ``[out, in]`` weight. ``simplex``: rows are ``in * softmax(noise)`` (positive, row sum
    = row length); ``unit_interval``: ``sigmoid(noise)`` in (0, 1); ``normal``: ``scale *
    N(0, 1) / sqrt(in)``."""
    fan_in = shape[-1]
    noise = jax.random.normal(key, shape, jnp.float32)
    if init == "zeros":
        w = jnp.zeros(shape, jnp.float32)
    elif init == "normal":
        w = scale * noise / jnp.sqrt(fan_in)
    elif init == "simplex":
        w = fan_in * jax.nn.softmax(scale * noise, axis=-1)
    elif init == "unit_interval":
        w = jax.nn.sigmoid(scale * noise)
    else:
        raise ValueError(f"unknown memory init {init!r}; valid: {INITS}")
    return w.astype(dtype)


FEATURE_MAPS = (None, "poly")


def poly_features(x, degree: int):
    """``phi(x) = concat_{j=0..p} vec(x^{(x) j}) / sqrt(j!)``: ``[..., d] -> [..., D]``,
    ``D = sum_{j<=p} d^j`` (the truncated Taylor features of ``exp``:
    ``phi(q)^T phi(k) = sum_{j<=p} (q^T k)^j / j!``). ``vec`` is row-major (the last factor fastest)."""
    parts, term, fact = [jnp.ones(x.shape[:-1] + (1,), x.dtype)], None, 1.0
    for j in range(1, degree + 1):
        term = x if term is None else (term[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,))
        fact *= j
        parts.append(term / jnp.sqrt(jnp.asarray(fact, x.dtype)))
    return jnp.concatenate(parts, axis=-1)


def feature_dim(d: int, feature_map: str | None, degree: int) -> int:
    """``D``: ``d`` without a feature map, ``sum_{j<=p} d^j`` for ``"poly"`` of degree ``p``."""
    return d if feature_map is None else sum(d ** j for j in range(degree + 1))


def _check_features(feature_map, degree):
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature_map {feature_map!r}; valid: {FEATURE_MAPS}")
    if feature_map is not None and (not isinstance(degree, int) or isinstance(degree, bool) or degree < 1):
        raise ValueError(f"feature_map='poly' needs an int degree >= 1, got {degree!r}")


class _Features:
    """The feature-map part of a memory: ``features(x)`` (``phi``), ``input_dim(d_k)`` (``D``) and
    ``plain()`` (the same memory without a feature map, for engines fed ``phi(k)``, ``phi(q)``)."""

    def features(self, x):
        return x if self.feature_map is None else poly_features(x, self.degree)

    def input_dim(self, d_k: int) -> int:
        return feature_dim(d_k, self.feature_map, self.degree)

    def plain(self):
        return self if self.feature_map is None else dataclasses.replace(self, feature_map=None)


def layer_norm(x, eps: float = 1e-5):
    """LayerNorm without affine parameters over the last axis (affine terms are outer params)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps)


@dataclasses.dataclass(frozen=True)
class LinearMemory(_Features):
    """Matrix memory ``M_W(x) = W phi(x)`` with ``W: [v, D]`` stored under ``"W"``; ``phi`` the
    feature map (``feature_map="poly"``, ``degree``: :func:`poly_features`; default none:
    ``phi(x) = x``, ``D = d_k``)."""

    init_method: str = "zeros"
    init_scale: float = 1.0
    feature_map: str | None = None
    degree: int = 2
    kind: str = dataclasses.field(default="linear", init=False)

    def __post_init__(self):
        if self.init_method not in INITS:
            raise ValueError(f"unknown memory init {self.init_method!r}; valid: {INITS}")
        _check_features(self.feature_map, self.degree)

    def init(self, key, d_k: int, d_v: int, dtype=jnp.float32) -> Params:
        """Returns ``{"W": [d_v, D]}``."""
        return {"W": _init_matrix(key, (d_v, self.input_dim(d_k)), self.init_method, self.init_scale, dtype)}

    def forward(self, mm, x):
        """The architecture with its matmuls abstracted: ``mm(i, h)`` is weight ``i`` times ``h``."""
        return mm(0, self.features(x))

    def leaves(self, params) -> list:
        return [params["W"]]

    def from_leaves(self, leaves) -> Params:
        return {"W": leaves[0]}

    def apply(self, params: Params, x):
        """``x: [k] -> [v]``."""
        return params["W"] @ self.features(x)


@dataclasses.dataclass(frozen=True)
class MLPMemory(_Features):
    """MLP memory ``M(x) = [h +] [LN](W_{L-1} act(... act(W_0 h)))``, ``h = phi(x)`` (no biases).

    ``depth=2, expansion=4, residual=True, layer_norm=True`` is the Miras memory
    ``x + LN(W_1 gelu(W_2 x))``; ``depth=1`` with residual and LN is TTT-Linear's ``x + LN(W x)``.
    Params: ``{"layers": (W_0 [f, D], ..., W_{L-1} [v, f])}``, ``f = expansion * d_k``. The
    residual needs ``D == d_v``. ``feature_map`` / ``degree``: as :class:`LinearMemory`'s
    (the memory reads ``phi(x)``, residual included).
    """

    depth: int = 2
    expansion: int = 4
    residual: bool = True
    layer_norm: bool = True
    activation: str = "gelu"
    init_method: str = "normal"
    init_scale: float = 1.0
    feature_map: str | None = None
    degree: int = 2
    kind: str = dataclasses.field(default="mlp", init=False)

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"MLP memory depth must be >= 1, got {self.depth}")
        if self.expansion < 1:
            raise ValueError(f"MLP memory expansion must be >= 1, got {self.expansion}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {tuple(ACTIVATIONS)}")
        if self.init_method not in INITS or self.init_method == "zeros":
            raise ValueError(f"MLP memory init must be one of {INITS[1:]}, got {self.init_method!r}")
        _check_features(self.feature_map, self.degree)

    def widths(self, d_k: int, d_v: int) -> list[int]:
        hidden = self.expansion * d_k
        return [self.input_dim(d_k)] + [hidden] * (self.depth - 1) + [d_v]

    def init(self, key, d_k: int, d_v: int, dtype=jnp.float32) -> Params:
        if self.residual and self.input_dim(d_k) != d_v:
            what = "d_k == d_v" if self.feature_map is None else f"its feature dimension D={self.input_dim(d_k)} == d_v"
            raise ValueError(f"a residual MLP memory needs {what}, got d_k={d_k}, d_v={d_v}; use residual=False")
        w = self.widths(d_k, d_v)
        keys = jax.random.split(key, self.depth)
        layers = tuple(
            _init_matrix(keys[i], (w[i + 1], w[i]), self.init_method, self.init_scale, dtype)
            for i in range(self.depth)
        )
        return {"layers": layers}

    def forward(self, mm, x):
        """The architecture with its matmuls abstracted: ``mm(i, h)`` is layer ``i``'s ``W_i h``."""
        act = ACTIVATIONS[self.activation]
        x = h = self.features(x)
        for i in range(self.depth):
            h = mm(i, h)
            if i < self.depth - 1:
                h = act(h)
        if self.layer_norm:
            h = layer_norm(h)
        return x + h if self.residual else h

    def leaves(self, params) -> list:
        return list(params["layers"])

    def from_leaves(self, leaves) -> Params:
        return {"layers": tuple(leaves)}

    def apply(self, params: Params, x):
        """``x: [k] -> [v]``."""
        ws = params["layers"]
        return self.forward(lambda i, h: ws[i] @ h, x)


def linear_memory(init: str = "zeros", init_scale: float = 1.0, feature_map: str | None = None,
                  degree: int = 2) -> LinearMemory:
    """Matrix memory ``W phi(x)``; see :class:`LinearMemory`."""
    return LinearMemory(init_method=init, init_scale=init_scale, feature_map=feature_map, degree=degree)


def mlp_memory(depth: int = 2, expansion: int = 4, residual: bool = True, layer_norm: bool = True,
               activation: str = "gelu", init: str = "normal", init_scale: float = 1.0,
               feature_map: str | None = None, degree: int = 2) -> MLPMemory:
    """MLP memory; see :class:`MLPMemory`."""
    return MLPMemory(depth=depth, expansion=expansion, residual=residual, layer_norm=layer_norm,
                     activation=activation, init_method=init, init_scale=init_scale,
                     feature_map=feature_map, degree=degree)


def token_factors(memory, params, x, residual_fn):
    """Per-token gradient of the inner loss in outer-product form, without forming it.

    For every weight ``W_i`` (used once, as ``W_i h``), ``grad_{W_i} l = delta_i in_i^T`` where
    ``in_i`` is the input of that matmul and ``delta_i = dl/d(W_i in_i)``. ``residual_fn(pred)``
    gives ``phi = dl/dpred``. Returns ``(pred [v], deltas, inputs)``, lists over weights;
    ``jax.vmap`` it over the tokens of a chunk to get ``[c, out_i]`` / ``[c, in_i]`` factors.
    """
    ws = memory.leaves(params)

    def tapped(taps):
        inputs = []

        def mm(i, h):
            inputs.append(h)
            return ws[i] @ h + taps[i]

        return memory.forward(mm, x), inputs

    taps = [jnp.zeros(w.shape[:1], w.dtype) for w in ws]
    pred, vjp, inputs = jax.vjp(tapped, taps, has_aux=True)
    (deltas,) = vjp(residual_fn(pred).astype(pred.dtype))
    return pred, list(deltas), inputs
