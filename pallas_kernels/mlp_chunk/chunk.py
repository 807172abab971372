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
``c softmax(N_l)``, the first token's exact step ``c softmax(a log P + (1 - a) N + u)``). Packed rows
(``common/segments.py``): ``xs`` end with ``segments.X_NAMES``, ``consts`` with the row's reset state.

Momentum (``cfg.momentum``, Titans; linear retention): state ``(W_0, W_1, S_0, S_1[, N_0, N_1])``,
``S_i = m_i S_{i-1} - lr_i g_i``, ``W_i = a_i W_{i-1} [+ (1 - a_i) N] + S_i``; ``xs`` add
``matrix_chunk.chunk.MOMENTUM_X_NAMES`` after the first ten: ``C = -(R diag(live)) E diag(lr)`` and
the reads add ``((R diag(live)) e^{M})_i S_l x_i`` (``E_ij = e^{M_i - M_j}``), as in ``make_atlas_fn``.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import math as km
from pallas_kernels.common import residuals, segments
from pallas_kernels.matrix_chunk.chunk import HPARAMS, MOMENTUM_X_NAMES, lag_step

__all__ = ["HPARAMS", "make_chunk_fn"]


def _centred(w):
    """``W_1`` minus its mean over the output rows, for the products that enter the memory's
    LayerNorm: the LN removes a per-token constant and the deltas ``D_1`` are mean-free, so values
    and gradients are unchanged, but the common mean that the LN would cancel is gone (with
    Memora's positive weights that cancellation turned float32 rounding into 4e-3 errors)."""
    return w - jnp.mean(w, axis=0, keepdims=True)


def make_chunk_fn(cfg, packed: bool = False):
    """``fn(state, xs, consts) -> (new_state, (y [c, d],))`` for an ``MLPChunkConfig``. ``packed``:
    ``xs`` end with ``segments.X_NAMES`` and ``consts`` with the row's reset state
    ``(W_*0, W_*1[, A_*0, A_*1])`` (``common/segments.py``; as in ``matrix_chunk``: a later document's
    factors are taken at ``W_*`` and its reads / end state add ``rho_i B_*``, less the anchor)."""

    def fn(state, xs, consts):
        q, k, v, lr_c, lr_r, l_c, l_r, l_end, gate, last = xs[:10]
        mx = dict(zip(MOMENTUM_X_NAMES, xs[10:17])) if cfg.momentum else None
        hp = dict(zip(HPARAMS, consts))
        c = q.shape[0]
        rs = docs = None
        if packed:
            rs = consts[len(HPARAMS):]                        # (W_*0, W_*1[, A_*0, A_*1 | S_*0, S_*1])
            docs = segments.documents(*xs[-len(segments.X_NAMES):])
            state = segments.swap(docs, state, rs)
        P0, P1 = state[0], state[1]
        S = tuple(state[2:4]) if cfg.momentum else None
        N = tuple(state[-2:]) if cfg.anchor else None
        # per-token factors at the chunk-start weights (packed: a later document's at W_*)
        if not packed:
            z = km.dot_t(k, P0)                               # [c, f]
            h = km.gelu(z)
            o, rstd = km.layer_norm(km.dot_t(h, _centred(P1)))    # [c, d]
        else:
            pick = lambda a, b: segments.blend(docs.first_c, a, b)  # noqa: E731
            z = pick(km.dot_t(k, P0), km.dot_t(k, rs[0]))
            h = km.gelu(z)
            o, rstd = km.layer_norm(pick(km.dot_t(h, _centred(P1)), km.dot_t(h, _centred(rs[1]))))
        phi = residuals.residual(cfg.residual, cfg.smooth, k + o, v, gate, hp)
        d1 = km.layer_norm_vjp(o, rstd, phi)                  # [c, d]
        if not packed:
            d0 = km.gelu_slope(z) * km.dot(d1, P1)            # [c, f]
        else:
            d0 = km.gelu_slope(z) * pick(km.dot(d1, P1), km.dot(d1, rs[1]))
        deltas, ins = (d0, d1), (k, h)

        if cfg.retention == "lag":
            e0, e0_row = km.first_row(c), km.first_col(c)
            la0 = km.total(e0 * l_c)
            cs = tuple(float(cfg.simplex_c or P.shape[1]) for P in (P0, P1))
            base = tuple(lag_step(P, -km.t_dot(dl, e0 * lr_c * il), la0, cc, None if N is None else n)
                         for P, dl, il, cc, n in zip((P0, P1), deltas, ins, cs, N or (None, None)))
            if N is not None:   # the linear part runs in the primal: its anchor is c softmax(N)
                N = tuple(km.simplex_softmax(n, cc) for n, cc in zip(N, cs))
            if packed:   # the exact step only on a real token 0; la0 leaves the first document's L only
                base = tuple(segments.blend(docs.first_real, b, P) for b, P in zip(base, (P0, P1)))
                l_c, l_r = l_c - la0 * docs.first_c, l_r - la0 * docs.first_r
                l_end = l_end - la0 * docs.first_last
            else:
                l_c, l_r, l_end = l_c - la0, l_r - la0, l_end - la0
            lr_c, lr_r = lr_c * (1.0 - e0), lr_r * (1.0 - e0_row)
        elif cfg.retention == "scale":
            base = (state[2], state[3])
        else:
            base = (P0, P1)
        start = base                                          # the chunk-start dual state
        if N is not None:   # the algebra below runs on the deviation from the anchor
            base = tuple(b - n for b, n in zip(base, N))

        if not packed:
            cm = -km.decay_matrix(l_c, l_r, km.tri(c)) * lr_r     # [c, c]
            beta = jnp.exp(l_c)                                   # [c, 1]
            c_end = -jnp.exp(l_end - l_c) * lr_c                  # [c, 1]
            z_end = tuple(jnp.exp(l_end) * b + km.t_dot(dl, c_end * il) for b, dl, il in zip(base, deltas, ins))
        else:   # within documents; the later ones from rho_i B_* (B_*: W_*, A_* in "scale" mode)
            B_s = rs[2:4] if cfg.retention == "scale" else rs[0:2]
            if N is not None:
                B_s = tuple(b - n for b, n in zip(B_s, N))
            cm = -km.decay_matrix(l_c, l_r, km.tri(c) & docs.same) * lr_r
            e = jnp.exp(l_c)
            beta, rho = e * docs.first_c, e * (1.0 - docs.first_c)
            c_end = -segments.end_weights(l_end, l_c, docs.in_last) * lr_c
            z_end = tuple(jnp.exp(l_end) * segments.blend(docs.first_last, b, b_s) + km.t_dot(dl, c_end * il)
                          for b, b_s, dl, il in zip(base, B_s, deltas, ins))
        mom = None
        if cfg.momentum:
            mom = _momentum(mx, l_c, l_r, l_end, lr_c, lr_r, docs, c, S, None if rs is None else rs[2:4])
            cm = mom["cm"]
            B_end = base if not packed else tuple(segments.blend(docs.first_last, b, b_s)
                                                  for b, b_s in zip(base, B_s))
            z_end = tuple(jnp.exp(l_end) * b + mom["h_end"] * s + km.t_dot(dl, mom["c_end"] * il)
                          for b, s, dl, il in zip(B_end, mom["S_last"], deltas, ins))
            s_end = tuple(jnp.exp(mom["m_end"]) * s + km.t_dot(dl, mom["s_end"] * il)
                          for s, dl, il in zip(mom["S_last"], deltas, ins))
        if N is not None:
            z_end = tuple(z + n for z, n in zip(z_end, N))
        if cfg.retention == "scale":
            lq = lambda a: km.lq_scale(a, hp["q"], hp["norm_floor"])  # noqa: E731
            s_end = tuple(lq(a) for a in z_end)
            if not packed:
                scales = tuple(jnp.where(last > 0, se, lq(a)) for se, a in zip(s_end, start))
            else:   # the later documents read with s(A_*)
                scales = tuple(jnp.where(last > 0, se, segments.blend(docs.first_c, lq(a), lq(a_s)))
                               for se, a, a_s in zip(s_end, start, rs[2:4]))
        else:
            scales = (1.0, 1.0)

        bases = (base[0], _centred(base[1]))
        anchors = None if N is None else (N[0], _centred(N[1]))
        rbases = None if not packed else (B_s[0], _centred(B_s[1]))

        def mm(l, x):                                         # W_l(i) x_i, for every token i
            out = beta * km.dot_t(x, bases[l]) + km.dot(cm * km.dot_t(x, ins[l]), deltas[l])
            if rbases is not None:
                out = out + rho * km.dot_t(x, rbases[l])
            if mom is not None:                               # + h_i S_l x_i (a later document: S_*)
                cen = _centred if l == 1 else (lambda w: w)
                sx = km.dot_t(x, cen(S[l]))
                if packed:
                    sx = segments.blend(docs.first_c, sx, km.dot_t(x, cen(rs[2 + l])))
                out = out + mom["h"] * sx
            if anchors is not None:
                out = out + km.dot_t(x, anchors[l])
            return scales[l] * out

        y = q + km.layer_norm(mm(1, km.gelu(mm(0, q))))[0]
        keep = tuple(state[-2:]) if cfg.anchor else ()
        if cfg.retention == "scale":
            P_end = (s_end[0] * z_end[0], s_end[1] * z_end[1])
            if packed:   # a chunk of padding keeps P
                P_end = tuple(segments.blend(docs.any_real, pe, p) for pe, p in zip(P_end, (P0, P1)))
            return P_end + z_end + keep, (y,)
        return z_end + (s_end if cfg.momentum else ()) + keep, (y,)

    return fn


def _momentum(mx, l_c, l_r, l_end, lr_c, lr_r, docs, c, S, S_reset):
    """The momentum dual form's coefficients (see the module docstring): ``cm [c, c]``, ``h [c, 1]``,
    the end state's ``c_end``, ``h_end``, the momentum's ``s_end``, ``m_end`` and ``S_last``."""
    packed = docs is not None
    mask = km.tri(c) & docs.same if packed else km.tri(c)
    m_c, m_r, m_end = mx["m_col"], mx["m_row"], mx["m_end"]
    Rr = km.decay_matrix(l_c, l_r, mask) * mx["live_row"]
    E = km.decay_matrix(m_c, m_r, mask)
    em = jnp.exp(m_c)
    ends = segments.end_weights(l_end, l_c, docs.in_last) if packed else jnp.exp(l_end - l_c)
    ends_r = ends * mx["live_col"]
    m_ends = segments.end_weights(m_end, m_c, docs.in_last) if packed else jnp.exp(m_end - m_c)
    S_last = S if not packed else tuple(segments.blend(docs.first_last, s, s_r) for s, s_r in zip(S, S_reset))
    return {"cm": -km.dot(Rr, E) * lr_r, "h": km.dot(Rr, em), "c_end": -km.t_dot(E, ends_r) * lr_c,
            "h_end": km.total(ends_r * em), "s_end": -m_ends * lr_c, "m_end": m_end, "S_last": S_last}
