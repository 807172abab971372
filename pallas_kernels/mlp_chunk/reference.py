"""Pure-JAX twin of ``mlp_chunk``: the same chunk semantics as token loops, per-token gradients
by ``jax.vjp`` of a plain MLP (not the kernel's closed form), written for one head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import layout, residuals
from pallas_kernels.common import math as km
from pallas_kernels.mlp_chunk import chunk as chunk_lib
from pallas_kernels.mlp_chunk.config import MLPChunkState


def memory(W, x):
    """``x + LN(W_1 gelu(W_0 x))`` for one key ``x: [d]``."""
    o = W[1] @ km.gelu(W[0] @ x)
    o = o - jnp.mean(o)
    return x + o * jax.lax.rsqrt(jnp.mean(o * o) + km.LN_EPS)


def _one_row(cfg, hp, q, k, v, lr, la, g, m0, a0, n0):
    T, c = q.shape[0], cfg.chunk_size
    n = -(-T // c)
    pad = lambda x: jnp.pad(x, ((0, n * c - T),) + ((0, 0),) * (x.ndim - 1)).reshape((n, c) + x.shape[1:])  # noqa: E731
    xs = tuple(pad(x) for x in (q, k, v, lr, la, g))
    full = jnp.arange(n) < T // c

    def grad(P, k_i, v_i, g_i):
        pred, vjp = jax.vjp(lambda W: memory(W, k_i), P)
        phi = residuals.residual(cfg.residual, cfg.smooth, pred[None], v_i[None], jnp.reshape(g_i, (1, 1)), hp)[0]
        return vjp(phi)[0]

    def chunk(carry, x):
        W, A = carry
        (qc, kc, vc, lrc, lac, gc), is_full = x
        grads = jax.vmap(lambda k_i, v_i, g_i: grad(W, k_i, v_i, g_i))(kc, vc, gc)   # per weight [c, ...]
        N = n0 if cfg.anchor else (None, None)
        if cfg.retention == "lag":
            cs = tuple(float(cfg.simplex_c or P.shape[1]) for P in W)
            Z = tuple(chunk_lib.lag_step(P, -lrc[0] * gl[0], lac[0], cc, n)
                      for P, gl, cc, n in zip(W, grads, cs, N))
            if cfg.anchor:
                N = tuple(km.simplex_softmax(n, cc) for n, cc in zip(N, cs))
            lrc, lac = lrc.at[0].set(0.0), lac.at[0].set(0.0)
        else:
            Z = A if cfg.retention == "scale" else W
        lq = lambda a: km.lq_scale(a, hp["q"], hp["norm_floor"])[0, 0]  # noqa: E731
        s_prev = tuple(lq(a) for a in Z) if cfg.retention == "scale" else (1.0, 1.0)

        def tok(Z, t):
            lr_i, la_i, g_i = t
            if cfg.anchor:   # a (z - N) + N - lr g
                return tuple(n + jnp.exp(la_i) * (z - n) - lr_i * gl for z, gl, n in zip(Z, g_i, N)), Z
            return tuple(jnp.exp(la_i) * z - lr_i * gl for z, gl in zip(Z, g_i)), Z

        Z_end, _ = jax.lax.scan(tok, Z, (lrc, lac, grads))
        _, Zs = jax.lax.scan(lambda Z, t: (tok(Z, t)[0],) * 2, Z, (lrc, lac, grads))   # Z after each token
        if cfg.retention == "scale":
            s_end = tuple(lq(a) for a in Z_end)
            is_last = (jnp.arange(c) == c - 1) & is_full
            sc = tuple(jnp.where(is_last, se, sp) for se, sp in zip(s_end, s_prev))     # [c] per weight
            y = jax.vmap(lambda z0, z1, s0, s1, q_i: memory((s0 * z0, s1 * z1), q_i))(*Zs, *sc, qc)
            return (tuple(s * z for s, z in zip(s_end, Z_end)), Z_end), y
        y = jax.vmap(lambda z0, z1, q_i: memory((z0, z1), q_i))(*Zs, qc)
        return (Z_end, A), y

    (W, A), y = jax.lax.scan(chunk, (m0, a0), (xs, full))   # n0: closed over (constant)
    return y.reshape(n * c, -1)[:T], W, A


def _packed_row(cfg, hp, q, k, v, lr, la, g, m0, a0, n0, reset, real, w_s, a_s):
    """One head of a packed row, token by token (``common/segments.py``): at a restart the weights,
    accumulators and the gradients' point ``P`` become ``W_*``, ``A_*`` (the l_q reads' scales
    ``s(A_*)``; the anchors stay); ``"lag"`` takes its exact step at a real chunk position 0 only;
    ``"scale"``: a chunk of padding keeps ``W``. ``lr``, ``la`` are already 0 on padding."""
    T, c = q.shape[0], cfg.chunk_size
    n = -(-T // c)
    pad = lambda x: jnp.pad(x, ((0, n * c - T),) + ((0, 0),) * (x.ndim - 1)).reshape((n, c) + x.shape[1:])  # noqa: E731
    xs = tuple(pad(x) for x in (q, k, v, lr, la, g, reset, real))
    scale = cfg.retention == "scale"
    lq = lambda a: km.lq_scale(a, hp["q"], hp["norm_floor"])[0, 0]  # noqa: E731
    scales = lambda A: tuple(lq(a) for a in A) if scale else (jnp.float32(1.0),) * 2  # noqa: E731
    sel = lambda b, x, y: jax.tree.map(lambda u, w: jnp.where(b, u, w), x, y)  # noqa: E731
    cs = tuple(float(cfg.simplex_c or w.shape[1]) for w in m0)
    N_dual = n0 if cfg.anchor else (None, None)
    N = N_dual
    if cfg.anchor and cfg.retention == "lag":   # the linear part's anchor is c softmax(N)
        N = tuple(km.simplex_softmax(a, cc) for a, cc in zip(n0, cs))

    def grad(P, k_i, v_i, g_i):
        pred, vjp = jax.vjp(lambda W: memory(W, k_i), P)
        phi = residuals.residual(cfg.residual, cfg.smooth, pred[None], v_i[None], jnp.reshape(g_i, (1, 1)), hp)[0]
        return vjp(phi)[0]

    def linear(Z, lr_i, la_i, gl):   # a z [+ (1 - a) N] - lr g
        if cfg.anchor:
            return tuple(nn + jnp.exp(la_i) * (z - nn) - lr_i * gg for z, gg, nn in zip(Z, gl, N))
        return tuple(jnp.exp(la_i) * z - lr_i * gg for z, gg in zip(Z, gl))

    def chunk(carry, x):
        W, A = carry

        def tok(carry, t):
            W, A, P, s, seen = carry
            i, q_i, k_i, v_i, lr_i, la_i, g_i, r_i, re_i = t
            W, A, P, s = sel(r_i > 0, (w_s, a_s, w_s, scales(a_s)), (W, A, P, s))
            gl = grad(P, k_i, v_i, g_i)
            if scale:
                A = linear(A, lr_i, la_i, gl)
                return (W, A, P, s, seen | (re_i > 0)), memory(tuple(sc * a for sc, a in zip(s, A)), q_i)
            W_new = linear(W, lr_i, la_i, gl)
            if cfg.retention == "lag":
                W_exact = tuple(chunk_lib.lag_step(w, -lr_i * gg, la_i, cc, nd)
                                for w, gg, cc, nd in zip(W, gl, cs, N_dual))
                W_new = sel((i == 0) & (re_i > 0), W_exact, W_new)
            return (W_new, A, P, s, seen), memory(W_new, q_i)

        (W, A, _, _, seen), y = jax.lax.scan(tok, (W, A, W, scales(A), False), (jnp.arange(c), *x))
        if scale:   # the last position reads s(A_end) A_end; W = s(A_end) A_end
            W_end = tuple(sc * a for sc, a in zip(scales(A), A))
            y = y.at[-1].set(memory(W_end, x[0][-1]))
            W = sel(seen, W_end, W)
        return (W, A), y

    (W, A), y = jax.lax.scan(chunk, (m0, a0), xs)
    return y.reshape(n * c, -1)[:T], W, A


def _momentum_row(cfg, hp, q, k, v, lr, la, lm, g, m0, s0, n0, reset, real, w_s, s_s):
    """One head with momentum (linear retention), token by token: at a restart ``(W, S, P)`` become
    ``(W_*, S_*, W_*)``; ``g = grad l(P)``, ``S = m S - lr g``, ``W = a W [+ (1 - a) N] + real S``,
    ``y = M_W(q)``; ``P``: the chunk-start weights."""
    T, c = q.shape[0], cfg.chunk_size
    n = -(-T // c)
    pad = lambda x: jnp.pad(x, ((0, n * c - T),) + ((0, 0),) * (x.ndim - 1)).reshape((n, c) + x.shape[1:])  # noqa: E731
    xs = tuple(pad(x) for x in (q, k, v, lr, la, lm, g, reset, real))
    sel = lambda b, x, y: jax.tree.map(lambda u, w: jnp.where(b, u, w), x, y)  # noqa: E731

    def grad(P, k_i, v_i, g_i):
        pred, vjp = jax.vjp(lambda W: memory(W, k_i), P)
        phi = residuals.residual(cfg.residual, cfg.smooth, pred[None], v_i[None], jnp.reshape(g_i, (1, 1)), hp)[0]
        return vjp(phi)[0]

    def chunk(carry, x):
        def tok(carry, t):
            W, S, P = carry
            q_i, k_i, v_i, lr_i, la_i, lm_i, g_i, r_i, re_i = t
            W, S, P = sel(r_i > 0, (w_s, s_s, w_s), (W, S, P))
            S = tuple(jnp.exp(lm_i) * s - lr_i * gl for s, gl in zip(S, grad(P, k_i, v_i, g_i)))
            if cfg.anchor:
                W = tuple(nn + jnp.exp(la_i) * (w - nn) + re_i * s for w, s, nn in zip(W, S, n0))
            else:
                W = tuple(jnp.exp(la_i) * w + re_i * s for w, s in zip(W, S))
            return (W, S, P), memory(W, q_i)

        W, S = carry
        (W, S, _), y = jax.lax.scan(tok, (W, S, W), x)
        return (W, S), y

    (W, S), y = jax.lax.scan(chunk, (m0, s0), xs)
    return y.reshape(n * c, -1)[:T], W, S


def mlp_chunk_reference(q, k, v, lr, m0, log_decay, a0, gate, hparams, anchor=None, *, config, segments=None,
                        log_momentum=None, s0=None):
    """Same arguments and results as ``mlp_chunk`` (inputs already checked there); ``segments``:
    ``(reset, real, reset_state)`` float32 0 / 1 and ``(W_*0, W_*1[, A_*0, A_*1 | S_*0, S_*1])``, gates
    already masked."""
    hp = dict(zip(chunk_lib.HPARAMS, layout.consts(hparams, chunk_lib.HPARAMS)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    la = jnp.zeros_like(f32(lr)) if log_decay is None else f32(log_decay)
    g = jnp.zeros_like(f32(lr)) if gate is None else f32(gate)
    m0 = tuple(f32(w) for w in m0)
    a0 = m0 if a0 is None else tuple(f32(a) for a in a0)
    n0 = m0 if anchor is None else tuple(f32(a) for a in anchor)   # unused unless config.anchor
    if config.momentum:
        s0 = tuple(f32(s) for s in s0)
        if segments is None:
            reset, real, w_s, s_s = jnp.zeros_like(f32(lr)), jnp.ones_like(f32(lr)), m0, s0
        else:
            reset, real, rstate = segments
            w_s, s_s = tuple(f32(x) for x in rstate[:2]), tuple(f32(x) for x in rstate[2:4])
        fn = jax.vmap(jax.vmap(lambda *a: _momentum_row(config, hp, *a)))
        y, W, S = fn(f32(q), f32(k), f32(v), f32(lr), la, f32(log_momentum), g, m0, s0, n0, reset, real, w_s, s_s)
        if segments is not None:
            y = jnp.where(real[..., None] > 0, y, 0.0)
        return y.astype(v.dtype), MLPChunkState(W, None, S)
    if segments is not None:
        reset, real, rstate = segments
        rstate = tuple(f32(x) for x in rstate)
        w_s, a_s = rstate[:2], (rstate[2:4] if config.retention == "scale" else rstate[:2])
        fn = jax.vmap(jax.vmap(lambda *a: _packed_row(config, hp, *a)))
        y, W, A = fn(f32(q), f32(k), f32(v), f32(lr), la, g, m0, a0, n0, reset, real, w_s, a_s)
        y = jnp.where(real[..., None] > 0, y, 0.0)
        return y.astype(v.dtype), MLPChunkState(W, A if config.retention == "scale" else None)
    fn = jax.vmap(jax.vmap(lambda *a: _one_row(config, hp, *a)))
    y, W, A = fn(f32(q), f32(k), f32(v), f32(lr), la, g, m0, a0, n0)
    return y.astype(v.dtype), MLPChunkState(W, A if config.retention == "scale" else None)
