"""The planner: which engine runs a spec, at which chunk size, with which backward, decided in one
place from the components' traits (``miras_jax/base.py``), never from their classes.

    plan(spec, implementation="auto", chunk_size=64, backend=None, channel=False) -> Plan

Engines (``Plan.engine``):
  ``tokens``             the token recurrence under ``lax.scan`` (``engine/tokens.py``): any spec.
  ``chunked_reference``  the mini-batch semantics as plain loops (``engine/minibatch/reference.py``).
  ``hebbian`` / ``delta`` exact chunk forms of a matrix memory (``engine/exact.py``): equal the
                         token recurrence for any chunk size.
  ``minibatch``          the mini-batch chunk form (``engine/minibatch/chunk.py``; hand VJP in
                         ``engine/minibatch/vjp.py`` where it applies, else autodiff).
  ``omega``              the mini-batch chunk form with an Omega window and / or Muon
                         (``engine/omega.py``: dual form for a matrix memory, materialised per-token
                         weights for an MLP or an anchored decay; autodiff).
  ``pallas``             the kernels of ``pallas_kernels/`` (``engine/pallas.py``).

``implementation``: ``"reference"`` (tokens, or chunked_reference when ``chunk_size > 1`` and the
spec has no exact form), ``"xla"``, ``"pallas"`` (raise with the blocking component when they
cannot run the spec), ``"auto"`` (pallas on TPU / GPU where a kernel covers the spec; else xla
where it covers it and ``chunk_size > 1``; else reference).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from miras_jax.engine import omega as omega_lib
from miras_jax.engine import window as window_lib
from pallas_kernels import MatrixChunkConfig, MLPChunkConfig
from pallas_kernels.common.residuals import KINDS as KERNEL_RESIDUALS

IMPLEMENTATIONS = ("reference", "xla", "pallas", "auto")

# Largest chunk an exact form runs at, whatever larger size is asked (exact: any size gives the
# same result). Channel-wise Hebbian (GLA) materialises [c, c, d_k] per chunk; the delta family's
# WY form solves a [c, c] triangular system per chunk. Fastest measured on the 2-core CPU
# (B=2, H=4, d=64, fwd+bwd: delta 54k tokens/s at 32 vs 41k at 64); the same caps elsewhere
# until measured there.
EXACT_CHUNK_CAP = {"channel": 16, "delta": 32}

# The exact forms' chunk-state scan (``exact._scan_states``): "associative" (jax.lax.associative_scan
# of the chunk summaries, depth log n, ~2-4x the matmul work) from this many chunks on, else
# "sequential" (lax.scan, n dependent products). CPU: never; measured on the 2-core CPU (B=1, H=4,
# d=64, T = 2k-64k, `python -m experiments.bench_context_parallel`): delta 1.6-2.1x slower fwd and
# 1.4-1.6x fwd+bwd, Hebbian 0.97-1.3x slower (one tie at 64k fwd+bwd). GPU / TPU: not measured (no
# accelerator in this workplace); 64 chunks is a guess where a sequential scan's per-step latency
# dominates. On those backends "auto" runs the Pallas kernels anyway; this applies to "xla" there.
ASSOCIATIVE_FROM = {"cpu": None, "gpu": 64, "tpu": 64}

# Whether "auto" runs the Omega / Muon chunk form's *materialised* variant (an MLP memory or an
# anchored decay: every token's weights formed per chunk, C^2 |W| mixing work) rather than the chunked
# reference's token loops (same semantics). CPU: no; measured on the 2-core CPU (T=512, d=16, chunk 16,
# B=2, H=4, fwd+bwd, `python -m experiments.bench_engine --presets=omeganet:memory=mlp,atlas:memory=mlp
# --impls=xla,reference`): 5.8k vs 6.9k tokens/s (OmegaNet), 1.6k vs 2.0k (Atlas). GPU / TPU: yes, a
# guess (the loops are sequential over the chunk's tokens); not measured here.
MATERIALISED_AUTO = {"cpu": False, "gpu": True, "tpu": True}

# The retention maps the Pallas kernels implement (their residual maps: KERNEL_RESIDUALS).
KERNEL_RETENTION = {"identity": "linear", "lq": "scale", "kl": "lag"}


@dataclasses.dataclass(frozen=True, repr=False)
class Plan:
    """What runs a spec. ``chunk`` is the chunk size that actually runs (``chunk_size`` was asked);
    ``vjp``: ``"autodiff"``, ``"hand"`` (``chunked_vjp``'s hand-written backward), ``"custom"``
    (the exact forms' closed-form state-scan backward) or ``"kernel"`` (the kernels' own);
    ``kernel``: the Pallas configuration; ``why``: one line per decision."""

    spec: str
    implementation: str
    engine: str
    chunk_size: int
    chunk: int
    family: str | None = None
    chunk_mode: str | None = None
    momentum: bool = False
    channel: bool = False
    vjp: str = "autodiff"
    kernel: Any = None
    why: tuple = ()

    def __str__(self) -> str:
        head = (f"Plan({self.spec!r}: engine={self.engine}, implementation={self.implementation}, "
                f"chunk={self.chunk} (asked {self.chunk_size}), vjp={self.vjp})")
        return "\n".join([head, *(f"  - {w}" for w in self.why)])

    __repr__ = __str__


def channel_decay(spec, gates, token_ndim: int = 1) -> bool:
    """Whether ``spec`` reads a channel-wise decay gate (``[..., T, d_k]``: one more axis than a
    scalar gate's ``token_ndim``)."""
    return "decay" in spec.retention.gates and getattr((gates or {}).get("decay"), "ndim", 0) == token_ndim + 1


def _trait(component, name):
    return getattr(component, name, None)


def exact_family(spec) -> str | None:
    """``"hebbian"`` / ``"delta"`` if the spec has an exact chunk form, else ``None``.

    Needs a matrix memory, an identity retention map without anchor, ``update_form == "gd"``;
    Hebbian: a bias with ``exact_family == "hebbian"`` and one step per token; delta: the l2 family,
    the step taken at the retained state (or no decay, where that is the same thing)."""
    return None if exact_blocker(spec) else spec.bias.exact_family


def exact_blocker(spec) -> str | None:
    """Why ``spec`` has no exact chunk form (``None`` if it has one)."""
    fam = _trait(spec.bias, "exact_family")
    if window_lib.is_omega(spec):
        return f"the Omega window ({spec.bias.window} tokens) has no exact chunk form"
    if fam is None:
        return f"bias {type(spec.bias).__name__} has no exact chunk form (only dot and l2 do)"
    if _trait(spec.memory, "kind") != "linear":
        return "an exact chunk form needs a matrix (linear) memory"
    if _trait(spec.retention, "map_kind") != "identity" or spec.retention.anchor:
        return f"retention {spec.retention.name!r} is not a plain decay (identity map, no anchor)"
    if _trait(spec.optimizer, "update_form") != "gd":
        return f"optimizer {spec.optimizer.name!r} is not gradient descent"
    if fam == "hebbian" and spec.num_steps != 1:
        return "several inner steps per token with the dot bias have no exact form"
    if fam == "delta" and not (spec.grad_at == "retained" or spec.retention.decay_source == "none"):
        return "the delta form takes the step at the retained state (grad_at='retained' or no decay)"
    return None


def minibatch_blocker(spec) -> str | None:
    """Why the mini-batch chunk form (``engine/minibatch/chunk.py``) cannot run ``spec`` (``None`` if it can)."""
    mode = _trait(spec.retention, "chunk_mode")
    form = _trait(spec.optimizer, "update_form")
    if window_lib.is_omega(spec) or form == "muon":
        what = "the Omega window" if window_lib.is_omega(spec) else "optimizer 'muon'"
        return f"{what} is not in the mini-batch form of engine/minibatch (see the omega engine)"
    if mode is None:
        return f"retention {spec.retention.name!r} has no chunked form"
    if spec.grad_at != "previous":
        return "grad_at='retained' has no mini-batch chunked form"
    if spec.num_steps != 1:
        return "several inner steps per token have no mini-batch chunked form"
    if form not in ("gd", "momentum"):
        return f"optimizer {spec.optimizer.name!r} has no chunked form"
    if mode != "linear" and form == "momentum":
        return "momentum with a non-linear retention map has no chunked form"
    return None


def hand_vjp_blocker(spec, channel: bool = False) -> str | None:
    """Why the mini-batch form's hand-written backward (``chunked_vjp``) does not cover ``spec``
    (it then differentiates the same forward, ``vjp.chunk_fwd``); ``None`` if it does."""
    if channel:
        return "channel-wise decay runs under autodiff"
    if _trait(spec.memory, "kind") not in ("linear", "mlp"):
        return f"memory kind {_trait(spec.memory, 'kind')!r} has no hand VJP"
    if spec.retention.chunk_mode not in ("linear", "scale", "lag"):
        return "retention without a chunk mode"
    return None


def kernel_config(spec, chunk_size: int, channel: bool = False):
    """``MatrixChunkConfig`` / ``MLPChunkConfig`` for ``spec``, or ``NotImplementedError(reason)``
    naming the component no kernel covers."""
    mem, ret = spec.memory, spec.retention
    kind = _trait(mem, "kind")
    form = _trait(spec.optimizer, "update_form")
    if window_lib.is_omega(spec) or form == "muon" or (form == "momentum" and kind != "mlp"):
        return _atlas_kernel_config(spec, chunk_size, channel)
    if ret.anchor and kind != "mlp":
        raise NotImplementedError("an anchored retention (decay toward W_0) has a Pallas kernel for the "
                                  "MLP memory only")
    family = exact_family(spec)
    residual = _trait(spec.bias, "residual_kind")
    smooth = bool(getattr(spec.bias, "smooth", True))
    if channel:
        if kind != "linear" or family == "delta" or _trait(ret, "map_kind") != "identity":
            raise NotImplementedError("channel-wise decay runs on the matrix-memory kernel with "
                                      "gradient-descent, linear-retention specs only (GLA-like)")
        if residual not in KERNEL_RESIDUALS:
            raise NotImplementedError(f"bias {type(spec.bias).__name__} has no Pallas residual map")
        return MatrixChunkConfig(mode="minibatch", residual=residual, smooth=smooth, channel=True,
                                 chunk_size=min(chunk_size, EXACT_CHUNK_CAP["channel"]))
    if family == "delta":
        if spec.num_steps != 1:
            raise NotImplementedError("several inner steps per token (DeltaProduct) have no Pallas kernel")
        return MatrixChunkConfig(mode="delta", residual="l2", chunk_size=min(chunk_size, EXACT_CHUNK_CAP["delta"]))
    if family == "hebbian":
        return MatrixChunkConfig(mode="minibatch", residual="dot", chunk_size=chunk_size)
    reason = minibatch_blocker(spec)
    if reason is not None:
        raise NotImplementedError(reason)
    if form not in ("gd", "momentum"):
        raise NotImplementedError(f"optimizer {spec.optimizer.name!r} has no Pallas kernel (GD, momentum only)")
    mode = KERNEL_RETENTION.get(_trait(ret, "map_kind"))
    if mode is None:
        raise NotImplementedError(f"retention {ret.name!r} has no Pallas kernel (supported: none, decay, lq, kl)")
    if residual not in KERNEL_RESIDUALS:
        raise NotImplementedError(f"bias {type(spec.bias).__name__} has no Pallas residual map")
    c = getattr(ret, "c", None)
    if kind == "linear":
        return MatrixChunkConfig(mode="minibatch", residual=residual, smooth=smooth, retention=mode,
                                 simplex_c=c, chunk_size=chunk_size)
    if not (mem.depth == 2 and mem.residual and mem.layer_norm and mem.activation == "gelu"):
        raise NotImplementedError("the Pallas MLP kernel covers the Miras memory x + LN(W_1 gelu(W_0 x)) "
                                  f"only, got {mem}")
    return MLPChunkConfig(residual=residual, smooth=smooth, retention=mode, simplex_c=c, chunk_size=chunk_size,
                          anchor=ret.anchor, momentum=form == "momentum")


def _atlas_kernel_config(spec, chunk_size: int, channel: bool):
    """The matrix kernel's momentum / Muon / Omega-window configuration (``MatrixChunkConfig.atlas``)."""
    form = _trait(spec.optimizer, "update_form")
    what = (f"the Omega window ({spec.bias.window} tokens)" if window_lib.is_omega(spec)
            else f"optimizer {spec.optimizer.name!r}")
    if _trait(spec.memory, "kind") != "linear":
        raise NotImplementedError(f"{what} has a Pallas kernel for the matrix (linear) memory only")
    reason = omega_lib.blocker(spec)   # a plain decay, gradients at the chunk start, one step
    if reason is None and spec.retention.anchor:
        reason = f"{what} with an anchored retention has no Pallas kernel"
    if reason is not None:
        raise NotImplementedError(reason)
    if channel:
        raise NotImplementedError(f"{what} with a channel-wise decay has no Pallas kernel")
    residual = _trait(spec.bias, "residual_kind")
    if residual not in KERNEL_RESIDUALS:
        raise NotImplementedError(f"bias {type(spec.bias).__name__} has no Pallas residual map")
    window = spec.bias.window if window_lib.is_omega(spec) else None
    if window is not None and window > chunk_size + 1:
        raise NotImplementedError(f"the Omega window ({window} tokens) reaches past the previous chunk at "
                                  f"chunk_size={chunk_size}: the kernel needs chunk_size >= {window - 1}")
    return MatrixChunkConfig(mode="minibatch", residual=residual, smooth=bool(getattr(spec.bias, "smooth", True)),
                             chunk_size=chunk_size, optimizer=form, window=window,
                             ns_steps=getattr(spec.optimizer, "ns_steps", 5))


def kernel_blocker(spec, channel: bool = False) -> str | None:
    """Why no Pallas kernel runs ``spec`` (``None`` if one does)."""
    try:
        kernel_config(spec, 64, channel)
    except NotImplementedError as e:
        return str(e)
    return None


def omega_blocker(spec) -> str | None:
    """Why the Omega / Muon chunk form (``engine/omega.py``) does not run ``spec`` (``None`` if it does)."""
    if not (window_lib.is_omega(spec) or _trait(spec.optimizer, "update_form") == "muon"):
        return "not an Omega-window or Muon spec (the minibatch engine runs it)"
    return omega_lib.blocker(spec)


def chunk_blocker(spec) -> str | None:
    """Why no XLA chunk form (mini-batch or Omega) runs ``spec``; ``None`` if one does."""
    if window_lib.is_omega(spec) or _trait(spec.optimizer, "update_form") == "muon":
        return omega_lib.blocker(spec)
    return minibatch_blocker(spec)


def resolve(spec, implementation: str, chunk_size: int = 64, backend: str | None = None,
            channel: bool = False) -> str:
    """``implementation`` with ``"auto"`` resolved (see the module docstring); ``"xla"`` /
    ``"pallas"`` for a spec they cannot run raise ``NotImplementedError`` naming the blocker. Every
    implementation takes packed rows (``segment_ids``)."""
    spec = window_lib.lower_spec(spec)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        backend = backend or jax.default_backend()
        if backend in ("tpu", "gpu") and kernel_blocker(spec, channel) is None:
            return "pallas"
        materialised = omega_blocker(spec) is None and not omega_lib.dual_form(spec)
        if materialised and not MATERIALISED_AUTO.get(backend, False):
            return "reference"
        if chunk_size > 1 and (exact_family(spec) is not None or chunk_blocker(spec) is None):
            return "xla"
        return "reference"
    if implementation == "pallas":
        reason = kernel_blocker(spec, channel)
        if reason is not None:
            raise NotImplementedError(f"implementation='pallas' cannot run spec {spec.name!r}: {reason}; "
                                      "use implementation='xla'")
    if implementation == "xla" and exact_family(spec) is None:
        reason = chunk_blocker(spec)
        if reason is not None:
            raise NotImplementedError(f"implementation='xla' cannot run spec {spec.name!r}: {reason}; "
                                      "use implementation='reference' with chunk_size=1")
    return implementation


def plan(spec, implementation: str = "auto", chunk_size: int = 64, *, backend: str | None = None,
         channel: bool = False) -> Plan:
    """The :class:`Plan` for ``spec`` (``channel``: the decay gate is channel-wise ``[T, d_k]``)."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    asked = implementation
    spec = window_lib.lower_spec(spec)   # feature maps and window-1 Omega biases (engine/window.py)
    impl = resolve(spec, implementation, chunk_size, backend, channel)
    family = exact_family(spec)
    common = dict(spec=spec.name, implementation=impl, chunk_size=chunk_size, family=family,
                  chunk_mode=_trait(spec.retention, "chunk_mode"),
                  momentum=_trait(spec.optimizer, "update_form") == "momentum", channel=channel)
    why = [f"implementation={asked!r} -> {impl!r}" + ("" if asked != "auto" else _auto_reason(impl))]
    if impl == "pallas":
        cfg = kernel_config(spec, chunk_size, channel)
        if cfg.chunk_size != chunk_size:
            why.append(f"chunk capped at {cfg.chunk_size}: the exact form is the same at any chunk size")
        why.append(f"kernel {type(cfg).__name__}({_kernel_summary(cfg)})")
        return Plan(engine="pallas", chunk=cfg.chunk_size, vjp="kernel", kernel=cfg, why=tuple(why), **common)
    if impl == "reference":
        if chunk_size == 1 or family is not None:
            why.append("token recurrence (chunk 1" + (f"; the {family} form is exact)" if family else ")"))
            return Plan(engine="tokens", chunk=1, why=tuple(why), **common)
        why.append("mini-batch semantics as plain loops over chunks")
        return Plan(engine="chunked_reference", chunk=chunk_size, why=tuple(why), **common)
    if family is not None:
        cap = EXACT_CHUNK_CAP["channel"] if (family == "hebbian" and channel) else (
            EXACT_CHUNK_CAP["delta"] if family == "delta" else None)
        chunk = chunk_size if cap is None else min(chunk_size, cap)
        why.append(f"exact {family} chunk form: equals the token recurrence at any chunk size; chunk states by "
                   "state_scan(n_chunks) (ASSOCIATIVE_FROM)")
        if chunk != chunk_size:
            why.append(f"chunk capped at {chunk} (EXACT_CHUNK_CAP: fastest measured; same result)")
        return Plan(engine=family, chunk=chunk, vjp="custom", why=tuple(why), **common)
    if omega_blocker(spec) is None:
        why.append(f"no exact form ({exact_blocker(spec)}): the Omega / Muon chunk form (engine/omega.py), "
                   "gradients at each chunk's start memory; autodiff backward")
        return Plan(engine="omega", chunk=chunk_size, why=tuple(why), **common)
    why.append(f"no exact form ({exact_blocker(spec)}): mini-batch form, gradients at each chunk's "
               "start memory")
    blocker = hand_vjp_blocker(spec, channel)
    why.append("hand-written VJP" if blocker is None else f"autodiff backward ({blocker})")
    return Plan(engine="minibatch", chunk=chunk_size, vjp="hand" if blocker is None else "autodiff",
                why=tuple(why), **common)


def state_scan(n_chunks: int, backend: str | None = None) -> str:
    """The exact forms' chunk-state scan for ``n_chunks`` chunks on ``backend`` (default: JAX's):
    ``"associative"`` from ``ASSOCIATIVE_FROM[backend]`` chunks on, else ``"sequential"``."""
    start = ASSOCIATIVE_FROM.get(backend or jax.default_backend())
    return "associative" if start is not None and n_chunks >= start else "sequential"


def _auto_reason(impl: str) -> str:
    return {"pallas": " (a kernel covers the spec on this accelerator)",
            "xla": " (a chunk form covers the spec)",
            "reference": " (chunk_size 1, no chunk form, or the loops win here: MATERIALISED_AUTO)"}[impl]


def _kernel_summary(cfg) -> str:
    fields = ("mode", "residual", "retention", "channel", "chunk_size", "anchor")
    return ", ".join(f"{f}={getattr(cfg, f)!r}" for f in fields if hasattr(cfg, f))
