"""``implementation="pallas"``: the translation of a spec + gates into kernel inputs. Which specs
the kernels cover, and their configuration, is the planner's (``plan.kernel_config``).

Matrix memory -> ``matrix_chunk``: the delta family (DeltaNet, Gated DeltaNet, Longhorn: exact
delta rule), the scalar-decay Hebbian family (linear attention, RetNet, Mamba2: exact), and
every other GD spec the mini-batch form runs (Moneta / Yaad / Memora with a matrix memory, ...).
MLP memory ``x + LN(W_1 gelu(W_0 x))`` -> ``mlp_chunk``: Moneta, Yaad, Memora, TTT-MLP.
Anything else raises ``NotImplementedError`` with the reason (never a silent fallback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax.engine.minibatch import decay
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.tokens import MemoryState
from pallas_kernels import MatrixChunkConfig, matrix_chunk, mlp_chunk, sharded


def _hparams(spec) -> dict:
    hp = {**spec.hparams["bias"], **spec.hparams["retention"]}
    return {k: hp[k] for k in ("p", "a", "eps", "delta_scale", "q", "norm_floor") if k in hp}


def run_batched(spec, state: MemoryState, q, k, v, gates: dict, *, chunk_size: int,
                interpret: bool | None = None, mesh=None, batch_axes="data", head_axes=None):
    """One Pallas sweep over ``q, k: [B, T, H, k]``, ``v: [B, T, H, v]``, gates ``[B, T, H]``, with
    ``state`` leaves ``[B, H, ...]`` (float32, checked by the caller). Returns ``(y [B, T, H, v],
    MemoryState)``. With a ``mesh``, the kernel runs under ``shard_map`` with batch sharded over
    ``batch_axes`` and heads over ``head_axes``."""
    bh = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731   [B, T, H, ...] -> [B, H, T, ...]
    qh, kh, vh = bh(q), bh(k), bh(v)
    g = {name: bh(x) for name, x in gates.items()}
    channel = g.get("decay") is not None and g["decay"].ndim == 4
    cfg = plan_lib.kernel_config(spec, chunk_size, channel)
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

    def kernel(qh, kh, vh, lr, log_decay, mem, acc, anc, gate, hps):
        if isinstance(cfg, MatrixChunkConfig):
            y, st = matrix_chunk(qh, kh, vh, lr, mem[0], log_decay, None if acc is None else acc[0], gate, hps,
                                 config=cfg, interpret=interpret)
            return y, [st.memory], None if st.accumulator is None else [st.accumulator]
        y, st = mlp_chunk(qh, kh, vh, lr, tuple(mem), log_decay, None if acc is None else tuple(acc), gate, hps,
                          None if anc is None else tuple(anc), config=cfg, interpret=interpret)
        return y, list(st.memory), None if st.accumulator is None else list(st.accumulator)

    if mesh is not None:
        kernel = sharded(kernel, mesh, batch_axes, head_axes, replicated=("hps",))
    y, new_mem, new_acc = kernel(qh, kh, vh, lr, log_decay, mem, acc, anc, gate, hps)
    memory = spec.memory.from_leaves(new_mem)
    ret_state = state.retention
    if mode == "scale":
        ret_state = ret.with_acc(ret_state, spec.memory.from_leaves(new_acc))
    return bh(y), MemoryState(memory, ret_state, state.optimizer)
