"""Long context (issue 31): values *and gradients* stay finite and bounded for every preset at
8k tokens (16k and 64k under ``-m slow``) with strong, weak and mixed decays and the step at the
layer's ceiling (``default_lr_max``), f32 and bf16 inputs; the chunked gradient equals the chunked
reference in float64 at 8192 for an MLP preset; one charlm training step at seq_len 8192 has a
finite gradient norm for every preset and for the attention patterns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import miras_jax as mj
from experiments import configs
from miras_jax.nn import MirasLM
from miras_jax.nn.layer import default_lr_max
from tests.helpers import random_inputs

ALL = mj.presets.names()
REGIMES = {"strong": (0.5, 0.5), "weak": (0.9999, 0.9999), "mixed": (0.5, 0.9999)}
GRAD_BOUND = 1e4     # max |dL/dx| for L = mean(y^2): exponential growth overshoots it by orders


def _inputs(name, T, d, regime, dtype=jnp.float32, seed=0):
    """Random unit keys / queries, normal values; decays uniform in the regime; ``lr`` at the ceiling."""
    spec = mj.presets.get(name)
    q, k, v, gates = random_inputs(seed, T, d, d, num_steps=spec.num_steps, channel_decay=(name == "gla"))
    lo, hi = REGIMES[regime]
    gates["decay"] = jax.random.uniform(jax.random.key(seed + 5), gates["decay"].shape, minval=lo, maxval=hi)
    gates["lr"] = jnp.full_like(gates["lr"], default_lr_max(spec, 64))   # the chunk _check runs
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
    return spec, params, cast((q, k, v, gates))


def _grads(spec, params, args, **kw):
    def loss(params, q, k, v, gates):
        y, _ = mj.memorize(spec, params, q, k, v, gates, **kw)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(params, *args)


def _check(name, T, regime, dtype):
    spec, params, args = _inputs(name, T, 16, regime, dtype)
    val, grads = _grads(spec, params, args, chunk_size=64, implementation="xla")
    assert bool(jnp.isfinite(val)), f"{name}: loss {val}"
    worst = max(float(jnp.max(jnp.abs(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads))
    assert np.isfinite(worst) and worst < GRAD_BOUND, f"{name} T={T} {regime}: max |grad| {worst:.3g}"


# Omega windows' 8k finiteness follows from their step bound (default_lr_max; test_chunked runs them at
# 65k): one rotating regime per dtype by default, the rest under -m slow
ROTATE_ALL = {"omeganet", "atlas"}


def _grid(T, slow_all):
    """Every preset at ``T``: by default every regime in f32 and one (rotating) in bf16 (ROTATE_ALL:
    one rotating regime in each); the rest (and every longer ``T``) under ``-m slow``."""
    out = []
    for i, name in enumerate(ALL):
        for j, regime in enumerate(REGIMES):
            for dtype in ("float32", "bfloat16"):
                turn = j == (i + (dtype == "float32")) % len(REGIMES)
                default = not slow_all and (turn if name in ROTATE_ALL else (dtype == "float32" or turn))
                marks = () if default else (pytest.mark.slow,)
                out.append(pytest.param(name, T, regime, dtype, marks=marks, id=f"{name}-{T}-{regime}-{dtype}"))
    return out


@pytest.mark.parametrize("name,T,regime,dtype", _grid(8192, False) + _grid(16384, True) + _grid(65536, True))
def test_values_and_gradients_are_finite_and_bounded(name, T, regime, dtype):
    _check(name, T, regime, jnp.dtype(dtype))


@pytest.mark.parametrize("name", ["yaad"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("titans", "moneta", "memora")])
def test_chunked_gradients_equal_the_chunked_reference_in_float64_at_8192(name, x64):
    """The fast chunked form against the plain chunked loops, float64, T = 8192, mixed decays."""
    spec, params, args = _inputs(name, 8192, 8, "mixed", jnp.float64)
    spec = spec.replace(hparams=jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), spec.hparams))
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    ref_val, ref = _grads(spec, params, args, chunk_size=64, implementation="reference")
    val, got = _grads(spec, params, args, chunk_size=64, implementation="xla")
    np.testing.assert_allclose(val, ref_val, rtol=1e-10)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        scale = max(float(jnp.max(jnp.abs(b))), 1e-30)
        np.testing.assert_allclose(a / scale, b / scale, atol=1e-9)


MODEL_CASES = ([("M", n) for n in ALL] + [("A", "moneta"), ("MS", "moneta")])


@pytest.mark.parametrize("pattern,preset", [
    # all under -m slow (~15-30 s each; default suite time): by default the engine-level checks at
    # 8192 above (every preset finite and bounded, the float64 chunked gradient) stand for them
    pytest.param(p, n, marks=pytest.mark.slow, id=f"{p}-{n}") for p, n in MODEL_CASES])
def test_charlm_training_step_at_8192_has_a_finite_gradient_norm(pattern, preset):
    """The ``charlm`` model (4 layers, width 128) at its initialisation, seq_len 8192, one sequence:
    the loss gradient's global norm is finite and O(1) (it was NaN for every MLP preset)."""
    cfg = configs.override(configs.get("charlm"), [f"model.preset={preset}", f"model.pattern={pattern}"]).model
    model = MirasLM(cfg.resolved(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 8193), 0, cfg.vocab_size)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
    assert np.isfinite(float(val)) and np.isfinite(norm) and norm < 100.0, f"loss {val}, grad norm {norm:.3g}"
