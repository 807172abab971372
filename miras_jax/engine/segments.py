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
