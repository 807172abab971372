"""Pure-JAX twin of ``matrix_chunk``: the same chunk semantics as plain token loops (``lax.scan``
over chunks, then over the tokens of a chunk), written for one head and vmapped outward."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import layout, residuals
from pallas_kernels.common import math as km
from pallas_kernels.matrix_chunk import chunk as chunk_lib
from pallas_kernels.matrix_chunk.config import ChunkState


def _phi(cfg, hp, P, k_i, v_i, g_i):
    """The bias's residual ``phi(P k_i - v_i)`` of one token: ``[v]``."""
    return residuals.residual(cfg.residual, cfg.smooth, (P @ k_i)[None], v_i[None], jnp.reshape(g_i, (1, 1)), hp)[0]


def _chunks(x, n: int, c: int):
    """``[T, ...]`` zero-padded to ``n c`` tokens, as ``[n, c, ...]``."""
    return jnp.pad(x, ((0, n * c - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)).reshape((n, c) + x.shape[1:])


def _one_row(cfg, hp, q, k, v, lr, la, g, m0, a0):
    """One head: ``q, k [T, k]``, ``v [T, v]``, ``lr, g [T]``, ``la [T]`` or ``[T, k]`` (channel-wise:
    ``exp(la_i) * Z`` scales the columns of ``Z [v, k]``), ``m0, a0 [v, k]``."""
    T, c = q.shape[0], cfg.chunk_size
    n = -(-T // c)
    pad = lambda x: _chunks(x, n, c)  # noqa: E731
    xs = tuple(pad(x) for x in (q, k, v, lr, la, g))
    full = jnp.arange(n) < T // c                  # chunks that end on a real token

    phi = lambda P, k_i, v_i, g_i: _phi(cfg, hp, P, k_i, v_i, g_i)  # noqa: E731

    def chunk(carry, x):
        W, A = carry
        (qc, kc, vc, lrc, lac, gc), is_full = x
        if cfg.mode == "delta":
            def tok(W, t):
                q_i, k_i, v_i, lr_i, la_i = t
                W = jnp.exp(la_i) * W
                W = W - lr_i * jnp.outer(W @ k_i - v_i, k_i)
                return W, W @ q_i
            W, y = jax.lax.scan(tok, W, (qc, kc, vc, lrc, lac))
            return (W, A), y
        grads = jax.vmap(lambda k_i, v_i, g_i: jnp.outer(phi(W, k_i, v_i, g_i), k_i))(kc, vc, gc)
        if cfg.retention == "lag":
            Z = chunk_lib.lag_step(W, -lrc[0] * grads[0], lac[0], float(cfg.simplex_c or W.shape[1]))
            lrc, lac = lrc.at[0].set(0.0), lac.at[0].set(0.0)
        else:
            Z = A if cfg.retention == "scale" else W

        def tok(Z, t):
            q_i, lr_i, la_i, g_i = t
            Z = jnp.exp(la_i) * Z - lr_i * g_i
            return Z, (Z @ q_i, Z @ q_i)
        Z, (y, _) = jax.lax.scan(tok, Z, (qc, lrc, lac, grads))
        if cfg.retention == "scale":
            s_prev, s_end = (km.lq_scale(x, hp["q"], hp["norm_floor"])[0, 0] for x in (A, Z))
            y = y * s_prev
            y = y.at[-1].set(jnp.where(is_full, y[-1] / s_prev * s_end, y[-1]))
            return (s_end * Z, Z), y
        return (Z, A), y

    (W, A), y = jax.lax.scan(chunk, (m0, a0), (xs, full))
    return y.reshape(n * c, -1)[:T], W, A


def _packed_row(cfg, hp, q, k, v, lr, la, g, m0, a0, reset, real, w_s, a_s):
    """One head of a packed row, token by token (``common/segments.py``): at a restart ``W``, ``A``
    and the gradients' point ``P`` become ``W_*``, ``A_*`` (and the l_q reads' scale ``s(A_*)``);
    ``"lag"`` takes its exact step at a real chunk position 0 only; ``"scale"``: a chunk of padding
    keeps ``W``. ``lr``, ``la`` are already 0 on padding."""
    T, c = q.shape[0], cfg.chunk_size
    n = -(-T // c)
    pad = lambda x: _chunks(x, n, c)  # noqa: E731
    xs = tuple(pad(x) for x in (q, k, v, lr, la, g, reset, real))
    lq = lambda a: km.lq_scale(a, hp["q"], hp["norm_floor"])[0, 0]  # noqa: E731
    sel = lambda b, x, y: jax.tree.map(lambda u, w: jnp.where(b, u, w), x, y)  # noqa: E731

    phi = lambda P, k_i, v_i, g_i: _phi(cfg, hp, P, k_i, v_i, g_i)  # noqa: E731

    def chunk(carry, x):
        W, A = carry
        s0 = lq(A) if cfg.retention == "scale" else jnp.float32(1.0)

        def tok(carry, t):
            W, A, P, s, seen = carry
            i, q_i, k_i, v_i, lr_i, la_i, g_i, r_i, re_i = t
            W, A, P, s = sel(r_i > 0, (w_s, a_s, w_s, lq(a_s) if cfg.retention == "scale" else s), (W, A, P, s))
            if cfg.mode == "delta":
                W = jnp.exp(la_i) * W
                W = W - lr_i * jnp.outer(W @ k_i - v_i, k_i)
                return (W, A, P, s, seen), W @ q_i
            u = lr_i * jnp.outer(phi(P, k_i, v_i, g_i), k_i)
            if cfg.retention == "scale":
                A = jnp.exp(la_i) * A - u
                return (W, A, P, s, seen | (re_i > 0)), s * (A @ q_i)
            W_lin = jnp.exp(la_i) * W - u
            if cfg.retention == "lag":
                W_exact = chunk_lib.lag_step(W, -u, la_i, float(cfg.simplex_c or W.shape[1]))
                W_lin = jnp.where((i == 0) & (re_i > 0), W_exact, W_lin)
            return (W_lin, A, P, s, seen), W_lin @ q_i

        (W, A, _, _, seen), y = jax.lax.scan(tok, (W, A, W, s0, False), (jnp.arange(c), *x))
        if cfg.retention == "scale":   # the last position reads s(A_end) A_end; W = s(A_end) A_end
            s_end = lq(A)
            y = y.at[-1].set(s_end * (A @ x[0][-1]))
            W = jnp.where(seen, s_end * A, W)
        return (W, A), y

    (W, A), y = jax.lax.scan(chunk, (m0, a0), xs)
    return y.reshape(n * c, -1)[:T], W, A


def matrix_chunk_reference(q, k, v, lr, m0, log_decay, a0, gate, hparams, *, config, segments=None):
    """Same arguments and results as ``matrix_chunk`` (inputs already checked there); ``segments``:
    ``(reset, real, W_*[, A_*])`` float32 0 / 1 and reset states, gates already masked."""
    B, H, T, dk = q.shape
    hp = dict(zip(chunk_lib.HPARAMS, layout.consts(hparams, chunk_lib.HPARAMS)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    la = jnp.zeros_like(f32(lr)) if log_decay is None else f32(log_decay)
    g = jnp.zeros_like(f32(lr)) if gate is None else f32(gate)
    a0_ = f32(m0) if a0 is None else f32(a0)
    if segments is not None:
        reset, real, w_s, *a_s = segments
        a_s = f32(a_s[0] if a_s else w_s)
        fn = jax.vmap(jax.vmap(lambda *a: _packed_row(config, hp, *a)))
        y, W, A = fn(f32(q), f32(k), f32(v), f32(lr), la, g, f32(m0), a0_, reset, real, f32(w_s), a_s)
        y = jnp.where(real[..., None] > 0, y, 0.0)
        return y.astype(v.dtype), ChunkState(W, A if config.retention == "scale" else None)
    fn = jax.vmap(jax.vmap(lambda *a: _one_row(config, hp, *a)))
    y, W, A = fn(f32(q), f32(k), f32(v), f32(lr), la, g, f32(m0), a0_)
    return y.astype(v.dtype), ChunkState(W, A if config.retention == "scale" else None)


def _ns(G, steps):
    """Newton-Schulz, plainly (``chunk.newton_schulz``'s twin)."""
    a, b, c = chunk_lib.NS_COEFFS
    sq = jnp.sum(G * G)
    X = G / (jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0) + 1e-7)
    tall = G.shape[0] > G.shape[1]
    X = X.T if tall else X
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def _atlas_row(cfg, hp, q, k, v, lr, la, lm, g, wts, hk, hv, hg, m0, s0, reset, real, w_s, s_s):
    """One head under momentum / Muon / an Omega window, token by token: ``G_t = sum_j wts[t, j]
    phi(P k_{t-w+1+j} - v_.) k_.^T`` at ``P`` (the chunk-start memory, ``W_*`` after a restart), then
    GD ``W = a W - lr G``; momentum ``S = m S - lr G, W = a W + real S``; Muon ``S = m S + G,
    W = a W - lr NS(S)``; ``y = W q``. A restart swaps ``(W, S, P)`` for ``(W_*, S_*, W_*)``."""
    T, c, w = q.shape[0], cfg.chunk_size, cfg.window or 1
    n = -(-T // c)
    ext = lambda h, x: jnp.concatenate([h, x])  # noqa: E731
    win = lambda x: jnp.stack([x[j:j + T] for j in range(w)], axis=1)  # noqa: E731   [T, w, ...]
    kw, vw, gw = win(ext(hk, k)), win(ext(hv, v)), win(ext(hg, g))
    wts = wts * real[:, None]
    pad = lambda x: _chunks(x, n, c)  # noqa: E731
    xs = tuple(pad(x) for x in (q, kw, vw, gw, wts, lr, la, lm, reset, real))
    sel = lambda b, x, y: jax.tree.map(lambda u, z: jnp.where(b, u, z), x, y)  # noqa: E731

    phi = lambda P, k_i, v_i, g_i: _phi(cfg, hp, P, k_i, v_i, g_i)  # noqa: E731

    def chunk(carry, x):
        W, S = carry

        def tok(carry, t):
            W, S, P = carry
            q_i, k_i, v_i, g_i, w_i, lr_i, la_i, lm_i, r_i, re_i = t
            W, S, P = sel(r_i > 0, (w_s, s_s, w_s), (W, S, P))
            G = jnp.einsum("j,jv,jd->vd", w_i, jax.vmap(lambda a, b, e: phi(P, a, b, e))(k_i, v_i, g_i), k_i)
            if cfg.optimizer == "gd":
                W = jnp.exp(la_i) * W - lr_i * G
            elif cfg.optimizer == "momentum":
                S = jnp.exp(lm_i) * S - lr_i * G
                W = jnp.exp(la_i) * W + re_i * S
            else:
                S = jnp.exp(lm_i) * S + G
                W = jnp.exp(la_i) * W - lr_i * _ns(S, cfg.ns_steps)
            return (W, S, P), W @ q_i

        (W, S, _), y = jax.lax.scan(tok, (W, S, W), x)
        return (W, S), y

    (W, S), y = jax.lax.scan(chunk, (m0, s0), xs)
    return y.reshape(n * c, -1)[:T], W, S


def atlas_reference(q, k, v, lr, m0, log_decay, gate, hparams, *, config, segments=None, log_momentum=None,
                    s0=None, window=None):
    """``matrix_chunk``'s momentum / Muon / Omega-window semantics as token loops (inputs checked and
    pads masked there; ``segments = (reset, real, W_*[, S_*])``)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    hp = dict(zip(chunk_lib.HPARAMS, layout.consts(hparams, chunk_lib.HPARAMS)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    zeros = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    la = zeros(B, H, T) if log_decay is None else f32(log_decay)
    lm = zeros(B, H, T) if log_momentum is None else f32(log_momentum)
    s0 = zeros(B, H, dv, dk) if s0 is None else f32(s0)
    if window is None:
        wts, hk, hv, hg = jnp.ones((B, H, T, 1)), zeros(B, H, 0, dk), zeros(B, H, 0, dv), zeros(B, H, 0)
    else:
        wts, hk, hv, hg = (f32(x) for x in window)
    if segments is None:
        reset, real, w_s, s_s = zeros(B, H, T), jnp.ones((B, H, T)), f32(m0), s0
    else:
        reset, real, w_s, *rest = segments
        s_s = f32(rest[0]) if rest else zeros(B, H, dv, dk)
    fn = jax.vmap(jax.vmap(lambda *a: _atlas_row(config, hp, *a)))
    y, W, S = fn(f32(q), f32(k), f32(v), f32(lr), la, lm, f32(gate), wts, hk, hv, hg, f32(m0), s0,
                 f32(reset), f32(real), f32(w_s), f32(s_s))
    if segments is not None:
        y = jnp.where(real[..., None] > 0, y, 0.0)
    mom = config.optimizer != "gd"
    return y.astype(v.dtype), ChunkState(W, None, S if mom else None)
