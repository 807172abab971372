"""experiments.aot: the train step lowered for a TPU topology on this CPU; with libtpu (the
``[tpu]`` extra) also compiled by XLA:TPU (slow tests) with its per-device memory and FLOPs."""

import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from experiments import aot, configs
from miras_jax.nn import LMConfig, MirasLM

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _aot_cli(*args: str) -> dict:
    """``python -m experiments.aot`` in a fresh process: conftest's XLA_FLAGS (8 host devices,
    backend optimisation level 0) and its persistent cache must not reach the TPU compile. libtpu
    takes a per-host lockfile (xdist workers may hold it): a test host has no TPU chips to guard."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "experiments.aot", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_smoke_config_lowers_for_v5e_2x2():
    """Lowered here; compiled only where libtpu is installed (then in a fresh process: _aot_cli)."""
    if importlib.util.find_spec("libtpu") is not None:
        report = _aot_cli("--config=smoke", "--mesh=data:2,fsdp:2", "--topology=v5e:2x2")
        assert report["compiled"] is True, report.get("compile_note")
    else:
        report = aot.check(configs.get("smoke"), "data:2,fsdp:2", topology="v5e:2x2")
        assert report["compiled"] is False and report["fits"] is None
        assert report["compile_note"] == "libtpu not installed: pip install -e '.[tpu]'"
    assert report["lowered"] and report["num_partitions"] == 4 and report["pallas_kernels"] == 0
    assert report["hbm_bytes"] == 16 * 2 ** 30 and report["model_flops_per_token"] > 0


def test_hbm_per_chip_type():
    assert aot.hbm_bytes("v4:2x2x2") == 32 * 2 ** 30 and aot.hbm_bytes("v5p:2x2x1") == 95 * 2 ** 30
    assert aot.hbm_bytes("v7x:2x2") is None
    with pytest.raises(ValueError, match="topology must look like"):
        aot.hbm_bytes("4x4")


def test_memory_fields_peak_counts_donated_buffers_once():
    Stats = collections.namedtuple("Stats", [f"{k}_size_in_bytes" for k in
                                             ("argument", "output", "temp", "alias", "generated_code")])
    got = aot.memory_fields(Stats(100, 90, 50, 80, 7))
    assert got["peak_hbm_bytes"] == 100 + 90 + 50 - 80 and got["temp_bytes"] == 50
    assert got["xla_peak_memory_bytes"] is None  # a jax without peak_memory_in_bytes


def test_oom_bytes_from_xla_messages():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (64.00G) exceeds available HBM (15.75G).")
    assert aot.oom_bytes(msg) == {"oom_required_bytes": 64 * 2 ** 30,
                                  "oom_available_bytes": int(15.75 * 2 ** 30)}
    assert aot.oom_bytes("Used 20.50G of 15.75G hbm.")["oom_required_bytes"] == int(20.5 * 2 ** 30)
    assert aot.oom_bytes("RESOURCE_EXHAUSTED") == {"oom_required_bytes": None, "oom_available_bytes": None}


def test_model_flops_per_token_formula():
    """One global-attention block, untied head: 6 * (body params) + 6 d V + 12 d T."""
    cfg = LMConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, pattern="A", tie_embeddings=False)
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MirasLM(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    total = sum(x.size for x in jax.tree.leaves(params))
    body = total - 2 * 64 * 16
    assert aot.model_flops_per_token(cfg, params, seq_len=32) == 6 * body + 6 * 16 * 64 + 12 * 16 * 32
    sliding = dataclasses.replace(cfg, pattern="S", window=8)
    got = aot.model_flops_per_token(sliding, params, 32, scored_fraction=0.5)
    assert got == 6 * body + 3 * 16 * 64 + 12 * 16 * 8


@pytest.mark.slow
@pytest.mark.parametrize("preset,implementation", [("gated_deltanet", "xla"), ("moneta", "pallas"), ("atlas", "pallas")])
def test_smoke_config_compiles_for_v5e_2x2(preset, implementation):
    pytest.importorskip("libtpu")
    report = _aot_cli("--config=smoke", "--mesh=data:2,fsdp:2", "--topology=v5e:2x2", f"--preset={preset}",
                      f"--set=model.implementation={implementation}")
    assert report["compiled"] is True, report.get("compile_note")
    assert report["fits"] is True and report["peak_hbm_bytes"] > 0 and report["xla_flops_per_device"] > 0
    assert (report["pallas_kernels"] > 0) == (implementation == "pallas")


def test_fit_table_cells_and_markdown():
    from experiments import fit_table

    got = list(fit_table.cells(["lm340m"], ["moneta:M", "moneta:A"], ["xla", "pallas"]))
    assert got == [("lm340m", "moneta", "M", "xla"), ("lm340m", "moneta", "M", "pallas"),
                   ("lm340m", "moneta", "A", "xla")]          # attention-only: once
    assert list(fit_table.cells(["lm170m"], ["ttt_linear:M"], ["xla", "pallas"])) == [
        ("lm170m", "ttt_linear", "M", "xla")]                 # no kernel for a depth-1 MLP: no pallas cell
    assert fit_table._last_error("Traceback\n  ...\nValueError: bad mesh\nFor simplicity, JAX ...") == (
        "ValueError: bad mesh")
    assert fit_table.micro_batches(8) == [8, 4, 2, 1] and fit_table.micro_batches(1) == [1]
    assert fit_table.cap("lm780m", "data:8,fsdp:16,tensor:2") == 1 and fit_table.cap("lm780m", "fsdp:16") == 8
    cell = {"cell_config": "lm780m", "preset": "moneta", "pattern": "M", "implementation": "xla",
            "topology": "v6e:4x4"}
    rows = [{**cell, "micro_batch": 8, "grad_accum": 1, "compiled": False, "fits": False,
             "oom_required_bytes": 40 * 2 ** 30},
            {**cell, "micro_batch": 4, "grad_accum": 2, "compiled": True, "fits": True,
             "peak_hbm_bytes": 3 * 2 ** 30, "compile_s": 170.0},
            {**cell, "pattern": "A", "micro_batch": 8, "compiled": False, "fits": False,
             "oom_required_bytes": 29.21 * 2 ** 30},
            {**cell, "pattern": "A", "micro_batch": 1, "compiled": False, "fits": False,
             "oom_required_bytes": 19 * 2 ** 30}]
    md = fit_table.table(rows).splitlines()
    assert len(md) == 4                                       # one row per cell
    assert md[2] == "| lm780m | moneta | xla | True | True | 4 | 2 | 3.00 | 170.0 |  |"  # largest that fits
    assert md[3].startswith("| lm780m | Transformer++ | xla | False | False | 1 |") and "OOM: temporaries 19.00 GiB" in md[3]
