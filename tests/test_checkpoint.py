"""experiments/checkpoint.py: round trips, save policy, corrupt and interrupted saves, resharding, resume."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.checkpoint import Checkpointer, CheckpointError, checkpoint_dir, resolve_resume

# When one array read fails (garbled data files), orbax abandons the restore's event loop while other
# tensorstore reads are still in flight; their completion callbacks then hit the closed loop. Harmless.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)


def make_state(seed: int) -> dict:
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "dense": {"w": jax.random.normal(k[0], (4, 3), jnp.float32), "b": jax.random.normal(k[1], (3,))},
        "emb": jax.random.normal(k[2], (5, 2), jnp.bfloat16),
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes a float and int32 count
        _, opt_state = tx.update(grads, opt_state, params)  # non-zero mu / nu, count 1
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7 + seed), "rng": k[3]}


def assert_same(got, want) -> None:
    """Same tree, dtypes and bits; typed keys compared through their key data."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(g) == jax.random.key_impl(w)
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def state_files(directory, step: int) -> list[str]:
    root = os.path.join(directory, str(step), "state")
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    assert files, f"orbax wrote nothing under {root}?"
    return files


@pytest.mark.parametrize("template_kind", ["arrays", "shape_dtype_structs"])
def test_round_trip_bit_identical(tmp_path, template_kind):
    state, meta = make_state(0), {"data": {"step": 100}, "config": {"preset": "moneta", "lr": 1e-3}}
    template = make_state(1)  # same structure, different values
    if template_kind == "shape_dtype_structs":
        template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), template)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(100, state, meta)
        assert ckpt.latest_step() == 100
    with Checkpointer(tmp_path / "ckpt") as ckpt:  # a fresh process would open it like this
        assert ckpt.restore_meta() == meta
        got, got_meta, step = ckpt.restore(template)
    assert step == 100 and got_meta == meta
    assert_same(got, state)
    assert got["params"]["emb"].dtype == jnp.bfloat16
    assert isinstance(got["opt_state"][0], optax.ScaleByAdamState)
    assert int(got["opt_state"][0].count) == 1


def test_nnx_state_and_raw_key_data(tmp_path):
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    opt_state = optax.adamw(1e-3).init(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(3),
             "rng": jax.random.key_data(jax.random.key(4))}  # uint32 key data stays uint32 data
    template = jax.tree.map(jnp.zeros_like, state)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {"data": {"step": 3}}, force=True)
        got, meta, step = ckpt.restore(template)
    assert isinstance(got["params"], nnx.State) and step == 3 and meta == {"data": {"step": 3}}
    assert got["rng"].dtype == jnp.uint32
    assert_same(got, state)
    nnx.update(model, got["params"])  # drops back into the model


def test_save_every_and_max_to_keep(tmp_path):
    state, meta = make_state(0), {"data": {"step": 0}}
    with Checkpointer(tmp_path, max_to_keep=2, save_every=10) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert not ckpt.save(5, state, meta)
        assert ckpt.save(10, state, meta)
        assert not ckpt.save(15, state, meta)
        assert ckpt.save(15, state, meta, force=True)
        assert ckpt.all_steps() == [10, 15]
        assert ckpt.save(20, state, meta) and ckpt.save(30, state, meta)
        assert ckpt.all_steps() == [20, 30] and ckpt.latest_step() == 30
        assert not ckpt.save(30, state, meta, force=True)  # already on disk: not rewritten
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["20", "30"]


def garble(files: list[str]) -> None:
    for f in files:
        with open(f, "wb") as fh:
            fh.write(b"\xff\x00garbage")


CORRUPTIONS = {
    "delete_state": lambda d, s: shutil.rmtree(os.path.join(d, str(s), "state")),
    "garble_state": lambda d, s: garble(state_files(d, s)),
    "garble_array_data": lambda d, s: garble([f for f in state_files(d, s) if f"{os.sep}d{os.sep}" in f]),
    "delete_meta": lambda d, s: shutil.rmtree(os.path.join(d, str(s), "meta")),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_newest_falls_back(tmp_path, caplog, corruption):
    template = make_state(5)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, make_state(0), {"data": {"step": 10}}, force=True)
        ckpt.save(20, make_state(1), {"data": {"step": 20}}, force=True)
    CORRUPTIONS[corruption](tmp_path, 20)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 20  # orbax still lists it: only restoring finds the damage
        with caplog.at_level(logging.WARNING):
            got, meta, step = ckpt.restore(template)
        assert step == 10 and meta == {"data": {"step": 10}}
        assert_same(got, make_state(0))
        assert ckpt.restore_meta(10) == {"data": {"step": 10}}
        if corruption == "delete_meta":
            assert ckpt.restore_meta() == {"data": {"step": 10}}
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"{tmp_path}/20 could not be restored" in m for m in warnings), warnings
        with pytest.raises(CheckpointError, match="step 20"):
            ckpt.restore(template, step=20)  # an explicit step does not fall back
        # the resumed run reaches step 20 again: the corrupt checkpoint is replaced
        assert ckpt.save(20, make_state(2), {"data": {"step": 20}}, force=True)
        got, _, step = ckpt.restore(template)
        assert step == 20
        assert_same(got, make_state(2))


def test_all_corrupt_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for s in (10, 20):
            ckpt.save(s, make_state(0), {}, force=True)
    shutil.rmtree(tmp_path / "20" / "state")
    garble(state_files(tmp_path, 10))
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointError, match="could be restored") as info:
        ckpt.restore(make_state(0))
    assert [s for s, _ in info.value.failures] == [20, 10] and "step 20: " in str(info.value)
    assert "\n" not in str(info.value)  # one line: the reasons were each warned


def test_missing_or_empty_directory(tmp_path):
    with Checkpointer(tmp_path / "a" / "b") as ckpt:
        assert os.path.isdir(tmp_path / "a" / "b")
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(make_state(0))
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore_meta()
        ckpt.save(10, make_state(0), {}, force=True)
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 20 .*\[10\]"):
            ckpt.restore(make_state(0), step=20)
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 20 .*\[10\]"):
            ckpt.restore_meta(20)


def test_structure_mismatch(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, make_state(0), {}, force=True)
        other = make_state(0)
        other["params"]["extra"] = jnp.zeros((2,))
        del other["params"]["emb"]
        with pytest.raises(CheckpointError, match="does not match the state template") as info:
            ckpt.restore(other)
        assert "params/extra" in str(info.value) and "params/emb" in str(info.value)
        wider = make_state(0)
        wider["params"]["dense"]["w"] = jnp.zeros((4, 5))
        with pytest.raises(CheckpointError, match=r"params/dense/w \(4, 3\) vs \(4, 5\)"):
            ckpt.restore(wider)


def test_interrupted_save_is_ignored(tmp_path, monkeypatch):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, make_state(0), {"data": {"step": 10}}, force=True)
        ckpt.save(20, make_state(1), {"data": {"step": 20}}, force=True)

        # a real failure mid-save: the state item is written, the meta item raises
        def crash(*args, **kwargs):
            raise OSError("disk died mid-save")

        monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", crash)
        with pytest.raises(OSError, match="disk died"):
            ckpt.save(30, make_state(2), {"data": {"step": 30}}, force=True)
        monkeypatch.undo()
    assert "30" not in os.listdir(tmp_path)
    assert "30.orbax-checkpoint-tmp" in os.listdir(tmp_path)  # orbax's temporary name (0.12.8)
    # leftovers of killed processes, including the timestamped form of older orbax versions
    for name in ("40.orbax-checkpoint-tmp", "50.orbax-checkpoint-tmp-1712345678"):
        os.makedirs(tmp_path / name / "state")
        (tmp_path / name / "state" / "junk").write_bytes(b"junk")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [10, 20] and ckpt.latest_step() == 20
        got, meta, step = ckpt.restore(make_state(5))
        assert step == 20 and meta == {"data": {"step": 20}}
        assert_same(got, make_state(1))
        assert ckpt.save(40, make_state(3), {"data": {"step": 40}}, force=True)  # stale 40 tmp is replaced
        assert ckpt.all_steps() == [10, 20, 40]
        assert_same(ckpt.restore(make_state(5))[0], make_state(3))
    assert "40.orbax-checkpoint-tmp" not in os.listdir(tmp_path)


def test_restore_onto_a_different_sharding(tmp_path):
    devices = jax.devices()
    assert len(devices) >= 8, "tests/conftest.py should give 8 CPU devices"
    mesh2 = Mesh(np.array(devices[:2]), ("x",))
    mesh4 = Mesh(np.array(devices[4:8]), ("y",))
    x = jnp.arange(16.0, dtype=jnp.float32).reshape(8, 2)
    x = jax.device_put(x, NamedSharding(mesh2, PartitionSpec("x")))
    keys = jax.device_put(jax.random.split(jax.random.key(3), 4), NamedSharding(mesh2, PartitionSpec("x")))
    assert len(x.addressable_shards) == 2
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": x, "keys": keys}, {}, force=True)
        for spec in (PartitionSpec(), PartitionSpec("y")):  # replicated / sharded over 4 other devices
            target = NamedSharding(mesh4, spec)
            template = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target),
                        "keys": jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=target)}
            got, _, _ = ckpt.restore(template)
            for name in ("x", "keys"):
                assert got[name].sharding.is_equivalent_to(target, got[name].ndim)  # keys: P(None,) ~ P()
                assert got[name].sharding.device_set == set(devices[4:8])
            np.testing.assert_array_equal(np.asarray(got["x"]), np.arange(16.0).reshape(8, 2))
            np.testing.assert_array_equal(jax.random.key_data(got["keys"]), jax.random.key_data(keys))
        got, _, _ = ckpt.restore({"x": jnp.zeros((8, 2)), "keys": jax.random.split(jax.random.key(0), 4)})
        assert got["x"].sharding == jnp.zeros((8, 2)).sharding  # a plain array template: default device
        np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(x))


def test_resolve_resume(tmp_path):
    work = tmp_path / "run"
    for off in (False, "", None):
        assert resolve_resume(str(work), off) is None
    for auto in (True, "auto", "latest"):
        assert resolve_resume(str(work), auto) is None  # nothing there yet: fresh start
    os.makedirs(checkpoint_dir(work))
    assert resolve_resume(str(work), "auto") is None  # empty checkpoint dir
    with pytest.raises(FileNotFoundError, match="resume path .* does not exist"):
        resolve_resume(str(work), str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="resume path .* holds no checkpoint"):
        resolve_resume(str(work), checkpoint_dir(work))
    os.makedirs(os.path.join(checkpoint_dir(work), "7.orbax-checkpoint-tmp"))  # an interrupted save only
    assert resolve_resume(str(work), True) is None
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resolve_resume(str(work), checkpoint_dir(work))
    with Checkpointer(checkpoint_dir(work)) as ckpt:
        ckpt.save(7, make_state(0), {}, force=True)
    for auto in (True, "auto", "latest"):
        assert resolve_resume(str(work), auto) == checkpoint_dir(work)
    assert resolve_resume(str(tmp_path), checkpoint_dir(work)) == checkpoint_dir(work)
    assert resolve_resume(str(tmp_path), str(work)) == checkpoint_dir(work)  # a workdir: its checkpoints/


def test_restore_meta_of_a_missing_step_names_the_steps_there(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(10, make_state(0), {"a": 1}, force=True)
        assert ckpt.restore_meta(10) == {"a": 1}
        with pytest.raises(CheckpointError, match=r"no checkpoint for step 2500 in .* \(has \[10\]\)"):
            ckpt.restore_meta(2500)
