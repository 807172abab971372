"""``implementation="pallas"``: the translation of a spec + gates into kernel inputs. Which specs
the kernels cover, and their configuration, is the planner's (``plan.kernel_config``).

Matrix memory -> ``matrix_chunk``: the delta family (DeltaNet, Gated DeltaNet, Longhorn: exact
delta rule), the scalar-decay Hebbian family (linear attention, RetNet, Mamba2: exact), and
every other GD spec the mini-batch form runs (Moneta / Yaad / Memora with a matrix memory, ...),
and momentum (Titans), Muon and the Omega window (OmegaNet, Atlas) on a matrix memory with a plain
decay (``MatrixChunkConfig.atlas``: an Omega spec arrives with its windowed inputs, ``window.py``).
MLP memory ``x + LN(W_1 gelu(W_0 x))`` -> ``mlp_chunk``: Moneta, Yaad, Memora, TTT-MLP, Titans (momentum).
Anything else raises ``NotImplementedError`` with the reason (never a silent fallback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax.engine.minibatch import decay
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.tokens import MemoryState
from pallas_kernels import MatrixChunkConfig, Segments, Window, matrix_chunk, mlp_chunk, sharded


def _hparams(spec) -> dict:
    hp = {**spec.hparams["bias"], **spec.hparams["retention"]}
    return {k: hp[k] for k in ("p", "a", "eps", "delta_scale", "q", "norm_floor") if k in hp}


def run_batched(spec, state: MemoryState, q, k, v, gates: dict, *, chunk_size: int,
                interpret: bool | None = None, mesh=None, batch_axes="data", head_axes=None, segments=None):
    """One Pallas sweep over ``q, k: [B, T, H, k]``, ``v: [B, T, H, v]``, gates ``[B, T, H]``, with
    ``state`` leaves ``[B, H, ...]`` (float32, checked by the caller). Returns ``(y [B, T, H, v],
    MemoryState)``. With a ``mesh``, the kernel runs under ``shard_map`` with batch sharded over
    ``batch_axes`` and heads over ``head_axes``. ``segments = (reset [B, T], real [B, T],
    reset_state)`` (``engine/segments.py``; ``reset_state`` leaves ``[B, H, ...]``): packed rows, the
    kernels' ``Segments`` (memory and, for l_q, accumulator of the reset state; the anchor and the
    optimizer state are the ones of ``state``, as in the XLA path)."""
    bh = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731   [B, T, H, ...] -> [B, H, T, ...]
    qh, kh, vh = bh(q), bh(k), bh(v)
    g = {name: bh(x) for name, x in gates.items()}
    channel = g.get("decay") is not None and g["decay"].ndim == 4
    cfg = plan_lib.kernel_config(spec, chunk_size, channel)
    if isinstance(cfg, MatrixChunkConfig) and cfg.atlas:
        return _run_atlas(spec, cfg, state, qh, kh, vh, g, interpret, mesh, batch_axes, head_axes, segments)
    hp = spec.hparams
    per_tok = jax.vmap(jax.vmap(jax.vmap(lambda gt, kt: spec.optimizer.lr(gt, hp["optimizer"], kt))))
    lr = per_tok(g, kh)                                                             # [B, H, T]
    a = spec.retention.decay_value(g, hp["retention"])
    log_decay = None if a is None else decay.log_gate(a if channel else jnp.broadcast_to(a, lr.shape))
    gate = g.get("delta")
    hps = _hparams(spec)
    mode = getattr(cfg, "retention", "linear")
    ret = spec.retention
    mem = spec.memory.leaves(state.memory)
    acc = spec.memory.leaves(ret.acc(state.retention)) if mode == "scale" else None
    anc = None if ret.anchor_of(state.retention) is None else spec.memory.leaves(ret.anchor_of(state.retention))
    mom = getattr(cfg, "momentum", False)   # the MLP kernel's (the matrix one's: _run_atlas)
    log_m = decay.log_gate(g["momentum"]) if mom else None
    S = spec.memory.leaves(state.optimizer) if mom else None
    seg = None
    if segments is not None:
        reset, real, reset_state = segments
        B, H = lr.shape[:2]
        rows = lambda x: jnp.broadcast_to(x[:, None, :], (B, H, x.shape[-1]))  # noqa: E731   [B, T] -> [B, H, T]
        seg = (rows(reset), rows(real), spec.memory.leaves(reset_state.memory),
               spec.memory.leaves(ret.acc(reset_state.retention)) if mode == "scale" else None,
               spec.memory.leaves(reset_state.optimizer) if mom else None)

    def kernel(qh, kh, vh, lr, log_decay, mem, acc, anc, gate, seg, hps, log_m, S):
        if isinstance(cfg, MatrixChunkConfig):
            packed = None if seg is None else Segments(seg[0], seg[1], seg[2][0],
                                                       None if seg[3] is None else seg[3][0])
            y, st = matrix_chunk(qh, kh, vh, lr, mem[0], log_decay, None if acc is None else acc[0], gate, hps,
                                 config=cfg, interpret=interpret, segments=packed)
            return y, [st.memory], None if st.accumulator is None else [st.accumulator], None
        packed = None if seg is None else Segments(seg[0], seg[1], tuple(seg[2]),
                                                   None if seg[3] is None else tuple(seg[3]),
                                                   None if seg[4] is None else tuple(seg[4]))
        y, st = mlp_chunk(qh, kh, vh, lr, tuple(mem), log_decay, None if acc is None else tuple(acc), gate, hps,
                          None if anc is None else tuple(anc), config=cfg, interpret=interpret, segments=packed,
                          log_momentum=log_m, s0=None if S is None else tuple(S))
        return (y, list(st.memory), None if st.accumulator is None else list(st.accumulator),
                None if st.momentum is None else list(st.momentum))

    if mesh is not None:
        kernel = sharded(kernel, mesh, batch_axes, head_axes, replicated=("hps",))
    y, new_mem, new_acc, new_s = kernel(qh, kh, vh, lr, log_decay, mem, acc, anc, gate, seg, hps, log_m, S)
    memory = spec.memory.from_leaves(new_mem)
    ret_state = state.retention
    if mode == "scale":
        ret_state = ret.with_acc(ret_state, spec.memory.from_leaves(new_acc))
    return bh(y), MemoryState(memory, ret_state, spec.memory.from_leaves(new_s) if mom else state.optimizer)


def _run_atlas(spec, cfg, state: MemoryState, qh, kh, vh, g: dict, interpret, mesh, batch_axes, head_axes, segments):
    """``run_batched`` for momentum / Muon / an Omega window (``[B, H, T, ...]`` inputs; an Omega spec's
    ``k``, ``v`` and bias gates windowed ``[B, H, T, w, ...]``: the kernel takes each token's own
    (slot ``w - 1``), the weights ``omega [B, H, T, w]`` and the first token's ``w - 1`` predecessors)."""
    hp = spec.hparams
    win = None
    gate = g.get("delta")
    if cfg.window is not None:
        own = lambda x: x[:, :, :, -1]  # noqa: E731
        halo = lambda x: x[:, :, 0, :-1]  # noqa: E731
        win = Window(g["omega"], halo(kh), halo(vh), None if gate is None else halo(gate))
        kh, vh = own(kh), own(vh)
        gate = None if gate is None else own(gate)
    per_tok = jax.vmap(jax.vmap(jax.vmap(lambda gt, kt: spec.optimizer.lr(gt, hp["optimizer"], kt))))
    lr = per_tok({n: x for n, x in g.items() if n != "omega"}, kh)                   # [B, H, T]
    a = spec.retention.decay_value(g, hp["retention"])
    log_decay = None if a is None else decay.log_gate(jnp.broadcast_to(a, lr.shape))
    mom = cfg.optimizer != "gd"
    log_m = decay.log_gate(g["momentum"]) if mom else None
    W = spec.memory.leaves(state.memory)[0]
    S = spec.memory.leaves(state.optimizer)[0] if mom else None
    hps = _hparams(spec)
    seg = None
    if segments is not None:
        reset, real, reset_state = segments
        rows = lambda x: jnp.broadcast_to(x[:, None, :], lr.shape)  # noqa: E731   [B, T] -> [B, H, T]
        seg = Segments(rows(reset), rows(real), spec.memory.leaves(reset_state.memory)[0], None,
                       spec.memory.leaves(reset_state.optimizer)[0] if mom else None)

    def kernel(qh, kh, vh, lr, log_decay, W, gate, seg, log_m, S, win, hps):
        y, st = matrix_chunk(qh, kh, vh, lr, W, log_decay, None, gate, hps, config=cfg, interpret=interpret,
                             segments=seg, log_momentum=log_m, s0=S, window=win)
        return y, st.memory, st.momentum

    if mesh is not None:
        kernel = sharded(kernel, mesh, batch_axes, head_axes, replicated=("hps",))
    y, W_new, S_new = kernel(qh, kh, vh, lr, log_decay, W, gate, seg, log_m, S, win, hps)
    opt_state = spec.memory.from_leaves([S_new]) if mom else state.optimizer
    return jnp.swapaxes(y, 1, 2), MemoryState(spec.memory.from_leaves([W_new]), state.retention, opt_state)
