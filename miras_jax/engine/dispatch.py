"""Runs one head on the engine its :class:`~miras_jax.engine.plan.Plan` names: the exact chunked
forms (Hebbian / delta family), the mini-batch chunked form, or the token-level reference.
``run`` is called by ``api.memorize`` with validated, cast inputs for one sequence of one head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax.engine import exact
from miras_jax.engine import omega
from miras_jax.engine.minibatch import chunk as chunked
from miras_jax.engine.minibatch import decay
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.minibatch.reference import memorize_chunked_reference, pad_to_chunks
from miras_jax.engine.tokens import MemoryState, memorize_tokens


def _log_decay(spec, gates, T):
    a = spec.retention.decay_value(gates, spec.hparams["retention"])
    if a is None:
        return None
    if jnp.ndim(a) == 0:
        a = jnp.full((T,), a)
    return decay.log_gate(a)


def run_exact(plan, spec, state: MemoryState, q, k, v, gates, segments=None):
    """Exact chunked path (``plan.engine`` ``"hebbian"`` / ``"delta"``, chunk ``plan.chunk``):
    equals the token recurrence for any chunk size. ``segments``: packed rows (pad tokens write
    nothing: ``lr = 0``, decay 1; they read 0)."""
    hp = spec.hparams
    T, n, c = q.shape[0], spec.num_steps, plan.chunk
    W0 = state.memory["W"]
    log_a = _log_decay(spec, gates, T)
    reset = W_reset = None
    if segments is not None:
        reset, real, reset_state = segments
        W_reset = reset_state.memory["W"]
        if log_a is not None:
            log_a = jnp.where(real.reshape((T,) + (1,) * (log_a.ndim - 1)), log_a, 0.0)
    if plan.engine == "hebbian":
        lr = jax.vmap(lambda g, k_i: spec.optimizer.lr(g, hp["optimizer"], k_i))(gates, k)
        if segments is not None:
            lr = jnp.where(real, lr, 0.0)
        Tp = -(-T // c) * c
        q_, k_, v_, lr_ = pad_to_chunks((q, k, v, lr), Tp)
        la = None if log_a is None else pad_to_chunks(log_a, Tp)
        r_ = None if reset is None else pad_to_chunks(reset, Tp)
        y, W = exact.hebbian_chunked(q_, k_, v_, lr_, la, W0, c, r_, W_reset,
                                     state_scan=plan_lib.state_scan(Tp // c))
        return _pads_read_zero(y[:T], segments), MemoryState({"W": W}, state.retention, state.optimizer)
    # delta family; n sub-steps per token are flattened into n * T steps
    if n > 1:
        k = k if k.ndim == 3 else jnp.broadcast_to(k[:, None], (T, n, k.shape[-1]))
        v = v if v.ndim == 3 else jnp.broadcast_to(v[:, None], (T, n, v.shape[-1]))
    else:
        k, v = k[:, None], v[:, None]
    lr_gate = gates["lr"]
    lr_gate = lr_gate[:, None] if lr_gate.ndim == 1 else lr_gate
    lr = jax.vmap(jax.vmap(lambda l, k_i: spec.optimizer.lr({"lr": l}, hp["optimizer"], k_i)))(
        jnp.broadcast_to(lr_gate, (T, n)), k)
    if log_a is not None:
        log_a = jnp.concatenate([log_a[:, None], jnp.zeros((T, n - 1), log_a.dtype)], axis=1)
    if segments is not None:
        lr = jnp.where(real[:, None], lr, 0.0)
    Tp = -(-T // c) * c
    q, k, v, lr = pad_to_chunks((q, k, v, lr), Tp)
    flat = lambda x: x.reshape((Tp * n,) + x.shape[2:])  # noqa: E731
    la = None if log_a is None else flat(pad_to_chunks(log_a, Tp))
    r_ = None
    if reset is not None:   # a restart before a token's first sub-step
        r_ = flat(pad_to_chunks(jnp.concatenate([reset[:, None], jnp.zeros((T, n - 1), bool)], axis=1), Tp))
    y, W = exact.delta_chunked(q, flat(k), flat(v), flat(lr), la, W0, c * n, read_every=n, reset=r_,
                               W_reset=W_reset, state_scan=plan_lib.state_scan(Tp // c))
    return _pads_read_zero(y[:T], segments), MemoryState({"W": W}, state.retention, state.optimizer)


def _pads_read_zero(y, segments):
    return y if segments is None else jnp.where(segments[1][:, None], y, 0.0)


def run(spec, state: MemoryState, q, k, v, gates, *, chunk_size: int, implementation: str,
        remat_every: int = 0, segments=None, segment_align: int = 0):
    """Run one head on ``plan(spec, implementation, chunk_size)``'s engine (``"reference"`` /
    ``"xla"`` / ``"auto"`` resolved off-accelerator; pallas runs batched, ``engine/pallas.py``).
    ``segments = (reset [T], real [T], reset_state)`` for a packed row (``engine/segments.py``);
    ``segment_align``: its documents start at multiples of it (the mini-batch form's fast path)."""
    p = plan_lib.plan(spec, implementation, chunk_size, channel=plan_lib.channel_decay(spec, gates))
    if p.engine == "tokens":
        return memorize_tokens(spec, state, q, k, v, gates, segments)
    if p.engine == "chunked_reference":
        return memorize_chunked_reference(spec, state, q, k, v, gates, p.chunk, segments)
    if p.engine == "omega":
        return omega.memorize_omega_chunked(spec, state, q, k, v, gates, p.chunk, segments=segments)
    if p.engine in ("hebbian", "delta"):
        return run_exact(p, spec, state, q, k, v, gates, segments)
    if p.engine == "minibatch":
        return chunked.memorize_chunked(spec, state, q, k, v, gates, p.chunk, remat_every, segments=segments,
                                        segment_align=segment_align)
    raise ValueError(f"dispatch.run runs one head off the kernels; plan {p.engine!r} is run by engine/pallas.py")
