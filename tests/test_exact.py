"""Exact chunked forms (``miras_jax.engine.exact``) vs plain token-by-token ``lax.scan`` references.

Values and VJPs (all inputs, incl. ``log_decay`` and ``W0``), every chunk size, strong / weak
decays, channel-wise Hebbian, DeltaProduct flattening (``read_every``), bf16 inputs, and the
``custom_vjp`` of the unit-lower-triangular inverse.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miras_jax.engine.exact import delta_chunked, hebbian_chunked, unit_lower_inverse

F32_VALUE_TOL = 1e-4  # reordered chunk math vs the token scan, float32
F32_GRAD_RTOL = 1e-3  # VJPs, relative to the largest entry of the reference cotangent
BF16_TOL = 1e-2  # bf16 inputs vs the float32 run on the unrounded inputs (relative to the scale)
INVERSE_TOL = 1e-5

# Plain jax.jit: the suite-wide --xla_backend_optimization_level=0 (tests/conftest.py) replaces the
# per-executable compile option this file used to pass (one of last session's two single-process
# segfaults came inside that compile, in test_hebbian_values; root cause unknown).


# ----------------------------------------------------------------------------------------------
# References: the recurrences, one token (sub-step) at a time
# ----------------------------------------------------------------------------------------------


def hebbian_reference(q, k, v, lr, log_decay, W0):
    """``W_t = W_{t-1} Diag(exp(log_decay_t)) + lr_t v_t k_t^T``, ``y_t = W_t q_t``."""
    q, k, v, lr, W0 = (x.astype(jnp.float32) for x in (q, k, v, lr, W0))
    T = q.shape[0]
    ld = jnp.zeros((T,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)

    def step(W, xs):
        q_t, k_t, v_t, lr_t, ld_t = xs
        W = W * jnp.exp(ld_t) + lr_t * jnp.outer(v_t, k_t)  # ld_t: [] or [k] (columns)
        return W, W @ q_t

    W_T, y = jax.lax.scan(step, W0, (q, k, v, lr, ld))
    return y, W_T


def delta_reference(q, k, v, lr, log_decay, W0, read_every=1):
    """``W = a W; W = W - lr (W k - v) k^T`` per sub-step; read ``W q`` after the last sub-step."""
    q, k, v, lr, W0 = (x.astype(jnp.float32) for x in (q, k, v, lr, W0))
    n = read_every
    T = q.shape[0]
    ld = jnp.zeros((T * n,), jnp.float32) if log_decay is None else log_decay.astype(jnp.float32)
    xs = (q, k.reshape(T, n, -1), v.reshape(T, n, -1), lr.reshape(T, n), ld.reshape(T, n))

    def step(W, xs):
        q_t, k_t, v_t, lr_t, ld_t = xs
        for j in range(n):  # sub-steps of one token (static, small)
            W = jnp.exp(ld_t[j]) * W
            W = W - lr_t[j] * jnp.outer(W @ k_t[j] - v_t[j], k_t[j])
        return W, W @ q_t

    W_T, y = jax.lax.scan(step, W0, xs)
    return y, W_T


def inverse_reference(a):
    """``(I + A)^{-1}`` as the Neumann series ``sum_{m < c} (-A)^m`` (exact: ``A`` is nilpotent),
    by the Horner iteration ``X <- I - A X`` repeated ``c`` times."""
    c = a.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), a.shape)
    return jax.lax.fori_loop(0, c, lambda _, x: eye - a @ x, eye)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def make_inputs(seed, T, d_k, d_v, *, decay="scalar", log_decay_range=None, read_every=1):
    """``(q, k, v, lr, log_decay, W0)``; ``T`` counts steps (``read_every`` steps per read).

    Keys and queries l2-normalised, ``lr`` in (0, 1), decays in (0.5, 1) unless
    ``log_decay_range`` is given. With ``read_every > 1`` only sub-step 0 decays (DeltaProduct).
    Drawn with numpy (no per-shape compiles of random ops).
    """
    rng = np.random.default_rng(seed)
    unit_rows = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit_rows(rng.standard_normal((T // read_every, d_k)))
    k = unit_rows(rng.standard_normal((T, d_k)))
    v = rng.standard_normal((T, d_v))
    lr = rng.uniform(0.01, 0.99, (T,))
    W0 = rng.standard_normal((d_v, d_k)) / np.sqrt(d_k)
    lo, hi = log_decay_range if log_decay_range else (np.log(0.5), 0.0)
    shape = {"none": None, "scalar": (T,), "channel": (T, d_k)}[decay]
    log_decay = None if shape is None else rng.uniform(lo, hi, shape)
    if log_decay is not None and read_every > 1:
        log_decay = log_decay * (np.arange(T) % read_every == 0)[(slice(None),) + (None,) * (len(shape) - 1)]
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in (q, k, v, lr, log_decay, W0))


def assert_values_close(got, want, tol=F32_VALUE_TOL):
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=tol)


def assert_grads_close(got, want, rtol=F32_GRAD_RTOL):
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g)), f"input {i}: non-finite gradient"
        scale = max(float(np.abs(w).max()), 1e-30)
        err = float(np.abs(g - w).max())
        assert err <= rtol * scale, f"input {i}: max error {err:.3g} vs scale {scale:.3g}"


def value_and_vjp(fn, args, seed=99):
    """``((y, W_T), grads)``: ``fn(*args)`` and its VJP with a random cotangent w.r.t. every
    non-None arg, in one compile."""
    idx = [i for i, a in enumerate(args) if a is not None]

    def f(*diff_args):
        full = list(args)
        for i, a in zip(idx, diff_args):
            full[i] = a
        return fn(*full)

    diff_args = [args[i] for i in idx]
    out_shapes = jax.eval_shape(f, *diff_args)
    k1, k2 = jax.random.split(jax.random.key(seed))
    cot = (jax.random.normal(k1, out_shapes[0].shape), jax.random.normal(k2, out_shapes[1].shape))

    def go(d, g):
        out, vjp = jax.vjp(f, *d)
        return out, vjp(g)

    return jax.jit(go)(diff_args, cot)


def jitted(fn, *static):
    """``fn`` with trailing static arguments bound, jitted (one compile instead of eager ops)."""
    return jax.jit(lambda *a: fn(*a, *static))


FAMILIES = {"hebbian": (hebbian_chunked, hebbian_reference), "delta": (delta_chunked, delta_reference)}

# (chunk_size, T, d_k, d_v): chunk 1, an odd chunk, 16, 64
CHUNK_CASES = [(1, 24, 5, 8), (7, 63, 8, 5), (16, 80, 32, 16), (64, 128, 16, 32)]


# ----------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["none", "scalar", "channel"])
@pytest.mark.parametrize("c,T,d_k,d_v", CHUNK_CASES)
def test_hebbian_values(c, T, d_k, d_v, decay):
    q, k, v, lr, ld, W0 = make_inputs(c + T, T, d_k, d_v, decay=decay)
    got = jitted(hebbian_chunked, c)(q, k, v, lr, ld, W0)
    assert got[0].shape == (T, d_v) and got[1].shape == (d_v, d_k)
    assert_values_close(got, jax.jit(hebbian_reference)(q, k, v, lr, ld, W0))


@pytest.mark.parametrize("decay", ["none", "scalar"])
@pytest.mark.parametrize("c,T,d_k,d_v", CHUNK_CASES)
def test_delta_values(c, T, d_k, d_v, decay):
    q, k, v, lr, ld, W0 = make_inputs(c + T, T, d_k, d_v, decay=decay)
    got = jitted(delta_chunked, c)(q, k, v, lr, ld, W0)
    assert got[0].shape == (T, d_v) and got[1].shape == (d_v, d_k)
    assert_values_close(got, jax.jit(delta_reference)(q, k, v, lr, ld, W0))


@pytest.mark.parametrize("n,c,T", [(2, 2, 40), (2, 16, 96), (3, 12, 72), (3, 21, 84)])
def test_delta_product_values(n, c, T):
    """DeltaProduct: n sub-steps per token flattened into T steps, read at each token's last step."""
    d_k, d_v = 8, 16
    q, k, v, lr, ld, W0 = make_inputs(n * c, T, d_k, d_v, decay="scalar", read_every=n)
    got = jitted(delta_chunked, c, n)(q, k, v, lr, ld, W0)
    assert got[0].shape == (T // n, d_v)
    assert_values_close(got, jitted(delta_reference, n)(q, k, v, lr, ld, W0))


# ----------------------------------------------------------------------------------------------
# Strong and weak decay
# ----------------------------------------------------------------------------------------------

DECAY_REGIMES = {"strong": (-20.0, -5.0), "weak": (-2e-3, 0.0)}


@pytest.mark.parametrize("regime", DECAY_REGIMES)
@pytest.mark.parametrize("family,decay", [("hebbian", "scalar"), ("hebbian", "channel"), ("delta", "scalar")])
def test_decay_regimes(family, decay, regime):
    """Cumulative log-decay down to -640 in a chunk: no overflow / NaN in values or VJPs."""
    c, T, d_k, d_v = 32, 64, 16, 8
    args = make_inputs(3, T, d_k, d_v, decay=decay, log_decay_range=DECAY_REGIMES[regime])
    fast, ref = FAMILIES[family]
    (out, grads), (out_ref, grads_ref) = value_and_vjp(lambda *a: fast(*a, c), args), value_and_vjp(ref, args)
    assert_values_close(out, out_ref)
    # Gradients stay finite and exact too (exp is never taken of a positive cumulative sum).
    assert_grads_close(grads, grads_ref)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "c,decay", [(16, "none"), (16, "scalar"), (16, "channel"), (1, "scalar"), (7, "channel")]
)
def test_hebbian_vjp(c, decay):
    args = make_inputs(11, {1: 24, 7: 56, 16: 48}[c], 8, 5, decay=decay)
    out, got = value_and_vjp(lambda *a: hebbian_chunked(*a, c), args)
    out_ref, want = value_and_vjp(hebbian_reference, args)
    assert len(got) == (5 if decay == "none" else 6)
    assert_values_close(out, out_ref)
    assert_grads_close(got, want)


@pytest.mark.parametrize("c,decay", [(1, "scalar"), (7, "none"), (16, "scalar"), (16, "none")])
def test_delta_vjp(c, decay):
    args = make_inputs(12, 112, 16, 8, decay=decay)
    out, got = value_and_vjp(lambda *a: delta_chunked(*a, c), args)
    out_ref, want = value_and_vjp(delta_reference, args)
    assert_values_close(out, out_ref)
    assert_grads_close(got, want)


@pytest.mark.parametrize("n", [2, 3])
def test_delta_product_vjp(n):
    args = make_inputs(13, 24 * n, 8, 8, decay="scalar", read_every=n)
    out, got = value_and_vjp(lambda *a: delta_chunked(*a, 4 * n, read_every=n), args)
    out_ref, want = value_and_vjp(lambda *a: delta_reference(*a, read_every=n), args)
    assert_values_close(out, out_ref)
    assert_grads_close(got, want)


@pytest.mark.parametrize("c", [1, 5, 16])
def test_unit_lower_inverse_value_and_vjp(c):
    """The custom_vjp inverse vs a naive (Neumann-series) inverse differentiated by autodiff."""
    ka, kg = jax.random.split(jax.random.key(c))
    a = jnp.tril(0.4 * jax.random.normal(ka, (3, c, c)), -1)  # a batch of 3 chunks
    x = jax.jit(unit_lower_inverse)(a)
    np.testing.assert_allclose(np.asarray(x), np.asarray(jax.jit(inverse_reference)(a)), atol=INVERSE_TOL)
    np.testing.assert_allclose(np.asarray(x @ (jnp.eye(c) + a)), np.broadcast_to(np.eye(c), a.shape),
                               atol=INVERSE_TOL)
    g = jax.random.normal(kg, a.shape)
    (da,) = jax.jit(lambda a, g: jax.vjp(unit_lower_inverse, a)[1](g))(a, g)
    (da_ref,) = jax.jit(lambda a, g: jax.vjp(inverse_reference, a)[1](g))(a, g)
    da_ref = jnp.tril(da_ref, -1)  # only the strictly-lower part of A is an input
    np.testing.assert_allclose(np.asarray(da), np.asarray(da_ref), atol=INVERSE_TOL, rtol=INVERSE_TOL)


# ----------------------------------------------------------------------------------------------
# bf16, transformations, validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["hebbian", "delta"])
def test_bf16_inputs(family):
    c, T, d_k, d_v = 16, 64, 16, 16
    args = make_inputs(5, T, d_k, d_v, decay="channel" if family == "hebbian" else "scalar")
    fast, ref = FAMILIES[family]
    args16 = tuple(a.astype(jnp.bfloat16) for a in args)
    got = jitted(fast, c)(*args16)
    # Math runs in float32: equal to the float32 reference on the rounded inputs ...
    assert_values_close(got, jax.jit(ref)(*args16))
    # ... and close to the float32 run on the unrounded inputs.
    for g, w in zip(got, jax.jit(ref)(*args)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=BF16_TOL * float(jnp.abs(w).max()))
    _, grads = value_and_vjp(lambda *a: fast(*a, c), args16)
    assert all(g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_jit_vmap_segments():
    """jit + vmap over a batch equal per-sequence calls; two segments chained by W_T equal one."""
    c, T, d_k, d_v = 8, 32, 8, 8
    batch = [make_inputs(s, T, d_k, d_v) for s in range(3)]
    stacked = tuple(jnp.stack(x) for x in zip(*batch))
    for fast in (hebbian_chunked, delta_chunked):
        y, W = jax.jit(jax.vmap(lambda *a, f=fast: f(*a, c)))(*stacked)
        one = jitted(fast, c)
        for b, args in enumerate(batch):
            y_b, W_b = one(*args)
            np.testing.assert_allclose(np.asarray(y[b]), np.asarray(y_b), atol=1e-6)
            np.testing.assert_allclose(np.asarray(W[b]), np.asarray(W_b), atol=1e-6)
        q, k, v, lr, ld, W0 = batch[0]
        h = T // 2
        y1, W1 = one(q[:h], k[:h], v[:h], lr[:h], ld[:h], W0)
        y2, W2 = one(q[h:], k[h:], v[h:], lr[h:], ld[h:], W1)
        assert_values_close((jnp.concatenate([y1, y2]), W2), one(q, k, v, lr, ld, W0))


def test_validation():
    q, k, v, lr, ld, W0 = make_inputs(0, 24, 8, 8, decay="channel")
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        hebbian_chunked(q, k, v, lr, ld, W0, 7)
    with pytest.raises(ValueError, match="scalar decay"):
        delta_chunked(q, k, v, lr, ld, W0, 8)
    with pytest.raises(ValueError, match="multiple of read_every"):
        delta_chunked(q[:12], k, v, lr, None, W0, 6, read_every=4)
    with pytest.raises(ValueError, match="q must have shape"):
        delta_chunked(q, k, v, lr, None, W0, 8, read_every=2)


@pytest.mark.parametrize("diagonal,f_shape", [(False, (5, 4, 4)), (True, (5, 4)), (True, (5, 1))])
def test_state_scan_vjp_matches_autodiff(diagonal, f_shape):
    """The hand-written VJP of the chunk-state scan (one matmul per chunk in the reverse loop,
    ``dF`` in bulk) equals autodiff of the plain ``lax.scan``; so does the value."""
    from miras_jax.engine.exact import _scan_states, _state_scan_fwd_loop

    ks = jax.random.split(jax.random.key(3), 5)
    s0 = jax.random.normal(ks[0], (3, 4))
    f = 0.5 * jax.random.normal(ks[1], f_shape)
    d = jax.random.normal(ks[2], (5, 3, 4))
    ct = (jax.random.normal(ks[3], (5, 3, 4)), jax.random.normal(ks[4], (3, 4)))
    fast = lambda *a: _scan_states(*a, diagonal=diagonal)  # noqa: E731
    plain = lambda *a: _state_scan_fwd_loop(diagonal, *a)  # noqa: E731
    out, vjp = jax.vjp(fast, s0, f, d)
    out_ref, vjp_ref = jax.vjp(plain, s0, f, d)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(vjp(ct), vjp_ref(ct)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("diagonal,f_shape", [(False, (7, 4, 4)), (True, (7, 4)), (True, (7, 1))])
def test_associative_state_scan_equals_the_sequential_one(diagonal, f_shape):
    """``state_scan="associative"`` (the chunk summaries composed by ``jax.lax.associative_scan``)
    gives the sequential scan's chunk-start states, last state and VJP."""
    from miras_jax.engine.exact import _scan_states

    ks = jax.random.split(jax.random.key(4), 5)
    s0 = jax.random.normal(ks[0], (3, 4))
    f = 0.5 * jax.random.normal(ks[1], f_shape)
    d = jax.random.normal(ks[2], (7, 3, 4))
    ct = (jax.random.normal(ks[3], (7, 3, 4)), jax.random.normal(ks[4], (3, 4)))
    out, vjp = jax.vjp(lambda *a: _scan_states(*a, diagonal=diagonal, state_scan="associative"), s0, f, d)
    out_ref, vjp_ref = jax.vjp(lambda *a: _scan_states(*a, diagonal=diagonal), s0, f, d)
    for a, b in zip(jax.tree.leaves((out, vjp(ct))), jax.tree.leaves((out_ref, vjp_ref(ct)))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="state_scan"):
        _scan_states(s0, f, d, diagonal=diagonal, state_scan="parallel")


@pytest.mark.parametrize("family,decay,c,T", [("hebbian", "channel", 8, 56), ("hebbian", "scalar", 16, 80),
                                              ("delta", "scalar", 7, 63), ("delta", "none", 16, 48)])
def test_associative_chunk_forms_equal_the_token_recurrence(family, decay, c, T):
    """Both families end to end with the associative chunk-state scan: values and VJPs against the
    token references (random shapes: odd chunk sizes, d_k != d_v)."""
    fast, ref = FAMILIES[family]
    args = make_inputs(21, T, 6, 5, decay=decay)
    out, got = value_and_vjp(lambda *a: fast(*a, c, state_scan="associative"), args)
    out_ref, want = value_and_vjp(ref, args)
    assert_values_close(out, out_ref)
    assert_grads_close(got, want)


def test_the_planner_picks_the_state_scan_per_backend_and_length():
    from miras_jax.engine import plan as plan_lib
    assert plan_lib.state_scan(10_000, "cpu") == "sequential"              # measured: never faster here
    assert plan_lib.state_scan(8, "tpu") == "sequential"
    assert plan_lib.state_scan(plan_lib.ASSOCIATIVE_FROM["tpu"], "tpu") == "associative"
