"""MLP-memory chunk kernel: the Miras memory ``M(x) = x + LN(W_1 gelu(W_0 x))`` trained by
mini-batch gradient steps, chunk by chunk (forward, per-token gradients at the chunk-start
weights, decayed accumulation of Eq. 28 and in-chunk reads, fused)."""

from pallas_kernels.mlp_chunk.api import mlp_chunk
from pallas_kernels.mlp_chunk.config import MLPChunkConfig
from pallas_kernels.mlp_chunk.reference import mlp_chunk_reference

__all__ = ["mlp_chunk", "mlp_chunk_reference", "MLPChunkConfig"]
