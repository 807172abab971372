"""Pallas kernels for the Miras gradient-step recurrence (TPU Mosaic and GPU Triton), standalone:
nothing here imports ``miras_jax``.

  matrix_chunk   matrix memory ``W_t = a_t W - lr_t phi(W k - v) k^T`` (+ delta rule, l_q, KL;
                 momentum, Muon and the Omega window: ``Window``)
  mlp_chunk      2-layer MLP memory with residual + LayerNorm + GELU (Moneta / Yaad / Memora)
  sharded        enter a kernel through ``shard_map`` over batch / head axes
  Segments       packed rows (documents restart from a reset state; padding), for both kernels

Each kernel folder: ``api.py`` (public function, ``implementation=`` switch, ``jax.custom_vjp``),
``reference.py`` (pure-JAX twin, same signature), ``chunk.py`` (the per-chunk body both backends
sweep), ``config.py`` (static configuration and block-size validation). The sweeps themselves
(grid / loop over chunks, forward and reverse) are in ``common/sweep_tpu.py`` / ``sweep_gpu.py``.
"""

from pallas_kernels.common.segments import Segments
from pallas_kernels.common.sharding import sharded
from pallas_kernels.matrix_chunk import MatrixChunkConfig, Window, matrix_chunk, matrix_chunk_reference
from pallas_kernels.mlp_chunk import MLPChunkConfig, mlp_chunk, mlp_chunk_reference

__all__ = ["matrix_chunk", "matrix_chunk_reference", "MatrixChunkConfig", "Window",
           "mlp_chunk", "mlp_chunk_reference", "MLPChunkConfig", "Segments", "sharded"]
