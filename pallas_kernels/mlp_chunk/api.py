"""``mlp_chunk``: the 2-layer MLP memory (Moneta / Yaad / Memora / TTT-MLP) trained chunk by chunk
with mini-batch gradient steps, as a Pallas kernel. See ``chunk.py`` for the math."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import layout
from pallas_kernels.common import segments as segments_lib
from pallas_kernels.common.segments import Segments
from pallas_kernels.common.vjp import chunk_sweep
from pallas_kernels.mlp_chunk import chunk, reference
from pallas_kernels.mlp_chunk.config import MLPChunkConfig, MLPChunkState

IMPLEMENTATIONS = ("pallas", "reference")


def mlp_chunk(q, k, v, lr, m0, log_decay=None, a0=None, gate=None, hparams=None, anchor=None, *,
              config: MLPChunkConfig, implementation: str = "pallas",
              backend: str | None = None, interpret: bool | None = None,
              segments: Segments | None = None, log_momentum=None, s0=None):
    """Sweep the MLP-memory recurrence over ``T`` tokens, every (batch, head) row in parallel.

    Args:
      q, k, v: ``[B, H, T, d]``; lr: ``[B, H, T]``; m0: ``(W_0 [B, H, f, d], W_1 [B, H, d, f])``
        initial weights; log_decay: ``[B, H, T]`` (``None``: no decay); a0: initial l_q
        accumulators (``"scale"``; ``None``: ``m0``); gate: ``[B, H, T]`` Huber threshold gate;
        hparams: dict of scalars ``p, a, eps, delta_scale, q`` (traced); anchor: the dual anchors
        ``(N_0 [B, H, f, d], N_1 [B, H, d, f])`` of an anchored retention (``config.anchor``).
      config: static ``MLPChunkConfig``; implementation ``"pallas"`` | ``"reference"``;
      backend / interpret: as in ``matrix_chunk``.
      segments: packed rows (``common/segments.py``): ``Segments(reset, real [B, H, T], memory
        (W_*0, W_*1), accumulator (A_*0, A_*1) or None)``: a document restarts from the reset weights
        (and l_q accumulators; the anchors stay); pad tokens neither write nor read (``y = 0``);
        ``segments.momentum``: the reset ``(S_*0, S_*1)`` (``None``: zeros).
      log_momentum: ``[B, H, T]`` ``log m_t`` (``config.momentum``); s0: initial ``(S_0, S_1)``
        (``None``: zeros).

    Returns:
      ``(y [B, H, T, d] in v's dtype, MLPChunkState)``; state in float32.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(config, MLPChunkConfig):
        raise TypeError(f"config must be an MLPChunkConfig, got {type(config).__name__}")
    B, H, T, d, dv = layout.check_common(q, k, v, lr, log_decay, gate)
    if dv != d:
        raise ValueError(f"the residual MLP memory needs d_k == d_v, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if not (isinstance(m0, (tuple, list)) and len(m0) == 2):
        raise TypeError("m0 must be a pair (W_0 [B, H, f, d], W_1 [B, H, d, f])")
    f = m0[0].shape[2] if hasattr(m0[0], "shape") and m0[0].ndim == 4 else None
    layout.check("m0[0]", m0[0], (B, H, f, d))
    layout.check("m0[1]", m0[1], (B, H, d, f))
    if config.retention == "scale":
        a0 = tuple(m0) if a0 is None else a0
        layout.check("a0[0]", a0[0], (B, H, f, d))
        layout.check("a0[1]", a0[1], (B, H, d, f))
    if config.anchor:
        if not (isinstance(anchor, (tuple, list)) and len(anchor) == 2):
            raise TypeError("config.anchor needs anchor=(N_0 [B, H, f, d], N_1 [B, H, d, f])")
        layout.check("anchor[0]", anchor[0], (B, H, f, d))
        layout.check("anchor[1]", anchor[1], (B, H, d, f))
    elif anchor is not None:
        raise ValueError("anchor given but config.anchor is False")
    if config.residual.startswith("huber") and gate is None:
        raise ValueError(f"residual {config.residual!r} needs the threshold gate (gate=[B, H, T])")
    zeros = (jnp.zeros((B, H, f, d), jnp.float32), jnp.zeros((B, H, d, f), jnp.float32))
    if config.momentum:
        if log_momentum is None:
            raise ValueError("config.momentum needs log_momentum=[B, H, T]")
        layout.check("log_momentum", log_momentum, (B, H, T))
        s0 = zeros if s0 is None else tuple(s0)
        layout.check("s0[0]", s0[0], (B, H, f, d))
        layout.check("s0[1]", s0[1], (B, H, d, f))
    packed = rstate = None
    if segments is not None:
        packed = segments_lib.check(segments, B, H, T)
        if not (isinstance(segments.memory, (tuple, list)) and len(segments.memory) == 2):
            raise TypeError("segments.memory must be a pair (W_*0 [B, H, f, d], W_*1 [B, H, d, f])")
        rstate = tuple(segments.memory)
        if config.retention == "scale":
            rstate += tuple(segments.memory if segments.accumulator is None else segments.accumulator)
        if config.momentum:
            rstate += zeros if segments.momentum is None else tuple(segments.momentum)
        for i, x in enumerate(rstate):
            layout.check(f"segments reset state[{i}]", x, (B, H, f, d) if i % 2 == 0 else (B, H, d, f))
        lr, log_decay = segments_lib.mask_gates(packed[1], lr, log_decay)
        if config.momentum:
            log_momentum = segments_lib.mask_gates(packed[1], log_momentum, None)[0]
    if implementation == "reference":
        return reference.mlp_chunk_reference(q, k, v, lr, m0, log_decay, a0, gate, hparams, anchor,
                                             config=config,
                                             segments=None if packed is None else (*packed, rstate),
                                             log_momentum=log_momentum, s0=s0)
    if backend is not None:
        config.validate(backend, d, f)
    xs, n = layout.chunk_inputs(q, k, v, lr, log_decay, gate, config.chunk_size, packed)
    if config.momentum:   # before the packed rows' inputs, which stay last
        split = len(xs) - (0 if packed is None else len(segments_lib.X_NAMES))
        xs = xs[:split] + layout.momentum_inputs(log_momentum, log_decay, config.chunk_size, T, packed) + xs[split:]
    ks = layout.consts(hparams, chunk.HPARAMS)
    state0 = tuple(layout.rows(w) for w in m0)
    if config.retention == "scale":
        state0 += tuple(layout.rows(a) for a in a0)
    if config.momentum:
        state0 += tuple(layout.rows(s) for s in s0)
    if config.anchor:
        state0 += tuple(layout.rows(a) for a in anchor)
    fn = chunk.make_chunk_fn(config, packed=packed is not None)
    rconsts = () if rstate is None else tuple(layout.rows(x) for x in rstate)
    cost = config.flops(d, f, packed is not None)
    (y,), final = chunk_sweep(fn, ((config.chunk_size, d),), cost, backend, interpret,
                              state0, xs, ks, rconsts)
    final = tuple(layout.unrows(x, B, H) for x in final)
    acc = final[2:4] if config.retention == "scale" else None
    y = layout.outputs(y, B, H, T, v.dtype)
    if packed is not None:   # pad tokens read 0
        y = jnp.where(packed[1][..., None] > 0, y, jnp.zeros((), y.dtype))
    return y, MLPChunkState(final[:2], acc, final[2:4] if config.momentum else None)

