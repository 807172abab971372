"""From the public ``[B, H, T, ...]`` layout to the sweeps' per-chunk blocks and back.

Everything here is plain (differentiable) JAX outside the kernels: padding of ``T`` to whole
chunks (padded tokens have ``lr = 0`` and ``log a = 0``, so they leave the state unchanged),
within-chunk cumulative log decay (packed rows: within documents too), the gates as columns and
rows, float32 casts.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import segments

# norm_floor: = miras_jax.retention.LQ_NORM_FLOOR (the kernels do not import the library)
HP_DEFAULTS = {"p": 3.0, "a": 10.0, "eps": 1e-6, "delta_scale": 1.0, "q": 4.0, "norm_floor": 1e-2}


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)


def check(name, x, shape):
    """Raise a clear error unless ``x`` is a floating array of ``shape`` (``None`` = any size)."""
    if not _is_float(x):
        raise TypeError(f"{name} must be a floating-point array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        raise ValueError(f"{name} must have shape {tuple('?' if s is None else s for s in shape)}, "
                         f"got {tuple(x.shape)}")


def check_common(q, k, v, lr, log_decay, gate):
    check("q", q, (None,) * 4)
    B, H, T, dk = q.shape
    check("k", k, (B, H, T, dk))
    check("v", v, (B, H, T, None))
    check("lr", lr, (B, H, T))
    if log_decay is not None and log_decay.ndim == 4:
        check("log_decay", log_decay, (B, H, T, dk))
    elif log_decay is not None:
        check("log_decay", log_decay, (B, H, T))
    if gate is not None:
        check("gate", gate, (B, H, T))
    return B, H, T, dk, v.shape[-1]


def consts(hparams, names):
    """Hyper-parameters as ``[1, 1]`` float32 arrays, in ``names`` order (defaults filled in)."""
    hparams = dict(hparams or {})
    unknown = set(hparams) - set(HP_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown hyper-parameters {sorted(unknown)}; valid: {sorted(HP_DEFAULTS)}")
    return tuple(jnp.reshape(jnp.asarray(hparams.get(n, HP_DEFAULTS[n]), jnp.float32), (1, 1)) for n in names)


def chunk_inputs(q, k, v, lr, log_decay, gate, c, packed=None):
    """``xs`` in ``chunk.X_NAMES`` order (``CHANNEL_X_NAMES`` for a ``[B, H, T, k]`` log decay),
    each ``[R, n, r, w]`` float32, and ``n``. ``packed = (reset, real)`` (``[B, H, T]`` 0 / 1): packed
    rows, ``L`` taken within documents and ``segments.X_NAMES`` appended."""
    B, H, T, dk = q.shape
    R, n = B * H, -(-T // c)
    Tp = n * c
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def tok(x):                          # [B, H, T, ...] -> [R, n, c, w]
        x = f32(x).reshape((R, T) + x.shape[3:])
        x = jnp.pad(x, ((0, 0), (0, Tp - T)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape((R, n, c, -1))

    lr = tok(lr)[..., 0]                                            # [R, n, c]
    channel = log_decay is not None and log_decay.ndim == 4
    la = jnp.zeros_like(lr) if log_decay is None or channel else tok(log_decay)[..., 0]
    if packed is None:
        L = jnp.cumsum(la, axis=-1)
    else:
        reset, real = (tok(x)[..., 0] for x in packed)                  # [R, n, c]
        L = segments.local_cumsum(la, reset)
    g = jnp.zeros_like(lr) if gate is None else tok(gate)[..., 0]
    last = jnp.broadcast_to((jnp.arange(c) == c - 1).astype(jnp.float32), (R, n, c))
    col = lambda x: x[..., :, None]     # noqa: E731
    row = lambda x: x[..., None, :]     # noqa: E731
    xs = (tok(q), tok(k), tok(v), col(lr), row(lr), col(L), row(L), L[..., -1:, None], col(g), col(last))
    if channel:
        if packed is None:
            Lm = jnp.cumsum(tok(log_decay), axis=2)                 # [R, n, c, k]
        else:
            Lm = segments.local_cumsum(tok(log_decay), reset[..., None], axis=2)
        xs += (Lm, Lm[:, :, -1:])
    if packed is not None:
        xs += segments.chunk_inputs(reset, real)
    return xs, n


def rows(x):
    """``[B, H, ...] -> [R, ...]`` float32."""
    return jnp.asarray(x, jnp.float32).reshape((-1,) + x.shape[2:])


def unrows(x, B, H):
    return x.reshape((B, H) + x.shape[1:])


def outputs(y, B, H, T, dtype):
    """``[R, n, c, v] -> [B, H, T, v]``."""
    return y.reshape(B, H, -1, y.shape[-1])[:, :, :T].astype(dtype)



def momentum_inputs(log_m, la, c, T, packed=None):
    """Momentum / Muon inputs, ``chunk.MOMENTUM_X_NAMES`` order, each ``[R, n, r, w]``: the in-chunk
    cumulative log momentum ``M`` (within documents) as a column, a row and its end; ``live`` (1 on a
    real token: not the tail's padding, not a packed row's pad) as a column and a row; the per-token
    ``log a`` and ``log m`` columns. ``log_m, la: [B, H, T]`` (``la``: ``None`` = no decay), already
    0 on pads."""
    B, H = log_m.shape[:2]
    R, n = B * H, -(-T // c)
    tok = lambda x: jnp.pad(jnp.asarray(x, jnp.float32).reshape(R, T), ((0, 0), (0, n * c - T))).reshape(R, n, c)  # noqa: E731
    lm = tok(log_m)
    la = jnp.zeros_like(lm) if la is None else tok(la)
    live = tok(jnp.ones((B, H, T)) if packed is None else packed[1])
    M = jnp.cumsum(lm, axis=-1) if packed is None else segments.local_cumsum(lm, tok(packed[0]))
    col = lambda x: x[..., :, None]     # noqa: E731
    row = lambda x: x[..., None, :]     # noqa: E731
    return (col(M), row(M), M[..., -1:, None], col(live), row(live), col(la), col(lm))


def window_inputs(weights, k, v, gate, halo, c, real=None):
    """Omega-window inputs, ``chunk.WINDOW_X_NAMES`` order: the previous chunk's keys ``[R, n, c, k]``,
    values ``[R, n, c, v]`` and bias gate ``[R, n, c, 1]`` (the first chunk's: ``halo = (k, v, gate)``,
    the ``w - 1`` tokens before the row's first, right-aligned), and the band of weights split into
    the current chunk's ``[R, n, c, c]`` and the previous one's: ``B[t, e] = weights[t, j]`` for
    ``e = t + c - w + 1 + j`` (the token ``t - w + 1 + j``). ``weights [B, H, T, w]``; ``real``
    ``[B, H, T]``: pad tokens' rows are 0."""
    B, H, T, w = weights.shape
    R, n = B * H, -(-T // c)
    Tp = n * c
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    wts = f32(weights) if real is None else f32(weights) * f32(real)[..., None]
    wts = jnp.pad(wts.reshape(R, T, w), ((0, 0), (0, Tp - T), (0, 0))).reshape(R, n, c, w)
    t = jnp.arange(c)[:, None, None]
    one_hot = (jnp.arange(2 * c)[None, None, :] == t + c - w + 1 + jnp.arange(w)[None, :, None])
    band = jnp.einsum("rntj,tje->rnte", wts, one_hot.astype(jnp.float32))
    hk, hv, hg = halo

    def prev(x, h):                   # [B, H, T, d], halo [B, H, w-1, d] -> [R, n, c, d]
        d = x.shape[-1]
        x = jnp.pad(f32(x).reshape(R, T, d), ((0, 0), (0, Tp - T), (0, 0)))
        h = jnp.pad(f32(h).reshape(R, w - 1, d), ((0, 0), (c - w + 1, 0), (0, 0)))
        return jnp.concatenate([h, x[:, :Tp - c]], axis=1).reshape(R, n, c, d)

    return (prev(k, hk), prev(v, hv), prev(gate[..., None], hg[..., None]), band[..., c:], band[..., :c])


def pow2(d: int, least: int = 16) -> int:
    """The smallest power of two ``>= max(d, least)`` (Triton's block rule)."""
    return max(least, 1 << (d - 1).bit_length())


def pad_last(x, n: int):
    """Zero-pad the last axis by ``n``."""
    return x if n == 0 else jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, n),))
