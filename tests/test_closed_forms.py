"""Closed-form oracles for every matrix-memory preset of ``miras_jax``.

Each preset's per-token write rule is re-implemented here directly from the
equations of ``MIRAS.md`` (sections 2-5) as a plain float64 NumPy loop over
tokens, with no use of ``miras_jax`` internals.  The library (float32,
``chunk_size=1``, ``implementation="reference"``) must reproduce both the
outputs ``y[t] = W_t q_t`` (read after the write of token ``t``) and the final
memory ``final_state.memory["W"]``.

Convention: ``W`` is ``[d_v, d_k]``, ``M(k) = W k``, residual
``r = W_{t-1} k - v``, a write ``v k^T`` is an outer product.

Also checked: gates a preset does not use are ignored, a missing needed gate
raises ``ValueError`` naming it, and an unknown preset name raises
``ValueError`` listing the valid names.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj

RTOL = 1e-4  # float32 library vs float64 oracle
ATOL = 1e-4
W0_SCALE = 0.3
SHAPES = [(1, 4, 4), (7, 8, 5), (33, 16, 16)]  # (T, d_k, d_v)
GATE_NAMES = ("lr", "decay", "momentum", "delta")

# Default smooth surrogates (MIRAS.md sec. 3): sign(x) ~ tanh(a x), |x| ~ sqrt(x^2 + eps).
SMOOTH_A = 10.0
SMOOTH_EPS = 1e-6


# --------------------------------------------------------------------------
# Oracles: step(W_prev, aux, k_t, v_t, g_t) -> (W_t, aux).  float64 numpy.
# --------------------------------------------------------------------------

def _outer(x, y):
    return np.outer(x, y)


def step_linear_attention(W, aux, k, v, g):
    return W + g["lr"] * _outer(v, k), aux


def make_step_retnet(a):
    def step(W, aux, k, v, g):
        return a * W + g["lr"] * _outer(v, k), aux
    return step


def step_mamba2(W, aux, k, v, g):
    return g["decay"] * W + g["lr"] * _outer(v, k), aux


def step_gla(W, aux, k, v, g):
    return W * g["decay"][None, :] + g["lr"] * _outer(v, k), aux


def step_deltanet(W, aux, k, v, g):
    return W - g["lr"] * _outer(W @ k - v, k), aux


def step_gated_deltanet(W, aux, k, v, g):
    Wa = g["decay"] * W
    return Wa - g["lr"] * _outer(Wa @ k - v, k), aux


def step_longhorn(W, aux, k, v, g):
    b = g["lr"] / (1.0 + g["lr"] * (k @ k))
    return W - b * _outer(W @ k - v, k), aux


def step_deltaproduct(W, aux, k, v, g):
    # k: [n, d_k], v: [n, d_v], lr: [n], decay: scalar.
    W = g["decay"] * W
    for j in range(k.shape[0]):
        W = W - g["lr"][j] * _outer(W @ k[j] - v[j], k[j])
    return W, aux


def step_titans(W, S, k, v, g):
    S = (np.zeros_like(W) if S is None else S)
    S = g["momentum"] * S - g["lr"] * _outer(W @ k - v, k)
    return g["decay"] * W + S, S


def make_step_moneta(p, q, smooth):
    if smooth:
        sign = lambda x: np.tanh(SMOOTH_A * x)
        absf = lambda x: np.sqrt(x * x + SMOOTH_EPS)
    else:
        sign, absf = np.sign, np.abs

    def step(W, A, k, v, g):
        A = W if A is None else A  # A_0 = W_0
        r = W @ k - v
        grad = p * sign(r) * absf(r) ** (p - 1.0)
        A = g["decay"] * A - g["lr"] * _outer(grad, k)
        norm_q = np.sum(np.abs(A) ** q) ** (1.0 / q)
        return A / norm_q ** (q - 2.0), A
    return step


def step_yaad(W, aux, k, v, g):
    r = W @ k - v
    if np.linalg.norm(r) <= g["delta"]:
        grad = _outer(r, k)
    else:
        grad = g["delta"] * _outer(np.sign(r), k)
    return g["decay"] * W - g["lr"] * grad, aux


def step_memora(W, aux, k, v, g):
    z = g["decay"] * np.log(W) - g["lr"] * _outer(W @ k - v, k)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return W.shape[-1] * e / e.sum(axis=-1, keepdims=True), aux


def run_oracle(step, W0, q, k, v, gates):
    W, aux, ys = W0.astype(np.float64), None, []
    for t in range(q.shape[0]):
        g_t = {name: np.asarray(val[t], np.float64) for name, val in gates.items()}
        W, aux = step(W, aux, k[t].astype(np.float64), v[t].astype(np.float64), g_t)
        ys.append(W @ q[t].astype(np.float64))
    return np.stack(ys), W


# --------------------------------------------------------------------------
# Preset table: id -> (preset name, kwargs, oracle step, needed gates, options)
# --------------------------------------------------------------------------

class Case(NamedTuple):
    preset: str
    kwargs: dict
    step: Callable
    gates: tuple
    num_steps: int = 0  # deltaproduct: keys/values/lr per token
    positive_w0: bool = False  # memora
    channel_decay: bool = False  # gla
    v_scale: float = 1.0  # yaad: small values so ||r|| straddles delta
    lr_scale: float = 1.0  # moneta p=3, q=2 (plain cubic-loss GD) diverges at lr ~ 0.9


CASES = {
    "linear_attention": Case("linear_attention", {}, step_linear_attention, ("lr",)),
    "retnet": Case("retnet", {"decay": 0.9}, make_step_retnet(0.9), ("lr",)),
    "mamba2": Case("mamba2", {}, step_mamba2, ("lr", "decay")),
    "gla": Case("gla", {}, step_gla, ("lr", "decay"), channel_decay=True),
    "deltanet": Case("deltanet", {}, step_deltanet, ("lr",)),
    "gated_deltanet": Case("gated_deltanet", {}, step_gated_deltanet, ("lr", "decay")),
    "longhorn": Case("longhorn", {}, step_longhorn, ("lr",)),
    "deltaproduct_n2": Case("deltaproduct", {"num_steps": 2}, step_deltaproduct,
                            ("lr", "decay"), num_steps=2),
    "deltaproduct_n3": Case("deltaproduct", {"num_steps": 3}, step_deltaproduct,
                            ("lr", "decay"), num_steps=3),
    "titans": Case("titans", {"memory": "linear"}, step_titans, ("lr", "decay", "momentum")),
    **{
        f"moneta_p{p}_q{q}": Case(
            "moneta", {"memory": "linear", "p": p, "q": q, "smooth": None},
            make_step_moneta(p, q, smooth=False), ("lr", "decay"),
            lr_scale=0.25 if (p, q) == (3.0, 2.0) else 1.0)
        for p in (1.5, 2.0, 3.0) for q in (2.0, 3.0, 4.0)
    },
    "moneta_smooth_p3_q4": Case("moneta", {"memory": "linear", "p": 3.0, "q": 4.0},
                                make_step_moneta(3.0, 4.0, smooth=True), ("lr", "decay")),
    "moneta_p1.0_q4.0": Case("moneta", {"memory": "linear", "p": 1.0, "q": 4.0, "smooth": None},
                             make_step_moneta(1.0, 4.0, smooth=False), ("lr", "decay")),
    # p=3 smooth vs exact differ by ~1e-4 only; p<=1.5 makes the smoothing clearly visible.
    "moneta_smooth_p1_q4": Case("moneta", {"memory": "linear", "p": 1.0, "q": 4.0},
                                make_step_moneta(1.0, 4.0, smooth=True), ("lr", "decay")),
    "moneta_smooth_p1.5_q3": Case("moneta", {"memory": "linear", "p": 1.5, "q": 3.0},
                                  make_step_moneta(1.5, 3.0, smooth=True), ("lr", "decay")),
    "yaad": Case("yaad", {"memory": "linear", "smooth": None}, step_yaad,
                 ("lr", "decay", "delta"), v_scale=0.15),
    "memora": Case("memora", {"memory": "linear"}, step_memora, ("lr", "decay"),
                   positive_w0=True),
}


def _l2n(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(case: Case, T, d_k, d_v, seed=0):
    """Random float32 inputs: (W0, q, k, v, all_gates); all_gates has every gate."""
    rng = np.random.default_rng(seed)
    f32 = lambda x: np.asarray(x, np.float32)
    if case.positive_w0:
        logits = rng.normal(size=(d_v, d_k))
        e = np.exp(logits - logits.max(-1, keepdims=True))
        W0 = d_k * e / e.sum(-1, keepdims=True)
    else:
        W0 = W0_SCALE * rng.normal(size=(d_v, d_k))
    n = case.num_steps
    kv_lead = (T, n) if n else (T,)
    q = _l2n(rng.normal(size=(T, d_k)))
    k = _l2n(rng.normal(size=kv_lead + (d_k,)))
    v = case.v_scale * rng.normal(size=kv_lead + (d_v,))
    gates = {
        "lr": case.lr_scale * rng.uniform(0.05, 0.9, size=kv_lead),
        "decay": rng.uniform(0.8, 1.0, size=(T, d_k) if case.channel_decay else (T,)),
        "momentum": rng.uniform(0.5, 0.95, size=(T,)),
        "delta": rng.uniform(0.1, 1.0, size=(T,)),
    }
    return f32(W0), f32(q), f32(k), f32(v), {g: f32(a) for g, a in gates.items()}


def run_library(case: Case, W0, q, k, v, gates):
    spec = mj.presets.get(case.preset, **case.kwargs)
    y, state = mj.memorize(spec, {"W": jnp.asarray(W0)}, jnp.asarray(q), jnp.asarray(k),
                           jnp.asarray(v), {g: jnp.asarray(a) for g, a in gates.items()},
                           chunk_size=1, implementation="reference")
    return np.asarray(y), np.asarray(state.memory["W"])


def _needed(case, gates):
    return {g: gates[g] for g in case.gates}


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_dk{}_dv{}".format(*s))
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_closed_form(case_id, shape):
    case = CASES[case_id]
    W0, q, k, v, gates = make_inputs(case, *shape)
    gates = _needed(case, gates)
    y_ref, W_ref = run_oracle(case.step, W0, q, k, v, gates)
    y, W = run_library(case, W0, q, k, v, gates)
    T, d_k, d_v = shape
    assert y.shape == (T, d_v)
    assert W.shape == (d_v, d_k)
    np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=f"{case_id}: y")
    np.testing.assert_allclose(W, W_ref, rtol=RTOL, atol=ATOL, err_msg=f"{case_id}: final W")


def test_memory_init_shape():
    spec = mj.presets.get("deltanet")
    params = spec.memory.init(jax.random.key(0), 8, 5)
    assert params["W"].shape == (5, 8)


def test_yaad_inputs_exercise_both_branches():
    """Guard: the yaad oracle comparisons above cover both Huber branches."""
    case = CASES["yaad"]
    branches = []

    def step(W, aux, k_t, v_t, g):
        branches.append(np.linalg.norm(W @ k_t - v_t) <= g["delta"])
        return step_yaad(W, aux, k_t, v_t, g)

    for shape in SHAPES[1:]:
        W0, q, k, v, gates = make_inputs(case, *shape)
        run_oracle(step, W0, q, k, v, _needed(case, gates))
    assert 0 < sum(branches) < len(branches), "inputs hit only one branch"


def test_deltanet_ignores_decay_gate():
    case = CASES["deltanet"]
    W0, q, k, v, gates = make_inputs(case, 7, 8, 5)
    y1, W1 = run_library(case, W0, q, k, v, {"lr": gates["lr"]})
    y2, W2 = run_library(case, W0, q, k, v, {"lr": gates["lr"], "decay": gates["decay"]})
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(W1, W2)


@pytest.mark.parametrize("case_id", [c for c in CASES if set(CASES[c].gates) != set(GATE_NAMES)])
def test_unused_gates_are_ignored(case_id):
    case = CASES[case_id]
    W0, q, k, v, gates = make_inputs(case, 7, 8, 5)
    y1, W1 = run_library(case, W0, q, k, v, _needed(case, gates))
    y2, W2 = run_library(case, W0, q, k, v, gates)
    np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(W1, W2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case_id,gate", [(c, g) for c in CASES for g in CASES[c].gates])
def test_missing_gate_raises(case_id, gate):
    case = CASES[case_id]
    W0, q, k, v, gates = make_inputs(case, 3, 4, 4)
    gates = {g: a for g, a in _needed(case, gates).items() if g != gate}
    with pytest.raises(ValueError, match=gate):
        run_library(case, W0, q, k, v, gates)


def test_gated_deltanet_missing_decay_raises():
    case = CASES["gated_deltanet"]
    W0, q, k, v, gates = make_inputs(case, 3, 4, 4)
    with pytest.raises(ValueError, match="decay"):
        run_library(case, W0, q, k, v, {"lr": gates["lr"]})


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        mj.presets.get("no_such_model")
    assert "deltanet" in str(info.value)
