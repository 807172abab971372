"""Decay products inside a chunk, shared by the mini-batch forms (``chunk.py``, ``vjp.py``)."""

from __future__ import annotations

import jax.numpy as jnp

TINY = 1e-30


def log_gate(a):
    """``log a`` with ``a`` floored at 1e-30 (a zero gate becomes a 1e-30 one)."""
    return jnp.log(jnp.maximum(a, TINY))


def decay_matrix(log_a):
    """``R_ij = exp(sum_{j<l<=i} log a_l)`` for ``j <= i``, else 0. ``log_a: [c] -> [c, c]``
    (``[c, k] -> [c, c, k]``). Exponents are <= 0: stable for any decay strength."""
    L = jnp.cumsum(log_a, axis=0)
    diff = L[:, None] - L[None, :]
    c = log_a.shape[0]
    tri = jnp.tril(jnp.ones((c, c), bool))
    if diff.ndim == 3:
        tri = tri[:, :, None]
    return jnp.where(tri, jnp.exp(jnp.where(tri, diff, 0.0)), 0.0)
