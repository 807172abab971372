"""experiments.bench_context: one tiny point measures a finite training step with every promised
field; a point that dies is an error line, not a crash; the plot draws both."""

import json
import math

from experiments import bench_context as bc

FIELDS = ("model", "pattern", "preset", "T", "batch", "tokens_per_step", "compile_s", "step_s", "tokens_per_s",
          "peak_rss_mb", "grad_norm", "finite", "backend", "device_count")


def test_one_point_measures_a_finite_train_step():
    # hybrid (pattern MS) with 2 layers: one Miras (gated_deltanet) block and one sliding-window block
    row = bc.measure("hybrid", 64, tokens_per_step=200, warmup=1, steps=2, sets=("model.num_layers=2",))
    assert "error" not in row, row
    assert all(k in row for k in FIELDS), set(FIELDS) - set(row)
    assert (row["pattern"], row["preset"], row["window"]) == ("MS", "gated_deltanet", 64)
    assert (row["batch"], row["tokens_per_step"]) == (3, 192)     # 200 // 64 rows of 64
    assert row["finite"] is True and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    assert row["compile_s"] > 0 and len(row["step_times"]) == 2
    assert min(row["step_times"]) <= row["step_s"] <= max(row["step_times"])
    assert math.isclose(row["tokens_per_s"], 192 / row["step_s"], rel_tol=1e-2)
    assert row["peak_rss_mb"] > 0
    json.dumps(row, allow_nan=False)                               # strict JSON


def test_a_point_that_dies_is_an_error_line(tmp_path):
    row = bc.run_point("gdn", 64, args=["--steps=1"], max_rss_mb=1.0, timeout_s=60)
    assert row["model"] == "gdn" and row["T"] == 64 and row["error"].startswith("killed: host RSS")
    ok = {"model": "gdn", "T": 32, "tokens_per_s": 1e3, "peak_rss_mb": 500.0, "finite": False,
          "tokens_per_step": 64, "backend": "cpu", "device_count": 1}
    assert bc.plot([ok, {**ok, "T": 64, "finite": True}, row], str(tmp_path / "context.png"))
    assert (tmp_path / "context.png").stat().st_size > 1000
