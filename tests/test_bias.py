"""Attentional biases of ``miras_jax.bias`` against the equations of MIRAS.md (sections 1 and 3).

Pinned down here, for every bias:

* exact mode (``smooth=False``): ``residual_map == jax.grad(loss)`` w.r.t. the prediction at
  random points away from the kinks (for Yaad's ``"switch"`` form piecewise: l2 inside,
  ``delta * l1`` outside);
* closed-form values of ``phi(r)`` (``r = pred - target``) from the equations, exact and smooth
  (``sign ~ tanh(a x)``, ``|x| ~ sqrt(x^2 + eps)``), with ``delta = delta_scale * gate["delta"]``;
* ``jax.test_util.check_grads`` in float64 of ``residual_map`` and ``loss`` w.r.t. the prediction
  (smooth mode at ``r = 0`` and next to the kinks, exact mode away from them), finite derivatives
  at ``r = 0`` in exact mode, and derivatives w.r.t. the traced hyper-parameter ``p``;
* hyper-parameter validation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from miras_jax import bias as B

# float32 library vs float64 NumPy oracle / float32 autodiff.
RTOL = 2e-5
ATOL = 1e-6
# float64 jax.test_util.check_grads.
GRAD_RTOL = 1e-5
GRAD_ATOL = 1e-6
FD_EPS = 1e-6  # finite-difference step; << sqrt(eps) = 1e-3, the smooth surrogates' scale
FD_EPS_AT_ZERO = 1e-7  # at r_i = 0 the surrogates' higher derivatives grow like eps^(-k/2)
KINK_MARGIN = 1e-3  # distance from a Huber threshold in the near-kink checks
DELTA = 0.7  # the per-token Huber gate
D_V = 6
SEEDS = (0, 1)
P_VALUES = (1.0, 1.5, 2.0, 3.0, 4.0)
SMOOTH_A, SMOOTH_EPS = 10.0, 1e-6  # documented defaults of the surrogates


# --- helpers ---------------------------------------------------------------------------------


def make_hp(bias, **overrides):
    """``bias.default_hparams()`` (plus overrides) as arrays of the current default float dtype."""
    return {k: jnp.asarray(v) for k, v in {**bias.default_hparams(), **overrides}.items()}


def make_gates(bias, delta=DELTA):
    return {"delta": jnp.asarray(delta)} if "delta" in bias.gates else {}


# Exact-mode cases: id -> (bias, hp overrides).
EXACT = {
    "dot": (B.dot_bias(), {}),
    "l2": (B.l2_bias(), {}),
    "l1": (B.l1_bias(smooth=False), {}),
    **{f"lp{p}": (B.lp_bias(smooth=False), {"p": p}) for p in P_VALUES},
    **{f"huber_{f}": (B.huber_bias(f, smooth=False), {}) for f in B.HUBER_FORMS},
    "robust": (B.robust_bias(smooth=False), {"shift": 0.3}),
}
# Smooth-mode cases (the default of l1 / l_p / Huber / robust).
SMOOTH = {
    "l1": (B.l1_bias(), {}),
    **{f"lp{p}": (B.lp_bias(), {"p": p}) for p in P_VALUES},
    **{f"huber_{f}": (B.huber_bias(f), {}) for f in B.HUBER_FORMS},
    "yaad": (B.yaad_bias(), {}),
    "robust": (B.robust_bias(), {"shift": 0.3}),
}
NORM_BASED = ("huber_norm", "huber_switch", "robust")

# Residual magnitude bands that keep every coordinate >= 0.1 away from 0 and >= 0.15 from DELTA,
# and ||r|| away from DELTA: "inside" has ||r|| in [0.24, 0.62], the others ||r|| >= 1.5.
BANDS = {"inside": [(0.1, 0.25)], "outside": [(0.85, 2.0)], "mixed": [(0.1, 0.5), (0.9, 2.0)]}


def residual_away_from_kinks(kind, seed, d=D_V):
    rng = np.random.default_rng(seed)
    bands = BANDS[kind]
    mags = np.concatenate([rng.uniform(lo, hi, size=d // len(bands)) for lo, hi in bands])
    return rng.permutation(mags) * rng.choice([-1.0, 1.0], size=d)


def point(r, seed=0):
    """``(pred, target)`` with ``pred - target = r``; float64 NumPy."""
    target = np.random.default_rng(100 + seed).normal(size=np.shape(r))
    return target + np.asarray(r, np.float64), target


def as_jnp(*xs):
    return tuple(jnp.asarray(x) for x in xs)


# --- 1. exact mode: phi = d loss / d pred ----------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", sorted(BANDS))
@pytest.mark.parametrize("case", sorted(EXACT))
def test_exact_residual_map_is_loss_gradient(case, kind, seed):
    bias, over = EXACT[case]
    hp, g = make_hp(bias, **over), make_gates(bias)
    pred, target = as_jnp(*point(residual_away_from_kinks(kind, seed), seed))
    phi = bias.residual_map(pred, target, hp, g)
    grad = jax.grad(bias.loss)(pred, target, hp, g)
    assert phi.shape == pred.shape
    np.testing.assert_allclose(phi, grad, rtol=RTOL, atol=ATOL)


# --- 2. closed-form phi ----------------------------------------------------------------------

def _phi_lp(r, p):
    return p * np.sign(r) * np.abs(r) ** (p - 1.0)


def _phi_lp_smooth(r, p, a, eps):
    return p * np.tanh(a * r) * (r * r + eps) ** ((p - 1.0) / 2.0)


def _phi_huber(form, r, d):
    n = np.linalg.norm(r)
    if form == "coordinate":
        return np.clip(r, -d, d)
    if form == "norm":
        return r if n <= d else d * r / n
    return r if n <= d else d * np.sign(r)


# r with exact zeros (p sign(0) |0|^(p-1) = 0, also for p = 1), inside and outside ||r|| = DELTA.
CLOSED_FORM_R = {
    "zeros": np.array([0.0, 1.2, -0.3, 0.0, -2.0, 0.4]),
    "inside": 0.1 * np.array([1.0, -2.0, 1.5, -0.5, 0.8, -1.2]),
    "outside": np.array([0.25, -0.4, 1.3, -1.9, 0.55, -0.9]),
}


def _check_phi(bias, hp_over, r, expected, delta=DELTA):
    hp, g = make_hp(bias, **hp_over), make_gates(bias, delta)
    pred, target = as_jnp(*point(r))
    np.testing.assert_allclose(bias.residual_map(pred, target, hp, g), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("rk", sorted(CLOSED_FORM_R))
@pytest.mark.parametrize("p", P_VALUES)
def test_lp_exact_closed_form(p, rk):
    r = CLOSED_FORM_R[rk]
    _check_phi(B.lp_bias(smooth=False), {"p": p}, r, _phi_lp(r, p))


@pytest.mark.parametrize("a, eps", [(SMOOTH_A, SMOOTH_EPS), (3.0, 1e-2)])
@pytest.mark.parametrize("rk", sorted(CLOSED_FORM_R))
@pytest.mark.parametrize("p", P_VALUES)
def test_lp_smooth_closed_form(p, rk, a, eps):
    r = CLOSED_FORM_R[rk]
    _check_phi(B.lp_bias(), {"p": p, "a": a, "eps": eps}, r, _phi_lp_smooth(r, p, a, eps))


def test_lp_default_is_smooth_p3():
    bias = B.lp_bias()
    hp = bias.default_hparams()
    assert bias.smooth and hp["p"] == 3.0 and hp["a"] == SMOOTH_A and hp["eps"] == SMOOTH_EPS
    r = CLOSED_FORM_R["outside"]
    _check_phi(bias, {}, r, _phi_lp_smooth(r, 3.0, SMOOTH_A, SMOOTH_EPS))


@pytest.mark.parametrize("delta_scale", [1.0, 2.5])
@pytest.mark.parametrize("rk", sorted(CLOSED_FORM_R))
@pytest.mark.parametrize("form", B.HUBER_FORMS)
def test_huber_exact_closed_form(form, rk, delta_scale):
    r = CLOSED_FORM_R[rk]
    d = delta_scale * DELTA
    _check_phi(B.huber_bias(form, smooth=False), {"delta_scale": delta_scale}, r, _phi_huber(form, r, d))


def test_delta_scale_multiplies_delta_gate():
    """``delta = delta_scale * gate``: (scale 2, gate 0.35) acts like (scale 1, gate 0.7) and not
    like (scale 1, gate 0.35); r = [0.5, -1.0] clips differently at 0.35 and 0.7."""
    bias = B.huber_bias("coordinate", smooth=False)
    pred, target = as_jnp(*point(np.array([0.5, -1.0])))
    phi = lambda scale, gate: bias.residual_map(pred, target, make_hp(bias, delta_scale=scale),
                                                {"delta": jnp.asarray(gate)})
    np.testing.assert_allclose(phi(2.0, 0.35), [0.5, -0.7], rtol=RTOL)
    np.testing.assert_allclose(phi(1.0, 0.35), [0.35, -0.35], rtol=RTOL)


def test_yaad_is_switch_form():
    assert B.yaad_bias().form == "switch" and B.yaad_bias(smooth=False).smooth is False
    r = CLOSED_FORM_R["outside"]
    _check_phi(B.yaad_bias(smooth=False), {}, r, DELTA * np.sign(r))


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("rk", sorted(CLOSED_FORM_R))
def test_robust_exact_closed_form(rk, shift):
    r = CLOSED_FORM_R[rk]
    _check_phi(B.robust_bias(smooth=False), {"shift": shift}, r, (1.0 + shift / np.linalg.norm(r)) * r)


@pytest.mark.parametrize("rk", sorted(CLOSED_FORM_R))
def test_simple_biases_closed_form(rk):
    r = CLOSED_FORM_R[rk]
    pred, target = point(r)
    _check_phi(B.dot_bias(), {}, r, -target)
    _check_phi(B.l2_bias(), {}, r, r)
    _check_phi(B.l1_bias(smooth=False), {}, r, np.sign(r))
    _check_phi(B.l1_bias(), {}, r, np.tanh(SMOOTH_A * r))


# --- 3. check_grads (float64) ----------------------------------------------------------------

def _check_bias_grads(bias, hp, g, pred, target, order, eps=FD_EPS):
    for fn in (bias.residual_map, bias.loss):
        check_grads(lambda x: fn(x, target, hp, g), (pred,), order=order, modes=("fwd", "rev"),
                    atol=GRAD_ATOL, rtol=GRAD_RTOL, eps=eps)


@pytest.mark.parametrize("kind", sorted(BANDS))
@pytest.mark.parametrize("case", sorted(EXACT))
def test_exact_grads_away_from_kinks(x64, case, kind, seed=SEEDS[0]):
    """Exact mode is smooth away from the kinks: first and second derivatives match FD there."""
    bias, over = EXACT[case]
    pred, target = as_jnp(*point(residual_away_from_kinks(kind, seed), seed))
    assert pred.dtype == jnp.float64
    _check_bias_grads(bias, make_hp(bias, **over), make_gates(bias), pred, target, order=2)


def _near_kink_points():
    """Smooth-mode points at r = 0 and next to the kinks; id -> (case ids, r)."""
    u = np.array([0.3, -0.5, 0.2, 0.6, -0.4, 0.1])
    u_hat = u / np.linalg.norm(u)
    pts = {"r0": (tuple(SMOOTH), np.zeros(D_V)),
           "lp_some_zero": (tuple(c for c in SMOOTH if c.startswith(("lp", "l1"))),
                            np.array([0.0, 0.4, -1.1, 0.0, 0.02, -0.3]))}
    for sgn, tag in ((-1, "below"), (1, "above")):
        pts[f"coord_{tag}"] = (("huber_coordinate",),
                               np.array([DELTA + sgn * KINK_MARGIN, -(DELTA + sgn * KINK_MARGIN),
                                         0.1, -1.5, 0.0, 0.3]))
        pts[f"norm_{tag}"] = (("huber_norm", "huber_switch", "yaad", "robust"),
                              (DELTA + sgn * KINK_MARGIN) * u_hat)
    return [pytest.param(case, r, id=f"{case}-{pid}") for pid, (cases, r) in pts.items() for case in cases]


@pytest.mark.parametrize("case, r", _near_kink_points())
def test_smooth_grads_at_zero_and_near_kinks(x64, case, r):
    bias, over = SMOOTH[case]
    pred, target = as_jnp(*point(r))
    eps = FD_EPS_AT_ZERO if np.any(r == 0) else FD_EPS
    _check_bias_grads(bias, make_hp(bias, **over), make_gates(bias), pred, target, order=2, eps=eps)


EXACT_AT_ZERO = ["lp1.0", "lp1.5", "l1", *NORM_BASED]
R_WITH_ZEROS = {"all_zero": np.zeros(D_V), "some_zero": np.array([0.0, 0.4, -1.1, 0.0, 0.2, -0.3])}


def _at_zero(case, rk):
    bias, over = EXACT[case]
    hp, g = make_hp(bias, **over), make_gates(bias)
    r = R_WITH_ZEROS[rk]
    pred, target = as_jnp(*point(r))
    return (lambda x: bias.residual_map(x, target, hp, g)), (lambda x: bias.loss(x, target, hp, g)), pred, r


@pytest.mark.parametrize("rk", sorted(R_WITH_ZEROS))
@pytest.mark.parametrize("case", EXACT_AT_ZERO)
def test_exact_derivatives_finite_at_zero(case, rk):
    """At the kink r = 0 finite differences are meaningless; the derivatives must at least be
    finite (no NaN / inf from ``|r|^(p-1)``, ``r / ||r||``), and phi = p sign(0)... = 0 there."""
    phi, loss, pred, r = _at_zero(case, rk)
    derivs = {"jacfwd phi": jax.jacfwd(phi)(pred), "jacrev phi": jax.jacrev(phi)(pred),
              "grad loss": jax.grad(loss)(pred), "hessian loss": jax.hessian(loss)(pred)}
    for name, val in derivs.items():
        assert np.all(np.isfinite(val)), f"{name} not finite at r with zeros: {val}"
    np.testing.assert_array_equal(np.asarray(phi(pred))[r == 0], 0.0)


@pytest.mark.parametrize("case, rk", [(c, rk) for c in EXACT_AT_ZERO for rk in sorted(R_WITH_ZEROS)])
def test_exact_loss_grad_is_zero_at_kinks(case, rk):
    """bias.py: exact mode uses 'the true sign / abs, with a zero derivative at the kinks'."""
    phi, loss, pred, r = _at_zero(case, rk)
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(pred))[r == 0], 0.0)


@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_grads_wrt_p(x64, p, smooth):
    """``p`` is a traced array leaf (vmapped over in sweeps): derivatives w.r.t. it are right."""
    bias = B.lp_bias(smooth=smooth)
    r = CLOSED_FORM_R["zeros" if smooth else "outside"]  # exact mode: keep |r| > 0
    pred, target = as_jnp(*point(r))
    hp, g = make_hp(bias), make_gates(bias)
    for fn in (bias.residual_map, bias.loss):
        check_grads(lambda p_: fn(pred, target, {**hp, "p": p_}, g), (jnp.asarray(p),), order=2,
                    modes=("fwd", "rev"), atol=GRAD_ATOL, rtol=GRAD_RTOL, eps=FD_EPS)


def test_vmap_over_p_matches_loop():
    bias = B.lp_bias()
    pred, target = as_jnp(*point(CLOSED_FORM_R["zeros"]))
    hp = make_hp(bias)
    ps = jnp.asarray(P_VALUES)
    out = jax.vmap(lambda p: bias.residual_map(pred, target, {**hp, "p": p}, {}))(ps)
    loop = np.stack([bias.residual_map(pred, target, {**hp, "p": p}, {}) for p in ps])
    np.testing.assert_allclose(out, loop, rtol=RTOL, atol=ATOL)


# --- 4. validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("bias, bad, name", [
    (B.lp_bias(), {"p": 0.5}, "p"),
    (B.lp_bias(smooth=False), {"p": -1.0}, "p"),
    (B.lp_bias(), {"a": 0.0}, "a"),
    (B.l1_bias(), {"eps": -1e-3}, "eps"),
    (B.huber_bias(), {"delta_scale": 0.0}, "delta_scale"),
    (B.robust_bias(), {"shift": -0.1}, "shift"),
])
def test_validate_rejects_bad_hparams(bias, bad, name):
    good = make_hp(bias)
    assert bias.validate(good) is None  # the defaults are valid
    with pytest.raises(ValueError, match=rf"hyper-parameter {name} must be"):
        bias.validate({**good, **{k: jnp.asarray(v) for k, v in bad.items()}})


def test_lp_validate_accepts_p_equal_1():
    bias = B.lp_bias()
    assert bias.validate(make_hp(bias, p=1.0)) is None


@pytest.mark.parametrize("make", [lambda: B.huber_bias("bogus"), lambda: B.huber_bias("l2", smooth=False),
                                  lambda: B.HuberBias(form="Norm")])
def test_invalid_huber_form_raises(make):
    with pytest.raises(ValueError, match="Huber form"):
        make()
