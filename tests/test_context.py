"""Context parallelism (``engine/context.py``): a sequence split over the ``seq`` mesh axis gives one
device's outputs, final states and gradients. 8 virtual CPU devices (conftest.py)."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import miras_jax as mj
from miras_jax import sharding
from miras_jax.engine import context
from tests.helpers import some_slow

SLOW = pytest.mark.slow


def _inputs(name, B=2, T=32, H=2, d=8, seed=0, channel=False):
    spec = mj.presets.get(name)
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (B, T, H, d)))
    k = unit(jax.random.normal(ks[1], (B, T, H, d)))
    v = jax.random.normal(ks[2], (B, T, H, d))
    gates = {"lr": jax.random.uniform(ks[3], (B, T, H), minval=0.05, maxval=0.3),
             "decay": jax.random.uniform(ks[4], (B, T, H) + ((d,) if channel else ()), minval=0.8, maxval=1.0),
             "momentum": jax.random.uniform(ks[5], (B, T, H), minval=0.0, maxval=0.9),
             "delta": jnp.ones((B, T, H))}
    gates = {n: g for n, g in gates.items() if n in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[6], H))
    return spec, params, (q, k, v, gates)


def _run(spec, params, args, *, mesh=None, seq_axis=None, initial_state=None, segment_ids=None, **kw):
    kw = dict(chunk_size=4, implementation="xla", **kw)
    if mesh is not None:
        kw.update(mesh=mesh, seq_axis=seq_axis, batch_axes=sharding.mesh_axes("batch", args[0].shape[0], mesh))

    def loss(params, args, st):
        y, fin = mj.memorize_batched(spec, params, *args, initial_state=st, segment_ids=segment_ids, **kw)
        ct = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(ct * y) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(fin)), (y, fin)

    (_, (y, fin)), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, args, initial_state)
    return y, fin, g


def _close(a, b, tol=2e-4):
    """Leafwise, the absolute tolerance relative to the leaf's scale (Moneta's gradients reach
    O(100); float32 rounding through its l_q map is relative to that, JAX_NOTES trap 8)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        scale = max(1.0, float(np.max(np.abs(y)))) if y.size else 1.0
        np.testing.assert_allclose(np.asarray(x), y, rtol=tol, atol=tol * scale)


def _state(spec, params, B, seed=3):
    """A non-trivial initial state: the state after a random prefix."""
    _, _, pre = _inputs(spec.name, B=B, T=8, seed=seed)
    _, st = mj.memorize_batched(spec, params, *pre, chunk_size=4, implementation="xla")
    return st


def _ids(B, T, n):
    """Packed rows whose documents start exactly at a slice start, inside slices, after pads that
    open a slice, and one document across several slices."""
    t = T // n
    rows = []
    for b in range(B):
        ids = np.ones(T, np.int32)
        ids[t:] = 2                      # a new document exactly at slice 1's start
        ids[t + 3:2 * t + 2] = 3         # one inside slice 1, running into slice 2
        ids[2 * t + 2:3 * t] = 0         # pads to the end of slice 2 ...
        ids[3 * t:3 * t + 1 + b] = 0     # ... and opening slice 3, then a new document
        ids[3 * t + 1 + b:] = 4 + b
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


AFFINE = ["gated_deltanet", "mamba2", "deltanet", "longhorn", "retnet", "deltaproduct", "linear_attention"]


# by default gated_deltanet on seq:8 and mamba2 on data:2,seq:4; -m slow: every pair
@pytest.mark.parametrize("name,mesh_text", [
    pytest.param(n, m, marks=() if (n, m) in {("gated_deltanet", "seq:8"), ("mamba2", "data:2,seq:4")} else SLOW)
    for n in AFFINE for m in ("seq:8", "data:2,seq:4")])
def test_summary_mode_equals_one_device(name, mesh_text):
    spec, params, args = _inputs(name)
    st = _state(spec, params, 2)
    ref = _run(spec, params, args, initial_state=st)
    mesh = sharding.make_mesh(mesh_text)
    got = _run(spec, params, args, mesh=mesh, seq_axis="seq", initial_state=st)
    assert context.seq_mode(spec) == "summary"
    _close(got, ref)


def test_summary_mode_channel_wise_decay_equals_one_device():
    spec, params, args = _inputs("gla", channel=True)
    ref = _run(spec, params, args)
    _close(_run(spec, params, args, mesh=sharding.make_mesh("seq:4"), seq_axis="seq"), ref)


PIPELINE = ["moneta", "yaad", "memora", "titans"]


# the relay is spec-agnostic: moneta's state (memory, l_q accumulators, anchor) holds every part
# memora's and yaad's have; titans' optimizer state also under -m slow
@pytest.mark.parametrize("name", some_slow(PIPELINE, {"yaad", "titans", "memora"}))
def test_pipeline_mode_equals_one_device(name):
    spec, params, args = _inputs(name, T=32)
    st = _state(spec, params, 2)
    ref = _run(spec, params, args, initial_state=st)
    got = _run(spec, params, args, mesh=sharding.make_mesh("data:2,seq:4"), seq_axis="seq", initial_state=st)
    assert context.seq_mode(spec) == "pipeline"
    _close(got, ref, tol=1e-3)


@pytest.mark.parametrize("microbatches", [pytest.param(1, marks=SLOW), 2])
def test_pipeline_micro_batches_and_seq_8(microbatches):
    spec, params, args = _inputs("moneta", B=2, T=32)
    ref = _run(spec, params, args)
    got = _run(spec, params, args, mesh=sharding.make_mesh("seq:8"), seq_axis="seq", seq_microbatches=microbatches)
    _close(got, ref, tol=1e-3)


# the pipeline's packed relay (entry resets, the row's reset state) is spec-agnostic: moneta's case
# keeps it, gated_deltanet's under -m slow (its packed chunk form: summary mode here, test_segments)
@pytest.mark.parametrize("name,mode", [("gated_deltanet", "summary"),
                                       pytest.param("gated_deltanet", "pipeline", marks=SLOW),
                                       ("moneta", "pipeline"), pytest.param("titans", "pipeline", marks=SLOW)])
def test_packed_rows_equal_one_device(name, mode):
    spec, params, args = _inputs(name, T=32)
    seg = _ids(2, 32, 4)
    ref = _run(spec, params, args, segment_ids=seg)
    got = _run(spec, params, args, mesh=sharding.make_mesh("data:2,seq:4"), seq_axis="seq", segment_ids=seg,
               seq_mode=mode)
    _close(got, ref, tol=1e-3)


def test_entry_resets_follow_the_row():
    seg = _ids(2, 32, 4)
    np.testing.assert_array_equal(np.asarray(context.entry_resets(seg, 4)),
                                  [[False, True, False, True], [False, True, False, True]])
    # a row that starts with pads: its first document continues the initial state
    seg = jnp.asarray([[0, 0, 0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(np.asarray(context.entry_resets(seg, 4)), [[False, False, False, False]])


def test_bad_input_is_a_clear_error():
    spec, params, args = _inputs("moneta", T=24)
    mesh = sharding.make_mesh("seq:4")
    with pytest.raises(ValueError, match="multiple of chunk_size=4"):   # slices of 6 tokens
        mj.memorize_batched(spec, params, *args, chunk_size=4, implementation="xla", mesh=mesh, seq_axis="seq")
    with pytest.raises(ValueError, match="affine"):
        mj.memorize_batched(spec, params, *args, chunk_size=4, mesh=mesh, seq_axis="seq", seq_mode="summary")
    with pytest.raises(ValueError, match="divisible by the seq axis"):
        mj.memorize_batched(spec, params, *(jax.tree.map(lambda x: x[:, :22], args)), chunk_size=2, mesh=mesh,
                            seq_axis="seq")
    with pytest.raises(ValueError, match="seq_axis needs a mesh"):
        mj.memorize_batched(spec, params, *args, chunk_size=4, seq_axis="seq")
    with pytest.raises(ValueError, match="microbatches"):
        mj.memorize_batched(spec, params, *args, chunk_size=2, mesh=mesh, seq_axis="seq", seq_microbatches=3)


def _collectives(hlo: str) -> dict:
    ops = re.findall(r"\b(all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)(?:-start)?\(", hlo)
    return {op: ops.count(op) for op in set(ops)}


def test_only_the_designed_collectives():
    """summary: the forward all-gathers the slice summaries, the backward sums their cotangents
    back (its transpose); pipeline: the state's collective-permute and the final state's all-reduce."""
    mesh = sharding.make_mesh("seq:4")
    spec, params, args = _inputs("gated_deltanet")
    kw = dict(chunk_size=4, implementation="xla", mesh=mesh, seq_axis="seq")
    fwd = lambda p, a: mj.memorize_batched(spec, p, *a, **kw)  # noqa: E731
    got = _collectives(jax.jit(fwd).lower(params, args).compile().as_text())
    assert set(got) == {"all-gather"}, got
    spec, params, args = _inputs("moneta")
    fwd = lambda p, a: mj.memorize_batched(spec, p, *a, **kw)  # noqa: E731
    got = _collectives(jax.jit(fwd).lower(params, args).compile().as_text())
    assert set(got) <= {"collective-permute", "all-reduce"} and "collective-permute" in got, got


@pytest.mark.parametrize("pattern,preset,prompt", [pytest.param("MS", "gated_deltanet", 20, marks=SLOW),
                                                  ("M", "moneta", 18)])
def test_sequence_sharded_prefill_then_decoding_equals_one_device(pattern, preset, prompt, monkeypatch):
    """``MirasLM.prefill`` under a ``seq:4`` mesh (the memories context-parallel: Gated DeltaNet's 20
    tokens as 4 slices of 5; Moneta's first 16 of 18 as 4 slices of one chunk, the last 2 into the
    chunk buffer) gives one device's logits and a cache from which decoding continues with one
    device's logits."""
    from flax import nnx

    from miras_jax.nn import LMConfig, MirasLM
    calls = []
    real = context.memorize_seq_sharded
    monkeypatch.setattr(context, "memorize_seq_sharded", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    # one block per pattern letter
    cfg = LMConfig(vocab_size=40, d_model=16, num_layers=len(pattern), num_heads=2, preset=preset,
                   pattern=pattern, window=5, chunk_size=4, gate_rank=4)
    model = MirasLM(cfg, rngs=nnx.Rngs(0))
    # 3 steps: Moneta's buffer (2 tokens) fills its chunk at the second, the third opens the next
    toks = jax.random.randint(jax.random.key(2), (2, prompt + 3), 0, 40)
    mesh = sharding.make_mesh("seq:4")

    def decode(model, toks, mesh):
        with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            logits, cache = model.prefill(toks[:, :prompt])
        out = [logits]
        for t in range(prompt, prompt + 3):
            lt, cache = model.step(toks[:, t], cache)
            out.append(lt[:, None])
        return jnp.concatenate(out, axis=1)

    ref = nnx.jit(decode, static_argnums=2)(model, toks, None)
    assert not calls
    got = nnx.jit(decode, static_argnums=2)(model, toks, mesh)
    assert calls, "the prefill did not run context-parallel"
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)
    full = nnx.jit(lambda m, t: m(t))(model, toks)   # the full forward, jitted (eager dispatch took ~5 s)
    np.testing.assert_allclose(ref, full, rtol=2e-4, atol=2e-4)


def _memorize_fn(spec, params, **kw):
    def fn(q, k, v, gates, st, chunk):
        return mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=chunk, implementation="xla",
                                   initial_state=st, **kw)
    return fn


@pytest.mark.parametrize("name", ["moneta", pytest.param("titans", marks=SLOW)])
def test_hierarchy_equals_its_one_device_definition_and_is_an_approximation(name):
    """``seq_mode="hierarchy"`` (global memory at the slice's chunk, relayed; slices from it in
    parallel) equals ``hierarchy_reference`` on one device, values and gradients; it differs from the
    exact result (an approximation), and with ``seq_global_chunk = chunk_size`` it is exact."""
    spec, params, args = _inputs(name, T=32)
    st = _state(spec, params, 2)
    mesh = sharding.make_mesh("data:2,seq:4")

    def ref_run(params, args, st, global_chunk):
        y, fin = context.hierarchy_reference(_memorize_fn(spec, params), 4, *args, chunk_size=4,
                                             global_chunk=global_chunk, initial_state=st)
        ct = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(ct * y) + sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(fin)), (y, fin)

    (_, (y, fin)), g = jax.jit(jax.value_and_grad(ref_run, argnums=(0, 1, 2), has_aux=True), static_argnums=3)(
        params, args, st, None)
    got = _run(spec, params, args, mesh=mesh, seq_axis="seq", initial_state=st, seq_mode="hierarchy")
    _close(got, (y, fin, g), tol=1e-3)
    exact = _run(spec, params, args, initial_state=st)
    assert float(jnp.max(jnp.abs(got[0] - exact[0]))) > 1e-2          # coarse global steps: not exact
    fine = _run(spec, params, args, mesh=mesh, seq_axis="seq", initial_state=st, seq_mode="hierarchy",
                seq_global_chunk=4)
    _close(fine, exact, tol=1e-3)


def test_hierarchy_bad_global_chunk_and_bad_mode():
    spec, params, args = _inputs("moneta", T=32)
    mesh = sharding.make_mesh("seq:4")
    with pytest.raises(ValueError, match="seq_global_chunk=6"):
        mj.memorize_batched(spec, params, *args, chunk_size=2, mesh=mesh, seq_axis="seq", seq_mode="hierarchy",
                            seq_global_chunk=6)
    with pytest.raises(ValueError, match="seq_mode must be one of"):
        mj.memorize_batched(spec, params, *args, chunk_size=4, mesh=mesh, seq_axis="seq", seq_mode="tnt")
    from flax import nnx

    from miras_jax.nn import MirasLayer
    with pytest.raises(ValueError, match="seq_mode must be one of"):
        MirasLayer(16, 2, "moneta", chunk_size=4, gate_rank=4, seq_mode="tnt", rngs=nnx.Rngs(0))


def test_an_omega_window_on_a_seq_mesh_is_gathered_not_split(monkeypatch):
    """An Omega window crosses the slices: the layer does not run it context-parallel (the tokens are
    gathered, as for a length that does not split) and equals one device; the engine entry refuses it."""
    from flax import nnx

    from miras_jax.nn import MirasLayer
    calls = []
    real = context.memorize_seq_sharded
    monkeypatch.setattr(context, "memorize_seq_sharded", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layer = MirasLayer(16, 2, "omeganet", preset_kwargs={"degree": None}, chunk_size=4, gate_rank=4,
                       rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 16, 16))
    ref = nnx.jit(lambda m, x: m(x))(layer, x)
    with sharding.use_mesh(sharding.make_mesh("seq:4")):
        got = nnx.jit(lambda m, x: m(x))(layer, x)
    assert not calls
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    spec = mj.presets.get("omeganet")
    q = jnp.ones((1, 8, 1, 2))
    with pytest.raises(NotImplementedError, match="Omega window of 4 tokens"):
        mj.memorize_batched(spec, {"W": jnp.zeros((1, 2, 7))}, q, q, q,
                            {g: jnp.full((1, 8, 1), 0.5) for g in spec.required_gates},
                            mesh=sharding.make_mesh("seq:4"), seq_axis="seq")
