"""Which engine runs a spec: the exact chunked forms (Hebbian / delta family), the mini-batch
chunked form, or the token-level reference. ``run`` is called by ``api.memorize`` with validated,
cast inputs for one sequence of one head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax import bias as bias_lib
from miras_jax import inner_opt
from miras_jax import retention as ret_lib
from miras_jax.engine import chunked, exact
from miras_jax.engine.chunked_reference import memorize_chunked_reference, pad_to_chunks
from miras_jax.engine.reference import MemoryState, memorize_tokens


# Exact forms equal the token recurrence for any chunk size, so they run at the size measured
# fastest on the 2-core CPU (B=2, H=4, d=64, fwd+bwd) whatever larger size the caller asks for:
# channel-wise Hebbian (GLA) materialises [c, c, k] per chunk -> 16; the delta family's WY form
# -> 32 (54k vs 41k tokens/s at 64, 24k at 128).
CHANNEL_CHUNK = 16
DELTA_CHUNK = 32


def exact_family(spec) -> str | None:
    """``"hebbian"`` or ``"delta"`` if the spec has an exact chunked form, else ``None``.

    Hebbian: matrix memory, dot bias, identity retention (none / decay), plain GD.
    Delta: matrix memory, l2 bias, identity retention, GD / implicit GD / n-step GD, and the step
    taken at the retained state (or no decay, where that is the same thing).
    """
    if (getattr(spec.memory, "kind", None) != "linear" or type(spec.retention) is not ret_lib.Retention
            or spec.retention.anchor):
        return None
    opt = type(spec.optimizer)
    if isinstance(spec.bias, bias_lib.DotBias) and opt is inner_opt.GD and spec.num_steps == 1:
        return "hebbian"
    if isinstance(spec.bias, bias_lib.L2Bias) and opt in (inner_opt.GD, inner_opt.ImplicitGD) and (
            spec.grad_at == "retained" or spec.retention.decay_source == "none"):
        return "delta"
    return None


def _log_decay(spec, gates, T):
    a = spec.retention.decay_value(gates, spec.hparams["retention"])
    if a is None:
        return None
    if jnp.ndim(a) == 0:
        a = jnp.full((T,), a)
    return chunked.log_gate(a)


def run_exact(family, spec, state: MemoryState, q, k, v, gates, chunk_size):
    """Exact chunked path: equals the token recurrence for any chunk size."""
    hp = spec.hparams
    T, n, c = q.shape[0], spec.num_steps, chunk_size
    W0 = state.memory["W"]
    log_a = _log_decay(spec, gates, T)
    if family == "hebbian":
        if log_a is not None and log_a.ndim == 2:
            # channel-wise decay materialises [c, c, k] per chunk; the form is exact for any chunk
            # size, so run it at <= 16 (measured fastest here) whatever the caller's chunk size.
            c = min(c, CHANNEL_CHUNK)
        lr = jax.vmap(lambda g, k_i: spec.optimizer.lr(g, hp["optimizer"], k_i))(gates, k)
        Tp = -(-T // c) * c
        q_, k_, v_, lr_ = pad_to_chunks((q, k, v, lr), Tp)
        la = None if log_a is None else pad_to_chunks(log_a, Tp)
        y, W = exact.hebbian_chunked(q_, k_, v_, lr_, la, W0, c)
        return y[:T], MemoryState({"W": W}, state.retention, state.optimizer)
    # delta family; n sub-steps per token are flattened into n * T steps
    c = min(c, DELTA_CHUNK)
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
    Tp = -(-T // c) * c
    q, k, v, lr = pad_to_chunks((q, k, v, lr), Tp)
    flat = lambda x: x.reshape((Tp * n,) + x.shape[2:])  # noqa: E731
    la = None if log_a is None else flat(pad_to_chunks(log_a, Tp))
    y, W = exact.delta_chunked(q, flat(k), flat(v), flat(lr), la, W0, c * n, read_every=n)
    return y[:T], MemoryState({"W": W}, state.retention, state.optimizer)


def run(spec, state: MemoryState, q, k, v, gates, *, chunk_size: int, implementation: str,
        remat_every: int = 0):
    """Dispatch one head. ``implementation`` is ``"reference"`` or ``"xla"`` here."""
    family = exact_family(spec)
    if implementation == "reference":
        if chunk_size == 1 or family is not None:   # exact chunking == the token recurrence
            return memorize_tokens(spec, state, q, k, v, gates)
        return memorize_chunked_reference(spec, state, q, k, v, gates, chunk_size)
    if family is not None:
        return run_exact(family, spec, state, q, k, v, gates, chunk_size)
    reason = chunked.supports(spec)
    if reason is not None:
        raise NotImplementedError(f"implementation='xla' cannot run spec {spec.name!r}: {reason}; "
                                  "use implementation='reference' with chunk_size=1")
    return chunked.memorize_chunked(spec, state, q, k, v, gates, chunk_size, remat_every)
