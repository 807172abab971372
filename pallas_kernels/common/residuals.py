"""Residual maps ``phi = dl/dpred`` of the attentional biases, row-wise over a chunk.

``pred, target: [c, v]``, ``gate: [c, 1]`` (the Huber threshold gate; unused otherwise),
``hp``: dict of ``[1, 1]`` arrays named in ``HPARAMS``. Same equations as the library's biases
(Miras Eq. 10-16), written with kernel-friendly ops (``exp(e log x)`` for powers, ``[c, 1]``
reductions with ``keepdims``).
"""

from __future__ import annotations

import jax.numpy as jnp

HPARAMS = ("p", "a", "eps", "delta_scale")
KINDS = ("dot", "l2", "l1", "lp", "huber_coordinate", "huber_norm", "huber_switch")


def _sign(x, hp, smooth):
    return jnp.tanh(hp["a"] * x) if smooth else jnp.sign(x)


def _abs(x, hp, smooth):
    return jnp.sqrt(x * x + hp["eps"]) if smooth else jnp.sign(x) * x


def _pow(x, e):
    """``x ** e`` for ``x >= 0``: 0 at 0 (1 if e = 0), finite derivative there."""
    pos = x > 0
    return jnp.where(pos, jnp.exp(e * jnp.log(jnp.where(pos, x, 1.0))), jnp.where(e == 0, 1.0, 0.0))


def _norm(r, hp, smooth):
    sq = jnp.sum(r * r, axis=-1, keepdims=True)             # [c, 1]
    if smooth:
        return jnp.sqrt(sq + hp["eps"])
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def residual(kind: str, smooth: bool, pred, target, gate, hp):
    """``phi(pred - target)`` for bias ``kind`` (see ``KINDS``): ``[c, v]``."""
    if kind == "dot":
        return -target
    r = pred - target
    if kind == "l2":
        return r
    if kind == "l1":
        return _sign(r, hp, smooth)
    if kind == "lp":
        return hp["p"] * _sign(r, hp, smooth) * _pow(_abs(r, hp, smooth), hp["p"] - 1.0)
    d = hp["delta_scale"] * gate                              # [c, 1]
    if kind == "huber_coordinate":
        return jnp.where(_abs(r, hp, smooth) <= d, r, d * _sign(r, hp, smooth))
    n = _norm(r, hp, smooth)
    small = n <= d
    if kind == "huber_norm":
        return jnp.where(small, r, d * r / jnp.where(small, 1.0, n))
    if kind == "huber_switch":
        return jnp.where(small, r, d * _sign(r, hp, smooth))
    raise ValueError(f"unknown residual kind {kind!r}; valid: {KINDS}")
