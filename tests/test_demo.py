"""experiments.demo (issue 29, item 5): every preset memorises the demo's pairs at its own settings."""

import jax.numpy as jnp
import pytest

import miras_jax as mj
from experiments import demo


def test_every_preset_has_a_setting():
    assert set(demo.SETTINGS) == set(mj.presets.names())


@pytest.mark.parametrize("name", mj.presets.names())
def test_preset_memorises_at_its_settings(name):
    r = demo.recall_error(name)
    assert r["memorised"] and r["recall_rel_err"] < r["floor"] + demo.THRESHOLD, r
    # a memory that cannot store arbitrary values (a floor above 0) says why
    assert (r["floor"] > 0) == ("note" in r), r
    assert set(r["gates"]) == set(mj.presets.get(name).required_gates)


def test_best_answer_is_a_layer_norm_output():
    """``best - k`` is zero-mean with norm sqrt(d); a matrix memory's best answer is ``v``."""
    keys, values = demo.random_pairs(4, 8, 0)
    best = demo.best_answer(mj.presets.get("ttt_mlp").memory, keys, values)
    u = best - keys
    assert jnp.allclose(u.mean(-1), 0.0, atol=1e-5)
    assert jnp.allclose(jnp.linalg.norm(u, axis=-1), jnp.sqrt(8.0), rtol=1e-5)
    assert demo.best_answer(mj.presets.get("deltanet").memory, keys, values) is values


def test_moneta_at_lr_1_reads_only_its_residual():
    """The failure the settings avoid: A runs away, W shrinks under the LayerNorm eps, M(k) ~ k."""
    r = demo.recall_error("moneta", lr=1.0, epochs=1)
    keys, values = demo.random_pairs(16, 32, 0)
    assert not r["memorised"]
    assert abs(r["recall_rel_err"] - demo.rel_err(keys, values)) < 0.01, r
