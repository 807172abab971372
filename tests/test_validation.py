"""Bad input gets a clear error that says what is wrong, before anything reaches XLA."""

import jax
import jax.numpy as jnp
import pytest

import miras_jax as mj
from tests.helpers import random_inputs


def _inputs(name="deltanet", T=6, d=4, **kw):
    spec = mj.presets.get(name, **kw)
    q, k, v, gates = random_inputs(0, T, d, d)
    return spec, spec.memory.init(jax.random.key(0), d, d), q, k, v, gates


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="valid presets:.*gated_deltanet.*memora"):
        mj.presets.get("gated_delta_net")


def test_unknown_keyword_lists_valid_hparams():
    with pytest.raises(ValueError, match="no hyper-parameter 'r'.*'p'"):
        mj.presets.get("moneta", r=2.0)


@pytest.mark.parametrize("kw,match", [({"p": 0.5}, "p must be >= 1"), ({"q": 1.5}, "q must be >= 2"),
                                       ({"p": float("nan")}, "finite")])
def test_invalid_hparams(kw, match):
    with pytest.raises(ValueError, match=match):
        mj.presets.get("moneta", **kw)


def test_invalid_hparams_caught_at_memorize_too():
    spec, params, q, k, v, gates = _inputs("moneta", memory="linear")
    bad = spec.with_hparams(q=1.0)
    with pytest.raises(ValueError, match="q must be >= 2"):
        mj.memorize(bad, params, q, k, v, gates)


def test_invalid_structural_options():
    with pytest.raises(ValueError, match="memory must be 'linear' or 'mlp'"):
        mj.presets.get("moneta", memory="conv")
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        mj.presets.get("deltaproduct", num_steps=0)
    with pytest.raises(ValueError, match="implicit_gd has a closed form only"):
        mj.MirasSpec(memory=mj.memory.mlp_memory(), bias=mj.bias.l2_bias(),
                     retention=mj.retention.no_retention(), optimizer=mj.inner_opt.implicit_gd())


@pytest.mark.parametrize("which,shape,match", [
    ("q", (6, 5), "q and k must share d_k"),
    ("k", (5, 4), "share the token axis"),
    ("v", (7, 4), "share the token axis"),
    ("q", (6,), r"q must have shape \[T, d_k\]"),
    ("v", (6, 3), "memory params do not match"),
])
def test_mismatched_shapes(which, shape, match):
    spec, params, q, k, v, gates = _inputs()
    args = dict(q=q, k=k, v=v)
    args[which] = jnp.ones(shape, jnp.float32)
    with pytest.raises(ValueError, match=match):
        mj.memorize(spec, params, args["q"], args["k"], args["v"], gates)


def test_gate_shape_and_missing_gate():
    spec, params, q, k, v, gates = _inputs("gated_deltanet")
    with pytest.raises(ValueError, match="gate 'lr' must have shape"):
        mj.memorize(spec, params, q, k, v, dict(gates, lr=jnp.ones((5,), jnp.float32)))
    with pytest.raises(ValueError, match="needs gate 'decay'"):
        mj.memorize(spec, params, q, k, v, {"lr": gates["lr"]})
    with pytest.raises(ValueError, match="channel-wise decay needs a linear"):
        s, p, *_ = _inputs("titans")
        mj.memorize(s, p, q, k, v, dict(gates, decay=jnp.ones((6, 4), jnp.float32)))


def test_scalar_gate_broadcasts():
    spec, params, q, k, v, gates = _inputs("deltanet")
    y1, _ = mj.memorize(spec, params, q, k, v, {"lr": jnp.float32(0.5)})
    y2, _ = mj.memorize(spec, params, q, k, v, {"lr": jnp.full((6,), 0.5, jnp.float32)})
    assert jnp.array_equal(y1, y2)


def test_wrong_params_and_dtypes():
    spec, params, q, k, v, gates = _inputs("deltanet")
    with pytest.raises(ValueError, match="memory params do not match"):
        mj.memorize(spec, {"W": jnp.zeros((4, 5), jnp.float32)}, q, k, v, gates)
    with pytest.raises(ValueError, match="memory params do not match"):
        mj.memorize(spec, {"layers": (jnp.zeros((4, 4), jnp.float32),)}, q, k, v, gates)
    with pytest.raises(TypeError, match="q must be a floating-point array"):
        mj.memorize(spec, params, jnp.ones((6, 4), jnp.int32), k, v, gates)
    with pytest.raises(TypeError, match="gates must be a dict"):
        mj.memorize(spec, params, q, k, v, [gates["lr"]])


def test_memora_needs_positive_memory():
    spec, params, q, k, v, gates = _inputs("memora", memory="linear")
    assert jnp.all(params["W"] > 0)
    with pytest.raises(ValueError, match="strictly positive memory"):
        mj.memorize(spec, {"W": params["W"].at[0, 0].set(-0.1)}, q, k, v, gates)
    with pytest.raises(ValueError, match="strictly positive memory"):
        mj.memorize(spec, {"W": jnp.zeros((4, 4), jnp.float32)}, q, k, v, gates)


def test_bad_implementation_and_chunk_size():
    spec, params, q, k, v, gates = _inputs()
    with pytest.raises(ValueError, match="implementation must be one of"):
        mj.memorize(spec, params, q, k, v, gates, implementation="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        mj.memorize(spec, params, q, k, v, gates, chunk_size=0)


def test_deltaproduct_substep_mismatch():
    spec = mj.presets.get("deltaproduct", num_steps=3)
    q, k, v, gates = random_inputs(0, 5, 4, 4, num_steps=2)
    with pytest.raises(ValueError, match="num_steps=3"):
        mj.memorize(spec, spec.memory.init(jax.random.key(0), 4, 4), q, k, v, gates)


@pytest.mark.parametrize("name,value,match", [
    ("lr", -0.1, r"gate 'lr' must lie in >= 0.0"),
    ("lr", float("nan"), "gate 'lr' has non-finite values"),
    ("decay", 1.5, r"gate 'decay' must lie in \[0.0, 1.0\]"),
    ("decay", -0.2, r"gate 'decay' must lie in \[0.0, 1.0\]"),
    ("decay", float("inf"), "gate 'decay' has non-finite values"),
])
def test_gate_values_are_checked_when_concrete(name, value, match):
    spec, params, q, k, v, gates = _inputs("gated_deltanet")
    bad = dict(gates, **{name: gates[name].at[2].set(value)})
    with pytest.raises(ValueError, match=match):
        mj.memorize(spec, params, q, k, v, bad)
    bq = lambda x: x[None, :, None]  # noqa: E731   [T, ...] -> [B=1, T, H=1, ...]
    with pytest.raises(ValueError, match=match):   # before the batched entry point's per-row vmap
        mj.memorize_batched(spec, jax.tree.map(lambda w: w[None], params), bq(q), bq(k), bq(v),
                            {g: bq(x) for g, x in bad.items()})
    # under jit the values are unknown at trace time: not checked (documented), no error
    y, _ = jax.jit(lambda g: mj.memorize(spec, params, q, k, v, g))(bad)
    assert y.shape == v.shape


def test_momentum_and_delta_ranges():
    spec, params, q, k, v, gates = _inputs("titans")
    with pytest.raises(ValueError, match=r"gate 'momentum' must lie in \[0.0, 1.0\]"):
        mj.memorize(spec, params, q, k, v, dict(gates, momentum=gates["momentum"] + 1.0))
    spec, params, q, k, v, gates = _inputs("yaad")
    with pytest.raises(ValueError, match=r"gate 'delta' must lie in >= 0.0"):
        mj.memorize(spec, params, q, k, v, dict(gates, delta=-gates["delta"]))


def test_unknown_gate_names_are_rejected_known_unused_ones_allowed():
    spec, params, q, k, v, gates = _inputs("deltanet")          # reads lr only
    with pytest.raises(ValueError, match=r"unknown gate name\(s\) \['lrr'\]"):
        mj.memorize(spec, params, q, k, v, dict(gates, lrr=gates["lr"]))
    y, _ = mj.memorize(spec, params, q, k, v, dict(gates, momentum=jnp.full((6,), 0.9, jnp.float32)))
    assert y.shape == v.shape
