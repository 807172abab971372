"""Static configuration of the matrix-memory chunk kernel, with validation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from pallas_kernels.common import residuals
from pallas_kernels.common.config import RETENTIONS, check_blocks

MODES = ("minibatch", "delta")


@dataclasses.dataclass(frozen=True)
class MatrixChunkConfig:
    """What one chunk step computes (all static).

    mode: ``"minibatch"`` — every gradient of a chunk at its start state ``P``:
      ``W_i = a_i W_{i-1} - lr_i phi(P k_i - v_i) k_i^T`` (Miras Eq. 28; exact for the dot bias);
      ``"delta"`` — the exact delta rule at the retained state,
      ``W_i = a_i W_{i-1} - lr_i (a_i W_{i-1} k_i - v_i) k_i^T`` via the UT transform (l2 bias).
    residual / smooth: the bias' residual map ``phi`` (``common/residuals.py``).
    retention: ``"linear"`` (none / decay), ``"scale"`` (Moneta l_q: accumulator ``A``, ``W = s(A) A``
      refreshed at full chunk ends), ``"lag"`` (Memora KL: exact softmax step on the chunk's first
      token, linear after it).
    simplex_c: ``c`` of ``c softmax`` for ``"lag"`` (``None``: the row length ``d_k``).
    channel: channel-wise decay ``a_t: [k]`` (``W_t = W_{t-1} Diag(a_t) - ...``; GLA); mini-batch
      mode with linear retention only. The in-chunk scores ``sum_k q_ik k_jk exp(L_ik - L_jk)`` are
      built one key position at a time (stable for any decay strength; ``c`` unrolled steps).
    chunk_size: tokens per chunk ``c``.
    """

    mode: str = "minibatch"
    residual: str = "l2"
    smooth: bool = True
    retention: str = "linear"
    simplex_c: float | None = None
    chunk_size: int = 64
    channel: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.residual not in residuals.KINDS:
            raise ValueError(f"residual must be one of {residuals.KINDS}, got {self.residual!r}")
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {self.retention!r}")
        if self.mode == "delta" and (self.residual != "l2" or self.retention != "linear"):
            raise ValueError("mode='delta' is the exact delta rule: residual='l2', retention='linear'")
        if self.channel and (self.mode != "minibatch" or self.retention != "linear"):
            raise ValueError("channel-wise decay needs mode='minibatch' and retention='linear'")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")

    def validate(self, backend: str, d_k: int, d_v: int) -> None:
        check_blocks(backend, chunk_size=self.chunk_size, d_k=d_k, d_v=d_v)

    def flops(self, d_k: int, d_v: int, packed: bool = False) -> tuple[int, int]:
        """Forward ``(flops, transcendentals)`` of one chunk (``packed``: the later documents' gradients
        at the reset memory and its read base, two more ``[c, k] x [k, v]`` products)."""
        c = self.chunk_size
        f = 2 * c * d_k * d_v * (5 if packed else 3) + 2 * c * c * (d_k + d_v)
        if self.mode == "delta":
            f += 2 * c * c * d_k + 2 * c * c * d_v + 4 * c ** 3 * max(c - 1, 1).bit_length()
        if self.channel:
            f += 4 * c * c * d_k
        return f, 2 * c * c + c * d_v + (c * c * d_k if self.channel else 0)


class ChunkState(NamedTuple):
    """Final state: ``memory [B, H, v, k]``; ``accumulator`` (l_q retention's ``A``) or ``None``."""

    memory: jax.Array
    accumulator: jax.Array | None
