"""Packed rows (``segment_ids``) on the Pallas kernels (interpreted on the CPU): equal to the XLA
path (values and VJPs w.r.t. q, k, v, gates, params, initial state) on rows of 1-5 documents with
length-1 documents, boundaries on and off the chunk grid, padding (a whole chunk of it, a pad at a
chunk's position 0); the kernels equal their pure-JAX twins; the packed kernels lower for TPU and
CUDA on this CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import miras_jax as mj
from miras_jax.engine import plan as plan_lib
from miras_jax.engine import segments as segments_lib
from pallas_kernels import MatrixChunkConfig, MLPChunkConfig, matrix_chunk, mlp_chunk
from pallas_kernels.common.segments import Segments
from tests.helpers import random_inputs, rotate
from tests.test_pallas import MARKERS, _close, _kernel_inputs, _lower
from tests.test_pallas import _get as _preset
from tests.test_pallas import batched_inputs
from tests.test_segments import _ids, _lengths

VAL_TOL = 1e-4        # float32, reordered chunk math; relative to the largest reference entry
GRAD_TOL = 2e-3       # gradients, one notch looser
LAG_TOL = 3e-3        # Memora (softmax of log-weights amplifies rounding)
SLOW = pytest.mark.slow

# T = 45, chunk 8: pads at 0-1; documents of 5 and 1 (the row's first two); a pad at chunk 1's
# position 0; a document up to 15; chunk 2 all padding; a document starting at chunk 3's position 0
# (a restart on the grid); a document of length 1; one crossing two chunks; a pad at the end.
FIXED = jnp.array([0, 0] + [1] * 5 + [2] + [0] + [3] * 7 + [0] * 8 + [4] * 7 + [5] + [6] * 12 + [0], jnp.int32)


def _random_ids(seed, T, c):
    """1-5 documents (some of length 1, boundaries on and off the grid) between pads."""
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, T - 3, c) + [1]
    return _ids(lengths, pad_left=1, pad_right=1)


def _get(name):
    """The preset; ``<name>-linear``: with a matrix memory (the kernels anchor an MLP memory only)."""
    if name.endswith("-linear"):
        return mj.presets.get(name[:-len("-linear")], memory="linear", anchor=False)
    return _preset(name)


def _setup(name, T, d=8, seed=0):
    spec = _get(name)
    q, k, v, gates = random_inputs(seed, T, d, d)
    if name.startswith("yaad"):   # residual norms clear of the Huber switch (no branch flips between paths)
        gates["delta"] = jnp.where(jnp.arange(T) % 2 == 0, 0.05, 50.0)
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    if spec.memory.kind == "linear" and not name.startswith("memora"):   # a W_0 that is not zero
        params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(seed + 2), w.shape), params)
    return spec, params, (q, k, v, gates)


def _vjp(spec, params, args, seg, impl, c, initial_state=None):
    """Outputs and VJPs w.r.t. params, the initial state, q, k, v and gates."""
    def f(p, state, q, k, v, gates):
        y, st = mj.memorize(spec, p, q, k, v, gates, chunk_size=c, implementation=impl, segment_ids=seg,
                            initial_state=state)
        return y, st.memory

    def go(params, initial_state, args):   # jitted: eager dispatch dominated the test time
        out, vjp = jax.vjp(f, params, initial_state, *args)
        keys = jax.random.split(jax.random.key(42), len(jax.tree.leaves(out)))
        cot = jax.tree.unflatten(jax.tree.structure(out),
                                 [jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, jax.tree.leaves(out))])
        return out, vjp(cot)
    return jax.jit(go)(params, initial_state, args)


def _pallas_equals_xla(name, seg, c, initial_state=None, seed=0):
    spec, params, args = _setup(name, seg.shape[0], seed=seed)
    assert plan_lib.plan(spec, "pallas", c).engine == "pallas"
    out_x, g_x = _vjp(spec, params, args, seg, "xla", c, initial_state)
    out_p, g_p = _vjp(spec, params, args, seg, "pallas", c, initial_state)
    tol_v, tol_g = (LAG_TOL, LAG_TOL) if name.startswith("memora") else (VAL_TOL, GRAD_TOL)
    _close(out_p, out_x, tol_v)
    _close(g_p, g_x, tol_g)
    real = np.asarray(seg) != 0
    assert np.all(np.asarray(out_p[0])[~real] == 0.0)   # pad tokens read 0


# presets by kernel mode: matrix memory (exact delta, Hebbian / decay, l_q scale, KL lag, Huber GD),
# MLP memory (decay + Huber, anchored l_q, anchored KL, plain GD)
MATRIX = ["gated_deltanet", "retnet", "moneta-linear", "memora-linear", "yaad-linear"]
MLP = ["moneta", "yaad", "memora", "ttt_mlp"]


@pytest.mark.parametrize("name", ["gated_deltanet", "memora-linear", "moneta"]   # moneta-linear: batched test
                         + [pytest.param(n, marks=SLOW) for n in ("moneta-linear", "retnet", "yaad-linear", "yaad",
                                                                  "memora", "ttt_mlp", "deltanet", "linear_attention")])
def test_packed_pallas_equals_xla(name):
    """Every kernel mode on the fixed row: restarts on and off the grid, length-1 documents, a pad at a
    chunk's position 0, a whole chunk of padding."""
    _pallas_equals_xla(name, FIXED, 8)


@pytest.mark.parametrize("name,seed", [pytest.param(n, s, marks=SLOW)
                                       for n in MATRIX + MLP for s in (1, 2)])
def test_packed_pallas_equals_xla_on_random_rows(name, seed):
    c = 4 if seed == 1 else 8
    _pallas_equals_xla(name, _random_ids(seed, 29, c), c, seed=seed)


@pytest.mark.parametrize("name", [pytest.param("gated_deltanet", marks=SLOW), pytest.param("yaad", marks=SLOW)])
def test_packed_pallas_continues_the_first_document_from_the_initial_state(name):
    """The row's first document starts from ``initial_state`` (its gradient too); later ones from W_0."""
    spec, params, args = _setup(name, 21)
    seg = _ids([6, 9, 3], pad_right=3)
    _, st = mj.memorize(spec, params, *random_inputs(5, 10, 8, 8)[:3],
                        {n: g[:10] for n, g in args[3].items()}, chunk_size=8, implementation="xla")
    out_x, g_x = _vjp(spec, params, args, seg, "xla", 8, st)
    out_p, g_p = _vjp(spec, params, args, seg, "pallas", 8, st)
    _close(out_p, out_x, VAL_TOL)
    _close(g_p, g_x, GRAD_TOL)


@SLOW
def test_packed_pallas_takes_the_initial_states_anchor_as_the_rows():
    """A row has one anchor, the initial state's (``segments.row_reset_state``): with an initial state
    built from other params, pallas == xla, single row and batched."""
    from miras_jax.engine.tokens import init_state
    spec, params, args = _setup("moneta", 12)
    other = init_state(spec, jax.tree.map(lambda w: 1.1 * w, params))
    seg = _ids([5, 7])
    run = lambda impl: mj.memorize(spec, params, *args, chunk_size=4, implementation=impl,  # noqa: E731
                                   segment_ids=seg, initial_state=other)[0]
    _close(run("pallas"), run("xla"), VAL_TOL)
    batch = lambda t: jax.tree.map(lambda x: x[None, :, None], t)  # noqa: E731   [T, ...] -> [1, T, 1, ...]
    y, _ = mj.memorize_batched(spec, jax.tree.map(lambda x: x[None], params), *batch(args), chunk_size=4,
                               implementation="pallas", segment_ids=seg[None],
                               initial_state=jax.tree.map(lambda x: x[None, None], other))
    _close(y[0, :, 0], run("xla"), VAL_TOL)


@SLOW
def test_batched_packed_rows_equal_xla():
    """``memorize_batched``: each batch row its own ``segment_ids``, shared by the heads; the rows'
    first documents continue from an initial state (that of an earlier call; Moneta with a matrix
    memory: under the XLA path's vmap an anchor is never concrete, ``api._check_packed_anchor``)."""
    spec = _get("moneta-linear")
    B, T, H, d = 2, 20, 2, 8
    ks = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(kk, (B, T, H, d)) / 3 for kk in ks[:2])
    v = jax.random.normal(ks[2], (B, T, H, d))
    gates = {"lr": jax.random.uniform(ks[3], (B, T, H), minval=0.1, maxval=0.5),
             "decay": jax.random.uniform(ks[4], (B, T, H), minval=0.8, maxval=1.0)}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[4], H))
    seg = jnp.stack([_ids([5, 1, 14]), _ids([8, 9], pad_left=3)])
    prefix = lambda x: x[:, :8]  # noqa: E731   (inputs shuffled: another 8 tokens)
    _, st = mj.memorize_batched(spec, params, prefix(v), prefix(q), prefix(k), jax.tree.map(prefix, gates),
                                chunk_size=4, implementation="xla")
    run = lambda impl: mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=4,  # noqa: E731
                                           implementation=impl, segment_ids=seg, initial_state=st)
    (y_x, s_x), (y_p, s_p) = run("xla"), run("pallas")
    _close(y_p, y_x, VAL_TOL)
    _close(s_p.memory, s_x.memory, VAL_TOL)
    _close(s_p.retention, s_x.retention, VAL_TOL)


@SLOW
def test_packed_pallas_sharded_over_a_mesh_equals_xla():
    """Under ``shard_map`` (batch and heads split over 8 devices) the reset state and the document
    columns travel with their rows."""
    spec = _get("moneta")
    params, q, k, v, gates = batched_inputs(spec, 2, 4, 24, 16)
    seg = jnp.stack([_ids([5, 1, 14, 4]), _ids([9, 12], pad_left=3)])
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    run = lambda impl, mesh=None: jax.jit(lambda *a: mj.memorize_batched(  # noqa: E731
        spec, *a, chunk_size=8, implementation=impl, mesh=mesh, batch_axes="data", head_axes="tensor",
        segment_ids=seg))
    put = lambda x, p: jax.device_put(x, jax.sharding.NamedSharding(mesh, p))  # noqa: E731
    rows = P("data", None, "tensor")
    args = (put(params, P("tensor")), put(q, rows), put(k, rows), put(v, rows),
            jax.tree.map(lambda x: put(x, rows), gates))
    y_p, s_p = run("pallas", mesh)(*args)
    y_x, s_x = run("xla")(params, q, k, v, gates)
    assert len(y_p.sharding.device_set) == 8
    _close(y_p, y_x, VAL_TOL)
    _close(s_p.memory, s_x.memory, VAL_TOL)


def test_packed_documents_do_not_leak_on_the_kernels():
    """The gradient of a document's outputs reaches no input of an earlier document: exactly 0."""
    spec, params, args = _setup("gated_deltanet", 19)
    ids = np.asarray(_ids([5, 1, 6, 7]))

    @jax.jit   # the document's mask is an argument: one program for every document
    def go(args, mask):
        def f(args):
            y, _ = mj.memorize(spec, params, *args, chunk_size=4, implementation="pallas",
                               segment_ids=jnp.asarray(ids))
            return jnp.where(mask[:, None], y, 0.0)
        y, vjp = jax.vjp(f, args)
        return vjp(jnp.ones_like(y))

    for j in (2, 3, 4):
        (g,) = go(args, jnp.asarray(ids == j))
        earlier = np.arange(len(ids)) < int(np.argmax(ids == j))
        for leaf in jax.tree.leaves(g):
            assert np.all(np.asarray(leaf)[earlier] == 0.0), f"document {j} leaks into earlier tokens"


def test_auto_runs_packed_rows_on_the_kernels_on_accelerators():
    for name, channel in (("gated_deltanet", False), ("moneta", False), ("gla", True)):
        spec = _get(name)
        for backend in ("tpu", "gpu"):
            assert mj.plan(spec, "auto", 64, backend=backend, channel=channel).engine == "pallas"
        assert mj.plan(spec, "pallas", 64, channel=channel).engine == "pallas"
    assert mj.plan(_get("deltaproduct"), "auto", 64, backend="gpu").engine == "delta"  # no kernel


@pytest.mark.parametrize("name", ["gla", pytest.param("yaad-linear", marks=SLOW)])
def test_packed_channel_wise_decay_pallas_equals_xla(name):
    """Channel-wise decay ``[T, k]``: GLA (exact Hebbian on the XLA side) and a GD spec (mini-batch)."""
    spec, params, args = _setup(name, FIXED.shape[0])
    q, k, v, gates = args
    decay = random_inputs(3, FIXED.shape[0], 8, 8, channel_decay=True)[3]["decay"]
    args = (q, k, v, {**gates, "decay": decay})
    assert plan_lib.plan(spec, "pallas", 8, channel=True).kernel.channel
    out_x, g_x = _vjp(spec, params, args, FIXED, "xla", 8)
    out_p, g_p = _vjp(spec, params, args, FIXED, "pallas", 8)
    _close(out_p, out_x, VAL_TOL)
    _close(g_p, g_x, GRAD_TOL)


# ---------------------------------------------------------------------------------------------
# kernel level: both bodies interpreted == the pure-JAX twins (reference.py), packed rows
# ---------------------------------------------------------------------------------------------

MATRIX_CONFIGS = [
    MatrixChunkConfig(mode="delta", chunk_size=16),
    MatrixChunkConfig(residual="dot", chunk_size=16),
    MatrixChunkConfig(residual="lp", retention="scale", chunk_size=16),
    MatrixChunkConfig(residual="huber_switch", chunk_size=16),
    MatrixChunkConfig(residual="l2", retention="lag", chunk_size=16),
    MatrixChunkConfig(residual="dot", channel=True, chunk_size=16),
]
MLP_CONFIGS = [
    MLPChunkConfig(residual="huber_switch", chunk_size=16),
    MLPChunkConfig(residual="lp", retention="scale", chunk_size=16, anchor=True),
    MLPChunkConfig(residual="l2", retention="lag", chunk_size=16),
    MLPChunkConfig(residual="l2", retention="lag", chunk_size=16, anchor=True),
]
# T = 64, chunk 16 (Triton's blocks are powers of two >= 16): FIXED's first chunk, a chunk of padding,
# a restart at chunk 2's position 0, one inside it, a document across chunks 2-3, a pad at the end
FIXED16 = jnp.array(FIXED[:16].tolist() + [0] * 16 + [4] * 7 + [5] * 1 + [6] * 18 + [7] * 5 + [0], jnp.int32)


def _kernel_segments(B, H, reset_memory, accumulator):
    reset, real = segments_lib.boundaries(FIXED16)
    rows = lambda x: jnp.broadcast_to(x, (B, H, FIXED16.shape[0]))  # noqa: E731
    return Segments(rows(reset), rows(real), reset_memory, accumulator)


def _packed_kernel_vs_reference(cfg, backend, mlp):
    B, H, T, d = 1, 2, FIXED16.shape[0], 16
    lag = cfg.retention == "lag"
    q, k, v, lr, la, m0, gate = _kernel_inputs(B, H, T, d, f=32 if mlp else None, positive=lag)
    if getattr(cfg, "channel", False):   # channel-wise log decay [B, H, T, k]
        la = jnp.log(jax.random.uniform(jax.random.key(9), q.shape, minval=0.05, maxval=1.0))
    ws = jax.tree.map(lambda w: 0.7 * w[:, ::-1] + (0.3 if lag else 0.0), m0)   # a reset state of its own

    def run(**kw):
        def f(q, k, v, lr, la, m0, ws):
            seg = _kernel_segments(B, H, ws, jax.tree.map(lambda w: 1.1 * w, ws))
            if not mlp:
                y, st = matrix_chunk(q, k, v, lr, m0, la, None, gate, {"p": 3.0, "q": 3.0}, config=cfg,
                                     segments=seg, **kw)
                return y, st
            anchor = jax.tree.map(lambda w: jnp.log(0.8 * w) if lag else 0.8 * w, m0) if cfg.anchor else None
            return mlp_chunk(q, k, v, lr, m0, la, None, gate, {"p": 3.0, "q": 3.0}, anchor, config=cfg,
                             segments=seg, **kw)
        return f

    prim = (q, k, v, lr, la, m0, ws)
    out_r, vjp_r = jax.vjp(run(implementation="reference"), *prim)
    out_k, vjp_k = jax.vjp(run(backend=backend, interpret=True), *prim)
    cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape, x.dtype), out_r)
    _close(out_k, out_r, LAG_TOL if lag else VAL_TOL)
    _close(vjp_k(cot), vjp_r(cot), LAG_TOL if lag else GRAD_TOL)


def _slow_all_but(params, keep):
    """``params`` all under ``-m slow`` except those at the indices ``keep``."""
    return [pytest.param(*p.values, marks=() if i in keep else SLOW, id=p.id) for i, p in enumerate(params)]


def _matrix_id(c):
    return f"{c.mode}-{c.residual}-{c.retention}" + "-channel" * c.channel


@pytest.mark.parametrize("cfg,backend", _slow_all_but(rotate(MATRIX_CONFIGS, ["tpu", "triton"], name_id=_matrix_id),
                                                      keep=set()))   # all -m slow (pallas == xla covers the kernels by default)
def test_packed_matrix_kernel_equals_reference(cfg, backend):
    _packed_kernel_vs_reference(cfg, backend, mlp=False)


@pytest.mark.parametrize("cfg,backend", [pytest.param(*p.values, marks=SLOW, id=p.id) for p in rotate(
    MLP_CONFIGS, ["tpu", "triton"], name_id=lambda c: f"{c.residual}-{c.retention}" + "-anchor" * c.anchor)])
def test_packed_mlp_kernel_equals_reference(cfg, backend):
    _packed_kernel_vs_reference(cfg, backend, mlp=True)


def test_packed_kernel_input_errors():
    q, k, v, lr, la, m0, gate = _kernel_inputs(1, 1, 16, 16)
    reset = jnp.zeros((1, 1, 16), bool)
    with pytest.raises(TypeError, match="Segments"):
        matrix_chunk(q, k, v, lr, m0, la, config=MatrixChunkConfig(chunk_size=8), segments=(reset, reset, m0))
    with pytest.raises(ValueError, match="segments.real"):
        matrix_chunk(q, k, v, lr, m0, la, config=MatrixChunkConfig(chunk_size=8),
                     segments=Segments(reset, reset[..., :8], m0))


# ---------------------------------------------------------------------------------------------
# lowering: the packed kernels (forward and backward) for TPU (Mosaic) and CUDA (Triton)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,platform", [("gated_deltanet", "tpu"), ("moneta", "tpu"), ("gla", "tpu"),
                                           pytest.param("memora-linear", "tpu", marks=SLOW),
                                           pytest.param("memora", "tpu", marks=SLOW),
                                           pytest.param("moneta-linear", "tpu", marks=SLOW),
                                           pytest.param("gated_deltanet", "cuda", marks=SLOW),
                                           pytest.param("gla", "cuda", marks=SLOW),
                                           pytest.param("moneta", "cuda", marks=SLOW)])
def test_packed_memorize_pallas_lowers_for_accelerators(name, platform):
    spec = _get(name)
    q, k, v, gates = random_inputs(0, 64, 16, 16, channel_decay=name == "gla")
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(0), 16, 16)
    seg = _ids([20, 1, 11, 16, 10], pad_right=6)   # a restart at 32: on the 16-token grid

    def f(p, q, k, v, g):
        return mj.memorize(spec, p, q, k, v, g, chunk_size=16, implementation="pallas", segment_ids=seg)[0]

    text = _lower(jax.grad(lambda *a: jnp.sum(f(*a) ** 2)), (params, q, k, v, gates), platform)
    assert MARKERS[platform] in text
    assert "chunk_sweep_bwd" in text
