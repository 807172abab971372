"""The token-level engine: MLP presets against a jax.grad oracle, behaviour, differentiability,
segments, vmap grids and jit caching, bf16 inputs."""

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from miras_jax import memory as M
from tests.helpers import some_slow, random_inputs

F32_TOL = dict(rtol=2e-5, atol=2e-5)      # same-order float32 math
ORACLE_TOL = dict(rtol=1e-4, atol=1e-4)   # float32 engine vs float32 oracle with other op order

ALL = mj.presets.names()


def _gates_for(name, gates):
    return gates


def _run(name, T=12, d=8, seed=0, **kw):
    spec = mj.presets.get(name, **kw)
    n = spec.num_steps
    q, k, v, gates = random_inputs(seed, T, d, d, num_steps=n, channel_decay=(name == "gla"))
    params = spec.memory.init(jax.random.key(seed + 1), d, d)
    return spec, params, (q, k, v, gates)


# --- MLP memory -----------------------------------------------------------------------------

def test_mlp_memory_apply_matches_formula():
    mem = M.mlp_memory(depth=2, expansion=4)
    params = mem.init(jax.random.key(0), 6, 6)
    w0, w1 = params["layers"]
    assert w0.shape == (24, 6) and w1.shape == (6, 24)
    x = jax.random.normal(jax.random.key(1), (6,))
    h = w1 @ jax.nn.gelu(w0 @ x, approximate=True)
    h = (h - h.mean()) / jnp.sqrt(h.var() + 1e-5)
    np.testing.assert_allclose(mem.apply(params, x), x + h, **F32_TOL)


def test_mlp_memory_depth_and_no_residual():
    mem = M.mlp_memory(depth=3, expansion=2, residual=False, layer_norm=False, activation="relu")
    params = mem.init(jax.random.key(0), 4, 5)
    assert [w.shape for w in params["layers"]] == [(8, 4), (8, 8), (5, 8)]
    x = jax.random.normal(jax.random.key(1), (4,))
    a, b, c = params["layers"]
    np.testing.assert_allclose(mem.apply(params, x), c @ jax.nn.relu(b @ jax.nn.relu(a @ x)), **F32_TOL)
    with pytest.raises(ValueError, match="d_k == d_v"):
        M.mlp_memory().init(jax.random.key(0), 4, 5)


def _oracle_mlp(name, spec, params, q, k, v, gates):
    """Token loop with ``jax.grad`` of the exact inner loss; retention written out by hand (anchored
    presets pull toward ``W_0`` / ``A_0`` / ``log W_0`` instead of toward 0)."""
    mem = spec.memory
    hp = spec.hparams
    W0 = params
    anchored = spec.retention.anchor
    W = params
    A = params
    S = jax.tree.map(jnp.zeros_like, params)
    ys = []
    for t in range(q.shape[0]):
        a, b = gates["decay"][t], gates["lr"][t]

        def loss(W):
            r = mem.apply(W, k[t]) - v[t]
            if name == "moneta":
                return jnp.sum(jnp.abs(r) ** hp["bias"]["p"])
            if name == "yaad":
                d = gates["delta"][t]
                n = jnp.linalg.norm(r)
                return jnp.where(n <= d, 0.5 * n * n, d * jnp.sum(jnp.abs(r)))
            return 0.5 * jnp.sum(r * r)

        g = jax.grad(loss)(W)
        # retain(x, x0) = a x + (1 - a) x0 when anchored, else a x
        retain = lambda x, x0: a * x + (1 - a) * x0 if anchored else a * x  # noqa: B023,E731
        if name in ("ttt_linear", "ttt_mlp"):
            W = jax.tree.map(lambda w, g: w - b * g, W, g)
        elif name == "titans":
            S = jax.tree.map(lambda s, g: gates["momentum"][t] * s - b * g, S, g)
            W = jax.tree.map(lambda w, w0, s: retain(w, w0) + s, W, W0, S)
        elif name == "yaad":
            W = jax.tree.map(lambda w, w0, g: retain(w, w0) - b * g, W, W0, g)
        elif name == "moneta":
            qq = hp["retention"]["q"]
            A = jax.tree.map(lambda x, x0, g: retain(x, x0) - b * g, A, W0, g)
            W = jax.tree.map(lambda x: x / jnp.sum(jnp.abs(x) ** qq) ** ((qq - 2) / qq), A)
        elif name == "memora":
            W = jax.tree.map(lambda w, w0, g: w.shape[-1] * jax.nn.softmax(
                retain(jnp.log(w), jnp.log(w0)) - b * g, axis=-1), W, W0, g)
        ys.append(mem.apply(W, q[t]))
    return jnp.stack(ys), W


@pytest.mark.parametrize("name,anchor", [("ttt_linear", None), ("ttt_mlp", None)] + [
    (n, a) for n in ("titans", "moneta", "yaad", "memora") for a in (None, False)])
@pytest.mark.parametrize("T,d", [(1, 4), (9, 8)])
def test_mlp_presets_match_grad_oracle(name, anchor, T, d):
    """``anchor=None``: the preset's default (anchored for an MLP memory); ``False``: the paper's map."""
    kw = {"smooth": None} if name in ("moneta", "yaad") else {}
    if anchor is not None:
        kw["anchor"] = anchor
    spec, params, (q, k, v, gates) = _run(name, T=T, d=d, **kw)
    y, state = mj.memorize(spec, params, q, k, v, gates)
    y_ref, w_ref = _oracle_mlp(name, spec, params, q, k, v, gates)
    np.testing.assert_allclose(y, y_ref, **ORACLE_TOL)
    for a, b in zip(jax.tree.leaves(state.memory), jax.tree.leaves(w_ref)):
        np.testing.assert_allclose(a, b, **ORACLE_TOL)


# --- behaviour ------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(5, 16), (31, 32)])
def test_delta_rule_recalls_orthonormal_pairs(n, d):
    spec = mj.presets.get("deltanet")
    key = jax.random.key(n)
    basis, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    k = basis[:n]                                  # n orthonormal keys
    v = jax.random.normal(jax.random.key(1), (n, d))
    W0 = 0.5 * jax.random.normal(jax.random.key(2), (d, d))   # recall is exact from any W0
    y, state = mj.memorize(spec, {"W": W0}, k, k, v, {"lr": jnp.ones((n,))})
    np.testing.assert_allclose(jax.vmap(lambda x: state.memory["W"] @ x)(k), v, atol=1e-5)
    np.testing.assert_allclose(y[-1], v[-1], atol=1e-5)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn", "ttt_linear", "ttt_mlp",
                                  "titans", "yaad", "moneta", "memora"])
def test_inner_loss_falls_after_a_step(name):
    spec, params, (q, k, v, gates) = _run(name, T=1, d=8)
    gates = dict(gates, lr=jnp.full((1,), 0.02), decay=jnp.ones((1,)), momentum=jnp.zeros((1,)),
                 delta=jnp.full((1,), 10.0))
    _, state = mj.memorize(spec, params, q, k, v, gates)
    hp, g0 = spec.hparams["bias"], {"delta": gates["delta"][0]}
    before = spec.bias.loss(spec.memory.apply(params, k[0]), v[0], hp, g0)
    after = spec.bias.loss(spec.memory.apply(state.memory, k[0]), v[0], hp, g0)
    assert after < before


# --- end-to-end differentiability, segments, dtypes ------------------------------------------

@pytest.mark.parametrize("name", ["gated_deltanet", "titans", "moneta", "memora"])
def test_outer_gradients_match_finite_differences(name):
    with jax.enable_x64(True):
        kw = {"memory": "linear"} if name in ("titans", "moneta", "memora") else {}
        spec, params, (q, k, v, gates) = _run(name, T=5, d=4, **kw)
        f64 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64), t)  # noqa: E731
        q, k, v, gates, params = f64((q, k, v, gates, params))
        gates = {n: gates[n] for n in spec.required_gates}
        if name != "memora":
            params = jax.tree.map(lambda w: w + 0.1, params)

        def f(q, k, v, gates, params):
            return mj.memorize(spec, params, q, k, v, gates)[0]

        jax.test_util.check_grads(f, (q, k, v, gates, params), order=1, modes=("rev",),
                                  atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_segments_equal_one_call(name):
    """(An Omega window does not reach back past a call's first token, by its convention (issue 30):
    Omega presets run at window 1 here, where the state alone carries the past.)"""
    spec, params, (q, k, v, gates) = _run(name, T=10, d=8, **({"window": 1} if mj.presets.takes(name, "window")
                                                             else {}))
    y, state = mj.memorize(spec, params, q, k, v, gates)
    cut = lambda t, s: jax.tree.map(lambda x: x[s], t)  # noqa: E731
    a, b = slice(0, 6), slice(6, 10)
    y1, s1 = mj.memorize(spec, params, *cut((q, k, v, gates), a))
    y2, s2 = mj.memorize(spec, params, *cut((q, k, v, gates), b), initial_state=s1)
    np.testing.assert_allclose(jnp.concatenate([y1, y2]), y, **F32_TOL)
    for x, z in zip(jax.tree.leaves(state), jax.tree.leaves(s2)):
        np.testing.assert_allclose(x, z, **F32_TOL)


@pytest.mark.parametrize("name", ["deltanet", "moneta"])
def test_bfloat16_inputs_keep_float32_state(name):
    spec, params, (q, k, v, gates) = _run(name, T=8, d=8)
    bf = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)  # noqa: E731
    y, state = mj.memorize(spec, params, *bf((q, k, v, gates)))
    y32, _ = mj.memorize(spec, params, *jax.tree.map(lambda x: x.astype(jnp.float32), bf((q, k, v, gates))))
    assert y.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.memory))
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", some_slow(ALL, {"omeganet"}))   # atlas keeps the Omega / Muon path
def test_jit_and_batch_vmap(name):
    spec, params, (q, k, v, gates) = _run(name, T=6, d=8)
    y, _ = mj.memorize(spec, params, q, k, v, gates)
    f = jax.jit(lambda s, p, *a: mj.memorize(s, p, *a)[0])
    np.testing.assert_allclose(f(spec, params, q, k, v, gates), y, **F32_TOL)
    batch = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), (q, k, v, gates))
    yb = jax.vmap(lambda *a: mj.memorize(spec, params, *a)[0])(*batch)
    np.testing.assert_allclose(yb[0], y, **F32_TOL)


# --- grids of variants ------------------------------------------------------------------------

def test_vmap_over_p_grid_equals_loop_and_jit_does_not_recompile():
    spec = mj.presets.get("moneta", memory="linear", smooth=None)
    _, params, (q, k, v, gates) = _run("moneta", T=10, d=8, memory="linear")
    params = {"W": 0.3 * jax.random.normal(jax.random.key(3), (8, 8))}
    ps = jnp.array([1.5, 2.0, 3.0, 4.0])
    traces = []

    @jax.jit
    def run(spec):
        traces.append(1)
        return mj.memorize(spec, params, q, k, v, gates)[0]

    loop = jnp.stack([run(spec.with_hparams(p=p)) for p in ps])
    assert len(traces) == 1, "a new p value must not recompile"
    grid = jax.vmap(lambda p: mj.memorize(spec.with_hparams(p=p), params, q, k, v, gates)[0])(ps)
    np.testing.assert_allclose(grid, loop, **F32_TOL)
    assert not np.allclose(loop[0], loop[-1])           # the grid really varies


def test_vmap_over_stacked_specs():
    specs = [mj.presets.get("moneta", memory="linear", p=p, q=q) for p, q in [(2.0, 2.0), (3.0, 4.0), (1.5, 3.0)]]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *specs)
    _, _, (q, k, v, gates) = _run("moneta", T=7, d=4, memory="linear")
    params = {"W": 0.3 * jax.random.normal(jax.random.key(3), (4, 4))}
    grid = jax.vmap(lambda s: mj.memorize(s, params, q, k, v, gates)[0])(stacked)
    for i, s in enumerate(specs):
        np.testing.assert_allclose(grid[i], mj.memorize(s, params, q, k, v, gates)[0], **F32_TOL)
