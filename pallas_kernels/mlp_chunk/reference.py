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


def mlp_chunk_reference(q, k, v, lr, m0, log_decay, a0, gate, hparams, anchor=None, *, config):
    """Same arguments and results as ``mlp_chunk`` (inputs already checked there)."""
    hp = dict(zip(chunk_lib.HPARAMS, layout.consts(hparams, chunk_lib.HPARAMS)))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    la = jnp.zeros_like(f32(lr)) if log_decay is None else f32(log_decay)
    g = jnp.zeros_like(f32(lr)) if gate is None else f32(gate)
    m0 = tuple(f32(w) for w in m0)
    a0 = m0 if a0 is None else tuple(f32(a) for a in a0)
    n0 = m0 if anchor is None else tuple(f32(a) for a in anchor)   # unused unless config.anchor
    fn = jax.vmap(jax.vmap(lambda *a: _one_row(config, hp, *a)))
    y, W, A = fn(f32(q), f32(k), f32(v), f32(lr), la, g, m0, a0, n0)
    return y.astype(v.dtype), MLPChunkState(W, A if config.retention == "scale" else None)
