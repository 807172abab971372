"""Matrix-memory chunk kernel: ``W_t = a_t W - lr_t phi(W k_t - v_t) k_t^T`` swept over chunks."""

from pallas_kernels.matrix_chunk.api import matrix_chunk
from pallas_kernels.matrix_chunk.config import MatrixChunkConfig, Window
from pallas_kernels.matrix_chunk.reference import matrix_chunk_reference

__all__ = ["matrix_chunk", "matrix_chunk_reference", "MatrixChunkConfig", "Window"]
