"""Meshes and logical-axis rules; sharded training equals one device; sharded checkpoints restore
onto another mesh shape (end to end through train.py's resume); the AOT check for a TPU slice.
Runs on 8 virtual CPU devices (conftest.py)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import miras_jax as mj
from experiments import configs, data
from experiments import train as train_lib
from experiments.checkpoint import Checkpointer
from miras_jax import sharding


def _cfg(preset="yaad", **kw):
    cfg = configs.get("smoke")
    model = dataclasses.replace(cfg.model, preset=preset, d_model=32, num_heads=2, chunk_size=16, num_layers=1)
    return dataclasses.replace(cfg, model=model, **kw)


def test_parse_mesh_and_errors():
    assert sharding.parse_mesh("data:2,fsdp:4") == {"data": 2, "fsdp": 4, "seq": 1, "tensor": 1}
    for bad, msg in (("model:2", "unknown mesh axis"), ("data:0", "positive"), ("data:2,data:2", "twice"),
                     ("", "empty")):
        with pytest.raises(ValueError, match=msg):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh("data:4,fsdp:4")
    assert sharding.make_mesh("data:1").devices.size == 1


def test_parameters_are_sharded_as_the_rules_say():
    cfg = _cfg()
    graphdef, params, rest, tx, _ = train_lib.build(cfg, 64)
    placement, params, opt_state = train_lib.place("data:2,fsdp:2,tensor:2", params, tx, cfg.batch)
    mixer = params["blocks"][0]["mixer"]
    spec = lambda x: x.sharding.spec  # noqa: E731
    assert spec(params["embed"]["embedding"]) == P("tensor", "fsdp")
    assert spec(mixer["wq"]["kernel"]) == P("fsdp", "tensor")
    assert spec(mixer["wo"]["kernel"]) == P("tensor", "fsdp")
    assert spec(mixer["memory_w0"][0]) == P("tensor", None, None)          # heads over tensor
    assert spec(params["blocks"][0]["mlp"]["w_gate"]["kernel"]) == P("fsdp", "tensor")
    assert spec(params["norm"]["scale"]) == P(None)                         # unknown: replicated
    # AdamW moments follow the parameters
    mu = opt_state[1][0].mu
    assert spec(mu["blocks"][0]["mixer"]["wq"]["kernel"]) == P("fsdp", "tensor")
    # a dimension the axes do not divide is replicated
    mesh = sharding.make_mesh("data:2,fsdp:2,tensor:2")
    assert sharding.spec_for(mesh, ("heads", "embed"), (3, 32)) == P(None, "fsdp")


def _one_step(cfg, mesh_text):
    graphdef, params, rest, tx, _ = train_lib.build(cfg, 64)
    task = train_lib.make_task(cfg, None)
    batch = task.train_batch(cfg.seed, 0)
    if mesh_text:
        placement, params, opt_state = train_lib.place(mesh_text, params, tx, cfg.batch)
        batch = placement.put_batch(batch)
    else:
        placement, opt_state = None, tx.init(params)
    step, _ = train_lib.make_steps(graphdef, rest, tx, placement)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(2):
            params, opt_state, loss, _, _ = step(params, opt_state, batch)
    return float(loss), jax.tree.map(np.asarray, params), params


@pytest.mark.parametrize("mesh_text,preset", [("data:2,fsdp:4", "yaad"),
                                              ("data:2,seq:4", "gated_deltanet"),   # context parallel: summaries
                                              ("data:2,seq:4", "yaad")])            # ... the state travels
def test_train_step_on_a_2x4_mesh_equals_one_device(mesh_text, preset, monkeypatch):
    from miras_jax.engine import context
    calls = []
    real = context.memorize_seq_sharded
    monkeypatch.setattr(context, "memorize_seq_sharded", lambda *a, **kw: calls.append(kw["mode"]) or real(*a, **kw))
    cfg = _cfg(preset)
    loss1, p1, _ = _one_step(cfg, None)
    loss8, p8, placed = _one_step(cfg, mesh_text)
    assert bool(calls) == ("seq" in mesh_text)     # the memory ran context-parallel on the seq mesh
    assert abs(loss1 - loss8) < 1e-5
    a, b = (np.concatenate([x.ravel() for x in jax.tree.leaves(p)]) for p in (p8, p1))
    # Adam's normalised step moves a parameter by ~lr whatever its gradient's size, so a gradient
    # that is ~0 up to rounding (summed in another order on 8 devices) may step either way: allow
    # that (<= 2 steps of lr <= 1e-3 here) for a handful of entries, and 1e-5 for the rest.
    np.testing.assert_allclose(a, b, atol=2.5e-3)
    assert np.mean(np.abs(a - b) <= 1e-5 + 1e-4 * np.abs(b)) > 0.995
    assert len(jax.tree.leaves(placed)[0].sharding.device_set) == 8


def test_checkpoint_saved_on_2x4_restores_on_1x8(tmp_path):
    cfg = _cfg()
    _, params, _, tx, _ = train_lib.build(cfg, 64)
    _, p24, o24 = train_lib.place("data:2,fsdp:4", params, tx, cfg.batch)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, {"params": p24, "opt_state": o24}, {"config": {}}, force=True)
    _, p18, o18 = train_lib.place("fsdp:8", params, tx, cfg.batch)
    template = {"params": jax.tree.map(jnp.zeros_like, p18), "opt_state": o18}
    with Checkpointer(tmp_path / "ck") as ck:
        state, _, step = ck.restore(template)
    assert step == 3
    got = state["params"]["blocks"][0]["mixer"]["wq"]["kernel"]
    assert got.sharding.spec == P("fsdp", None) and got.sharding.mesh.shape["fsdp"] == 8
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(p24)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_run_resumed_on_another_mesh_continues(tmp_path):
    """Save on a 2x4 mesh, resume on 1x8: the run continues where it stopped. Across meshes the
    sums run in another order, so losses agree to rounding, not bit for bit (a smooth preset:
    Yaad's Huber switch would flip branches on such differences and the runs would drift apart).
    The uninterrupted run uses the first mesh (its program is compiled once, for both)."""
    cfg = _cfg("gated_deltanet", steps=4, log_every=1, eval_every=4, checkpoint_every=2, warmup=1, lr=1e-3,
               eval_batches=1)
    full = train_lib.train(cfg, str(tmp_path / "one"), progress=False, mesh="data:2,fsdp:4")
    train_lib.train(cfg, str(tmp_path / "two"), progress=False, mesh="data:2,fsdp:4", stop_after=2)
    resumed = train_lib.train(cfg, str(tmp_path / "two"), progress=False, mesh="fsdp:8", resume="auto")
    rows = lambda d: [r["loss"] for r in train_lib._read_metrics(str(tmp_path / d / "metrics.jsonl"), None)]  # noqa: E731
    assert len(rows("two")) == len(rows("one")) == 4
    np.testing.assert_allclose(rows("two"), rows("one"), rtol=2e-5)
    assert resumed["steps_done"] == full["steps_done"] == 4


def test_host_rows_split_a_global_batch():
    b = {"inputs": np.arange(12).reshape(6, 2)}
    parts = [data.host_rows(b, i, 3)["inputs"] for i in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), b["inputs"])
    with pytest.raises(ValueError, match="cannot be split"):
        data.host_rows(b, 0, 4)
    ds = data.make_dataset(lambda s, t: {"x": np.full((4, 1), t)}, 0, 3, shard=(1, 2))
    assert ds[2]["x"].shape == (2, 1)


def test_aot_check_lowers_for_a_tpu_slice():
    from experiments import aot

    report = aot.check(_cfg(), "data:4,fsdp:4", topology="v5e:4x4")
    assert report["lowered"] and report["devices"] == 16
    assert report["num_partitions"] == 16
    with pytest.raises(ValueError, match="topology 'v5e:4x4' has 16"):
        aot.check(_cfg(), "data:2,fsdp:4", topology="v5e:4x4")


def _collectives(compiled_text: str) -> list[str]:
    return re.findall(r"= \S+ (all-gather|all-to-all|collective-permute|reduce-scatter)\(", compiled_text)


@pytest.mark.parametrize("heads_sharded", [False, True])
def test_batched_rows_need_no_communication(heads_sharded):
    """``memorize_batched``'s rows (one ``B * H`` vmap, or ``[B, H]`` when ``head_axes`` is given)
    keep every device on its own block: fwd+bwd compiles with no gather / permute between devices
    (the parameters' gradient all-reduce over the batch is the only collective) and equals one device."""
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = mj.presets.get("moneta")
    B, T, H, d = 4, 32, 8, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, d))
    g = {"lr": jnp.full((B, T, H), 0.1), "decay": jnp.full((B, T, H), 0.95)}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[1], H))
    head_axes = "tensor" if heads_sharded else None
    rows = P("data", None, head_axes)
    put = lambda t, s: jax.device_put(t, jax.sharding.NamedSharding(mesh, s))  # noqa: E731

    def loss(p, q_, g_, **kw):
        y = mj.memorize_batched(spec, p, q_, q_, q_, g_, chunk_size=8, implementation="xla", **kw)[0]
        return jnp.sum(y ** 2)

    f = jax.jit(jax.grad(lambda p, q_, g_: loss(p, q_, g_, head_axes=head_axes), argnums=(0, 1)))
    args = (put(params, P(head_axes)), put(q, rows), put(g, rows))
    assert _collectives(f.lower(*args).compile().as_text()) == []
    want = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, q, g)
    for a, b in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(want)):   # float32, reordered sums
        np.testing.assert_allclose(a, b, atol=1e-3 * float(jnp.abs(b).max()))
