"""Recurrent inference: one token at a time, with the semantics of the engine that trained it.

One sequence, one head (``vmap`` over batch and heads). Two cases:

* exact specs (token engine, ``chunk_size = 1``, or an exact chunked family: Hebbian / delta,
  whose chunked form equals the token recurrence): the state is the running ``MemoryState`` and a
  step is :func:`~miras_jax.engine.tokens.token_step` followed by the read ``M_{W_t}(q_t)``.
  O(1) time and memory per token.
* mini-batch specs run with ``chunk_size = C > 1``: inside a chunk every gradient is taken at the
  chunk-start memory, so decoding keeps that state plus a buffer of the current chunk's inputs
  (``q, k, v, gates``, at most ``C`` tokens). A step writes the token into the buffer and runs
  the chunked engine on the partly filled chunk (``valid_len = n + 1``); token ``n``'s read is
  causal, so it equals the full-sequence forward's. When the chunk fills, its end state becomes
  the new chunk start. O(C) time and O(state + C) memory per token.

Packed documents (``engine/segments.py``): a step with ``reset_t`` starts a new document before
the token writes. Exact specs restart from the reset state ``init_state(spec, W_0)``. Buffered
specs keep the row's chunk grid (``minibatch/reference.py``): the chunk-start state becomes the
reset state, the buffer tokens before the reset become padding (``real``), and the engine runs
the chunk with a restart flag at ``lo``, the reset's buffer position, so the new document's tokens
take their gradients at ``W_0`` exactly as in the packed full forward. Decoding takes real tokens
only (no pad tokens); a packed prompt's pads are handled by :func:`decode_prefill`.

The Atlas choices (``engine/window.py``): every entry lowers the spec and the token's inputs (a
feature map becomes ``phi(q)``, ``phi(k)``; the buffer holds ``D``-wide keys); an Omega window of
``c`` tokens keeps the last ``c - 1`` tokens' keys, values and bias gates in ``DecodeState.win``
(``window.window_state``), so each step sees the same window as the full forward.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from miras_jax.engine.minibatch import chunk as chunked
from miras_jax.engine import omega as omega_lib
from miras_jax.engine import plan as plan_lib
from miras_jax.engine import window as window_lib
from miras_jax.engine import segments as segments_lib
from miras_jax.engine.minibatch.reference import memorize_chunked_reference, pad_to_chunks
from miras_jax.engine.segments import where_tree
from miras_jax.engine.tokens import MemoryState, token_step


class DecodeState(NamedTuple):
    """``start``: running state (exact) or chunk-start state (mini-batch); ``buf``: the current
    chunk's ``(q [C, k], k [C, k], v [C, v], gates {name: [C, ...]})`` or ``()``; ``n``: tokens
    in the buffer (int32). Packed documents, buffered specs only (else ``None``): ``lo`` (int32)
    the buffer position where the current document starts (0: at or before the chunk start) and
    ``real [C]`` (bool) the buffer tokens that write (the current document's, no pads). ``win``:
    an Omega window's last ``c - 1`` tokens (``window.window_state``), else ``None``."""

    start: MemoryState
    buf: Any
    n: jax.Array
    lo: jax.Array | None = None
    real: jax.Array | None = None
    win: Any = None


def buffered(spec, chunk_size: int, implementation: str) -> bool:
    """Whether decoding needs the chunk buffer: the plan that trains ``spec`` has mini-batch
    semantics with chunks of more than one token (engine ``minibatch`` / ``chunked_reference``, or
    a kernel running a spec with no exact form)."""
    p = plan_lib.plan(spec, implementation, chunk_size)
    return p.family is None and p.chunk > 1 and p.engine in ("minibatch", "chunked_reference", "pallas", "omega")


def _chunk_engine(spec):
    """The chunk form a buffered decode runs (the training plan's semantics): the mini-batch form,
    the Omega / Muon form, else the chunked reference (e.g. an MLP memory with an Omega window)."""
    if plan_lib.minibatch_blocker(spec) is None:
        return chunked.memorize_chunked
    if plan_lib.omega_blocker(spec) is None:
        return omega_lib.memorize_omega_chunked
    return memorize_chunked_reference


def _lower_token(spec, q_t, k_t, gates_t):
    """The spec and one token's inputs as the engines run them (``window.lower_inputs``)."""
    return window_lib.lower_inputs(spec, q_t, k_t, gates_t)


def empty_window(spec, d_k: int, d_v: int, gate_shapes: dict, dtype=jnp.float32):
    """The Omega window before any token (``None`` for other specs): ``c - 1`` zero-weight slots."""
    D = spec_input_dim(spec, d_k)
    spec = window_lib.lower_spec(spec)
    if not window_lib.is_omega(spec):
        return None
    n = spec.bias.window - 1
    return {"k": jnp.zeros((n, D), dtype), "v": jnp.zeros((n, d_v), dtype),
            "gates": {g: jnp.zeros((n, *gate_shapes.get(g, ())), dtype) for g in spec.bias.gates}}


def spec_input_dim(spec, d_k: int) -> int:
    mem = spec.memory
    return mem.input_dim(d_k) if hasattr(mem, "input_dim") else d_k


def last_document(segment_ids) -> jax.Array:
    """``[t] bool``: the real tokens of the row's last document (``segments.boundaries``), the ones
    a decode that continues the row may still see (conv taps, attention keys)."""
    doc = segments_lib.document_ids(segment_ids)
    return (doc > 0) & (doc == jnp.max(doc))


def decode_init(spec, state: MemoryState, *, chunk_size: int, implementation: str, d_k: int,
                d_v: int, gate_shapes: dict, win=None) -> DecodeState:
    """The decode state after ``state`` (e.g. a prefill's final state, at a chunk boundary).

    ``gate_shapes``: per-token shape of every gate (``()`` or ``(d_k,)``), for the buffer. ``win``:
    an Omega window's state after the prefill (``window.window_state``; default: empty).
    """
    dtype = jax.tree.leaves(state.memory)[0].dtype
    if win is None:
        win = empty_window(spec, d_k, d_v, gate_shapes, dtype)
    if not buffered(spec, chunk_size, implementation):
        return DecodeState(state, (), jnp.zeros((), jnp.int32), win=win)
    c = chunk_size
    low = window_lib.lower_spec(spec)
    D = spec_input_dim(spec, d_k)
    w = (low.bias.window,) if window_lib.is_omega(low) else ()   # windowed keys / values / bias gates
    in_win = set(low.bias.gates) if w else set()
    buf = (jnp.zeros((c, D), dtype), jnp.zeros((c, *w, D), dtype), jnp.zeros((c, *w, d_v), dtype),
           {name: jnp.zeros((c, *(w if name in in_win else ()), *shape), dtype)
            for name, shape in _lowered_gate_shapes(spec, gate_shapes).items()})
    return DecodeState(state, buf, jnp.zeros((), jnp.int32), win=win)


def _lowered_gate_shapes(spec, gate_shapes: dict) -> dict:
    """Gate shapes after ``window.lower_inputs`` (a folded window-1 ``omega`` is gone)."""
    return {n: s for n, s in gate_shapes.items() if not (n == "omega" and window_lib.folds_window(spec))}


def decode_prefill(spec, state: MemoryState, q, k, v, gates: dict, reset, real, reset_state: MemoryState, *,
                   chunk_size: int, win=None) -> tuple[jax.Array, DecodeState]:
    """A packed prompt's last partial chunk (buffered specs): ``(y [r, v], DecodeState)``.

    ``state``: the state after the prompt's full chunks; ``q, k: [r, k]``, ``v: [r, v]``, gates,
    ``reset, real: [r]`` (``segments.boundaries`` of the whole row, sliced) for the ``r < C``
    remaining tokens. ``y`` is the packed forward's (one engine call on the partial chunk); the
    decode state continues the row's last document: if it starts at buffer position ``p``, the
    chunk start becomes ``reset_state``, ``lo = p`` and the tokens before ``p`` (and pads) stop writing.
    ``win``: an Omega window's state before these tokens (``window.window_state`` of the full chunks).
    """
    spec, q, k, gates = _lower_token(spec, q, k, gates)
    if window_lib.is_omega(spec):
        k, v, gates, win = window_lib.continue_windows(spec, win, k, v, gates, (reset, real))
    c, r = chunk_size, q.shape[0]
    dtype = jax.tree.leaves(state.memory)[0].dtype
    pad = lambda a: pad_to_chunks(a, c)  # noqa: E731
    buf = jax.tree.map(lambda a: pad(a).astype(dtype), (q, k, v, gates))
    reset, real = pad(reset), pad(real)
    if r:
        y, _ = _chunk_engine(spec)(spec, state, *buf, c, valid_len=r, segments=(reset, real, reset_state))
    else:
        y = jnp.zeros((c, v.shape[-1]), v.dtype)
    idx = jnp.arange(c)
    p = jnp.max(jnp.where(reset, idx, -1))       # the last document start in the buffer, or -1
    start = where_tree(p >= 0, reset_state, state)
    lo = jnp.maximum(p, 0).astype(jnp.int32)
    ds = DecodeState(start, buf, jnp.asarray(r, jnp.int32), lo, real & (idx >= lo), win)
    return y[:r], ds


def decode_step(spec, ds: DecodeState, q_t, k_t, v_t, gates_t: dict, *, chunk_size: int,
                implementation: str, reset_t=None, reset_state: MemoryState | None = None):
    """``(y_t [v], DecodeState)`` for one (real) token: ``q_t, k_t: [k]``, ``v_t: [v]``, gates per token.

    ``reset_t`` (bool scalar, or ``None``): the token starts a new document; the state restarts
    from ``reset_state`` (``init_state(spec, W_0)``) before it writes. ``reset_state`` is needed
    with ``reset_t`` and on a buffered state that tracks documents (``ds.lo`` set).
    """
    is_buffered = buffered(spec, chunk_size, implementation)
    spec, q_t, k_t, gates_t = _lower_token(spec, q_t, k_t, gates_t)
    if window_lib.is_omega(spec):
        one = lambda x: jnp.asarray(x)[None]  # noqa: E731
        segs = None if reset_t is None else (one(reset_t).astype(bool), jnp.ones((1,), bool))
        kw, vw, gw, win = window_lib.continue_windows(spec, ds.win, one(k_t), one(v_t),
                                                      jax.tree.map(one, gates_t), segs)
        k_t, v_t, gates_t = kw[0], vw[0], jax.tree.map(lambda x: x[0], gw)
        ds = ds._replace(win=win)
    if not is_buffered:
        start = ds.start if reset_t is None else where_tree(reset_t, reset_state, ds.start)
        st = token_step(spec, start, k_t, v_t, gates_t)
        return spec.memory.apply(st.memory, q_t), ds._replace(start=st)
    c, n = chunk_size, ds.n
    put = lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), n, 0)  # noqa: E731
    bq, bk, bv, bg = ds.buf
    buf = (put(bq, q_t), put(bk, k_t), put(bv, v_t), {g: put(bg[g], gates_t[g]) for g in bg})
    full = n + 1 == c
    engine = _chunk_engine(spec)
    if reset_t is None and ds.lo is None:   # one document throughout
        y, st = engine(spec, ds.start, *buf, c, valid_len=n + 1)
        start = jax.tree.map(lambda new, old: jnp.where(full, new, old), st, ds.start)
        return y[n], DecodeState(start, buf, jnp.where(full, 0, n + 1).astype(jnp.int32), win=ds.win)
    if reset_state is None:
        raise ValueError("decode_step needs reset_state to decode packed documents")
    idx = jnp.arange(c)
    start, lo, real = ds.start, ds.lo, ds.real
    if lo is None:
        lo, real = jnp.zeros((), jnp.int32), idx < n
    if reset_t is not None:   # the buffer tokens before n belong to the finished document
        start = where_tree(reset_t, reset_state, start)
        lo = jnp.where(reset_t, n, lo).astype(jnp.int32)
        real = real & ~(reset_t & (idx < n))
    real = real | (idx == n)
    # a restart flag at lo > 0 (a document starting at position 0 already starts from reset_state)
    segs = ((idx == lo) & (lo > 0), real, reset_state)
    y, st = engine(spec, start, *buf, c, valid_len=n + 1, segments=segs)
    start = where_tree(full, st, start)
    return y[n], DecodeState(start, buf, jnp.where(full, 0, n + 1).astype(jnp.int32),
                             jnp.where(full, 0, lo).astype(jnp.int32), real & ~full, ds.win)
