"""Blocked (flash) causal attention: equal to the dense ``attend`` in values and gradients, any
length and window; the module's full forward still agrees with prefill + step decoding; the
compiled forward + backward never holds a ``[t, t]`` array (memory linear in ``t``)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from miras_jax.nn.attention import Attention, _schedule, attend, flash_attend


def _qkv(t, dtype=jnp.float32, b=2, h=3, k=8):
    return tuple(jax.random.normal(jax.random.key(i), (b, t, h, k)).astype(dtype) for i in range(3))


def _vjp(f, q, k, v):
    """Output and ``(dq, dk, dv)`` for a fixed random cotangent."""
    y, pull = jax.vjp(f, q, k, v)
    return y, pull(jax.random.normal(jax.random.key(7), y.shape).astype(y.dtype))


def _dense(window):
    def f(q, k, v):
        pos = jnp.arange(q.shape[1])
        return attend(q, k, v, pos, pos, window)
    return f


def _flash_vjp(window, block=8):
    return jax.jit(lambda q, k, v: _vjp(lambda *a: flash_attend(*a, window=window, block=block), q, k, v))


# block 8: t = 1 (one token), 5 (one partial block), 8 / 32 (exact multiples), 21 / 37 (3 and 5
# blocks, the last partial; odd counts give the causal fold a middle row); window 1 (the diagonal
# only), windows ending inside / on a block edge (3, 8, 17; 9: keys t-8..t reach exactly one block
# back), 40 > t (global, through the fold schedule).
CASES = [(1, None), (5, 3), (8, 1), (21, None), (21, 9), (21, 40), (32, None), (32, 8), (37, 17)]


@pytest.mark.parametrize("t,window", CASES)
def test_flash_equals_dense_values_and_gradients(t, window):
    q, k, v = _qkv(t)
    y0, g0 = _vjp(_dense(window), q, k, v)
    y1, g1 = _flash_vjp(window)(q, k, v)
    np.testing.assert_allclose(y1, y0, atol=1e-5, rtol=1e-5)
    for name, a, b in zip("qkv", g1, g0):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_flash_bfloat16_is_close_to_float32_dense():
    """bfloat16 in and out (float32 accumulation); the reference is the dense form in float32."""
    t = 37
    q, k, v = _qkv(t, jnp.bfloat16)
    up = lambda xs: tuple(x.astype(jnp.float32) for x in xs)
    for window in (None, 5):
        y0, g0 = _vjp(_dense(window), *up((q, k, v)))
        y1, g1 = _flash_vjp(window)(q, k, v)
        assert y1.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g1)
        np.testing.assert_allclose(y1.astype(jnp.float32), y0, atol=3e-2, rtol=3e-2)
        for a, b in zip(up(g1), g0):
            np.testing.assert_allclose(a, b, atol=6e-2, rtol=6e-2)


@pytest.mark.parametrize("n,nw", [(1, None), (2, None), (5, None), (8, None), (7, 0), (7, 2), (3, 5)])
def test_schedule_runs_each_visible_block_pair_once(n, nw):
    """Every (query block, key block) pair that a window of ``nw`` blocks (None: all) reaches is
    scheduled exactly once; no query block twice in one step (the forward writes its softmax state
    back by index); the causal fold computes no pair twice and at most one padding slot per step."""
    qi, kj, ok = _schedule(n, nw)
    pairs = sorted(zip(qi[ok].tolist(), kj[ok].tolist()))
    want = sorted((i, j) for i, j in itertools.product(range(n), repeat=2)
                  if j <= i and (nw is None or j >= i - nw))
    assert pairs == want
    assert all(len(set(row)) == len(row) for row in qi.tolist())
    if nw is None:
        assert qi.shape == (n + 1 if n > 1 else 1, (n + 1) // 2)


def test_gpu_route_window_convention():
    """The cuDNN route passes ``local_window_size=(w - 1, 0)``: checked here on the XLA form of
    ``jax.nn.dot_product_attention`` (same arguments, runs on any backend) against ``attend``."""
    q, k, v = _qkv(13)
    for window in (None, 1, 4):
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla",
                                         local_window_size=None if window is None else (window - 1, 0))
        np.testing.assert_allclose(y, _dense(window)(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 50])
def test_attention_module_full_forward_equals_dense_and_decode(window):
    """t = 150 > the default block (128): the module's blocked path equals the dense one, and a
    prefill of 131 tokens then steps reproduces the full forward."""
    d, t, prompt = 16, 150, 131
    layer = Attention(d, 2, window=window, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, t, d))
    full = nnx.jit(lambda m, x: m(x))(layer, x)
    pos = jnp.arange(t)
    q, k, v = layer._proj(x, pos)
    dense = layer.wo(attend(q, k, v, pos, pos, window).reshape(2, t, d))
    np.testing.assert_allclose(full, dense, atol=1e-5, rtol=1e-5)

    y, cache = nnx.jit(lambda m, x: m.prefill(x, t))(layer, x[:, :prompt])
    step = nnx.jit(lambda m, x, c: m.step(x, c))
    ys = [y]
    for i in range(prompt, t):
        y_i, cache = step(layer, x[:, i], cache)
        ys.append(y_i[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, atol=1e-5, rtol=1e-5)


def _temp_bytes(t, attention, b=1, h=2, k=16):
    """Compiled (not run) forward + backward temp bytes of ``attention(q, k, v)``."""
    spec = jax.ShapeDtypeStruct((b, t, h, k), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention(q, k, v))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_forward_backward_memory_is_linear_in_t():
    """t = 16384: the ``[b, h, t, t]`` float32 scores alone take 2 GiB (the dense form's temp bytes
    exceed them: the measure sees such arrays); the blocked form needs < 1/8 of it, global or
    windowed, and a window's temp bytes about double with t."""
    t, b, h = 16384, 1, 2
    scores = b * h * t * t * 4
    flash = lambda window: lambda q, k, v: flash_attend(q, k, v, window=window)
    assert _temp_bytes(t, _dense(256)) > scores
    window_16k = _temp_bytes(t, flash(256))
    assert window_16k < scores / 8
    assert _temp_bytes(t, flash(None)) < scores / 8
    assert window_16k / _temp_bytes(t // 2, flash(256)) < 2.5
