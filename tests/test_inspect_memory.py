"""``experiments.inspect_memory``: per-head memory statistics of a model and of a saved run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs, inspect_memory
from experiments import train as train_lib
from miras_jax import memory as memory_lib
from miras_jax.nn import LMConfig, MirasLM

TOKENS = jax.random.randint(jax.random.key(3), (2, 48), 0, 40)


def _model(preset, **kw):
    cfg = LMConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=2, preset=preset, chunk_size=16,
                   gate_rank=8, pattern="MS", window=8, **kw)
    return MirasLM(cfg, rngs=nnx.Rngs(0))


def test_rows_per_miras_head_and_the_initial_read_matches_a_direct_computation():
    model = _model("moneta")
    rows = inspect_memory.inspect(model, TOKENS)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1)]   # layer 1 is attention
    layer = model.blocks[0].mixer
    w1, w2 = (np.asarray(w) for w in layer.memory_w0)                    # [h, out, in]
    q = np.asarray(layer._qkv(model.blocks[0].norm1(model.embed(TOKENS)), None)[0])  # [b, t, h, k]
    gelu = memory_lib.ACTIVATIONS[layer.spec.memory.activation]
    for h, r in enumerate(rows):
        read = np.einsum("oi,bti->bto", w2[h], np.asarray(gelu(np.einsum("oi,bti->bto", w1[h], q[:, :, h]))))
        np.testing.assert_allclose(r["read_std_0"], np.median(read.std(axis=-1)), rtol=1e-4)
        assert 0 < r["lr_mean"] <= r["lr_max"] <= layer.lr_max
        assert 0 < r["decay_min"] <= r["decay_mean"] < 1
        assert len(r["memory_ratio"]) == len(r["accumulator_growth"]) == 2


def test_a_larger_step_ceiling_grows_moneta_s_accumulators_more():
    """The quantity that showed Moneta's runaway (experiments/README.md, "MQAR diagnostics")."""
    small = inspect_memory.inspect(_model("moneta"), TOKENS)
    large = inspect_memory.inspect(_model("moneta", lr_max=0.3), TOKENS)
    for s, g in zip(small, large):
        assert max(g["accumulator_growth"]) > 2 * max(s["accumulator_growth"])


def test_a_non_accumulating_preset_has_no_accumulator_row():
    rows = inspect_memory.inspect(_model("gated_deltanet"), TOKENS)
    assert rows and all("accumulator_growth" not in r and np.isfinite(r["read_std"]) for r in rows)


@pytest.mark.slow   # ~20-80 s; the default suite stays under 15 min
def test_inspect_run_reads_a_saved_run(tmp_path):
    cfg = configs.override(configs.get("smoke"), ["steps=4", "batch=4", "seq_len=32", "checkpoint_every=2"])
    train_lib.train(cfg, str(tmp_path), stop_after=2, progress=False)
    rows = inspect_memory.inspect_run(str(tmp_path))
    assert [(r["step"], r["layer"], r["head"]) for r in rows] == [(2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)]
    assert all(np.isfinite(r["memory_ratio"]).all() for r in rows)
    assert jnp.isfinite(jnp.asarray([r["read_std"] for r in rows])).all()


def test_inspect_run_of_a_directory_without_checkpoints_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        inspect_memory.inspect_run(str(tmp_path))
