"""Grids of variants in one vmapped program: equal to separate runs; outputs; bad input."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments import configs, grid
from experiments import train as train_lib


def _cfg():
    cfg = configs.get("smoke")
    model = dataclasses.replace(cfg.model, preset="moneta", d_model=32, num_heads=2, chunk_size=16, num_layers=1)
    return dataclasses.replace(cfg, model=model, steps=4, log_every=1, eval_every=4, warmup=2, lr=2e-3,
                               eval_batches=1)


# (p values, the variants also trained alone): by default one of two (each separate run
# compiles its own program); -m slow: all three.
@pytest.mark.parametrize("ps,trained_alone", [([3.0, 4.0], [1]),
                                      pytest.param([2.0, 3.0, 4.0], [0, 1, 2], marks=pytest.mark.slow)])
def test_grid_equals_separate_runs(tmp_path, ps, trained_alone):
    cfg = _cfg()
    g = {"p": ps, "q": [3.0]}
    results = grid.run_grid(cfg, g, str(tmp_path / "grid"), progress=False)
    with open(tmp_path / "grid" / "metrics.jsonl") as f:
        grid_losses = np.array([r["losses"] for r in map(json.loads, f)])          # [steps, K]
    assert grid_losses.shape == (4, len(ps))
    for i, vcfg in enumerate(grid.grid_configs(cfg, grid.variants(g))):
        if i not in trained_alone:
            continue
        train_lib.train(vcfg, str(tmp_path / f"run{i}"), progress=False)
        alone = [r["loss"] for r in train_lib._read_metrics(str(tmp_path / f"run{i}" / "metrics.jsonl"), None)]
        # vmapped (batched) matmuls sum in another order than the single run's: the first steps
        # agree to rounding (a wrong hparam or update would show at step 2 far above 1e-5); Adam
        # then amplifies rounding ~10x per step, so later steps get a looser tolerance.
        np.testing.assert_allclose(grid_losses[:3, i], alone[:3], rtol=1e-5)
        np.testing.assert_allclose(grid_losses[:, i], alone, rtol=5e-3)
    assert len({round(r["final_loss"], 6) for r in results}) == len(ps)  # the variants really differ
    for name in ("results.md", "heatmap.png"):
        assert os.path.getsize(tmp_path / "grid" / name) > 0
    # every variant directory is a normal run: evaluate reads its checkpoint with its own hparams
    cfg_v, _, _, rest, step = train_lib.load_run(str(tmp_path / "grid" / "variants" / "p3_q3"))
    assert step == 4 and dict(cfg_v.model.hparams) == {"p": 3.0, "q": 3.0}
    assert float(rest["blocks"][0]["mixer"]["hparams"]["bias/p"][...]) == 3.0
    # a directory holds one grid: a second one is refused, never mixed with the saved variants
    with pytest.raises(train_lib.TrainingError, match="already holds a grid.*--overwrite"):
        grid.run_grid(cfg, {"p": [2.0], "q": [3.0]}, str(tmp_path / "grid"), progress=False)


@pytest.mark.slow   # ~10 s; the lr grid also runs in tests/test_mqar_sweep.py (default suite)
def test_grid_over_the_learning_rate_equals_the_run_with_that_lr(tmp_path):
    cfg = _cfg()                                   # lr 2e-3: neither variant's scale is 1
    g = {"lr": [1e-3, 4e-3]}
    results = grid.run_grid(cfg, g, str(tmp_path / "grid"), progress=False)
    with open(tmp_path / "grid" / "metrics.jsonl") as f:
        grid_losses = np.array([r["losses"] for r in map(json.loads, f)])          # [steps, K]
    vcfgs = grid.grid_configs(cfg, grid.variants(g))
    assert [c.lr for c in vcfgs] == [1e-3, 4e-3] and all(c.model == cfg.model for c in vcfgs)
    train_lib.train(vcfgs[1], str(tmp_path / "alone"), progress=False)
    alone = [r["loss"] for r in train_lib._read_metrics(str(tmp_path / "alone" / "metrics.jsonl"), None)]
    # step 1 is the same forward for both (warmup starts at lr 0); the updates differ from step 2 on
    np.testing.assert_allclose(grid_losses[:3, 1], alone[:3], rtol=1e-5)   # tolerances as above
    np.testing.assert_allclose(grid_losses[:, 1], alone, rtol=5e-3)
    assert abs(grid_losses[-1, 0] - grid_losses[-1, 1]) > 1e-4                 # the lr really differs
    assert [r["lr"] for r in results] == [1e-3, 4e-3]
    assert train_lib.load_run(str(tmp_path / "grid" / "variants" / "lr0.004"))[0].lr == 4e-3


def test_grid_bad_input(tmp_path):
    cfg = _cfg()
    with pytest.raises(ValueError, match="no hyper-parameter 'pp'"):
        grid.run_grid(cfg, {"pp": [1.0]}, str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="q"):
        grid.run_grid(cfg, {"q": [1.0]}, str(tmp_path), progress=False)    # l_q retention needs q >= 2
    with pytest.raises(ValueError, match="name=v1"):
        grid.parse_grid(["p"])
    assert grid.parse_grid(["p=1,2", "q=3"]) == {"p": [1.0, 2.0], "q": [3.0]}
    with pytest.raises(ValueError, match="lr must be > 0"):
        grid.run_grid(cfg, {"lr": [1e-3, 0.0]}, str(tmp_path), progress=False)
