"""grad_horizon: truncated backpropagation through the memory state (engine/horizon.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from tests.helpers import random_inputs

# yaad and memora run the same mini-batch path as titans here (-m slow: default suite time)
CASES = [pytest.param("yaad", "xla", 8, 24, marks=pytest.mark.slow), ("titans", "xla", 4, 8),
         ("gated_deltanet", "xla", 8, 16), ("moneta", "reference", 1, 5),
         pytest.param("memora", "xla", 8, 16, marks=pytest.mark.slow)]


def _setup(name, T, d=8, seed=0):
    spec = mj.presets.get(name)
    params = spec.memory.init(jax.random.key(seed), d, d)
    q, k, v, gates = random_inputs(seed, T, d, d)
    return spec, params, q, k, v, {n: gates[n] for n in spec.required_gates}


@pytest.mark.parametrize("name,impl,chunk,H", CASES)
def test_forward_unchanged_and_gradient_cut_at_segments(name, impl, chunk, H):
    T = 2 * H + H // 2 + (chunk > 1) * 3          # two full segments and a partial one
    spec, params, q, k, v, gates = _setup(name, T)
    kw = dict(chunk_size=chunk, implementation=impl)
    y0, s0 = mj.memorize(spec, params, q, k, v, gates, **kw)
    y1, s1 = mj.memorize(spec, params, q, k, v, gates, grad_horizon=H, **kw)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def loss(k_, v_, in_seg, horizon):
        y, _ = mj.memorize(spec, params, q, k_, v_, gates, grad_horizon=horizon, **kw)
        return jnp.sum(jnp.where(in_seg[:, None], y, 0.0) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)   # one program per horizon

    def grads(horizon, seg):   # d (sum of segment seg's outputs) / d (k, v)
        return grad(k, v, jnp.arange(T) // H == seg, horizon)

    # segment 1's outputs: the exact gradient inside the segment, none before it
    (gk, gv), (ek, ev) = grads(H, 1), grads(None, 1)
    np.testing.assert_allclose(gk[H:2 * H], ek[H:2 * H], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gv[H:2 * H], ev[H:2 * H], rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(gk[:H]) == 0) and np.all(np.asarray(gv[:H]) == 0)
    assert float(jnp.max(jnp.abs(ek[:H]))) > 0                    # ... which the exact one has
    # segment 0's outputs: exactly the full gradient (nothing is cut before them)
    (gk, gv), (ek, ev) = grads(H, 0), grads(None, 0)
    np.testing.assert_allclose(gk, ek, rtol=1e-5, atol=1e-7)


def test_batched_and_layer_take_the_horizon():
    spec = mj.presets.get("yaad", memory="linear")   # the MLP memory's horizon: test_forward_unchanged...
    B, T, H, d = 2, 40, 2, 8
    ks = jax.random.split(jax.random.key(1), 4)
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[0], H))
    q, k, v = (jax.random.normal(kk, (B, T, H, d)) / d ** 0.5 for kk in ks[1:])
    gates = {"lr": jnp.full((B, T, H), 0.1), "decay": jnp.full((B, T, H), 0.9), "delta": jnp.ones((B, T, H))}
    kw = dict(chunk_size=8, implementation="xla")

    def loss(v_, horizon):
        y, _ = mj.memorize_batched(spec, params, q, k, v_, gates, grad_horizon=horizon, **kw)
        return jnp.sum(y[:, 16:32] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g = grad(v, 16)
    assert np.all(np.asarray(g[:, :16]) == 0) and float(jnp.max(jnp.abs(g[:, 16:32]))) > 0
    np.testing.assert_allclose(g[:, 16:32], grad(v, None)[:, 16:32], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [5, -8, 2.5, True])
def test_bad_horizon_is_a_clear_error(bad):
    spec, params, q, k, v, gates = _setup("yaad", 16)
    with pytest.raises(ValueError, match="grad_horizon"):
        mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="xla", grad_horizon=bad)


def test_pallas_batched_forward_unchanged_and_gradient_cut():
    spec = mj.presets.get("gated_deltanet")
    B, T, Hh, d = 1, 20, 1, 8
    ks = jax.random.split(jax.random.key(2), 4)
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[0], Hh))
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[1], (B, T, Hh, d))), unit(jax.random.normal(ks[2], (B, T, Hh, d)))
    v = jax.random.normal(ks[3], (B, T, Hh, d))
    gates = {"lr": jnp.full((B, T, Hh), 0.5), "decay": jnp.full((B, T, Hh), 0.9)}
    kw = dict(chunk_size=8, implementation="pallas")
    y0, _ = mj.memorize_batched(spec, params, q, k, v, gates, **kw)
    y1, _ = mj.memorize_batched(spec, params, q, k, v, gates, grad_horizon=8, **kw)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)

    def loss(v_, horizon):
        y, _ = mj.memorize_batched(spec, params, q, k, v_, gates, grad_horizon=horizon, **kw)
        return jnp.sum(y[:, 8:16] ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g, e = grad(v, 8), grad(v, None)
    assert np.all(np.asarray(g[:, :8]) == 0) and float(jnp.max(jnp.abs(e[:, :8]))) > 0
    np.testing.assert_allclose(g[:, 8:16], e[:, 8:16], rtol=1e-4, atol=1e-6)
