"""Attentional biases: the inner loss ``l(pred, target)`` of the memory and its residual map.

A bias gives ``loss(pred, target) -> scalar`` and ``residual_map(pred, target) -> [v]``, the
derivative of the loss with respect to the prediction (for the smooth surrogates, the paper's
surrogate of that derivative). The memory gradient is then a VJP of the memory at the prediction:
``grad_W l = (dM/dW)^T phi(r)``; for matrix memory ``phi(r) k^T`` (Miras, arXiv 2504.13173).

Conventions (ours where the paper leaves room): ``r = pred - target``; ``l2 = 1/2 ||r||^2``; ``lp = ||r||_p^p``;
``l1 = ||r||_1``. Smooth surrogates (``smooth=True``, the default of l_p and Huber):
``sign(x) ~ tanh(a x)``, ``|x| ~ sqrt(x^2 + eps)``, hyper-parameters ``a`` (10) and ``eps`` (1e-6).
``smooth=None`` (or False) uses the true sign / abs, with a zero derivative at the kinks.

Numeric hyper-parameters (``p``, ``a``, ``eps``, ``delta_scale``, ``shift``) are array leaves of
``MirasSpec.hparams["bias"]`` so they can be vmapped; per-token thresholds come as the gate
``"delta"``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from miras_jax._checks import check_range


# --- smooth / exact primitives -------------------------------------------------------------

def sign_fn(x, hp, smooth: bool):
    """``tanh(a x)`` if smooth else ``sign(x)``."""
    return jnp.tanh(hp["a"] * x) if smooth else jnp.sign(x)


def abs_fn(x, hp, smooth: bool):
    """``sqrt(x^2 + eps)`` if smooth else ``|x|`` (written ``sign(x) x``: derivative 0 at 0)."""
    return jnp.sqrt(x * x + hp["eps"]) if smooth else jnp.sign(x) * x


def norm_fn(r, hp, smooth: bool):
    """``sqrt(||r||^2 + eps)`` if smooth else ``||r||_2`` (derivative 0 at ``r = 0``)."""
    sq = jnp.sum(r * r, axis=-1)
    if smooth:
        return jnp.sqrt(sq + hp["eps"])
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def safe_pow(x, e):
    """``x ** e`` for ``x >= 0`` with finite derivatives at ``x = 0`` (value ``0 ** e``, 1 if e = 0)."""
    pos = x > 0
    safe = jnp.where(pos, x, 1.0)
    return jnp.where(pos, safe ** e, jnp.where(e == 0, 1.0, 0.0))


def _smooth_flag(smooth) -> bool:
    return bool(smooth)


# --- biases ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DotBias:
    """Dot-product similarity ``l = -<pred, target>``; ``phi = -target`` (linear attention)."""

    exact_family: ClassVar[str | None] = "hebbian"  # planner trait: a matrix memory's exact chunk form
    residual_kind: ClassVar[str] = "dot"            # planner trait: the kernels' name of phi

    gates: tuple = ()

    def default_hparams(self):
        return {}

    def validate(self, hp):
        return None

    def loss(self, pred, target, hp, g):
        return -jnp.sum(pred * target)

    def residual_map(self, pred, target, hp, g):
        return -target


@dataclasses.dataclass(frozen=True)
class L2Bias:
    """``l = 1/2 ||r||^2``; ``phi = r`` (delta rule, TTT, Titans, Memora)."""

    exact_family: ClassVar[str | None] = "delta"
    residual_kind: ClassVar[str] = "l2"

    gates: tuple = ()

    def default_hparams(self):
        return {}

    def validate(self, hp):
        return None

    def loss(self, pred, target, hp, g):
        r = pred - target
        return 0.5 * jnp.sum(r * r)

    def residual_map(self, pred, target, hp, g):
        return pred - target


@dataclasses.dataclass(frozen=True)
class LpBias:
    """``l = ||r||_p^p`` (Eq. 10-12); ``phi = p sign(r) |r|^(p-1)``, any real ``p >= 1``.

    Smooth: ``phi = p tanh(a r) (r^2 + eps)^((p-1)/2)``, ``l = sum (r^2 + eps)^(p/2)``.
    """

    exact_family: ClassVar[str | None] = None
    residual_kind: ClassVar[str] = "lp"

    smooth: bool = True
    gates: tuple = ()

    def default_hparams(self):
        return {"p": 3.0, "a": 10.0, "eps": 1e-6}

    def validate(self, hp):
        check_range("p", hp["p"], low=1.0, what=" (l_p bias)")
        check_range("a", hp["a"], low=0.0, low_open=True)
        check_range("eps", hp["eps"], low=0.0)

    def loss(self, pred, target, hp, g):
        r = pred - target
        return jnp.sum(safe_pow(abs_fn(r, hp, self.smooth), hp["p"]))

    def residual_map(self, pred, target, hp, g):
        r = pred - target
        p = hp["p"]
        return p * sign_fn(r, hp, self.smooth) * safe_pow(abs_fn(r, hp, self.smooth), p - 1.0)


@dataclasses.dataclass(frozen=True)
class L1Bias:
    """``l = ||r||_1``; ``phi = sign(r)`` (smooth: ``tanh(a r)``): writes only the error's sign."""

    exact_family: ClassVar[str | None] = None
    residual_kind: ClassVar[str] = "l1"

    smooth: bool = True
    gates: tuple = ()

    def default_hparams(self):
        return {"a": 10.0, "eps": 1e-6}

    def validate(self, hp):
        check_range("a", hp["a"], low=0.0, low_open=True)
        check_range("eps", hp["eps"], low=0.0)

    def loss(self, pred, target, hp, g):
        return jnp.sum(abs_fn(pred - target, hp, self.smooth))

    def residual_map(self, pred, target, hp, g):
        return sign_fn(pred - target, hp, self.smooth)


HUBER_FORMS = ("coordinate", "norm", "switch")


@dataclasses.dataclass(frozen=True)
class HuberBias:
    """Huber loss with threshold ``delta = delta_scale * gate["delta"]`` (Eq. 13-16).

    ``H(a) = a^2/2`` if ``|a| <= delta`` else ``delta (|a| - delta/2)``.
      * ``"coordinate"``: ``sum_i H(r_i)``; ``phi_i = r_i`` if ``|r_i| <= delta`` else ``delta sign(r_i)``.
      * ``"norm"``: ``H(||r||)``; ``phi = r`` if ``||r|| <= delta`` else ``delta r / ||r||``
        (per-token clipping of the residual).
      * ``"switch"`` (Yaad, Eq. 16): ``phi = r`` if ``||r|| <= delta`` else ``delta sign(r)``
        (the l2 gradient, or ``delta`` times the l1 gradient).
    """

    form: str = "switch"
    smooth: bool = True
    gates: tuple = ("delta",)

    exact_family: ClassVar[str | None] = None

    @property
    def residual_kind(self) -> str:
        return f"huber_{self.form}"

    def __post_init__(self):
        if self.form not in HUBER_FORMS:
            raise ValueError(f"unknown Huber form {self.form!r}; valid: {HUBER_FORMS}")

    def default_hparams(self):
        return {"delta_scale": 1.0, "a": 10.0, "eps": 1e-6}

    def validate(self, hp):
        check_range("delta_scale", hp["delta_scale"], low=0.0, low_open=True)
        check_range("a", hp["a"], low=0.0, low_open=True)
        check_range("eps", hp["eps"], low=0.0)

    def _delta(self, hp, g):
        return hp["delta_scale"] * g["delta"]

    def loss(self, pred, target, hp, g):
        r = pred - target
        d = self._delta(hp, g)
        if self.form == "coordinate":
            a = abs_fn(r, hp, self.smooth)
            return jnp.sum(jnp.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d)))
        n = norm_fn(r, hp, self.smooth)
        if self.form == "norm":
            return jnp.where(n <= d, 0.5 * n * n, d * (n - 0.5 * d))
        return jnp.where(n <= d, 0.5 * n * n, d * jnp.sum(abs_fn(r, hp, self.smooth)))

    def residual_map(self, pred, target, hp, g):
        r = pred - target
        d = self._delta(hp, g)
        if self.form == "coordinate":
            small = abs_fn(r, hp, self.smooth) <= d
            return jnp.where(small, r, d * sign_fn(r, hp, self.smooth))
        n = norm_fn(r, hp, self.smooth)
        small = n <= d
        if self.form == "norm":
            return jnp.where(small, r, d * r / jnp.where(small, 1.0, n))
        return jnp.where(small, r, d * sign_fn(r, hp, self.smooth))


@dataclasses.dataclass(frozen=True)
class RobustBias:
    """Robust to value shifts of size ``Delta = shift`` (Eq. 17).

    ``l = 1/2 ||r||^2 + Delta ||r|| + Delta^2 / 2``; ``phi = (1 + Delta / ||r||) r``.
    """

    exact_family: ClassVar[str | None] = None
    residual_kind: ClassVar[str] = "robust"

    smooth: bool = True
    gates: tuple = ()

    def default_hparams(self):
        return {"shift": 0.1, "eps": 1e-6, "a": 10.0}

    def validate(self, hp):
        check_range("shift", hp["shift"], low=0.0)
        check_range("eps", hp["eps"], low=0.0)

    def loss(self, pred, target, hp, g):
        r = pred - target
        n = norm_fn(r, hp, self.smooth)
        s = hp["shift"]
        return 0.5 * jnp.sum(r * r) + s * n + 0.5 * s * s

    def residual_map(self, pred, target, hp, g):
        r = pred - target
        n = norm_fn(r, hp, self.smooth)
        return r + hp["shift"] * r / jnp.where(n > 0, n, 1.0)


@dataclasses.dataclass(frozen=True)
class OmegaBias:
    """The Omega rule (Atlas, arXiv 2505.23735): ``base``'s per-token loss over a window of the last
    ``window = c`` tokens, weighted by the gate ``omega`` (``gamma_i`` in [0, 1]): the inner gradient
    at token t is ``g_t = sum_{i = max(1, t-c+1)}^{t} gamma_i grad_W l(W; k_i, v_i)`` at one point
    ``W``. Tokens before the sequence (or, packed, the document) start are not in the window.

    The engines feed ``window_inputs`` (``engine/window.py``: per token ``k [c, d]``, ``v [c, v]``,
    gates ``[c]``, oldest first, out-of-window weights 0); ``loss`` / ``residual_map`` are the
    base's per token. ``c = 1`` with ``gamma = 1`` is the base bias exactly."""

    base: object
    window: int = 4
    exact_family: ClassVar[str | None] = None   # the engines lower window 1 to the base bias

    def __post_init__(self):
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"the Omega window must be an int >= 1, got {self.window!r}")
        if isinstance(self.base, OmegaBias):
            raise ValueError("an Omega bias cannot wrap another Omega bias")

    @property
    def gates(self) -> tuple:
        return tuple(self.base.gates) + ("omega",)

    @property
    def residual_kind(self) -> str:
        return self.base.residual_kind

    @property
    def smooth(self):
        return getattr(self.base, "smooth", True)

    def default_hparams(self):
        return self.base.default_hparams()

    def validate(self, hp):
        return self.base.validate(hp)

    def loss(self, pred, target, hp, g):
        return self.base.loss(pred, target, hp, g)

    def residual_map(self, pred, target, hp, g):
        return self.base.residual_map(pred, target, hp, g)


def window_of(bias) -> int:
    """The attentional bias's window (1 for every bias but :class:`OmegaBias`)."""
    return getattr(bias, "window", None) or 1


# --- factories ------------------------------------------------------------------------------

def dot_bias() -> DotBias:
    return DotBias()


def l2_bias() -> L2Bias:
    return L2Bias()


def l1_bias(smooth=True) -> L1Bias:
    return L1Bias(smooth=_smooth_flag(smooth))


def lp_bias(smooth=True) -> LpBias:
    return LpBias(smooth=_smooth_flag(smooth))


def huber_bias(form: str = "coordinate", smooth=True) -> HuberBias:
    return HuberBias(form=form, smooth=_smooth_flag(smooth))


def yaad_bias(smooth=True) -> HuberBias:
    """Yaad's per-token switch between the l2 and ``delta * l1`` gradients (Eq. 16)."""
    return HuberBias(form="switch", smooth=_smooth_flag(smooth))


def robust_bias(smooth=True) -> RobustBias:
    return RobustBias(smooth=_smooth_flag(smooth))


def omega_bias(base=None, window: int = 4) -> OmegaBias:
    """The Omega rule over ``window`` tokens around ``base`` (default l2); see :class:`OmegaBias`."""
    return OmegaBias(base=L2Bias() if base is None else base, window=window)
