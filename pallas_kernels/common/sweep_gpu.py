"""GPU (Triton) chunk sweeps: one program per row (batch x head), a ``fori_loop`` over its chunks
with the state in registers. Same contract as ``sweep_tpu`` (see its docstring): Triton runs grid
programs in parallel, so the sequential chunk axis is a loop inside the program. Every loaded
block (``[r, w]``, states ``[a, b]``) must have power-of-two sides (``config.py`` checks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common.refs import split


def _row_spec(shape):            # [R, ...] -> one row
    return pl.BlockSpec((None,) + tuple(shape[1:]), lambda i: (i,) + (0,) * (len(shape) - 1))


def _const_spec(shape):
    return pl.BlockSpec(tuple(shape), lambda i: (0,) * len(shape))


def _params(num_warps):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=1)


def forward(fn, state0, xs, consts, out_shapes, *, interpret: bool, cost=None, save_states: bool = True,
            num_warps: int = 4, rconsts=()):
    """See ``sweep_tpu.forward``."""
    R, n = xs[0].shape[:2]
    ns, nx, nc, nr, no = len(state0), len(xs), len(consts), len(rconsts), len(out_shapes)
    nst = ns if save_states else 0

    def kernel(*refs):
        s0, x, k, rk, outs, fins, starts, _ = split(refs, ns, nx, nc, nr, no, ns, nst)
        kv = tuple(r[...] for r in k + rk)

        def body(c, state):
            for r, s in zip(starts, state):
                r[c] = s
            new, ys = fn(state, tuple(r[c] for r in x), kv)
            for r, y in zip(outs, ys):
                r[c] = y.astype(r.dtype)
            return tuple(new)

        final = jax.lax.fori_loop(0, n, body, tuple(r[...] for r in s0))
        for r, v in zip(fins, final):
            r[...] = v

    out_shape = (
        [jax.ShapeDtypeStruct((R, n) + tuple(s), jnp.float32) for s in out_shapes]
        + [jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in state0]
        + [jax.ShapeDtypeStruct((R, n) + s.shape[1:], jnp.float32) for s in state0[:nst]])
    res = pl.pallas_call(
        kernel, grid=(R,), out_shape=out_shape,
        in_specs=[_row_spec(s.shape) for s in state0] + [_row_spec(x.shape) for x in xs]
        + [_const_spec(k.shape) for k in consts] + [_row_spec(r.shape) for r in rconsts],
        out_specs=[_row_spec(s.shape) for s in out_shape],
        compiler_params=_params(num_warps), interpret=interpret, cost_estimate=cost,
        name="chunk_sweep_fwd",
    )(*state0, *xs, *consts, *rconsts)
    return tuple(res[:no]), tuple(res[no:no + ns]), tuple(res[no + ns:])


def backward(fn, starts, xs, consts, d_outs, d_final, *, interpret: bool, cost=None, num_warps: int = 4,
             rconsts=()):
    """See ``sweep_tpu.backward``."""
    R, n = xs[0].shape[:2]
    ns, nx, nc, nr, no = len(starts), len(xs), len(consts), len(rconsts), len(d_outs)

    def kernel(*refs):
        st, x, k, rk, dy, dfin, dxs, ds0, dks = split(refs, ns, nx, nc, nr, no, ns, nx, ns)
        kv = tuple(r[...] for r in k + rk)

        def body(i, carry):
            d_state, d_acc = carry
            c = n - 1 - i
            _, vjp = jax.vjp(fn, tuple(r[c] for r in st), tuple(r[c] for r in x), kv)
            d_state, d_x, d_k = vjp((d_state, tuple(r[c] for r in dy)))
            for r, g in zip(dxs, d_x):
                r[c] = g
            return tuple(d_state), tuple(a + g for a, g in zip(d_acc, d_k))

        d_state, d_acc = jax.lax.fori_loop(
            0, n, body, (tuple(r[...] for r in dfin), tuple(jnp.zeros(v.shape, jnp.float32) for v in kv)))
        for r, g in zip(ds0, d_state):
            r[...] = g
        for r, g in zip(dks, d_acc):   # the shared constants' then the row constants'
            r[...] = g

    out_shape = ([jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in xs]
                 + [jax.ShapeDtypeStruct((R,) + s.shape[2:], jnp.float32) for s in starts]
                 + [jax.ShapeDtypeStruct((R,) + k.shape, jnp.float32) for k in consts]
                 + [jax.ShapeDtypeStruct(r.shape, jnp.float32) for r in rconsts])
    res = pl.pallas_call(
        kernel, grid=(R,), out_shape=out_shape,
        in_specs=[_row_spec(s.shape) for s in starts] + [_row_spec(x.shape) for x in xs]
        + [_const_spec(k.shape) for k in consts] + [_row_spec(r.shape) for r in rconsts]
        + [_row_spec(d.shape) for d in d_outs] + [_row_spec(d.shape) for d in d_final],
        out_specs=[_row_spec(s.shape) for s in out_shape],
        compiler_params=_params(num_warps), interpret=interpret, cost_estimate=cost,
        name="chunk_sweep_bwd",
    )(*starts, *xs, *consts, *rconsts, *d_outs, *d_final)
    m = nx + ns + nc
    return tuple(res[:nx]), tuple(res[nx:nx + ns]), tuple(res[nx + ns:m]), tuple(res[m:])
