"""Decay products and the dual-state coefficients of a chunk, shared by the mini-batch forms
(``chunk.py``, ``vjp.py``)."""

from __future__ import annotations

import jax.numpy as jnp

TINY = 1e-30


def log_gate(a):
    """``log a`` with ``a`` floored at 1e-30 (a zero gate becomes a 1e-30 one)."""
    return jnp.log(jnp.maximum(a, TINY))


def segment_cumsum(log_a, same):
    """``L_i = sum_{l <= i, l in i's document} log a_l`` (``same [c, c]``: 1 where two tokens share a
    document) as a masked matmul, so ``dL_i / d log_a_l`` is exactly 0 across documents (a plain
    ``cumsum`` difference cancels them only up to rounding). ``[c] -> [c]``."""
    c = log_a.shape[0]
    return (jnp.tril(jnp.ones((c, c), log_a.dtype)) * same) @ log_a


def decay_matrix(log_a, same=None):
    """``R_ij = exp(sum_{j<l<=i} log a_l)`` for ``j <= i``, else 0. ``log_a: [c] -> [c, c]``
    (``[c, k] -> [c, c, k]``). Exponents are <= 0: stable for any decay strength. ``same``
    (packed rows, scalar decay): also 0 across documents, from :func:`segment_cumsum`."""
    L = jnp.cumsum(log_a, axis=0) if same is None else segment_cumsum(log_a, same)
    diff = L[:, None] - L[None, :]
    c = log_a.shape[0]
    tri = jnp.tril(jnp.ones((c, c), bool))
    if same is not None:
        tri = tri & (same > 0)
    if diff.ndim == 3:
        tri = tri[:, :, None]
    return jnp.where(tri, jnp.exp(jnp.where(tri, diff, 0.0)), 0.0)


def coefficients(lr, log_a, D):
    """``(C [c, c], beta [c])`` from the decay matrix ``D = decay.decay_matrix(log_a)``
    (``D_ij = exp(L_i - L_j)``, ``j <= i``): ``C_ij = -D_ij lr_j``, ``beta_i = exp(L_i)``,
    ``L = cumsum(log a)`` (gradient descent; :func:`momentum_coefficients` for momentum)."""
    return -D * lr[None, :], jnp.exp(jnp.cumsum(log_a))


def coefficients_vjp(C, beta, D, dC, dbeta):
    """VJP of :func:`coefficients` (through ``D``): ``dlr_j = -sum_i dC_ij D_ij``; with
    ``H = dC * C``, ``dL_i = sum_j H_ij - sum_j H_ji + dbeta_i beta_i``, ``dlog_a`` = reverse cumsum."""
    H = dC * C
    dL = jnp.sum(H, axis=1) - jnp.sum(H, axis=0) + dbeta * beta
    return -jnp.sum(dC * D, axis=0), jnp.cumsum(dL[::-1])[::-1]


def momentum_coefficients(lr, log_a, log_m, real, D, same=None):
    """Momentum ``S_i = m_i S_{i-1} - lr_i g_i``, ``W_i = a_i W_{i-1} + real_i S_i`` over a chunk:
    ``(C, beta, gamma [c], m_end, Cs_end [c])`` with ``W_i = beta_i W_0 + gamma_i S_0 + sum_j C_ij g_j``
    and ``S_end = m_end S_0 + sum_j Cs_end_j g_j``. ``D = decay_matrix(log_a)``; ``real [c]`` is 0 on
    padding (its ``S`` is not added). ``same [c, c]`` (packed rows): 1 where tokens i, j are in one
    document (``D`` then ``decay_matrix(log_a, same)``); the caller masks ``beta``, ``gamma``,
    ``m_end`` to the chunk's first document."""
    Dm = decay_matrix(log_m, same)
    D_real = D * real[None, :]
    m_cum = jnp.exp(jnp.cumsum(log_m))
    C = -(D_real @ Dm) * lr[None, :]
    return C, jnp.exp(jnp.cumsum(log_a)), D_real @ m_cum, m_cum[-1], -Dm[-1] * lr
