"""TPU (Mosaic) chunk sweeps: grid ``(rows, chunks)``, the chunk axis sequential ("arbitrary"),
the carried state in VMEM scratch.

A *chunk function* ``fn(state, xs, consts) -> (new_state, outs)`` maps tuples of 2-D float32
arrays: ``state`` entries ``[a, b]`` (the memory), ``xs`` one chunk of each per-chunk input
(``[r, w]``, e.g. ``q: [c, k]`` or a row of gates ``[1, c]``), ``consts`` arrays shared by every
row and chunk (hyper-parameters, ``[1, 1]``), followed by the *row constants* ``rconsts`` (one
``[a, b]`` per row, the same for every chunk of it: packed rows' reset state). Inputs are laid out
``[R, n, r, w]`` (``R`` rows = batch x heads, ``n`` chunks), states and row constants ``[R, a, b]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.refs import split


def _row_spec(shape):          # [R, a, b] -> one row's [a, b]
    return pl.BlockSpec((None,) + tuple(shape[1:]), lambda i, c: (i, 0, 0))


def _chunk_spec(shape, reverse=False):   # [R, n, r, w] -> one chunk's [r, w]
    n = shape[1]
    if reverse:
        return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda i, c: (i, n - 1 - c, 0, 0))
    return pl.BlockSpec((None, None) + tuple(shape[2:]), lambda i, c: (i, c, 0, 0))


def _const_spec(shape):
    return pl.BlockSpec(tuple(shape), lambda i, c: (0,) * len(shape))


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def forward(fn, state0, xs, consts, out_shapes, *, interpret: bool, cost=None, save_states: bool = True,
            rconsts=()):
    """Run ``fn`` over the chunks of every row. Returns ``(outs [R, n, r, w] each,
    final state [R, a, b] each, chunk-start states [R, n, a, b] each)``; the chunk-start states
    (the backward's residuals) only with ``save_states`` (else ``()``). ``fn`` sees
    ``consts + rconsts`` (row constants ``[R, a, b]``: this row's ``[a, b]``)."""
    R, n = xs[0].shape[:2]
    ns, nx, nc, nr, no = len(state0), len(xs), len(consts), len(rconsts), len(out_shapes)
    nst = ns if save_states else 0

    def kernel(*refs):
        s0, x, k, rk, outs, fins, starts, scratch = split(refs, ns, nx, nc, nr, no, ns, nst)
        c = pl.program_id(1)

        @pl.when(c == 0)
        def _():
            for s, r in zip(scratch, s0):
                s[...] = r[...]

        state = tuple(s[...] for s in scratch)
        for r, s in zip(starts, state):
            r[...] = s
        new, ys = fn(state, tuple(r[...] for r in x), tuple(r[...] for r in k + rk))
        for r, y in zip(outs, ys):
            r[...] = y.astype(r.dtype)
        for s, v in zip(scratch, new):
            s[...] = v

        @pl.when(c == n - 1)
        def _():
            for r, v in zip(fins, new):
                r[...] = v

    out_shape = (
        [jax.ShapeDtypeStruct((R, n) + tuple(s), jnp.float32) for s in out_shapes]
        + [jax.ShapeDtypeStruct(s.shape, jnp.float32) for s in state0]
        + [jax.ShapeDtypeStruct((R, n) + s.shape[1:], jnp.float32) for s in state0[:nst]])
    out_specs = ([_chunk_spec((R, n) + tuple(s)) for s in out_shapes] + [_row_spec(s.shape) for s in state0]
                 + [_chunk_spec((R, n) + s.shape[1:]) for s in state0[:nst]])
    res = pl.pallas_call(
        kernel, grid=(R, n), out_shape=out_shape,
        in_specs=[_row_spec(s.shape) for s in state0] + [_chunk_spec(x.shape) for x in xs]
        + [_const_spec(k.shape) for k in consts] + [_row_spec(r.shape) for r in rconsts],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(s.shape[1:], jnp.float32) for s in state0],
        compiler_params=_params(), interpret=interpret, cost_estimate=cost,
        name="chunk_sweep_fwd",
    )(*state0, *xs, *consts, *rconsts)
    return tuple(res[:no]), tuple(res[no:no + ns]), tuple(res[no + ns:])


def backward(fn, starts, xs, consts, d_outs, d_final, *, interpret: bool, cost=None, rconsts=()):
    """Reverse sweep: walks the chunks last to first, carrying ``dL/dstate`` in scratch; each
    chunk's local VJP is ``jax.vjp(fn)`` at its stored chunk-start state. Returns
    ``(d_xs [R, n, r, w] each, d_state0 [R, a, b] each, d_consts [R, *shape] each,
    d_rconsts [R, a, b] each)`` (``d_consts`` and ``d_rconsts`` summed over chunks, per row)."""
    R, n = xs[0].shape[:2]
    ns, nx, nc, nr, no = len(starts), len(xs), len(consts), len(rconsts), len(d_outs)

    def kernel(*refs):
        st, x, k, rk, dy, dfin, dxs, ds0, dks, drks, dcarry, dkacc, drkacc = split(
            refs, ns, nx, nc, nr, no, ns, nx, ns, nc, nr, ns, nc)
        c = pl.program_id(1)

        @pl.when(c == 0)
        def _():
            for s, r in zip(dcarry, dfin):
                s[...] = r[...]
            for s in dkacc + drkacc:
                s[...] = jnp.zeros(s.shape, s.dtype)

        state = tuple(r[...] for r in st)
        xv = tuple(r[...] for r in x)
        kv = tuple(r[...] for r in k + rk)
        _, vjp = jax.vjp(fn, state, xv, kv)
        d_state, d_x, d_k = vjp((tuple(s[...] for s in dcarry), tuple(r[...] for r in dy)))
        for r, g in zip(dxs, d_x):
            r[...] = g
        for s, g in zip(dcarry, d_state):
            s[...] = g
        for s, g in zip(dkacc + drkacc, d_k):
            s[...] += g

        @pl.when(c == n - 1)
        def _():
            for r, s in zip(ds0, dcarry):
                r[...] = s[...]
            for r, s in zip(dks + drks, dkacc + drkacc):
                r[...] = s[...]

    out_shape = ([jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in xs]
                 + [jax.ShapeDtypeStruct((R,) + s.shape[2:], jnp.float32) for s in starts]
                 + [jax.ShapeDtypeStruct((R,) + k.shape, jnp.float32) for k in consts]
                 + [jax.ShapeDtypeStruct(r.shape, jnp.float32) for r in rconsts])
    out_specs = ([_chunk_spec(x.shape, True) for x in xs]
                 + [_row_spec((R,) + s.shape[2:]) for s in starts]
                 + [_row_spec((R,) + k.shape) for k in consts]
                 + [_row_spec(r.shape) for r in rconsts])
    res = pl.pallas_call(
        kernel, grid=(R, n), out_shape=out_shape,
        in_specs=[_chunk_spec(s.shape, True) for s in starts] + [_chunk_spec(x.shape, True) for x in xs]
        + [_const_spec(k.shape) for k in consts] + [_row_spec(r.shape) for r in rconsts]
        + [_chunk_spec(d.shape, True) for d in d_outs] + [_row_spec(d.shape) for d in d_final],
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(s.shape[2:], jnp.float32) for s in starts]
        + [pltpu.VMEM(k.shape, jnp.float32) for k in consts]
        + [pltpu.VMEM(r.shape[1:], jnp.float32) for r in rconsts],
        compiler_params=_params(), interpret=interpret, cost_estimate=cost,
        name="chunk_sweep_bwd",
    )(*starts, *xs, *consts, *rconsts, *d_outs, *d_final)
    m = nx + ns + nc
    return tuple(res[:nx]), tuple(res[nx:nx + ns]), tuple(res[nx + ns:m]), tuple(res[m:])

