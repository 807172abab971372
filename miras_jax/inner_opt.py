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


def gd() -> GD:
    return GD()


def multi_step_gd(num_steps: int = 2) -> GD:
    """``num_steps`` GD steps per token (DeltaProduct)."""
    return GD(num_steps=num_steps, name="multi_step_gd")


def implicit_gd() -> ImplicitGD:
    return ImplicitGD()


def momentum_gd() -> MomentumGD:
    return MomentumGD()
