"""Causal softmax attention with RoPE: global (Transformer++) or sliding-window (hybrids).

Axis letters: ``b`` batch, ``t`` / ``s`` query / key tokens, ``h`` heads, ``k`` head dim, ``d``
model width. ``window = w`` lets token ``t`` attend to keys ``t - w < s <= t``. Recurrent state:
a key/value cache of ``L`` slots (``L = w`` for a window: O(1) per token; ``L = max_len``
otherwise), written at ``pos mod L``, with the absolute position of each slot. Packed rows decode
by emptying slots (``pos = -1``): a packed ``prefill`` keeps the last document's keys only, and
``step(reset=...)`` empties its row's slots before a new document's first token.

Full sequences (``__call__``, ``prefill``) use ``flash_attend``, never a ``[t, s]`` array: blocks
of ``B`` tokens, a static schedule of the visible (query block, key block) pairs run by a scan, and
per query row the float32 online softmax over key blocks ``j`` (``S_j = q K_j^T / sqrt(k)``, masked)

    m' = max(m, max_s S_j),  l' = e^(m - m') l + sum_s e^(S_j - m'),
    a' = e^(m - m') a + e^(S_j - m') V_j,   o = a / l,   lse = m + log l.

Its VJP (FlashAttention-2) recomputes ``P = e^(S_j - lse)`` from the saved ``lse: [b, h, t]``:
``dV_j += P^T dO``, ``dS = P (dO V_j^T - rowsum(dO o))``, ``dQ += dS K_j / sqrt(k)``,
``dK_j += dS^T Q / sqrt(k)``. Memory O(t (B + k)), time O(t (min(t, w) + B) k): a window runs the
``ceil((w - 1) / B) + 1`` key blocks meeting ``(t - w, t]``; global folds the causal triangle (row
``p``: query block ``p`` over key blocks ``0..p``, then block ``n - 1 - p`` over ``0..n - 1 - p``).
On GPU, float16 / bfloat16 go to cuDNN (``jax.nn.dot_product_attention``) where it accepts them.
``attend`` (a ``[b, h, t, s]`` score matrix) stays for one-token decoding against the cache.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from miras_jax.engine import decode as decode_lib
from miras_jax.engine import segments as segments_lib


def rope(x, pos, base: float = 10000.0):
    """Rotary embedding of ``x: [b, t, h, k]`` at positions ``pos: [t]`` (or ``[b, t]``); computed in
    float32, returned in ``x``'s dtype."""
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [k/2]
    ang = jnp.asarray(pos, jnp.float32)[..., None] * freq  # [(b,) t, k/2]
    cos, sin = jnp.cos(ang)[..., None, :], jnp.sin(ang)[..., None, :]
    if cos.ndim == 3:
        cos, sin = cos[None], sin[None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
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


_NEG = -1e30  # masked score: finite, so a fully masked block gives e^(_NEG - m) = 0, never inf - inf


def _schedule(n: int, nw: int | None):
    """Static pair tables ``qi, kj: [U, R]`` (int32 block indices) and ``ok: [U, R]`` (bool): step
    ``u`` of the scan runs the ``R`` pairs ``(qi[u, r], kj[u, r])``. Within a step the query blocks
    are distinct (the forward writes its softmax state back by ``qi``); ``ok = False`` pads a row.

    ``nw``: key blocks before the diagonal one that a window reaches (None: all, causal)."""
    band = None if nw is None else n * (nw + 1)
    fold = (n + 1) * ((n + 1) // 2)  # n + 1 steps (n if n == 1) of ceil(n / 2) rows
    if band is not None and band <= fold:
        # query block i with key blocks i - nw .. i; those < 0 are padding
        rows = [[(i, j) for j in range(i - nw, i + 1)] for i in range(n)]
    else:
        # row p: query block p over key blocks 0..p, then query block n-1-p over 0..n-1-p; an
        # odd n's middle row (p == n-1-p) runs its block once
        rows = [[(p, j) for j in range(p + 1)]
                + ([(n - 1 - p, j) for j in range(n - p)] if 2 * p != n - 1 else [])
                for p in range((n + 1) // 2)]
    steps = max(len(r) for r in rows)
    qi = np.array([[r[u][0] if u < len(r) else r[0][0] for r in rows] for u in range(steps)], np.int32)
    kj = np.array([[r[u][1] if u < len(r) else 0 for r in rows] for u in range(steps)], np.int32)
    ok = (np.array([[u < len(r) for r in rows] for u in range(steps)]) & (kj >= 0))
    return qi, np.maximum(kj, 0), ok


def _blocks(x, n: int, blk: int):
    """``[b, t, h, k] -> [n, b, h, B, k]``, zero-padded to ``n B`` tokens."""
    b, t, h, k = x.shape
    x = jnp.pad(x, ((0, 0), (0, n * blk - t), (0, 0), (0, 0)))
    return x.reshape(b, n, blk, h, k).transpose(1, 0, 3, 2, 4)


def _unblock(x, t: int):
    """``[n, b, h, B, k] -> [b, t, h, k]`` (the padding dropped)."""
    n, b, h, blk, k = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(b, n * blk, h, k)[:, :t]


def _plan(t: int, window: int | None, block: int):
    """Block size ``B``, block count ``n`` and the schedule for ``t`` tokens."""
    blk = max(1, min(block, t))
    n = -(-t // blk)
    # query block i starts at i B; its first visible key is i B - w + 1, in block i - ceil((w-1)/B)
    nw = None if window is None else -(-(window - 1) // blk)
    return blk, n, _schedule(n, nw)


def _seg_blocks(segment_ids, n: int, blk: int):
    """``[b, t] -> [n, b, B]`` (padded with 0), or ``None``."""
    if segment_ids is None:
        return None
    b, t = segment_ids.shape
    return jnp.pad(segment_ids, ((0, 0), (0, n * blk - t))).reshape(b, n, blk).transpose(1, 0, 2)


def _pair_scores(qb, kb, qi, kj, ok, blk: int, window: int | None, sq=None, sk=None):
    """Masked scaled scores ``S: [R, b, h, B, B]`` (float32) of the pairs of one step, and the mask.
    ``sq, sk: [R, b, B]``: segment ids of the query / key blocks (packed rows: same document only)."""
    s = jnp.einsum("rbhqk,rbhsk->rbhqs", qb, kb, preferred_element_type=jnp.float32) / math.sqrt(qb.shape[-1])
    tq = qi[:, None] * blk + jnp.arange(blk)  # [R, B] absolute query positions
    tk = kj[:, None] * blk + jnp.arange(blk)  # [R, B] absolute key positions
    vis = (tk[:, None, :] <= tq[:, :, None]) & ok[:, None, None]  # [R, B, B]
    if window is not None:
        vis &= tk[:, None, :] > tq[:, :, None] - window
    # Padded keys (positions >= t) are later than every real query, so causality hides them; a
    # padded query sees at least itself, so no row has l = 0.
    vis = vis[:, None, None]
    if sq is not None:   # a query always sees itself, so no row is empty
        vis = vis & (sq[:, :, None, :, None] == sk[:, :, None, None, :])
    return jnp.where(vis, s, _NEG), vis


def _flash_fwd_blocks(q, k, v, window: int | None, block: int, segment_ids=None):
    """``(o [b, t, h, k] in q's dtype, lse [n, b, h, B] float32)``."""
    t = q.shape[1]
    blk, n, (qi, kj, ok) = _plan(t, window, block)
    Q, K, V = _blocks(q, n, blk), _blocks(k, n, blk), _blocks(v, n, blk)
    SG = _seg_blocks(segment_ids, n, blk)

    def step(carry, pairs):
        m, l, a = carry  # [n, b, h, B], [n, b, h, B], [n, b, h, B, k]
        qi_u, kj_u, ok_u = pairs
        sq, sk = (None, None) if SG is None else (SG[qi_u], SG[kj_u])
        s, vis = _pair_scores(Q[qi_u], K[kj_u], qi_u, kj_u, ok_u, blk, window, sq, sk)
        m_old, l_old, a_old = m[qi_u], l[qi_u], a[qi_u]
        m_new = jnp.maximum(m_old, s.max(-1))
        p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m_old - m_new)
        l_new = corr * l_old + p.sum(-1)
        a_new = corr[..., None] * a_old + jnp.einsum("rbhqs,rbhsk->rbhqk", p.astype(V.dtype), V[kj_u],
                                                     preferred_element_type=jnp.float32)
        return (m.at[qi_u].set(m_new), l.at[qi_u].set(l_new), a.at[qi_u].set(a_new)), None

    # *_like: the carries take Q's sharding (batch / heads), as the scattered updates have it
    init = (jnp.full_like(Q[..., 0], _NEG, jnp.float32), jnp.zeros_like(Q[..., 0], jnp.float32),
            jnp.zeros_like(Q, jnp.float32))
    (m, l, a), _ = jax.lax.scan(step, init, (qi, kj, ok))
    return _unblock((a / l[..., None]).astype(q.dtype), t), m + jnp.log(l)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, window, block, segment_ids=None):
    return _flash_fwd_blocks(q, k, v, window, block, segment_ids)[0]


def _flash_fwd(q, k, v, window, block, segment_ids=None):
    o, lse = _flash_fwd_blocks(q, k, v, window, block, segment_ids)
    return o, (q, k, v, o, lse, segment_ids)


def _flash_bwd(window, block, res, do):
    q, k, v, o, lse, segment_ids = res
    t, dk = q.shape[1], q.shape[3]
    blk, n, (qi, kj, ok) = _plan(t, window, block)
    Q, K, V, dO = (_blocks(x, n, blk) for x in (q, k, v, do))
    SG = _seg_blocks(segment_ids, n, blk)
    # rowsum(dO o) per query: [n, b, h, B]
    D = jnp.einsum("nbhqk,nbhqk->nbhq", dO, _blocks(o, n, blk), preferred_element_type=jnp.float32)

    def step(carry, pairs):
        dq, dk_, dv = carry  # float32 [n, b, h, B, k]
        qi_u, kj_u, ok_u = pairs
        qb, kb, vb, dob = Q[qi_u], K[kj_u], V[kj_u], dO[qi_u]
        sq, sk = (None, None) if SG is None else (SG[qi_u], SG[kj_u])
        s, vis = _pair_scores(qb, kb, qi_u, kj_u, ok_u, blk, window, sq, sk)
        p = jnp.where(vis, jnp.exp(s - lse[qi_u][..., None]), 0.0)  # [R, b, h, B, B]
        dp = jnp.einsum("rbhqk,rbhsk->rbhqs", dob, vb, preferred_element_type=jnp.float32)
        ds = (p * (dp - D[qi_u][..., None]) / math.sqrt(dk)).astype(q.dtype)
        f32 = dict(preferred_element_type=jnp.float32)
        dq = dq.at[qi_u].add(jnp.einsum("rbhqs,rbhsk->rbhqk", ds, kb, **f32))
        # the key blocks of one step may repeat (the folded schedule): scatter-add
        dk_ = dk_.at[kj_u].add(jnp.einsum("rbhqs,rbhqk->rbhsk", ds, qb, **f32))
        dv = dv.at[kj_u].add(jnp.einsum("rbhqs,rbhqk->rbhsk", p.astype(do.dtype), dob, **f32))
        return (dq, dk_, dv), None

    init = tuple(jnp.zeros_like(x, jnp.float32) for x in (Q, K, V))
    (dq, dk_, dv), _ = jax.lax.scan(step, init, (qi, kj, ok))
    return (_unblock(dq, t).astype(q.dtype), _unblock(dk_, t).astype(k.dtype), _unblock(dv, t).astype(v.dtype),
            None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attend(q, k, v, *, window: int | None = None, block: int = 128, segment_ids=None):
    """Causal self-attention of ``q, k, v: [b, t, h, k]`` at positions ``0..t-1``: equal to
    ``attend(q, k, v, arange(t), arange(t), window)`` in memory O(t (block + k)), forward and
    backward (custom VJP). ``segment_ids [b, t]`` (packed rows): a query sees keys of its own
    document only (block-diagonal; pad tokens, id 0, see only pads).

    Blocked online softmax (``block`` tokens a block), float32 accumulation, output in ``q``'s
    dtype; on GPU float16 / bfloat16 go to cuDNN when it accepts the shapes.
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive int or None, got {window}")
    if segment_ids is not None:
        return _flash(q, k, v, window, block, segments_lib.document_ids(segment_ids))
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # cuDNN checks dtype / head dim / version when traced, and raises if unsupported
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn",
                local_window_size=None if window is None else (window - 1, 0))  # keys t-(w-1)..t
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    return _flash(q, k, v, window, block)


class KVCache(NamedTuple):
    """``k, v: [b, L, h, k]``; ``pos: [b, L]`` absolute position of each slot (-1: empty, or a key
    of an earlier document of a packed row); ``t``: tokens seen so far (int32)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    t: jax.Array


class Attention(nnx.Module):
    """Multi-head causal attention with RoPE. ``x: [b, t, d] -> [b, t, d]``.

    ``window=None``: global attention (Transformer++); ``window=w``: sliding window.
    """

    def __init__(self, d_model: int, num_heads: int, *, window: int | None = None,
                 rope_base: float = 10000.0, dtype=jnp.float32, rngs: nnx.Rngs):
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into num_heads={num_heads} heads of even size")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive int or None, got {window}")
        self.h, self.k, self.window, self.base = num_heads, d_model // num_heads, window, rope_base
        lin = lambda: nnx.Linear(d_model, d_model, use_bias=False, dtype=dtype, rngs=rngs)
        self.wq, self.wk, self.wv, self.wo = lin(), lin(), lin(), lin()

    def _proj(self, x, pos):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.h, self.k)
        return rope(split(self.wq(x)), pos, self.base), rope(split(self.wk(x)), pos, self.base), split(self.wv(x))

    def __call__(self, x, segment_ids=None, segment_align: int = 0):
        """``x [b, t, d] -> [b, t, d]``; ``segment_ids [b, t]``: block-diagonal by document
        (``segment_align``, the memory layers' fast-path hint, changes nothing here)."""
        del segment_align
        pos = jnp.arange(x.shape[1])
        q, k, v = self._proj(x, pos)
        y = flash_attend(q, k, v, window=self.window, segment_ids=segment_ids)
        return self.wo(y.reshape(x.shape[0], x.shape[1], -1))

    def prefill(self, x, max_len: int, segment_ids=None):
        """``(y, KVCache)``; the cache holds ``window`` slots (or ``max_len`` for global).

        ``segment_ids [b, t]``: a packed prompt (``y`` as ``self(x, segment_ids)``); the cache keeps
        the keys of the row's last document only (the other slots are empty, ``pos = -1``), so a
        ``step`` continues that document. Positions stay the row's (RoPE and the window as in the
        packed forward)."""
        b, t, _ = x.shape
        L = self.window if self.window is not None else max_len
        if self.window is None and t > max_len:
            raise ValueError(f"prompt of {t} tokens exceeds max_len={max_len}")
        pos = jnp.arange(t)
        q, k, v = self._proj(x, pos)
        y = self.wo(flash_attend(q, k, v, window=self.window, segment_ids=segment_ids).reshape(b, t, -1))
        keep = min(t, L)  # the last `keep` tokens go to slots pos mod L
        slots = (jnp.arange(t - keep, t)) % L
        zeros = jnp.zeros((b, L, self.h, self.k), k.dtype)
        ck = zeros.at[:, slots].set(k[:, t - keep:])
        cv = zeros.at[:, slots].set(v[:, t - keep:])
        kept = jnp.broadcast_to(jnp.arange(t - keep, t, dtype=jnp.int32), (b, keep))
        if segment_ids is not None:   # only the last document's keys stay visible
            last = jax.vmap(decode_lib.last_document)(jnp.asarray(segment_ids, jnp.int32))[:, t - keep:]
            kept = jnp.where(last, kept, -1)
        cpos = jnp.full((b, L), -1, jnp.int32).at[:, slots].set(kept)
        return y, KVCache(ck, cv, cpos, jnp.asarray(t, jnp.int32))

    def step(self, x_t, cache: KVCache, reset=None):
        """One token ``x_t: [b, d] -> (y_t [b, d], KVCache)``. ``reset [b]`` (bool): the token starts a
        new document (packed rows): its row's cache forgets every earlier key (slots emptied,
        ``pos = -1``) before the token is written; positions keep counting. Decoding takes real
        tokens only (no pad token)."""
        b = x_t.shape[0]
        L = cache.k.shape[1]
        t = cache.t
        q, k, v = self._proj(x_t[:, None], t[None])
        slot = t % L
        cpos = cache.pos
        if reset is not None:
            cpos = jnp.where(jnp.asarray(reset, bool)[:, None], -1, cpos)
        ck = jax.lax.dynamic_update_index_in_dim(cache.k, k[:, 0], slot, 1)
        cv = jax.lax.dynamic_update_index_in_dim(cache.v, v[:, 0], slot, 1)
        cpos = jax.lax.dynamic_update_index_in_dim(cpos, jnp.full((b,), t, jnp.int32), slot, 1)
        y = attend(q, ck, cv, t[None], cpos, self.window, k_valid=cpos >= 0)
        return self.wo(y.reshape(b, -1)), KVCache(ck, cv, cpos, t + 1)
