"""Static configuration of the matrix-memory chunk kernel, with validation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from pallas_kernels.common import residuals
from pallas_kernels.common.config import RETENTIONS, check_blocks

MODES = ("minibatch", "delta")
OPTIMIZERS = ("gd", "momentum", "muon")


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
    optimizer: ``"gd"``; ``"momentum"`` (Titans: ``S_i = m_i S_{i-1} - lr_i g_i``,
      ``W_i = a_i W_{i-1} + S_i``; dual form, ``(D E)`` with ``D``, ``E`` the in-chunk decay and
      momentum matrices); ``"muon"`` (Atlas: ``S_i = m_i S_{i-1} + g_i``,
      ``W_i = a_i W_{i-1} - lr_i NS(S_i)``, the chunk's tokens one after another, ``ns_steps``
      Newton-Schulz iterations each). State ``(W, S)``. Mini-batch mode, linear retention, scalar decay.
    ns_steps: Muon's Newton-Schulz iterations (>= 1).
    window: ``None`` (no Omega rule), or the Omega window ``w`` (Atlas):
      ``g_i = sum_j omega_ij grad l(P; k_j, v_j)`` over the ``w`` most recent tokens (``w - 1`` of them may be in the previous chunk: ``w <= c + 1``), as the
      banded sum of per-token residuals. Mini-batch mode, linear retention, scalar decay.
    """

    mode: str = "minibatch"
    residual: str = "l2"
    smooth: bool = True
    retention: str = "linear"
    simplex_c: float | None = None
    chunk_size: int = 64
    channel: bool = False
    optimizer: str = "gd"
    ns_steps: int = 5
    window: int | None = None

    @property
    def atlas(self) -> bool:
        """Momentum, Muon or an Omega window: the state / inputs of ``chunk.make_atlas_fn``."""
        return self.optimizer != "gd" or self.window is not None

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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.optimizer == "muon" and (not isinstance(self.ns_steps, int) or self.ns_steps < 1):
            raise ValueError(f"optimizer 'muon' needs ns_steps >= 1, got {self.ns_steps!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be None or a positive int, got {self.window!r}")
        if self.window is not None and self.window > self.chunk_size + 1:
            raise ValueError(f"window={self.window} reaches past the previous chunk: it needs "
                             f"chunk_size >= window - 1 = {self.window - 1}, got chunk_size={self.chunk_size}")
        if self.atlas and (self.mode != "minibatch" or self.retention != "linear" or self.channel):
            raise ValueError("momentum, muon and an Omega window need mode='minibatch', retention='linear' "
                             "and a scalar decay")

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
        if self.window is not None:      # the previous chunk's residuals and their banded reads
            f += 2 * c * d_k * d_v * 3 + 2 * c * c * (d_k + d_v) + 4 * c ** 3
        if self.optimizer == "momentum":
            f += 2 * c ** 3 + 4 * c * d_k * d_v
        if self.optimizer == "muon":   # per token: the window's gradient, NS, the read
            m, n = sorted((d_k, d_v))
            f += c * (2 * 2 * c * d_k * d_v + self.ns_steps * (4 * m * m * n + 2 * m ** 3) + 4 * d_k * d_v)
        return f, 2 * c * c + c * d_v + (c * c * d_k if self.channel else 0)


class ChunkState(NamedTuple):
    """Final state: ``memory [B, H, v, k]``; ``accumulator`` (l_q retention's ``A``) or ``None``;
    ``momentum`` (``S`` of momentum / Muon) or ``None``."""

    memory: jax.Array
    accumulator: jax.Array | None
    momentum: jax.Array | None = None


class Window(NamedTuple):
    """An Omega window of ``w`` tokens (``MatrixChunkConfig.window``): ``weights [B, H, T, w]``, the
    weight of token ``t - w + 1 + j`` in token ``t``'s gradient (0 outside the row / document and on
    padding: the caller's masks); the ``w - 1`` tokens before the first one (a previous call, a
    horizon split; zeros with weight 0 at a row start): ``k [B, H, w-1, k]``, ``v [B, H, w-1, v]``,
    ``gate [B, H, w-1]`` (the bias gate; ``None``: zeros)."""

    weights: jax.Array
    k: jax.Array
    v: jax.Array
    gate: jax.Array | None = None
