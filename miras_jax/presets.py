"""Every known model as a preset of :class:`~miras_jax.spec.MirasSpec` (the Miras paper's Table 1 and Sec. 5.3).

``get(name, **kw)`` builds one; ``names()`` lists them. Keyword arguments are either structural
(``memory="linear" | "mlp"``, ``smooth``, ``num_steps``, ``expansion``, ``depth``, ``gated``) or
numeric hyper-parameters that become array leaves (``p``, ``q``, ``decay``, ``lr_scale``,
``delta_scale``, ``a``, ``eps``, ...). Matrix memory is ``W: [v, k]``, ``M(k) = W k``;
``a`` is the decay gate, ``b`` the ``lr`` gate, ``r = W_{t-1} k - v``.
"""

from __future__ import annotations

import inspect
from typing import Callable

from miras_jax import bias as B
from miras_jax import inner_opt as O
from miras_jax import memory as M
from miras_jax import retention as R
from miras_jax.spec import MirasSpec

_REGISTRY: dict[str, Callable[..., MirasSpec]] = {}


def register(fn: Callable[..., MirasSpec]) -> Callable[..., MirasSpec]:
    """Register a preset factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def takes(name: str, option: str) -> bool:
    """Whether preset ``name``'s factory has the structural option ``option`` (e.g. ``"anchor"``)."""
    return name in _REGISTRY and option in inspect.signature(_REGISTRY[name]).parameters


def get(name: str, **kwargs) -> MirasSpec:
    """Build preset ``name``; structural keywords go to the factory, the rest set hyper-parameters."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(names())}")
    fn = _REGISTRY[name]
    structural = set(inspect.signature(fn).parameters)
    spec = fn(**{k: v for k, v in kwargs.items() if k in structural})
    numeric = {k: v for k, v in kwargs.items() if k not in structural}
    if numeric:
        try:
            spec = spec.with_hparams(**numeric)
        except ValueError as e:
            raise ValueError(f"preset {name!r}: {e}; structural options: {sorted(structural)}") from None
    spec.validate()
    return spec


def _memory(memory: str, init_linear: str = "zeros", init_mlp: str = "normal", **mlp_kw):
    if memory == "linear":
        return M.linear_memory(init=init_linear)
    if memory == "mlp":
        return M.mlp_memory(init=init_mlp, **mlp_kw)
    raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")


def _spec(name, memory, bias, retention, optimizer, grad_at="previous"):
    return MirasSpec(memory=memory, bias=bias, retention=retention, optimizer=optimizer,
                     grad_at=grad_at, name=name)


# --- the Hebbian family: dot-product bias ---------------------------------------------------

@register
def linear_attention() -> MirasSpec:
    """Linear attention: ``W_t = W_{t-1} + b_t v_t k_t^T`` (dot bias, no retention, GD)."""
    return _spec("linear_attention", M.linear_memory(), B.dot_bias(), R.no_retention(), O.gd())


@register
def retnet() -> MirasSpec:
    """RetNet / Lightning: ``W_t = a W_{t-1} + b_t v_t k_t^T`` with a constant ``a`` (hparam
    ``decay``, default 1 - 2^-5)."""
    spec = _spec("retnet", M.linear_memory(), B.dot_bias(), R.decay_retention("hparam"), O.gd())
    return spec.with_hparams(decay=1.0 - 2.0 ** -5)


@register
def mamba2() -> MirasSpec:
    """Mamba2-style: ``W_t = a_t W_{t-1} + b_t v_t k_t^T``, scalar ``a_t`` (gate ``decay: [T]``)."""
    return _spec("mamba2", M.linear_memory(), B.dot_bias(), R.decay_retention(), O.gd())


@register
def gla() -> MirasSpec:
    """GLA: ``W_t = W_{t-1} Diag(a_t) + b_t v_t k_t^T``, channel-wise ``a_t`` (gate ``decay: [T, k]``)."""
    return _spec("gla", M.linear_memory(), B.dot_bias(), R.decay_retention(), O.gd())


# --- the delta family: l2 bias --------------------------------------------------------------

@register
def deltanet() -> MirasSpec:
    """DeltaNet: ``W_t = W_{t-1} - b_t (W_{t-1} k_t - v_t) k_t^T``."""
    return _spec("deltanet", M.linear_memory(), B.l2_bias(), R.no_retention(), O.gd())


@register
def gated_deltanet() -> MirasSpec:
    """Gated DeltaNet: ``W_t = a_t W_{t-1} - b_t (a_t W_{t-1} k_t - v_t) k_t^T`` (step at the
    decayed state)."""
    return _spec("gated_deltanet", M.linear_memory(), B.l2_bias(), R.decay_retention(), O.gd(),
                 grad_at="retained")


@register
def longhorn() -> MirasSpec:
    """Longhorn (implicit GD): ``W_t = W_{t-1} - b'_t (W_{t-1} k_t - v_t) k_t^T``,
    ``b'_t = b_t / (1 + b_t k_t^T k_t)``."""
    return _spec("longhorn", M.linear_memory(), B.l2_bias(), R.no_retention(), O.implicit_gd())


@register
def deltaproduct(num_steps: int = 2, gated: bool = True) -> MirasSpec:
    """DeltaProduct: ``W' = a_t W_{t-1}``; for ``j < n``: ``W' = W' - b_{t,j} (W' k_{t,j} - v_{t,j})
    k_{t,j}^T``; ``W_t = W'``. Inputs ``k: [T, n, k]``, ``v: [T, n, v]``, ``lr: [T, n]``
    (or ``[T, k]`` / ``[T, v]`` / ``[T]`` to repeat one pair). ``gated=False`` drops ``a_t``."""
    ret = R.decay_retention() if gated else R.no_retention()
    return _spec("deltaproduct", M.linear_memory(), B.l2_bias(), ret, O.multi_step_gd(num_steps),
                 grad_at="retained")


@register
def ttt_linear() -> MirasSpec:
    """TTT-Linear: memory ``x + LN(W x)``, ``W_t = W_{t-1} - b_t grad l2(W_{t-1})``."""
    mem = M.mlp_memory(depth=1, residual=True, layer_norm=True)
    return _spec("ttt_linear", mem, B.l2_bias(), R.no_retention(), O.gd())


@register
def ttt_mlp(expansion: int = 4) -> MirasSpec:
    """TTT-MLP: memory ``x + LN(W_1 gelu(W_0 x))``, ``W_t = W_{t-1} - b_t grad l2(W_{t-1})``."""
    mem = M.mlp_memory(depth=2, expansion=expansion, residual=True, layer_norm=True)
    return _spec("ttt_mlp", mem, B.l2_bias(), R.no_retention(), O.gd())


# --- Titans and the three Miras models ------------------------------------------------------
# ``anchor`` (default: on for an MLP memory): the global retention pulls toward the initial memory
# ``W_0`` (an outer parameter) instead of toward 0, ``z_t = a_t z_{t-1} + (1 - a_t) z_0 + u_t``.
# For a matrix memory initialised at 0 that is the paper's equation; an MLP memory behind its
# LayerNorm decayed toward 0 is chaotic (its exact gradients grow like exp(lambda T), NaN by 8k
# tokens). ``anchor=False`` is the paper's map exactly.


def _anchor(anchor, memory):
    return memory == "mlp" if anchor is None else bool(anchor)


@register
def titans(memory: str = "mlp", expansion: int = 4, depth: int = 2, anchor: bool | None = None) -> MirasSpec:
    """Titans-LMM: ``S_t = m_t S_{t-1} - b_t grad l2(W_{t-1})``; ``W_t = a_t W_{t-1} + S_t``
    (anchored: ``W_t = a_t W_{t-1} + (1 - a_t) W_0 + S_t``)."""
    mem = _memory(memory, expansion=expansion, depth=depth)
    return _spec("titans", mem, B.l2_bias(), R.decay_retention(anchor=_anchor(anchor, memory)),
                 O.momentum_gd())


@register
def moneta(memory: str = "mlp", smooth: bool | None = True, expansion: int = 4,
           depth: int = 2, anchor: bool | None = None) -> MirasSpec:
    """Moneta (Eq. 24-25), defaults ``p = 3``, ``q = 4``:
    ``A_t = a_t A_{t-1} - b_t grad l_p(W_{t-1})``, ``W_t = A_t / ||A_t||_q^(q-2)`` per weight
    matrix, ``A_0 = W_0``; for matrix memory ``grad l_p = p sign(r)|r|^(p-1) k^T``. The norm is
    floored (hparam ``norm_floor``, default ``retention.LQ_NORM_FLOOR``; 0 = the paper's map): at
    ``q = 4``, ``||W||_q = 1 / ||A||_q`` would grow without bound as strong decays empty ``A``.
    Anchored: ``A_t = a_t A_{t-1} + (1 - a_t) A_0 - b_t grad``."""
    mem = _memory(memory, expansion=expansion, depth=depth)
    return _spec("moneta", mem, B.lp_bias(smooth), R.lq_retention(anchor=_anchor(anchor, memory)), O.gd())


@register
def yaad(memory: str = "mlp", smooth: bool | None = True, expansion: int = 4,
         depth: int = 2, anchor: bool | None = None) -> MirasSpec:
    """Yaad (Eq. 26): ``W_t = a_t W_{t-1} - b_t g_t`` with ``g_t = grad l2`` if
    ``||r_t|| <= delta_t`` else ``delta_t grad l1`` (gate ``delta``, times hparam ``delta_scale``);
    anchored: ``+ (1 - a_t) W_0``."""
    mem = _memory(memory, expansion=expansion, depth=depth)
    spec = _spec("yaad", mem, B.yaad_bias(smooth), R.decay_retention(anchor=_anchor(anchor, memory)), O.gd())
    # a = 1: the smooth l1 branch writes delta tanh(a r); the generic a = 10 (slope 10 delta near
    # r = 0) makes the MLP memory's recurrence chaotic. A hyper-parameter: set a=... to override.
    return spec.with_hparams(a=1.0) if memory == "mlp" and smooth else spec


@register
def memora(memory: str = "mlp", expansion: int = 4, depth: int = 2, anchor: bool | None = None) -> MirasSpec:
    """Memora (Eq. 27): ``W_t = c Softmax(a_t log W_{t-1} - b_t grad l2(W_{t-1}))`` over each row,
    ``c`` = row length; the memory must stay positive (initialised with ``init='simplex'``).
    Anchored: ``+ (1 - a_t) log W_0`` inside the softmax."""
    mem = _memory(memory, init_linear="simplex", init_mlp="simplex", expansion=expansion, depth=depth)
    return _spec("memora", mem, B.l2_bias(), R.kl_retention(anchor=_anchor(anchor, memory)), O.gd())


# --- Atlas (arXiv 2505.23735): the Omega rule, polynomial features, Muon ----------------------
# Matrix memory W: [v, D] over phi(k) (D = sum_{j<=p} d_k^j with degree p), r_i = W phi(k_i) - v_i;
# the gradient is taken at W_{t-1}; defaults window 4, degree 2 (matrix memory) / None (MLP).


def _atlas_memory(memory, degree, expansion, depth):
    fm = None if degree is None else "poly"
    if memory == "linear":
        return M.linear_memory(feature_map=fm, degree=degree or 2)
    if memory == "mlp":   # a residual MLP needs D == d_v: over poly features it has no residual
        return M.mlp_memory(expansion=expansion, depth=depth, residual=degree is None, feature_map=fm,
                            degree=degree or 2)
    raise ValueError(f"memory must be 'linear' or 'mlp', got {memory!r}")


def _atlas_degree(memory, degree):
    return (2 if memory == "linear" else None) if degree == "default" else degree


@register
def omeganet(memory: str = "linear", window: int = 4, degree: int | None | str = "default", expansion: int = 4,
             depth: int = 2, anchor: bool | None = None) -> MirasSpec:
    """OmegaNet: ``W_t = a_t W_{t-1} - b_t sum_{i=t-c+1}^{t} gamma_i (W_{t-1} phi(k_i) - v_i) phi(k_i)^T``
    (Omega bias over ``window = c`` tokens, gate ``omega`` = gamma; decay retention; GD; ``phi`` the
    polynomial features of ``degree``, ``None``: ``phi(x) = x``). MLP memory: anchored by default, as
    the other MLP presets."""
    degree = _atlas_degree(memory, degree)
    mem = _atlas_memory(memory, degree, expansion, depth)
    return _spec("omeganet", mem, B.omega_bias(B.l2_bias(), window),
                 R.decay_retention(anchor=_anchor(anchor, memory)), O.gd())


@register
def atlas(memory: str = "linear", window: int = 4, degree: int | None | str = "default", ns_steps: int = 5,
          expansion: int = 4, depth: int = 2, anchor: bool | None = None) -> MirasSpec:
    """Atlas: OmegaNet's gradient ``g_t`` with Muon: ``S_t = m_t S_{t-1} + g_t``,
    ``W_t = a_t W_{t-1} - b_t NS_5(S_t)`` (Newton-Schulz per weight matrix, ``inner_opt.newton_schulz``)."""
    degree = _atlas_degree(memory, degree)
    mem = _atlas_memory(memory, degree, expansion, depth)
    return _spec("atlas", mem, B.omega_bias(B.l2_bias(), window),
                 R.decay_retention(anchor=_anchor(anchor, memory)), O.muon(ns_steps))
