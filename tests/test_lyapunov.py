"""experiments.lyapunov: an MLP memory under decay is chaotic at layer-like gates, the delta rule is not."""

import jax
import jax.numpy as jnp

import miras_jax as mj
from experiments import lyapunov


def _exponent(name, lr, decay, T=256, d=16, **kw):
    spec = mj.presets.get(name, **kw)
    keys = jax.random.split(jax.random.key(0), 3)
    params = spec.memory.init(keys[0], d, d)
    q, k, v, gates = lyapunov.inputs(spec, T, d, lr, decay, keys[1], jnp.float32)
    return lyapunov.token_exponent(spec, params, k, v, gates, keys[2])


def test_mlp_memory_under_decay_has_a_positive_exponent():
    # the finding behind anchored retention and engine/horizon.py: the paper's Yaad map (decay toward
    # 0, smooth-sign slope a = 10) is chaotic, so its exact gradient grows like exp(lambda T)
    assert _exponent("yaad", 0.05, 0.95, anchor=False, a=10.0) > 0.05


def test_anchored_retention_calms_strong_decay():
    # decay toward W_0 instead of 0: at strong decay the LayerNorm no longer sees a vanishing W
    assert _exponent("titans", 0.03, 0.5) < 0 < _exponent("titans", 0.03, 0.5, anchor=False)


def test_delta_rule_is_non_expansive():
    # (a I)(I - b k k^T) with unit keys and b <= 1: every direction shrinks by at least a
    assert _exponent("gated_deltanet", 0.5, 0.95) < jnp.log(0.95) + 1e-3
