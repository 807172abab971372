"""Engines that run a :class:`~miras_jax.spec.MirasSpec` over a sequence; ``memorize`` dispatches."""

from miras_jax.engine.api import memorize, memorize_batched
from miras_jax.engine.tokens import MemoryState, init_state, memorize_tokens, token_step

__all__ = ["memorize", "memorize_batched", "MemoryState", "init_state", "memorize_tokens", "token_step"]
