"""One chunk of the MLP-memory recurrence as a function of 2-D values (swept by the kernels).

Inputs as in ``matrix_chunk/chunk.py`` (``xs``: ``q, k, v [c, d]``, lr / L as columns and rows,
``L_end``, gate, last; ``consts``: hyper-parameters ``[1, 1]``). State ``(W_0 [f, d], W_1 [d, f])``,
plus ``(A_0, A_1)`` for the l_q "scale" retention.

Per-token gradients at the chunk-start weights ``P``, by hand (closed-form backprop):
``z = K P_0^T``, ``h = gelu(z)``, ``o = LN(h P_1^T)``, ``phi = phi(K + o, V)``,
``D_1 = LN'(phi)``, ``D_0 = gelu'(z) * (D_1 P_1)``; token ``j``'s gradient of ``W_l`` is
``D_l[j] in_l[j]^T`` with ``in_0 = K``, ``in_1 = h``. With ``C_ij = -exp(L_i - L_j) lr_j``
(``j <= i``) every matmul ``W_l x_i`` of a read becomes
``exp(L_i) base_l x_i + sum_j C_ij D_l[j] (in_l[j] . x_i)``. Anchored (``cfg.anchor``; the anchors
``N_l`` are the last two state entries, passed through unchanged): ``base_l`` becomes ``base_l - N_l``
and every read / end state adds ``N_l x_i`` / ``N_l`` (``"lag"``: the linear part's anchor is
``c softmax(N_l)``, the first token's exact step ``c softmax(a log P + (1 - a) N + u)``).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import math as km
from pallas_kernels.common import residuals
from pallas_kernels.matrix_chunk.chunk import HPARAMS, lag_step

__all__ = ["HPARAMS", "make_chunk_fn"]


def _centred(w):
    """``W_1`` minus its mean over the output rows, for the products that enter the memory's
    LayerNorm: the LN removes a per-token constant and the deltas ``D_1`` are mean-free, so values
    and gradients are unchanged, but the common mean that the LN would cancel is gone (with
    Memora's positive weights that cancellation turned float32 rounding into 4e-3 errors)."""
    return w - jnp.mean(w, axis=0, keepdims=True)


def make_chunk_fn(cfg):
    """``fn(state, xs, consts) -> (new_state, (y [c, d],))`` for an ``MLPChunkConfig``."""

    def fn(state, xs, consts):
        q, k, v, lr_c, lr_r, l_c, l_r, l_end, gate, last = xs
        hp = dict(zip(HPARAMS, consts))
        c = q.shape[0]
        P0, P1 = state[0], state[1]
        N = tuple(state[-2:]) if cfg.anchor else None
        # per-token factors at the chunk-start weights
        z = km.dot_t(k, P0)                                   # [c, f]
        h = km.gelu(z)
        o, rstd = km.layer_norm(km.dot_t(h, _centred(P1)))    # [c, d]
        phi = residuals.residual(cfg.residual, cfg.smooth, k + o, v, gate, hp)
        d1 = km.layer_norm_vjp(o, rstd, phi)                  # [c, d]
        d0 = km.gelu_slope(z) * km.dot(d1, P1)                # [c, f]
        deltas, ins = (d0, d1), (k, h)

        if cfg.retention == "lag":
            e0, e0_row = km.first_row(c), km.first_col(c)
            la0 = km.total(e0 * l_c)
            cs = tuple(float(cfg.simplex_c or P.shape[1]) for P in (P0, P1))
            base = tuple(lag_step(P, -km.t_dot(dl, e0 * lr_c * il), la0, cc, None if N is None else n)
                         for P, dl, il, cc, n in zip((P0, P1), deltas, ins, cs, N or (None, None)))
            if N is not None:   # the linear part runs in the primal: its anchor is c softmax(N)
                N = tuple(km.simplex_softmax(n, cc) for n, cc in zip(N, cs))
            l_c, l_r, l_end = l_c - la0, l_r - la0, l_end - la0
            lr_c, lr_r = lr_c * (1.0 - e0), lr_r * (1.0 - e0_row)
        elif cfg.retention == "scale":
            base = (state[2], state[3])
        else:
            base = (P0, P1)
        start = base                                          # the chunk-start dual state
        if N is not None:   # the algebra below runs on the deviation from the anchor
            base = tuple(b - n for b, n in zip(base, N))

        cm = -km.decay_matrix(l_c, l_r, km.tri(c)) * lr_r     # [c, c]
        beta = jnp.exp(l_c)                                   # [c, 1]
        c_end = -jnp.exp(l_end - l_c) * lr_c                  # [c, 1]
        z_end = tuple(jnp.exp(l_end) * b + km.t_dot(dl, c_end * il) for b, dl, il in zip(base, deltas, ins))
        if N is not None:
            z_end = tuple(z + n for z, n in zip(z_end, N))
        if cfg.retention == "scale":
            lq = lambda a: km.lq_scale(a, hp["q"], hp["norm_floor"])  # noqa: E731
            s_end = tuple(lq(a) for a in z_end)
            scales = tuple(jnp.where(last > 0, se, lq(a)) for se, a in zip(s_end, start))
        else:
            scales = (1.0, 1.0)

        bases = (base[0], _centred(base[1]))
        anchors = None if N is None else (N[0], _centred(N[1]))

        def mm(l, x):                                         # W_l(i) x_i, for every token i
            out = beta * km.dot_t(x, bases[l]) + km.dot(cm * km.dot_t(x, ins[l]), deltas[l])
            if anchors is not None:
                out = out + km.dot_t(x, anchors[l])
            return scales[l] * out

        y = q + km.layer_norm(mm(1, km.gelu(mm(0, q))))[0]
        keep = tuple(state[-2:]) if cfg.anchor else ()
        if cfg.retention == "scale":
            return (s_end[0] * z_end[0], s_end[1] * z_end[1]) + z_end + keep, (y,)
        return z_end + keep, (y,)

    return fn
