"""``MirasSpec``: the four Miras choices (static) plus their numeric hyper-parameters (traced).

The spec is a JAX pytree whose only leaves are ``hparams`` (a dict of dicts of arrays, one dict
per component: ``{"bias": {...}, "retention": {...}, "optimizer": {...}}``); memory, bias,
retention, optimizer and ``grad_at`` are static (hashable frozen dataclasses). So two specs
that differ only in numbers share one compiled program, and ``jax.vmap`` over stacked specs (or
over ``hparams``) runs a grid of variants as one program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from miras_jax import bias as bias_lib
from miras_jax import inner_opt

GRAD_AT = ("previous", "retained")
COMPONENTS = ("bias", "retention", "optimizer")


@dataclasses.dataclass(frozen=True)
class MirasSpec:
    """A Miras sequence-memory model.

    Attributes:
      memory: architecture (``memory.LinearMemory`` / ``memory.MLPMemory``).
      bias: attentional bias (``bias.py``).
      retention: retention gate (``retention.py``).
      optimizer: memory learning algorithm (``inner_opt.py``).
      grad_at: ``"previous"`` takes the inner gradient at ``W_{t-1}`` (Table 1: Titans, Moneta,
        Yaad, Memora); ``"retained"`` at the state after retention, e.g. ``a_t W_{t-1}``
        (Gated DeltaNet, DeltaProduct).
      name: a label (preset name).
      hparams: ``{"bias": {...}, "retention": {...}, "optimizer": {...}}`` of arrays.
    """

    memory: Any
    bias: Any
    retention: Any
    optimizer: Any
    grad_at: str = "previous"
    name: str = "custom"
    hparams: dict | None = None

    def __post_init__(self):
        if self.grad_at not in GRAD_AT:
            raise ValueError(f"grad_at must be one of {GRAD_AT}, got {self.grad_at!r}")
        if isinstance(self.optimizer, inner_opt.ImplicitGD) and not (
                getattr(self.memory, "kind", None) == "linear" and isinstance(self.bias, bias_lib.L2Bias)):
            raise ValueError("implicit_gd has a closed form only for the l2 bias on a linear (matrix) "
                             "memory; use gd() for other combinations")
        if isinstance(self.bias, bias_lib.OmegaBias) and self.optimizer.num_steps != 1:
            raise ValueError("the Omega bias takes one inner step per token (num_steps=1)")
        if self.hparams is None:
            object.__setattr__(self, "hparams", self.default_hparams())

    def default_hparams(self) -> dict:
        return {
            "bias": _as_arrays(self.bias.default_hparams()),
            "retention": _as_arrays(self.retention.default_hparams()),
            "optimizer": _as_arrays(self.optimizer.default_hparams()),
        }

    @property
    def required_gates(self) -> tuple:
        """Names of the per-token gates this spec reads, in a stable order."""
        names = (*self.optimizer.gates, *self.retention.gates, *self.bias.gates)
        return tuple(dict.fromkeys(names))

    @property
    def num_steps(self) -> int:
        return self.optimizer.num_steps

    def replace(self, **kw) -> "MirasSpec":
        return dataclasses.replace(self, **kw)

    def with_hparams(self, **kw) -> "MirasSpec":
        """A copy with some hyper-parameters changed, by name (``p=2.0``, ``q=3.0``, ...)."""
        hp = {c: dict(v) for c, v in self.hparams.items()}
        for name, value in kw.items():
            owners = [c for c in COMPONENTS if name in hp[c]]
            if not owners:
                valid = sorted(n for c in COMPONENTS for n in hp[c])
                raise ValueError(f"spec {self.name!r} has no hyper-parameter {name!r}; valid: {valid}")
            for c in owners:
                hp[c][name] = jnp.asarray(value, jnp.float32)
        return self.replace(hparams=hp)

    def validate(self) -> None:
        """Check the concrete hyper-parameter values (skipped for traced values)."""
        for key in COMPONENTS:
            if set(self.hparams.get(key, {})) != set(getattr(self, key).default_hparams()):
                raise ValueError(f"hparams[{key!r}] must have keys "
                                 f"{sorted(getattr(self, key).default_hparams())}, "
                                 f"got {sorted(self.hparams.get(key, {}))}")
        self.bias.validate(self.hparams["bias"])
        self.retention.validate(self.hparams["retention"])
        self.optimizer.validate(self.hparams["optimizer"])

    def describe(self) -> str:
        return (f"{self.name}: memory={type(self.memory).__name__}, bias={type(self.bias).__name__}, "
                f"retention={self.retention.name}, optimizer={self.optimizer.name}, grad_at={self.grad_at}")


def _as_arrays(d: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}


jax.tree_util.register_dataclass(
    MirasSpec,
    data_fields=["hparams"],
    meta_fields=["memory", "bias", "retention", "optimizer", "grad_at", "name"],
)

