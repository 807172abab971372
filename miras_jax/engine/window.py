"""What the engines do with the Atlas choices before they run: feature maps and Omega windows.

``lower_spec`` / ``lower_inputs``: a memory with a feature map (``phi``, ``memory.poly_features``)
runs as the same memory without it on ``phi(q)``, ``phi(k)`` (so every engine, exact forms and
kernels included, takes it; ``W: [v, D]``); an Omega bias of window 1 under an optimizer whose update
is linear in ``eta_t * grad`` (GD, momentum: trait ``grad_linear``) is its base bias with
``lr <- lr * omega``.

``window_inputs``: an Omega bias of window ``c`` reads, per token ``t``, the ``c`` most recent keys,
values and bias gates (oldest first) and their weights
``w[t, j] = omega_{t-c+1+j} [t-c+1+j >= 0, same document, real token]``::

    k [T, d] -> [T, c, d],  v [T, v] -> [T, c, v],  gates[g] [T] -> [T, c]  (g: the bias's gates + omega)

so ``g_t = sum_j w[t, j] grad l(W; k[t, j], v[t, j])`` (``tokens.inner_grad``).
"""

from __future__ import annotations

import jax.numpy as jnp

from miras_jax import bias as bias_lib


def is_omega(spec) -> bool:
    return isinstance(spec.bias, bias_lib.OmegaBias)


def folds_window(spec) -> bool:
    """An Omega bias of window 1 whose weight folds into the learning rate."""
    return (is_omega(spec) and spec.bias.window == 1 and bool(getattr(spec.optimizer, "grad_linear", False))
            and spec.num_steps == 1)


def lower_spec(spec):
    """``spec`` as the engines run it: no feature map (inputs mapped by :func:`lower_inputs`), a
    foldable window-1 Omega bias replaced by its base."""
    if getattr(spec.memory, "feature_map", None) is not None:
        spec = spec.replace(memory=spec.memory.plain())
    if folds_window(spec):
        spec = spec.replace(bias=spec.bias.base)
    return spec


def lower_inputs(spec, q, k, gates):
    """``(spec', q', k', gates')`` with :func:`lower_spec` applied (idempotent: a lowered spec is
    returned unchanged with its inputs)."""
    mem = spec.memory
    if getattr(mem, "feature_map", None) is not None:
        q, k = mem.features(q), mem.features(k)
    if folds_window(spec) and gates is not None and "omega" in gates:
        gates = dict(gates)
        omega = gates.pop("omega")
        gates["lr"] = gates["lr"] * omega
    return lower_spec(spec), q, k, gates


def windowed(spec, k) -> bool:
    """Whether ``k`` already holds the Omega window (``[T, c, d]``)."""
    return is_omega(spec) and k.ndim == 3


def shift(x, o: int):
    """``x[t - o]`` along the leading axis, zeros for ``t < o``."""
    if o == 0:
        return x
    pad = jnp.zeros((o,) + x.shape[1:], x.dtype)
    return jnp.concatenate([pad, x[:-o]], axis=0)


def window_inputs(spec, k, v, gates, segments=None):
    """``(k [T, c, d], v [T, c, v], gates)`` for an Omega bias of window ``c``: the bias's gates
    ``[T, c]``, ``omega`` multiplied by the in-window mask; the other gates unchanged. ``segments``:
    ``(reset [T], real [T], ...)`` of a packed row: other documents' and pad tokens weigh 0."""
    c = spec.bias.window
    T = k.shape[0]
    idx = jnp.arange(T)
    if segments is None:
        doc, real = jnp.zeros((T,), jnp.int32), jnp.ones((T,), bool)
    else:
        reset, real = segments[0], segments[1]
        doc = jnp.cumsum(reset.astype(jnp.int32))
    offsets = range(c - 1, -1, -1)                       # oldest first: j = c - 1 - o
    stack = lambda x: jnp.stack([shift(x, o) for o in offsets], axis=1)  # noqa: E731
    valid = jnp.stack([(idx >= o) & (shift(doc, o) == doc) & shift(real, o) for o in offsets], axis=1)
    win = set(spec.bias.gates)
    out = {n: (stack(g) if n in win else g) for n, g in gates.items()}
    out["omega"] = jnp.where(valid, out["omega"], 0.0).astype(out["omega"].dtype)
    return stack(k), stack(v), out
