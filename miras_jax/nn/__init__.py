"""Flax NNX modules over the pure-JAX engine: the Miras layer, attention, blocks, language models."""

from miras_jax.nn.attention import Attention, KVCache, rope
from miras_jax.nn.layer import HParam, LayerCache, MirasLayer, causal_conv
from miras_jax.nn.model import LMConfig, MirasBlock, MirasLM, SwiGLU, count_params, generate

__all__ = ["Attention", "HParam", "KVCache", "LMConfig", "LayerCache", "MirasBlock", "MirasLM", "MirasLayer",
           "SwiGLU", "causal_conv", "count_params", "generate", "rope"]
