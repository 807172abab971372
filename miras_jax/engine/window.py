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

import math

import jax.numpy as jnp



def is_omega(spec) -> bool:
    """Whether the bias sums over a window (trait ``window``: ``bias.OmegaBias``)."""
    return getattr(spec.bias, "window", None) is not None


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
        q = mem.features(q)
    k, gates = lower_keys(spec, k, gates)
    return lower_spec(spec), q, k, gates


def lower_keys(spec, k, gates):
    """``(k', gates')``: the keys and gates of :func:`lower_inputs` (no queries: decoding's window)."""
    mem = spec.memory
    if getattr(mem, "feature_map", None) is not None:
        k = mem.features(k)
    if folds_window(spec):
        if gates is None or "omega" not in gates:
            raise ValueError(f"spec {spec.name!r} needs gate 'omega' (the Omega rule's weight gamma_t, "
                             f"shape [T]); got gates {sorted(gates or {})}")
        gates = dict(gates)
        omega = gates.pop("omega")
        gates["lr"] = gates["lr"] * omega
    return k, gates


def write_gain(spec) -> float:
    """How much larger one inner step is than a single unit-key write: ``window x ||phi(k)||^2`` for a
    unit key (``sum_{j<=p} 1 / j!`` with poly features of degree p, else 1); 1 for plain specs. The
    window's Hessian has eigenvalues up to this (times gamma <= 1), so GD stays non-expansive where
    ``lr <= 1 / write_gain`` (a layer's default ``lr_max`` divides by it)."""
    mem = spec.memory
    feat = 1.0
    if getattr(mem, "feature_map", None) == "poly":
        feat = sum(1.0 / math.factorial(j) for j in range(mem.degree + 1))
    return float(getattr(spec.bias, "window", 1) if is_omega(spec) else 1) * feat


def windowed(spec, k) -> bool:
    """Whether ``k`` already holds the Omega window (``[T, c, d]``)."""
    return is_omega(spec) and k.ndim == 3


def ensure_windows(spec, k, v, gates, segments=None):
    """``(k, v, gates)`` windowed for an Omega spec (:func:`window_inputs`, unless the caller already
    did: ``k [T, c, d]``); other specs' inputs unchanged."""
    if is_omega(spec) and not windowed(spec, k):
        return window_inputs(spec, k, v, gates, segments)
    return k, v, gates


def as_window(spec, k, v, gates, segments=None):
    """Windowed inputs for any spec: an Omega spec's (:func:`ensure_windows`); a plain bias as a
    window of one token with weight 1 (``k [T, 1, d]``, bias gates ``[T, 1]``, ``omega [T, 1]``)."""
    if is_omega(spec):
        return ensure_windows(spec, k, v, gates, segments)
    out = {n: (g[:, None] if n in spec.bias.gates else g) for n, g in gates.items()}
    out["omega"] = jnp.ones(k.shape[:1] + (1,), k.dtype)
    return k[:, None], v[:, None], out


def shift(x, o: int):
    """``x[t - o]`` along the leading axis, zeros for ``t < o``."""
    if o == 0:
        return x
    o = min(o, x.shape[0])
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


def window_gates(spec, gates) -> dict:
    """The gates an Omega window carries per window slot: the bias's (``omega`` included)."""
    win = set(spec.bias.gates)
    return {n: g for n, g in gates.items() if n in win}


def window_state(spec, k, v, gates, segments=None) -> dict:
    """What decoding keeps of the Omega window after tokens ``k [T, d]`` (lowered inputs): the last
    ``c - 1`` tokens' ``{"k", "v", "gates"}`` (oldest first, zeros before the row start), their
    ``omega`` weights 0 outside the row's last document (``segments = (reset, real, ...)``) and on pads."""
    n = spec.bias.window - 1
    T = k.shape[0]
    keep = jnp.ones((T,), bool)
    if segments is not None:
        reset, real = segments[0], segments[1]
        doc = jnp.cumsum(reset.astype(jnp.int32))
        keep = real & (doc == doc[-1])
    g = dict(window_gates(spec, gates))
    g["omega"] = jnp.where(keep, g["omega"], 0.0).astype(g["omega"].dtype)
    last = lambda x: jnp.concatenate([jnp.zeros((n,) + x.shape[1:], x.dtype), x])[T:]  # noqa: E731
    return {"k": last(k), "v": last(v), "gates": {name: last(x) for name, x in g.items()}}


def continue_windows(spec, win: dict, k, v, gates, segments=None):
    """Windowed inputs (as :func:`window_inputs`) of new tokens ``k [r, d]`` that follow the ``c - 1``
    tokens of ``win`` (:func:`window_state`), and the window after them: ``(k, v, gates, win)``.
    ``segments = (reset [r], real [r], ...)``: a reset among the new tokens ends the old window."""
    n = spec.bias.window - 1
    cat = lambda a, b: jnp.concatenate([a, b.astype(a.dtype)])  # noqa: E731
    wg = window_gates(spec, gates)
    kk, vv = cat(win["k"], k), cat(win["v"], v)
    gg = {name: cat(win["gates"][name], x) for name, x in wg.items()}
    segs = None
    if segments is not None:
        segs = (jnp.concatenate([jnp.zeros((n,), bool), segments[0]]),
                jnp.concatenate([jnp.ones((n,), bool), segments[1]]))
    kw, vw, gw = window_inputs(spec, kk, vv, gg, segs)
    out = dict(gates)
    out.update({name: x[n:] for name, x in gw.items()})
    new_win = window_state(spec, kk, vv, gg, segs)
    return kw[n:], vw[n:], out, new_win
