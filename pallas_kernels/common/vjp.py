"""``chunk_sweep``: a chunk function swept over every row's chunks, differentiable.

``jax.custom_vjp`` around the forward sweep (which also stores every chunk-start state) and
the reverse sweep (which walks the chunks last to first carrying ``dL/dstate`` and takes each
chunk's local VJP at its stored start state). Reverse-mode autodiff through a raw
``pallas_call`` is not possible, so this is the only way gradients reach the inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import platform


def _cost(flops, transcendentals, arrays):
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(arrays))
    return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals), bytes_accessed=nbytes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def chunk_sweep(fn, out_shapes, cost, backend, interpret, state0, xs, consts, rconsts=()):
    """``(outs [R, n, r, w] each, final state [R, a, b] each)`` of sweeping ``fn`` (see
    ``sweep_tpu``). ``cost = (flops, transcendentals)`` of one chunk, forward; ``backend`` /
    ``interpret`` as in ``platform.dispatch``; ``rconsts``: row constants ``[R, a, b]`` (``fn`` sees
    them after ``consts``; ``()``: the same kernels as without)."""
    outs, final, _ = _forward(fn, out_shapes, cost, backend, interpret, state0, xs, consts, rconsts,
                              save_states=False)
    return outs, final


def _forward(fn, out_shapes, cost, backend, interpret, state0, xs, consts, rconsts, save_states=True):
    R, n = xs[0].shape[:2]

    def call(b, i):
        est = _cost(cost[0] * R * n, cost[1] * R * n, (state0, xs, consts, rconsts))
        return platform.sweeps(b).forward(fn, state0, xs, consts, out_shapes, interpret=i, cost=est,
                                          save_states=save_states, rconsts=rconsts)

    return platform.dispatch(call, backend=backend, interpret=interpret)


def _fwd(fn, out_shapes, cost, backend, interpret, state0, xs, consts, rconsts):
    outs, final, starts = _forward(fn, out_shapes, cost, backend, interpret, state0, xs, consts, rconsts)
    return (outs, final), (starts, xs, consts, rconsts)


def _bwd(fn, out_shapes, cost, backend, interpret, res, cts):
    starts, xs, consts, rconsts = res
    d_outs, d_final = cts
    d_outs = tuple(d.astype(jnp.float32) for d in d_outs)
    d_final = tuple(d.astype(jnp.float32) for d in d_final)
    R, n = xs[0].shape[:2]

    def call(b, i):
        # the reverse sweep recomputes each chunk's forward and differentiates it: ~3x its flops
        est = _cost(3 * cost[0] * R * n, 2 * cost[1] * R * n, (starts, xs, consts, rconsts, d_outs))
        return platform.sweeps(b).backward(fn, starts, xs, consts, d_outs, d_final, interpret=i, cost=est,
                                           rconsts=rconsts)

    d_xs, d_state0, d_consts, d_rconsts = platform.dispatch(call, backend=backend, interpret=interpret)
    return d_state0, d_xs, tuple(jnp.sum(d, axis=0) for d in d_consts), d_rconsts


chunk_sweep.defvjp(_fwd, _bwd)
