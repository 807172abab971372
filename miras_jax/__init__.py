"""miras_jax: test-time memorization sequence models (Miras, arXiv 2504.13173) in JAX.

A Miras layer is an associative memory ``M_W`` learned online while reading a sequence, defined
by four choices: memory architecture (``memory``), attentional bias (``bias``), retention gate
(``retention``) and memory learning algorithm (``inner_opt``), composed in a ``MirasSpec``.
"""

from miras_jax import base, bias, inner_opt, memory, presets, retention
from miras_jax.engine import MemoryState, init_state, memorize, memorize_batched
from miras_jax.engine.plan import Plan, plan
from miras_jax.spec import MirasSpec

__version__ = "0.1.0"

__all__ = ["base", "bias", "inner_opt", "memory", "presets", "retention", "MirasSpec", "MemoryState",
           "init_state", "memorize", "memorize_batched", "Plan", "plan", "__version__"]
