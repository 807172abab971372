"""Enter a kernel through ``shard_map``: every (batch, head) row is independent, so each device
runs the kernel on its own ``[B / b, H / h]`` block, with no communication."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P


def sharded(fn, mesh, batch_axes="data", head_axes=None, replicated=()):
    """``fn(*args)`` under ``shard_map`` on ``mesh``: array leaves with ``ndim >= 2`` lead with
    ``[B, H]`` and are split ``P(batch_axes, head_axes)``; scalars (hyper-parameters) are
    replicated; every output leads with ``[B, H]``. ``replicated`` is documentation only (names of
    the scalar arguments)."""
    del replicated
    rows = P(batch_axes, head_axes)

    def call(*args):
        in_specs = jax.tree.map(lambda x: rows if jax.numpy.ndim(x) >= 2 else P(), args)
        out_shape = jax.eval_shape(fn, *args)
        out_specs = jax.tree.map(lambda _: rows, out_shape)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    return call
