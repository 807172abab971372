"""The four Miras choices as protocols: what a component provides, and the static traits the
planner (``engine/plan.py``) reads to pick an engine. A new component implements the methods; its
traits say which fast paths it can take (leave one out and the planner keeps it on the token
engine, which needs only the methods). Every component is a frozen (hashable) dataclass: static
in a ``MirasSpec``; its numbers live in ``hparams`` (traced, vmappable).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Params = Any     # a memory's parameter pytree (``{"W": [d_v, d_k]}`` or the MLP's ``{"W0", "W1"}``)
Hparams = dict   # ``{name: float32 array}``, one dict per component


@runtime_checkable
class Memory(Protocol):
    """``M_W(x)``: ``init(key, d_k, d_v) -> W``; ``apply(W, x [d_k]) -> [d_v]``; ``leaves`` /
    ``from_leaves`` list the weight matrices in a fixed order (kernels take them as a list).

    Trait: ``kind``: ``"linear"`` (``M(x) = W x``: the exact chunk forms and the matrix kernel) or
    ``"mlp"`` (``x + LN(W_1 act(W_0 x))``: the mini-batch form and the MLP kernel)."""

    kind: str

    def init(self, key, d_k: int, d_v: int) -> Params: ...
    def apply(self, params: Params, x) -> Any: ...
    def leaves(self, params: Params) -> list: ...
    def from_leaves(self, leaves: list) -> Params: ...


@runtime_checkable
class AttentionalBias(Protocol):
    """The inner loss ``l(M(k_t); v_t)`` and its residual map ``phi = dl / dM(k)`` (``[d_v]``).

    Traits: ``exact_family``: ``"hebbian"`` (``phi`` independent of the prediction: linear
    attention's exact chunk form), ``"delta"`` (``phi = M(k) - v``: the WY delta-rule form) or
    ``None``; ``residual_kind``: the name of ``phi`` in the Pallas kernels (``"dot"``, ``"l2"``,
    ``"lp"``, ``"l1"``, ``"huber_<form>"``, ...); ``window`` (Omega rule: the inner gradient sums the
    loss over that many recent tokens, gate ``omega``; absent on the other biases)."""

    gates: tuple
    exact_family: str | None
    residual_kind: str

    def default_hparams(self) -> Hparams: ...
    def validate(self, hp: Hparams) -> None: ...
    def loss(self, pred, target, hp: Hparams, g: dict): ...
    def residual_map(self, pred, target, hp: Hparams, g: dict): ...


@runtime_checkable
class Retention(Protocol):
    """The retention gate as a mirror step: ``z_t = a_t z_{t-1} + u_t``, ``W_t = from_dual(z_t)``.

    Traits: ``map_kind`` (``"identity"``: ``W = z``, the exact chunk forms apply; ``"lq"``,
    ``"kl"``, ``"soft_threshold"``, ``"sigmoid"``), ``chunk_mode`` (the mini-batch engine's
    in-chunk treatment: ``"linear"`` / ``"scale"`` / ``"lag"``, ``None`` = token engine only),
    ``anchor`` (decay toward ``W_0``)."""

    gates: tuple
    map_kind: str
    chunk_mode: str | None
    anchor: bool

    def default_hparams(self) -> Hparams: ...
    def validate(self, hp: Hparams) -> None: ...
    def init(self, params: Params, hp: Hparams) -> Any: ...
    def step(self, params: Params, state, updates, decay, hp: Hparams): ...
    def decay_value(self, gates_t: dict, hp: Hparams): ...


@runtime_checkable
class InnerOptimizer(Protocol):
    """The memory learning algorithm, optax-style: ``init(W) -> state``;
    ``update(grads, state, W, *, gates, hparams, key) -> (u_t, state)``; ``lr(gates, hp, key)`` the
    step size eta_t the chunk forms use.

    Traits: ``update_form``: ``"gd"`` (``u = -eta grad``), ``"momentum"`` (``S = m S - eta grad``,
    ``u = S``) or ``"muon"`` (``S = m S + grad``, ``u = -eta NS(S)``); ``num_steps``: inner steps per
    token (DeltaProduct); ``grad_linear``: ``u`` is linear in ``eta_t grad`` (a per-token weight on
    the gradient folds into ``eta``)."""

    gates: tuple
    name: str
    num_steps: int
    update_form: str

    def default_hparams(self) -> Hparams: ...
    def validate(self, hp: Hparams) -> None: ...
    def init(self, params: Params) -> Any: ...
    def update(self, grads, state, params, *, gates, hparams, key=None): ...
    def lr(self, gates: dict, hparams: Hparams, key): ...
