"""``matrix_chunk``: the matrix-memory gradient-step recurrence, chunk by chunk, as a Pallas kernel.

Recurrence (one head; ``phi`` the bias' residual map, ``P`` the chunk-start state):
``W_t = a_t W_{t-1} - lr_t phi(P k_t - v_t) k_t^T`` ("minibatch"), or the exact delta rule
``W_t = a_t W_{t-1} - lr_t (a_t W_{t-1} k_t - v_t) k_t^T`` ("delta"); reads ``y_t = W_t q_t``.
See ``MatrixChunkConfig`` for the retention variants (l_q scale, KL lag).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import layout
from pallas_kernels.common import segments as segments_lib
from pallas_kernels.common.segments import Segments
from pallas_kernels.common.vjp import chunk_sweep
from pallas_kernels.matrix_chunk import chunk, reference
from pallas_kernels.matrix_chunk.config import ChunkState, MatrixChunkConfig

IMPLEMENTATIONS = ("pallas", "reference")


def matrix_chunk(q, k, v, lr, m0=None, log_decay=None, a0=None, gate=None, hparams=None, *,
                 config: MatrixChunkConfig, implementation: str = "pallas",
                 backend: str | None = None, interpret: bool | None = None,
                 segments: Segments | None = None):
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

    Returns:
      ``(y [B, H, T, v] in v's dtype, ChunkState)``; state in float32.
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
    packed = rstate = None
    if segments is not None:
        packed = segments_lib.check(segments, B, H, T)
        rstate = (segments.memory,)
        if config.retention == "scale":
            rstate += (segments.memory if segments.accumulator is None else segments.accumulator,)
        for name, x in zip(("segments.memory", "segments.accumulator"), rstate):
            layout.check(name, x, (B, H, dv, dk))
        lr, log_decay = segments_lib.mask_gates(packed[1], lr, log_decay)
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
