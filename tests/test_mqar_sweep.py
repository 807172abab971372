"""Zoology's MQAR sweep: state sizes, the cells and their pairs, the data defaults, a tiny sweep end
to end, the dry run."""

import json
import os
import subprocess
import sys

import pytest

from experiments import configs, grid, mqar_sweep
from experiments import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(preset_or_pattern: str, d_model: int = 64, **sets):
    arch = "model.pattern=A" if preset_or_pattern == "A" else f"model.preset={preset_or_pattern}"
    sets = [f"{k}={v}" for k, v in sets.items()]
    return configs.override(configs.get("mqar"), [arch, f"model.d_model={d_model}", "model.num_heads=2",
                                                  "model.num_layers=2", *sets])


def test_state_size_of_known_configs():
    # Gated DeltaNet: a k x v matrix per head, no retention / optimizer state: 2 layers x 2 heads x 32 x 32
    assert mqar_sweep.state_size(_model("gated_deltanet"), 64) == 2 * 2 * 32 * 32 == 4096
    # Transformer++: the KV cache, 2 layers x 2 (k and v) x seq_len x d_model; grows with the length
    assert mqar_sweep.state_size(_model("A"), 64) == 2 * 2 * 64 * 64 == 16384
    assert mqar_sweep.state_size(_model("A"), 512) == 2 * 2 * 512 * 64
    assert mqar_sweep.state_size(_model("A", seq_len=128)) == 2 * 2 * 128 * 64        # default: cfg.seq_len
    # Moneta: the 2-layer 4x MLP (2 * 4 k^2 weights) plus its l_q accumulator (as many); the anchor
    # z_* = to_dual(W_0) is the same for every sequence and not counted
    assert mqar_sweep.state_size(_model("moneta"), 64) == 2 * 2 * (2 * 8 * 32 * 32) == 65536
    # Titans: MLP + momentum; the recurrent models' state does not depend on the length
    titans = _model("titans")
    assert mqar_sweep.state_size(titans, 64) == mqar_sweep.state_size(titans, 512) == 65536
    # a hybrid: one Miras layer, one sliding-window layer of 16 slots
    hybrid = _model("gated_deltanet", **{"model.pattern": "MS", "model.window": 16})
    assert mqar_sweep.state_size(hybrid, 64) == 2 * 32 * 32 + 2 * 16 * 64


def test_structural_preset_options_and_the_feature_dimension_in_the_state():
    """``atlas:window=4;degree=2`` cells: structural options as model.preset_kwargs (ints stay ints,
    none is None); the state counts the feature dimension D = 1 + k + k^2 and Muon's momentum."""
    cell = mqar_sweep.cells([64], [64], ["atlas:window=4;degree=2"])[0]
    assert cell.name == "L64_d64_atlas-window4-degree2"
    cfg = mqar_sweep.cell_config(mqar_sweep.base_config(steps=10), cell)
    assert cfg.model.preset == "atlas" and dict(cfg.model.preset_kwargs) == {"window": 4, "degree": 2}
    D = 1 + 32 + 32 * 32
    assert mqar_sweep.state_size(cfg, 64) == 2 * 2 * (2 * 32 * D)      # W [v, D] and S [v, D], 2 layers x 2 heads
    plain = mqar_sweep.cell_config(mqar_sweep.base_config(steps=10),
                                   mqar_sweep.cells([64], [64], ["omeganet:degree=none"])[0])
    assert dict(plain.model.preset_kwargs) == {"degree": None}
    assert mqar_sweep.state_size(plain, 64) == 2 * 2 * 32 * 32
    with pytest.raises(ValueError, match="unknown presets"):
        mqar_sweep.cells([64], [64], ["atlass:window=4"])


def test_cells_kv_pairs_and_configs():
    assert {t: mqar_sweep.kv_pairs(t) for t in (64, 128, 256, 512)} == {64: 4, 128: 8, 256: 16, 512: 64}
    assert mqar_sweep.kv_pairs(1024) == 64 and mqar_sweep.kv_pairs(32) == 2       # outside Zoology's: t // 16
    with pytest.raises(ValueError, match="seq_len must be >= 16"):
        mqar_sweep.kv_pairs(8)
    assert mqar_sweep.ZOOLOGY_LRS == pytest.approx((1e-4, 4.6416e-4, 2.1544e-3, 1e-2), rel=1e-4)
    cs = mqar_sweep.cells([64, 256], [64, 128], ["gated_deltanet", "transformer"])
    assert len(cs) == 8 and cs[0] == mqar_sweep.Cell(64, 4, 64, "gated_deltanet")
    assert [c.name for c in cs[:4]] == ["L64_d64_gated_deltanet", "L64_d64_transformer",
                                        "L64_d128_gated_deltanet", "L64_d128_transformer"]
    assert {c.num_pairs for c in cs if c.seq_len == 256} == {16}
    with pytest.raises(ValueError, match="unknown presets"):
        mqar_sweep.cells([64], [64], ["mambo"])

    base = mqar_sweep.base_config(steps=300)
    assert (base.mqar_filler, base.mqar_query_power, base.mqar_vocab) == ("zero", 0.01, 8192)  # Figure 2
    assert base.steps == base.eval_every == 300                                   # one evaluation, at the end
    assert mqar_sweep.base_config(filler="random", sets=["eval_every=50"]).eval_every == 50
    tf = mqar_sweep.cell_config(base, cs[-1])                                     # L256_d128_transformer
    assert (tf.seq_len, tf.num_pairs, tf.model.d_model, tf.model.pattern) == (256, 16, 128, "A")
    gdn = mqar_sweep.cell_config(base, cs[0])
    assert (gdn.model.preset, gdn.model.pattern, gdn.model.num_layers) == ("gated_deltanet", "M", 2)
    rows = mqar_sweep.describe(base, cs[:2], [1e-3])
    assert [r["state_size"] for r in rows] == [4096, 2 * 2 * 64 * 64]


def test_mqar_config_has_zoology_default_data():
    cfg = configs.get("mqar")
    assert cfg.mqar_filler == "random" and cfg.mqar_query_power == 0.01    # random_non_queries=True
    small = configs.get("mqar_small")
    assert small.mqar_filler == "zero" and small.mqar_query_power == 0.01  # its documented numbers used zero


def test_tiny_sweep_writes_results_and_plot(tmp_path, monkeypatch):
    base = mqar_sweep.base_config(sets=["mqar_vocab=16", "batch=2", "eval_batches=1", "warmup=1",
                                        "log_every=1", "model.chunk_size=16"], steps=3)
    cs = mqar_sweep.cells([64], [16], ["gated_deltanet"])
    (row,) = mqar_sweep.run_sweep(base, cs, [1e-3, 1e-2], str(tmp_path))
    with open(tmp_path / "results.jsonl") as f:
        (saved,) = [json.loads(ln) for ln in f]
    assert saved == json.loads(train_lib.dumps(row))
    assert row["cell"] == "L64_d16_gated_deltanet"
    assert (row["seq_len"], row["num_pairs"], row["d_model"]) == (64, 4, 16)
    assert row["state_size"] == 2 * 2 * 8 * 8 and row["params"] > 0 and row["steps"] == 3
    assert row["filler"] == "zero" and row["lrs"] == [1e-3, 1e-2]
    assert set(row["accuracy_by_lr"]) == {"0.001", "0.01"} and row["best_lr"] in (1e-3, 1e-2)
    assert row["accuracy"] == max(row["accuracy_by_lr"].values()) and 0.0 <= row["accuracy"] <= 1.0
    assert os.path.getsize(tmp_path / mqar_sweep.PLOT) > 1000
    cell = tmp_path / "L64_d16_gated_deltanet"
    assert (cell / "variants" / "lr0.01" / "summary.json").exists()
    assert not (cell / "variants" / "lr0.01" / "checkpoints").exists()          # deleted by default

    # a rerun skips the finished cell; other settings are refused, not mixed in
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: pytest.fail("a finished cell was trained again"))
    assert mqar_sweep.run_sweep(base, cs, [1e-3, 1e-2], str(tmp_path)) == [saved]
    with pytest.raises(train_lib.TrainingError, match="other settings.*steps: 3 -> 4"):
        mqar_sweep.run_sweep(configs.override(base, ["steps=4"]), cs, [1e-3, 1e-2], str(tmp_path))


def test_dry_run_prints_cells_and_state_sizes():
    out = subprocess.run([sys.executable, "-m", "experiments.mqar_sweep", "--dry_run", "--seq_lens=64,512",
                          "--widths=64", "--presets=gated_deltanet,transformer"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    rows = [json.loads(ln) for ln in lines[:-1]]
    assert [(r["seq_len"], r["num_pairs"], r["preset"], r["state_size"]) for r in rows] == [
        (64, 4, "gated_deltanet", 4096), (64, 4, "transformer", 16384),
        (512, 64, "gated_deltanet", 4096), (512, 64, "transformer", 131072)]
    assert rows[0]["lrs"] == pytest.approx(mqar_sweep.ZOOLOGY_LRS)
    assert lines[-1].startswith("4 cells x 4 learning rates") and "filler zero" in lines[-1]
