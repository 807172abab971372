"""The mini-batch chunk form: one chunk forward (:func:`chunk_fwd`) for every spec the form covers,
and its hand-written VJP (:func:`chunk_bwd`) for every spec but channel-wise decay.

The semantics of ``reference.py``'s loops, for a memory of ``L`` layers ``W_l: [n_{l+1}, n_l]``
(matrix memory: ``L = 1``; MLP memory: any depth, with the optional LayerNorm and residual of
``memory.MLPMemory``), plain or implicit GD or momentum, scalar (or, matrix memory under autodiff,
channel-wise) decay and the retention chunk modes "linear", "scale" (Moneta) and "lag" (Memora).
One chunk of ``c`` tokens, one head; ``P`` the chunk-start memory, ``B`` the base of the dual state
(``P``; the accumulator ``A`` in "scale" mode; the state after token 0's exact step in "lag" mode),
``S0`` the chunk-start momentum::

    factors   X_0 = K;  Z_l = X_l P_l^T;  X_{l+1} = act(Z_l);  pred = [K +] [LN](Z_{L-1})
              E_{L-1} = LN'(Z_{L-1})^T phi(pred, V);  E_{l-1} = (E_l P_l) * act'(Z_{l-1})
              (grad_{W_l} l_i = E_l[i]^T X_l[i]: never materialised)
    end       Z_end,l = beta_c B_l + (C_c * E_l)^T X_l [+ gamma_c S0_l]   GD: C = -D * lr, gamma = 0
              S_end,l = m_c S0_l + (Cs * E_l)^T X_l                       (decay.momentum_coefficients)
    reads     Y_0 = Q;  U_l = s_l * [beta * (Y_l B_l^T) + (C * (Y_l X_l^T)) E_l [+ gamma * (Y_l S0_l^T)]]
              Y_{l+1} = act(U_l);  y = [Q +] [LN](U_{L-1})      (dual form, paper Eq. 28-32)

Why not autodiff: reverse mode through the forward stacks dozens of residual arrays per chunk
(the factors' own VJP is inside the differentiated function) and moves them around
(``experiments/bench_vjp.py`` measures both). Here the forward keeps a few ``[c, n]``
residuals per chunk (``Z``, ``E P``, the reads' pre-activations, the ``[c, c]`` scores and decay
matrix; ``E`` is recomputed from them; in "scale" mode ``(A, s)`` but not ``P = s A``), and the
backward is written out: per layer two matmuls for every forward one. Closed-form VJPs: the decay
coefficients, the activation's derivatives (one ``tanh`` per array for gelu) and Memora's softmax
(each measured by ``experiments/bench_vjp.py``). The other small pieces with no matmul in them
(the residual map ``phi``, the dual map ``log``, the l_q scale, momentum's coefficients) go
through ``jax.vjp`` locally.
``remat_every = R``: only every R-th chunk-start state is kept, and the backward recomputes each
group's forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from miras_jax import memory as memory_lib
from miras_jax import retention as retention_lib
from miras_jax.engine.segments import where_tree
from miras_jax.engine.minibatch.decay import (coefficients, coefficients_vjp, decay_matrix,
                                              momentum_coefficients, segment_cumsum)


class Layout(NamedTuple):
    """Static shape of a memory for this engine: depth, activation name, LayerNorm, residual."""

    depth: int
    act: str
    ln: bool
    res: bool


def layout(memory) -> Layout:
    if memory.kind == "linear":
        return Layout(1, "identity", False, False)
    return Layout(memory.depth, memory.activation, memory.layer_norm, memory.residual)


# --- elementwise pieces ---------------------------------------------------------------------

def _act(name):
    return memory_lib.ACTIVATIONS[name]


def _acts(name, x, n):
    """``[act(x), act'(x), act''(x)][:n]``, one evaluation (``memory.activation_derivatives``)."""
    return memory_lib.activation_derivatives(name, x, n)


def _ln_vjp(o, g, eps: float = 1e-5):
    """``LN'(o)^T g`` row-wise, ``LN`` = ``memory.layer_norm``: ``(g - mean g - n mean(g n)) / sigma``."""
    mu = jnp.mean(o, axis=-1, keepdims=True)
    xc = o - mu
    inv = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    n = xc * inv
    return inv * (g - jnp.mean(g, axis=-1, keepdims=True) - n * jnp.mean(g * n, axis=-1, keepdims=True))


# --- one chunk, one head: forward pieces ------------------------------------------------------

def _head(lay: Layout, bias, o, K, V, G, hpb):
    """``E_{L-1} = dl/dZ_{L-1}`` per token: ``pred = [K +] [LN](o)``, ``phi = bias.residual_map``."""
    pred = memory_lib.layer_norm(o) if lay.ln else o
    if lay.res:
        pred = K + pred
    phi = jax.vmap(lambda p, v, g: bias.residual_map(p, v, hpb, g))(pred, V, G).astype(o.dtype)
    return _ln_vjp(o, phi) if lay.ln else phi


def _centred(lay: Layout, W, l):
    """Layer ``l``'s weights for a product that feeds the memory's LayerNorm: with its columns
    centred (``W - mean_rows W``), ``W h`` moves by a constant per row, which the LN removes, and
    every cotangent that reaches it is mean-free, so values and gradients are unchanged. It removes
    the common mean that the LN would cancel: with Memora's positive weights (row sums ~ f) that
    cancellation turned float32 rounding of the matmul into 1e-4 errors of the reads."""
    if lay.ln and l == lay.depth - 1:
        return W - jnp.mean(W, axis=0, keepdims=True)
    return W


def _per_token(keep, a, b):
    """``a`` on the tokens where ``keep`` (``[c, 1]`` bool), ``b`` on the others; ``a`` if no ``keep``."""
    return a if keep is None else jnp.where(keep, a, b())


def _factors(lay: Layout, bias, hpb, P, K, V, G, alt=None):
    """Factors of the chunk's gradients at ``P``: ``(X, Z, E, M)`` per layer (``M_l = E_l P_l``).
    ``alt = (P_*, keep [c, 1])`` (packed rows): the tokens not in ``keep`` take theirs at ``P_*``; only
    the products with the weights run twice, the elementwise work once."""
    Ps, keep = (None, None) if alt is None else alt
    L = lay.depth
    X, Z, A1 = [K], [], []
    for l in range(L):
        Z.append(_per_token(keep, X[l] @ _centred(lay, P[l], l).T,
                            lambda: X[l] @ _centred(lay, Ps[l], l).T))               # [c, n_{l+1}]
        if l < L - 1:
            x_next, a1 = _acts(lay.act, Z[l], 2)
            X.append(x_next)
            A1.append(a1)
    E, M = [None] * L, [None] * L
    E[L - 1] = _head(lay, bias, Z[-1], K, V, G, hpb)
    for l in range(L - 1, 0, -1):
        M[l] = _per_token(keep, E[l] @ P[l], lambda: E[l] @ Ps[l])        # [c, n_l]
        E[l - 1] = M[l] * A1[l - 1]
    return X, Z, E, M


def _end_state(Bw, beta_c, C_c, X, E, N=()):
    """``Z_end,l = beta_c B_l + (C_c * E_l)^T X_l [+ N_l]``: ``[n_{l+1}, n_l]`` per layer (``N``: the
    anchor of an anchored retention, ``B`` then the deviation ``B - N``)."""
    out = [beta_c * b + (C_c[:, None] * e).T @ x for b, e, x in zip(Bw, E, X)]
    return [z + n for z, n in zip(out, N)] if N else out


def _reads(lay: Layout, Bw, beta, C, S, Q, X, E, N=(), extra=()):
    """Dual-form reads. ``S``: per-layer token scales ``[c]`` or ``None``; ``N``: anchors (each read
    adds ``Y_l N_l^T``); ``extra``: more bases, ``(coef [c], G)`` each adding ``coef * Y_l G_l^T``
    (momentum: ``(gamma, S0)``; packed rows: the reset state). Returns ``(y, Ys, YX, R)`` with ``R_l``
    the unscaled pre-activations (``U_l = S_l * R_l``)."""
    Y, YX, R = [Q], [], []
    for l in range(lay.depth):
        yx = Y[l] @ X[l].T                                               # [c, c]
        r = beta[:, None] * (Y[l] @ _centred(lay, Bw[l], l).T) + (C * yx) @ E[l]   # [c, n_{l+1}]
        if N:
            r = r + Y[l] @ _centred(lay, N[l], l).T
        for coef, G in extra:
            r = r + coef[:, None] * (Y[l] @ _centred(lay, G[l], l).T)
        YX.append(yx)
        R.append(r)
        u = r if S is None else S[l][:, None] * r
        if l < lay.depth - 1:
            Y.append(_act(lay.act)(u))
    out = memory_lib.layer_norm(u) if lay.ln else u
    return (Q + out if lay.res else out), Y, YX, R


# --- one chunk, one head: backward pieces -----------------------------------------------------

def _reads_bwd(lay: Layout, Bw, beta, C, S, X, E, Y, A1U, YX, R, dy, N=(), extra=()):
    """VJP of :func:`_reads` (``A1U_l = act'(U_l)`` for the hidden layers):
    ``(dQ, dB, dbeta, dC, dS, dX, dE, dN, dextra)`` with ``dextra = [(dcoef, dG), ...]``."""
    L = lay.depth
    dQ = dy if lay.res else None     # [c, d_k]: no residual, no d_k == d_v (poly features: D != d_v)
    u_top = R[-1] if S is None else S[-1][:, None] * R[-1]
    du = _ln_vjp(u_top, dy) if lay.ln else dy
    dB, dX, dE, dS, dN = [None] * L, [None] * L, [None] * L, [None] * L, [None] * L
    dbeta, dC = jnp.zeros_like(beta), jnp.zeros_like(C)
    dextra = [(jnp.zeros_like(beta), [None] * L) for _ in extra]
    for l in range(L - 1, -1, -1):
        if S is None:
            dr = du
        else:
            dS[l] = jnp.sum(du * R[l], axis=-1)
            dr = S[l][:, None] * du
        drB = dr @ Bw[l]                                                 # [c, n_l]
        dbeta = dbeta + jnp.sum(drB * Y[l], axis=-1)
        dB[l] = (beta[:, None] * dr).T @ Y[l]                            # [n_{l+1}, n_l]
        dscore = dr @ E[l].T                                             # [c, c]
        dE[l] = (C * YX[l]).T @ dr
        dC = dC + dscore * YX[l]
        dyx = dscore * C
        dY = beta[:, None] * drB + dyx @ X[l]
        if N:   # dr is mean-free over the LayerNorm's rows, so _centred's VJP is the identity
            dN[l] = dr.T @ Y[l]
            dY = dY + dr @ N[l]
        for i, (coef, G) in enumerate(extra):   # r += coef * (Y_l G_l^T)
            drG = dr @ G[l]                                              # [c, n_l]
            dcoef, dG = dextra[i]
            dcoef = dcoef + jnp.sum(drG * Y[l], axis=-1)
            dG[l] = (coef[:, None] * dr).T @ Y[l]
            dextra[i] = (dcoef, dG)
            dY = dY + coef[:, None] * drG
        dX[l] = dyx.T @ Y[l]
        if l > 0:
            du = dY * A1U[l - 1]
        else:
            dQ = dY if dQ is None else dQ + dY
    return dQ, dB, dbeta, dC, dS, dX, dE, (dN if N else []), dextra


def _end_bwd(Bw, beta_c, C_c, X, E, dZ):
    """VJP of :func:`_end_state`: ``(dB, dbeta_c, dC_c, dX, dE)``."""
    dB, dX, dE = [], [], []
    dbeta_c, dC_c = 0.0, jnp.zeros_like(C_c)
    for b, x, e, g in zip(Bw, X, E, dZ):
        dB.append(beta_c * g)
        dbeta_c = dbeta_c + jnp.sum(b * g)
        eg = e @ g                                                       # [c, n_l]
        dX.append(C_c[:, None] * eg)
        dC_c = dC_c + jnp.sum(eg * x, axis=-1)
        dE.append(C_c[:, None] * (x @ g.T))                              # [c, n_{l+1}]
    return dB, dbeta_c, dC_c, dX, dE


def _factors_from(lay: Layout, bias, hpb, K, V, G, Z, M, AZ):
    """The factors again from the residuals ``Z``, ``M`` (``AZ_l = (act, act', act'')(Z_l)``):
    ``(X, E, head_vjp)``; ``E_{L-1}`` comes out of the head's ``jax.vjp``, which the backward needs
    anyway, and ``E_{l-1} = M_l * act'(Z_{l-1})`` is one product: cheaper than storing them."""
    L = lay.depth
    E_top, head_vjp = jax.vjp(lambda o, K_, V_, G_, h: _head(lay, bias, o, K_, V_, G_, h), Z[-1], K, V, G, hpb)
    E = [None] * L
    E[L - 1] = E_top
    for l in range(L - 1, 0, -1):
        E[l - 1] = M[l] * AZ[l - 1][1]
    return [K] + [a[0] for a in AZ], E, head_vjp


def _factors_bwd(lay: Layout, head_vjp, P, X, AZ, E, M, dX, dE, alt=None):
    """VJP of :func:`_factors` for cotangents on ``X`` and ``E`` (``AZ_l = (act, act', act'')(Z_l)``
    for the hidden layers, ``head_vjp`` from :func:`_factors_from`): ``(dP, dK, dV, dG, dhpb, dP_*)``
    (``dP_* = []`` without ``alt``)."""
    Ps, keep = (None, None) if alt is None else alt
    L = lay.depth
    dP, dPs, dZ = [None] * L, [None] * L, [None] * L
    dX, dE = list(dX), list(dE)

    def weights_vjp(l, d, a):   # z = a @ W^T (W = P_l; P*_l off keep), d = dz: (d @ W, dW, dW*)
        if keep is None:
            return d @ P[l], d.T @ a, None
        d_in = jnp.where(keep, d, 0.0)
        return jnp.where(keep, d @ P[l], d @ Ps[l]), d_in.T @ a, (d - d_in).T @ a

    def add(acc, l, g):
        acc[l] = g if acc[l] is None else acc[l] + g

    for l in range(1, L):            # E_{l-1} = (E_l P_l) * act'(Z_{l-1}), computed top-down
        dM = dE[l - 1] * AZ[l - 1][1]
        dZ[l - 1] = dE[l - 1] * M[l] * AZ[l - 1][2]
        dE[l] = dE[l] + (dM @ P[l].T if keep is None else jnp.where(keep, dM @ P[l].T, dM @ Ps[l].T))
        add(dP, l, E[l].T @ (dM if keep is None else jnp.where(keep, dM, 0.0)))
        if keep is not None:
            add(dPs, l, E[l].T @ jnp.where(keep, 0.0, dM))
    do, dK, dV, dG, dhpb = head_vjp(dE[L - 1])
    dZ[L - 1] = do if dZ[L - 1] is None else dZ[L - 1] + do
    for l in range(L - 1, -1, -1):   # Z_l = X_l P_l^T, X_{l+1} = act(Z_l)
        dXl, dPl, dPsl = weights_vjp(l, dZ[l], X[l])
        dX[l] = dX[l] + dXl
        add(dP, l, dPl)
        if keep is not None:
            add(dPs, l, dPsl)
        if l > 0:
            extra = dX[l] * AZ[l - 1][1]
            dZ[l - 1] = extra if dZ[l - 1] is None else dZ[l - 1] + extra
    return dP, dK + dX[0], dV, dG, dhpb, ([] if keep is None else dPs)


# --- one chunk, one head: the retention modes ---------------------------------------------------

class Config(NamedTuple):
    """Everything static about a run: the memory, its layout, bias, retention and chunk mode;
    ``momentum`` (momentum GD), ``channel`` (a channel-wise decay ``log_a [c, k]``, autodiff only:
    ``plan.hand_vjp_blocker``), ``packed`` (rows with document boundaries) and ``aligned`` (packed
    rows whose documents all start at a chunk's position 0: only the position-0 swap runs, no chunk
    holds a second document)."""

    memory: object
    lay: Layout
    bias: object
    ret: object
    mode: str
    static_q: int | None = None   # "scale" mode: l_q's q when it is a known integer constant
    momentum: bool = False
    channel: bool = False
    packed: bool = False          # packed rows (``ChunkIn.reset``)
    aligned: bool = False         # packed rows, every document start on the chunk grid


def static_q(spec) -> int | None:
    """The l_q retention's ``q`` if it is a concrete integer (``retention.static_int``). Inside
    :func:`_engine`'s ``custom_vjp`` every hparam is traced, so it is taken here and kept in
    :class:`Config`: the l_q scale then multiplies instead of taking ``exp`` / ``log`` per entry.
    A traced ``q`` keeps the general path, and with it ``d/dq``."""
    return retention_lib.static_int(spec.hparams["retention"].get("q"))


class ChunkIn(NamedTuple):
    """Per-chunk inputs (one head): ``q, k [c, k]``, ``v [c, v]``, gates ``{name: [c, ...]}``,
    masked ``lr [c]``, ``log_a [c]`` (``[c, k]`` channel-wise; 0 on padding), ``first_real``: 1.0 if
    token 0 is a real token (not padding), else 0.0; momentum only (else ``None``): ``log_m [c]``
    (0 on padding) and ``real [c]`` (1.0 on real tokens; also for packed rows); packed rows only
    (else ``None``): ``reset [c]`` (1.0 where a document restarts the state, ``engine/segments.py``)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: dict
    lr: jax.Array
    log_a: jax.Array
    first_real: jax.Array
    log_m: jax.Array | None = None
    real: jax.Array | None = None
    reset: jax.Array | None = None


class ChunkResiduals(NamedTuple):
    """What :func:`chunk_fwd` keeps for :func:`chunk_bwd` (one chunk, layer ``l`` of ``L``):

    ``Z``: the keys' pre-activations at the chunk-start memory, ``Z_l = X_l P_l^T`` ``[c, n_{l+1}]``;
    ``M1``: ``M_l = E_l P_l`` for ``l >= 1`` (the factors' back-propagated part); ``YX``: the reads'
    ``Y_l X_l^T`` ``[c, c]``; ``R``: the reads' unscaled pre-activations ``[c, n_{l+1}]``; ``D``:
    the decay matrix ``[c, c]``."""

    Z: list
    M1: list
    YX: list
    R: list
    D: jax.Array


def _coeff_inputs(mode, lr, log_a):
    """In "lag" mode token 0 is the exact step, so it is left out of the linear part."""
    if mode == "lag":
        return lr.at[0].set(0.0), log_a.at[0].set(0.0)
    return lr, log_a


def _coeffs(mode, lr, log_a, D=None):
    """``(C, beta, D)``; the decay matrix ``D`` (the chunk's one ``[c, c]`` of ``exp``) is a residual."""
    lr, log_a = _coeff_inputs(mode, lr, log_a)
    D = decay_matrix(log_a) if D is None else D
    return (*coefficients(lr, log_a, D), D)


def _coeffs_bwd(mode, C, beta, D, dC, dbeta):
    dlr, dla = coefficients_vjp(C, beta, D, dC, dbeta)
    if mode == "lag":
        dlr, dla = dlr.at[0].set(0.0), dla.at[0].set(0.0)
    return dlr, dla


def _lag_dual(cfg: Config, hpr, P):
    """``Z0_l = to_dual(project(P_l))``: the dual of the chunk-start memory (Memora: ``log P``)."""
    mem, ret = cfg.memory, cfg.ret
    return mem.leaves(ret.to_dual(ret.project(mem.from_leaves(P)), hpr))


def _lag_z(Z0, E0, X0, lr0, la0, Nd=()):
    """The first token's exact step in the dual space: ``z_l = a_0 Z0_l [+ (1 - a_0) Nd_l] - lr_0 E_l[0] X_l[0]^T``
    (``Nd``: the dual anchor ``z_*`` of an anchored retention)."""
    a = jnp.exp(la0)
    z = [a * d - lr0 * jnp.outer(e, x) for d, e, x in zip(Z0, E0, X0)]
    return [zi + (1.0 - a) * n for zi, n in zip(z, Nd)] if Nd else z


def _from_dual(cfg: Config, hpr, z):
    return cfg.memory.leaves(cfg.ret.from_dual(cfg.memory.from_leaves(z), hpr))


def _lag_fwd(cfg: Config, hpr, P, E0, X0, lr0, la0, first_real, Nd=(), Z0=None):
    """Memora's first token: ``W1_l = from_dual(z_l)`` (``retention.step`` on ``project(P)``); the base
    is ``W1`` (``P`` itself if token 0 is padding). ``Z0``: :func:`_lag_dual` if already taken.
    Returns ``(base, W1)``."""
    Z0 = _lag_dual(cfg, hpr, P) if Z0 is None else Z0
    W1 = _from_dual(cfg, hpr, _lag_z(Z0, E0, X0, lr0, la0, Nd))
    return [jnp.where(first_real > 0, w, p) for w, p in zip(W1, P)], W1


def _lag_bwd(cfg: Config, hpr, lag_in, W1, Z0, dual_vjp, g):
    """VJP of :func:`_lag_fwd` at ``lag_in = (P, E0, X0, lr0, la0, first_real, Nd)`` for the base's
    cotangent ``g``, given ``W1``, ``Z0`` and ``Z0``'s VJP: ``(dP, dE0, dX0, dlr0, dla0, dhpr, dNd)``.
    ``from_dual``'s VJP is taken in closed form from its output ``W1`` where the retention has one
    (``from_dual_vjp``: Memora's softmax); otherwise by ``jax.vjp`` at ``z``."""
    P, E0, X0, lr0, la0, first_real, Nd = lag_in
    keep = first_real > 0
    g1 = [jnp.where(keep, gi, 0.0) for gi in g]
    if hasattr(cfg.ret, "from_dual_vjp"):
        dz = [cfg.ret.from_dual_vjp(w, gi) for w, gi in zip(W1, g1)]
        dh_from = jax.tree.map(jnp.zeros_like, hpr)
    else:
        _, from_vjp = jax.vjp(lambda z, h: _from_dual(cfg, h, z), _lag_z(Z0, E0, X0, lr0, la0, Nd), hpr)
        dz, dh_from = from_vjp(g1)
    a = jnp.exp(la0)
    dla0 = a * sum(jnp.sum(dzi * di) for dzi, di in zip(dz, Z0))
    dNd = [(1.0 - a) * dzi for dzi in dz] if Nd else []
    if Nd:
        dla0 = dla0 - a * sum(jnp.sum(dzi * n) for dzi, n in zip(dz, Nd))
    dzx = [dzi @ x for dzi, x in zip(dz, X0)]                        # [n_{l+1}]
    dlr0 = -sum(jnp.dot(e, v) for e, v in zip(E0, dzx))
    dE0 = [-lr0 * v for v in dzx]
    dX0 = [-lr0 * (e @ dzi) for e, dzi in zip(E0, dz)]
    dP, dh_to = dual_vjp([a * dzi for dzi in dz])
    dP = [dp + jnp.where(keep, 0.0, gi) for dp, gi in zip(dP, g)]
    return dP, dE0, dX0, dlr0, dla0, jax.tree.map(jnp.add, dh_from, dh_to), dNd


def _scales(cfg: Config, hpr, Z):
    if cfg.static_q is not None:
        hpr = {**hpr, "q": cfg.static_q}
    return [cfg.ret.scale(z, hpr) for z in Z]


def _scales_with_vjp(cfg: Config, hpr, Z):
    """``(s, vjp)`` for the scales of ``Z``; ``vjp(ds) -> (dZ, dhpr)`` (``jax.vjp``: a closed form from
    the l_q norm's two sums measured no faster, ``experiments/bench_vjp.py``)."""
    return jax.vjp(lambda z, h: _scales(cfg, h, z), Z, hpr)


def _token_scales(s_end, s_prev, c):
    """Moneta's reads: ``s(A_0)`` for every token but the chunk's last (``s(A_end)``): ``[c]`` per layer."""
    last = jnp.arange(c) == c - 1
    return [jnp.where(last, se, sp) for se, sp in zip(s_end, s_prev)]


def _channel_chunk(B, N, x: ChunkIn, delta, B_star=None):
    """Matrix memory, GD, channel-wise decay ``log_a [c, k]`` (GLA-like): ``(W_end, y [c, v])`` with
    ``D_ijk = prod_{j<l<=i} a_lk``, ``beta_ik = prod_{l<=i} a_lk``, ``delta = E_0`` ``[c, v]``:
    ``y_i = B (beta_i * q_i) - sum_j lr_j (sum_k k_jk D_ijk q_ik) delta_j [+ N q_i]``,
    ``W_end = B diag(beta_c) - sum_j lr_j delta_j (k_j * D_cj)^T [+ N]`` (``B`` the deviation from ``N``).
    Packed rows (``x.reset``; ``B_star`` the reset base, less ``N``): products run within a document
    (``D`` 0 across documents), ``beta`` reaches ``B`` from the chunk's first document only, and a later
    one adds ``B_star (rho_i * q_i)``, ``rho_ik = prod_{s<=l<=i} a_lk`` (``s`` its first token)."""
    if B_star is None:   # one document (aligned packed rows too: a restart only at position 0)
        D = decay_matrix(x.log_a)                                        # [c, c, k]
        beta = jnp.exp(jnp.cumsum(x.log_a, axis=0))                      # [c, k]
    else:
        same, first = _documents(x.reset)                                # [c, c], [c]
        D = decay_matrix(x.log_a, same)                                  # [c, c, k]
        e = jnp.exp(segment_cumsum(x.log_a, same))                       # [c, k], within documents
        beta, rho = e * first[:, None], e * (1.0 - first)[:, None]
    (W0,) = B
    scores = jnp.einsum("jk,ijk,ik->ij", x.k, D, x.q) * (-x.lr)[None, :]
    y = (x.q * beta) @ W0.T + scores @ delta
    W_end = W0 * beta[-1][None, :] + jnp.einsum("jv,j,jk->vk", delta, -x.lr, x.k * D[-1])
    if B_star is not None:
        y, W_end = y + (x.q * rho) @ B_star[0].T, W_end + B_star[0] * rho[-1][None, :]
    if N:
        y, W_end = y + x.q @ N[0].T, W_end + N[0]
    return [W_end], y


def _documents(reset):
    """Packed rows, one chunk: ``(same [c, c], first [c])``: ``same_ij`` 1 where tokens i, j are in one
    document, ``first_i`` 1 for the chunk's first document (a restart at position 0 swaps the
    chunk-start state instead, so it does not count)."""
    doc = jnp.cumsum(reset.at[0].set(0.0))
    return (doc[:, None] == doc[None, :]).astype(reset.dtype), (doc == 0).astype(reset.dtype)


def _packed_coefficients(cfg: Config, lr, log_a, log_m, real, reset):
    """Packed rows: ``(C, beta, rho[, gamma, m_end, Cs_end])``, the coefficients of one chunk within
    documents: ``C`` and momentum's ``Cs_end`` are 0 across documents, ``beta``, ``gamma`` and ``m_end``
    reach the chunk-start state from the chunk's first document only, and ``rho_i = exp(L_i)`` (``L_i``
    the decay since token i's document start) weighs the reset state for the later documents (0 in
    the first). ``[c, c]`` / ``[c]``; scalars for ``m_end``."""
    same, first = _documents(reset)
    lr_, la_ = _coeff_inputs(cfg.mode, lr, log_a)
    e = jnp.exp(segment_cumsum(la_, same))    # "lag" leaves token 0 (the first document's) out
    if not cfg.momentum:
        return -decay_matrix(la_, same) * lr_[None, :], e * first, e * (1.0 - first)
    C, _, gamma, m_end, Cs_end = momentum_coefficients(lr, log_a, log_m, real, decay_matrix(log_a, same), same)
    return C, e * first, e * (1.0 - first), gamma * first, m_end * first[-1], Cs_end


def _swap(hp, x: ChunkIn, state):
    """Packed rows: a document starting at the chunk's position 0 starts it from the reset state
    (``state = (P, A, Mom, s)``; momentum restarts at 0)."""
    rs = hp["reset"]
    return where_tree(x.reset[0] > 0, (rs["P"], rs["A"], [jnp.zeros_like(m) for m in state[2]], rs["s"]), state)


def _swap_bwd(x: ChunkIn, d):
    """VJP of :func:`_swap` for ``d = (dP, dA, dMom, ds)``: ``(d_state, d_reset {"P", "A", "s"})``."""
    r0 = x.reset[0] > 0
    dP, dA, dMom, ds = d
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)   # noqa: E731
    kept = where_tree(r0, zero(d), d)
    to_reset = where_tree(r0, (dP, dA, ds), zero((dP, dA, ds)))
    return kept, dict(zip(("P", "A", "s"), to_reset))


def _bases(cfg: Config, hp, Bw, N, mom, rho):
    """The extra read bases ``(coef [c], G)``: momentum's ``(gamma, S0)``, packed rows' reset state
    ``(rho, B_* [- N])`` (the accumulator in "scale" mode)."""
    extra = [] if mom is None else [mom]
    if rho is not None:
        B_star = hp["reset"]["A"] if cfg.mode == "scale" else hp["reset"]["P"]
        extra.append((rho, [b - n for b, n in zip(B_star, N)] if N else B_star))
    return extra


def chunk_fwd(cfg: Config, hp, P, A, Mom, s_prev, x: ChunkIn):
    """One chunk: ``(P_end, A_end, Mom_end, s_end, y [c, v], ChunkResiduals)``. ``A``, ``s`` are ``[]``
    unless "scale"; ``Mom`` (the momentum state ``S``) is ``[]`` unless ``cfg.momentum``. The only
    forward of the mini-batch form: :func:`chunk_bwd` is its VJP, and autodiff differentiates it
    where there is none (channel-wise decay: residuals ``None``). Packed rows (``x.reset``): the
    chunk's first document continues from the chunk-start state, a later one from ``hp["reset"]``
    (``reference.py``'s semantics)."""
    lay, mode = cfg.lay, cfg.mode
    c = x.q.shape[0]
    packed = x.reset is not None
    split = packed and not cfg.aligned   # a document may start inside the chunk
    if packed:
        P, A, Mom, s_prev = _swap(hp, x, (P, A, Mom, s_prev))
    if split:
        first = _documents(x.reset)[1]
    mom = rho = D = None
    if split and not cfg.channel:
        C, beta, rho, *m = _packed_coefficients(cfg, x.lr, x.log_a, x.log_m, x.real, x.reset)
    elif cfg.momentum:
        C, beta, *m = momentum_coefficients(x.lr, x.log_a, x.log_m, x.real, decay_matrix(x.log_a))
    elif not cfg.channel:
        C, beta, D = _coeffs(mode, x.lr, x.log_a)
    if cfg.momentum:
        gamma, m_end, Cs_end = m
        mom = (gamma, Mom)
    # packed rows: the chunk's later documents take their gradients at the reset memory
    alt = (hp["reset"]["P"], first[:, None] > 0) if split else None
    X, Z, E, M = _factors(lay, cfg.bias, hp["bias"], P, x.k, x.v, x.g, alt)
    N = hp["anchor"]
    if mode == "linear":
        Bw = P
    elif mode == "scale":
        Bw = A
    else:
        Bw, _ = _lag_fwd(cfg, hp["retention"], P, [e[0] for e in E], [z[0] for z in X], x.lr[0],
                         x.log_a[0], x.first_real, hp["anchor_dual"])
    if N:   # anchored retention: the algebra runs on the deviation B - N
        Bw = [b - n for b, n in zip(Bw, N)]
    if cfg.channel:
        B_star = None
        if split:   # the chunk's later documents restart from the reset memory (less the anchor)
            B_star = [b - n for b, n in zip(hp["reset"]["P"], N)] if N else hp["reset"]["P"]
        P_end, y = _channel_chunk(Bw, N, x, E[0], B_star)
        return P_end, A, Mom, [], y, None
    extra = _bases(cfg, hp, Bw, N, mom, rho)   # more bases: W_i += coef_i G
    Z_end = _end_state(Bw, beta[-1], C[-1], X, E, N)
    for coef, G in extra:
        Z_end = [z + coef[-1] * g for z, g in zip(Z_end, G)]
    if mom is not None:   # S_end = m_end S_0 + sum_j Cs_j E_j^T X_j
        Mom = _end_state(Mom, m_end, Cs_end, X, E)
    if mode == "scale":
        s_end = _scales(cfg, hp["retention"], Z_end)
        if split:   # later documents read with s(A_*)
            s_prev = [jnp.where(first > 0, sp, si) for sp, si in zip(s_prev, hp["reset"]["s"])]
        S = _token_scales(s_end, s_prev, c)
        P_end, A_end = [s * z for s, z in zip(s_end, Z_end)], Z_end
        if packed:   # a chunk of pad tokens only keeps P (reference.py: P = W_0 need not be s(A_0) A_0)
            P_end = [jnp.where(jnp.any(x.real > 0), pe, p) for pe, p in zip(P_end, P)]
    else:
        s_end, S, P_end, A_end = [], None, Z_end, A
    y, _, YX, R = _reads(lay, Bw, beta, C, S, x.q, X, E, N, extra)
    return P_end, A_end, Mom, s_end, y, ChunkResiduals(Z, M[1:], YX, R, D)


def chunk_bwd(cfg: Config, hp, P, A, Mom, s_prev, x: ChunkIn, resid: ChunkResiduals, A_next, dy, dP_end,
              dA_end, dMom_end, ds_end):
    """VJP of :func:`chunk_fwd` (scalar decay) given the cotangents of ``y``, ``P_end``, ``A_end``,
    ``Mom_end`` and ``s_end`` (``A_next`` = this chunk's ``A_end``, "scale" only).
    Returns ``(dP, dA, dMom, ds_prev, dhp, dx)``. Momentum's and packed rows' ``[c, c]`` coefficients
    go through ``jax.vjp`` (no matmul over the state in them)."""
    lay, mode, act = cfg.lay, cfg.mode, cfg.lay.act
    c = x.q.shape[0]
    packed = x.reset is not None
    split = packed and not cfg.aligned
    if packed:
        P, A, Mom, s_prev = _swap(hp, x, (P, A, Mom, s_prev))
    if split:
        first = _documents(x.reset)[1]
    Z, M1, YX, R, D = resid
    M = [None, *M1]
    AZ = [_acts(act, z, 3) for z in Z[:-1]]
    X, E, head_vjp = _factors_from(lay, cfg.bias, hp["bias"], x.k, x.v, x.g, Z, M, AZ)
    mom = rho = None
    if split or cfg.momentum:
        coeffs = functools.partial(_packed_coefficients, cfg) if split else (
            lambda lr, la, lm, real, _: momentum_coefficients(lr, la, lm, real, decay_matrix(la)))
        (C, beta, *m), coeff_vjp = jax.vjp(lambda lr, la, lm: coeffs(lr, la, lm, x.real, x.reset),
                                           x.lr, x.log_a, x.log_m)
        if split:
            rho, *m = m
        if cfg.momentum:
            gamma, m_end, Cs_end = m
            mom = (gamma, Mom)
    else:
        C, beta, _ = _coeffs(mode, x.lr, x.log_a, D)
    hpr = hp["retention"]
    dhpr = jax.tree.map(jnp.zeros_like, hpr)
    if mode == "lag":
        lag_in = (P, [e[0] for e in E], [z[0] for z in X], x.lr[0], x.log_a[0], x.first_real, hp["anchor_dual"])
        Z0, dual_vjp = jax.vjp(lambda P_, h: _lag_dual(cfg, h, P_), P, hpr)
        Bw, W1 = _lag_fwd(cfg, hpr, *lag_in, Z0=Z0)   # recomputed: as fast as keeping W1
    else:
        Bw = A if mode == "scale" else P
    N = hp["anchor"]
    if N:
        Bw = [b - n for b, n in zip(Bw, N)]
    extra = _bases(cfg, hp, Bw, N, mom, rho)
    dP_keep = None
    if mode == "scale":
        if packed:   # an all-pad chunk keeps P
            any_real = jnp.any(x.real > 0)
            dP_keep = [jnp.where(any_real, 0.0, g) for g in dP_end]
            dP_end = [jnp.where(any_real, g, 0.0) for g in dP_end]
        s_end, scale_vjp = _scales_with_vjp(cfg, hpr, A_next)
        s_tok = [jnp.where(first > 0, sp, si) for sp, si in zip(s_prev, hp["reset"]["s"])] if split else s_prev
        S = _token_scales(s_end, s_tok, c)
        ds_end = [d + jnp.sum(g * z) for d, g, z in zip(ds_end, dP_end, A_next)]
        dZ_end = [da + s * g for da, s, g in zip(dA_end, s_end, dP_end)]
    else:
        S, dZ_end = None, list(dP_end)
    AU = [_acts(act, r if S is None else S[l][:, None] * r, 2) for l, r in enumerate(R[:-1])]
    Y = [x.q] + [a[0] for a in AU]
    dq, dB, dbeta, dC, dS, dX, dE, dN, dextra = _reads_bwd(lay, Bw, beta, C, S, X, E, Y, [a[1] for a in AU],
                                                           YX, R, dy, N, extra)
    ds_prev, ds_reset = [], []
    if mode == "scale":
        last = jnp.arange(c) == c - 1
        ds_end = [d + jnp.sum(jnp.where(last, g, 0.0)) for d, g in zip(ds_end, dS)]
        if split:
            ds_prev = [jnp.sum(jnp.where(last | (first == 0), 0.0, g)) for g in dS]
            ds_reset = [jnp.sum(jnp.where(last | (first > 0), 0.0, g)) for g in dS]
        else:
            ds_prev = [jnp.sum(jnp.where(last, 0.0, g)) for g in dS]
        dZ_s, dh = scale_vjp(ds_end)
        dZ_end = [a + b for a, b in zip(dZ_end, dZ_s)]
        dhpr = jax.tree.map(jnp.add, dhpr, dh)
    dB_e, dbeta_c, dC_c, dX_e, dE_e = _end_bwd(Bw, beta[-1], C[-1], X, E, dZ_end)
    dB = [a + b for a, b in zip(dB, dB_e)]
    dcoefs, dG = [], []
    for (coef, G), (dcoef, dGi) in zip(extra, dextra):   # Z_end += coef_c G
        dcoefs.append(dcoef.at[-1].add(sum(jnp.sum(g * z) for g, z in zip(G, dZ_end))))
        dG.append([a + coef[-1] * z for a, z in zip(dGi, dZ_end)])
    if N:   # Z_end = ... + N directly, and B - N everywhere B entered (the reset base too)
        dN = [r + z - b for r, z, b in zip(dN, dZ_end, dB)]
        if split:
            dN = [a - b for a, b in zip(dN, dG[-1])]
    dX = [a + b for a, b in zip(dX, dX_e)]
    dE = [a + b for a, b in zip(dE, dE_e)]
    dbeta = dbeta.at[-1].add(dbeta_c)
    dC = dC.at[-1].add(dC_c)
    dMom = []
    if mom is not None:   # S_end = m_end S0 + (Cs * E)^T X
        dMo, dm_end, dCs, dX_m, dE_m = _end_bwd(Mom, m_end, Cs_end, X, E, dMom_end)
        dMom = [a + b for a, b in zip(dG[0], dMo)]
        dX = [a + b for a, b in zip(dX, dX_m)]
        dE = [a + b for a, b in zip(dE, dE_m)]
    dlr0 = dla0 = 0.0
    dNd = []
    if mode == "lag":
        dP, dE0, dX0, dlr0, dla0, dh, dNd = _lag_bwd(cfg, hpr, lag_in, W1, Z0, dual_vjp, dB)
        dE = [e.at[0].add(g) for e, g in zip(dE, dE0)]
        dX = [z.at[0].add(g) for z, g in zip(dX, dX0)]
        dhpr = jax.tree.map(jnp.add, dhpr, dh)
        dA = A
    elif mode == "scale":
        dP, dA = None, dB
    else:
        dP, dA = dB, A
    alt = (hp["reset"]["P"], first[:, None] > 0) if split else None
    dP_f, dk, dv, dg, dhpb, dP_star = _factors_bwd(lay, head_vjp, P, X, AZ, E, M, dX, dE, alt)
    dP = dP_f if dP is None else [a + b for a, b in zip(dP, dP_f)]
    if dP_keep is not None:
        dP = [a + b for a, b in zip(dP, dP_keep)]
    dlm = None
    if split or cfg.momentum:
        dcoef_out = (dC, dbeta) + ((dcoefs[-1],) if split else ()) + (
            (dcoefs[0], dm_end, dCs) if cfg.momentum else ())
        dlr, dla, dlm = coeff_vjp(dcoef_out)
    else:
        dlr, dla = _coeffs_bwd(mode, C, beta, D, dC, dbeta)
    dmask = (dlm, None if x.real is None else jnp.zeros_like(x.real))
    dlr, dla = dlr.at[0].add(dlr0), dla.at[0].add(dla0)
    dhp = {"bias": dhpb, "retention": dhpr, "anchor": dN, "anchor_dual": dNd}
    reset = None
    if packed:
        (dP, dA, dMom, ds_prev), d_rs = _swap_bwd(x, (dP, dA, dMom, ds_prev))
        if split and mode == "scale":
            d_rs["A"] = [a + b for a, b in zip(d_rs["A"], dG[-1])]
            d_rs["s"] = [a + b for a, b in zip(d_rs["s"], ds_reset)]
        elif split:
            d_rs["P"] = [a + b for a, b in zip(d_rs["P"], dG[-1])]
        if split:
            d_rs["P"] = [a + b for a, b in zip(d_rs["P"], dP_star)]
        dhp["reset"] = d_rs
        reset = jnp.zeros_like(x.reset)
    dx = ChunkIn(dq, dk, dv, dg, dlr, dla, jnp.zeros_like(x.first_real), *dmask, reset)
    return dP, dA, dMom, ds_prev, dhp, dx


# --- the sequence: forward scan, reverse scan -----------------------------------------------------

def _stored(cfg: Config, carry):
    """What the forward keeps of a chunk-start state ``(P, A, Mom, s)``: in "scale" mode ``P = s A``
    for every chunk but the first (the forward computes ``P_end`` so: the same rounding), so
    ``([], A, Mom, s)``. Packed rows too: a chunk of padding keeps ``P``, which is ``s A`` but where
    no real token came before (:func:`_leading`)."""
    P, A, Mom, s = carry
    return ([] if cfg.mode == "scale" else P), A, Mom, s


def _leading(xs: ChunkIn):
    """``[n]`` bool: no real token before chunk i (chunk 0; packed rows: all its predecessors are
    padding), so its start ``P`` is ``P0``."""
    n = xs.q.shape[0]
    if xs.reset is None:
        return jnp.arange(n) == 0
    seen = jnp.cumsum(jnp.any(xs.real > 0, axis=1).astype(jnp.int32))
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), seen[:-1]]) == 0


def _restored(P0, stored, first):
    """Inverse of :func:`_stored`; ``first``: whether the chunk's ``P`` is ``P0`` (:func:`_leading`)."""
    P, A, Mom, s = stored
    if not P:
        P = [jnp.where(first, p0, s_ * a) for p0, s_, a in zip(P0, s, A)]
    return P, A, Mom, s


def _fwd_scan(cfg: Config, hp, P0, A0, xs: ChunkIn, group: int, save: bool, Mom0=(), remat: bool = False):
    """Chunks in order. ``group = 0``: with ``save`` keep every chunk's start state and residuals;
    ``group = R``: keep only the start state of every R-th chunk (``save``: for the hand backward;
    ``remat``: for autodiff, each group a ``jax.checkpoint``). Returns ``(y, (P, A, Mom), saved)``."""
    s0 = _scales(cfg, hp["retention"], A0) if cfg.mode == "scale" else []
    Mom0 = list(Mom0)

    def step(carry, x):
        P_end, A_end, Mom_end, s_end, y, resid = chunk_fwd(cfg, hp, *carry, x)
        keep = (_stored(cfg, carry), resid) if (save and not group) else None
        return (P_end, A_end, Mom_end, s_end), (y, keep)

    if not group:
        (P, A, Mom, _), (y, saved) = jax.lax.scan(step, (P0, A0, Mom0, s0), xs)
        return y, (P, A, Mom), saved
    xg = jax.tree.map(lambda a: a.reshape((-1, group) + a.shape[1:]), xs)

    def group_step(carry, x):
        end, (y, _) = jax.lax.scan(step, carry, x)
        return end, (y, carry if save else None)

    if remat:
        group_step = jax.checkpoint(group_step)
    (P, A, Mom, _), (y, saved) = jax.lax.scan(group_step, (P0, A0, Mom0, s0), xg)
    return y.reshape((-1,) + y.shape[2:]), (P, A, Mom), saved


def _bwd_scan(cfg: Config, hp, P0, A0, xs: ChunkIn, group: int, saved, A_final, dy, dP_end, dA_end,
              dMom_end):
    """Chunks in reverse, carrying the cotangents of the chunk-end state and of ``s_end``; returns
    ``(dhp, dP0, dA0, dMom0, dxs)``."""

    def bstep(carry, inp):
        dP, dA, dMom, ds, dhp, A_next = carry
        stored, resid, x, dy_c, first = inp
        P, A, Mom, s = _restored(P0, stored, first)
        dP, dA_new, dMom, ds, dh, dx = chunk_bwd(cfg, hp, P, A, Mom, s, x, resid, A_next, dy_c, dP, dA,
                                                 dMom, ds)
        return (dP, dA_new, dMom, ds, jax.tree.map(jnp.add, dhp, dh), A), dx

    init = (list(dP_end), list(dA_end), list(dMom_end), [jnp.zeros((), P0[0].dtype) for _ in A0],
            jax.tree.map(jnp.zeros_like, hp), list(A_final))
    if not group:
        states, resid = saved
        first = _leading(xs)
        (dP, dA, dMom, ds, dhp, _), dxs = jax.lax.scan(bstep, init, (states, resid, xs, dy, first), reverse=True)
    else:
        xg = jax.tree.map(lambda a: a.reshape((-1, group) + a.shape[1:]), (xs, dy))

        def bgroup(carry, inp):
            start, (x, dy_g) = inp

            def step(c_, x_):   # recompute the group's chunk-start states and residuals
                P_end, A_end, Mom_end, s_end, _, resid = chunk_fwd(cfg, hp, *c_, x_)
                return (P_end, A_end, Mom_end, s_end), (c_, resid)

            _, (states, resid) = jax.lax.scan(step, start, x)
            return jax.lax.scan(bstep, carry, (states, resid, x, dy_g, jnp.zeros(group, bool)), reverse=True)

        (dP, dA, dMom, ds, dhp, _), dxs = jax.lax.scan(bgroup, init, (saved, xg), reverse=True)
        dxs = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), dxs)
    if cfg.mode == "scale":   # s_prev of chunk 0 is s(A_0)
        _, vjp = jax.vjp(lambda a, h: _scales(cfg, h, a), A0, hp["retention"])
        dA0, dh = vjp(ds)
        dA = [a + b for a, b in zip(dA, dA0)]
        dhp = {**dhp, "retention": jax.tree.map(jnp.add, dhp["retention"], dh)}
    return dhp, dP, dA, dMom, dxs


@functools.lru_cache(maxsize=None)
def _engine(cfg: Config, group: int):
    """``run(hp, P0, A0, Mom0, xs) -> (y [n, c, v], P_end, A_end, Mom_end)`` with its hand-written VJP."""

    @jax.custom_vjp
    def run(hp, P0, A0, Mom0, xs):
        y, (P, A, Mom), _ = _fwd_scan(cfg, hp, P0, A0, xs, group, save=False, Mom0=Mom0)
        return y, P, A, Mom

    def fwd(hp, P0, A0, Mom0, xs):
        y, (P, A, Mom), saved = _fwd_scan(cfg, hp, P0, A0, xs, group, save=True, Mom0=Mom0)
        return (y, P, A, Mom), (hp, P0, A0, xs, saved, A)

    def bwd(res, cts):
        hp, P0, A0, xs, saved, A_final = res
        dy, dP_end, dA_end, dMom_end = cts
        return _bwd_scan(cfg, hp, P0, A0, xs, group, saved, A_final, dy, dP_end, dA_end, dMom_end)

    run.defvjp(fwd, bwd)
    return run


def memorize(spec, state, xs: ChunkIn, group: int = 0, autodiff: bool = False, reset_state=None,
             aligned: bool = False):
    """One head: the chunks ``xs`` (leaves ``[n, c, ...]``) from ``state``; ``group = R > 0`` keeps
    every R-th chunk-start state only (``remat_every``). Returns ``(y [n, c, v], P_end, A_end, S_end)``
    as leaf lists (``A`` is ``[]`` unless the retention is "scale", ``S`` the momentum state, ``[]``
    without momentum). ``autodiff`` (forced where ``plan.hand_vjp_blocker`` names a blocker): the same
    forward (:func:`chunk_fwd` scanned), differentiated by JAX instead of the hand-written backward.
    ``reset_state``: packed rows (``xs.reset``), the state a document restarts from; ``aligned``: they
    restart only at a chunk's position 0 (the caller's promise, :func:`Config`)."""
    mem, ret = spec.memory, spec.retention
    mode = ret.chunk_mode
    momentum = spec.optimizer.update_form == "momentum"
    cfg = Config(mem, layout(mem), spec.bias, ret, mode, static_q(spec) if mode == "scale" else None,
                 momentum, xs.log_a.ndim == 3, xs.reset is not None, aligned and xs.reset is not None)
    anchor = ret.anchor_of(state.retention)
    # the anchor is constant over chunks: its cotangent accumulates over the reverse scan like a
    # hyper-parameter's. "lag" runs its linear part in the primal (anchor from_dual(z_*)) and the
    # first token's exact step in the dual (z_*).
    lag_anchor = anchor is not None and mode == "lag"
    hp = {"bias": spec.hparams["bias"], "retention": spec.hparams["retention"],
          "anchor": [] if anchor is None else mem.leaves(
              ret.from_dual(anchor, spec.hparams["retention"]) if lag_anchor else anchor),
          "anchor_dual": mem.leaves(anchor) if lag_anchor else []}
    A0 = mem.leaves(ret.acc(state.retention)) if cfg.mode == "scale" else []
    P0 = mem.leaves(state.memory)
    if xs.reset is not None:
        A_star = mem.leaves(ret.acc(reset_state.retention)) if cfg.mode == "scale" else []
        hp["reset"] = {"P": mem.leaves(reset_state.memory), "A": A_star,
                       "s": _scales(cfg, spec.hparams["retention"], A_star) if A_star else []}
    Mom0 = mem.leaves(state.optimizer) if momentum else []
    if autodiff or cfg.channel:
        y, (P, A, S), _ = _fwd_scan(cfg, hp, P0, A0, xs, group, save=False, Mom0=Mom0, remat=True)
        return y, P, A, S
    return _engine(cfg, group)(hp, P0, A0, Mom0, xs)
