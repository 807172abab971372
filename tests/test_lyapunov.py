"""experiments.lyapunov: an MLP memory under decay is chaotic at layer-like gates, the delta rule is not."""

import jax
import jax.numpy as jnp

import miras_jax as mj
from experiments import lyapunov


def _exponent(name, lr, decay, T=256, d=16):
    spec = mj.presets.get(name)
    keys = jax.random.split(jax.random.key(0), 3)
    params = spec.memory.init(keys[0], d, d)
    q, k, v, gates = lyapunov.inputs(spec, T, d, lr, decay, keys[1], jnp.float32)
    return lyapunov.token_exponent(spec, params, k, v, gates, keys[2])


def test_mlp_memory_under_decay_has_a_positive_exponent():
    # the finding behind engine/horizon.py: the exact gradient of yaad grows like exp(lambda T)
    assert _exponent("yaad", 0.05, 0.95) > 0.05


def test_delta_rule_is_non_expansive():
    # (a I)(I - b k k^T) with unit keys and b <= 1: every direction shrinks by at least a
    assert _exponent("gated_deltanet", 0.5, 0.95) < jnp.log(0.95) + 1e-3
