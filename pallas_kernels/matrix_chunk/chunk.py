"""One chunk of the matrix-memory recurrence as a function of 2-D values — the body that both
kernel backends (``common/sweep_tpu.py``, ``common/sweep_gpu.py``) sweep over the chunks.

Per-chunk inputs ``xs`` (float32): ``q, k: [c, k]``, ``v: [c, v]``, ``lr`` as a column ``[c, 1]``
and a row ``[1, c]``, ``L`` (within-chunk cumulative log decay ``L_i = sum_{j<=i} log a_j``) as a
column and a row, ``L_end: [1, 1]``, the bias gate ``[c, 1]``, ``last: [c, 1]`` (1 on the last
token of a full chunk); with channel-wise decay also ``L: [c, k]`` and ``L_end: [1, k]``.
``consts``: hyper-parameters ``[1, 1]`` (``residuals.HPARAMS`` + ``q``, ``norm_floor``).
State: ``(W [v, k],)``, or ``(W, A)`` for the l_q "scale" retention. Packed rows
(``common/segments.py``): ``xs`` end with ``segments.X_NAMES``, ``consts`` with the row's reset state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import math as km
from pallas_kernels.common import residuals, segments

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


def channel_scores(q, k, l, mask=None):
    """``S_ij = sum_k q_ik k_jk exp(L_ik - L_jk)`` where ``mask`` (default ``j <= i``), else 0: ``[c, c]``.

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
    return jnp.where(km.tri(c) if mask is None else mask, s, 0.0)


def make_chunk_fn(cfg, packed: bool = False):
    """``fn(state, xs, consts) -> (new_state, (y [c, v],))`` for a ``MatrixChunkConfig``. ``packed``:
    ``xs`` end with ``segments.X_NAMES`` and ``consts`` with the row's reset state ``(W_*[, A_*])``
    (``common/segments.py``: a later document of the chunk reads and ends from ``rho_i W_*``, its
    gradients taken at ``W_*``; ``"scale"``: it reads with ``s(A_*)``, a chunk of padding keeps ``W``;
    ``"lag"``: the exact step only if token 0 is real)."""

    def fn(state, xs, consts):
        q, k, v, lr_c, lr_r, l_c, l_r, l_end, gate, last = xs[:10]
        hp = dict(zip(HPARAMS, consts))
        c = q.shape[0]
        rs = docs = None
        if packed:
            rs = consts[len(HPARAMS):]                                          # (W_*[, A_*])
            docs = segments.documents(*xs[-len(segments.X_NAMES):])
            state = segments.swap(docs, state, rs)
        W = state[0]
        if cfg.channel:
            # W_i = W_0 Diag(exp(L_i)) - sum_{j<=i} lr_j g_j (k_j * exp(L_i - L_j))^T
            l_mat, l_end_row = xs[10:12]
            if not packed:
                g = residuals.residual(cfg.residual, cfg.smooth, km.dot_t(k, W), v, gate, hp)
                y = km.dot_t(q * jnp.exp(l_mat), W) - km.dot(channel_scores(q, k, l_mat) * lr_r, g)
                w_end = W * jnp.exp(l_end_row) + km.t_dot(g, -lr_c * k * jnp.exp(l_end_row - l_mat))
                return (w_end,), (y,)
            # packed: L per channel within documents; a later document reads W_* Diag(exp(L_i)) q_i
            W_s = rs[0]
            pred = segments.blend(docs.first_c, km.dot_t(k, W), km.dot_t(k, W_s))
            g = residuals.residual(cfg.residual, cfg.smooth, pred, v, gate, hp)
            qe = q * jnp.exp(l_mat)                                             # [c, k]
            y = (km.dot_t(qe * docs.first_c, W) + km.dot_t(qe * (1.0 - docs.first_c), W_s)
                 - km.dot(channel_scores(q, k, l_mat, km.tri(c) & docs.same) * lr_r, g))
            k_end = jnp.where(docs.in_last, jnp.exp(jnp.where(docs.in_last, l_end_row - l_mat, 0.0)), 0.0)
            w_end = (segments.blend(docs.first_last, W, W_s) * jnp.exp(l_end_row)
                     + km.t_dot(g, -lr_c * k * k_end))
            return (w_end,), (y,)
        def tri(strict=False):   # j <= i (j < i), in one document
            return km.tri(c, strict) & docs.same if packed else km.tri(c, strict)

        if cfg.mode == "delta":
            # (I + A) U = diag(lr) (V - Gamma K W^T),  A_ij = lr_i exp(L_i - L_j) k_i.k_j (j < i)
            gam = jnp.exp(l_c)                                                  # [c, 1]
            a = lr_c * km.dot_t(k, k) * km.decay_matrix(l_c, l_r, tri(strict=True))
            if not packed:
                u = km.dot(km.unit_lower_inverse(a), lr_c * (v - gam * km.dot_t(k, W)))   # [c, v]
                y = gam * km.dot_t(q, W) + km.dot(km.decay_matrix(l_c, l_r, km.tri(c)) * km.dot_t(q, k), u)
                w_end = jnp.exp(l_end) * W + km.t_dot(u, jnp.exp(l_end - l_c) * k)
                return (w_end,), (y,)
            # packed: Gamma K W^T -> beta K W^T + rho K W_*^T (the later documents' entry state)
            beta, rho = gam * docs.first_c, gam * (1.0 - docs.first_c)
            W_s = rs[0]
            u = km.dot(km.unit_lower_inverse(a), lr_c * (v - beta * km.dot_t(k, W) - rho * km.dot_t(k, W_s)))
            y = (beta * km.dot_t(q, W) + rho * km.dot_t(q, W_s)
                 + km.dot(km.decay_matrix(l_c, l_r, tri()) * km.dot_t(q, k), u))
            w_end = (jnp.exp(l_end) * segments.blend(docs.first_last, W, W_s)
                     + km.t_dot(u, segments.end_weights(l_end, l_c, docs.in_last) * k))
            return (w_end,), (y,)

        pred = km.dot_t(k, W)
        if packed:   # a later document's tokens take their gradients at W_*
            pred = segments.blend(docs.first_c, pred, km.dot_t(k, rs[0]))
        g = residuals.residual(cfg.residual, cfg.smooth, pred, v, gate, hp)     # [c, v]
        if cfg.retention == "lag":
            e0, e0_row = km.first_row(c), km.first_col(c)
            la0 = km.total(e0 * l_c)                                            # log a_0
            base = lag_step(W, -km.t_dot(g, e0 * lr_c * k), la0,
                            float(cfg.simplex_c or W.shape[1]))
            if packed:   # token 0 in the first document: la0 leaves that document's L only
                base = segments.blend(docs.first_real, base, W)
                l_c, l_r = l_c - la0 * docs.first_c, l_r - la0 * docs.first_r
                l_end = l_end - la0 * docs.first_last
            else:
                l_c, l_r, l_end = l_c - la0, l_r - la0, l_end - la0
            lr_c, lr_r = lr_c * (1.0 - e0), lr_r * (1.0 - e0_row)
        elif cfg.retention == "scale":
            base = state[1]                                                     # accumulator A
        else:
            base = W
        # W_i = exp(L_i) base - sum_{j<=i} exp(L_i - L_j) lr_j g_j k_j^T, read W_i q_i (dual form)
        cm = -km.decay_matrix(l_c, l_r, tri()) * lr_r                           # [c, c]
        if not packed:
            y = jnp.exp(l_c) * km.dot_t(q, base) + km.dot(cm * km.dot_t(q, k), g)
            z_end = jnp.exp(l_end) * base + km.t_dot(g, -jnp.exp(l_end - l_c) * lr_c * k)
        else:   # + rho_i B_* for the later documents (B_*: W_*, or A_* in "scale" mode)
            B_s = rs[-1]
            e = jnp.exp(l_c)
            y = (e * docs.first_c * km.dot_t(q, base) + e * (1.0 - docs.first_c) * km.dot_t(q, B_s)
                 + km.dot(cm * km.dot_t(q, k), g))
            z_end = (jnp.exp(l_end) * segments.blend(docs.first_last, base, B_s)
                     + km.t_dot(g, -segments.end_weights(l_end, l_c, docs.in_last) * lr_c * k))
        if cfg.retention == "scale":
            s_prev, s_end = (km.lq_scale(x, hp["q"], hp["norm_floor"]) for x in (base, z_end))
            if packed:   # the later documents read with s(A_*); a chunk of padding keeps W
                s_prev = segments.blend(docs.first_c, s_prev, km.lq_scale(rs[1], hp["q"], hp["norm_floor"]))
                y = y * jnp.where(last > 0, s_end, s_prev)
                return (segments.blend(docs.any_real, s_end * z_end, W), z_end), (y,)
            y = y * jnp.where(last > 0, s_end, s_prev)
            return (s_end * z_end, z_end), (y,)
        return (z_end,), (y,)

    return fn


# --- momentum, Muon and the Omega window (Titans, Atlas): MatrixChunkConfig.atlas --------------

MOMENTUM_X_NAMES = ("m_col", "m_row", "m_end", "live_col", "live_row", "la_tok", "lm_tok")
WINDOW_X_NAMES = ("kp", "vp", "gp", "band_cur", "band_prev")
NS_COEFFS = (3.4445, -4.7750, 2.0315)   # = miras_jax.inner_opt.NS_COEFFS


def newton_schulz(G, steps: int):
    """``NS(G)``: ``X = G / (||G||_F + 1e-7)``, transposed if it has more rows than columns, then
    ``steps`` times ``A = X X^T; X = a X + (b A + c A A) X`` (= ``miras_jax.inner_opt.newton_schulz``)."""
    a, b, c = NS_COEFFS
    sq = km.total(G * G)
    X = G / (jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0) + 1e-7)
    tall = G.shape[0] > G.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = km.dot_t(X, X)
        X = a * X + km.dot(b * A + c * km.dot(A, A), X)
    return X.T if tall else X


def atlas_x_names(cfg, packed: bool = False) -> tuple:
    """The per-chunk input names of ``make_atlas_fn`` in order (``layout.atlas_inputs``)."""
    names = X_NAMES + (MOMENTUM_X_NAMES if cfg.optimizer != "gd" else ()) + (
        WINDOW_X_NAMES if cfg.window is not None else ())
    return names + (segments.X_NAMES if packed else ())


def make_atlas_fn(cfg, packed: bool = False):
    """The chunk body for momentum / Muon / an Omega window (linear retention, scalar decay). Every
    gradient of the chunk is taken at its start memory ``P`` (a later document's at ``W_*``); the
    window's gradient of token ``i`` is ``G_i = sum_e B_ie r_e k_e^T`` over the chunk's tokens and
    the previous chunk's (``B = [band_prev | band_cur]``, ``r_e = phi(P k_e - v_e)``: per-token
    residuals once, then a banded sum). With ``F [c, c]`` the coefficient of ``G_j`` in ``W_i``:

        GD:        F = -R diag(lr),     W_i = e^{L_i} P + sum_j F_ij G_j
        momentum:  F = -(R diag(real)) E diag(lr),  + (R diag(real) e^{M})_i S_0
                   (R_ij = e^{L_i - L_j}, E_ij = e^{M_i - M_j}, j <= i, one document)

    so ``y = e^{L} q P^T (+ h q S_0^T) + ((F B_cur) * q k^T) r + ((F B_prev) * q k_prev^T) r_prev``
    (dual form). Muon: token by token, ``S = m_i S + G_i``, ``W = a_i W - lr_i NS(S)``, ``y_i = W q_i``.
    State ``(W,)`` for GD, ``(W, S)`` otherwise; ``packed``: ``consts`` end with ``(W_*[, S_*])``."""
    names = atlas_x_names(cfg, packed)
    mom = cfg.optimizer != "gd"

    def fn(state, xs, consts):
        x = dict(zip(names, xs))
        hp = dict(zip(HPARAMS, consts))
        q, k, v, gate = x["q"], x["k"], x["v"], x["gate"]
        c = q.shape[0]
        docs = rs = None
        if packed:
            rs = consts[len(HPARAMS):]
            docs = segments.documents(*(x[n] for n in segments.X_NAMES))
            state = segments.swap(docs, state, rs)
        W = state[0]
        S = state[1] if mom else None
        first = (lambda a, b: segments.blend(docs.first_c, a, b)) if packed else (lambda a, b: a)

        def tri(strict=False):
            return km.tri(c, strict) & docs.same if packed else km.tri(c, strict)

        pred = first(km.dot_t(k, W), km.dot_t(k, rs[0])) if packed else km.dot_t(k, W)
        r = residual_of(cfg, pred, v, gate, hp)                                # [c, v]
        win = cfg.window is not None
        if win:
            kp, bc, bp = x["kp"], x["band_cur"], x["band_prev"]
            rp = residual_of(cfg, km.dot_t(kp, W), x["vp"], x["gp"], hp)       # previous chunk, at P
        if cfg.optimizer == "muon":
            return _muon_tokens(cfg, x, W, S, r, (rp, kp, bc, bp) if win else None, docs, rs)
        l_c, l_r, l_end = x["l_col"], x["l_row"], x["l_end"]
        R = km.decay_matrix(l_c, l_r, tri())
        ends = (segments.end_weights(l_end, l_c, docs.in_last) if packed
                else jnp.exp(l_end - l_c))                                      # [c, 1] e^{L_end - L_j}
        lr_c, lr_r = x["lr_col"], x["lr_row"]
        e = jnp.exp(l_c)
        last = (lambda a, b: segments.blend(docs.first_last, a, b)) if packed else (lambda a, b: a)
        y = e * (first(km.dot_t(q, W), km.dot_t(q, rs[0])) if packed else km.dot_t(q, W))
        w_end = jnp.exp(l_end) * (last(W, rs[0]) if packed else W)
        if not mom:
            F = -R * lr_r                                                       # [c, c]
            w_j = -ends * lr_c                                                  # [c, 1]
        else:
            m_c, m_r, m_end = x["m_col"], x["m_row"], x["m_end"]
            Rr = R * x["live_row"]
            E = km.decay_matrix(m_c, m_r, tri())
            F = -km.dot(Rr, E) * lr_r
            em = jnp.exp(m_c)
            y = y + km.dot(Rr, em) * (first(km.dot_t(q, S), km.dot_t(q, rs[1])) if packed else km.dot_t(q, S))
            ends_r = ends * x["live_col"]                                       # [c, 1] over s
            w_j = -km.t_dot(E, ends_r) * lr_c
            S_last = last(S, rs[1]) if packed else S
            w_end = w_end + km.total(ends_r * em) * S_last
            m_ends = (segments.end_weights(m_end, m_c, docs.in_last) if packed else jnp.exp(m_end - m_c))
            s_j = -m_ends * lr_c
            s_end = jnp.exp(m_end) * S_last + _banded_outer(r, k, s_j, bc if win else None,
                                                            (rp, kp, bp) if win else None)
        if win:
            y = (y + km.dot(km.dot(F, bc) * km.dot_t(q, k), r)
                 + km.dot(km.dot(F, bp) * km.dot_t(q, kp), rp))
        else:
            y = y + km.dot(F * km.dot_t(q, k), r)
        w_end = w_end + _banded_outer(r, k, w_j, bc if win else None, (rp, kp, bp) if win else None)
        return ((w_end, s_end) if mom else (w_end,)), (y,)

    return fn


def residual_of(cfg, pred, v, gate, hp):
    return residuals.residual(cfg.residual, cfg.smooth, pred, v, gate, hp)


def _banded_outer(r, k, w, band=None, prev=None):
    """``sum_j w_j G_j`` with ``G_j = sum_e B_je r_e k_e^T``: ``[v, k]`` (no band: ``G_j = r_j k_j^T``)."""
    if band is None:
        return km.t_dot(r, w * k)
    rp, kp, bp = prev
    return km.t_dot(r, km.t_dot(band, w) * k) + km.t_dot(rp, km.t_dot(bp, w) * kp)


def _muon_tokens(cfg, x, W, S, r, win, docs, rs):
    """Muon over one chunk, token by token (static loop; rows and scalars picked by one-hot
    reductions): ``S = m_i S + G_i``, ``W = a_i W - lr_i NS(S)``, ``y_i = W q_i``; a restart
    (``reset_col``) swaps ``(W, S)`` for the reset state first."""
    q, k = x["q"], x["k"]
    c = q.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    rT = r.T                                                                    # [v, c]
    if win is not None:
        rp, kp, bc, bp = win
        rpT = rp.T
    y = jnp.zeros((c, r.shape[1]), jnp.float32)
    for i in range(c):
        e = (rows == i).astype(jnp.float32)                                     # [c, 1]
        pick = lambda col: km.total(e * col)  # noqa: E731
        if docs is not None and i > 0:
            rst = pick(x["reset_col"])
            W, S = segments.blend(rst, rs[0], W), segments.blend(rst, rs[1], S)
        if win is None:
            G = km.t_dot(r, e * x["live_col"] * k)                              # r_i k_i^T (0 on pads)
        else:
            b = jnp.sum(e * bc, axis=0, keepdims=True)                          # [1, c]
            bpr = jnp.sum(e * bp, axis=0, keepdims=True)
            G = km.dot(rT * b, k) + km.dot(rpT * bpr, kp)
        S = jnp.exp(pick(x["lm_tok"])) * S + G
        W = jnp.exp(pick(x["la_tok"])) * W - pick(x["lr_col"]) * newton_schulz(S, cfg.ns_steps)
        q_i = jnp.sum(e * q, axis=0, keepdims=True)                             # [1, k]
        y = y + e * km.dot_t(q_i, W)
    return (W, S), (y,)
