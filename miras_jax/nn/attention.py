"""Causal softmax attention with RoPE: global (Transformer++) or sliding-window (hybrids).

Axis letters: ``b`` batch, ``t`` / ``s`` query / key tokens, ``h`` heads, ``k`` head dim, ``d``
model width. ``window = w`` lets token ``t`` attend to keys ``t - w < s <= t``. Recurrent state:
a key/value cache of ``L`` slots (``L = w`` for a window: O(1) per token; ``L = max_len``
otherwise), written at ``pos mod L``, with the absolute position of each slot.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def rope(x, pos, base: float = 10000.0):
    """Rotary embedding of ``x: [b, t, h, k]`` at positions ``pos: [t]`` (or ``[b, t]``)."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [k/2]
    ang = jnp.asarray(pos, jnp.float32)[..., None] * freq  # [(b,) t, k/2]
    cos, sin = jnp.cos(ang)[..., None, :], jnp.sin(ang)[..., None, :]
    if cos.ndim == 3:
        cos, sin = cos[None], sin[None]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def attend(q, k, v, q_pos, k_pos, window: int | None, k_valid=None):
    """``softmax(q k^T / sqrt(k) + mask) v``; key ``s`` is visible to query ``t`` iff
    ``k_pos_s <= q_pos_t`` (and ``> q_pos_t - window``) and ``k_valid_s``.

    ``q: [b, t, h, k]``, ``k, v: [b, s, h, k]``, ``q_pos: [t]``, ``k_pos: [s]`` or ``[b, s]``.
    """
    scores = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    kp = k_pos if k_pos.ndim == 2 else k_pos[None]
    vis = kp[:, None, :] <= q_pos[None, :, None]  # [b, t, s]
    if window is not None:
        vis &= kp[:, None, :] > q_pos[None, :, None] - window
    if k_valid is not None:
        vis &= k_valid[:, None, :]
    scores = jnp.where(vis[:, None], scores, -1e30)
    return jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(scores, axis=-1), v)


class KVCache(NamedTuple):
    """``k, v: [b, L, h, k]``; ``pos: [b, L]`` absolute position of each slot (-1: empty);
    ``t``: tokens seen so far (int32)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    t: jax.Array


class Attention(nnx.Module):
    """Multi-head causal attention with RoPE. ``x: [b, t, d] -> [b, t, d]``.

    ``window=None``: global attention (Transformer++); ``window=w``: sliding window.
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int | None = None,
                 rope_base: float = 10000.0, rngs: nnx.Rngs):
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into num_heads={num_heads} heads of even size")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive int or None, got {window}")
        self.h, self.k, self.window, self.base = num_heads, d_model // num_heads, window, rope_base
        lin = lambda: nnx.Linear(d_model, d_model, use_bias=False, rngs=rngs)
        self.wq, self.wk, self.wv, self.wo = lin(), lin(), lin(), lin()

    def _proj(self, x, pos):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.h, self.k)
        return rope(split(self.wq(x)), pos, self.base), rope(split(self.wk(x)), pos, self.base), split(self.wv(x))

    def __call__(self, x):
        pos = jnp.arange(x.shape[1])
        q, k, v = self._proj(x, pos)
        y = attend(q, k, v, pos, pos, self.window)
        return self.wo(y.reshape(x.shape[0], x.shape[1], -1))

    def prefill(self, x, max_len: int):
        """``(y, KVCache)``; the cache holds ``window`` slots (or ``max_len`` for global)."""
        b, t, _ = x.shape
        L = self.window if self.window is not None else max_len
        if self.window is None and t > max_len:
            raise ValueError(f"prompt of {t} tokens exceeds max_len={max_len}")
        pos = jnp.arange(t)
        q, k, v = self._proj(x, pos)
        y = self.wo(attend(q, k, v, pos, pos, self.window).reshape(b, t, -1))
        keep = min(t, L)  # the last `keep` tokens go to slots pos mod L
        slots = (jnp.arange(t - keep, t)) % L
        zeros = jnp.zeros((b, L, self.h, self.k), k.dtype)
        ck = zeros.at[:, slots].set(k[:, t - keep:])
        cv = zeros.at[:, slots].set(v[:, t - keep:])
        cpos = jnp.full((b, L), -1, jnp.int32).at[:, slots].set(jnp.arange(t - keep, t, dtype=jnp.int32))
        return y, KVCache(ck, cv, cpos, jnp.asarray(t, jnp.int32))

    def step(self, x_t, cache: KVCache):
        """One token ``x_t: [b, d] -> (y_t [b, d], KVCache)``."""
        b = x_t.shape[0]
        L = cache.k.shape[1]
        t = cache.t
        q, k, v = self._proj(x_t[:, None], t[None])
        slot = t % L
        ck = jax.lax.dynamic_update_index_in_dim(cache.k, k[:, 0], slot, 1)
        cv = jax.lax.dynamic_update_index_in_dim(cache.v, v[:, 0], slot, 1)
        cpos = jax.lax.dynamic_update_index_in_dim(cache.pos, jnp.full((b,), t, jnp.int32), slot, 1)
        y = attend(q, ck, cv, t[None], cpos, self.window, k_valid=cpos >= 0)
        return self.wo(y.reshape(b, -1)), KVCache(ck, cv, cpos, t + 1)
