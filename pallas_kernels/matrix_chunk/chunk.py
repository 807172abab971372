"""One chunk of the matrix-memory recurrence as a function of 2-D values — the body that both
kernel backends (``common/sweep_tpu.py``, ``common/sweep_gpu.py``) sweep over the chunks.

Per-chunk inputs ``xs`` (float32): ``q, k: [c, k]``, ``v: [c, v]``, ``lr`` as a column ``[c, 1]``
and a row ``[1, c]``, ``L`` (within-chunk cumulative log decay ``L_i = sum_{j<=i} log a_j``) as a
column and a row, ``L_end: [1, 1]``, the bias gate ``[c, 1]``, ``last: [c, 1]`` (1 on the last
token of a full chunk); with channel-wise decay also ``L: [c, k]`` and ``L_end: [1, k]``.
``consts``: hyper-parameters ``[1, 1]`` (``residuals.HPARAMS`` + ``q``, ``norm_floor``).
State: ``(W [v, k],)``, or ``(W, A)`` for the l_q "scale" retention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import math as km
from pallas_kernels.common import residuals

HPARAMS = residuals.HPARAMS + ("q", "norm_floor")
X_NAMES = ("q", "k", "v", "lr_col", "lr_row", "l_col", "l_row", "l_end", "gate", "last")
CHANNEL_X_NAMES = X_NAMES + ("l_mat", "l_end_row")


def lag_step(W, u0, log_a0, c, anchor=None):
    """Memora's exact first-token step: ``c softmax(a_0 log W + u_0)`` per row; with a dual
    ``anchor`` ``N``: ``c softmax(a_0 log W + (1 - a_0) N + u_0)``."""
    z = jnp.log(jnp.maximum(W, 1e-30))
    a0 = jnp.exp(log_a0)
    z = a0 * z if anchor is None else anchor + a0 * (z - anchor)
    return km.simplex_softmax(z + u0, c)


def channel_scores(q, k, l):
    """``S_ij = sum_k q_ik k_jk exp(L_ik - L_jk)`` for ``j <= i``, else 0: ``[c, c]``.

    One key position ``j`` at a time (exponents clipped at 0 before masking, so any decay
    strength is safe); rows of ``k`` / ``L`` picked by a one-hot reduction (no value slicing)."""
    c = q.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, c), 1)
    s = jnp.zeros((c, c), jnp.float32)
    for j in range(c):
        e = (rows == j).astype(jnp.float32)                               # [c, 1]
        k_j = jnp.sum(e * k, axis=0, keepdims=True)                       # [1, k]
        l_j = jnp.sum(e * l, axis=0, keepdims=True)
        col = jnp.sum(q * k_j * jnp.exp(jnp.minimum(l - l_j, 0.0)), axis=1, keepdims=True)   # [c, 1]
        s = s + col * (cols == j).astype(jnp.float32)
    return jnp.where(km.tri(c), s, 0.0)


def make_chunk_fn(cfg):
    """``fn(state, xs, consts) -> (new_state, (y [c, v],))`` for a ``MatrixChunkConfig``."""

    def fn(state, xs, consts):
        q, k, v, lr_c, lr_r, l_c, l_r, l_end, gate, last = xs[:10]
        hp = dict(zip(HPARAMS, consts))
        c = q.shape[0]
        W = state[0]
        if cfg.channel:
            # W_i = W_0 Diag(exp(L_i)) - sum_{j<=i} lr_j g_j (k_j * exp(L_i - L_j))^T
            l_mat, l_end_row = xs[10:]
            g = residuals.residual(cfg.residual, cfg.smooth, km.dot_t(k, W), v, gate, hp)
            y = km.dot_t(q * jnp.exp(l_mat), W) - km.dot(channel_scores(q, k, l_mat) * lr_r, g)
            w_end = W * jnp.exp(l_end_row) + km.t_dot(g, -lr_c * k * jnp.exp(l_end_row - l_mat))
            return (w_end,), (y,)
        if cfg.mode == "delta":
            # (I + A) U = diag(lr) (V - Gamma K W^T),  A_ij = lr_i exp(L_i - L_j) k_i.k_j (j < i)
            gam = jnp.exp(l_c)                                                  # [c, 1]
            a = lr_c * km.dot_t(k, k) * km.decay_matrix(l_c, l_r, km.tri(c, strict=True))
            u = km.dot(km.unit_lower_inverse(a), lr_c * (v - gam * km.dot_t(k, W)))   # [c, v]
            y = gam * km.dot_t(q, W) + km.dot(km.decay_matrix(l_c, l_r, km.tri(c)) * km.dot_t(q, k), u)
            w_end = jnp.exp(l_end) * W + km.t_dot(u, jnp.exp(l_end - l_c) * k)
            return (w_end,), (y,)

        g = residuals.residual(cfg.residual, cfg.smooth, km.dot_t(k, W), v, gate, hp)   # [c, v]
        if cfg.retention == "lag":
            e0, e0_row = km.first_row(c), km.first_col(c)
            la0 = km.total(e0 * l_c)                                            # log a_0
            base = lag_step(W, -km.t_dot(g, e0 * lr_c * k), la0,
                            float(cfg.simplex_c or W.shape[1]))
            l_c, l_r, l_end = l_c - la0, l_r - la0, l_end - la0
            lr_c, lr_r = lr_c * (1.0 - e0), lr_r * (1.0 - e0_row)
        elif cfg.retention == "scale":
            base = state[1]                                                     # accumulator A
        else:
            base = W
        # W_i = exp(L_i) base - sum_{j<=i} exp(L_i - L_j) lr_j g_j k_j^T, read W_i q_i (dual form)
        cm = -km.decay_matrix(l_c, l_r, km.tri(c)) * lr_r                       # [c, c]
        y = jnp.exp(l_c) * km.dot_t(q, base) + km.dot(cm * km.dot_t(q, k), g)
        z_end = jnp.exp(l_end) * base + km.t_dot(g, -jnp.exp(l_end - l_c) * lr_c * k)
        if cfg.retention == "scale":
            s_prev, s_end = (km.lq_scale(x, hp["q"], hp["norm_floor"]) for x in (base, z_end))
            y = y * jnp.where(last > 0, s_end, s_prev)
            return (s_end * z_end, z_end), (y,)
        return (z_end,), (y,)

    return fn
