"""Pallas kernels (interpreted on the CPU) against their pure-JAX references and the engine's XLA
path — values and VJPs (q, k, v, gates, initial memory, final state), float32 and bfloat16, T not
a multiple of the chunk, several head counts and dims; both kernel bodies (Mosaic TPU, Triton)
interpreted; their TPU and CUDA lowerings produced on this CPU; dispatch and shard_map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import miras_jax as mj
from miras_jax.engine.api import memorize_batched
from miras_jax.engine.plan import kernel_blocker, resolve
from pallas_kernels import MatrixChunkConfig, MLPChunkConfig, Segments, Window, matrix_chunk, mlp_chunk
from tests.helpers import random_inputs, rotate, some_slow, unit_rows

VAL_TOL = 1e-4        # float32, reordered chunk math; relative to the largest reference entry
GRAD_TOL = 2e-3       # gradients, one notch looser
LAG_TOL = 3e-3        # Memora (softmax of log-weights amplifies rounding)
BF16_TOL = 2e-2       # bfloat16 inputs (same rounded inputs on both sides; float32 inside)

def _get(name, **kw):
    """The preset (``name`` ending in ``-paper``: with the paper's retention map, ``anchor=False``;
    ``-linear``: with a matrix memory)."""
    if name.endswith("-paper"):
        name, kw = name[:-len("-paper")], {**kw, "anchor": False}
    if name.endswith("-linear"):
        name, kw = name[:-len("-linear")], {**kw, "memory": "linear"}
    return mj.presets.get(name, **kw)


PALLAS = [n for n in mj.presets.names() if kernel_blocker(_get(n)) is None]
PAPER = [f"{n}-paper" for n in ("moneta", "yaad", "memora")]   # the unanchored maps (anchor=False)
UNSUPPORTED = [n for n in mj.presets.names() if kernel_blocker(_get(n)) is not None]


def _close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        scale = max(float(np.abs(y).max()), 1e-6)
        np.testing.assert_allclose(x / scale, y / scale, atol=tol)


# ---------------------------------------------------------------------------------------------
# engine level: memorize(implementation="pallas") == the XLA path
# ---------------------------------------------------------------------------------------------

def _setup(name, T, d, seed=0, dtype=jnp.float32):
    spec = _get(name)
    q, k, v, gates = random_inputs(seed, T, d, d, dtype=dtype, channel_decay=name == "gla")
    if name == "yaad":   # residual norms clear of the Huber switch (no branch flips between paths)
        gates["delta"] = jnp.where(jnp.arange(T) % 2 == 0, 0.05, 50.0).astype(dtype)
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    if spec.memory.kind == "linear" and name != "memora":
        params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.key(seed + 2), w.shape), params)
    return spec, params, (q, k, v, gates)


def _vjp(spec, params, args, **kw):
    def f(params, q, k, v, gates):
        y, st = mj.memorize(spec, params, q, k, v, gates, **kw)
        return y, st.memory

    def go(params, args):   # jitted: eager dispatch dominated the test time
        out, vjp = jax.vjp(f, params, *args)
        cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(42), x.shape, x.dtype), out)
        return out, vjp(cot)
    return jax.jit(go)(params, args)


# retnet, deltanet and longhorn run the kernels of linear_attention and gated_deltanet with other gates
# atlas: test_atlas.py's every-implementation test runs it on the kernel (against the reference)
@pytest.mark.parametrize("name", some_slow(PALLAS + PAPER + ["titans-linear"], slow=("retnet", "deltanet", "longhorn",
                                                                 "yaad-paper", "memora-paper", "atlas")))
@pytest.mark.parametrize("T,chunk", [(45, 16), pytest.param(64, 32, marks=pytest.mark.slow)])
def test_pallas_equals_xla(name, T, chunk):
    spec, params, args = _setup(name, T, d=8)
    out_x, g_x = _vjp(spec, params, args, chunk_size=chunk, implementation="xla")
    out_p, g_p = _vjp(spec, params, args, chunk_size=chunk, implementation="pallas")
    lag = name.startswith("memora")
    _close(out_p, out_x, LAG_TOL if lag else VAL_TOL)
    _close(g_p, g_x, LAG_TOL if lag else GRAD_TOL)


def test_pallas_honours_the_lq_norm_floor():
    """Moneta's ``norm_floor`` reaches the kernel: active floor, Pallas equals XLA."""
    spec, params, args = _setup("moneta", 45, d=8)
    spec = _get("moneta", norm_floor=5.0)
    out_x, g_x = _vjp(spec, params, args, chunk_size=16, implementation="xla")
    out_p, g_p = _vjp(spec, params, args, chunk_size=16, implementation="pallas")
    _close(out_p, out_x, VAL_TOL)
    _close(g_p, g_x, GRAD_TOL)


@pytest.mark.parametrize("name", ["gated_deltanet", "yaad", "moneta"])
def test_pallas_equals_xla_bfloat16(name):
    spec, params, args = _setup(name, 40, d=8, dtype=jnp.bfloat16)
    out_x, g_x = _vjp(spec, params, args, chunk_size=16, implementation="xla")
    out_p, g_p = _vjp(spec, params, args, chunk_size=16, implementation="pallas")
    assert out_p[0].dtype == jnp.bfloat16
    _close(out_p, out_x, BF16_TOL)
    _close(g_p, g_x, BF16_TOL)


@pytest.mark.parametrize("name,H,d", [("gated_deltanet", 3, 16), ("moneta", 2, 8), ("mamba2", 1, 32)])
def test_batched_pallas_equals_xla_with_initial_state(name, H, d):
    spec = _get(name)
    B, T = 2, 37
    keys = jax.random.split(jax.random.key(3), 3)
    qs, ks, vs, gs = zip(*[random_inputs(s, T, d, d) for s in range(B * H)])
    stack = lambda xs: jnp.stack(xs).reshape((B, H) + xs[0].shape).swapaxes(1, 2)  # noqa: E731
    q, k, v = stack(qs), stack(ks), stack(vs)
    gates = {n: stack([g[n] for g in gs]) for n in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(keys[0], H))
    first = dict(chunk_size=16, implementation="xla")
    _, st = memorize_batched(spec, params, q[:, :20], k[:, :20], v[:, :20],
                             {n: g[:, :20] for n, g in gates.items()}, **first)
    rest = lambda impl: memorize_batched(spec, params, q[:, 20:], k[:, 20:], v[:, 20:],  # noqa: E731
                                         {n: g[:, 20:] for n, g in gates.items()}, chunk_size=16,
                                         implementation=impl, initial_state=st)
    (y_x, s_x), (y_p, s_p) = rest("xla"), rest("pallas")
    _close(y_p, y_x, VAL_TOL)
    _close(s_p.memory, s_x.memory, VAL_TOL)
    _close(s_p.retention, s_x.retention, VAL_TOL)


def batched_inputs(spec, B, H, T, d):
    """``(params [H, ...], q, k, v [B, T, H, d], gates [B, T, H])`` for ``memorize_batched``."""
    q, k, v, g = random_inputs(0, B * H * T, d, d)
    shape = lambda x: x.reshape((B, T, H) + x.shape[1:])  # noqa: E731
    gates = {n: shape(g[n]) for n in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(jax.random.key(0), H))
    return params, shape(q), shape(k), shape(v), gates


@pytest.mark.parametrize("name,kw", [("yaad", {"memory": "linear"}), ("titans", {"memory": "linear"}),
                                     ("omeganet", {"degree": None})], ids=str)
def test_pallas_sharded_over_a_mesh_equals_unsharded(name, kw):
    spec = _get(name, **kw)   # titans, omeganet: the momentum state, the window's inputs through shard_map
    params, q, k, v, gates = batched_inputs(spec, 2, 4, 24, 16)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    f = lambda mesh: jax.jit(lambda *a: memorize_batched(  # noqa: E731
        spec, *a, chunk_size=8, implementation="pallas", mesh=mesh, batch_axes="data", head_axes="tensor"))
    y0, s0 = f(None)(params, q, k, v, gates)
    put = lambda x, p: jax.device_put(x, jax.sharding.NamedSharding(mesh, p))  # noqa: E731
    rows = P("data", None, "tensor")
    args = (put(params, P("tensor")), put(q, rows), put(k, rows), put(v, rows),
            jax.tree.map(lambda x: put(x, rows), gates))
    y1, s1 = f(mesh)(*args)
    assert len(y1.sharding.device_set) == 8
    grad = jax.grad(lambda qq: jnp.sum(f(mesh)(args[0], qq, *args[2:])[0] ** 2))(args[1])
    grad0 = jax.grad(lambda qq: jnp.sum(f(None)(params, qq, k, v, gates)[0] ** 2))(q)
    _close(y1, y0, VAL_TOL)
    _close(s1.memory, s0.memory, VAL_TOL)
    _close(grad, grad0, GRAD_TOL)


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_pallas_raises_for_uncovered_specs(name):
    spec = _get(name)
    q, k, v, gates = random_inputs(0, 8, 8, 8, num_steps=spec.num_steps)
    params = spec.memory.init(jax.random.key(0), 8, 8)
    with pytest.raises(NotImplementedError, match="pallas"):
        mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="pallas")


def test_anchored_retention_runs_on_the_mlp_kernel_only():
    assert {"moneta", "yaad", "memora"} <= set(PALLAS)   # anchored by default (MLP memory)
    spec = mj.presets.get("yaad", memory="linear", anchor=True)
    q, k, v, gates = random_inputs(0, 8, 8, 8)
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(0), 8, 8)
    with pytest.raises(NotImplementedError, match="anchored"):
        mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="pallas")


def test_channel_wise_decay_strong_and_weak(x=None):
    spec = _get("gla")
    for lo, hi in ((1e-3, 0.05), (0.97, 1.0)):   # strong decay: exp(-L) of a naive split would overflow
        q, k, v, gates = random_inputs(0, 40, 8, 8, channel_decay=True)
        gates["decay"] = jax.random.uniform(jax.random.key(5), gates["decay"].shape, minval=lo, maxval=hi)
        params = spec.memory.init(jax.random.key(0), 8, 8)
        out_x, g_x = _vjp(spec, params, (q, k, v, gates), chunk_size=16, implementation="xla")
        out_p, g_p = _vjp(spec, params, (q, k, v, gates), chunk_size=16, implementation="pallas")
        _close(out_p, out_x, VAL_TOL)
        _close(g_p, g_x, GRAD_TOL)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_p))


def test_auto_is_xla_on_cpu():
    spec = _get("moneta")
    assert resolve(spec, "auto") == "xla"
    q, k, v, gates = random_inputs(0, 8, 8, 8)
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(0), 8, 8)
    y_auto, _ = mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="auto")
    y_xla, _ = mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="xla")
    np.testing.assert_array_equal(y_auto, y_xla)


# ---------------------------------------------------------------------------------------------
# kernel level: both bodies (TPU, Triton) interpreted == reference.py
# ---------------------------------------------------------------------------------------------

def _kernel_inputs(B, H, T, d, f=None, seed=0, positive=False, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 9)
    q = unit_rows(jax.random.normal(ks[0], (B, H, T, d))).astype(dtype)
    k = unit_rows(jax.random.normal(ks[1], (B, H, T, d))).astype(dtype)
    v = jax.random.normal(ks[2], (B, H, T, d)).astype(dtype)
    lr = jax.random.uniform(ks[3], (B, H, T), minval=0.02, maxval=0.3)
    log_decay = jnp.log(jax.random.uniform(ks[4], (B, H, T), minval=0.7, maxval=1.0))
    gate = jnp.where(jnp.arange(T) % 2 == 0, 0.05, 50.0) * jnp.ones((B, H, T))
    if f is None:
        m0 = 0.3 * jax.random.normal(ks[5], (B, H, d, d))
        m0 = jnp.abs(m0) + 0.5 if positive else m0
    else:
        m0 = (jax.random.normal(ks[5], (B, H, f, d)) / jnp.sqrt(d), jax.random.normal(ks[6], (B, H, d, f)) / jnp.sqrt(f))
        m0 = tuple(jnp.abs(w) + 0.5 for w in m0) if positive else m0
    return q, k, v, lr, log_decay, m0, gate


MATRIX_CONFIGS = [
    MatrixChunkConfig(mode="delta", chunk_size=16),
    MatrixChunkConfig(residual="dot", chunk_size=16),
    MatrixChunkConfig(residual="lp", retention="scale", chunk_size=16),
    MatrixChunkConfig(residual="huber_switch", chunk_size=16),
    MatrixChunkConfig(residual="huber_coordinate", smooth=False, chunk_size=16),
    MatrixChunkConfig(residual="l2", retention="lag", chunk_size=16),
    MatrixChunkConfig(residual="dot", channel=True, chunk_size=16),
]
MLP_CONFIGS = [
    MLPChunkConfig(residual="huber_switch", chunk_size=16),
    MLPChunkConfig(residual="l2", chunk_size=16, momentum=True, anchor=True),   # Titans
    MLPChunkConfig(residual="lp", retention="scale", chunk_size=16),
    MLPChunkConfig(residual="l2", retention="lag", chunk_size=16),
    MLPChunkConfig(residual="huber_switch", chunk_size=16, anchor=True),
    MLPChunkConfig(residual="lp", retention="scale", chunk_size=16, anchor=True),
    MLPChunkConfig(residual="l2", retention="lag", chunk_size=16, anchor=True),
]


def _run_matrix(cfg, args, **kw):
    q, k, v, lr, la, m0, gate = args
    if cfg.channel:   # channel-wise log decay [B, H, T, k] in place of the scalar one
        la = jnp.log(jax.random.uniform(jax.random.key(9), q.shape, minval=0.05, maxval=1.0))

    def f(q, k, v, lr, la_, m0):
        y, st = matrix_chunk(q, k, v, lr, m0, la if cfg.channel else la_, None, gate, {"p": 3.0, "q": 3.0},
                             config=cfg, **kw)
        return y, st.memory
    return f


def _run_mlp(cfg, args, **kw):
    q, k, v, lr, la, m0, gate = args

    def f(q, k, v, lr, la, m0):
        # anchors derived from m0 (so their gradient path is checked too): the dual of 0.8 m0
        anchor = tuple((jnp.log(0.8 * w) if cfg.retention == "lag" else 0.8 * w) for w in m0) if cfg.anchor else None
        mom = {}
        if cfg.momentum:   # S_0 derived from m0 too
            mom = dict(log_momentum=jnp.log(jax.random.uniform(jax.random.key(8), lr.shape, minval=0.5, maxval=0.95)),
                       s0=tuple(0.1 * w for w in m0))
        y, st = mlp_chunk(q, k, v, lr, m0, la, None, gate, {"p": 3.0, "q": 3.0}, anchor, config=cfg, **mom, **kw)
        return y, st.memory, st.momentum
    return f


def _kernel_vs_reference(run, cfg, args, tol_v, tol_g, backend):
    ref = run(cfg, args, implementation="reference")
    ker = run(cfg, args, backend=backend, interpret=True)
    prim = args[:6]
    out_r, vjp_r = jax.vjp(ref, *prim)
    out_k, vjp_k = jax.vjp(ker, *prim)
    cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape, x.dtype), out_r)
    _close(out_k, out_r, tol_v)
    _close(vjp_k(cot), vjp_r(cot), tol_g)


# one interpreted backend per config by default, alternating; -m slow runs both (both lower:
# test_kernel_lowers_forward_and_backward)
@pytest.mark.parametrize("cfg,backend", rotate(
    MATRIX_CONFIGS, ["tpu", "triton"],
    name_id=lambda c: f"{c.mode}-{c.residual}-{c.retention}" + "-channel" * c.channel))
def test_matrix_kernel_equals_reference(cfg, backend):
    args = _kernel_inputs(2, 3, 45, 16, positive=cfg.retention == "lag")
    lag = cfg.retention == "lag"
    _kernel_vs_reference(_run_matrix, cfg, args, LAG_TOL if lag else VAL_TOL, LAG_TOL if lag else GRAD_TOL, backend)


def _mlp_cases():
    """``rotate(MLP_CONFIGS, backends)``, and the un-anchored l_p-scale / l2-lag cases under -m slow
    too: their anchored versions (a superset: the algebra on the deviation) keep each residual,
    retention and backend in the default suite, as huber-linear keeps the un-anchored kernel."""
    out = []
    for p in rotate(MLP_CONFIGS, ["tpu", "triton"],
                    name_id=lambda c: f"{c.residual}-{c.retention}" + "-anchor" * c.anchor + "-momentum" * c.momentum):
        cfg = p.values[0]
        if not p.marks and not cfg.anchor and cfg.retention in ("scale", "lag"):
            p = pytest.param(*p.values, marks=pytest.mark.slow, id=p.id)
        out.append(p)
    return out


@pytest.mark.parametrize("cfg,backend", _mlp_cases())
def test_mlp_kernel_equals_reference(cfg, backend):
    args = _kernel_inputs(1, 2, 40, 16, f=32, positive=cfg.retention == "lag")
    lag = cfg.retention == "lag"
    _kernel_vs_reference(_run_mlp, cfg, args, LAG_TOL if lag else VAL_TOL, LAG_TOL if lag else GRAD_TOL, backend)


@pytest.mark.parametrize("shape", [(1, 1, 7, 16, 8), (2, 4, 50, 32, 16), (1, 2, 96, 8, 32)])
def test_matrix_kernel_shapes_and_chunk_sizes(shape):
    B, H, T, d, c = shape
    cfg = MatrixChunkConfig(residual="lp", chunk_size=c)
    args = _kernel_inputs(B, H, T, d, seed=T)
    _kernel_vs_reference(_run_matrix, cfg, args, VAL_TOL, GRAD_TOL, "tpu")


def test_kernels_bfloat16_inputs():
    cfg = MatrixChunkConfig(mode="delta", chunk_size=16)
    args = _kernel_inputs(1, 2, 40, 16, dtype=jnp.bfloat16)
    y_k = _run_matrix(cfg, args, interpret=True)(*args[:6])[0]
    y_r = _run_matrix(cfg, args, implementation="reference")(*args[:6])[0]
    assert y_k.dtype == jnp.bfloat16
    _close(y_k, y_r, BF16_TOL)
    cfg = MLPChunkConfig(residual="lp", retention="scale", chunk_size=16)
    args = _kernel_inputs(1, 2, 40, 16, f=32, dtype=jnp.bfloat16)
    _close(_run_mlp(cfg, args, interpret=True)(*args[:6]), _run_mlp(cfg, args, implementation="reference")(*args[:6]),
           BF16_TOL)


# momentum (Titans), Muon and the Omega window (Atlas) on the matrix kernel: rows and packed rows
ATLAS_CASES = [   # (config, packed, backend); the other packing under -m slow
    (MatrixChunkConfig(optimizer="momentum", chunk_size=16), True, "triton"),
    (MatrixChunkConfig(residual="lp", window=3, chunk_size=16), False, "triton"),
    (MatrixChunkConfig(residual="huber_switch", optimizer="momentum", window=5, chunk_size=4), True, "tpu"),
    (MatrixChunkConfig(optimizer="muon", ns_steps=2, chunk_size=4), False, "tpu"),
    (MatrixChunkConfig(optimizer="muon", ns_steps=2, window=4, chunk_size=4), True, "tpu"),
]


def _atlas_cases():
    out = []
    for cfg, packed, backend in ATLAS_CASES:
        name = f"{cfg.optimizer}-w{cfg.window}-{cfg.residual}"
        for p in (packed, not packed):
            out.append(pytest.param(cfg, p, backend, id=f"{name}-{'packed' if p else 'rows'}",
                                    marks=() if p == packed else pytest.mark.slow))
    return out


def _atlas_inputs(cfg, B=1, H=2, T=21, d=16, packed=False, seed=0):
    """Kernel inputs with momentum and window extras; packed: documents starting inside chunks and
    pads, window weights masked to one document and to real tokens (the caller's contract)."""
    q, k, v, lr, la, m0, gate = _kernel_inputs(B, H, T, d, seed=seed)
    ks = jax.random.split(jax.random.key(seed + 1), 5)
    lm = jnp.log(jax.random.uniform(ks[0], (B, H, T), minval=0.5, maxval=0.95))
    s0 = 0.1 * jax.random.normal(ks[1], (B, H, d, d))
    seg = None
    reset = jnp.zeros((B, H, T)).at[..., 5].set(1).at[..., 8].set(1).at[..., 16].set(1)
    real = jnp.ones((B, H, T)).at[..., 11].set(0).at[..., T - 1].set(0)
    if packed:
        seg = Segments(reset, real, 0.2 * m0, None, 0.5 * s0)
    win = None
    if cfg.window is not None:
        w = cfg.window
        wts = jax.random.uniform(ks[2], (B, H, T, w))
        if packed:
            doc = jnp.cumsum(reset, -1)
            t = jnp.arange(T)[:, None]
            p = t - w + 1 + jnp.arange(w)[None]
            pc = jnp.clip(p, 0, T - 1)
            ok = jnp.where(p >= 0, (doc[..., pc] == doc[..., t]) & (real[..., pc] > 0), doc[..., t] == 0)
            wts = jnp.where(ok, wts, 0.0)
        win = Window(wts, unit_rows(jax.random.normal(ks[3], (B, H, w - 1, d))),
                     jax.random.normal(ks[4], (B, H, w - 1, d)), jnp.full((B, H, w - 1), 0.05))
    return (q, k, v, lr, la, m0, s0), dict(gate=gate, log_momentum=lm, segments=seg, window=win)


def _run_atlas(cfg, extra, **kw):
    def f(q, k, v, lr, la, m0, s0):
        y, st = matrix_chunk(q, k, v, lr, m0, la, None, extra["gate"], {"p": 3.0}, config=cfg,
                             segments=extra["segments"], log_momentum=extra["log_momentum"],
                             s0=s0 if cfg.optimizer != "gd" else None, window=extra["window"], **kw)
        return y, st.memory, st.momentum
    return f


@pytest.mark.parametrize("cfg,packed,backend", _atlas_cases())
def test_matrix_kernel_momentum_muon_window_equal_reference(cfg, packed, backend):
    args, extra = _atlas_inputs(cfg, packed=packed, d=12 if backend == "triton" else 16)   # Triton: widths padded
    ref = _run_atlas(cfg, extra, implementation="reference")
    ker = _run_atlas(cfg, extra, backend=backend, interpret=True)
    out_r, vjp_r = jax.vjp(ref, *args)
    out_k, vjp_k = jax.vjp(ker, *args)
    cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(7), x.shape, x.dtype), out_r)
    _close(out_k, out_r, VAL_TOL)
    _close(vjp_k(cot), vjp_r(cot), GRAD_TOL)


def test_matrix_kernel_reference_of_a_window_of_one_equals_scaled_gd():
    """The twin's semantics pinned independently: an Omega window of 1 with weights omega under GD is
    GD with lr * omega; momentum with m = 0 and no decay is GD."""
    cfg = MatrixChunkConfig(window=1, chunk_size=4)
    (q, k, v, lr, la, m0, _), extra = _atlas_inputs(cfg)
    om = extra["window"].weights
    y1, st1 = matrix_chunk(q, k, v, lr, m0, la, window=extra["window"], config=cfg, implementation="reference")
    y0, st0 = matrix_chunk(q, k, v, lr * om[..., 0], m0, la, config=MatrixChunkConfig(chunk_size=4),
                           implementation="reference")
    _close((y1, st1.memory), (y0, st0.memory), 1e-6)
    cfg = MatrixChunkConfig(optimizer="momentum", chunk_size=4)
    y2, st2 = matrix_chunk(q, k, v, lr, m0, None, log_momentum=jnp.full(lr.shape, -jnp.inf), config=cfg,
                           implementation="reference")
    y3, st3 = matrix_chunk(q, k, v, lr, m0, None, config=MatrixChunkConfig(chunk_size=4), implementation="reference")
    _close((y2, st2.memory), (y3, st3.memory), 1e-6)


def test_atlas_kernel_input_errors():
    (q, k, v, lr, la, m0, s0), extra = _atlas_inputs(MatrixChunkConfig(window=3, chunk_size=4))
    with pytest.raises(ValueError, match="needs log_momentum"):
        matrix_chunk(q, k, v, lr, m0, la, config=MatrixChunkConfig(optimizer="momentum"))
    with pytest.raises(ValueError, match="needs window=Window"):
        matrix_chunk(q, k, v, lr, m0, la, config=MatrixChunkConfig(window=3, chunk_size=4))
    with pytest.raises(ValueError, match="window.weights must have shape"):
        matrix_chunk(q, k, v, lr, m0, la, config=MatrixChunkConfig(window=2, chunk_size=4), window=extra["window"])
    with pytest.raises(ValueError, match="chunk_size >= window - 1"):
        MatrixChunkConfig(window=6, chunk_size=4)
    with pytest.raises(ValueError, match="ns_steps >= 1"):
        MatrixChunkConfig(optimizer="muon", ns_steps=0)
    with pytest.raises(ValueError, match="retention='linear'"):
        MatrixChunkConfig(optimizer="momentum", retention="scale")


# ---------------------------------------------------------------------------------------------
# lowering: Mosaic TPU and Triton kernels produced on this CPU (forward and backward)
# ---------------------------------------------------------------------------------------------

MARKERS = {"tpu": "custom_call @tpu_custom_call", "cuda": "custom_call @__gpu$xla.gpu.triton"}


def _lower(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("kind,cfg", [("matrix", c) for c in MATRIX_CONFIGS[:4] + MATRIX_CONFIGS[5:]]
                         + [("mlp", c) for c in MLP_CONFIGS], ids=lambda x: str(x)[:40])
def test_kernel_lowers_forward_and_backward(kind, cfg, platform):
    f_ = 64 if kind == "mlp" else None
    args = _kernel_inputs(1, 2, 64, 16, f=f_, positive=cfg.retention == "lag")
    run = (_run_mlp if kind == "mlp" else _run_matrix)(cfg, args)
    fwd = lambda *a: run(*a)[0]  # noqa: E731
    bwd = jax.grad(lambda *a: jnp.sum(run(*a)[0] ** 2) + jnp.sum(jax.tree.leaves(run(*a)[1])[0]), argnums=(0, 1, 2, 3, 4, 5))
    for f in (fwd, bwd):
        text = _lower(f, args[:6], platform)
        assert MARKERS[platform] in text
        assert "chunk_sweep" in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("cfg", [MatrixChunkConfig(optimizer="momentum", window=4, chunk_size=16),
                                 MatrixChunkConfig(optimizer="muon", ns_steps=2, window=4, chunk_size=16)],
                         ids=["momentum-window", "muon-window"])
def test_momentum_muon_window_kernels_lower(cfg, platform):
    args, extra = _atlas_inputs(cfg, T=64, packed=True)
    run = _run_atlas(cfg, extra)
    fwd = lambda *a: run(*a)[0]  # noqa: E731
    bwd = jax.grad(lambda *a: sum(jnp.sum(x ** 2) for x in run(*a)), argnums=tuple(range(7)))
    for f in (fwd, bwd):
        text = _lower(f, args, platform)
        assert MARKERS[platform] in text and "chunk_sweep" in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", ["gated_deltanet", "moneta", "memora", "atlas"])
def test_memorize_pallas_lowers_for_accelerators(name, platform):
    spec = _get(name)
    q, k, v, gates = random_inputs(0, 64, 16, 16)
    gates = {n: gates[n] for n in spec.required_gates}
    params = spec.memory.init(jax.random.key(0), 16, 16)
    f = lambda p, q, k, v, g: mj.memorize(spec, p, q, k, v, g, chunk_size=16, implementation="pallas")[0]  # noqa: E731
    text = _lower(jax.grad(lambda *a: jnp.sum(f(*a) ** 2)), (params, q, k, v, gates), platform)
    assert MARKERS[platform] in text


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def test_kernel_input_errors():
    q, k, v, lr, la, m0, gate = _kernel_inputs(1, 1, 16, 16)
    cfg = MatrixChunkConfig(chunk_size=8)
    with pytest.raises(ValueError, match="power of two"):
        matrix_chunk(q, k, v, lr, m0, la, config=cfg, backend="triton")
    with pytest.raises(ValueError, match="k must have shape"):
        matrix_chunk(q, k[..., :8], v, lr, m0, la, config=cfg)
    with pytest.raises(TypeError, match="floating"):
        matrix_chunk(q, k, v, lr.astype(jnp.int32), m0, la, config=cfg)
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        matrix_chunk(q, k, v, lr, m0, la, hparams={"pp": 1.0}, config=cfg)
    with pytest.raises(ValueError, match="gate"):
        matrix_chunk(q, k, v, lr, m0, la, config=MatrixChunkConfig(residual="huber_norm"))
    with pytest.raises(ValueError, match="delta"):
        MatrixChunkConfig(mode="delta", residual="lp")
    with pytest.raises(ValueError, match="implementation"):
        matrix_chunk(q, k, v, lr, m0, la, config=cfg, implementation="xla")
    with pytest.raises(ValueError, match="d_k == d_v"):
        mlp_chunk(q, k, v[..., :8], lr, (m0, m0), config=MLPChunkConfig())
