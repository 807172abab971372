"""Fast chunked (mini-batch) XLA path: the semantics of ``reference.py`` as matmuls.

This module prepares one head's per-token arrays (learning rates, decay and momentum logs,
padding to whole chunks, the padding mask) and runs them through the one chunk forward,
``vjp.chunk_fwd``, whose docstring gives the algebra. Per chunk of ``c`` tokens every gradient is
taken at the chunk-start memory ``P``; with ``L_i = sum_{j<=i} log a_j``, ``D_ij = exp(L_i - L_j)``,
the state after token ``i`` is ``z_i = beta_i z_0 + gamma_i S_0 + sum_j C_ij g_j`` (GD:
``C = -D diag(lr)``, ``gamma = 0``; momentum: ``C = -D diag(mask) D^m diag(lr)``,
``gamma = D diag(mask) m_cum``), and the reads run the memory with every ``W_l h`` replaced by
that sum (batched matmuls). Retention ``chunk_mode``: "linear"; "scale" (Moneta: reads scaled by
``s(A_0)``, the token ending a full chunk by ``s(A_end)``); "lag" (Memora: token 0's exact step, the
rest linear from there). Channel-wise decay (``a: [k]``): matrix memory, GD. An anchored retention
runs the algebra on the deviation ``z - z_*``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax.engine.minibatch import vjp as chunked_vjp
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.minibatch.reference import pad_to_chunks
from miras_jax.engine.minibatch.decay import log_gate
from miras_jax.engine.tokens import MemoryState


def memorize_chunked(spec, state: MemoryState, q, k, v, gates: dict, chunk_size: int,
                     remat_every: int = 0, valid_len=None, vjp: str = "hand", segments=None,
                     segment_align: int = 0):
    """Mini-batch chunked form of one head: ``(y [T, v], final MemoryState)``.

    ``remat_every = R > 0`` checkpoints groups of ``R`` chunks: activation memory
    ``O(T / (c R))`` states plus one group's intermediates. ``valid_len`` (may be traced):
    only the first ``valid_len`` tokens are written (the rest are padding; their ``y`` is
    meaningless) — recurrent decoding runs a partly filled chunk this way. Every spec runs the one
    chunk forward ``vjp.chunk_fwd``, differentiated by its hand-written backward (``vjp="hand"``,
    where ``plan.hand_vjp_blocker`` names no blocker: GD, scalar decay) or by autodiff of that same
    forward (``"autodiff"``; always for channel-wise decay). ``segments = (reset [T],
    real [T], reset_state)``: packed rows, with ``reference.py``'s semantics at document starts;
    ``segment_align`` a multiple of ``chunk_size``: every document starts on the chunk grid (checked
    by the caller where the ids are concrete), so each chunk runs as one document (cheaper).
    """
    if vjp not in ("hand", "autodiff"):
        raise ValueError(f"vjp must be 'hand' or 'autodiff', got {vjp!r}")
    reason = plan_lib.minibatch_blocker(spec)
    if reason:
        raise NotImplementedError(reason)
    hp = spec.hparams
    mode = spec.retention.chunk_mode
    momentum = spec.optimizer.update_form == "momentum"
    T, c = q.shape[0], chunk_size
    group = max(remat_every, 1)
    n = -(-T // (c * group)) * group
    mask = (jnp.arange(n * c) < (T if valid_len is None else valid_len)).astype(q.dtype)
    reset = None
    if segments is not None:
        reset, real, reset_state = segments
        mask = mask * pad_to_chunks(real.astype(q.dtype), n * c)
        reset = pad_to_chunks(reset.astype(q.dtype), n * c)

    # per-token gate arrays (padded tokens: lr 0, decay 1, momentum 1)
    lr = jax.vmap(lambda g, k_i: spec.optimizer.lr(g, hp["optimizer"], k_i))(gates, k)
    a = spec.retention.decay_value(gates, hp["retention"])
    if a is None:
        a = jnp.ones((T,), q.dtype)
    elif jnp.ndim(a) == 0:
        a = jnp.full((T,), a, q.dtype)
    channel = a.ndim == 2
    if channel and (momentum or spec.memory.kind != "linear" or mode != "linear"):
        raise NotImplementedError("channel-wise decay in the chunked form needs a matrix memory, GD and "
                                  "a linear retention map")
    m = gates["momentum"] if momentum else jnp.ones((T,), q.dtype)
    q, k, v, gates, lr, a, m = pad_to_chunks((q, k, v, gates, lr, a, m), n * c)
    lr = lr * mask
    log_a = log_gate(jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)) > 0, a, 1.0))
    log_m = log_gate(jnp.where(mask > 0, m, 1.0))

    chunks = lambda x: x.reshape((n, c) + x.shape[1:])  # noqa: E731
    xs = chunked_vjp.ChunkIn(*jax.tree.map(chunks, (q, k, v, gates, lr, log_a)), mask[::c],
                             chunks(log_m) if momentum else None,
                             chunks(mask) if (momentum or reset is not None) else None,
                             None if reset is None else chunks(reset))
    autodiff = vjp == "autodiff" or plan_lib.hand_vjp_blocker(spec, channel) is not None
    y, P_end, A_end, S_end = chunked_vjp.memorize(spec, state, xs, remat_every, autodiff=autodiff,
                                                  reset_state=None if reset is None else reset_state,
                                                  aligned=segment_align > 0 and segment_align % c == 0)
    ret_state = state.retention
    if mode == "scale":
        ret_state = spec.retention.with_acc(ret_state, spec.memory.from_leaves(A_end))
    opt_state = spec.memory.from_leaves(S_end) if momentum else state.optimizer
    final = MemoryState(spec.memory.from_leaves(P_end), ret_state, opt_state)
    y = y.reshape((n * c,) + y.shape[2:])
    if segments is not None:   # pad tokens read 0
        y = jnp.where(mask[:, None] > 0, y, 0.0)
    return y[:T], final
