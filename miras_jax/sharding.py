"""Meshes, logical-axis rules and the shardings of a model's parameters and activations.

One place says how every parameter and activation maps onto the mesh:

  mesh axes   ``data`` (pure data parallel), ``fsdp`` (data parallel + parameters sharded along
              the model width), ``seq`` (context parallel: each device a contiguous slice of every
              sequence; the memories exchange state summaries, ``engine/context.py``), ``tensor``
              (heads / MLP hidden / vocabulary)
  RULES       logical axis -> mesh axes: batch -> (data, fsdp); embed -> fsdp; seq -> seq; heads,
              mlp, vocab -> tensor; everything else replicated
  PARAM_AXES  parameter name -> logical axes of its dims (``logical_axes``)

A dimension whose size the mesh axes do not divide is replicated instead (small layers on big
meshes). Miras layers constrain q / k / v to ``[batch, seq, heads, dim]`` so each device runs the
memories of its own heads; with ``implementation="pallas"`` the kernels enter through
``shard_map`` over the same axes (``constrain`` / ``active_mesh`` below).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "seq", "tensor")

RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "heads": ("tensor",),        # per-head memories [h, ...] and flattened [h * k] projections
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "seq": ("seq",),             # activations [batch, seq, ...]: context parallelism
    "dim": None,
}

# (regex on the parameter path "a/b/c", logical axes of its dims); first match wins.
PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    (r"embed/embedding$", ("vocab", "embed")),
    (r"head/kernel$", ("embed", "vocab")),
    (r"mlp/w_(gate|up)/kernel$", ("embed", "mlp")),
    (r"mlp/w_down/kernel$", ("mlp", "embed")),
    (r"mixer/w[qkvg]/kernel$", ("embed", "heads")),
    (r"mixer/wo/kernel$", ("heads", "embed")),
    (r"mixer/conv$", (None, None, "heads")),
    (r"mixer/gate_down/kernel$", ("embed", None)),
    (r"mixer/gate_up/\w+/0$", (None, "heads")),
    (r"mixer/gate_up/\w+/1$", ("heads",)),
    (r"mixer/memory_w0/\d+$", ("heads", None, None)),
)


def per_batch_shard(batch: int, sizes: dict[str, int]) -> int:
    """Sequences each batch shard holds: ``batch / prod(sizes of RULES["batch"]'s axes)``; raises
    ``ValueError`` when the batch does not divide."""
    ways = math.prod(sizes.get(a, 1) for a in RULES["batch"])
    if batch % ways:
        raise ValueError(f"batch={batch} is not divisible by the mesh's {ways} batch shards "
                         f"({' x '.join(RULES['batch'])})")
    return batch // ways


def parse_mesh(text: str) -> dict[str, int]:
    """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4, "seq": 1, "tensor": 1}`` (missing axes: size 1)."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, size = item.partition(":")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {text!r}; valid: {AXES}")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} given twice in {text!r}")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh axis {name!r} needs a positive size, got {size!r} in {text!r}")
        sizes[name] = int(size)
        seen.add(name)
    if not seen:
        raise ValueError(f"empty mesh spec {text!r}; e.g. 'data:2,fsdp:4'")
    return sizes


def make_mesh(text: str, devices=None) -> Mesh:
    """A mesh with axes ``(data, fsdp, seq, tensor)`` from ``--mesh`` text over the first ``N`` of ``devices``
    (default ``jax.devices()``; fewer than ``N``: error)."""
    sizes = parse_mesh(text)
    devices = jax.devices() if devices is None else devices
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"mesh {text!r} needs {n} devices but {len(devices)} are available "
                         "(on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    if n < len(devices):   # e.g. --mesh=data:1 for a one-device run on a bigger host
        logging.warning("mesh %r uses %d of the %d devices", text, n, len(devices))
        devices = devices[:n]
    shape = tuple(sizes[a] for a in AXES)
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def _axis_size(mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def spec_for(mesh, logical: tuple, shape: tuple) -> P:
    """``PartitionSpec`` for logical axes on ``mesh``; dims not divisible by their axes replicate."""
    out = []
    for name, size in zip(logical, shape):
        axes = RULES.get(name) if name else None
        axes = tuple(a for a in (axes or ()) if mesh.shape.get(a, 1) > 1)
        out.append(axes if axes and size % _axis_size(mesh, axes) == 0 else None)
    return P(*out)


def logical_axes(path: str, ndim: int) -> tuple:
    """Logical axes of the parameter at ``path`` ("blocks/0/mixer/wq/kernel"); unknown: replicated."""
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path) and len(axes) == ndim:
            return axes
    return (None,) * ndim


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def param_shardings(mesh, params):
    """``NamedSharding`` per parameter leaf (same tree), from ``PARAM_AXES`` and ``RULES``."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: NamedSharding(mesh, spec_for(mesh, logical_axes(_path(kp), np.ndim(x)), np.shape(x))),
        params)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Batch arrays ``[b, ...]``: rows over ``RULES["batch"]``."""
    return NamedSharding(mesh, P(RULES["batch"], *(None,) * (ndim - 1)))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# --- activations: constraints inside the model while a mesh is active ----------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("miras_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh):
    """While tracing under this context, ``constrain`` places activations on ``mesh``."""
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh():
    return _ACTIVE.get()


def constrain(x, logical: tuple):
    """``with_sharding_constraint`` by logical axes when a mesh is active; else ``x`` unchanged."""
    mesh = _ACTIVE.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(mesh, logical, x.shape)))


def mesh_axes(logical: str, size: int, mesh=None):
    """Mesh axes a logical axis of ``size`` maps to on ``mesh`` (default: the active mesh; ``None``:
    replicated — no mesh, no rule, or the axes do not divide ``size``)."""
    mesh = _ACTIVE.get() if mesh is None else mesh
    if mesh is None:
        return None
    spec = spec_for(mesh, (logical,), (size,))
    return spec[0] if len(spec) else None
