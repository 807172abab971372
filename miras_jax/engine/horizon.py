"""Truncated backpropagation through the memory state (``grad_horizon``).

The forward pass is unchanged: the sequence is cut into segments of ``H`` tokens and the state
flows from one segment into the next. Only the *gradient* through the carried state is cut at
segment starts (``stop_gradient``): an output at token ``t`` is differentiated with respect to the
inputs of its own segment ``[H floor(t / H), t]`` (and ``W_0`` for the first segment), never
through the state of earlier segments::

    state_0 = init;  (y_s, state_{s+1}) = run(sg(state_s) if s > 0 else state_0, segment_s)

Why: an MLP memory's inner recurrence ``W_t = a_t W_{t-1} - eta_t grad l(W_{t-1})`` is chaotic at
the gates a language model uses (a positive Lyapunov exponent; ``experiments/lyapunov.py``), so
the exact gradient grows like ``exp(lambda T)``. A horizon bounds one layer's growth by
``exp(lambda H)`` at any ``T`` (Transformer-XL's recipe), at the price of the credit a write gets
from reads more than ``H`` tokens later. Stacked layers multiply their factors, so on its own it
does not make a deep chaotic model's gradient small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_horizon(grad_horizon, chunk_size: int) -> None:
    """``None`` / 0 (exact gradients) or a positive multiple of ``chunk_size``."""
    if grad_horizon is None or grad_horizon == 0:
        return
    if not isinstance(grad_horizon, int) or isinstance(grad_horizon, bool) or grad_horizon < 0:
        raise ValueError(f"grad_horizon must be None, 0 or a positive int, got {grad_horizon!r}")
    if grad_horizon % chunk_size:
        raise ValueError(f"grad_horizon={grad_horizon} must be a multiple of chunk_size={chunk_size} "
                         "(segments must start at chunk boundaries so the forward pass is unchanged)")


def truncated(run, state, xs, T: int, horizon: int | None, axis: int):
    """``run(state, xs) -> (y, state)`` over segments of ``horizon`` tokens, the gradient cut at each
    segment start after the first. ``xs``: a pytree whose leaves have the token axis ``axis`` of
    length ``T``; ``y`` has its token axis at ``axis`` too. ``horizon`` None / 0 / ``>= T``: one call."""
    if not horizon or T <= horizon:
        return run(state, xs)
    n_full = T // horizon
    take = lambda a, lo, hi: jax.lax.slice_in_dim(a, lo, hi, axis=axis)  # noqa: E731
    y0, state = run(state, jax.tree.map(lambda a: take(a, 0, horizon), xs))
    ys = [y0]
    if n_full > 1:
        # [.., (n-1) H, ..] -> [n-1, .., H, ..]: one scanned segment per step
        def split(a):
            a = take(a, horizon, n_full * horizon)
            a = a.reshape(a.shape[:axis] + (n_full - 1, horizon) + a.shape[axis + 1:])
            return jnp.moveaxis(a, axis, 0)

        def body(st, seg):
            y, st = run(jax.lax.stop_gradient(st), seg)
            return st, y

        state, y_mid = jax.lax.scan(body, state, jax.tree.map(split, xs))
        y_mid = jnp.moveaxis(y_mid, 0, axis)
        ys.append(y_mid.reshape(y_mid.shape[:axis] + (-1,) + y_mid.shape[axis + 2:]))
    if T > n_full * horizon:
        y_last, state = run(jax.lax.stop_gradient(state),
                            jax.tree.map(lambda a: take(a, n_full * horizon, T), xs))
        ys.append(y_last)
    return jnp.concatenate(ys, axis=axis), state
