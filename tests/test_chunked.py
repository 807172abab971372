"""The chunked engine: exact families equal the token recurrence at any chunk size; mini-batch
families equal the chunked reference; chunk_size=1 equals the token engine for every preset —
values and VJPs (q, k, v, gates, initial memory, final state); segments, remat, padding, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from miras_jax.engine import window
from miras_jax.engine.plan import exact_family
from tests.helpers import random_inputs, rotate, some_slow

VAL_TOL = dict(rtol=1e-4, atol=1e-4)    # reordered float32 chunk math
GRAD_TOL = 2e-3                          # relative to the largest reference entry
ALL = mj.presets.names()
EXACT = [n for n in ALL if exact_family(mj.presets.get(n))]
MINIBATCH = [n for n in ALL if n not in EXACT]


def _setup(name, T, d=8, seed=0, decay=(0.8, 1.0), **kw):
    spec = mj.presets.get(name, **kw)
    q, k, v, gates = random_inputs(seed, T, d, d, num_steps=spec.num_steps, channel_decay=(name == "gla"))
    lo, hi = decay
    gates["decay"] = jax.random.uniform(jax.random.key(seed + 7), gates["decay"].shape, minval=lo, maxval=hi)
    if name == "yaad":   # keep every residual norm clear of the Huber switch (no branch flips)
        gates["delta"] = jnp.where(jnp.arange(T) % 2 == 0, 0.05, 50.0)
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    if spec.memory.kind == "linear" and name != "memora":
        params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(seed + 2), w.shape), params)
    return spec, params, (q, k, v, gates)


def _vjp(spec, params, args, **kw):
    """Values and the VJP of (y, final memory) with a fixed random cotangent."""
    def f(params, q, k, v, gates):
        y, st = mj.memorize(spec, params, q, k, v, gates, **kw)
        return y, st.memory

    def go(params, args):   # jitted: eager dispatch of the engines' ops dominated the test time
        out, vjp = jax.vjp(f, params, *args)
        cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(42), x.shape, x.dtype), out)
        return out, vjp(cot)
    return jax.jit(go)(params, args)


def _close(a, b, grads):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if grads:
            scale = max(float(jnp.abs(y).max()), 1e-6)
            np.testing.assert_allclose(x / scale, y / scale, atol=GRAD_TOL)
        else:
            np.testing.assert_allclose(x, y, **VAL_TOL)


@pytest.mark.parametrize("name", ALL)
def test_chunk_size_one_equals_token_engine(name):
    spec, params, args = _setup(name, T=9)
    out_ref, g_ref = _vjp(spec, params, args)
    out, g = _vjp(spec, params, args, chunk_size=1, implementation="xla")
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)


@pytest.mark.parametrize("name,chunk", rotate(EXACT, [16, 64, 7]))   # full grid: -m slow
def test_exact_families_equal_token_engine(name, chunk):
    spec, params, args = _setup(name, T=70)
    out_ref, g_ref = _vjp(spec, params, args)
    out, g = _vjp(spec, params, args, chunk_size=chunk, implementation="xla")
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)


@pytest.mark.parametrize("name,chunk", rotate(MINIBATCH, [8, 16, 64]))   # full grid: -m slow
def test_minibatch_xla_equals_chunked_reference(name, chunk):
    spec, params, args = _setup(name, T=70)
    out_ref, g_ref = _vjp(spec, params, args, chunk_size=chunk, implementation="reference")
    out, g = _vjp(spec, params, args, chunk_size=chunk, implementation="xla")
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)


@pytest.mark.parametrize("memory", some_slow(["linear", "mlp"], slow=("mlp",)))   # MLP: test_pallas
def test_lq_norm_floor_is_honoured_by_every_path(memory):
    """Moneta with its norm floor active (``norm_floor = 5`` is above every ``||A||_q`` here):
    chunk size 1 equals the token engine, the XLA chunked form equals the chunked reference, and
    the floor changes the result (it is not silently dropped)."""
    spec, params, args = _setup("moneta", T=40, memory=memory, norm_floor=5.0)
    out_ref, g_ref = _vjp(spec, params, args)
    out, g = _vjp(spec, params, args, chunk_size=1, implementation="xla")
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)
    out_ref, g_ref = _vjp(spec, params, args, chunk_size=16, implementation="reference")
    out, g = _vjp(spec, params, args, chunk_size=16, implementation="xla")
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)
    spec0, _, _ = _setup("moneta", T=40, memory=memory, norm_floor=0.0)
    y0, _ = jax.jit(lambda p, *a: mj.memorize(spec0, p, *a, chunk_size=16, implementation="xla"))(params, *args)
    assert float(jnp.max(jnp.abs(y0 - out[0]))) > 1e-3   # (the outputs only: no VJP to compile)


# each preset one regime by default (both regimes stay in); -m slow: both for every preset
@pytest.mark.parametrize("name,decay", rotate(["gated_deltanet", "mamba2", "titans", "moneta", "memora"],
                                              [(0.01, 0.1), (0.999, 1.0)],
                                              option_id=lambda d: "strong" if d[0] < 0.5 else "weak"))
def test_gate_gradients_under_strong_and_weak_decay(name, decay):
    kw = {"memory": "linear"} if name in ("titans", "moneta", "memora") else {}
    spec, params, args = _setup(name, T=40, decay=decay, **kw)
    ref_kw = dict(chunk_size=16, implementation="reference")
    out_ref, g_ref = _vjp(spec, params, args, **ref_kw)
    out, g = _vjp(spec, params, args, chunk_size=16, implementation="xla")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)


def test_chunked_reference_is_exact_at_chunk_one_and_differs_above():
    spec, params, (q, k, v, gates) = _setup("titans", T=20)
    y_tok, _ = mj.memorize(spec, params, q, k, v, gates)
    y1, _ = mj.memorize(spec, params, q, k, v, gates, chunk_size=1, implementation="reference")
    y8, _ = mj.memorize(spec, params, q, k, v, gates, chunk_size=8, implementation="reference")
    np.testing.assert_array_equal(y1, y_tok)
    assert not np.allclose(y8, y_tok, atol=1e-3)      # stale gradients really are stale


SEGMENT_PRESETS = ["gated_deltanet", "deltaproduct", "gla", "titans", "moneta", "memora"]


@pytest.mark.parametrize("name", some_slow(SEGMENT_PRESETS, slow=("deltaproduct", "gla", "titans")))
def test_segments_equal_one_call(name):
    spec, params, (q, k, v, gates) = _setup(name, T=50)
    kw = dict(chunk_size=8, implementation="xla")
    y, st = mj.memorize(spec, params, q, k, v, gates, **kw)
    cut = lambda t, s: jax.tree.map(lambda x: x[s], t)  # noqa: E731
    a, b = slice(0, 24), slice(24, 50)   # the cut is on a chunk boundary
    y1, s1 = mj.memorize(spec, params, *cut((q, k, v, gates), a), **kw)
    y2, s2 = mj.memorize(spec, params, *cut((q, k, v, gates), b), initial_state=s1, **kw)
    np.testing.assert_allclose(jnp.concatenate([y1, y2]), y, **VAL_TOL)
    _close(s2, st, grads=False)


@pytest.mark.parametrize("name", some_slow(["titans", "moneta", "memora", "yaad"],
                                          slow=("titans", "memora", "yaad")))
def test_remat_every_changes_nothing(name):
    spec, params, args = _setup(name, T=45)
    out_ref, g_ref = _vjp(spec, params, args, chunk_size=8, implementation="xla")
    out, g = _vjp(spec, params, args, chunk_size=8, implementation="xla", remat_every=2)
    _close(out, out_ref, grads=False)
    _close(g, g_ref, grads=True)


@pytest.mark.parametrize("name", ["gated_deltanet", "moneta"])
def test_bfloat16_inputs(name):
    spec, params, (q, k, v, gates) = _setup(name, T=40)
    bf = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)  # noqa: E731
    y, st = mj.memorize(spec, params, *bf((q, k, v, gates)), chunk_size=16, implementation="xla")
    y32, _ = mj.memorize(spec, params, *jax.tree.map(lambda x: x.astype(jnp.float32), bf((q, k, v, gates))),
                         chunk_size=16, implementation="xla")
    assert y.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.memory))
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2e-2, atol=2e-2)


def test_batched_entry_point_matches_per_head_calls():
    spec = mj.presets.get("yaad")
    B, T, H, D = 2, 19, 3, 8
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (B, T, H, D))
    gates = {"lr": jnp.full((B, T, H), 0.1), "decay": jnp.full((B, T, H), 0.95),
             "delta": jnp.full((B, T, H), 0.5)}
    params = jax.vmap(lambda kk: spec.memory.init(kk, D, D))(jax.random.split(ks[2], H))
    y, st = mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=8, implementation="xla")
    assert y.shape == (B, T, H, D)
    # one jitted per-head program for every (b, h) (eager calls recompiled the engine's scans)
    one = jax.jit(lambda *a: mj.memorize(spec, *a, chunk_size=8, implementation="xla"))
    for b in range(B):
        for h in range(H):
            yh, sh = one(jax.tree.map(lambda x: x[h], params), q[b, :, h], k[b, :, h], v[b, :, h],
                         {n: g[b, :, h] for n, g in gates.items()})
            np.testing.assert_allclose(y[b, :, h], yh, **VAL_TOL)
            _close(jax.tree.map(lambda x: x[b, h], st.memory), sh.memory, grads=False)
    with pytest.raises(ValueError, match="lead with"):
        mj.memorize_batched(spec, params, q, k, v[:, :5], gates)


@pytest.mark.parametrize("B", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_batched_entry_point_gradients_and_carried_state(B):
    """The batch x head rows are one vmap over ``B * H``: the per-head params' gradient is the sum
    over the batch, and a state carried between two calls lands on the right (b, h) row."""
    spec = mj.presets.get("moneta")
    T, H, D, t1 = 21, 2, 8, 12   # t1: a chunk boundary (the mini-batch form depends on them)
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (B, T, H, D))
    gates = {"lr": jax.random.uniform(ks[3], (B, T, H), minval=0.05, maxval=0.2),
             "decay": jax.random.uniform(ks[4], (B, T, H), minval=0.8, maxval=1.0)}
    params = jax.vmap(lambda kk: spec.memory.init(kk, D, D))(jax.random.split(ks[2], H))
    ct = jax.random.normal(jax.random.key(9), (B, T, H, D))
    kw = dict(chunk_size=4, implementation="xla")

    def batched(p, q_):
        return jnp.sum(ct * mj.memorize_batched(spec, p, q_, k, v, gates, **kw)[0])

    @jax.jit   # one row's program, run for every (b, h): the rows' sum is the reference
    def row_grads(p_h, q_r, k_r, v_r, g_r, ct_r):
        return jax.grad(lambda p_, q_: jnp.sum(ct_r * mj.memorize(spec, p_, q_, k_r, v_r, g_r, **kw)[0]),
                        argnums=(0, 1))(p_h, q_r)

    gp, gq = jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(q)
    for b in range(B):
        for h in range(H):
            gp_h, gq_r = row_grads(jax.tree.map(lambda x: x[h], params), q[b, :, h], k[b, :, h], v[b, :, h],
                                   {n: g[b, :, h] for n, g in gates.items()}, ct[b, :, h])
            gp = jax.tree.map(lambda acc, x: acc.at[h].add(x), gp, gp_h)   # per-head params: summed over b
            gq = gq.at[b, :, h].set(gq_r)
    _close(jax.jit(jax.grad(batched, argnums=(0, 1)))(params, q), (gp, gq), grads=True)
    split = lambda t, s: jax.tree.map(lambda x: x[:, s], t)  # noqa: E731
    y_all, st_all = mj.memorize_batched(spec, params, q, k, v, gates, **kw)
    y_a, st_a = mj.memorize_batched(spec, params, *split((q, k, v, gates), slice(0, t1)), **kw)
    y_b, st_b = mj.memorize_batched(spec, params, *split((q, k, v, gates), slice(t1, T)), initial_state=st_a, **kw)
    np.testing.assert_allclose(jnp.concatenate([y_a, y_b], axis=1), y_all, **VAL_TOL)
    _close(st_b.memory, st_all.memory, grads=False)
    assert all(x.shape[:2] == (B, H) for x in jax.tree.leaves(st_b))


def test_pallas_for_an_uncovered_spec_is_a_clear_error_and_auto_runs():
    spec, params, (q, k, v, gates) = _setup("deltaproduct", T=8)
    with pytest.raises(NotImplementedError, match="pallas"):
        mj.memorize(spec, params, q, k, v, gates, implementation="pallas")
    spec, params, (q, k, v, gates) = _setup("deltanet", T=8)
    y, _ = mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="auto")
    np.testing.assert_allclose(y, mj.memorize(spec, params, q, k, v, gates)[0], **VAL_TOL)


@pytest.mark.parametrize("name", ALL)
def test_long_sequence_is_finite(name):
    """T = 65,536 with realistic gates (sigmoid-range decays, lr <= 0.5), fp32."""
    T, d = 65_536, 16
    spec = mj.presets.get(name)
    q, k, v, gates = random_inputs(3, T, d, d, num_steps=spec.num_steps, channel_decay=(name == "gla"))
    # an Omega window: the chunk's C c writes share one point, scaled as the layer's default_lr_max does
    omega = 1.0 / (window.write_gain(spec) * 64) if window.is_omega(spec) else 1.0
    gates = dict(gates, lr=0.5 * omega * gates["lr"],
                 decay=0.9 + 0.1 * gates["decay"] / gates["decay"].max())
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(0), d, d)
    y, st = jax.jit(lambda p, *a: mj.memorize(spec, p, *a, chunk_size=64, implementation="xla"))(
        params, q, k, v, gates)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(st))
