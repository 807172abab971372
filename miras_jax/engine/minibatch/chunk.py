"""Fast chunked (mini-batch) XLA path: the semantics of ``reference.py`` as matmuls.

Per chunk of ``c`` tokens (one head), with every gradient taken at the chunk-start memory ``P``:

1. factors: ``grad_{W_l} l_i = delta_{il} in_{il}^T`` for every weight ``l`` (``memory.token_factors``,
   vmapped over the chunk; never materialised as ``[c, out, in]``);
2. coefficients: with ``L_i = sum_{j<=i} log a_j``, ``R_ij = exp(L_i - L_j)`` (``j <= i``), the
   dual state after token ``i`` is ``z_i = beta_i z_0 + gamma_i S_0 + sum_j C_ij delta_j in_j^T``
   where for GD ``C_ij = -R_ij eta_j`` and for momentum ``C = -R diag(mask) R^m diag(eta)``
   (``R^m`` built from the momentum gates; ``gamma = R diag(mask) m_cum``);
3. reads (dual form): ``M_{W_i}(q_i)`` runs the memory with every matmul ``W_l h`` replaced by
   ``beta_i z_{0,l} h + gamma_i S_{0,l} h + sum_j C_ij delta_jl (in_jl . h)`` — batched matmuls;
4. the chunk-end state ``z_c`` from row ``c`` of the same coefficients.

Retention ``chunk_mode``: "linear" as above; "scale" (Moneta) multiplies the reads of weight
``l`` by ``s(A_0)`` (the token that ends a full chunk by ``s(A_end)``); "lag" (Memora) takes the exact
step for token 0 and runs the above from that state for the rest of the chunk.
Channel-wise decay (``a: [k]``) is supported for matrix memory with GD.
An anchored retention (``z_i = a_i z_{i-1} + (1 - a_i) z_* + u_i``) runs the same algebra on the
deviation ``z - z_*``: ``base`` becomes ``z_0 - z_*`` and every read / end state adds ``z_*``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax import memory as memory_lib
from miras_jax.engine.minibatch import vjp as chunked_vjp
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.minibatch.reference import pad_to_chunks
from miras_jax.engine.minibatch.decay import coefficients, decay_matrix, log_gate
from miras_jax.engine.tokens import MemoryState


def _coefficients(log_a, lr, mask, log_m):
    """Dual-state coefficients of one chunk (scalar decay).

    Returns ``beta [c]``, ``C [c, c]`` (``z_i = beta_i z_0 + gamma_i S_0 + sum_j C_ij g_j``
    with ``g_j`` the raw gradient), ``gamma [c]`` and, for momentum, ``(m_end, Cs_end [c])``
    with ``S_end = m_end S_0 + sum_j Cs_end_j g_j``.
    """
    R = decay_matrix(log_a)
    if log_m is None:
        C, beta = coefficients(lr, log_a, R)
        return beta, C, None, None
    beta = jnp.exp(jnp.cumsum(log_a))
    Rm = decay_matrix(log_m)
    Rmask = R * mask[None, :]
    m_cum = jnp.exp(jnp.cumsum(log_m))
    C = -(Rmask @ Rm) * lr[None, :]
    gamma = Rmask @ m_cum
    return beta, C, gamma, (m_cum[-1], -Rm[-1] * lr)


def _outer_sum(delta, inp, w):
    """``sum_j w_j delta_j in_j^T``: ``[c, out], [c, in], [c] -> [out, in]``."""
    return jnp.einsum("co,c,ci->oi", delta, w, inp)


def chunk_step(spec, mode: str, momentum: bool, channel: bool, carry, xs):
    """One chunk: ``((state, s), chunk inputs) -> ((state, s), y [c, v])``; see the module docstring.

    ``s`` is ``()`` except in "scale" mode, where it carries ``s(A)`` of every weight from the
    previous chunk's end (so each chunk evaluates the l_q norm once, not twice).
    """
    st, s_prev = carry
    hp = spec.hparams
    mem, ret = spec.memory, spec.retention
    q, k, v, gates, lr, log_a, log_m, mask, last = xs
    P = st.memory

    def factors(k_i, v_i, g_i):
        return memory_lib.token_factors(
            mem, P, k_i, lambda pred: spec.bias.residual_map(pred, v_i, hp["bias"], g_i))

    _, deltas, inputs = jax.vmap(factors)(k, v, gates)

    z_anchor = ret.anchor_of(st.retention)
    if mode == "lag":
        # token 0 takes the exact step from P; the rest of the chunk is linear from there.
        u0 = [-lr[0] * jnp.outer(d[0], x[0]) for d, x in zip(deltas, inputs)]
        a0 = jnp.exp(log_a[0])
        W1, _ = ret.step(ret.project(P), st.retention, mem.from_leaves(u0), a0, hp["retention"])
        W1 = jax.tree.map(lambda new, old: jnp.where(mask[0], new, old), W1, P)
        base = mem.leaves(W1)
        log_a = log_a.at[0].set(0.0)
        lr = lr.at[0].set(0.0)
        if z_anchor is not None:   # the linear form runs in the primal: its anchor is from_dual(z_*)
            z_anchor = ret.from_dual(z_anchor, hp["retention"])
    elif mode == "scale":
        base = mem.leaves(ret.acc(st.retention))             # the accumulator A_0
    else:
        base = mem.leaves(P)
    S0 = mem.leaves(st.optimizer) if momentum else None
    if z_anchor is not None:   # the algebra below runs on the deviation z - z_*
        anc = mem.leaves(z_anchor)
        base = [b - a for b, a in zip(base, anc)]
    else:
        anc = None

    if channel:  # matrix memory, GD, channel-wise decay: R [c, c, k], beta [c, k]
        R = decay_matrix(log_a)
        beta = jnp.exp(jnp.cumsum(log_a, axis=0))
        (W0,), (delta,) = base, deltas
        scores = jnp.einsum("jk,ijk,ik->ij", k, R, q) * (-lr)[None, :]
        y = (q * beta) @ W0.T + scores @ delta
        W_end = W0 * beta[-1][None, :] + jnp.einsum("jv,j,jk->vk", delta, -lr, k * R[-1])
        if anc is not None:
            y, W_end = y + q @ anc[0].T, W_end + anc[0]
        return (MemoryState(mem.from_leaves([W_end]), st.retention, ()), ()), y

    beta, C, gamma, mom_end = _coefficients(log_a, lr, mask, log_m if momentum else None)

    z_end = [beta[-1] * b + _outer_sum(d, x, C[-1]) for b, d, x in zip(base, deltas, inputs)]
    if anc is not None:
        z_end = [z + a for z, a in zip(z_end, anc)]
    if mode == "scale":
        s_end = [ret.scale(a, hp["retention"]) for a in z_end]          # z_end = A_end
        scales = [jnp.where(last, se, s) for s, se in zip(s_prev, s_end)]   # [c] per weight
    else:
        scales = None

    def read(q_i, beta_i, C_i, gamma_i, scale_i):
        def mm(l, h):
            out = beta_i * (base[l] @ h) + ((inputs[l] @ h) * C_i) @ deltas[l]
            if anc is not None:
                out = out + anc[l] @ h
            if momentum:
                out = out + gamma_i * (S0[l] @ h)
            return out if scale_i is None else scale_i[l] * out
        return mem.forward(mm, q_i)

    y = jax.vmap(read)(q, beta, C, gamma if momentum else jnp.zeros_like(beta),
                       None if scales is None else scales)

    if momentum:
        m_end, cs = mom_end
        z_end = [z + gamma[-1] * s for z, s in zip(z_end, S0)]
        S_end = mem.from_leaves([m_end * s + _outer_sum(d, x, cs) for s, d, x in zip(S0, deltas, inputs)])
    else:
        S_end = st.optimizer
    if mode == "scale":
        return (MemoryState(mem.from_leaves([a * s for a, s in zip(z_end, s_end)]),
                            ret.with_acc(st.retention, mem.from_leaves(z_end)), S_end), s_end), y
    return (MemoryState(mem.from_leaves(z_end), st.retention, S_end), ()), y


def memorize_chunked(spec, state: MemoryState, q, k, v, gates: dict, chunk_size: int,
                     remat_every: int = 0, valid_len=None, vjp: str = "hand"):
    """Mini-batch chunked form of one head: ``(y [T, v], final MemoryState)``.

    ``remat_every = R > 0`` checkpoints groups of ``R`` chunks: activation memory
    ``O(T / (c R))`` states plus one group's intermediates. ``valid_len`` (may be traced):
    only the first ``valid_len`` tokens are written (the rest are padding; their ``y`` is
    meaningless) — recurrent decoding runs a partly filled chunk this way. Specs the hand VJP covers
    (``plan.hand_vjp_blocker``: GD, scalar decay) run ``vjp.py``'s forward, differentiated by its
    hand-written backward (``vjp="hand"``) or by autodiff of that same forward (``"autodiff"``);
    the rest (momentum, channel-wise decay, Memora's anchored lag) differentiate :func:`chunk_step`.
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

    # per-token gate arrays (padded tokens: lr 0, decay 1, momentum 1)
    lr = jax.vmap(lambda g, k_i: spec.optimizer.lr(g, hp["optimizer"], k_i))(gates, k)
    a = spec.retention.decay_value(gates, hp["retention"])
    if a is None:
        a = jnp.ones((T,), q.dtype)
    elif jnp.ndim(a) == 0:
        a = jnp.full((T,), a, q.dtype)
    channel = a.ndim == 2
    if channel and (momentum or spec.memory.kind != "linear"):
        raise NotImplementedError("channel-wise decay in the chunked form needs a matrix memory and GD")
    m = gates["momentum"] if momentum else jnp.ones((T,), q.dtype)
    q, k, v, gates, lr, a, m = pad_to_chunks((q, k, v, gates, lr, a, m), n * c)
    lr = lr * mask
    log_a = log_gate(jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)) > 0, a, 1.0))
    log_m = log_gate(jnp.where(mask > 0, m, 1.0))
    last = jnp.arange(n * c) % c == c - 1   # chunk ends only (a final partial chunk has none)

    if plan_lib.hand_vjp_blocker(spec, channel) is None:   # one forward; its hand VJP or autodiff
        chunks = lambda x: x.reshape((n, c) + x.shape[1:])  # noqa: E731
        xs = chunked_vjp.ChunkIn(*jax.tree.map(chunks, (q, k, v, gates, lr, log_a)), mask[::c])
        y, P_end, A_end = chunked_vjp.memorize(spec, state, xs, remat_every, autodiff=vjp == "autodiff")
        ret_state = state.retention
        if mode == "scale":
            ret_state = spec.retention.with_acc(ret_state, spec.memory.from_leaves(A_end))
        final = MemoryState(spec.memory.from_leaves(P_end), ret_state, state.optimizer)
        return y.reshape((n * c,) + y.shape[2:])[:T], final

    xs = (q, k, v, gates, lr, log_a, log_m, mask, last)

    def step(carry, x):
        return chunk_step(spec, mode, momentum, channel, carry, x)

    s0 = ()
    if mode == "scale":
        s0 = [spec.retention.scale(a, hp["retention"])
              for a in spec.memory.leaves(spec.retention.acc(state.retention))]
    if remat_every:
        xs = jax.tree.map(lambda x: x.reshape((n // group, group, c) + x.shape[1:]), xs)
        group_step = jax.checkpoint(lambda carry, xg: jax.lax.scan(step, carry, xg))
        (final, _), y = jax.lax.scan(group_step, (state, s0), xs)
    else:
        # one flat scan: a nested scan of length-1 groups made XLA copy the stacked residuals
        # of the backward pass at every chunk (measured: ~20% of yaad's fwd+bwd time).
        xs = jax.tree.map(lambda x: x.reshape((n, c) + x.shape[1:]), xs)
        (final, _), y = jax.lax.scan(step, (state, s0), xs)
    return y.reshape((n * c,) + y.shape[y.ndim - 1:])[:T], final
