"""The planner (engine/plan.py): which engine runs each preset, and why, read from the components'
traits; errors name the blocking component; chunk caps are visible; every entry point uses it."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import chex
import jax
import numpy as np
import pytest
from flax import nnx

import miras_jax as mj
from miras_jax import inner_opt
from miras_jax.engine import decode
from miras_jax.engine import plan as plan_lib
from miras_jax.nn import MirasLayer
from tests.helpers import random_inputs

HEBBIAN = {"linear_attention", "retnet", "mamba2", "gla"}
DELTA = {"deltanet", "gated_deltanet", "longhorn", "deltaproduct"}
HAND_VJP = {"ttt_linear", "ttt_mlp", "moneta", "yaad", "memora", "titans"}   # every mini-batch preset
NO_KERNEL = {"deltaproduct", "ttt_linear"}
OMEGA = {"omeganet", "atlas"}   # the Omega / Muon chunk form (engine/omega.py)


@pytest.mark.parametrize("name", mj.presets.names())
def test_every_preset_has_the_engine_its_components_allow(name):
    spec = mj.presets.get(name)
    p = mj.plan(spec, "xla", 64)
    if name in HEBBIAN | DELTA:
        assert (p.engine, p.family, p.vjp) == ("hebbian" if name in HEBBIAN else "delta", p.engine, "custom")
    elif name in OMEGA:
        assert (p.engine, p.family, p.vjp, p.chunk) == ("omega", None, "autodiff", 64)
    else:
        assert p.engine == "minibatch" and p.family is None and p.chunk == 64
        assert p.vjp == ("hand" if name in HAND_VJP else "autodiff")
    ref = mj.plan(spec, "reference", 64)
    assert ref.engine == ("tokens" if name in HEBBIAN | DELTA else "chunked_reference")
    assert mj.plan(spec, "reference", 1).engine == "tokens"
    assert mj.plan(spec, "auto", 1, backend="cpu").engine == "tokens"
    assert mj.plan(spec, "auto", 64, backend="cpu").engine == p.engine
    tpu = mj.plan(spec, "auto", 64, backend="tpu")
    if name in NO_KERNEL:
        assert tpu.engine == p.engine and tpu.kernel is None
    else:
        assert tpu.engine == "pallas" and tpu.kernel is not None and tpu.vjp == "kernel"
    if name in OMEGA:   # the matrix kernel's Omega window (and Muon for atlas)
        assert (tpu.kernel.window, tpu.kernel.optimizer) == (spec.bias.window, spec.optimizer.update_form)


def test_chunk_caps_are_in_the_plan_not_silent():
    dn = mj.plan(mj.presets.get("deltanet"), "xla", 64)
    assert (dn.chunk_size, dn.chunk) == (64, 32) and any("capped at 32" in w for w in dn.why)
    assert mj.plan(mj.presets.get("deltanet"), "xla", 16).chunk == 16
    gla = mj.plan(mj.presets.get("gla"), "xla", 64, channel=True)
    assert gla.chunk == 16 and gla.channel
    assert mj.plan(mj.presets.get("gla"), "pallas", 64, channel=True).kernel.chunk_size == 16
    text = repr(dn)
    assert text.startswith("Plan('deltanet': engine=delta") and "chunk=32 (asked 64)" in text


def test_auto_picks_the_materialised_form_where_it_is_meant_to_win():
    mlp = mj.presets.get("atlas", memory="mlp")
    assert mj.plan(mlp, "xla", 16).engine == "omega"
    assert mj.plan(mlp, "auto", 16, backend="cpu").engine == "chunked_reference"   # measured: the loops win
    assert mj.plan(mlp, "auto", 16, backend="gpu").engine == "omega"               # no kernel: the chunk form
    assert mj.plan(mj.presets.get("atlas"), "auto", 16, backend="cpu").engine == "omega"   # dual form


def test_errors_name_the_blocking_component():
    with pytest.raises(NotImplementedError, match="the Omega window .4 tokens. has a Pallas kernel for the matrix"):
        mj.plan(mj.presets.get("omeganet", memory="mlp"), "pallas")
    assert mj.plan(mj.presets.get("titans"), "pallas").kernel.momentum   # the MLP kernel's momentum
    with pytest.raises(NotImplementedError, match="the kernel needs chunk_size >= 3"):
        mj.plan(mj.presets.get("omeganet", window=4), "pallas", 2)
    with pytest.raises(NotImplementedError, match="several inner steps per token"):
        mj.plan(mj.presets.get("deltaproduct"), "pallas")
    ftrl = mj.presets.get("moneta").replace(retention=mj.retention.elastic_net_ftrl_retention())
    with pytest.raises(NotImplementedError, match="retention 'elastic_net_ftrl' has no chunked form"):
        mj.plan(ftrl, "xla", 64)
    assert mj.plan(ftrl, "auto", 64).engine == "chunked_reference"   # auto never raises
    with pytest.raises(ValueError, match="implementation must be one of"):
        mj.plan(ftrl, "fast")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        mj.plan(ftrl, "xla", 0)


@dataclasses.dataclass(frozen=True)
class SignGD:
    """A user's optimizer without planner traits: ``u = -eta sign(grad)``."""

    gates: tuple = ("lr",)
    name: str = "sign_gd"
    num_steps: int = 1

    def default_hparams(self):
        return {}

    def validate(self, hp):
        return None

    def init(self, params):
        return ()

    def lr(self, gates, hparams, key):
        return gates["lr"]

    def update(self, grads, state, params, *, gates, hparams, key=None):
        return jax.tree.map(lambda g: -gates["lr"] * jax.numpy.sign(g), grads), state


def test_a_component_without_traits_runs_on_the_token_engine():
    """Routing reads traits, not classes: a new optimizer that declares none still runs (tokens),
    and the fast paths refuse it by name; declaring ``update_form`` would open them."""
    spec = mj.presets.get("moneta").replace(optimizer=SignGD(), hparams=None)
    assert isinstance(spec.optimizer, mj.base.InnerOptimizer) is False     # no update_form trait
    p = mj.plan(spec, "auto", 64)
    assert p.engine == "chunked_reference"
    with pytest.raises(NotImplementedError, match="optimizer 'sign_gd' has no chunked form"):
        mj.plan(spec, "xla", 64)
    q, k, v, gates = random_inputs(0, 8, 4, 4)
    params = spec.memory.init(jax.random.key(0), 4, 4)
    y, _ = mj.memorize(spec, params, q, k, v, gates)       # default "auto", chunk 1: tokens
    assert np.isfinite(np.asarray(y)).all()
    for comp in (mj.presets.get("moneta").optimizer, mj.presets.get("titans").optimizer):
        assert isinstance(comp, mj.base.InnerOptimizer)
    assert isinstance(mj.presets.get("moneta").retention, mj.base.Retention)
    assert isinstance(mj.presets.get("moneta").bias, mj.base.AttentionalBias)
    assert isinstance(mj.presets.get("moneta").memory, mj.base.Memory)


def test_entry_points_use_the_plan():
    spec = mj.presets.get("moneta")
    layer = MirasLayer(16, 2, "moneta", chunk_size=8, gate_rank=4, rngs=nnx.Rngs(0))
    assert layer.implementation == "auto" and layer.plan.engine == "minibatch" and layer.plan.chunk == 8
    assert decode.buffered(spec, 8, "auto") and not decode.buffered(spec, 1, "auto")
    assert not decode.buffered(mj.presets.get("gated_deltanet"), 64, "xla")   # exact: no chunk buffer
    q, k, v, gates = random_inputs(1, 12, 4, 4)
    params = spec.memory.init(jax.random.key(0), 4, 4)
    auto = mj.memorize(spec, params, q, k, v, gates, chunk_size=4)            # auto -> xla
    xla = mj.memorize(spec, params, q, k, v, gates, chunk_size=4, implementation="xla")
    chex.assert_trees_all_equal(auto, xla)                                  # outputs and final state


ENGINE = pathlib.Path(mj.__file__).parent / "engine"


def test_no_engine_module_checks_a_component_class():
    """The engines route on traits (``base.py``); only the planner decides, and it reads traits."""
    pattern = re.compile(r"isinstance\(\s*(spec|cfg)\.|type\(\s*(spec|cfg)\.[\w.]+\)(?!\.__name__)"
                         r"|inner_opt\.|bias_lib\.|ret_lib\.")   # a class named in a message is fine
    offenders = [f"{f.name}:{i}" for f in sorted(ENGINE.glob("*.py"))
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def _module_imports(root: pathlib.Path, package: str) -> dict[str, set[str]]:
    """``{module: modules it imports}`` inside ``package`` (``from a import b`` counts ``a.b`` when
    that is a module, else ``a``; imports inside functions count too)."""
    import ast

    files = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (root / package).rglob("*.py")}
    graph = {}
    for name, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


@pytest.mark.parametrize("package", ["miras_jax", "pallas_kernels"])
def test_no_import_cycles_between_modules(package):
    """No module imports (directly or through others) a module that imports it, package
    ``__init__`` re-exports aside (a package's own ``__init__`` is not part of a cycle)."""
    root = pathlib.Path(mj.__file__).parent.parent
    graph = _module_imports(root, package)
    graph = {m: {d for d in ds if not m.startswith(d + ".")} for m, ds in graph.items()
             if not (root / m.replace(".", "/") / "__init__.py").exists()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []
