"""Small in-kernel math on 2-D float32 values (ops that lower on Mosaic and Triton alike)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

GELU_C = 0.7978845608028654     # sqrt(2 / pi)
GELU_A = 0.044715
LN_EPS = 1e-5


def dot(a, b):
    """``a @ b``, float32 accumulation."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_t(a, b):
    """``a @ b^T``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def t_dot(a, b):
    """``a^T @ b``."""
    return dot(a.T, b)


def tri(c: int, strict: bool = False):
    """``[c, c]`` mask ``i >= j`` (``i > j`` if strict)."""
    i = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    j = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    return i > j if strict else i >= j


def first_row(c: int):
    """``[c, 1]`` one-hot of row 0."""
    return (jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == 0).astype(jnp.float32)


def decay_matrix(l_col, l_row, mask):
    """``exp(L_i - L_j)`` where ``mask`` else 0: ``[c, 1], [1, c] -> [c, c]`` (exponent <= 0)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, l_col - l_row, 0.0)), 0.0)


def total(x):
    """Sum of every entry, ``[1, 1]``."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def gelu(x):
    """tanh-approximate GELU ``x / 2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + jnp.tanh(GELU_C * (x + GELU_A * x * x * x)))


def gelu_slope(x):
    """``gelu'(x)``."""
    t = jnp.tanh(GELU_C * (x + GELU_A * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)


def layer_norm(x):
    """``(x - mean) rstd`` over the last axis, no affine; returns ``(y, rstd [c, 1])``."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + LN_EPS)
    return xc * rstd, rstd


def layer_norm_vjp(y, rstd, g):
    """Backward of ``layer_norm`` at output ``y`` for cotangent ``g``: ``rstd (g - mean g - y mean(g y))``."""
    return rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - y * jnp.mean(g * y, axis=-1, keepdims=True))


def lq_scale(a, q, floor):
    """``s(A) = max(||A||_q, floor)^-(q-2)`` (``floor^-(q-2)`` for ``A = 0``, 1 if also
    ``floor = 0``): ``[1, 1]``. As ``||A||_q = m ||A / m||_q`` with ``m = max|A|`` (constant under
    autodiff), so the sum of ``|A / m|^q`` in ``[1, numel]`` never underflows (``sum |A|^q`` does in
    float32 for ``max|A| < ~1e-10`` at ``q = 4``). Same as ``miras_jax.retention.lq_scale``."""
    m = jax.lax.stop_gradient(jnp.max(jnp.max(jnp.abs(a), axis=1, keepdims=True), axis=0, keepdims=True))
    pos = m > 0
    m = jnp.where(pos, m, 1.0)
    r = a / m
    nz = r != 0
    s = total(jnp.where(nz, jnp.exp(q * jnp.log(jnp.where(nz, jnp.abs(r), 1.0))), 0.0))
    log_norm = jnp.log(m) + jnp.log(jnp.where(pos, s, 1.0)) / q
    has_floor = floor > 0
    log_floor = jnp.log(jnp.where(has_floor, floor, 1.0))
    log_norm = jnp.where(has_floor, jnp.where(pos, jnp.maximum(log_norm, log_floor), log_floor), log_norm)
    return jnp.where(pos | has_floor, jnp.exp(-(q - 2.0) * log_norm), 1.0)


def simplex_softmax(z, c):
    """``c softmax(z)`` per row."""
    e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
    return c * e / jnp.sum(e, axis=-1, keepdims=True)


def unit_lower_inverse(a):
    """``(I + A)^{-1}`` for strictly-lower-triangular ``A: [c, c]`` as the product
    ``(I + N)(I + N^2)(I + N^4)...`` with ``N = -A`` (nilpotent: ``ceil(log2 c)`` levels, all
    matmuls, so it lowers everywhere and its autodiff is matmuls too; Triton has no
    ``custom_vjp``)."""
    c = a.shape[0]
    n = -a
    x = jnp.eye(c, dtype=a.dtype) + n
    p = n
    for _ in range(max(c - 1, 1).bit_length() - 1):
        p = dot(p, p)
        x = x + dot(x, p)
    return x


def first_col(c: int):
    """``[1, c]`` one-hot of column 0."""
    return (jax.lax.broadcasted_iota(jnp.int32, (1, c), 1) == 0).astype(jnp.float32)
