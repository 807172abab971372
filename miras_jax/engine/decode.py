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
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from miras_jax.engine.minibatch import chunk as chunked
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.tokens import MemoryState, token_step


class DecodeState(NamedTuple):
    """``start``: running state (exact) or chunk-start state (mini-batch); ``buf``: the current
    chunk's ``(q [C, k], k [C, k], v [C, v], gates {name: [C, ...]})`` or ``()``; ``n``: tokens
    in the buffer (int32)."""

    start: MemoryState
    buf: Any
    n: jax.Array


def buffered(spec, chunk_size: int, implementation: str) -> bool:
    """Whether decoding needs the chunk buffer: the plan that trains ``spec`` has mini-batch
    semantics with chunks of more than one token (engine ``minibatch`` / ``chunked_reference``, or
    a kernel running a spec with no exact form)."""
    p = plan_lib.plan(spec, implementation, chunk_size)
    return p.family is None and p.chunk > 1 and p.engine in ("minibatch", "chunked_reference", "pallas")


def decode_init(spec, state: MemoryState, *, chunk_size: int, implementation: str, d_k: int,
                d_v: int, gate_shapes: dict) -> DecodeState:
    """The decode state after ``state`` (e.g. a prefill's final state, at a chunk boundary).

    ``gate_shapes``: per-token shape of every gate (``()`` or ``(d_k,)``), for the buffer.
    """
    if not buffered(spec, chunk_size, implementation):
        return DecodeState(state, (), jnp.zeros((), jnp.int32))
    c = chunk_size
    dtype = jax.tree.leaves(state.memory)[0].dtype
    buf = (jnp.zeros((c, d_k), dtype), jnp.zeros((c, d_k), dtype), jnp.zeros((c, d_v), dtype),
           {name: jnp.zeros((c, *shape), dtype) for name, shape in gate_shapes.items()})
    return DecodeState(state, buf, jnp.zeros((), jnp.int32))


def decode_step(spec, ds: DecodeState, q_t, k_t, v_t, gates_t: dict, *, chunk_size: int,
                implementation: str):
    """``(y_t [v], DecodeState)`` for one token: ``q_t, k_t: [k]``, ``v_t: [v]``, gates per token."""
    if not buffered(spec, chunk_size, implementation):
        st = token_step(spec, ds.start, k_t, v_t, gates_t)
        return spec.memory.apply(st.memory, q_t), DecodeState(st, (), ds.n)
    c, n = chunk_size, ds.n
    put = lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), n, 0)
    bq, bk, bv, bg = ds.buf
    buf = (put(bq, q_t), put(bk, k_t), put(bv, v_t), {g: put(bg[g], gates_t[g]) for g in bg})
    y, st = chunked.memorize_chunked(spec, ds.start, *buf, c, valid_len=n + 1)
    full = n + 1 == c
    start = jax.tree.map(lambda new, old: jnp.where(full, new, old), st, ds.start)
    return y[n], DecodeState(start, buf, jnp.where(full, 0, n + 1).astype(jnp.int32))
