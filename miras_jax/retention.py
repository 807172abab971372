"""Retention gates as mirror maps (the Miras paper's Sec. 5.2).

Every retention gate here updates the memory in a *dual* space::

    z_{t-1} = to_dual(W_{t-1})        (or the accumulator A_{t-1}, if ``accumulate``)
    z_t     = a_t * z_{t-1} + u_t      (a_t: decay / alpha_t; u_t: the optimizer's update)
    W_t     = from_dual(z_t)

where ``u_t = -eta_t grad l(W_{t-1})`` for plain GD. With ``anchor=True`` the global retention pulls
toward the initial memory instead of toward zero (``||W - W_0||`` in place of ``||W||``)::

    z_t     = a_t z_{t-1} + (1 - a_t) z_* + u_t,   z_* = to_dual(W_0)  (A_0 = W_0 if ``accumulate``)

For a zero-initialised matrix memory that is the same equation. For an MLP memory behind a
LayerNorm it is what keeps the recurrence non-chaotic: decaying toward zero shrinks ``W`` while
the LayerNorm keeps the output scale, so the effective step ``~ eta / ||W||^2`` grows without bound
(a positive Lyapunov exponent, which ``experiments/lyapunov.py`` measures).
The choice of ``(to_dual, from_dual)`` gives:

| gate                | dual       | primal                      | equation                          |
|---------------------|------------|-----------------------------|-----------------------------------|
| ``none``            | W          | W                           | ``W_t = W_{t-1} + u``             |
| ``decay`` (l2)      | W          | W                           | ``W_t = a W_{t-1} + u``           |
| ``lq`` (Moneta)     | A (kept)   | ``A / ||A||_q^(q-2)``       | FTRL with ``||W||_q^2``           |
| ``kl`` (Memora)     | log W      | ``c softmax(z)`` per row    | Eq. 18-21, 27                     |
| ``elastic_net``     | W          | ``S_gamma(z)``              | Eq. 22 (learning-retaining form)  |
| ``elastic_net_ftrl``| A (kept)   | ``S_gamma(A)``              | Eq. 23                            |
| ``sigmoid``         | logit W    | ``sigmoid(z)``              | Bregman / logit map               |

``a_t`` is a scalar or (matrix memory only) a ``[k]`` vector that scales the key channels
(``W Diag(a)``). Its source is the gate ``"decay"``, a constant hyper-parameter ``decay``
(RetNet), or nothing (``a = 1``). Maps act per weight matrix (``[out, in]`` leaf) and per row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from miras_jax._checks import check_range, concrete

DECAY_SOURCES = ("gate", "hparam", "none")


# Moneta's exposed weights are ``W = A / ||A||_q^(q-2)``, so ``||W||_q = ||A||_q^(3-q)``: at q = 4 they
# grow as the accumulator decays. In MQAR training (learned decays down to 0.003 per token) one
# MLP layer's accumulator fell to 1e-9 while its weights reached 6e7 and the backward overflowed
# to NaN; the other layer's accumulator grew (a feedback loop through the memory's LayerNorm).
# The floor caps ``||W||_q`` at ``floor^(3-q)`` (100 at q = 4) and is far below the norm of a
# freshly initialised MLP layer (~1.5), so it only acts on a memory that has been decayed away.
LQ_NORM_FLOOR = 1e-2


def _tree_decay(z, a):
    """``a * z`` leafwise; ``a`` scalar or ``[k]`` (broadcast on the last axis)."""
    if a is None:
        return z
    return jax.tree.map(lambda x: a * x, z)


def soft_threshold(z, gamma):
    """``S_gamma(z) = sign(z) max(0, |z| - gamma)``."""
    return jnp.sign(z) * jnp.maximum(jnp.abs(z) - gamma, 0.0)


def _log_abs_pow(a, q):
    """``(log|a|, |a|^q)`` with ``|a|^q = exp(q log|a|)``, and ``0`` (not NaN) where ``a = 0``."""
    nz = a != 0
    log_abs = jnp.log(jnp.where(nz, jnp.abs(a), 1.0))
    return nz, log_abs, jnp.where(nz, jnp.exp(q * log_abs), 0.0)


@jax.custom_jvp
def abs_pow_sum(a, q):
    """``sum |a|^q`` (``q > 1``) over every entry of ``a``.

    Its JVP reuses ``log|a|`` and ``|a|^q`` from the primal: ``d/da = q |a|^q / a`` and
    ``d/dq = sum |a|^q log|a|`` cost no further ``exp`` / ``log`` (plain autodiff of ``|a| ** q``
    evaluates ``pow`` three times; this was most of Moneta's chunked backward).
    """
    return jnp.sum(_log_abs_pow(a, q)[2])


@abs_pow_sum.defjvp
def _abs_pow_sum_jvp(primals, tangents):
    a, q = primals
    da, dq = tangents
    nz, log_abs, p = _log_abs_pow(a, q)
    d_a = jnp.where(nz, q * p / jnp.where(nz, a, 1.0), 0.0)  # = q sign(a) |a|^(q-1)
    return jnp.sum(p), jnp.sum(d_a * da) + jnp.sum(p * log_abs) * dq


def static_int(q, low: int = 2, high: int = 16) -> int | None:
    """``q`` as a Python int when it is a concrete (untraced) scalar integer in ``[low, high]``,
    else ``None`` (a traced ``q``: ``jax.vmap`` over a grid, a differentiated or ``jit`` argument)."""
    val = None if q is None else concrete(q)
    if val is None or val.ndim != 0:
        return None
    qf = float(val)
    return int(qf) if qf.is_integer() and low <= qf <= high else None


def int_pow_sum(a, q: int):
    """``sum |a|^q`` for a static integer ``q``: repeated multiplication (``lax.integer_pow``), no
    ``exp`` / ``log`` in the value or its gradient (:func:`abs_pow_sum` is the traced-``q`` form)."""
    return jnp.sum(a ** q if q % 2 == 0 else jnp.abs(a) ** q)


def lq_scale(a, q, floor=0.0):
    """``max(||A||_q, floor)^-(q-2)`` for one matrix, ``||A||_q = (sum |A|^q)^(1/q)``; for ``A = 0``
    it is ``floor^-(q-2)`` (1 if ``floor = 0``).

    Computed as ``||A||_q = m ||A / m||_q`` with ``m = max|A|`` (held constant under autodiff: the
    value does not depend on it), so ``sum |A/m|^q`` lies in ``[1, numel]``: ``sum |A|^q`` itself
    underflows float32 once ``max|A| < ~1e-10`` at ``q = 4`` (it did in a Moneta run whose decays
    shrank one layer's accumulator), which made the scale jump to 1 and its gradient NaN.

    ``floor`` bounds the exposed weights ``W = s(A) A``: without it ``||W||_q = ||A||_q^(3-q)``,
    unbounded as ``A -> 0`` for ``q > 3``; with it ``||W||_q <= floor^(3-q)`` (``LQ_NORM_FLOOR``).
    A concrete integer ``q`` (:func:`static_int`) takes :func:`int_pow_sum` (same value, no ``exp`` /
    ``log`` per entry: that was ~10% of Moneta's chunked forward + backward on the CPU).
    """
    return lq_scale_from_sums(*lq_sums(a, q), q, floor)


def lq_sums(a, q):
    """``(m, S)`` of :func:`lq_scale`: ``m = max|A|`` (no gradient), ``S = sum |A/m|^q`` (``A/1`` if
    ``A = 0``)."""
    m = jax.lax.stop_gradient(jnp.max(jnp.abs(a)))
    mm = jnp.where(m > 0, m, 1.0)
    qi = static_int(q)
    return m, (abs_pow_sum(a / mm, q) if qi is None else int_pow_sum(a / mm, qi))


def lq_scale_from_sums(m, S, q, floor=0.0):
    """:func:`lq_scale` from its two sums (scalars): ``log ||A||_q = log m + log(S) / q``."""
    pos = m > 0
    qi = static_int(q)
    q = q if qi is None else qi
    log_norm = jnp.log(jnp.where(pos, m, 1.0)) + jnp.log(jnp.where(pos, S, 1.0)) / q
    has_floor = floor > 0
    log_floor = jnp.log(jnp.where(has_floor, floor, 1.0))
    log_norm = jnp.where(has_floor, jnp.where(pos, jnp.maximum(log_norm, log_floor), log_floor), log_norm)
    return jnp.where(pos | has_floor, jnp.exp(-(q - 2.0) * log_norm), 1.0)


def lq_normalize(a, q, floor=0.0):
    """``A / max(||A||_q, floor)^(q-2)`` for one matrix; 0 stays 0."""
    return a * lq_scale(a, q, floor)


def simplex_softmax(z, c=None):
    """``c softmax(z)`` over the last axis (each row); ``c`` defaults to the row length."""
    c = z.shape[-1] if c is None else c
    return c * jax.nn.softmax(z, axis=-1)


def simplex_softmax_vjp(w, g, c=None):
    """VJP of :func:`simplex_softmax` from its output ``w``: ``dz = w g - w sum(w g) / c`` per row."""
    c = w.shape[-1] if c is None else c
    wg = w * g
    return wg - w * (jnp.sum(wg, axis=-1, keepdims=True) / c)


@dataclasses.dataclass(frozen=True)
class Retention:
    """A retention gate: ``z_t = a_t z_{t-1} + u_t`` in the dual space, ``W_t = from_dual(z_t)``.

    Subclasses set ``to_dual`` / ``from_dual``; ``accumulate=True`` keeps ``z`` (the accumulator
    ``A_t``, with ``A_0 = W_0``) in the retention state instead of recomputing it from ``W``.
    ``anchor=True``: ``z_t = a_t z_{t-1} + (1 - a_t) z_* + u_t`` with ``z_* = to_dual(W_0)`` held in
    the retention state (module docstring); the state is then ``{"acc": A or (), "anchor": z_*}``.
    """

    decay_source: str = "gate"
    name: str = "decay"
    accumulate: bool = False
    domain: str = "real"  # "real" | "positive" | "unit_interval": where W must live
    anchor: bool = False

    def __post_init__(self):
        if self.decay_source not in DECAY_SOURCES:
            raise ValueError(f"decay_source must be one of {DECAY_SOURCES}, got {self.decay_source!r}")

    @property
    def gates(self) -> tuple:
        return ("decay",) if self.decay_source == "gate" else ()

    def default_hparams(self) -> dict:
        return {"decay": 1.0} if self.decay_source == "hparam" else {}

    def validate(self, hp) -> None:
        if self.decay_source == "hparam":
            check_range("decay", hp["decay"], low=0.0, high=1.0, low_open=True)

    # Planner traits (engine/plan.py). ``map_kind`` names the mirror map ``from_dual``:
    # "identity" (W = z: the exact chunk forms apply), "lq", "kl", "soft_threshold", "sigmoid".
    # ``chunk_mode``: how the mini-batch engine treats the map inside a chunk (engine/minibatch/chunk.py):
    # "linear": identity maps, exact; "scale": W = s(A) A with s refreshed at chunk ends (l_q);
    # "lag": exact step on the chunk's first token, then the linear (primal) form (Memora);
    # None: no chunk form (token engine only).
    map_kind: ClassVar[str] = "identity"
    chunk_mode = "linear"

    def to_dual(self, params, hp):
        return params

    def from_dual(self, z, hp):
        return z

    def project(self, params):
        """Clamp into the map's domain before ``to_dual`` (used after linear in-chunk steps)."""
        return params

    def check_params(self, params) -> None:
        """Raise ``ValueError`` if (concrete) memory params lie outside this gate's domain."""
        if self.domain == "real":
            return
        for leaf in jax.tree.leaves(params):
            val = concrete(leaf)
            if val is None:
                continue
            if self.domain == "positive" and not np.all(val > 0):
                raise ValueError(
                    f"retention {self.name!r} needs a strictly positive memory (it works with log W); "
                    f"got min {val.min():.3g}. Initialise with init='simplex'.")
            if self.domain == "unit_interval" and not np.all((val > 0) & (val < 1)):
                raise ValueError(
                    f"retention {self.name!r} needs memory entries in (0, 1) (it works with logit W); "
                    f"got range [{val.min():.3g}, {val.max():.3g}]. Initialise with init='unit_interval'.")

    def decay_value(self, gates_t, hp):
        """The decay ``a_t`` for this token (``None`` = no decay)."""
        if self.decay_source == "gate":
            return gates_t["decay"]
        if self.decay_source == "hparam":
            return hp["decay"]
        return None

    def init(self, params, hp) -> Any:
        """Retention state: the accumulator ``A_0 = W_0`` if ``accumulate``, else ``()``; with
        ``anchor``, ``{"acc": that, "anchor": z_* = to_dual(W_0)}`` (``A_0`` itself if ``accumulate``)."""
        acc = params if self.accumulate else ()
        if not self.anchor:
            return acc
        return {"acc": acc, "anchor": params if self.accumulate else self.to_dual(params, hp)}

    def acc(self, state):
        """The accumulator ``A`` held in a retention ``state`` (``()`` if none)."""
        return state["acc"] if self.anchor else state

    def anchor_of(self, state):
        """The dual anchor ``z_*`` held in a retention ``state`` (``None`` without ``anchor``)."""
        return state["anchor"] if self.anchor else None

    def with_anchor(self, state, z_anchor):
        """``state`` with its anchor ``z_*`` replaced (``state`` itself without ``anchor``)."""
        return {**state, "anchor": z_anchor} if self.anchor else state

    def with_acc(self, state, acc):
        """``state`` with its accumulator replaced by ``acc``."""
        return {"acc": acc, "anchor": state["anchor"]} if self.anchor else acc

    def retain(self, z, decay, z_anchor):
        """``a z + (1 - a) z_*`` leafwise (``a z`` without an anchor; ``z`` without a decay)."""
        if decay is None:
            return z
        if z_anchor is None:
            return _tree_decay(z, decay)
        return jax.tree.map(lambda x, x0: x0 + decay * (x - x0), z, z_anchor)

    def step(self, params, state, updates, decay, hp):
        """``(W_{t-1}, state, u_t, a_t) -> (W_t, state_t)``; ``updates=None`` means ``u = 0``."""
        z = self.acc(state) if self.accumulate else self.to_dual(params, hp)
        z = self.retain(z, decay, self.anchor_of(state))
        if updates is not None:
            z = jax.tree.map(jnp.add, z, updates)
        new = self.from_dual(z, hp)
        return new, (self.with_acc(state, z) if self.accumulate else state)


@dataclasses.dataclass(frozen=True)
class LqRetention(Retention):
    """Moneta's l_q retention: ``A_t = a A_{t-1} + u``, ``W_t = A_t / max(||A_t||_q, f)^(q-2)``,
    ``q >= 2``, norm floor ``f >= 0`` (hparam ``norm_floor``, default ``LQ_NORM_FLOOR``; 0 is the
    paper's map exactly)."""

    name: str = "lq"
    accumulate: bool = True
    map_kind: ClassVar[str] = "lq"
    chunk_mode = "scale"

    def scale(self, a, hp):
        """The factor ``s(A) = max(||A||_q, f)^-(q-2)`` of one matrix: ``W = s(A) A``."""
        return lq_scale(a, hp["q"], hp["norm_floor"])

    def default_hparams(self):
        return {**super().default_hparams(), "q": 4.0, "norm_floor": LQ_NORM_FLOOR}

    def validate(self, hp):
        super().validate(hp)
        check_range("q", hp["q"], low=2.0, what=" (l_q retention)")
        check_range("norm_floor", hp["norm_floor"], low=0.0, what=" (l_q retention)")

    def from_dual(self, z, hp):
        return jax.tree.map(lambda a: lq_normalize(a, hp["q"], hp["norm_floor"]), z)


@dataclasses.dataclass(frozen=True)
class KLRetention(Retention):
    """KL retention on the scaled simplex (Memora, Eq. 21 / 27).

    ``W_t = c softmax(a log W_{t-1} + u)`` per row of every weight matrix; ``c`` (static) defaults
    to the row length, so a uniform row is all ones. Needs ``W > 0``.
    """

    name: str = "kl"
    domain: str = "positive"
    c: float | None = None
    map_kind: ClassVar[str] = "kl"
    chunk_mode = "lag"

    def project(self, params):
        return jax.tree.map(lambda w: jnp.maximum(w, 1e-30), params)

    def to_dual(self, params, hp):
        return jax.tree.map(jnp.log, params)

    def from_dual(self, z, hp):
        return jax.tree.map(lambda x: simplex_softmax(x, self.c), z)

    def from_dual_vjp(self, w, g):
        """``dz`` for one matrix from ``w = from_dual(z)`` (no ``hp`` enters the map)."""
        return simplex_softmax_vjp(w, g, self.c)


@dataclasses.dataclass(frozen=True)
class ElasticNetRetention(Retention):
    """Elastic-net retention (Eq. 22): ``W_t = S_gamma(a W_{t-1} + u)``; ``gamma >= 0``.

    With ``accumulate=True`` it is the FTRL form (Eq. 23): ``A_t = a A_{t-1} + u``,
    ``W_t = S_gamma(A_t)``, ``A_0 = W_0``.
    """

    name: str = "elastic_net"
    map_kind: ClassVar[str] = "soft_threshold"

    @property
    def chunk_mode(self):
        return None if self.accumulate else "lag"

    def default_hparams(self):
        return {**super().default_hparams(), "gamma": 1e-3}

    def validate(self, hp):
        super().validate(hp)
        check_range("gamma", hp["gamma"], low=0.0, what=" (soft threshold)")

    def from_dual(self, z, hp):
        return jax.tree.map(lambda x: soft_threshold(x, hp["gamma"]), z)


@dataclasses.dataclass(frozen=True)
class SigmoidRetention(Retention):
    """Bregman (logit) mirror map: ``W_t = sigmoid(a logit(W_{t-1}) + u)``, entries in (0, 1)."""

    name: str = "sigmoid"
    domain: str = "unit_interval"
    map_kind: ClassVar[str] = "sigmoid"
    chunk_mode = "lag"

    def project(self, params):
        return jax.tree.map(lambda w: jnp.clip(w, 1e-6, 1.0 - 1e-6), params)

    def to_dual(self, params, hp):
        return jax.tree.map(lambda w: jnp.log(w) - jnp.log1p(-w), params)

    def from_dual(self, z, hp):
        return jax.tree.map(jax.nn.sigmoid, z)


# --- factories ------------------------------------------------------------------------------

def no_retention() -> Retention:
    """``W_t = W_{t-1} + u`` (linear attention, DeltaNet, Longhorn, TTT)."""
    return Retention(decay_source="none", name="none")


def decay_retention(source: str = "gate", anchor: bool = False) -> Retention:
    """l2 local + global retention: ``W_t = a_t W_{t-1} + u`` (scalar or channel-wise ``a_t``);
    ``anchor``: ``W_t = a_t W_{t-1} + (1 - a_t) W_0 + u``."""
    return Retention(decay_source=source, name="decay", anchor=anchor)


def lq_retention(decay: str = "gate", anchor: bool = False) -> LqRetention:
    """Moneta's l_q retention; ``anchor``: ``A_t = a_t A_{t-1} + (1 - a_t) A_0 + u``."""
    return LqRetention(decay_source=decay, anchor=anchor)


def kl_retention(decay: str = "gate", c: float | None = None, anchor: bool = False) -> KLRetention:
    """Memora's KL retention; ``anchor``: ``log W_t = a_t log W_{t-1} + (1 - a_t) log W_0 + u``
    (before the row softmax)."""
    return KLRetention(decay_source=decay, c=c, anchor=anchor)


def elastic_net_retention(decay: str = "gate") -> ElasticNetRetention:
    return ElasticNetRetention(decay_source=decay, name="elastic_net")


def elastic_net_ftrl_retention(decay: str = "none") -> ElasticNetRetention:
    return ElasticNetRetention(decay_source=decay, name="elastic_net_ftrl", accumulate=True)


def sigmoid_retention(decay: str = "none") -> SigmoidRetention:
    return SigmoidRetention(decay_source=decay)
