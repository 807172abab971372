"""Chunked reference: the mini-batch (stale-gradient) semantics, written as plain loops.

This is the oracle of the fast chunked XLA path (``chunk.py``): same semantics, no algebra.
Chunks of ``c`` tokens; inside a chunk every gradient is taken at the chunk-start memory
``P = W_{t'}`` (the paper's Eq. 28), then token by token (materialised states)::

    g_i = grad l(P; k_i, v_i);  u_i, S = optimizer.update(g_i, S)
      (Omega window: g_i = sum_j w_ij grad l(P; k_ij, v_ij), window tokens of the previous chunk
       included, all at this chunk's P; Muon: S_i = m_i S_{i-1} + g_i, u_i = -eta_i NS(S_i): the
       Newton-Schulz step on every token's momentum)
    "linear" maps (none, decay):  W_i = retention.step(W_{i-1}, u_i, a_i)          (exact map)
                                  (with an anchor: a_i W_{i-1} + (1 - a_i) W_* + u_i)
    "scale"  (l_q, Moneta):       A_i = a_i A_{i-1} + u_i;  reads use W_i = s(A_0) A_i, except
                                  the token that ends a full chunk (position c - 1), which
                                  reads W_end = s(A_end) A_end (a final partial chunk reads
                                  s(A_0) throughout, so a read never depends on later tokens)
    "lag"    (KL/Memora, ...):    i = 0: W_0' = retention.step(project(P), u_0, a_0) (exact);
                                  i > 0: W_i = a_i W_{i-1} + u_i                   (linear form)
                                  (with an anchor: + (1 - a_i) from_dual(z_*) in the linear form)
    y_i = M_{W_i}(q_i)

With ``c = 1`` all three reduce to the token-level engine. Padded tokens (``mask = 0``) leave
the state unchanged.

Packed rows (``segments``, ``engine/segments.py``): the chunk grid is the row's. A document that
starts at token ``s`` of a chunk restarts the state from the reset state ``(W_*, A_*, S_*)`` at ``s``
and takes the gradients of its tokens in this chunk at ``W_*`` (its own start memory: the
chunk-start memory of a document that starts there); "scale" reads use ``s(A_*)`` for them; "lag"
takes its exact step at chunk position 0 only (a document starting later in the chunk runs the
linear form from ``W_*``). A document that starts at a chunk boundary therefore runs exactly as
it would alone. Pad tokens neither write nor read (``y = 0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax.engine import window as window_lib
from miras_jax.engine.segments import where_tree
from miras_jax.engine.tokens import MemoryState, inner_grad


def pad_to_chunks(x, T_pad):
    """Zero-pad the leading (token) axis of every leaf to ``T_pad``."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, T_pad - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), x)


_where = where_tree


def memorize_chunked_reference(spec, state: MemoryState, q, k, v, gates: dict, chunk_size: int,
                               segments=None, valid_len=None):
    """``(y [T, v], final MemoryState)`` under the mini-batch semantics above (one head);
    ``segments = (reset [T], real [T], reset_state)`` or ``None``; ``valid_len`` (may be traced):
    only the first ``valid_len`` tokens write (decoding a partial chunk)."""
    mode = spec.retention.chunk_mode
    if mode is None:
        raise NotImplementedError(f"retention {spec.retention.name!r} has no chunked form; use chunk_size=1")
    if spec.grad_at != "previous" or spec.num_steps != 1:
        raise NotImplementedError("the mini-batch chunked form needs grad_at='previous' and one step per token")
    hp = spec.hparams
    ret, opt, mem = spec.retention, spec.optimizer, spec.memory
    k, v, gates = window_lib.ensure_windows(spec, k, v, gates, segments)
    T, c = q.shape[0], chunk_size
    n = -(-T // c)
    mask = jnp.arange(n * c) < (T if valid_len is None else valid_len)
    if segments is None:
        reset, init = jnp.zeros((T,), bool), state
    else:
        reset, real, init = segments
        mask = mask & pad_to_chunks(real, n * c)
    xs = pad_to_chunks((q, k, v, gates, reset), n * c)
    xs = jax.tree.map(lambda a: a.reshape((n, c) + a.shape[1:]), (*xs, mask))

    def chunk(st: MemoryState, xs_c):
        qc, kc, vc, gc, rc, mc = xs_c

        def token(carry, xs_i):
            W, A, S, P, R0 = carry   # P: where this token's gradient is taken; R0: its base retention state
            i, q_i, k_i, v_i, g_i, r_i, m_i = xs_i
            W, A, S, P, R0 = _where(r_i, (init.memory, ret.acc(init.retention), init.optimizer, init.memory,
                                          init.retention), (W, A, S, P, R0))
            A0 = ret.acc(R0)
            z_anchor = ret.anchor_of(R0)
            grad = inner_grad(spec, P, k_i, v_i, g_i)
            u, S_new = opt.update(grad, S, P, gates=g_i, hparams=hp["optimizer"],
                                  key=k_i[-1] if k_i.ndim == 2 else k_i)
            a = ret.decay_value(g_i, hp["retention"])
            if mode == "linear":
                W_new, _ = ret.step(W, R0, u, a, hp["retention"])
                A_new, W_read = A, W_new
            elif mode == "scale":
                W_new, R_new = ret.step(None, ret.with_acc(R0, A), u, a, hp["retention"])
                A_new = ret.acc(R_new)                                    # W_new = s(A_new) A_new
                last = i == c - 1
                s0 = jax.tree.map(lambda x: ret.scale(x, hp["retention"]), A0)
                W_lin = jax.tree.map(lambda x, s: s * x, A_new, s0)
                W_read = _where(last, W_new, W_lin)
            else:  # lag
                W_exact, _ = ret.step(ret.project(W), R0, u, a, hp["retention"])
                anchor_primal = None if z_anchor is None else ret.from_dual(z_anchor, hp["retention"])
                W_lin = jax.tree.map(jnp.add, ret.retain(W, a, anchor_primal), u)
                W_new = _where(i == 0, W_exact, W_lin)
                A_new, W_read = A, W_new
            y = jnp.where(m_i, mem.apply(W_read, q_i), 0.0)
            keep = lambda new, old: _where(m_i, new, old)  # noqa: E731
            return (keep(W_new, W), keep(A_new, A), keep(S_new, S), P, R0), y

        R0 = st.retention
        (W, A, S, _, R_base), y = jax.lax.scan(token, (st.memory, ret.acc(R0), st.optimizer, st.memory, R0),
                                               (jnp.arange(c), qc, kc, vc, gc, rc, mc))
        return MemoryState(W, ret.with_acc(R_base, A), S), y

    final, y = jax.lax.scan(chunk, state, xs)
    return y.reshape((n * c,) + y.shape[2:])[:T], final
