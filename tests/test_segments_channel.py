"""Packed rows (``segment_ids``) with a channel-wise decay ``[T, d_k]`` (GLA-like): the exact
channel-wise Hebbian chunk form equals the token recurrence, the mini-batch channel path equals its
reference loops; no leak across documents, padding changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from tests.helpers import random_inputs
from tests.test_segments import _f64, _ids, _lengths, _no_leak, _padded, _values_and_grads

SLOW = pytest.mark.slow
TOL = dict(rtol=1e-9, atol=1e-9)   # float64, same semantics
F32 = dict(rtol=2e-4, atol=2e-5)   # the exact chunk forms compute in float32
T = 20
FIXED = dict(lengths=[1, 4, 1, 7, 2], pad_left=3, pad_right=2)   # starts 3, 4, 8, 9, 16: on and off the grid


def _setup(name, T, seed=0, **kw):
    """``(spec, params, (q, k, v, gates))`` in float64 with a channel-wise decay and a nonzero ``W_0``."""
    spec = mj.presets.get(name, **kw)
    q, k, v, gates = random_inputs(seed, T, 8, 8, channel_decay=True)
    gates = {g: gates[g] for g in spec.required_gates}
    assert gates["decay"].shape == (T, 8)
    params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(seed + 2), w.shape, w.dtype),
                          spec.memory.init(jax.random.key(seed + 1), 8, 8))
    return spec, _f64(params), _f64((q, k, v, gates))


def _row(seed, c):
    """The fixed row (seed 0) or a random one: 1-5 documents, then a length-1 one, one pad each side."""
    if seed == 0:
        return _ids(**FIXED)
    rng = np.random.default_rng(seed)
    return _ids(_lengths(rng, T - 3, c) + [1], pad_left=1, pad_right=1)


def _jit_values_and_grads(spec, params, xs, seg, impl, c):
    """``test_segments._values_and_grads`` under one ``jit`` (about half the eager time here)."""
    return jax.jit(lambda p, x: _values_and_grads(spec, p, x, seg, impl, c))(params, xs)


def _jit_padded(spec, params, xs, lengths, left, right, c):
    return jax.jit(lambda p, x: _padded(spec, p, x, lengths, left, right, "xla", c))(params, xs)


def _assert_close(got, want, tol, msg):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = max(float(jnp.abs(b).max()), 1.0)
        np.testing.assert_allclose(a / scale, b / scale, **tol, err_msg=msg)


def test_plan_runs_packed_channel_rows_on_the_chunk_forms():
    gla, yaad = mj.presets.get("gla"), mj.presets.get("yaad", memory="linear")
    assert mj.plan(gla, "xla", 64, channel=True).engine == "hebbian"
    assert mj.plan(gla, "auto", 64, backend="cpu", channel=True).engine == "hebbian"
    assert mj.plan(yaad, "xla", 8, channel=True).engine == "minibatch"


@pytest.mark.parametrize("c,seed", [(4, 0), (16, 0), (4, 11), pytest.param(16, 12, marks=SLOW),
                                    pytest.param(4, 13, marks=SLOW), pytest.param(16, 14, marks=SLOW)])
def test_gla_exact_form_equals_the_token_engine_on_packed_rows(c, seed, x64):
    """The channel-wise Hebbian chunk form on a packed row equals the token recurrence: outputs, final
    memory and the gradients w.r.t. q, k, v, the gates and ``W_0`` (initial and reset state)."""
    seg = _row(seed, c)
    spec, params, xs = _setup("gla", T, seed=seed)
    assert mj.plan(spec, "xla", c, channel=True).engine == "hebbian"
    got = _jit_values_and_grads(spec, params, xs, seg, "xla", c)
    want = _jit_values_and_grads(spec, params, xs, seg, "reference", 1)
    _assert_close(got, want, F32, f"c={c} {np.asarray(seg)}")


@pytest.mark.parametrize("name,kw,seed", [("yaad", {"memory": "linear"}, 0),
                                          pytest.param("yaad", {"memory": "linear", "anchor": True}, 21, marks=SLOW),
                                          pytest.param("yaad", {"memory": "linear"}, 22, marks=SLOW)])
def test_minibatch_channel_path_equals_its_reference_on_packed_rows(name, kw, seed, x64):
    """A spec with no exact form (Yaad, matrix memory) and a channel-wise decay runs the mini-batch
    channel path (autodiff); on packed rows it equals ``reference.py``'s loops, values and gradients."""
    c = 4
    seg = _row(seed, c)
    spec, params, xs = _setup(name, T, seed=seed, **kw)
    assert mj.plan(spec, "xla", c, channel=True).engine == "minibatch"
    got = _jit_values_and_grads(spec, params, xs, seg, "xla", c)
    want = _jit_values_and_grads(spec, params, xs, seg, "reference", c)
    _assert_close(got, want, dict(rtol=1e-8, atol=1e-8), f"{kw} {np.asarray(seg)}")


@pytest.mark.parametrize("name,kw,c", [("gla", {}, 4), pytest.param("gla", {}, 16, marks=SLOW),
                                       pytest.param("yaad", {"memory": "linear"}, 4, marks=SLOW)])
def test_no_leak_into_earlier_documents(name, kw, c, x64):
    """The VJP of a document's outputs is exactly 0 on every earlier document's inputs (gates included)."""
    spec, params, xs = _setup(name, 19, **kw)
    _no_leak(spec, params, xs, _ids([5, 1, 6, 7]), "xla", c)


@pytest.mark.parametrize("name,kw,c,pads", [
    ("gla", {}, 4, ((3, 2),)),                                              # exact form: any padding
    pytest.param("gla", {}, 16, ((3, 0), (0, 5), (2, 2)), marks=SLOW),
    pytest.param("yaad", {"memory": "linear"}, 4, ((4, 0), (0, 5), (4, 2)), marks=SLOW)])  # keeps the grid
def test_padding_changes_no_real_output_or_gradient(name, kw, c, pads, x64):
    spec, params, xs = _setup(name, 17, **kw)
    lengths = [6, 11]
    tol = F32 if mj.plan(spec, "xla", c, channel=True).engine == "hebbian" else TOL
    base_y, base_g = _jit_padded(spec, params, xs, lengths, 0, 0, c)
    for left, right in pads:
        y, g = _jit_padded(spec, params, xs, lengths, left, right, c)
        np.testing.assert_allclose(y, base_y, **tol)
        _assert_close(g, base_g, tol, f"pads {left}, {right}")
