"""The hand-written VJP of the mini-batch chunked form (engine/minibatch/vjp.py) against autodiff of
the same forward (``memorize_chunked(vjp="autodiff")``): values and VJPs w.r.t. every input — q, k, v, gates, lr
and decay via the gates, hyper-parameters, both parts of the initial state (memory and l_q
accumulator) — with cotangents on y and on both parts of the final state; random shapes, every
retention mode, matrix and MLP memories of depth 1-3, remat groups."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from miras_jax.engine.minibatch import chunk as chunked
from miras_jax.engine.minibatch import vjp as chunked_vjp
from miras_jax.engine import plan as plan_lib
from miras_jax.engine.tokens import MemoryState, init_state
from tests.helpers import random_inputs

VAL_TOL = dict(rtol=1e-4, atol=1e-4)    # float32, same math in another order (as test_chunked)
GRAD_TOL = 2e-3                          # float32, relative to the largest entry of the reference
EXACT = dict(grad_tol=1e-9, val_tol=dict(rtol=1e-9, atol=1e-9))   # float64: agree to rounding

# (preset, structural / numeric kwargs): every chunk mode ("linear", "scale", "lag"), every bias
# family the MLP presets use, matrix memory, depth 1 / 3, implicit GD, no retention.
CASES = [
    ("moneta", {}), ("moneta", {"memory": "linear"}),
    pytest.param("moneta", {"depth": 3, "p": 1.5, "q": 3.0}, marks=pytest.mark.slow),
    ("yaad", {}), ("memora", {}), ("ttt_linear", {}), ("titans", {}),
    pytest.param("moneta", {"smooth": None, "p": 2.5}, marks=pytest.mark.slow),
    pytest.param("yaad", {"memory": "linear"}, marks=pytest.mark.slow),
    pytest.param("memora", {"memory": "linear"}, marks=pytest.mark.slow),
    pytest.param("memora", {"depth": 1}, marks=pytest.mark.slow),
    pytest.param("ttt_mlp", {}, marks=pytest.mark.slow),
    pytest.param("titans", {"memory": "linear"}, marks=pytest.mark.slow),
    # anchored retention (every mode; the presets' default for an MLP memory). Memora's "lag" takes
    # token 0's exact step toward the dual anchor z_* and the rest toward from_dual(z_*).
    # (the MLP presets are anchored by default: these equal the default cases above, other shapes)
    pytest.param("moneta", {"anchor": True}, marks=pytest.mark.slow),
    pytest.param("yaad", {"anchor": True}, marks=pytest.mark.slow),
    pytest.param("memora", {"anchor": True}, marks=pytest.mark.slow),
    pytest.param("titans", {"anchor": True}, marks=pytest.mark.slow),
    pytest.param("moneta", {"anchor": True, "memory": "linear"}, marks=pytest.mark.slow),
    pytest.param("memora", {"anchor": True, "memory": "linear"}, marks=pytest.mark.slow),
]


def _id(case):
    name, kw = case.values if hasattr(case, "values") else case
    return f"{name}-{'-'.join(map(str, kw.values())) or 'default'}"


def _f64(t):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)


def _get(name, **kw):
    """The preset with the paper's retention map unless ``anchor`` is given (``anchor=False``)."""
    if mj.presets.takes(name, "anchor"):
        kw.setdefault("anchor", False)
    return mj.presets.get(name, **kw)


def _setup(name, kw, T, d, seed, wide=False):
    spec = name if isinstance(name, mj.MirasSpec) else _get(name, **kw)
    name = spec.name
    q, k, v, gates = random_inputs(seed, T, d, d)
    gates = {g: gates[g] for g in spec.required_gates}
    if "decay" in gates:
        gates["decay"] = jax.random.uniform(jax.random.key(seed + 7), (T,), minval=0.5, maxval=1.0)
    if name == "yaad":   # residual norms well clear of the switch (no branch flips between orders)
        gates["delta"] = jnp.where(jnp.arange(T) % 3 == 0, 0.02, 80.0)
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    if spec.memory.kind == "linear" and name != "memora":
        params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(seed + 2), w.shape, w.dtype), params)
    state = init_state(spec, params)
    if spec.retention.chunk_mode == "scale":   # an accumulator that is not the memory itself
        state = state._replace(retention=jax.tree.map(lambda a: 1.3 * a, state.retention))
    if wide:
        return spec.replace(hparams=_f64(spec.hparams)), _f64(state), _f64((q, k, v, gates))
    return spec, state, (q, k, v, gates)


def _outputs_and_vjp(spec, state, args, chunk, vjp, remat_every=0):
    def f(hp, memory, retention, q, k, v, gates):
        st = MemoryState(memory, retention, state.optimizer)
        y, fin = chunked.memorize_chunked(spec.replace(hparams=hp), st, q, k, v, gates, chunk,
                                          remat_every=remat_every, vjp=vjp)
        return y, fin.memory, fin.retention

    def go(hp, memory, retention, args):   # jitted: eager dispatch dominated the test time
        out, fn = jax.vjp(f, hp, memory, retention, *args)
        return out, fn(_random_cotangent(out, 42))
    return jax.jit(go)(spec.hparams, state.memory, state.retention, args)


def _random_cotangent(out, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(out)))
    return jax.tree.unflatten(jax.tree.structure(out), [jax.random.normal(kk, x.shape, x.dtype)
                                                        for kk, x in zip(keys, jax.tree.leaves(out))])


def _assert_close(got, want, grad_tol=GRAD_TOL, val_tol=VAL_TOL):
    (out, grads), (out_ref, grads_ref) = got, want
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
        np.testing.assert_allclose(a, b, **val_tol)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads_ref)
    for (path, b), a in zip(flat, jax.tree.leaves(grads)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        np.testing.assert_allclose(a / scale, b / scale, atol=grad_tol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name,kw", CASES, ids=[_id(c) for c in CASES])
def test_hand_vjp_equals_autodiff_on_random_shapes(name, kw, x64):
    """float64, so the comparison is of the math (float32 rounding is amplified by long sequences
    and by scalar hyper-parameter gradients, sums over every token)."""
    rng = np.random.default_rng(zlib.crc32(repr((name, sorted(kw.items()))).encode()))  # fixed per case
    T, d, chunk = int(rng.integers(9, 60)), int(rng.choice([4, 8, 16])), int(rng.choice([4, 8, 16]))
    spec, state, args = _setup(name, kw, T, d, seed=int(rng.integers(100)), wide=True)
    assert plan_lib.hand_vjp_blocker(spec) is None
    _assert_close(_outputs_and_vjp(spec, state, args, chunk, "hand"),
                  _outputs_and_vjp(spec, state, args, chunk, "autodiff"), **EXACT)


def test_hand_vjp_with_wide_keys(x64):
    """A matrix memory over poly features (``d_k = D = 1 + d + d^2 != d_v``: omeganet's window-1
    lowering, ``engine/window.py``): the hand VJP's dq has the keys' width, not the values'."""
    from miras_jax.engine import window
    spec = window.lower_spec(mj.presets.get("omeganet", window=1, degree=2))
    assert spec.memory.feature_map is None and plan_lib.hand_vjp_blocker(spec) is None
    T, d = 21, 3
    q, k, v, gates = _f64(random_inputs(5, T, d, d))
    _, q, k, _ = window.lower_inputs(mj.presets.get("omeganet", window=1, degree=2), q, k, dict(gates))
    gates = {g: gates[g] for g in spec.required_gates}
    W0 = {"W": 0.2 * jax.random.normal(jax.random.key(3), (d, q.shape[1]), jnp.float64)}
    spec = spec.replace(hparams=_f64(spec.hparams))
    state = init_state(spec, W0)
    _assert_close(_outputs_and_vjp(spec, state, (q, k, v, gates), 8, "hand"),
                  _outputs_and_vjp(spec, state, (q, k, v, gates), 8, "autodiff"), **EXACT)


def test_lag_mode_without_an_analytic_from_dual_vjp(x64):
    """"lag" mode for a retention with no ``from_dual_vjp`` (elastic net: soft threshold, hparam
    ``gamma``): ``jax.vjp`` of ``from_dual`` at the recomputed ``z``, ``d/dgamma`` included."""
    base = _get("yaad")
    spec = mj.MirasSpec(memory=base.memory, bias=mj.bias.l2_bias(), retention=mj.retention.elastic_net_retention(),
                        optimizer=mj.inner_opt.gd())
    assert spec.retention.chunk_mode == "lag" and not hasattr(spec.retention, "from_dual_vjp")
    spec, state, args = _setup(spec, {}, T=29, d=8, seed=4, wide=True)
    _assert_close(_outputs_and_vjp(spec, state, args, 8, "hand"),
                  _outputs_and_vjp(spec, state, args, 8, "autodiff"), **EXACT)


@pytest.mark.parametrize("name", [pytest.param("moneta", marks=pytest.mark.slow),
                                  pytest.param("yaad", marks=pytest.mark.slow), "memora"])
def test_hand_vjp_matches_autodiff_in_float32(name):
    spec, state, args = _setup(name, {}, T=40, d=8, seed=3)
    _assert_close(_outputs_and_vjp(spec, state, args, 16, "hand"),
                  _outputs_and_vjp(spec, state, args, 16, "autodiff"))


@pytest.mark.parametrize("name,remat", [("moneta", 2), pytest.param("titans", 2, marks=pytest.mark.slow),
                                         pytest.param("memora", 3, marks=pytest.mark.slow),
                                         pytest.param("yaad", 1, marks=pytest.mark.slow)])
def test_remat_groups_recompute_the_same_gradients(name, remat):
    """``remat_every = R``: the backward recomputes each group of R chunks from its start state."""
    spec, state, args = _setup(name, {}, T=45, d=8, seed=5)
    _assert_close(_outputs_and_vjp(spec, state, args, 4, "hand", remat_every=remat),
                  _outputs_and_vjp(spec, state, args, 4, "hand"))


def test_strong_decay_gradients_stay_finite_and_agree():
    """Decays near 0 (exp of large negative cumulative logs in the coefficients)."""
    spec, state, (q, k, v, gates) = _setup("moneta", {}, T=40, d=8, seed=9)
    gates = {**gates, "decay": jax.random.uniform(jax.random.key(1), (40,), minval=1e-3, maxval=0.05)}
    got = _outputs_and_vjp(spec, state, (q, k, v, gates), 16, "hand")
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))
    _assert_close(got, _outputs_and_vjp(spec, state, (q, k, v, gates), 16, "autodiff"))


def test_memorize_uses_the_hand_vjp_for_every_minibatch_preset():
    assert plan_lib.hand_vjp_blocker(_get("moneta")) is None
    assert all(plan_lib.hand_vjp_blocker(mj.presets.get(n)) is None for n in ("moneta", "yaad", "memora"))
    assert plan_lib.hand_vjp_blocker(mj.presets.get("titans")) is None   # momentum too
    with pytest.raises(ValueError, match="vjp must be"):
        spec, state, (q, k, v, gates) = _setup("moneta", {}, T=8, d=4, seed=0)
        chunked.memorize_chunked(spec, state, q, k, v, gates, 4, vjp="manual")


@pytest.mark.parametrize("q", [4.0, 3.0])
def test_static_integer_q_equals_the_traced_q_path(q):
    """A concrete integer ``q`` takes ``int_pow_sum`` (no exp / log per entry); it must equal the
    general path (``q`` traced: the spec's hparams a differentiated argument) on values and on the
    gradients w.r.t. everything else."""
    spec, state, args = _setup("moneta", {"q": q}, T=37, d=8, seed=11)
    assert chunked_vjp.static_q(spec) == int(q)
    assert chunked_vjp.static_q(spec.with_hparams(q=3.5)) is None

    def run(hp, memory, retention, q_, k, v, gates):
        s = spec if hp is None else spec.replace(hparams=hp)
        if hp is not None:
            assert chunked_vjp.static_q(s) is None          # traced: the general path
        st = MemoryState(memory, retention, state.optimizer)
        y, fin = chunked.memorize_chunked(s, st, q_, k, v, gates, 8)
        return y, fin.memory, fin.retention

    def vjp_of(f):   # jitted: eager dispatch dominated the test time
        def go(*primals):
            out, fn = jax.vjp(f, *primals)
            return out, fn(_random_cotangent(out, 3))   # the same cotangent for both (same shapes)
        return jax.jit(go)

    primals = (state.memory, state.retention, *args)
    out_s, g_s = vjp_of(lambda *a: run(None, *a))(*primals)
    out_t, g_t = vjp_of(run)(spec.hparams, *primals)
    _assert_close((out_s, g_s), (out_t, g_t[1:]))


@pytest.mark.parametrize("floor", [1e-2, 3.0])
def test_static_q_norm_floor_gradient_equals_the_traced_path(floor):
    """With ``q`` a concrete integer the l_q scale takes ``int_pow_sum``; ``d/d norm_floor`` (traced:
    a grid over it) must equal the general path's, below the floor (3.0: every chunk-end norm is
    floored) and above it."""
    spec, state, args = _setup("moneta", {}, T=37, d=8, seed=12)
    cot = None

    def loss(floor_, traced_q):
        s = spec.with_hparams(norm_floor=floor_)
        if traced_q is not None:
            s = s.replace(hparams={**s.hparams, "retention": {**s.hparams["retention"], "q": traced_q}})
        assert (chunked_vjp.static_q(s) is None) == (traced_q is not None)
        y, fin = chunked.memorize_chunked(s, state, *args, 8)
        return jnp.sum(y * cot) + jnp.sum(fin.memory["layers"][0]) + jnp.sum(fin.retention["layers"][1])

    cot = jax.random.normal(jax.random.key(5), (37, 8))
    f = jnp.float32(floor)
    g_static = jax.jit(jax.grad(loss))(f, None)
    g_traced = jax.jit(jax.grad(loss))(f, jnp.float32(4.0))     # q a jit argument: traced
    assert bool(jnp.isfinite(g_static))
    np.testing.assert_allclose(g_static, g_traced, rtol=2e-4, atol=1e-6)
    if floor > 1:
        assert abs(float(g_traced)) > 1e-3   # the floor is active: the comparison is not of zeros


PACKED = [("moneta", {}), ("titans", {}), ("memora", {"anchor": True}),
          pytest.param("memora", {}, marks=pytest.mark.slow), pytest.param("yaad", {}, marks=pytest.mark.slow),
          pytest.param("moneta", {"anchor": True}, marks=pytest.mark.slow),
          pytest.param("titans", {"anchor": True}, marks=pytest.mark.slow),
          pytest.param("moneta", {"memory": "linear"}, marks=pytest.mark.slow),
          pytest.param("ttt_mlp", {}, marks=pytest.mark.slow),
          pytest.param("ttt_linear", {}, marks=pytest.mark.slow),
          pytest.param("memora", {"memory": "linear"}, marks=pytest.mark.slow)]


def _packed_ids(rng, T, c):
    """A whole chunk of left padding, a document and a pad ending the next chunk, so that the next
    document starts on the chunk grid; then 2-4 documents of random lengths (one of length 1) and
    right padding."""
    ids = [0] * c + [1] * (c - 1) + [0]
    body = T - len(ids) - 1
    n = int(rng.integers(2, 5))
    cuts = sorted(set(rng.choice(np.arange(2, body), size=n - 1, replace=False).tolist()) | {1})
    bounds = [0, *cuts, body]
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ids += [i + 2] * (b - a)
    return np.array(ids + [0] * (T - len(ids)), np.int32)


@pytest.mark.parametrize("name,kw", PACKED, ids=[_id(c) for c in PACKED])
def test_packed_rows_hand_vjp_equals_autodiff(name, kw, x64):
    """Packed rows (``segment_ids``): the hand-written VJP of the packed chunk forward (position-0
    state swap, document masks, the reset state as a read base, the later documents' factors at
    the reset memory) equals autodiff of that forward, w.r.t. every input including the reset state
    (distinct from the initial state here), float64."""
    from miras_jax.engine.segments import boundaries
    rng = np.random.default_rng(zlib.crc32(repr(("packed", name, sorted(kw.items()))).encode()))
    c = int(rng.choice([4, 8]))
    T, d = int(rng.integers(3 * c + 4, 6 * c)), int(rng.choice([4, 8]))
    spec, state, args = _setup(name, kw, T, d, seed=int(rng.integers(100)), wide=True)
    reset, real = boundaries(jnp.asarray(_packed_ids(rng, T, c)))
    reset_state = jax.tree.map(lambda a: 0.8 * a + 0.01, state)

    def run(vjp):
        def f(hp, memory, retention, r_mem, r_ret, q, k, v, gates):
            st = MemoryState(memory, retention, state.optimizer)
            rs = MemoryState(r_mem, r_ret, reset_state.optimizer)
            y, fin = chunked.memorize_chunked(spec.replace(hparams=hp), st, q, k, v, gates, c, vjp=vjp,
                                              segments=(reset, real, rs))
            return y, fin.memory, fin.retention, fin.optimizer

        def go(*primals):   # jitted: eager dispatch dominated the test time
            out, fn = jax.vjp(f, *primals)
            return out, fn(_random_cotangent(out, 42))
        return jax.jit(go)(spec.hparams, state.memory, state.retention, reset_state.memory,
                           reset_state.retention, *args)

    _assert_close(run("hand"), run("autodiff"), **EXACT)


@pytest.mark.parametrize("name", [pytest.param("moneta", marks=pytest.mark.slow),
                                  pytest.param("titans", marks=pytest.mark.slow)])
def test_packed_rows_remat_groups(name):
    from miras_jax.engine.segments import boundaries
    spec, state, args = _setup(name, {}, T=45, d=8, seed=6)
    reset, real = boundaries(jnp.asarray(_packed_ids(np.random.default_rng(1), 45, 4)))
    segs = (reset, real, init_state(spec, state.memory))

    def run(remat):
        def f(memory, q, k, v, gates):
            y, fin = chunked.memorize_chunked(spec, MemoryState(memory, state.retention, state.optimizer),
                                              q, k, v, gates, 4, remat_every=remat, segments=segs)
            return y, fin.memory
        out, fn = jax.vjp(f, state.memory, *args)
        return out, fn(_random_cotangent(out, 3))

    _assert_close(run(2), run(0))
