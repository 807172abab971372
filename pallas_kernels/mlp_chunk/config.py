"""Static configuration of the MLP-memory chunk kernel, with validation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from pallas_kernels.common import residuals
from pallas_kernels.common.config import RETENTIONS, check_blocks


@dataclasses.dataclass(frozen=True)
class MLPChunkConfig:
    """What one chunk step computes (all static).

    The memory is ``M(x) = x + LN(W_1 gelu(W_0 x))`` (tanh GELU, LayerNorm without affine,
    ``W_0: [f, k]``, ``W_1: [v, f]``, ``k == v``). Every gradient of a chunk is taken at its start
    weights ``P`` (Miras Eq. 28-32); reads use the weights updated by the tokens so far (dual form).
    residual / smooth: the bias' residual map (``common/residuals.py``).
    retention: ``"linear"`` (none / decay: Yaad, TTT), ``"scale"`` (Moneta: l_q accumulators,
      ``W_l = s(A_l) A_l`` refreshed at full chunk ends), ``"lag"`` (Memora: exact KL softmax step on
      the chunk's first token, linear after it).
    simplex_c: ``c`` of ``c softmax`` for ``"lag"`` (``None``: each matrix's row length).
    chunk_size: tokens per chunk ``c``.
    anchor: anchored retention, ``z_t = a z_{t-1} + (1 - a) N + u`` with the dual anchors
      ``N = (N_0, N_1)`` (for ``"lag"``: ``log W_0``; the linear part then uses ``c softmax(N)``)
      carried as two more (constant) state entries.
    momentum: Titans' momentum, ``S_t = m_t S_{t-1} - lr_t g_t``, ``W_t = a_t W_{t-1} [+ (1 - a_t) N] + S_t``
      (linear retention; ``S = (S_0, S_1)`` two more state entries).
    """

    residual: str = "l2"
    smooth: bool = True
    retention: str = "linear"
    simplex_c: float | None = None
    chunk_size: int = 64
    anchor: bool = False
    momentum: bool = False

    def __post_init__(self):
        if self.residual not in residuals.KINDS:
            raise ValueError(f"residual must be one of {residuals.KINDS}, got {self.residual!r}")
        if self.retention not in RETENTIONS:
            raise ValueError(f"retention must be one of {RETENTIONS}, got {self.retention!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.momentum and self.retention != "linear":
            raise ValueError("momentum needs retention='linear'")

    def validate(self, backend: str, d_k: int, d_f: int) -> None:
        check_blocks(backend, chunk_size=self.chunk_size, d_k=d_k, d_f=d_f)

    def flops(self, d: int, f: int, packed: bool = False) -> tuple[int, int]:
        """Forward ``(flops, transcendentals)`` of one chunk (``d = k = v``; ``packed``: the factors'
        three weight products at the reset memory and its read base in both layers, five more)."""
        c = self.chunk_size
        mm = 2 * c * d * f
        flops = (13 if packed else 8) * mm + 2 * c * c * (2 * d + f) + 2 * c * c * (d + f)
        if self.momentum:
            flops += 2 * c ** 3 + 4 * mm
        return flops, 3 * c * f + 2 * c * c


class MLPChunkState(NamedTuple):
    """Final state: ``memory = (W_0 [B, H, f, d], W_1 [B, H, d, f])``; ``accumulator`` (l_q's
    ``(A_0, A_1)``) or ``None``."""

    memory: tuple
    accumulator: tuple | None
    momentum: tuple | None = None
