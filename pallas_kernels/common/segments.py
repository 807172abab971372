"""Packed rows (several documents in one row) for the chunk kernels: the per-token inputs, built
outside the kernels, and the per-chunk document masks, built inside them.

Contract (that of ``miras_jax/engine/segments.py``; the kernels do not import the library):
``reset [B, H, T]`` is 1 where a real token starts a document that is not the row's first: before it
writes, the state restarts from the row's *reset state* (memory; l_q accumulator); ``real [B, H, T]``
is 0 on padding: a pad token neither writes (``lr = 0``, ``log a = 0``: the kernels' APIs mask them)
nor is read (``y = 0``). The row's first document continues from ``m0``.

Inside a chunk: a restart at chunk position 0 swaps the chunk-start state for the reset state
(:func:`swap`); ``doc_i`` counts the restarts at positions ``1..i``. The chunk's *first* document
(``doc = 0``) continues from the chunk-start state with weight ``beta_i = exp(L_i)``, a later one
from the reset state with weight ``rho_i = exp(L_i)``, where ``L_i`` is the log decay since the
start of ``i``'s document (:func:`local_cumsum`: within chunks *and* documents); every in-chunk pair
``(i, j)`` is masked to one document (``Docs.same``), and the gradients of a later document's tokens
are taken at the reset memory. The weights ``0 / 1`` are float blends (:func:`blend`): exactly one
side survives, values and gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import math as km

X_NAMES = ("doc_col", "doc_row", "reset_col", "real_col")


class Segments(NamedTuple):
    """Packed rows for ``matrix_chunk`` / ``mlp_chunk``: ``reset``, ``real``: ``[B, H, T]`` (bool or
    0 / 1), ``memory``: the reset memory (shaped like ``m0``), ``accumulator``: the reset l_q
    accumulator (``"scale"`` retention; ``None``: ``memory``), ``momentum``: the reset momentum
    ``S_*`` (momentum / Muon, ``matrix_chunk``; ``None``: zeros)."""

    reset: Any
    real: Any
    memory: Any
    accumulator: Any = None
    momentum: Any = None


def check(segments, B: int, H: int, T: int):
    """``(reset, real)`` as float32 ``[B, H, T]`` 0 / 1 arrays; ``TypeError`` / ``ValueError`` otherwise."""
    if not isinstance(segments, Segments):
        raise TypeError(f"segments must be a Segments(reset, real, memory, accumulator), got "
                        f"{type(segments).__name__}")
    out = []
    for name in ("reset", "real"):
        x = getattr(segments, name)
        if not hasattr(x, "shape") or tuple(x.shape) != (B, H, T):
            raise ValueError(f"segments.{name} must have shape {(B, H, T)}, got {getattr(x, 'shape', x)}")
        out.append(jnp.asarray(x).astype(bool).astype(jnp.float32))
    return tuple(out)


def mask_gates(real, lr, log_decay):
    """Pad tokens write nothing: ``lr = 0``, ``log a = 0`` where ``real [B, H, T]`` is 0 (``log_decay``
    ``[B, H, T]`` or channel-wise ``[B, H, T, k]``)."""
    lr = jnp.where(real > 0, lr, 0.0).astype(lr.dtype)
    if log_decay is not None:
        keep = (real > 0).reshape(real.shape + (1,) * (log_decay.ndim - real.ndim))
        log_decay = jnp.where(keep, log_decay, 0.0).astype(log_decay.dtype)
    return lr, log_decay


def local_cumsum(x, start, axis: int = -1):
    """Cumulative sum along ``axis`` that restarts where ``start > 0`` (broadcast to ``x``), as an
    associative scan whose ``where`` makes the derivative across a restart exactly 0."""
    def op(a, b):
        (xa, fa), (xb, fb) = a, b
        return jnp.where(fb > 0, xb, xa + xb), jnp.maximum(fa, fb)
    start = jnp.broadcast_to(start, x.shape)
    return jax.lax.associative_scan(op, (x, start), axis=axis % x.ndim)[0]


def chunk_inputs(reset, real):
    """The packed rows' per-chunk inputs, ``X_NAMES`` order, each ``[R, n, r, w]`` float32:
    ``doc`` (restarts at chunk positions ``1..i``) as a column and a row, ``reset`` and ``real`` as
    columns. ``reset, real: [R, n, c]`` (0 / 1)."""
    doc = jnp.cumsum(reset.at[..., 0].set(0.0), axis=-1)
    return doc[..., :, None], doc[..., None, :], reset[..., :, None], real[..., :, None]


class Docs(NamedTuple):
    """One chunk's documents: ``same [c, c]`` (bool, i and j in one document); ``first_c [c, 1]``,
    ``first_r [1, c]`` (1.0 in the chunk's first document); ``in_last [c, 1]`` (bool, in the chunk's
    last document); ``first_last`` (1.0 if the last document is the first); ``r0`` (1.0: a restart
    at position 0); ``any_real``, ``first_real`` (1.0: a real token in the chunk / at position 0).
    Scalars are ``[1, 1]``."""

    same: Any
    first_c: Any
    first_r: Any
    in_last: Any
    first_last: Any
    r0: Any
    any_real: Any
    first_real: Any


def documents(doc_c, doc_r, reset_c, real_c) -> Docs:
    """:class:`Docs` from a chunk's ``X_NAMES`` inputs (in the kernel)."""
    c = doc_c.shape[0]
    f32 = lambda b: b.astype(jnp.float32)  # noqa: E731
    e0 = km.first_row(c)
    e_last = f32(jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) == c - 1)
    doc_last = km.total(e_last * doc_c)                                  # [1, 1]
    return Docs(same=doc_c == doc_r, first_c=f32(doc_c == 0.0), first_r=f32(doc_r == 0.0),
                in_last=doc_c == doc_last, first_last=f32(doc_last == 0.0),
                r0=f32(km.total(e0 * reset_c) > 0.0), any_real=f32(km.total(real_c) > 0.0),
                first_real=f32(km.total(e0 * real_c) > 0.0))


def blend(m, a, b):
    """``a`` where ``m`` is 1, ``b`` where it is 0 (``m`` 0 / 1 floats, broadcast): ``m a + (1 - m) b``."""
    return m * a + (1.0 - m) * b


def swap(docs: Docs, state, reset_state):
    """A restart at chunk position 0: the first ``len(reset_state)`` state entries become the reset
    state (the rest, e.g. constant anchors, pass)."""
    n = len(reset_state)
    return tuple(blend(docs.r0, r, s) for s, r in zip(state[:n], reset_state)) + tuple(state[n:])


def end_weights(l_end, l_c, in_last):
    """``exp(L_end - L_j)`` for the tokens of the chunk's last document, else 0: ``[c, 1]`` (the
    exponent masked first: across documents it may be positive)."""
    return jnp.where(in_last, jnp.exp(jnp.where(in_last, l_end - l_c, 0.0)), 0.0)
