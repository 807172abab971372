"""The Atlas choices (Omega window, polynomial features, Muon) and the omeganet / atlas presets:
float64 oracles written from the conventions (issue 30), gradients, the chunk form against its
reference, packed rows, decoding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import miras_jax as mj
from miras_jax import bias as B
from miras_jax import inner_opt as O
from miras_jax import memory as M
from miras_jax import presets
from miras_jax import retention as R
from miras_jax.engine import window as window_lib
from miras_jax.engine.minibatch.reference import memorize_chunked_reference
from miras_jax.engine.omega import memorize_omega_chunked
from miras_jax.engine.tokens import init_state, memorize_tokens
from miras_jax.spec import MirasSpec
from tests.helpers import random_inputs, rotate


# --- the conventions, in numpy float64 --------------------------------------------------------

def np_poly(x, p):
    parts, term = [np.ones(1)], np.ones(1)
    for j in range(1, p + 1):
        term = np.kron(term, x)
        parts.append(term / math.sqrt(math.factorial(j)))
    return np.concatenate(parts)


def np_ns(G, steps):
    X = G / (np.linalg.norm(G) + 1e-7)
    tall = G.shape[0] > G.shape[1]
    X = X.T if tall else X
    for _ in range(steps):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return X.T if tall else X


def oracle(muon, q, k, v, g, window, degree, ns_steps=5, docs=None):
    """OmegaNet (GD) / Atlas (Muon), matrix memory from W = 0: ``y [T, v]`` and ``W_T``."""
    phi = (lambda x: x) if degree is None else (lambda x: np_poly(x, degree))
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = {n: np.asarray(x, np.float64) for n, x in g.items()}
    T, D = q.shape[0], phi(q[0]).shape[0]
    docs = np.zeros(T, int) if docs is None else docs
    W, S, ys = np.zeros((v.shape[1], D)), np.zeros((v.shape[1], D)), []
    for t in range(T):
        if t and docs[t] != docs[t - 1]:
            W, S = np.zeros_like(W), np.zeros_like(S)
        grad = np.zeros_like(W)
        for i in range(max(0, t - window + 1), t + 1):
            if docs[i] == docs[t]:
                f = phi(k[i])
                grad += g["omega"][i] * np.outer(W @ f - v[i], f)
        if muon:
            S = g["momentum"][t] * S + grad
            W = g["decay"][t] * W - g["lr"][t] * np_ns(S, ns_steps)
        else:
            W = g["decay"][t] * W - g["lr"][t] * grad
        ys.append(W @ phi(q[t]))
    return np.stack(ys), W


def inputs(seed, T, d, dv=None, dtype=jnp.float32):
    q, k, v, gates = random_inputs(seed, T, d, dv or d, dtype=dtype)
    gates["omega"] = jax.random.uniform(jax.random.key(seed + 99), (T,), minval=0.2, maxval=1.0).astype(dtype)
    return q, k, v, gates


def f64(t):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)


# --- components -------------------------------------------------------------------------------

def test_poly_features_inner_product_is_truncated_exp():
    x, y = np.random.default_rng(0).normal(size=(2, 5)) * 0.5
    fx, fy = (M.poly_features(jnp.asarray(z), 3) for z in (x, y))
    assert fx.shape == (1 + 5 + 25 + 125,) == (M.feature_dim(5, "poly", 3),)
    s = float(x @ y)
    np.testing.assert_allclose(float(fx @ fy), 1 + s + s ** 2 / 2 + s ** 3 / 6, rtol=1e-5)
    np.testing.assert_allclose(fx, np_poly(x, 3), rtol=1e-6)


def test_newton_schulz_matches_its_definition_and_orthogonalises():
    G = np.random.default_rng(1).normal(size=(6, 4))
    for g in (G, G.T):
        np.testing.assert_allclose(O.newton_schulz(jnp.asarray(g), 5), np_ns(g, 5), rtol=1e-4, atol=1e-5)
    sv = np.linalg.svd(np.asarray(O.newton_schulz(jnp.asarray(G), 5)), compute_uv=False)
    assert np.all((sv > 0.6) & (sv < 1.3)), sv       # NS_5 pushes every singular value toward ~1
    grad = jax.grad(lambda x: jnp.sum(O.newton_schulz(x, 3)))(jnp.zeros((3, 2)))
    assert np.all(np.isfinite(grad))                    # finite at G = 0 (padding, empty windows)


@pytest.mark.parametrize("bad, match", [
    (lambda: O.muon(ns_steps=0), "ns_steps >= 1"),
    (lambda: presets.get("atlas", ns_steps=0), "ns_steps >= 1"),
    (lambda: B.omega_bias(window=0), "window must be an int >= 1"),
    (lambda: M.linear_memory(feature_map="poly", degree=0), "degree >= 1"),
    (lambda: M.linear_memory(feature_map="rbf"), "unknown feature_map"),
    (lambda: MirasSpec(M.linear_memory(), B.omega_bias(), R.no_retention(), O.multi_step_gd(2)), "one inner step"),
    (lambda: M.mlp_memory(feature_map="poly").init(jax.random.key(0), 4, 4), "residual=False"),
])
def test_bad_atlas_options_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_presets_and_shapes():
    spec = presets.get("atlas", memory="linear", window=4, degree=2)
    assert spec.bias.window == 4 and spec.optimizer.name == "muon" and spec.grad_at == "previous"
    assert spec.memory.init(jax.random.key(0), 3, 5)["W"].shape == (5, 1 + 3 + 9)
    assert set(spec.required_gates) == {"lr", "momentum", "decay", "omega"}
    mlp = presets.get("omeganet", memory="mlp")            # MLP default: no feature map, residual
    assert mlp.memory.feature_map is None and mlp.memory.residual
    assert presets.get("omeganet", memory="mlp", degree=2).memory.init(
        jax.random.key(0), 2, 2)["layers"][0].shape == (8, 7)


# --- the token engine against the float64 oracle ----------------------------------------------

@pytest.mark.parametrize("name, window, degree", [("omeganet", 4, 2), ("atlas", 4, 2), ("atlas", 3, None),
                                                  ("omeganet", 1, 3), ("atlas", 1, 2)])
def test_token_engine_equals_float64_oracle(x64, name, window, degree):
    spec = presets.get(name, memory="linear", window=window, degree=degree)
    q, k, v, g = f64(inputs(0, 11, 3, 2))
    W0 = spec.memory.init(jax.random.key(0), 3, 2, jnp.float64)
    y, st = mj.memorize(spec, W0, q, k, v, g, implementation="reference")
    y_ref, W_ref = oracle(name == "atlas", q, k, v, g, window, degree)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.memory["W"], W_ref, rtol=1e-10, atol=1e-12)


def test_omeganet_window1_no_features_is_todays_l2_decay_gd_exactly():
    today = MirasSpec(M.linear_memory(), B.l2_bias(), R.decay_retention(), O.gd(), name="l2_decay_gd")
    spec = presets.get("omeganet", window=1, degree=None)
    q, k, v, g = inputs(1, 37, 8)
    g["omega"] = jnp.ones_like(g["omega"])
    W0 = spec.memory.init(jax.random.key(0), 8, 8)
    for impl, c in (("xla", 16), ("reference", 1)):
        y1, s1 = mj.memorize(spec, W0, q, k, v, g, implementation=impl, chunk_size=c)
        y0, s0 = mj.memorize(today, W0, q, k, v, g, implementation=impl, chunk_size=c)
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(s1.memory["W"], s0.memory["W"])
    # the unlowered window-1 bias on the token engine (one windowed step) is the same recurrence
    y2, _ = memorize_tokens(spec, init_state(spec, W0), q, k, v, g)
    np.testing.assert_allclose(y2, y0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["omeganet", "atlas"])
def test_token_engine_gradients(x64, name):
    spec = presets.get(name, memory="linear", window=3, degree=2)
    q, k, v, g = f64(inputs(2, 6, 2))
    W0 = f64(jax.tree.map(lambda x: x + 0.1, spec.memory.init(jax.random.key(0), 2, 2)))

    def f(W0, q, k, v, lr, omega):
        return mj.memorize(spec, W0, q, k, v, dict(g, lr=lr, omega=omega), implementation="reference")[0]

    check_grads(jax.jit(f), (W0, q, k, v, g["lr"], g["omega"]), order=1, modes=["rev"], eps=1e-6)


def test_composes_with_other_choices(x64):
    """Moneta's l_p bias and l_q retention over a window; Muon on Yaad's MLP memory; Titans' momentum
    over poly features: each equals its own unrolled token loop (the Omega sum done by hand), float64."""
    q, k, v, g = f64(inputs(3, 9, 4))
    specs = [
        MirasSpec(M.linear_memory(), B.omega_bias(B.lp_bias(), 3), R.lq_retention(), O.gd(), name="lp_omega"),
        MirasSpec(M.mlp_memory(), B.omega_bias(B.yaad_bias(), 2), R.decay_retention(anchor=True), O.muon(3),
                  name="yaad_muon"),
        MirasSpec(M.linear_memory(feature_map="poly", degree=2), B.l2_bias(), R.decay_retention(),
                  O.momentum_gd(), name="titans_poly"),
    ]
    for spec in specs:
        spec = spec.replace(hparams=f64(spec.hparams))
        W0 = spec.memory.init(jax.random.key(1), 4, 4, jnp.float64)
        y, _ = mj.memorize(spec, W0, q, k, v, g, implementation="reference")
        st, ys = init_state(spec, W0), []
        c = B.window_of(spec.bias)
        for t in range(q.shape[0]):
            lo = max(0, t - c + 1)
            pts = list(range(lo, t + 1))
            w = jnp.asarray([g["omega"][i] for i in pts] if c > 1 else [1.0])
            gsum = jax.tree.map(jnp.zeros_like, st.memory)
            for wi, i in zip(w, pts):
                pred, vjp = jax.vjp(lambda W: spec.memory.apply(W, k[i]), st.memory)
                gi = {n: g[n][i] for n in spec.bias.gates if n != "omega"}
                base = spec.bias.base if c > 1 else spec.bias
                (gr,) = vjp(base.residual_map(pred, v[i], spec.hparams["bias"], gi))
                gsum = jax.tree.map(lambda a, b: a + wi * b, gsum, gr)
            gt = {n: g[n][t] for n in g}
            u, os_ = spec.optimizer.update(gsum, st.optimizer, st.memory, gates=gt,
                                           hparams=spec.hparams["optimizer"], key=k[t])
            a = spec.retention.decay_value(gt, spec.hparams["retention"])
            W, rs = spec.retention.step(st.memory, st.retention, u, a, spec.hparams["retention"])
            st = st._replace(memory=W, retention=rs, optimizer=os_)
            ys.append(spec.memory.apply(W, q[t]))
        np.testing.assert_allclose(y, jnp.stack(ys), rtol=1e-9, atol=1e-10, err_msg=spec.name)


# --- the chunk form ---------------------------------------------------------------------------

CHUNK_CASES = [("omeganet", 4, 2, 5, 16), ("atlas", 4, 2, 4, 13), ("atlas", 2, None, 3, 20),
               ("titans_omega", 3, None, 4, 11)]


def _chunk_spec(name, window, degree):
    if name == "titans_omega":
        return MirasSpec(M.linear_memory(), B.omega_bias(B.l2_bias(), window), R.decay_retention(),
                         O.momentum_gd(), name=name)
    return presets.get(name, memory="linear", window=window, degree=degree)


SEGS = [1, 1, 1, 2, 2, 0, 2, 2, 2, 2, 3, 3, 0, 0, 4, 4, 4, 4, 4, 5]   # starts inside chunks, pads


@pytest.mark.parametrize("case, packed", rotate(CHUNK_CASES, [False, True], name_id=lambda c: "-".join(map(str, c)),
                                                option_id=lambda p: "packed" if p else "row"))
def test_chunk_form_equals_chunk_reference(x64, case, packed):
    """Values, final states and gradients, float64 (Newton-Schulz amplifies float32 rounding)."""
    name, window, degree, c, T = case
    spec = window_lib.lower_spec(_chunk_spec(name, window, degree))
    spec = spec.replace(hparams=f64(spec.hparams))
    d = 3
    q, k, v, g = f64(inputs(4, T, d))
    raw = _chunk_spec(name, window, degree)
    _, q, k, g = window_lib.lower_inputs(raw, q, k, g)
    W0 = f64({"W": 0.1 * jax.random.normal(jax.random.key(5), (d, q.shape[1]))})
    st = init_state(spec, W0)
    if spec.optimizer.update_form != "gd":
        st = st._replace(optimizer=f64({"W": 0.05 * jax.random.normal(jax.random.key(6), W0["W"].shape)}))
    segs = None
    if packed:
        segs = (*mj.engine.segments.boundaries(jnp.asarray(SEGS[:T], jnp.int32)), init_state(spec, W0))

    def run(fn, W, q, k, v, lr, omega):
        y, fin = fn(st._replace(memory={"W": W}), q, k, v, dict(g, lr=lr, omega=omega))
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))) + jnp.sum(fin.memory["W"] ** 2), (y, fin)

    fast = jax.jit(lambda *a: run(lambda s, q, k, v, gg: memorize_omega_chunked(spec, s, q, k, v, gg, c,
                                                                                segments=segs), *a))
    ref = jax.jit(lambda *a: run(lambda s, q, k, v, gg: memorize_chunked_reference(spec, s, q, k, v, gg, c,
                                                                                   segs), *a))
    args = (W0["W"], q, k, v, g["lr"], g["omega"])
    (lf, (yf, sf)), gf = jax.value_and_grad(fast, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)(*args)
    (lr_, (yr, sr)), gr = jax.value_and_grad(ref, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)(*args)
    tight = dict(rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(yf, yr, **tight)
    np.testing.assert_allclose(sf.memory["W"], sr.memory["W"], **tight)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tight), gf, gr)
    if spec.optimizer.update_form != "gd":
        np.testing.assert_allclose(sf.optimizer["W"], sr.optimizer["W"], **tight)


@pytest.mark.parametrize("name, kw, packed", [
    ("omeganet", dict(memory="mlp", window=3, expansion=2), True),
    ("atlas", dict(memory="mlp", window=2, expansion=2, ns_steps=2), False),
    pytest.param("atlas", dict(memory="linear", window=3, degree=None, anchor=True), True,
                 marks=pytest.mark.slow)])   # the materialised path again (the MLP cases keep it)
def test_materialised_chunk_form_equals_chunk_reference(x64, name, kw, packed):
    """An MLP memory or an anchored decay: the materialised chunk form (engine "omega") == the
    chunked reference, values, final states and gradients in float64."""
    spec = presets.get(name, **kw)
    assert mj.plan(spec, "xla", 4).engine == "omega"
    d, T = 3, 14
    q, k, v, g = f64(inputs(9, T, d))
    W0 = f64(spec.memory.init(jax.random.key(3), d, d))
    seg = jnp.asarray(SEGS[:T], jnp.int32) if packed else None

    def run(impl):
        def f(W0, q, k, v, g):
            y, st = mj.memorize(spec, W0, q, k, v, g, chunk_size=4, implementation=impl, segment_ids=seg)
            return y, st.memory, st.optimizer
        return jax.jit(lambda *a: jax.vjp(f, *a))

    (out_x, vjp_x), (out_r, vjp_r) = run("xla")(W0, q, k, v, g), run("reference")(W0, q, k, v, g)
    cot = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype), out_r)
    tight = dict(rtol=1e-8, atol=1e-10)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tight), out_x, out_r)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tight), vjp_x(cot), vjp_r(cot))


def test_chunk_form_at_chunk_one_is_the_token_engine():
    spec = presets.get("atlas", window=3, degree=None)
    q, k, v, g = inputs(6, 10, 4)
    W0 = spec.memory.init(jax.random.key(0), 4, 4)
    y1, s1 = mj.memorize(spec, W0, q, k, v, g, implementation="xla", chunk_size=1)
    y0, s0 = mj.memorize(spec, W0, q, k, v, g, implementation="reference")
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s1.memory["W"], s0.memory["W"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [pytest.param("omeganet", marks=pytest.mark.slow), "atlas"])
def test_every_implementation_runs_or_names_its_blocker(name):
    spec = presets.get(name, memory="linear", window=4, degree=2)
    q, k, v, g = inputs(7, 12, 3)
    W0 = spec.memory.init(jax.random.key(0), 3, 3)
    outs = {impl: mj.memorize(spec, W0, q, k, v, g, implementation=impl, chunk_size=4)[0]
            for impl in ("reference", "xla", "pallas", "auto")}
    np.testing.assert_allclose(outs["xla"], outs["reference"], rtol=2e-4, atol=2e-5)   # chunked_reference
    np.testing.assert_allclose(outs["pallas"], outs["reference"], rtol=2e-4, atol=2e-5)   # kernel, interpreted
    np.testing.assert_allclose(outs["auto"], outs["xla"], rtol=0, atol=0)
    mlp = presets.get(name, memory="mlp")
    with pytest.raises(NotImplementedError, match="matrix .linear. memory only"):
        mj.memorize(mlp, mlp.memory.init(jax.random.key(0), 3, 3), q, k, v, g, implementation="pallas", chunk_size=4)


# --- packed rows, truncation, batching, decoding ----------------------------------------------

@pytest.mark.parametrize("impl, c", [pytest.param("reference", 1, marks=pytest.mark.slow), ("xla", 4)])
def test_packed_window_stops_at_the_document_start(impl, c):
    spec = presets.get("atlas", window=3, degree=None)
    q, k, v, g = inputs(8, 14, 4)
    W0 = spec.memory.init(jax.random.key(0), 4, 4)
    seg = jnp.asarray([1] * 4 + [2] * 6 + [0, 0] + [3] * 2, jnp.int32)   # documents on the chunk grid of 4
    y, _ = mj.memorize(spec, W0, q, k, v, g, segment_ids=seg, implementation=impl, chunk_size=c)
    for lo, hi in ((0, 4), (4, 10), (12, 14)):
        sl = lambda t: jax.tree.map(lambda x: x[lo:hi], t)  # noqa: E731
        y_doc, _ = mj.memorize(spec, W0, *sl((q, k, v, g)), implementation=impl, chunk_size=c)
        np.testing.assert_allclose(y[lo:hi], y_doc, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[10:12], 0.0)


def test_grad_horizon_keeps_the_window_across_segments():
    spec = presets.get("omeganet", window=4, degree=2)
    q, k, v, g = inputs(9, 16, 3)
    W0 = spec.memory.init(jax.random.key(0), 3, 3)
    y0, _ = mj.memorize(spec, W0, q, k, v, g, implementation="xla", chunk_size=4)
    y1, _ = mj.memorize(spec, W0, q, k, v, g, implementation="xla", chunk_size=4, grad_horizon=8)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-7)


def test_batched_and_vmapped_hparams():
    spec = presets.get("atlas", window=2, degree=2)
    B_, T, H, d = 2, 8, 2, 3
    q, k, v, g = inputs(10, B_ * T * H, d)
    shape = lambda x: x.reshape((B_, T, H) + x.shape[1:])  # noqa: E731
    qb, kb, vb, gb = jax.tree.map(shape, (q, k, v, g))
    W0 = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(jax.random.key(0), H))
    y, st = mj.memorize_batched(spec, W0, qb, kb, vb, gb, chunk_size=4, implementation="xla")
    assert y.shape == (B_, T, H, d) and st.memory["W"].shape == (B_, H, d, 13)
    y_row, _ = mj.memorize(spec, jax.tree.map(lambda x: x[1], W0), qb[1, :, 1], kb[1, :, 1], vb[1, :, 1],
                           jax.tree.map(lambda x: x[1, :, 1], gb), chunk_size=4, implementation="xla")
    np.testing.assert_allclose(y[1, :, 1], y_row, rtol=1e-5, atol=1e-6)
    scales = jnp.asarray([0.5, 1.0, 2.0])
    head0, first = (lambda t: jax.tree.map(lambda x: x[0], t)), (lambda t: jax.tree.map(lambda x: x[:T], t))
    run = lambda s: mj.memorize(spec.with_hparams(lr_scale=s), head0(W0), *first((q, k, v, g)),  # noqa: E731
                                chunk_size=4, implementation="xla")[0]
    grid = jax.vmap(run)(scales)
    np.testing.assert_allclose(grid[2], run(2.0), rtol=1e-4, atol=1e-5)


def test_mlp_memory_layer_decode_equals_forward():
    """An MLP memory with an Omega window and Muon trains on the chunked reference on this CPU (auto:
    plan.MATERIALISED_AUTO); its buffered decode runs the materialised chunk form on the partial
    chunk: the same semantics."""
    from flax import nnx
    from miras_jax.nn import MirasLayer

    layer = MirasLayer(8, 2, "atlas", preset_kwargs={"memory": "mlp", "window": 3, "expansion": 2},
                       chunk_size=4, gate_rank=4, rngs=nnx.Rngs(0))
    assert layer.plan.engine == "chunked_reference"
    x = jax.random.normal(jax.random.key(1), (1, 9, 8))
    full = layer(x)
    y, cache = nnx.jit(lambda m, x: m.prefill(x))(layer, x[:, :5])
    ys, step = [y], nnx.jit(lambda m, x, c: m.step(x, c))
    for t in range(5, 9):
        y_t, cache = step(layer, x[:, t], cache)
        ys.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, chunk", [("atlas", 4), ("omeganet", 1)])
def test_layer_packed_decode_equals_packed_forward(name, chunk):
    """Prefill a packed prompt, then steps with resets: each token's output is the packed forward's
    (the Omega window restarts with its document; buffered chunk decode for chunk 4)."""
    from flax import nnx
    from miras_jax.engine import segments
    from miras_jax.nn import MirasLayer

    layer = MirasLayer(16, 2, name, chunk_size=chunk, gate_rank=4, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
                       [7, 7, 7, 0, 7, 5, 0, 5, 5, 5, 5, 6, 8, 9]], jnp.int32)
    x = jax.random.normal(jax.random.key(1), (2, 14, 16))
    prefill = nnx.jit(lambda m, x, seg: m.prefill(x, segment_ids=seg))
    step = nnx.jit(lambda m, x, cache, r: m.step(x, cache, reset=r))
    short = ids.at[1, 2:11].set(5)   # no pad after a 2-token prompt (decoding takes real tokens only)
    for ids, prompt in ((ids, 7), (short, 2)):
        full = layer(x, ids)
        reset = jax.vmap(lambda s: segments.boundaries(s)[0])(ids)
        y, cache = prefill(layer, x[:, :prompt], ids[:, :prompt])
        ys = [y]
        for t in range(prompt, 14):
            y_t, cache = step(layer, x[:, t], cache, reset[:, t])
            ys.append(y_t[:, None])
        np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, rtol=1e-4, atol=1e-4, err_msg=str(prompt))


def test_missing_omega_gate_is_an_error_on_every_entry():
    spec = presets.get("omeganet", window=1, degree=None)
    q, k, v, g = inputs(11, 6, 4)
    del g["omega"]
    W0 = spec.memory.init(jax.random.key(0), 4, 4)
    with pytest.raises(ValueError, match="needs gate 'omega'"):
        mj.memorize(spec, W0, q, k, v, g)
    with pytest.raises(ValueError, match="needs gate 'omega'"):
        mj.memorize_batched(spec, jax.tree.map(lambda x: x[None], W0), *(x[None, :, None] for x in (q, k, v)),
                            {n: x[None, :, None] for n, x in g.items()})
