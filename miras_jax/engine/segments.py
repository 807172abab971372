"""Packed sequences: document boundaries from ``segment_ids``.

``segment_ids: int [T]`` (``[B, T]`` batched). ``PAD = 0`` marks padding: a pad token neither
writes (the state passes it unchanged) nor is read (its output is 0). A real token whose id differs
from the previous *real* token's starts a new document: before it writes, the memory restarts
from the row's reset state ``init_state(spec, params)`` (``W_0``, the retention's and the
optimizer's initial states). The row's first document starts from ``initial_state`` (default: the
same reset state), so pads before it, between documents or after the last one change nothing.
Ids need not be increasing; only changes matter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from miras_jax._checks import concrete

PAD = 0


def check_segment_ids(segment_ids, shape: tuple) -> jax.Array:
    """``segment_ids`` as an int32 array of ``shape``; ``TypeError`` / ``ValueError`` otherwise
    (concrete values must be ``>= 0``)."""
    if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
        raise TypeError(f"segment_ids must be an integer array, got {type(segment_ids).__name__}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids must be an integer array (0 = padding, documents >= 1), "
                        f"got dtype {segment_ids.dtype}")
    if tuple(segment_ids.shape) != tuple(shape):
        raise ValueError(f"segment_ids must have shape {tuple(shape)}, got {tuple(segment_ids.shape)}")
    val = concrete(segment_ids)
    if val is not None and val.size and int(np.min(val)) < 0:
        raise ValueError(f"segment_ids must be >= 0 (0 = padding), got min {int(np.min(val))}")
    return jnp.asarray(segment_ids, jnp.int32)


def check_align(segment_ids, align) -> int:
    """``align`` (int >= 0) for packed rows ``segment_ids [..., T]`` whose documents all start at
    multiples of it (0: no promise). Concrete ids are checked: a document starting elsewhere is a
    ``ValueError``; traced ids (under ``jit``) are taken on trust (a packer that pads documents to
    multiples of ``align`` keeps the promise)."""
    if isinstance(align, bool) or not isinstance(align, (int, np.integer)) or align < 0:
        raise ValueError(f"segment_align must be an int >= 0, got {align!r}")
    if align and segment_ids is None:
        raise ValueError("segment_align needs segment_ids (it describes packed rows)")
    val = None if segment_ids is None else concrete(segment_ids)
    if align and val is not None:
        seg = np.asarray(val).reshape(-1, val.shape[-1])
        with jax.ensure_compile_time_eval():   # concrete ids stay concrete inside a trace
            reset = np.asarray(jax.vmap(boundaries)(jnp.asarray(seg, jnp.int32))[0])
        rows, pos = np.nonzero(reset & (np.arange(seg.shape[1]) % align != 0)[None])
        if rows.size:
            raise ValueError(f"segment_align={align}: a document starts at position {int(pos[0])} of row "
                             f"{int(rows[0])}, not a multiple of {align} (pad documents to multiples of "
                             f"{align}, or pass segment_align=0)")
    return int(align)


def boundaries(segment_ids) -> tuple[jax.Array, jax.Array]:
    """``(reset [T] bool, real [T] bool)``: ``reset_t`` where a real token starts a document that is
    not the row's first; ``real_t = segment_ids_t != PAD``."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    T = seg.shape[0]
    real = seg != PAD
    idx = jnp.arange(T)
    last = jax.lax.cummax(jnp.where(real, idx, -1), axis=0)          # last real token <= t
    prev = jnp.concatenate([jnp.full((1,), -1, last.dtype), last[:-1]])  # last real token < t
    prev_seg = jnp.where(prev >= 0, seg[jnp.maximum(prev, 0)], PAD)
    return real & (prev_seg != PAD) & (seg != prev_seg), real


def document_ids(segment_ids) -> jax.Array:
    """``segment_ids [..., T]`` renumbered by :func:`boundaries`: the row's documents ``1, 2, ...`` in
    order, pads ``0``. Token mixers that compare ids (the convolution, attention) take these, so a
    document id that comes back later in a row (``[3, 3, 5, 3]``) is a new document there too."""
    seg = jnp.asarray(segment_ids, jnp.int32)
    if seg.ndim > 1:
        return jax.vmap(document_ids)(seg)
    reset, real = boundaries(seg)
    return jnp.where(real, jnp.cumsum(reset.astype(jnp.int32)) + 1, PAD)


def where_tree(c, a, b):
    """Leafwise ``where(c, a, b)`` (``c`` a scalar bool)."""
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def row_reset_state(spec, reset_state, state):
    """Packed rows (``MemoryState``s): the state a document restarts from, ``init_state(params)`` with an anchored
    retention's anchor ``z_*`` taken from the row's initial ``state``: a row has one anchor (equal to
    ``init_state(params)``'s unless ``initial_state`` was built from other params)."""
    return reset_state._replace(retention=spec.retention.with_anchor(
        reset_state.retention, spec.retention.anchor_of(state.retention)))
