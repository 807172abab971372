"""The token-level engine: one exact Miras step per token under ``jax.lax.scan``.

This is the truth every fast path is compared with. For one sequence of one head::

    point_t = W_{t-1}                        (grad_at="previous")
            | retention(W_{t-1}, u=0)        (grad_at="retained", e.g. a_t W_{t-1})
    phi_t   = bias.residual_map(M_{point}(k_t), v_t)         # dl/dpred, [v]
    g_t     = (dM_{point}(k_t)/dW)^T phi_t                   # VJP through the memory
    u_t, s  = optimizer.update(g_t, s, ...)                  # e.g. -eta_t g_t
    W_t     = retention.step(W_{t-1}, u_t, a_t)              # e.g. a_t W_{t-1} + u_t
    y_t     = M_{W_t}(q_t)                                   # read after the write

With ``optimizer.num_steps = n`` the step is repeated n times per token (key/value ``j`` of
``k: [T, n, k]``), the decay entering only the first sub-step (DeltaProduct). An Omega bias of window
``c`` (``bias.OmegaBias``) takes ``g_t = sum_j w_tj grad l(point; k_tj, v_tj)`` over the window of
``engine/window.py`` (``k: [T, c, k]``; built here from ``[T, k]`` inputs if the caller has not).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from miras_jax.engine import window as window_lib
from miras_jax.engine.segments import where_tree


class MemoryState(NamedTuple):
    """What the recurrence carries: memory params, retention state (accumulator), optimizer state."""

    memory: Any
    retention: Any
    optimizer: Any


def init_state(spec, params) -> MemoryState:
    """State before the first token: ``W_0``, ``A_0 = W_0`` (if any), optimizer state (``S_0 = 0``)."""
    hp = spec.hparams
    return MemoryState(params, spec.retention.init(params, hp["retention"]), spec.optimizer.init(params))


def _sub_gates(gates_t: dict, j: int, n: int) -> dict:
    """Gates of sub-step ``j``: a per-step ``lr: [n]`` is indexed, the rest shared."""
    if n == 1:
        return gates_t
    out = dict(gates_t)
    if "lr" in out and jnp.ndim(out["lr"]) == 1:
        out["lr"] = out["lr"][j]
    return out


def inner_grad(spec, point, k_t, v_t, gates_t: dict):
    """``grad_W l(point; k_t, v_t)`` (a VJP through the memory at the bias's residual map); for an
    Omega bias, ``k_t: [c, k]``, ``v_t: [c, v]``, the bias's gates ``[c]``:
    ``sum_j omega_j grad l(point; k_tj, v_tj)`` (one VJP of the ``c`` predictions)."""
    hp = spec.hparams["bias"]
    if not window_lib.is_omega(spec):
        pred, vjp = jax.vjp(lambda w: spec.memory.apply(w, k_t), point)
        phi = spec.bias.residual_map(pred, v_t, hp, gates_t)
        return vjp(phi.astype(pred.dtype))[0]
    win = set(spec.bias.gates)
    g_win = {n: g for n, g in gates_t.items() if n in win}
    pred, vjp = jax.vjp(lambda w: jax.vmap(lambda x: spec.memory.apply(w, x))(k_t), point)
    phi = jax.vmap(lambda p, t, g: spec.bias.residual_map(p, t, hp, g))(pred, v_t, g_win)
    return vjp((phi * g_win["omega"][:, None]).astype(pred.dtype))[0]


def token_step(spec, state: MemoryState, k_t, v_t, gates_t: dict) -> MemoryState:
    """One token's update. ``k_t: [k]`` or ``[n, k]``, ``v_t: [v]`` or ``[n, v]``."""
    hp = spec.hparams
    params, rstate, ostate = state
    n = spec.num_steps
    if window_lib.is_omega(spec) and k_t.ndim == 1:
        raise ValueError("an Omega bias steps on the window's keys k_t [c, d] (engine/window.py)")
    if n > 1 and k_t.ndim == 1:
        k_t = jnp.broadcast_to(k_t, (n, k_t.shape[0]))
    if n > 1 and v_t.ndim == 1:
        v_t = jnp.broadcast_to(v_t, (n, v_t.shape[0]))
    decay = spec.retention.decay_value(gates_t, hp["retention"])
    for j in range(n):
        k_j, v_j = (k_t[j], v_t[j]) if n > 1 else (k_t, v_t)
        g_j = _sub_gates(gates_t, j, n)
        a_j = decay if j == 0 else None
        if spec.grad_at == "retained":
            point, _ = spec.retention.step(params, rstate, None, a_j, hp["retention"])
        else:
            point = params
        grads = inner_grad(spec, point, k_j, v_j, g_j)
        updates, ostate = spec.optimizer.update(grads, ostate, point, gates=g_j, hparams=hp["optimizer"],
                                                key=k_j[-1] if window_lib.is_omega(spec) else k_j)
        params, rstate = spec.retention.step(params, rstate, updates, a_j, hp["retention"])
    return MemoryState(params, rstate, ostate)


def memorize_tokens(spec, state: MemoryState, q, k, v, gates: dict, segments=None):
    """Scan :func:`token_step` over ``T`` tokens; returns ``(y: [T, v], final MemoryState)``.

    ``segments = (reset [T], real [T], reset_state)`` (``segments.boundaries``): at ``reset_t`` the
    state becomes ``reset_state`` before token t writes; a pad token (``real_t`` false) leaves the
    state unchanged and reads 0."""

    k, v, gates = window_lib.ensure_windows(spec, k, v, gates, segments)

    # checkpointed: the backward pass keeps only the carried state per token, not the step's
    # intermediates (MLP memories otherwise need O(T x layer activations x state) memory).
    @jax.checkpoint
    def body(carry, xs):
        q_t, k_t, v_t, g_t = xs[:4]
        if segments is not None:
            reset_t, real_t = xs[4:]
            carry = where_tree(reset_t, segments[2], carry)
            new = token_step(spec, carry, k_t, v_t, g_t)
            carry = where_tree(real_t, new, carry)
            y_t = spec.memory.apply(carry.memory, q_t)
            return carry, jnp.where(real_t, y_t, jnp.zeros_like(y_t))
        carry = token_step(spec, carry, k_t, v_t, g_t)
        return carry, spec.memory.apply(carry.memory, q_t)

    xs = (q, k, v, gates) + (() if segments is None else tuple(segments[:2]))
    final, y = jax.lax.scan(body, state, xs)
    return y, final
