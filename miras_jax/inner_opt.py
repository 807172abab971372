"""Memory learning algorithms as optax-style pure ``(init, update)`` pairs.

``init(params) -> state`` and ``update(grads, state, params, *, gates, hparams, key) ->
(updates, state)``, where ``gates`` holds this token's gates (``lr`` = eta_t, ``momentum``), and
``updates`` is what the retention gate adds in its dual space (``u_t`` in ``retention.py``).
``hparams["lr_scale"]`` (default 1) multiplies the ``lr`` gate, so inner-rate sweeps vmap.
``num_steps`` (static) is how many steps the engine takes per token (DeltaProduct).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from miras_jax._checks import check_range


@dataclasses.dataclass(frozen=True)
class GD:
    """Gradient descent: ``u_t = -eta_t grad``; with ``num_steps = n`` the engine takes n steps
    per token (DeltaProduct), each with its own key/value and ``lr[t, j]``."""

    # planner trait (engine/plan.py): "gd" (u = -eta grad, eta may depend on the key) or
    # "momentum" (u = S, S = m S - eta grad); the chunk forms and kernels read this, not the class.
    update_form: ClassVar[str] = "gd"
    # planner trait: u is linear in eta_t * grad (a per-token weight on the gradient folds into eta)
    grad_linear: ClassVar[bool] = True

    num_steps: int = 1
    gates: tuple = ("lr",)
    name: str = "gd"

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    def default_hparams(self):
        return {"lr_scale": 1.0}

    def validate(self, hp):
        check_range("lr_scale", hp["lr_scale"], low=0.0)

    def init(self, params):
        return ()

    def lr(self, gates, hparams, key):
        return hparams["lr_scale"] * gates["lr"]

    def update(self, grads, state, params, *, gates, hparams, key=None):
        lr = self.lr(gates, hparams, key)
        return jax.tree.map(lambda g: -lr * g, grads), state


@dataclasses.dataclass(frozen=True)
class ImplicitGD(GD):
    """Implicit (proximal) GD, Longhorn: ``W_t = W_{t-1} - eta grad l(W_t)``.

    For the l2 bias on a matrix memory it has the closed form ``eta' = eta / (1 + eta k^T k)``
    applied to the explicit gradient, which is what this computes (the spec rejects other
    combinations rather than approximating them).
    """

    name: str = "implicit_gd"
    grad_linear: ClassVar[bool] = False   # eta' depends on the key

    def lr(self, gates, hparams, key):
        lr = hparams["lr_scale"] * gates["lr"]
        return lr / (1.0 + lr * jnp.sum(key * key))




@dataclasses.dataclass(frozen=True)
class MomentumGD(GD):
    """GD with momentum (Titans): ``S_t = m_t S_{t-1} - eta_t grad``; ``u_t = S_t``; ``S_0 = 0``."""

    update_form: ClassVar[str] = "momentum"

    gates: tuple = ("lr", "momentum")
    name: str = "momentum_gd"

    def init(self, params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(self, grads, state, params, *, gates, hparams, key=None):
        lr = self.lr(gates, hparams, key)
        m = gates["momentum"]
        s = jax.tree.map(lambda s_, g: m * s_ - lr * g, state, grads)
        return s, s


# Newton-Schulz quintic coefficients (Muon): X <- a X + (b A + c A A) X, A = X X^T
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps: int):
    """``NS(G)`` of one ``[m, n]`` matrix: ``X = G / (||G||_F + 1e-7)``, transposed if ``m > n``,
    then ``steps`` times ``A = X X^T; X = a X + (b A + c A A) X``, transposed back. An approximate
    orthogonalisation (the polar factor ``U V^T`` of ``G``, singular values pushed toward ~1)."""
    a, b, c = NS_COEFFS
    sq = jnp.sum(G * G)
    norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)   # finite gradient at G = 0
    X = G / (norm + 1e-7)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if tall else X


@dataclasses.dataclass(frozen=True)
class Muon(GD):
    """Muon (Atlas): ``S_t = m_t S_{t-1} + g_t`` (``S_0 = 0``), ``u_t = -eta_t NS(S_t)`` per weight
    matrix (:func:`newton_schulz`, ``ns_steps`` static, >= 1); the retention then gives
    ``W_t = a_t W_{t-1} + u_t``. Gates ``lr`` (eta_t), ``momentum`` (m_t); ``lr_scale`` as GD's."""

    update_form: ClassVar[str] = "muon"
    grad_linear: ClassVar[bool] = False   # u is not linear in the gradient: a window weight stays in g

    gates: tuple = ("lr", "momentum")
    name: str = "muon"
    ns_steps: int = 5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.ns_steps, int) or isinstance(self.ns_steps, bool) or self.ns_steps < 1:
            raise ValueError(f"muon needs ns_steps >= 1 Newton-Schulz iterations, got {self.ns_steps!r} "
                             "(ns_steps=0 would be momentum with a normalised step, not Muon)")
        if self.num_steps != 1:
            raise ValueError(f"muon takes one step per token, got num_steps={self.num_steps}")

    def init(self, params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(self, grads, state, params, *, gates, hparams, key=None):
        lr = self.lr(gates, hparams, key)
        s = jax.tree.map(lambda s_, g: gates["momentum"] * s_ + g, state, grads)
        return jax.tree.map(lambda x: -lr * newton_schulz(x, self.ns_steps), s), s


def gd() -> GD:
    return GD()


def multi_step_gd(num_steps: int = 2) -> GD:
    """``num_steps`` GD steps per token (DeltaProduct)."""
    return GD(num_steps=num_steps, name="multi_step_gd")


def implicit_gd() -> ImplicitGD:
    return ImplicitGD()


def momentum_gd() -> MomentumGD:
    return MomentumGD()


def muon(ns_steps: int = 5) -> Muon:
    """Momentum then Newton-Schulz orthogonalisation; see :class:`Muon`."""
    return Muon(ns_steps=ns_steps)
