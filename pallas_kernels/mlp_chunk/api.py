"""``mlp_chunk``: the 2-layer MLP memory (Moneta / Yaad / Memora / TTT-MLP) trained chunk by chunk
with mini-batch gradient steps, as a Pallas kernel. See ``chunk.py`` for the math."""

from __future__ import annotations

from pallas_kernels.common import layout
from pallas_kernels.common.vjp import chunk_sweep
from pallas_kernels.mlp_chunk import chunk, reference
from pallas_kernels.mlp_chunk.config import MLPChunkConfig, MLPChunkState

IMPLEMENTATIONS = ("pallas", "reference")


def mlp_chunk(q, k, v, lr, m0, log_decay=None, a0=None, gate=None, hparams=None, anchor=None, *,
              config: MLPChunkConfig, implementation: str = "pallas",
              backend: str | None = None, interpret: bool | None = None):
    """Sweep the MLP-memory recurrence over ``T`` tokens, every (batch, head) row in parallel.

    Args:
      q, k, v: ``[B, H, T, d]``; lr: ``[B, H, T]``; m0: ``(W_0 [B, H, f, d], W_1 [B, H, d, f])``
        initial weights; log_decay: ``[B, H, T]`` (``None``: no decay); a0: initial l_q
        accumulators (``"scale"``; ``None``: ``m0``); gate: ``[B, H, T]`` Huber threshold gate;
        hparams: dict of scalars ``p, a, eps, delta_scale, q`` (traced); anchor: the dual anchors
        ``(N_0 [B, H, f, d], N_1 [B, H, d, f])`` of an anchored retention (``config.anchor``).
      config: static ``MLPChunkConfig``; implementation ``"pallas"`` | ``"reference"``;
      backend / interpret: as in ``matrix_chunk``.

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
    if implementation == "reference":
        return reference.mlp_chunk_reference(q, k, v, lr, m0, log_decay, a0, gate, hparams, anchor,
                                             config=config)
    if backend is not None:
        config.validate(backend, d, f)
    xs, n = layout.chunk_inputs(q, k, v, lr, log_decay, gate, config.chunk_size)
    ks = layout.consts(hparams, chunk.HPARAMS)
    state0 = tuple(layout.rows(w) for w in m0)
    if config.retention == "scale":
        state0 += tuple(layout.rows(a) for a in a0)
    if config.anchor:
        state0 += tuple(layout.rows(a) for a in anchor)
    fn = chunk.make_chunk_fn(config)
    (y,), final = chunk_sweep(fn, ((config.chunk_size, d),), config.flops(d, f), backend, interpret,
                              state0, xs, ks)
    final = tuple(layout.unrows(x, B, H) for x in final)
    acc = final[2:4] if config.retention == "scale" else None
    return layout.outputs(y, B, H, T, v.dtype), MLPChunkState(final[:2], acc)

