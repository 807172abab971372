"""The Atlas chunk form (XLA): a matrix memory with an Omega window and / or Muon, mini-batch semantics.

The semantics are ``minibatch/reference.py``'s ("linear" retention): per chunk of ``C`` tokens every
gradient is taken at the chunk-start memory ``P``. One head, after ``window.lower_inputs``
(``W: [v, D]``, ``q: [T, D]``, windowed ``k: [T, c, D]``, ``v: [T, c, v]``). Per chunk::

    r_e = residual(P k_e, v_e)                         per token once: the chunk's and the c - 1 before it
    g_j = sum_e B_je r_e k_e^T                         the window's banded sum (B [C, c - 1 + C]: omega)
    L_i = sum_{l<=i} log a_l,  R_ij = exp(L_i - L_j) [j <= i]   (decay.decay_matrix)
    GD:        W_i = e^{L_i} P - sum_j R_ij eta_j g_j
               y_i = e^{L_i} P q_i + ((F B) * (q k^T)) r,  F = -R diag(eta)          (dual form)
    momentum:  S_i = m_i S_{i-1} - eta_i g_i, W_i = a_i W_{i-1} + S_i   (decay.momentum_coefficients)
    Muon:      S_i = m_i S_{i-1} + g_i = e^{M_i} S_0 + sum_j Rm_ij g_j     (linear: one masked matmul)
               U_i = -eta_i NS(S_i)                     (the Newton-Schulz step on every token's S_i)
               W_i = e^{L_i} P + sum_j R_ij U_j,   y_i = W_i q_i   (materialised: [C, v, D] per chunk)

Any other memory (an MLP), or an anchored decay (``W_i = a_i W_{i-1} + (1 - a_i) N + u_i``: the same
algebra on ``W - N``), runs the *materialised* form: per-token gradients ``grad l(P; k_e, v_e)`` (one
VJP each, a pytree) banded into ``g_j``, every token's weights ``W_i`` formed by the masked matmuls
above leaf by leaf (``[C, ...]`` per leaf: ``C`` times the memory), read by ``M_{W_i}(q_i)``.

With ``C = 1`` this is the token engine. Padding (the last partial chunk, ``valid_len``, pads of
packed rows): ``eta = 0``, ``omega = 0``, ``a = m = 1``. Packed rows: a document starting inside a
chunk restarts from the reset state and takes its gradients there (``R`` and the cumulative logs
masked to one document, ``decay.segment_cumsum``). The backward is autodiff through a
checkpointed chunk body (the carried ``(P, S)`` per chunk is kept).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from miras_jax.engine import window as window_lib
from miras_jax.engine.minibatch import decay
from miras_jax.engine.minibatch.reference import pad_to_chunks
from miras_jax.engine.tokens import MemoryState, inner_grad
from miras_jax.inner_opt import newton_schulz


def dual_form(spec) -> bool:
    """Whether the dual (matrix) form runs ``spec``: a matrix memory, an unanchored decay."""
    return getattr(spec.memory, "kind", None) == "linear" and not spec.retention.anchor


def blocker(spec) -> str | None:
    """Why this chunk form cannot run ``spec`` (``None`` if it can: the dual form or the materialised one)."""
    if spec.retention.map_kind != "identity":
        return f"retention {spec.retention.name!r} is not a plain decay (identity map)"
    if spec.grad_at != "previous":
        return "the Omega / Muon chunk form takes gradients at the chunk-start memory (grad_at='previous')"
    if spec.optimizer.update_form not in ("gd", "momentum", "muon") or spec.num_steps != 1:
        return f"optimizer {spec.optimizer.name!r} has no Omega chunk form"
    if spec.optimizer.update_form == "gd" and not getattr(spec.optimizer, "grad_linear", False):
        return f"optimizer {spec.optimizer.name!r} has a key-dependent step"
    return None


def band(weights, C: int):
    """The window's weights per chunk as a band: ``weights [n, C, w]`` (``weights[t, j]``: token
    ``t - w + 1 + j``) -> ``[n, C, w - 1 + C]`` over the ``w - 1`` tokens before the chunk and its
    ``C`` tokens: ``B[t, e] = weights[t, e - t]`` for ``0 <= e - t < w``."""
    w = weights.shape[-1]
    t, j, e = (jnp.arange(n) for n in (C, w, w - 1 + C))
    one_hot = (e[None, None, :] == t[:, None, None] + j[None, :, None]).astype(weights.dtype)
    return jnp.einsum("ntj,tje->nte", weights, one_hot)


def before_chunks(own, halo, C: int, n: int):
    """The ``w - 1`` tokens before every chunk: ``own [n C, ...]`` (each token's own input), ``halo
    [w - 1, ...]`` (the first token's predecessors) -> ``[n, w - 1, ...]``."""
    ext = jnp.concatenate([halo, own])
    idx = jnp.arange(n)[:, None] * C + jnp.arange(halo.shape[0])[None, :]
    return ext[idx]


def memorize_omega_chunked(spec, state: MemoryState, q, k, v, gates: dict, chunk_size: int, valid_len=None,
                           segments=None):
    """``(y [T, v], final MemoryState)`` of one head under the module docstring's algebra.
    ``valid_len`` (may be traced): only the first ``valid_len`` tokens write (decoding a partial
    chunk). ``segments = (reset [T], real [T], reset_state)``: packed rows, the chunked reference's
    semantics (a document starting inside a chunk restarts from ``reset_state`` and takes its
    gradients there; ``same``-document masks on the decay / momentum matrices)."""
    reason = blocker(spec)
    if reason:
        raise NotImplementedError(reason)
    hp, opt = spec.hparams, spec.optimizer
    form = opt.update_form
    with_s = form in ("momentum", "muon")
    packed = segments is not None
    k, v, gates = window_lib.as_window(spec, k, v, gates, segments)
    T, C = q.shape[0], chunk_size
    n = -(-T // C)
    mask = (jnp.arange(n * C) < (T if valid_len is None else valid_len)).astype(q.dtype)
    reset = jnp.zeros((n * C,), q.dtype)
    if packed:
        reset_t, real, reset_state = segments
        mask = mask * pad_to_chunks(real.astype(q.dtype), n * C)
        reset = pad_to_chunks(reset_t.astype(q.dtype), n * C)
    lr = jax.vmap(lambda g, k_i: opt.lr(g, hp["optimizer"], k_i))(gates, k[:, -1])
    a = spec.retention.decay_value(gates, hp["retention"])
    a = jnp.ones((T,), q.dtype) if a is None else jnp.broadcast_to(a, (T,)) if jnp.ndim(a) == 0 else a
    if a.ndim != 1:
        raise NotImplementedError("channel-wise decay has no Omega / Muon chunk form")
    m = gates["momentum"] if with_s else jnp.ones((T,), q.dtype)
    # each token's own inputs (window slot w - 1), the tokens before each chunk, the band of weights
    bg = {g: gates[g] for g in spec.bias.gates if g != "omega"}
    own = lambda x: pad_to_chunks(x[:, -1], n * C)  # noqa: E731
    prev = lambda x: before_chunks(own(x), x[0, :-1], C, n)  # noqa: E731
    k_prev, v_prev, bg_prev = prev(k), prev(v), {g: prev(x) for g, x in bg.items()}
    q, k, v, bg, lr, a, m = pad_to_chunks((q, k[:, -1], v[:, -1], {g: x[:, -1] for g, x in bg.items()}, lr, a, m),
                                          n * C)
    omega = pad_to_chunks(gates["omega"], n * C) * mask[:, None]
    lr = lr * mask
    log_a = decay.log_gate(jnp.where(mask > 0, a, 1.0))
    log_m = decay.log_gate(jnp.where(mask > 0, m, 1.0))
    chunks = lambda x: x.reshape((n, C) + x.shape[1:])  # noqa: E731
    B = band(chunks(omega), C)                                                  # [n, C, w - 1 + C]
    xs = (*jax.tree.map(chunks, (q, k, v, bg, lr, log_a, log_m, mask, reset)), k_prev, v_prev, bg_prev, B)
    residual = jax.vmap(lambda p, t, g: spec.bias.residual_map(p, t, hp["bias"], g))
    if not dual_form(spec):
        return _materialised(spec, state, segments, xs, with_s, T)
    W_star = state.memory["W"] if not packed else reset_state.memory["W"]
    S_star = (state.optimizer["W"] if not packed else reset_state.optimizer["W"]) if with_s else None

    @jax.checkpoint
    def body(carry, xs_c):
        P, S = carry
        qc, kc, vc, bgc, lrc, la, lm, mc, rc, kp, vp, bgp, Bx = xs_c
        w1 = kp.shape[0]
        Bp, Bc = Bx[:, :w1], Bx[:, w1:]                                         # [C, w - 1], [C, C]
        first = jnp.cumsum(rc) == 0                        # [C]: tokens of the chunk's first document
        same = None
        if packed:
            dc = jnp.cumsum(rc)
            same = (dc[:, None] == dc[None, :]).astype(qc.dtype)
        pick = lambda x, y: x if not packed else jnp.where(  # noqa: E731
            first.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)
        # per-token residuals once: this chunk's at P (later documents at W_*), the previous ones' at P
        pred = pick(kc @ P.T, kc @ W_star.T) if packed else kc @ P.T
        r, rp = residual(pred, vc, bgc), residual(kp @ P.T, vp, bgp)            # [C, v], [w - 1, v]

        def banded(coef):   # sum_j coef_j g_j = sum_e (B^T coef)_e r_e k_e^T
            return r.T @ ((Bc.T @ coef)[:, None] * kc) + rp.T @ ((Bp.T @ coef)[:, None] * kp)

        R = decay.decay_matrix(la, same)
        beta = jnp.exp(jnp.cumsum(la) if same is None else decay.segment_cumsum(la, same))
        base_y = pick(qc @ P.T, qc @ W_star.T) * beta[:, None]
        if with_s:
            Rm = decay.decay_matrix(lm, same)
            mcum = jnp.exp(jnp.cumsum(lm) if same is None else decay.segment_cumsum(lm, same))
        if form == "muon":
            G = jnp.einsum("je,ev,ed->jvd", Bc, r, kc) + jnp.einsum("je,ev,ed->jvd", Bp, rp, kp)
            S_base = pick(jnp.broadcast_to(S, (C,) + S.shape), jnp.broadcast_to(S_star, (C,) + S.shape))
            S_all = mcum[:, None, None] * S_base + jnp.einsum("ij,jvd->ivd", Rm, G)
            U = -lrc[:, None, None] * jax.vmap(lambda x: newton_schulz(x, opt.ns_steps))(S_all)
            P_base = pick(jnp.broadcast_to(P, (C,) + P.shape), jnp.broadcast_to(W_star, (C,) + P.shape))
            W_all = beta[:, None, None] * P_base + jnp.einsum("ij,jvd->ivd", R, U)
            return (W_all[-1], S_all[-1]), jnp.einsum("ivd,id->iv", W_all, qc)

        def read(Cf):       # sum_j Cf_ij g_j q_i, dual form
            return ((Cf @ Bc) * (qc @ kc.T)) @ r + ((Cf @ Bp) * (qc @ kp.T)) @ rp

        last_base = P if not packed else jnp.where(first[-1], P, W_star)
        if form == "gd":
            Cf = -R * lrc[None, :]
            return (beta[-1] * last_base + banded(Cf[-1]), S), base_y + read(Cf)
        # momentum: S_i = m_i S_{i-1} - lr_i g_i;  W_i = a_i W_{i-1} + real_i S_i
        Rr = R * mc[None, :]
        Cf = -(Rr @ Rm) * lrc[None, :]
        gamma = Rr @ mcum
        S_last = S if not packed else jnp.where(first[-1], S, S_star)
        y = base_y + gamma[:, None] * pick(qc @ S.T, qc @ S_star.T) + read(Cf)
        P_new = beta[-1] * last_base + gamma[-1] * S_last + banded(Cf[-1])
        S_new = mcum[-1] * S_last + banded(-Rm[-1] * lrc)
        return (P_new, S_new), y

    S0 = state.optimizer["W"] if with_s else jnp.zeros(())
    (P, S), y = jax.lax.scan(body, (state.memory["W"], S0), xs)
    final = MemoryState({"W": P}, state.retention, {"W": S} if with_s else state.optimizer)
    y = y.reshape((n * C,) + y.shape[2:])[:T]
    return (y if not packed else jnp.where(segments[1][:, None], y, 0.0)), final


def _materialised(spec, state: MemoryState, segments, xs, with_s: bool, T: int):
    """The materialised form (module docstring) for any memory pytree and an anchored decay; ``xs``
    as built by :func:`memorize_omega_chunked`."""
    opt, mem, ret = spec.optimizer, spec.memory, spec.retention
    form = opt.update_form
    packed = segments is not None
    tmap = jax.tree.map
    base_spec = spec.replace(bias=spec.bias.base) if window_lib.is_omega(spec) else spec
    grads = jax.vmap(lambda point, k_e, v_e, g_e: inner_grad(base_spec, point, k_e, v_e, g_e),
                     in_axes=(None, 0, 0, 0))
    reset_state = segments[2] if packed else state
    anchor = lambda st: ret.anchor_of(st.retention) if ret.anchor else tmap(jnp.zeros_like, st.memory)  # noqa: E731
    N, N_star = anchor(state), anchor(reset_state)
    W_star = reset_state.memory
    S_star = reset_state.optimizer if with_s else None
    mix = lambda M, x: tmap(lambda a: jnp.einsum("ij,j...->i...", M, a), x)  # noqa: E731
    scale = lambda c, x: tmap(lambda a: c.reshape((-1,) + (1,) * (a.ndim - 1)) * a, x)  # noqa: E731
    C = xs[0].shape[1]
    every = lambda x: tmap(lambda a: jnp.broadcast_to(a, (C,) + a.shape), x)  # noqa: E731

    @jax.checkpoint
    def body(carry, xs_c):
        P, S = carry
        qc, kc, vc, bgc, lrc, la, lm, mc, rc, kp, vp, bgp, Bx = xs_c
        w1 = kp.shape[0]
        Bp, Bc = Bx[:, :w1], Bx[:, w1:]
        first = jnp.cumsum(rc) == 0
        same = None
        if packed:
            dc = jnp.cumsum(rc)
            same = (dc[:, None] == dc[None, :]).astype(qc.dtype)

        def pick(x, y):     # [C, ...] leaves: the first document's x, the later ones' y
            return x if not packed else tmap(
                lambda a, b: jnp.where(first.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), x, y)

        g_c = grads(P, kc, vc, bgc)                                             # [C, ...] per leaf
        if packed:
            g_c = pick(g_c, grads(W_star, kc, vc, bgc))
        G = tmap(jnp.add, mix(Bc, g_c), mix(Bp, grads(P, kp, vp, bgp)))        # the window's g_j
        R = decay.decay_matrix(la, same)
        beta = jnp.exp(jnp.cumsum(la) if same is None else decay.segment_cumsum(la, same))
        anc = pick(every(N), every(N_star))
        dev = tmap(jnp.subtract, pick(every(P), every(W_star)), anc)            # W - N at the chunk start
        if with_s:
            Rm = decay.decay_matrix(lm, same)
            mcum = jnp.exp(jnp.cumsum(lm) if same is None else decay.segment_cumsum(lm, same))
            S0 = pick(every(S), every(S_star))
        if form == "gd":
            U = scale(-lrc, G)
        elif form == "momentum":   # S_i = m_i S_{i-1} - lr_i g_i;  W_i = a_i W_{i-1} + real_i S_i
            S_all = tmap(jnp.add, scale(mcum, S0), mix(Rm, scale(-lrc, G)))
            U = scale(mc, S_all)
        else:                      # Muon: S_i = m_i S_{i-1} + g_i;  u_i = -lr_i NS(S_i)
            S_all = tmap(jnp.add, scale(mcum, S0), mix(Rm, G))
            U = scale(-lrc, tmap(lambda a: jax.vmap(lambda x: newton_schulz(x, opt.ns_steps))(a), S_all))
        W_all = tmap(jnp.add, tmap(jnp.add, scale(beta, dev), mix(R, U)), anc)
        y = jax.vmap(mem.apply)(W_all, qc)
        last = lambda x: tmap(lambda a: a[-1], x)  # noqa: E731
        return (last(W_all), last(S_all) if with_s else S), y

    S0 = state.optimizer if with_s else jnp.zeros(())
    (P, S), y = jax.lax.scan(body, (state.memory, S0), xs)
    final = MemoryState(P, state.retention, S if with_s else state.optimizer)
    y = y.reshape((-1,) + y.shape[2:])[:T]
    return (y if not packed else jnp.where(segments[1][:, None], y, 0.0)), final
