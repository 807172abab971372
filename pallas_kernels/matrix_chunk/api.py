"""``matrix_chunk``: the matrix-memory gradient-step recurrence, chunk by chunk, as a Pallas kernel.

Recurrence (one head; ``phi`` the bias' residual map, ``P`` the chunk-start state):
``W_t = a_t W_{t-1} - lr_t phi(P k_t - v_t) k_t^T`` ("minibatch"), or the exact delta rule
``W_t = a_t W_{t-1} - lr_t (a_t W_{t-1} k_t - v_t) k_t^T`` ("delta"); reads ``y_t = W_t q_t``.
See ``MatrixChunkConfig`` for the retention variants (l_q scale, KL lag) and for momentum, Muon and
the Omega window (``chunk.make_atlas_fn``).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import layout, platform
from pallas_kernels.common import segments as segments_lib
from pallas_kernels.common.segments import Segments
from pallas_kernels.common.vjp import chunk_sweep
from pallas_kernels.matrix_chunk import chunk, reference
from pallas_kernels.matrix_chunk.config import ChunkState, MatrixChunkConfig, Window

IMPLEMENTATIONS = ("pallas", "reference")


def matrix_chunk(q, k, v, lr, m0=None, log_decay=None, a0=None, gate=None, hparams=None, *,
                 config: MatrixChunkConfig, implementation: str = "pallas",
                 backend: str | None = None, interpret: bool | None = None,
                 segments: Segments | None = None, log_momentum=None, s0=None,
                 window: Window | None = None):
    """Sweep the matrix-memory recurrence over ``T`` tokens, every (batch, head) row in parallel.
    Positional arguments in ``mlp_chunk``'s order: ``q, k, v, lr, m0, log_decay, a0, gate, hparams``.

    Args:
      q, k: ``[B, H, T, k]``; v: ``[B, H, T, v]``; lr: ``[B, H, T]`` (``eta_t``; ``beta_t`` of the
        delta rule); m0: ``[B, H, v, k]`` initial memory (``None``: zeros); log_decay: ``[B, H, T]``
        ``log a_t`` (``None``: no decay), or ``[B, H, T, k]`` channel-wise (needs
        ``config.channel``); a0: initial l_q accumulator (``"scale"`` retention;
        ``None``: ``m0``); gate: ``[B, H, T]`` Huber threshold gate; hparams: dict of scalars
        ``p, a, eps, delta_scale`` (bias) and ``q`` (l_q retention), arrays welcome (traced).
      config: static ``MatrixChunkConfig``.
      implementation: ``"pallas"`` or ``"reference"`` (``reference.py``, same semantics as loops).
      backend / interpret: pin the kernel body (``"tpu"`` / ``"triton"``) and interpretation;
        default: per lowering platform (TPU Mosaic, GPU Triton, CPU interpreted).
      segments: packed rows (``common/segments.py``): ``Segments(reset, real [B, H, T], memory
        [B, H, v, k], accumulator)``: a document restarts from the reset memory (and l_q
        accumulator); pad tokens neither write nor read (``y = 0``).
      log_momentum: ``[B, H, T]`` ``log m_t`` (``config.optimizer`` ``"momentum"`` / ``"muon"``);
        s0: ``[B, H, v, k]`` initial momentum ``S`` (``None``: zeros).
      window: ``Window`` (``config.window`` not ``None``): the Omega weights ``[B, H, T, w]`` and the ``w - 1``
        tokens before the first.

    Returns:
      ``(y [B, H, T, v] in v's dtype, ChunkState)``; state in float32 (``momentum``: the final ``S``).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(config, MatrixChunkConfig):
        raise TypeError(f"config must be a MatrixChunkConfig, got {type(config).__name__}")
    B, H, T, dk, dv = layout.check_common(q, k, v, lr, log_decay, gate)
    m0 = jnp.zeros((B, H, dv, dk), jnp.float32) if m0 is None else m0
    layout.check("m0", m0, (B, H, dv, dk))
    if config.retention == "scale":
        a0 = m0 if a0 is None else a0
        layout.check("a0", a0, (B, H, dv, dk))
    if config.channel != (log_decay is not None and log_decay.ndim == 4):
        raise ValueError(f"config.channel={config.channel} but log_decay has shape "
                         f"{None if log_decay is None else tuple(log_decay.shape)}: channel-wise decay is "
                         "[B, H, T, k] with channel=True, a scalar one [B, H, T] with channel=False")
    if config.residual.startswith("huber") and gate is None:
        raise ValueError(f"residual {config.residual!r} needs the threshold gate (gate=[B, H, T])")
    mom = config.optimizer != "gd"
    if mom:
        if log_momentum is None:
            raise ValueError(f"optimizer {config.optimizer!r} needs log_momentum=[B, H, T]")
        layout.check("log_momentum", log_momentum, (B, H, T))
        s0 = jnp.zeros((B, H, dv, dk), jnp.float32) if s0 is None else s0
        layout.check("s0", s0, (B, H, dv, dk))
    if (window is not None) != (config.window is not None):
        raise ValueError(f"config.window={config.window} needs window=Window(...) exactly when it is set, "
                         f"got {type(window).__name__}")
    if window is not None:
        w = config.window
        layout.check("window.weights", window.weights, (B, H, T, w))
        layout.check("window.k", window.k, (B, H, w - 1, dk))
        layout.check("window.v", window.v, (B, H, w - 1, dv))
        if window.gate is not None:
            layout.check("window.gate", window.gate, (B, H, w - 1))
    packed = rstate = None
    if segments is not None:
        packed = segments_lib.check(segments, B, H, T)
        rstate = (segments.memory,)
        if config.retention == "scale":
            rstate += (segments.memory if segments.accumulator is None else segments.accumulator,)
        if mom:
            rstate += (jnp.zeros((B, H, dv, dk), jnp.float32) if segments.momentum is None else segments.momentum,)
        for name, x in zip(("segments.memory", "segments.accumulator" if config.retention == "scale"
                            else "segments.momentum"), rstate):
            layout.check(name, x, (B, H, dv, dk))
        lr, log_decay = segments_lib.mask_gates(packed[1], lr, log_decay)
        if mom:
            log_momentum = segments_lib.mask_gates(packed[1], log_momentum, None)[0]
    if config.atlas:
        return _atlas(q, k, v, lr, m0, log_decay, gate, hparams, config, implementation, backend, interpret,
                      packed, rstate, log_momentum, s0, window)
    if implementation == "reference":
        return reference.matrix_chunk_reference(q, k, v, lr, m0, log_decay, a0, gate, hparams, config=config,
                                                segments=None if packed is None else (*packed, *rstate))
    if backend is not None:
        config.validate(backend, dk, dv)
    xs, n = layout.chunk_inputs(q, k, v, lr, log_decay, gate, config.chunk_size, packed)
    ks = layout.consts(hparams, chunk.HPARAMS)
    state0 = (layout.rows(m0),) + ((layout.rows(a0),) if config.retention == "scale" else ())
    fn = chunk.make_chunk_fn(config, packed=packed is not None)
    rconsts = () if rstate is None else tuple(layout.rows(x) for x in rstate)
    cost = config.flops(dk, dv, packed is not None)
    (y,), final = chunk_sweep(fn, ((config.chunk_size, dv),), cost, backend, interpret,
                              state0, xs, ks, rconsts)
    acc = layout.unrows(final[1], B, H) if config.retention == "scale" else None
    y = layout.outputs(y, B, H, T, v.dtype)
    if packed is not None:   # pad tokens read 0
        y = jnp.where(packed[1][..., None] > 0, y, jnp.zeros((), y.dtype))
    return y, ChunkState(layout.unrows(final[0], B, H), acc)


def _atlas(q, k, v, lr, m0, log_decay, gate, hparams, config, implementation, backend, interpret, packed,
           rstate, log_momentum, s0, window):
    """``matrix_chunk`` for momentum / Muon / an Omega window (``chunk.make_atlas_fn``)."""
    B, H, T, dk = q.shape
    dv = v.shape[-1]
    mom = config.optimizer != "gd"
    gate = jnp.zeros((B, H, T), jnp.float32) if gate is None else gate
    if window is not None and window.gate is None:
        window = window._replace(gate=jnp.zeros(window.k.shape[:3], jnp.float32))
    if implementation == "reference":
        return reference.atlas_reference(q, k, v, lr, m0, log_decay, gate, hparams, config=config,
                                         segments=None if packed is None else (*packed, *rstate),
                                         log_momentum=log_momentum, s0=s0, window=window)
    if backend is not None:
        config.validate(backend, layout.pow2(dk), layout.pow2(dv))   # widths padded for Triton
    c = config.chunk_size
    xs, n = layout.chunk_inputs(q, k, v, lr, log_decay, gate, c, packed)
    seg_xs = xs[len(chunk.X_NAMES):]
    xs = xs[:len(chunk.X_NAMES)]
    if mom:
        xs += layout.momentum_inputs(log_momentum, log_decay, c, T, packed)
    if window is not None:
        xs += layout.window_inputs(window.weights, k, v, gate, (window.k, window.v, window.gate), c,
                                   None if packed is None else packed[1])
    xs += seg_xs
    ks = layout.consts(hparams, chunk.HPARAMS)
    state0 = (layout.rows(m0),) + ((layout.rows(s0),) if mom else ())
    fn = chunk.make_atlas_fn(config, packed=packed is not None)
    rconsts = () if rstate is None else tuple(layout.rows(x) for x in rstate)
    cost = config.flops(dk, dv, packed is not None)
    names = chunk.atlas_x_names(config, packed is not None)

    def sweep(b, i):
        """Triton loads power-of-two blocks only: zero-pad the key and value widths there (a zero
        column of ``k`` / ``q`` and of ``W`` / ``S`` stays zero: the same recurrence), slice back."""
        pk, pv = (layout.pow2(d) - d if b == "triton" else 0 for d in (dk, dv))
        wide = {"q": pk, "k": pk, "kp": pk, "v": pv, "vp": pv}
        xs_ = tuple(layout.pad_last(x, wide.get(n, 0)) for n, x in zip(names, xs))
        mat = lambda x: layout.pad_last(jnp.pad(x, ((0, 0), (0, pv), (0, 0))), pk)  # noqa: E731   [R, v, k]
        (y,), fin = chunk_sweep(fn, ((c, dv + pv),), cost, b, i, tuple(map(mat, state0)), xs_, ks,
                                tuple(map(mat, rconsts)))
        return y[..., :dv], tuple(x[:, :dv, :dk] for x in fin)

    y, final = platform.dispatch(sweep, backend=backend, interpret=interpret)
    y = layout.outputs(y, B, H, T, v.dtype)
    if packed is not None:
        y = jnp.where(packed[1][..., None] > 0, y, jnp.zeros((), y.dtype))
    return y, ChunkState(layout.unrows(final[0], B, H), None, layout.unrows(final[1], B, H) if mom else None)
