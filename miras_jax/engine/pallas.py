"""``implementation="pallas"``: which specs the Pallas kernels (``pallas_kernels/``) cover, and
the translation of a spec + gates into kernel inputs.

Matrix memory -> ``matrix_chunk``: the delta family (DeltaNet, Gated DeltaNet, Longhorn: exact
delta rule), the scalar-decay Hebbian family (linear attention, RetNet, Mamba2: exact), and
every other GD spec the mini-batch form runs (Moneta / Yaad / Memora with a matrix memory, ...).
MLP memory ``x + LN(W_1 gelu(W_0 x))`` -> ``mlp_chunk``: Moneta, Yaad, Memora, TTT-MLP.
Anything else raises ``NotImplementedError`` with the reason (never a silent fallback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax import bias as bias_lib
from miras_jax import inner_opt
from miras_jax import retention as ret_lib
from miras_jax.engine import chunked, dispatch
from miras_jax.engine.reference import MemoryState
from pallas_kernels import MatrixChunkConfig, MLPChunkConfig, matrix_chunk, mlp_chunk, sharded

_RETENTION_MODES = {ret_lib.Retention: "linear", ret_lib.LqRetention: "scale", ret_lib.KLRetention: "lag"}


def _residual(spec) -> tuple[str, bool]:
    b = spec.bias
    if isinstance(b, bias_lib.DotBias):
        return "dot", True
    if isinstance(b, bias_lib.L2Bias):
        return "l2", True
    if isinstance(b, bias_lib.L1Bias):
        return "l1", b.smooth
    if isinstance(b, bias_lib.LpBias):
        return "lp", b.smooth
    if isinstance(b, bias_lib.HuberBias):
        return f"huber_{b.form}", b.smooth
    raise NotImplementedError(f"bias {type(b).__name__} has no Pallas residual map")


def kernel_config(spec, chunk_size: int, channel: bool = False):
    """``MatrixChunkConfig`` / ``MLPChunkConfig`` for ``spec`` (``channel``: the decay gate is
    channel-wise ``[T, k]``), or ``NotImplementedError(reason)``."""
    if spec.retention.anchor and spec.memory.kind != "mlp":
        raise NotImplementedError("an anchored retention (decay toward W_0) has a Pallas kernel for the "
                                  "MLP memory only")
    family = dispatch.exact_family(spec)
    mem = spec.memory
    if channel:
        if mem.kind != "linear" or family == "delta" or type(spec.retention) is not ret_lib.Retention:
            raise NotImplementedError("channel-wise decay runs on the matrix-memory kernel with "
                                      "gradient-descent, linear-retention specs only (GLA-like)")
        residual, smooth = _residual(spec)
        return MatrixChunkConfig(mode="minibatch", residual=residual, smooth=smooth, channel=True,
                                 chunk_size=min(chunk_size, dispatch.CHANNEL_CHUNK))
    if family == "delta":
        if spec.num_steps != 1:
            raise NotImplementedError("several inner steps per token (DeltaProduct) have no Pallas kernel")
        return MatrixChunkConfig(mode="delta", residual="l2", chunk_size=min(chunk_size, dispatch.DELTA_CHUNK))
    if family == "hebbian":
        return MatrixChunkConfig(mode="minibatch", residual="dot", chunk_size=chunk_size)
    reason = chunked.supports(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    if type(spec.optimizer) not in (inner_opt.GD, inner_opt.ImplicitGD):
        raise NotImplementedError(f"optimizer {spec.optimizer.name!r} has no Pallas kernel (GD only)")
    mode = _RETENTION_MODES.get(type(spec.retention))
    if mode is None:
        raise NotImplementedError(f"retention {spec.retention.name!r} has no Pallas kernel "
                                  f"(supported: none, decay, lq, kl)")
    residual, smooth = _residual(spec)
    c = getattr(spec.retention, "c", None)
    if mem.kind == "linear":
        return MatrixChunkConfig(mode="minibatch", residual=residual, smooth=smooth, retention=mode,
                                 simplex_c=c, chunk_size=chunk_size)
    if not (mem.depth == 2 and mem.residual and mem.layer_norm and mem.activation == "gelu"):
        raise NotImplementedError("the Pallas MLP kernel covers the Miras memory x + LN(W_1 gelu(W_0 x)) "
                                  f"only, got {mem}")
    return MLPChunkConfig(residual=residual, smooth=smooth, retention=mode, simplex_c=c, chunk_size=chunk_size,
                          anchor=spec.retention.anchor)


def supports(spec) -> str | None:
    """``None`` if a Pallas kernel runs ``spec``, else the reason it doesn't."""
    try:
        kernel_config(spec, 64)
    except NotImplementedError as e:
        return str(e)
    return None


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
    cfg = kernel_config(spec, chunk_size, channel)
    hp = spec.hparams
    per_tok = jax.vmap(jax.vmap(jax.vmap(lambda gt, kt: spec.optimizer.lr(gt, hp["optimizer"], kt))))
    lr = per_tok(g, kh)                                                             # [B, H, T]
    a = spec.retention.decay_value(g, hp["retention"])
    log_decay = None if a is None else chunked.log_gate(a if channel else jnp.broadcast_to(a, lr.shape))
    gate = g.get("delta")
    hps = _hparams(spec)
    mode = getattr(cfg, "retention", "linear")
    ret = spec.retention
    mem = spec.memory.leaves(state.memory)
    acc = spec.memory.leaves(ret.acc(state.retention)) if mode == "scale" else None
    anc = None if ret.anchor_of(state.retention) is None else spec.memory.leaves(ret.anchor_of(state.retention))

    def kernel(qh, kh, vh, lr, log_decay, mem, acc, anc, gate, hps):
        if isinstance(cfg, MatrixChunkConfig):
            y, st = matrix_chunk(qh, kh, vh, lr, log_decay, mem[0], None if acc is None else acc[0], gate, hps,
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
