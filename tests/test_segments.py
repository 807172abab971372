"""Packed rows (``segment_ids``): document boundaries restart the memory on every engine that takes
them (``engine/segments.py``): no leak across documents, packed == separate, padding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from miras_jax.engine import segments
from tests.helpers import random_inputs, some_slow

MINIBATCH = ["moneta", "yaad", "memora", "titans", "ttt_linear", "ttt_mlp"]
SLOW = pytest.mark.slow
TOL = dict(rtol=1e-9, atol=1e-9)   # float64
F32 = dict(rtol=2e-4, atol=2e-5)   # the exact chunk forms compute in float32


def _f64(t):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)


def _ids(lengths, pad_left=0, pad_right=0):
    ids = [0] * pad_left + [i + 1 for i, n in enumerate(lengths) for _ in range(n)] + [0] * pad_right
    return jnp.array(ids, jnp.int32)


def _lengths(rng, T, c):
    """1-5 documents summing to T, some of length 1, boundaries on and off the chunk grid."""
    n = int(rng.integers(1, 6))
    cuts = sorted(rng.choice(np.arange(1, T), size=n - 1, replace=False)) if n > 1 else []
    if n > 2:
        cuts[0] = (cuts[0] // c) * c or cuts[0]   # one boundary on the grid where it fits
    bounds = [0, *cuts, T]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _setup(name, T, d=8, seed=0):
    spec = mj.presets.get(name)
    q, k, v, gates = random_inputs(seed, T, d, d)
    gates = {g: gates[g] for g in spec.required_gates}
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    if spec.memory.kind == "linear" and name != "memora":   # a W_0 that is not zero
        params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(seed + 2), w.shape, w.dtype), params)
    return spec, _f64(params), _f64((q, k, v, gates))


def _run(spec, params, xs, seg, impl, chunk):
    return mj.memorize(spec, params, *xs, chunk_size=chunk, implementation=impl, segment_ids=seg)


def test_boundaries_restart_at_each_new_real_document():
    seg = jnp.array([0, 0, 3, 3, 0, 3, 5, 5, 1, 0], jnp.int32)
    reset, real = segments.boundaries(seg)
    np.testing.assert_array_equal(real, seg != 0)
    # the first document (id 3, after left padding) continues; a pad between 3 and 3 changes nothing
    np.testing.assert_array_equal(reset, [0, 0, 0, 0, 0, 0, 1, 0, 1, 0])


@pytest.mark.parametrize("bad,err", [(jnp.zeros(7, jnp.float32), TypeError), (jnp.zeros(6, jnp.int32), ValueError),
                                     (-jnp.ones(7, jnp.int32), ValueError), ([1] * 7, TypeError)])
def test_bad_segment_ids_are_rejected(bad, err, x64):
    spec, params, xs = _setup("moneta", 7)
    with pytest.raises(err, match="segment_ids"):
        _run(spec, params, xs, bad, "reference", 1)


@pytest.mark.parametrize("name", some_slow(mj.presets.names(), {"omeganet"}))   # atlas keeps the window's path
def test_token_engine_packed_equals_separate(name, x64):
    """Every preset: a packed row on the token engine equals each document run alone."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    T = 21
    lengths = _lengths(rng, T, 4)
    spec, params, xs = _setup(name, T)
    y, _ = _run(spec, params, xs, _ids(lengths), "reference", 1)
    lo = 0
    for n in lengths:
        part = jax.tree.map(lambda x: x[lo:lo + n], xs)
        y_doc, _ = _run(spec, params, part, None, "reference", 1)
        np.testing.assert_allclose(y[lo:lo + n], y_doc, **TOL, err_msg=f"{name} {lengths}")
        lo += n


@pytest.mark.parametrize("name", MINIBATCH)
def test_minibatch_reference_equals_separate_when_documents_start_on_the_grid(name, x64):
    c, lengths = 4, [8, 4, 9]
    spec, params, xs = _setup(name, sum(lengths))
    y, _ = _run(spec, params, xs, _ids(lengths), "reference", c)
    lo = 0
    for n in lengths:
        y_doc, _ = _run(spec, params, jax.tree.map(lambda x: x[lo:lo + n], xs), None, "reference", c)
        np.testing.assert_allclose(y[lo:lo + n], y_doc, **TOL)
        lo += n


def _values_and_grads(spec, params, xs, seg, impl, c):
    def f(params, xs):
        y, st = _run(spec, params, xs, seg, impl, c)
        return y, st.memory
    def go(params, xs):   # jitted: eager dispatch of the engines' ops dominated the test time
        out, vjp = jax.vjp(f, params, xs)
        keys = jax.random.split(jax.random.key(7), len(jax.tree.leaves(out)))
        ct = jax.tree.unflatten(jax.tree.structure(out),
                                [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, jax.tree.leaves(out))])
        return out, vjp(ct)
    return jax.jit(go)(params, xs)


@pytest.mark.parametrize("name", some_slow(MINIBATCH, {"ttt_linear", "ttt_mlp", "memora", "titans"}))
def test_minibatch_xla_equals_its_reference_on_random_boundaries(name, x64):
    """The mini-batch chunk form on packed rows equals the reference loops (values and gradients),
    documents of random lengths (length 1 included), boundaries on and off the chunk grid, padding."""
    rng = np.random.default_rng(abs(hash(name + "x")) % 2**32)
    c, T = 4, int(rng.integers(14, 30))
    lengths = _lengths(rng, T - 3, c) + [1]
    seg = _ids(lengths, pad_left=1, pad_right=1)
    spec, params, xs = _setup(name, T, seed=int(rng.integers(50)))
    got = _values_and_grads(spec, params, xs, seg, "xla", c)
    want = _values_and_grads(spec, params, xs, seg, "reference", c)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8, err_msg=f"{name} {lengths}")


def _aligned_ids(rng, c, ndocs):
    """Documents of random lengths (1 included) each padded to a multiple of ``c``, after a chunk of
    left padding: every document starts on the grid, and chunks end in padding."""
    lengths = [1, *rng.integers(2, 3 * c, size=ndocs - 1)]
    rng.shuffle(lengths)
    ids = [0] * c
    for j, n in enumerate(lengths):
        ids += [j + 1] * int(n) + [0] * (-int(n) % c)
    return jnp.array(ids, jnp.int32)


@pytest.mark.parametrize("name", some_slow(MINIBATCH, {"yaad", "ttt_linear", "ttt_mlp"}))
def test_aligned_rows_fast_path_equals_the_general_one(name, x64):
    """``segment_align`` (documents on the chunk grid): the mini-batch form's one-document chunks give
    the general packed form's values and gradients (hand VJP), incl. the reset state's gradient."""
    rng = np.random.default_rng(abs(hash(name + "a")) % 2**32)
    c = 4
    seg = _aligned_ids(rng, c, 4)
    spec, params, xs = _setup(name, seg.shape[0], seed=int(rng.integers(50)))

    def vg(align):
        def f(params, xs):
            y, st = mj.memorize(spec, params, *xs, chunk_size=c, implementation="xla", segment_ids=seg,
                                segment_align=align)
            return y, st.memory
        def go(params, xs):
            out, vjp = jax.vjp(f, params, xs)
            ct = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), out)
            return out, vjp(ct)
        return jax.jit(go)(params, xs)

    for a, b in zip(jax.tree.leaves(vg(c)), jax.tree.leaves(vg(0))):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10, err_msg=f"{name} {seg}")
    # and it is a different, smaller program: no second weight product per chunk
    size = lambda align: len(str(jax.make_jaxpr(lambda xs: vg(align))(xs)))  # noqa: E731
    assert size(c) < size(0)


def test_segment_align_is_checked_on_concrete_ids():
    spec, params, xs = _setup("moneta", 12)
    seg = jnp.array([1] * 4 + [2] * 6 + [3] * 2, jnp.int32)   # document 3 starts at 10
    with pytest.raises(ValueError, match="position 10 of row 0"):
        _run_kw(spec, params, xs, seg, segment_align=4)
    with pytest.raises(ValueError, match="segment_align must be"):
        _run_kw(spec, params, xs, seg, segment_align=-4)
    with pytest.raises(ValueError, match="needs segment_ids"):
        _run_kw(spec, params, xs, None, segment_align=4)
    y2, _ = _run_kw(spec, params, xs, seg, segment_align=1)    # any start is a multiple of 1
    y0, _ = _run_kw(spec, params, xs, seg, segment_align=0)
    np.testing.assert_array_equal(y2, y0)


def _run_kw(spec, params, xs, seg, **kw):
    return mj.memorize(spec, params, *xs, chunk_size=2, implementation="xla", segment_ids=seg, **kw)


def _no_leak(spec, params, xs, seg, impl, c):
    """For each document j: the VJP of its outputs reaches no input of an earlier document."""
    ids = np.asarray(seg)

    @jax.jit   # the document's mask is an argument: one program for every document
    def go(xs, mask):
        def f(xs):
            y, _ = _run(spec, params, xs, seg, impl, c)
            return jnp.where(mask[:, None], y, 0.0)
        y, vjp = jax.vjp(f, xs)
        return vjp(jnp.ones_like(y))

    for j in np.unique(ids[ids > 0]):
        (g,) = go(xs, jnp.asarray(ids == j))
        first = int(np.argmax(ids == j))
        earlier = np.arange(len(ids)) < first
        for leaf in jax.tree.leaves(g):
            assert np.all(np.asarray(leaf)[earlier] == 0.0), f"doc {j} leaks into earlier tokens"
        assert any(np.any(np.asarray(leaf)[ids == j] != 0.0) for leaf in jax.tree.leaves(g))


@pytest.mark.parametrize("name,impl,c", [("moneta", "xla", 4), pytest.param("titans", "xla", 4, marks=SLOW),
                                         pytest.param("memora", "xla", 4, marks=SLOW),
                                         pytest.param("moneta", "reference", 4, marks=SLOW),
                                         ("gated_deltanet", "xla", 4), ("retnet", "xla", 4), ("yaad", "reference", 1)])
def test_no_leak_into_earlier_documents(name, impl, c, x64):
    spec, params, xs = _setup(name, 19)
    _no_leak(spec, params, xs, _ids([5, 1, 6, 7]), impl, c)


@pytest.mark.parametrize("name,impl,c,pads", [
    ("moneta", "xla", 4, ((4, 0), (0, 5), (8, 3))),          # mini-batch: left pads keep the chunk grid
    pytest.param("titans", "xla", 4, ((4, 0), (0, 5), (4, 2)), marks=SLOW),
    ("yaad", "reference", 1, ((3, 0), (0, 5), (2, 2))),      # token engine: any padding
    pytest.param("gated_deltanet", "xla", 4, ((3, 0), (0, 5), (2, 2)), marks=SLOW),  # exact forms: any padding
    ("retnet", "xla", 4, ((3, 0), (0, 5), (2, 2)))])
def test_padding_changes_no_real_output_or_gradient(name, impl, c, pads, x64):
    """Pad tokens (id 0, random inputs) change no output or gradient of a real token. The mini-batch
    form keeps the row's chunk grid, so its left padding comes in whole chunks (any other left
    padding moves the grid: a different, equally valid, stale-gradient schedule)."""
    spec, params, xs = _setup(name, 17)
    lengths = [6, 11]
    tol = TOL if mj.plan(spec, impl, c).engine in ("tokens", "minibatch") else F32
    base_y, (base_dp, base_dx) = _padded(spec, params, xs, lengths, 0, 0, impl, c)
    for left, right in pads:
        y, (dp, dx) = _padded(spec, params, xs, lengths, left, right, impl, c)
        np.testing.assert_allclose(y, base_y, **tol)
        for a, b in zip(jax.tree.leaves((dp, dx)), jax.tree.leaves((base_dp, base_dx))):
            np.testing.assert_allclose(a, b, **tol)


def _padded(spec, params, xs, lengths, left, right, impl, c):
    """Outputs and gradients of the real tokens of a row padded with ``left`` / ``right`` pad tokens
    (pad inputs are random, not zero: they must not matter)."""
    T = sum(lengths)
    noise = jax.tree.map(lambda x: 0.5 + jnp.abs(jax.random.normal(jax.random.key(3), (left + right,) + x.shape[1:])),
                         xs)
    pad = lambda x, z: jnp.concatenate([z[:left], x, z[left:]])  # noqa: E731
    seg = _ids(lengths, left, right)

    def f(params, xs):
        y, _ = _run(spec, params, jax.tree.map(pad, xs, noise), seg, impl, c)
        return y[left:left + T]
    def go(params, xs):
        y, vjp = jax.vjp(f, params, xs)
        return y, vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))
    return jax.jit(go)(params, xs)


def test_batched_rows_take_their_own_segment_ids():
    spec = mj.presets.get("moneta")
    B, T, H, d = 2, 12, 2, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, d)) / 3 for kk in ks[:3])
    gates = {"lr": jnp.full((B, T, H), 0.3), "decay": jnp.full((B, T, H), 0.9)}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[3], H))
    seg = jnp.stack([_ids([5, 7]), _ids([12])])
    y, _ = mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=4, segment_ids=seg)
    # one jitted row program for every (b, h) (eager calls retraced and recompiled the engine's scans)
    row = jax.jit(lambda *a: mj.memorize(spec, *a[:5], chunk_size=4, segment_ids=a[5])[0])
    for b in range(B):
        for h in range(H):
            y1 = row(jax.tree.map(lambda x: x[h], params), q[b, :, h], k[b, :, h], v[b, :, h],
                     {g: x[b, :, h] for g, x in gates.items()}, seg[b])
            np.testing.assert_allclose(y[b, :, h], y1, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="segment_ids"):
        mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=4, segment_ids=seg[0])


EXACT = ["linear_attention", "retnet", "mamba2", "deltanet", "gated_deltanet", "longhorn", "deltaproduct"]


@pytest.mark.parametrize("name", some_slow(EXACT, {"deltaproduct"}))
def test_exact_forms_equal_the_token_engine_on_packed_rows(name, x64):
    """The exact Hebbian / delta chunk forms on packed rows (restarts on and off the chunk grid,
    length-1 documents, padding) equal the token recurrence, values and gradients."""
    rng = np.random.default_rng(abs(hash(name + "e")) % 2**32)
    T = 22
    seg = _ids(_lengths(rng, T - 3, 4) + [1], pad_left=1, pad_right=1)
    spec = mj.presets.get(name)
    n = spec.num_steps
    q, k, v, gates = random_inputs(3, T, 8, 8, num_steps=n)
    gates = {g: gates[g] for g in spec.required_gates}
    params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(4), w.shape, w.dtype),
                          spec.memory.init(jax.random.key(1), 8, 8))
    params, xs = _f64(params), _f64((q, k, v, gates))
    got = _values_and_grads(spec, params, xs, seg, "xla", 4)
    want = _values_and_grads(spec, params, xs, seg, "reference", 1)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = max(float(jnp.abs(b).max()), 1.0)
        np.testing.assert_allclose(a / scale, b / scale, **F32, err_msg=f"{name} {np.asarray(seg)}")


# --- layers and MirasLM: conv, attention and memory all restricted to the document -------------

def _lm(preset, pattern, chunk=4, **kw):
    from flax import nnx

    from miras_jax.nn import LMConfig, MirasLM
    # one block per pattern letter
    cfg = LMConfig(vocab_size=37, d_model=16, num_layers=len(pattern), num_heads=2, preset=preset,
                   pattern=pattern, chunk_size=chunk, window=5, gate_rank=4, **kw)
    return MirasLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("preset,pattern", [pytest.param("moneta", "MS", marks=SLOW), ("moneta", "M"),
                                            pytest.param("gated_deltanet", "MA", marks=SLOW),
                                            pytest.param("titans", "M", marks=SLOW)])
def test_lm_packed_row_equals_documents_run_alone(preset, pattern):
    """``MirasLM`` on a packed row (documents on the chunk grid, then padding) gives each document
    the logits it gets alone: the memory restarts, the short convolution and the attention
    (sliding and global) see only the document."""
    model = _lm(preset, pattern)
    lengths = [8, 4, 12]
    tokens = jax.random.randint(jax.random.key(1), (1, sum(lengths) + 3), 1, 37)
    seg = _ids(lengths, pad_right=3)[None]
    from flax import nnx
    fwd = nnx.jit(lambda m, t, s, align: m(t, segment_ids=s, segment_align=align), static_argnums=3)
    for align in (0, 4):   # segment_align: the documents start on the chunk grid
        packed = fwd(model, tokens, seg, align)
        lo = 0
        for n in lengths:
            alone = fwd(model, tokens[:, lo:lo + n], None, 0)
            np.testing.assert_allclose(packed[:, lo:lo + n], alone, rtol=2e-4, atol=2e-4)
            lo += n


@pytest.mark.parametrize("kind", [pytest.param("M", marks=SLOW), "S", "A"])
def test_block_outputs_of_a_document_do_not_depend_on_earlier_documents(kind):
    from flax import nnx

    from miras_jax.nn import LMConfig
    from miras_jax.nn.model import MirasBlock
    cfg = LMConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2, preset="gated_deltanet", pattern=kind,
                   chunk_size=4, window=5, gate_rank=4)
    block = MirasBlock(cfg, kind, rngs=nnx.Rngs(0))
    seg = _ids([5, 1, 7, 6])[None]
    x = jax.random.normal(jax.random.key(2), (1, 19, 16))
    ids = np.asarray(seg[0])

    @nnx.jit   # one program, the document's mask its argument (eager dispatch of the block dominated)
    def grad(block, x, mask):
        y, vjp = jax.vjp(lambda x_: block(x_, seg), x)
        return vjp(jnp.where(mask[None, :, None], 1.0, 0.0) * jnp.ones_like(y))[0]

    for j in (2, 3, 4):
        g = grad(block, x, jnp.asarray(ids == j))
        first = int(np.argmax(ids == j))
        assert np.all(np.asarray(g[0, :first]) == 0.0), f"{kind}: document {j} leaks into earlier tokens"
        assert np.any(np.asarray(g[0, ids == j]) != 0.0)


def test_a_rows_anchor_is_its_initial_states(x64):
    """An anchored retention: a row has one anchor, the initial state's (``segments.row_reset_state``), so
    with an initial state built from other params the mini-batch form equals its reference loops."""
    from miras_jax.engine.tokens import init_state
    spec, params, xs = _setup("moneta", 12)
    other = init_state(spec, jax.tree.map(lambda w: 1.1 * w, params))
    run = lambda impl: mj.memorize(spec, params, *xs, chunk_size=4, implementation=impl,  # noqa: E731
                                   segment_ids=_ids([5, 7]), initial_state=other)
    (y, st), (y_ref, st_ref) = run("xla"), run("reference")
    np.testing.assert_allclose(y, y_ref, **TOL)
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(st_ref)):
        np.testing.assert_allclose(a, b, **TOL)


def test_a_returning_id_is_a_new_document_for_conv_and_attention():
    """Every token mixer follows ``boundaries``: ids ``[3, 3, 5, 3]`` are three documents."""
    from miras_jax.nn.attention import flash_attend
    from miras_jax.nn.layer import causal_conv
    seg = jnp.array([[3, 3, 5, 3]], jnp.int32)
    np.testing.assert_array_equal(segments.document_ids(seg), [[1, 1, 2, 3]])
    np.testing.assert_array_equal(segments.document_ids(jnp.array([0, 3, 0, 3, 4, 0], jnp.int32)), [0, 1, 0, 1, 2, 0])
    y, _ = causal_conv(jnp.ones((1, 4, 1)), jnp.ones((4, 1)), segment_ids=seg)
    np.testing.assert_array_equal(y[0, :, 0], [1, 2, 1, 1])
    q = jax.random.normal(jax.random.key(0), (1, 4, 1, 8))
    v = jax.random.normal(jax.random.key(1), (1, 4, 1, 8))
    y = flash_attend(q, q, v, segment_ids=seg, block=2)
    np.testing.assert_allclose(y[0, 3], v[0, 3], rtol=1e-6)   # alone in its document
