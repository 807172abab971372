"""Retention gates of ``miras_jax.retention`` against the mirror-map table (MIRAS.md section 4).

Every gate does ``z = a * z_{t-1} + u`` in a dual space and exposes ``W_t = from_dual(z)``:

    none / decay      W_t = a W_{t-1} + u
    lq (Moneta)       A_t = a A_{t-1} + u,  W_t = A_t / ||A_t||_q^(q-2)   (per matrix, A_0 = W_0)
    kl (Memora)       W_t = c softmax(a log W_{t-1} + u)                  (per row, c = row length)
    elastic_net       W_t = S_gamma(a W_{t-1} + u)
    elastic_net_ftrl  A_t = a A_{t-1} + u,  W_t = S_gamma(A_t)             (A_0 = W_0)
    sigmoid           W_t = sigmoid(a logit(W_{t-1}) + u)

with ``a`` a scalar or a per-key-channel ``[d_k]`` vector (``W Diag(a)``). Checked here: ``step``
against float64 NumPy closed forms (matrix and MLP-like pytrees, two steps so accumulators are
really kept), properties of the maps, ``jax.test_util.check_grads`` in float64 at numerically
delicate points, and validation of hyper-parameters and memory domains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from miras_jax import retention as R

RTOL = 2e-5  # float32 library vs float64 NumPy oracle
ATOL = 1e-6
GRAD_RTOL = 1e-5  # float64 check_grads
GRAD_ATOL = 1e-6
FD_EPS = 1e-4  # default finite-difference step (points O(1e-2) or more from any kink)
FD_EPS_TINY_W = 1e-11  # KL at W ~ 1e-6: the step must keep W > 0 and stay << W
FD_EPS_UNIT_EDGE = 1e-9  # sigmoid at W within 1e-4 of 0 / 1
FD_EPS_TINY_A = 1e-7  # lq at A ~ 1e-3
D_V, D_K = 5, 4
Q, GAMMA = 3.0, 0.05  # non-default so the hyper-parameters visibly matter
SCALAR_DECAY = 0.9
CHANNEL_DECAY = np.array([0.95, 0.5, 0.8, 1.0])



def tree_np(t):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), t)


def tree_jnp(t):
    return jax.tree.map(jnp.asarray, t)


def assert_tree_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), actual, expected)


# --- closed forms (float64 NumPy) ----------------------------------------------------------

def _softmax_rows(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _soft(z, g):
    return np.sign(z) * np.maximum(np.abs(z) - g, 0.0)


def _lq(A, q):
    return A / np.sum(np.abs(A) ** q) ** ((q - 2.0) / q)


def oracle_leaf(kind, W, A, u, a, hp, c=None):
    """One matrix leaf: ``(W_t, A_t)``; ``A`` is only updated by the accumulating gates."""
    if kind in ("none", "decay"):
        return a * W + u, A
    if kind == "lq":
        A = a * A + u
        return _lq(A, hp["q"]), A
    if kind == "kl":
        return (W.shape[-1] if c is None else c) * _softmax_rows(a * np.log(W) + u), A
    if kind == "elastic_net":
        return _soft(a * W + u, hp["gamma"]), A
    if kind == "elastic_net_ftrl":
        A = a * A + u
        return _soft(A, hp["gamma"]), A
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-(a * np.log(W / (1.0 - W)) + u))), A
    raise AssertionError(kind)


class Case:
    def __init__(self, kind, make, domain="real", c=None):
        self.kind, self.make, self.domain, self.c = kind, make, domain, c


CASES = {
    "none": Case("none", R.no_retention),
    "decay_gate": Case("decay", lambda: R.decay_retention("gate")),
    "decay_hparam": Case("decay", lambda: R.decay_retention("hparam")),
    "lq": Case("lq", R.lq_retention),
    "lq_hparam": Case("lq", lambda: R.lq_retention("hparam")),
    "kl": Case("kl", R.kl_retention, "positive"),
    "kl_c2": Case("kl", lambda: R.kl_retention(c=2.0), "positive", c=2.0),
    "elastic_net": Case("elastic_net", R.elastic_net_retention),
    "elastic_net_ftrl": Case("elastic_net_ftrl", R.elastic_net_ftrl_retention),
    "elastic_net_ftrl_gate": Case("elastic_net_ftrl", lambda: R.elastic_net_ftrl_retention("gate")),
    "sigmoid": Case("sigmoid", R.sigmoid_retention, "unit_interval"),
    "sigmoid_gate": Case("sigmoid", lambda: R.sigmoid_retention("gate"), "unit_interval"),
}
ACCUMULATING = ("lq", "elastic_net_ftrl")


def make_hp(ret, decay=None, **over):
    hp = {**ret.default_hparams(), **over}
    if "q" in hp:
        hp["q"] = Q
    if "gamma" in hp:
        hp["gamma"] = GAMMA
    if "decay" in hp and decay is not None:
        hp["decay"] = decay
    return tree_jnp(hp)


def make_params(domain, structure, seed=0, scale=0.3):
    """``{"W": [d_v, d_k]}`` or ``{"layers": (A [8, 4], B [4, 8])}`` inside ``domain``."""
    rng = np.random.default_rng(seed)
    shapes = {"W": (D_V, D_K)} if structure == "matrix" else {"layers": ((8, 4), (4, 8))}

    def leaf(shape):
        if domain == "positive":  # rows on the scaled simplex, sum = row length
            return shape[-1] * _softmax_rows(rng.normal(size=shape))
        if domain == "unit_interval":
            return rng.uniform(0.05, 0.95, size=shape)
        return scale * rng.normal(size=shape)

    return jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[0], int))


DECAYS = {"scalar": SCALAR_DECAY, "channel": CHANNEL_DECAY}

# Channel-wise decay only on the matrix (its leaves have different widths in the MLP), and not
# for gates without a decay source (decay_value is None there whatever the gate says).
STEP_CASES = [
    pytest.param(name, structure, dk, id=f"{name}-{structure}-{dk}")
    for name in CASES for structure in ("matrix", "mlp") for dk in DECAYS
    if not (dk == "channel" and (structure == "mlp" or CASES[name].make().decay_source == "none"))
]


# --- 1. step == closed form ----------------------------------------------------------------

@pytest.mark.parametrize("with_update", [True, False], ids=["update", "no_update"])
@pytest.mark.parametrize("name, structure, dk", STEP_CASES)
def test_step_matches_closed_form(name, structure, dk, with_update):
    """Two consecutive steps from ``init``; the second one must use the kept accumulator."""
    case = CASES[name]
    ret = case.make()
    assert ret.accumulate == (case.kind in ACCUMULATING)
    hp = make_hp(ret, decay=DECAYS[dk])
    W0 = make_params(case.domain, structure)
    a_lib = ret.decay_value({"decay": jnp.asarray(DECAYS[dk])}, hp)  # None: no decay
    a = 1.0 if a_lib is None else DECAYS[dk]
    ups = [make_params("real", structure, seed=s, scale=0.5) for s in (1, 2)] if with_update else [None] * 2

    params, state = tree_jnp(W0), ret.init(tree_jnp(W0), hp)
    if ret.accumulate:
        assert_tree_close(state, params, rtol=0, atol=0)  # A_0 = W_0 exactly
    else:
        assert state == ()
    W_ref, A_ref = W0, W0
    for u in ups:
        params, state = ret.step(params, state, None if u is None else tree_jnp(u), a_lib, hp)
        u_np = jax.tree.map(np.zeros_like, W_ref) if u is None else u
        out = jax.tree.map(lambda W, A, uu: oracle_leaf(case.kind, W, A, uu, a, tree_np(hp), case.c),
                           W_ref, A_ref, u_np)
        is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and not isinstance(x[0], tuple)
        W_ref = jax.tree.map(lambda o: o[0], out, is_leaf=is_pair)
        A_ref = jax.tree.map(lambda o: o[1], out, is_leaf=is_pair)
        assert_tree_close(params, W_ref)
        if ret.accumulate:
            assert_tree_close(state, A_ref)
        else:
            assert state == ()


@pytest.mark.parametrize("source, expected", [("gate", 0.8), ("hparam", 0.6), ("none", None)])
def test_decay_value_source(source, expected):
    ret = R.decay_retention(source)
    assert ret.gates == (("decay",) if source == "gate" else ())
    assert set(ret.default_hparams()) == ({"decay"} if source == "hparam" else set())
    got = ret.decay_value({"decay": jnp.asarray(0.8)}, {"decay": jnp.asarray(0.6)})
    assert got is None if expected is None else np.isclose(got, expected)


def test_channel_decay_scales_key_channels():
    """``a`` of shape ``[d_k]`` gives ``W Diag(a)``: column j scaled by a_j."""
    ret = R.decay_retention()
    W = make_params("real", "matrix")["W"]
    new, _ = ret.step({"W": jnp.asarray(W)}, (), None, jnp.asarray(CHANNEL_DECAY), {})
    np.testing.assert_allclose(new["W"], W @ np.diag(CHANNEL_DECAY), rtol=RTOL, atol=ATOL)


# --- 2. properties of the maps -------------------------------------------------------------

def test_lq_normalize_q2_is_identity():
    A = jnp.asarray(make_params("real", "matrix")["W"])
    np.testing.assert_allclose(R.lq_normalize(A, 2.0), A, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(R.lq_normalize(A, jnp.asarray(2.0)), A, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("q", [2.5, 3.0, 4.0])
def test_lq_normalizes_each_matrix_by_its_own_norm(q):
    ret = R.lq_retention()
    hp = {**ret.default_hparams(), "q": jnp.asarray(q)}
    A, Bm = (np.asarray(x) for x in make_params("real", "mlp")["layers"])
    out = ret.from_dual({"layers": (jnp.asarray(A), jnp.asarray(Bm))}, hp)["layers"]
    np.testing.assert_allclose(out[0], _lq(A, q), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out[1], _lq(Bm, q), rtol=RTOL, atol=ATOL)
    # ||W||_q = ||A||_q^(3-q) per leaf; scaling one leaf leaves the other untouched.
    norm = lambda x: np.sum(np.abs(x) ** q) ** (1.0 / q)
    np.testing.assert_allclose(norm(np.asarray(out[0])), norm(A) ** (3.0 - q), rtol=RTOL)
    out2 = ret.from_dual({"layers": (jnp.asarray(10.0 * A), jnp.asarray(Bm))}, hp)["layers"]
    np.testing.assert_allclose(out2[1], out[1], rtol=0, atol=0)
    np.testing.assert_allclose(out2[0], 10.0 ** (3.0 - q) * np.asarray(out[0]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("q", [2.0, 3.0, 4.0])
def test_lq_normalize_zeros(q):
    z = jnp.zeros((D_V, D_K))
    np.testing.assert_array_equal(R.lq_normalize(z, q), 0.0)
    jac = jax.jacfwd(R.lq_normalize)(z, q)
    jac_rev = jax.jacrev(R.lq_normalize)(z, q)
    dq = jax.grad(lambda qq: jnp.sum(R.lq_normalize(z, qq)))(jnp.asarray(q))
    for d in (jac, jac_rev, dq):
        assert np.all(np.isfinite(d))


@pytest.mark.parametrize("c", [None, 2.0, 7.5])
def test_kl_from_dual_rows_on_scaled_simplex(c):
    ret = R.kl_retention(c=c)
    z = 5.0 * make_params("real", "mlp", seed=3)["layers"][0]  # [8, 4], spread-out logits
    W = np.asarray(ret.from_dual({"W": jnp.asarray(z)}, {})["W"])
    assert np.all(W > 0)
    np.testing.assert_allclose(W.sum(-1), z.shape[-1] if c is None else c, rtol=RTOL)


@pytest.mark.parametrize("c", [None, 2.0])
def test_kl_identity_with_unit_decay_and_no_update(c):
    ret = R.kl_retention(c=c)
    W = make_params("positive", "matrix")["W"]
    if c is not None:
        W = W * c / W.shape[-1]
    new, state = ret.step({"W": jnp.asarray(W)}, ret.init({"W": W}, {}), None, jnp.asarray(1.0), {})
    np.testing.assert_allclose(new["W"], W, rtol=RTOL, atol=ATOL)
    assert state == ()


@pytest.mark.parametrize("gamma, expected", [
    (0.3, [-1.7, -0.2, 0.0, 0.0, 0.0, 0.0, 0.7]),
    (0.0, [-2.0, -0.5, -0.1, 0.0, 0.1, 0.3, 1.0]),
    (1.5, [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
])
def test_soft_threshold_values(gamma, expected):
    z = jnp.asarray([-2.0, -0.5, -0.1, 0.0, 0.1, 0.3, 1.0])
    np.testing.assert_allclose(R.soft_threshold(z, gamma), expected, rtol=RTOL, atol=ATOL)


def test_sigmoid_round_trip():
    ret = R.sigmoid_retention()
    W = {"W": jnp.asarray(make_params("unit_interval", "matrix")["W"])}
    assert_tree_close(ret.from_dual(ret.to_dual(W, {}), {}), W, rtol=RTOL, atol=ATOL)
    z = {"W": jnp.asarray(np.linspace(-4.0, 4.0, D_V * D_K).reshape(D_V, D_K))}
    assert_tree_close(ret.to_dual(ret.from_dual(z, {}), {}), z, rtol=1e-4, atol=1e-5)


# --- 3. check_grads (float64) --------------------------------------------------------------

def _grads(f, args, eps=FD_EPS, order=2):
    check_grads(f, args, order=order, modes=("fwd", "rev"), atol=GRAD_ATOL, rtol=GRAD_RTOL, eps=eps)


def _delicate_point(name):
    """``(retention, update, memory W (A for accumulating gates), FD step for the memory)``."""
    rng = np.random.default_rng(7)
    u = 0.3 * rng.normal(size=(D_V, D_K))
    if name == "lq":  # tiny accumulator, not all zero (one exact zero entry)
        A = 1e-3 * rng.normal(size=(D_V, D_K))
        A[0, 0] = 0.0
        return R.lq_retention(), 1e-3 * u, A, FD_EPS_TINY_A
    if name == "kl":  # log W ~ -14
        return R.kl_retention(), u, 1e-6 * rng.uniform(0.5, 2.0, size=(D_V, D_K)), FD_EPS_TINY_W
    if name == "sigmoid":  # W within 1e-4 of 0 and of 1
        edge = 1e-4 * rng.uniform(0.5, 1.0, (D_V, D_K))
        W = np.where(rng.uniform(size=(D_V, D_K)) < 0.5, edge, 1.0 - edge)
        return R.sigmoid_retention("gate"), u, W, FD_EPS_UNIT_EDGE
    if name in ("elastic_net", "elastic_net_ftrl"):  # a W + u at least 0.05 away from |.| = gamma
        ret = R.elastic_net_retention() if name == "elastic_net" else R.elastic_net_ftrl_retention("gate")
        z = rng.choice([-1.0, 1.0], (D_V, D_K)) * rng.choice([0.0, 0.1, 0.4], (D_V, D_K)) \
            + 0.01 * rng.uniform(-1, 1, (D_V, D_K))
        # |z| in [0, 0.01] u [0.09, 0.11] u [0.39, 0.41]: >= 0.04 from GAMMA = 0.05
        return ret, u, (z - u) / SCALAR_DECAY, FD_EPS
    raise AssertionError(name)


GRAD_GATES = ("lq", "kl", "sigmoid", "elastic_net", "elastic_net_ftrl")


@pytest.mark.parametrize("name", GRAD_GATES)
def test_step_grads_at_delicate_points(x64, name):
    """d step / d (memory, update, decay) at: lq with a tiny accumulator, KL where log W ~ -14,
    sigmoid within 1e-4 of 0 and 1, soft threshold away from its kink."""
    ret, u, W, eps_w = _delicate_point(name)
    hp = make_hp(ret)
    W, u, a = jnp.asarray(W), jnp.asarray(u), jnp.asarray(SCALAR_DECAY)
    assert W.dtype == jnp.float64

    def step(mem, upd, dec):
        params, state = ({"W": W}, {"W": mem}) if ret.accumulate else ({"W": mem}, ())
        return ret.step(params, state, {"W": upd}, dec, hp)[0]["W"]

    _grads(lambda m: step(m, u, a), (W,), eps=eps_w)
    _grads(lambda v: step(W, v, a), (u,), eps=eps_w if name == "lq" else FD_EPS)
    _grads(lambda d: step(W, u, d), (a,), eps=eps_w if name == "lq" else FD_EPS)


@pytest.mark.parametrize("name", GRAD_GATES)
def test_from_dual_grads_at_delicate_points(x64, name):
    ret, u, W, eps_w = _delicate_point(name)
    hp = make_hp(ret)
    if name == "kl":
        z, eps = np.log(W) + u, FD_EPS  # z ~ -14
    elif name == "sigmoid":
        z, eps = np.log(W / (1.0 - W)), FD_EPS  # |z| ~ 9.2
    else:
        z, eps = SCALAR_DECAY * W + u, eps_w
    _grads(lambda zz: ret.from_dual({"W": zz}, hp)["W"], (jnp.asarray(z),), eps=eps)


@pytest.mark.parametrize("q", [2.0, 2.5, 4.0])
def test_lq_grads_wrt_q(x64, q):
    _, _, A, _ = _delicate_point("lq")
    for scale in (1.0, 1e3):  # tiny and O(1) accumulators
        A_ = jnp.asarray(scale * A)
        _grads(lambda qq: R.lq_normalize(A_, qq), (jnp.asarray(q),))


def test_elastic_net_grads_wrt_gamma(x64):
    ret, u, W, _ = _delicate_point("elastic_net")
    z = jnp.asarray(SCALAR_DECAY * W + u)
    _grads(lambda g: ret.from_dual({"W": z}, {"gamma": g})["W"], (jnp.asarray(GAMMA),))
    d = jax.jacfwd(lambda g: R.soft_threshold(z, g))(jnp.asarray(GAMMA))
    np.testing.assert_array_equal(d, np.where(np.abs(z) > GAMMA, -np.sign(z), 0.0))


@pytest.mark.parametrize("q", [3.0, 4.0])
@pytest.mark.parametrize("c", [1e-9, 1e-4, 1e-2, 1.0, 1e2])
def test_lq_norm_floor_caps_the_weights(c, q):
    """``W = A / max(||A||_q, f)^(q-2)``: the plain map above the floor, ``A / f^(q-2)`` below it
    (value and gradient), so ``||W||_q <= f^(3-q)`` however far the accumulator has decayed."""
    f = 1e-2
    a64 = np.random.default_rng(3).normal(size=(6, 5)) * c
    a = jnp.asarray(a64, jnp.float32)
    a64 = np.asarray(a, np.float64)
    g = jnp.asarray(np.random.default_rng(4).normal(size=(6, 5)), jnp.float32)
    norm = np.sum(np.abs(a64) ** q) ** (1.0 / q)
    w = R.lq_normalize(a, q, f)
    grad = jax.grad(lambda x: jnp.sum(g * R.lq_normalize(x, q, f)))(a)
    assert np.all(np.isfinite(grad))
    if norm >= f:
        np.testing.assert_allclose(w, R.lq_normalize(a, q), rtol=2e-5)
        np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(g * R.lq_normalize(x, q)))(a), rtol=1e-4,
                                   atol=1e-5 * float(jnp.abs(grad).max()))
    else:
        np.testing.assert_allclose(w, a64 / f ** (q - 2.0), rtol=2e-5)
        np.testing.assert_allclose(grad, np.asarray(g) / f ** (q - 2.0), rtol=2e-5)
    assert np.sum(np.abs(np.asarray(w, np.float64)) ** q) ** (1.0 / q) <= f ** (3.0 - q) * (1 + 1e-5)
    z = jnp.zeros((6, 5))   # a fully decayed accumulator: W = 0, finite gradient A / f^(q-2)
    np.testing.assert_array_equal(R.lq_normalize(z, q, f), 0.0)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(g * R.lq_normalize(x, q, f)))(z), g / f ** (q - 2.0),
                               rtol=1e-6)


def test_lq_norm_floor_is_an_array_hparam_and_the_kernels_agree():
    """The floor vmaps (a grid over floors is one program), and the Pallas kernels' ``lq_scale``
    equals the library's for every floor, including 0 (the plain map) and A = 0."""
    from pallas_kernels.common import math as km

    a = jnp.asarray(np.random.default_rng(5).normal(size=(6, 5)) * 1e-3, jnp.float32)
    floors = jnp.asarray([0.0, 1e-4, 1e-2, 1.0])
    s = jax.vmap(lambda fl: R.lq_scale(a, 4.0, fl))(floors)
    for i, fl in enumerate([0.0, 1e-4, 1e-2, 1.0]):
        np.testing.assert_allclose(s[i], R.lq_scale(a, 4.0, fl), rtol=1e-6)
        for x in (a, jnp.zeros_like(a)):
            np.testing.assert_allclose(km.lq_scale(x, jnp.full((1, 1), 4.0), jnp.full((1, 1), fl))[0, 0],
                                       R.lq_scale(x, 4.0, fl), rtol=1e-5)
    np.testing.assert_allclose(s[1], s[0], rtol=1e-6)   # ||A||_4 ~ 3e-3: floor 1e-4 does not act,
    assert s[1] > s[2] > s[3]                          # 1e-2 and 1 do
    assert float(R.lq_scale(jnp.zeros((2, 2)), 4.0, 0.0)) == 1.0


# --- 4. validation -------------------------------------------------------------------------

@pytest.mark.parametrize("ret, hp, name", [
    (R.lq_retention(), {"q": 1.5}, "q"),
    (R.lq_retention(), {"q": np.array([2.0, 1.9])}, "q"),
    (R.lq_retention(), {"q": 4.0, "norm_floor": -1e-3}, "norm_floor"),
    (R.decay_retention("hparam"), {"decay": 1.5}, "decay"),
    (R.decay_retention("hparam"), {"decay": 0.0}, "decay"),
    (R.lq_retention("hparam"), {"decay": 1.01, "q": 4.0}, "decay"),
    (R.elastic_net_retention(), {"gamma": -0.1}, "gamma"),
])
def test_validate_rejects_bad_hparams(ret, hp, name):
    assert ret.validate(make_hp(ret, decay=1.0)) is None  # defaults (decay 1 allowed) are valid
    with pytest.raises(ValueError, match=rf"hyper-parameter {name} must be"):
        ret.validate(tree_jnp(hp))


@pytest.mark.parametrize("make, bad", [
    (R.kl_retention, 0.0), (R.kl_retention, -0.5),
    (R.sigmoid_retention, 0.0), (R.sigmoid_retention, 1.0), (R.sigmoid_retention, 1.2),
])
def test_check_params_domain(make, bad):
    ret = make()
    domain = "positive" if ret.name == "kl" else "unit_interval"
    good = tree_jnp(make_params(domain, "mlp"))
    assert ret.check_params(good) is None
    A, Bm = (np.array(x) for x in good["layers"])
    Bm[1, 2] = bad
    with pytest.raises(ValueError, match=f"retention '{ret.name}' needs"):
        ret.check_params({"layers": (jnp.asarray(A), jnp.asarray(Bm))})


def test_check_params_real_domain_accepts_anything():
    for ret in (R.no_retention(), R.decay_retention(), R.lq_retention(), R.elastic_net_retention()):
        assert ret.check_params({"W": -jnp.ones((2, 2))}) is None


@pytest.mark.parametrize("make", [
    lambda: R.Retention(decay_source="bogus"), lambda: R.decay_retention("Gate"),
    lambda: R.lq_retention("constant"), lambda: R.kl_retention("x"),
    lambda: R.elastic_net_retention("alpha"), lambda: R.sigmoid_retention("gates"),
])
def test_unknown_decay_source_raises(make):
    with pytest.raises(ValueError, match="decay_source must be one of"):
        make()


@pytest.mark.parametrize("q", [2.0, 3.0, 4.0, 2.5])
def test_abs_pow_sum_matches_autodiff_of_pow(x64, q):
    """``abs_pow_sum``'s custom JVP (shared log / exp) equals autodiff of ``sum |a| ** q``, also
    with exact zeros in ``a`` (derivative 0 there, no NaN)."""
    a = jax.random.normal(jax.random.key(0), (6, 5), jnp.float64).at[0, :2].set(0.0)
    qa = jnp.float64(q)
    ref = lambda a, q: jnp.sum(jnp.abs(a) ** q)  # noqa: E731
    np.testing.assert_allclose(R.abs_pow_sum(a, qa), ref(a, qa), rtol=1e-12)
    for argnum in (0, 1):
        g = jax.grad(R.abs_pow_sum, argnums=argnum)(a, qa)
        g_ref = jax.grad(lambda a, q: jnp.sum(jnp.where(a == 0, 0.0, jnp.abs(a)) ** q), argnums=argnum)(a, qa)
        if argnum == 1:  # d/dq of |0|^q is 0 (autodiff of pow gives NaN from 0 * log 0)
            g_ref = jnp.sum(jnp.where(a == 0, 0.0, jnp.abs(jnp.where(a == 0, 1.0, a)) ** q
                                      * jnp.log(jnp.abs(jnp.where(a == 0, 1.0, a)))))
        np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)
        assert np.all(np.isfinite(g))
    nz = a.at[0, :2].set(0.3)
    check_grads(R.abs_pow_sum, (nz, qa), order=2, modes=("fwd", "rev"), rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("q", [3.0, 4.0, 2.5])
@pytest.mark.parametrize("c", [1e-14, 1e-6, 1.0, 1e9])
def test_lq_normalize_is_accurate_and_finite_at_tiny_and_huge_scales(c, q):
    """float32 ``lq_normalize`` / ``lq_scale`` (and their VJPs) equal a float64 oracle when
    ``sum |A|^q`` would underflow or overflow float32 (max|A| = 1e-14: 1e-56 at q = 4; a Moneta
    run's strong decays shrank an accumulator that far and the naive sum made the gradient NaN)."""
    a64 = np.random.default_rng(1).normal(size=(6, 5)) * c
    a64[0, 0] = 0.0
    g64 = np.random.default_rng(2).normal(size=(6, 5))
    a, g = jnp.asarray(a64, jnp.float32), jnp.asarray(g64, jnp.float32)
    a64 = np.asarray(a, np.float64)  # the float32 input, exactly
    norm = np.sum(np.abs(a64) ** q) ** (1.0 / q)
    s_ref = norm ** -(q - 2.0)
    np.testing.assert_allclose(R.lq_scale(a, jnp.float32(q)), s_ref, rtol=2e-5)
    np.testing.assert_allclose(R.lq_normalize(a, q), a64 * s_ref, rtol=2e-5, atol=1e-30)
    # d/dA sum(G * A s(A)) = G s + A-term: s G + s' <G, A> with ds/dA = -(q-2) s |A|^(q-1) sign(A) / norm^q
    ds = -(q - 2.0) * s_ref * np.abs(a64) ** (q - 1.0) * np.sign(a64) / norm ** q
    grad_ref = s_ref * g64.astype(np.float32) + ds * np.sum(g64.astype(np.float32) * a64)
    grad = jax.grad(lambda x: jnp.sum(g * R.lq_normalize(x, q)))(a)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-4 * np.abs(grad_ref).max())
    dq = jax.grad(lambda qq: jnp.sum(g * R.lq_normalize(a, qq)))(jnp.float32(q))
    # d s / dq = s (-(log norm) + (q-2)/q (log norm - sum |A|^q log|A| / norm^q))
    nz = a64 != 0
    w = np.where(nz, np.abs(a64), 1.0)
    dlognorm_dq = (-np.log(norm) + np.sum(np.where(nz, w ** q * np.log(w), 0.0)) / norm ** q) / q
    dq_ref = np.sum(g64.astype(np.float32) * a64) * s_ref * (-np.log(norm) - (q - 2.0) * dlognorm_dq)
    np.testing.assert_allclose(dq, dq_ref, rtol=1e-4)
