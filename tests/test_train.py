"""The training experiment end to end: a tiny run writes what it promises, a resumed run continues
exactly, bad input fails clearly, and saved runs evaluate and sample."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import configs, evaluate, generate
from experiments import train as train_lib
from experiments.checkpoint import Checkpointer

# one block (the smoke config has two): what these tests check (metrics, checkpoints, resume,
# evaluation) does not depend on the depth, and each run compiles half the model
TINY = configs.override(configs.get("smoke"), ["steps=8", "log_every=1", "eval_every=4", "checkpoint_every=2",
                                               "batch=4", "seq_len=32", "model.num_layers=1"])


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def test_smoke_run_writes_metrics_checkpoints_plot_summary(tmp_path, monkeypatch):
    made = []
    make_steps = train_lib.make_steps
    monkeypatch.setattr(train_lib, "make_steps", lambda *a, **k: made.append(make_steps(*a, **k)) or made[-1])
    summary = train_lib.train(TINY, str(tmp_path), progress=False)
    ((train_step, _),) = made
    assert train_step._cache_size() == 1   # step 1 returns its inputs' types: no second compile
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert "eval_mqar_accuracy" in rows[3] and "eval_mqar_accuracy" in rows[7]
    assert summary["finished"] and summary["params"] > 0 and summary["train_tokens_per_s"] > 0
    assert os.path.getsize(tmp_path / "loss.png") > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["steps_done"] == 8
    with Checkpointer(tmp_path / "checkpoints") as ck:
        assert ck.latest_step() == 8
    out = evaluate.evaluate_run(str(tmp_path))
    assert out["step"] == 8
    np.testing.assert_allclose(out["eval_mqar_loss"], rows[-1]["eval_mqar_loss"], rtol=1e-5)
    assert [r["step"] for r in summary["eval_curve"]] == [4, 8]
    assert summary["eval_curve"][-1]["eval_mqar_loss"] == rows[-1]["eval_mqar_loss"]
    assert 0 < summary["train_s"] == rows[-1]["elapsed_s"]
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in scalars["loss"]], [r["loss"] for r in rows], rtol=1e-6)
    assert [s for s, _ in scalars["eval_mqar_accuracy"]] == [4, 8]


def _tensorboard_scalars(logdir) -> dict:
    """``{tag: [(step, value), ...]}`` from the event files (TFRecord framing: length, crc, data, crc),
    read as TensorBoard does: a ``SessionLog.START`` at step ``s`` discards the values at steps >= ``s``."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(logdir)):
        buf = (logdir / name).read_bytes()
        i = 0
        while i < len(buf):
            (n,) = struct.unpack("<Q", buf[i:i + 8])
            ev = event_pb2.Event.FromString(buf[i + 12:i + 12 + n])
            i += 16 + n
            if ev.session_log.status == ev.session_log.START:  # purge_step: drop steps >= it
                out = {tag: [(s, x) for s, x in vals if s < ev.step] for tag, vals in out.items()}
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_resume_continues_exactly(tmp_path):
    """4 steps, 'crash', resume to 8 == 8 uninterrupted steps: same losses, same final params."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train_lib.train(TINY, a, progress=False)
    first = train_lib.train(TINY, b, stop_after=5, progress=False)
    assert not first["finished"]
    # a crash after step 5 was logged but before its checkpoint was finalised: resume from step 4
    shutil.rmtree(os.path.join(b, "checkpoints", "5"))
    train_lib.train(TINY, b, resume="auto", progress=False)
    ra, rb = _rows(a), _rows(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    np.testing.assert_array_equal([r["loss"] for r in rb], [r["loss"] for r in ra])
    ta, tb = _tensorboard_scalars(tmp_path / "a" / "tensorboard"), _tensorboard_scalars(tmp_path / "b" / "tensorboard")
    assert [s for s, _ in tb["loss"]] == list(range(1, 9))   # step 5 once, not twice
    np.testing.assert_array_equal([v for _, v in tb["loss"]], [v for _, v in ta["loss"]])
    _, _, pa, _, _ = train_lib.load_run(a)
    _, _, pb, _, _ = train_lib.load_run(b)
    for x, y in zip(jax_leaves(pa), jax_leaves(pb)):
        np.testing.assert_array_equal(x, y)


def test_resume_accepts_a_checkpoint_that_predates_a_model_field(tmp_path, monkeypatch):
    """A checkpoint saved before an ``LMConfig`` field existed resumes (the field reads as its
    default); a model that really differs is refused."""
    full = train_lib._config_dict

    def old_format(cfg):  # what a checkpoint written before LMConfig.lr_max existed records
        d = full(cfg)
        d["model"].pop("lr_max")
        return d

    monkeypatch.setattr(train_lib, "_config_dict", old_format)
    train_lib.train(TINY, str(tmp_path), stop_after=4, progress=False)
    monkeypatch.setattr(train_lib, "_config_dict", full)
    with pytest.raises(train_lib.TrainingError, match="cannot resume"):
        train_lib.train(configs.override(TINY, ["model.lr_max=0.5"]), str(tmp_path), resume="auto", progress=False)
    summary = train_lib.train(TINY, str(tmp_path), resume="auto", progress=False)
    assert summary["finished"] and summary["steps_done"] == 8


@pytest.mark.slow   # ~20-80 s; the default suite stays under 15 min
def test_a_run_saves_its_resolved_step_ceiling_and_an_unresolved_one_reads_as_it_was_written(tmp_path,
                                                                                              monkeypatch):
    """Checkpoints record the ``lr_max`` the layers used, so a later change of the per-spec default
    cannot silently change a resumed run; one saved as None (before this) trained at
    ``LR_MAX[memory kind]`` (0.1 for an MLP memory; now 1e-3 for Moneta) and resumes or loads only as that."""
    from miras_jax.nn.layer import LR_MAX_UNRESOLVED as LR_MAX
    from miras_jax.nn.layer import default_lr_max

    cfg = configs.override(TINY, ["model.preset=moneta", "steps=4"])
    new = default_lr_max(cfg.model.spec())
    assert new != LR_MAX["mlp"]
    train_lib.train(cfg, str(tmp_path / "now"), stop_after=2, progress=False)
    with Checkpointer(tmp_path / "now" / "checkpoints") as ck:
        assert ck.restore_meta()["config"]["model"]["lr_max"] == new
    assert train_lib.load_run(str(tmp_path / "now"))[0].model.lr_max == new

    full = train_lib._config_dict

    def unresolved(c):  # what a run saved before it resolved lr_max (and before anchored retention)
        d = full(c)
        d["model"]["lr_max"] = None
        d["model"]["preset_kwargs"] = [kv for kv in d["model"]["preset_kwargs"] if kv[0] != "anchor"]
        return d

    monkeypatch.setattr(train_lib, "_config_dict", unresolved)
    monkeypatch.setattr(train_lib, "resolved", lambda c: c)
    train_lib.train(configs.override(cfg, ["model.lr_max=0.1"]), str(tmp_path / "old"), stop_after=2, progress=False)
    monkeypatch.undo()
    with pytest.raises(train_lib.TrainingError, match="cannot resume"):
        train_lib.train(cfg, str(tmp_path / "old"), resume="auto", progress=False)
    got, graphdef, params, rest, _ = train_lib.load_run(str(tmp_path / "old"))
    assert got.model.lr_max == LR_MAX["mlp"]
    assert train_lib.merge(graphdef, params, rest).blocks[0].mixer.lr_max == LR_MAX["mlp"]
    assert not got.model.spec().retention.anchor     # saved before anchors: the paper's map
    old = configs.override(cfg, ["model.lr_max=0.1"])
    with pytest.raises(train_lib.TrainingError, match="cannot resume") as err:   # anchored now: a different model
        train_lib.train(old, str(tmp_path / "old"), resume="auto", progress=False)
    # one line that names the field (issue 29, item 4)
    assert "model.preset_kwargs (checkpoint [['anchor', False]], this run [['anchor', True]])" in str(err.value)
    assert "\n" not in str(err.value) and "model.lr_max" not in str(err.value)
    old = dataclasses.replace(old, model=dataclasses.replace(old.model, preset_kwargs=(("anchor", False),)))
    summary = train_lib.train(old, str(tmp_path / "old"), resume="auto", progress=False)
    assert summary["finished"] and summary["steps_done"] == 4


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    train_lib.train(TINY, str(tmp_path), stop_after=4, progress=False)
    good = train_lib.masked_sums
    monkeypatch.setattr(train_lib, "masked_sums", lambda logits, batch: tuple(x * jnp.nan for x in good(logits, batch)))
    with pytest.raises(train_lib.TrainingError, match="loss is nan at step 5.*last good checkpoint \\(step 4\\)"):
        train_lib.train(TINY, str(tmp_path), resume="auto", progress=False)
    monkeypatch.setattr(train_lib, "masked_sums", good)
    assert train_lib.load_run(str(tmp_path))[4] == 4


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    """Not "the last good checkpoint (step None)" (issue 29, item 7)."""
    good = train_lib.masked_sums
    monkeypatch.setattr(train_lib, "masked_sums", lambda logits, batch: tuple(x * jnp.nan for x in good(logits, batch)))
    with pytest.raises(train_lib.TrainingError, match="loss is nan at step 1; stopping. No checkpoint was saved") as err:
        train_lib.train(TINY, str(tmp_path), progress=False)
    assert "None" not in str(err.value)


def test_bad_input_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown config 'nope'"):
        configs.get("nope")
    with pytest.raises(ValueError, match="unknown config field"):
        configs.override(TINY, ["stepz=3"])
    with pytest.raises(ValueError, match="unknown preset|valid"):
        train_lib.train(configs.override(TINY, ["model.preset=nope"]), str(tmp_path / "p"), progress=False)
    lm = dataclasses.replace(TINY, task="charlm")
    with pytest.raises(ValueError, match="--data"):
        train_lib.train(lm, str(tmp_path / "c"), progress=False)
    with pytest.raises(FileNotFoundError):
        train_lib.train(lm, str(tmp_path / "c"), data_path=str(tmp_path / "missing.txt"), progress=False)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        train_lib.train(lm, str(tmp_path / "c"), data_path=str(tmp_path / "empty.txt"), progress=False)
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01" * 1000)
    with pytest.raises(ValueError, match="binary"):
        train_lib.train(lm, str(tmp_path / "c"), data_path=str(tmp_path / "bin.dat"), progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_lib.train(TINY, str(tmp_path / "r"), resume=str(tmp_path / "nowhere"), progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        evaluate.evaluate_run(str(tmp_path / "nowhere"))


def test_byte_level_run_samples_text(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 200)
    lm = configs.override(dataclasses.replace(TINY, task="charlm"),
                          ["model.pattern=MS", "model.window=8", "model.num_layers=2"])   # an M and an S block
    summary = train_lib.train(lm, str(tmp_path / "run"), data_path=str(text), progress=False)
    loss = summary["eval_val_loss"]
    np.testing.assert_allclose([summary["val_bits_per_byte"], summary["val_perplexity"]],
                               [loss / np.log(2), np.exp(loss)], rtol=1e-6)
    again = evaluate.evaluate_run(str(tmp_path / "run"), data_path=str(text))["val_perplexity"]
    np.testing.assert_allclose(again, summary["val_perplexity"], rtol=1e-5)
    out = generate.sample(str(tmp_path / "run"), "to be", 12, temperature=0.0)
    assert isinstance(out, str) and len(out.encode("utf-8", errors="replace")) >= 1
    out2 = generate.sample(str(tmp_path / "run"), "to be", 12, temperature=0.0)
    assert out == out2


@pytest.mark.slow   # ~20-80 s; the default suite stays under 15 min
def test_compare_writes_table_and_plot_at_matched_size(tmp_path):
    from experiments import compare

    cfg = configs.override(TINY, ["steps=2", "eval_every=2"])
    rows = compare.compare(cfg, ["gated_deltanet", "moneta"], str(tmp_path), target_params=40_000)
    assert [r["preset"] for r in rows] == ["gated_deltanet", "moneta"]
    assert all(abs(r["params"] - 40_000) / 40_000 < 0.25 for r in rows)
    table = (tmp_path / "results.md").read_text()
    assert "| gated_deltanet |" in table and "| moneta |" in table and "eval_mqar_accuracy" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown presets"):
        compare.compare(cfg, ["nope"], str(tmp_path))


def test_mixed_pair_mqar_trains_and_evaluates_at_num_pairs(tmp_path):
    cfg = configs.override(TINY, ["steps=2", "eval_every=2", "mqar_train_pairs=1:2"])
    task = train_lib.make_task(cfg, None)
    assert task.train_batch(0, 0)["positions"].shape == (4, 2)       # max(mqar_train_pairs) scored slots
    assert task.eval_sets["mqar"][0]["positions"].shape == (4, cfg.num_pairs)
    summary = train_lib.train(cfg, str(tmp_path), progress=False)
    assert summary["finished"] and np.isfinite(summary["eval_mqar_loss"])


def test_mqar_data_options_reach_train_and_eval_batches():
    cfg = configs.override(TINY, ["mqar_filler=zero", "mqar_query_power=0.01"])
    task = train_lib.make_task(cfg, None)
    for b in (task.train_batch(0, 0), task.eval_sets["mqar"][0]):
        pos = b["positions"]
        assert ((pos - 2 * cfg.num_pairs) % 2 == 0).all()            # power law: even offsets
        scored = np.zeros_like(b["inputs"], bool)
        np.put_along_axis(scored, pos, True, axis=1)
        scored[:, :2 * cfg.num_pairs] = True
        assert (b["inputs"][~scored] == 0).all()                      # zero filler
    with pytest.raises(ValueError, match="filler must be one of"):
        train_lib.make_task(configs.override(TINY, ["mqar_filler=noise"]), None)


def test_bench_mqar_keeps_the_config_schedule_and_reports_the_target(tmp_path, capsys):
    from experiments import bench_train

    sets = ["steps=3", "batch=2", "seq_len=32", "num_pairs=4", "mqar_vocab=64", "eval_batches=1",
            "eval_every=3", "checkpoint_every=3", "model.d_model=16", "model.num_heads=2", "model.chunk_size=8"]
    (row,) = bench_train.run("mqar", ["gated_deltanet"], 600.0, str(tmp_path), sets=sets)
    assert row["steps"] == row["steps_planned"] == 3           # the config's steps, not a flat-lr stand-in
    assert row["reached_99"] is False and row["time_to_99_s"] is None and 0.0 <= row["accuracy"] <= 1.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    cfg = json.loads((tmp_path / "gated_deltanet" / "summary.json").read_text())["config"]
    assert cfg["stop_at_target"] is True and cfg["mqar_filler"] == "random" and cfg["mqar_query_power"] == 0.01


def test_bench_fit_steps_fills_the_budget_from_a_probe(tmp_path):
    from experiments import bench_train

    steps = bench_train.fit_steps(TINY, budget_s=30.0, workdir=str(tmp_path), probe=6, margin=0.5)
    probe = json.loads((tmp_path / "summary.json").read_text())
    rate = probe["train_tokens_per_s"] / (TINY.batch * TINY.seq_len)
    assert probe["steps_done"] == 6 and steps == max(int(0.5 * 30.0 * rate), TINY.warmup + 1)


# ------------------------------------------------------------------ one run per directory (issue 29)


def test_a_workdir_holds_one_run(tmp_path):
    """A second run into a directory that holds one is refused (the way out named); --resume=auto
    continues it; --overwrite deletes it first; nothing mixes."""
    wd = str(tmp_path / "run")
    train_lib.train(TINY, wd, stop_after=4, progress=False)
    other = configs.override(TINY, ["seed=7"])   # another run (same programs: no new compile)
    with pytest.raises(train_lib.TrainingError, match="already holds a run \\(checkpoints up to step 4, "
                       "metrics.jsonl.*--resume=auto.*new --workdir.*--overwrite"):
        train_lib.train(other, wd, progress=False)
    assert [r["step"] for r in _rows(wd)] == [1, 2, 3, 4]           # untouched
    with pytest.raises(ValueError, match="pass one"):
        train_lib.train(other, wd, resume="auto", overwrite=True, progress=False)
    train_lib.train(other, wd, overwrite=True, stop_after=2, progress=False)
    with Checkpointer(os.path.join(wd, "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [2]                               # the first run's 4 is gone
    assert train_lib.load_run(wd)[0].seed == 7
    summary = train_lib.train(other, wd, resume="auto", progress=False)   # continues: allowed
    assert summary["steps_done"] == 8 and summary["config"]["seed"] == 7


def test_a_run_that_fails_validation_leaves_no_directory(tmp_path):
    with pytest.raises(ValueError):
        train_lib.train(configs.override(TINY, ["model.preset=nope"]), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError):
        train_lib.train(dataclasses.replace(TINY, task="charlm"), str(tmp_path / "y"), progress=False)
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_resuming_a_finished_run_keeps_its_evaluation_in_the_summary(tmp_path):
    first = train_lib.train(TINY, str(tmp_path), progress=False)
    again = train_lib.train(TINY, str(tmp_path), resume="auto", progress=False)
    evals = {k: v for k, v in first.items() if k.startswith("eval_")}
    assert evals and {k: again[k] for k in evals} == evals
    with open(tmp_path / "summary.json") as f:
        saved = json.load(f)
    assert {k: saved[k] for k in evals} == evals


def test_metrics_and_summary_are_strict_json():
    """A non-finite number is written as null, never as a bare NaN (not JSON)."""
    row = {"step": 3, "loss": 1.5, "grad_norm": float("inf"), "eval": [float("nan"), 2.0], "ok": True}
    text = train_lib.dumps(row)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 3, "loss": 1.5, "grad_norm": None, "eval": [None, 2.0], "ok": True}


def test_generate_refuses_an_mqar_run(tmp_path):
    train_lib.train(TINY, str(tmp_path), stop_after=2, progress=False)
    with pytest.raises(ValueError, match="MQAR run .*byte-level runs"):
        generate.sample(str(tmp_path), "ROMEO:", 4)


def test_gradient_accumulation_takes_the_same_steps(tmp_path):
    """grad_accum=4 (4 micro-batches of 1 row, summed gradients) == one batch of 4, up to rounding."""
    one = train_lib.train(TINY, str(tmp_path / "one"), progress=False)
    acc = train_lib.train(configs.override(TINY, ["grad_accum=4"]), str(tmp_path / "acc"), progress=False)
    np.testing.assert_allclose([r["loss"] for r in _rows(tmp_path / "acc")],
                               [r["loss"] for r in _rows(tmp_path / "one")], rtol=2e-4)
    assert acc["eval_mqar_loss"] == pytest.approx(one["eval_mqar_loss"], rel=1e-3)
    _, _, pa, _, _ = train_lib.load_run(str(tmp_path / "one"))
    _, _, pb, _, _ = train_lib.load_run(str(tmp_path / "acc"))
    for x, y in zip(jax_leaves(pa), jax_leaves(pb)):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="grad_accum must be >= 1 and divide batch=4"):
        configs.override(TINY, ["grad_accum=3"])


def test_micro_batches_are_strided_rows():
    batch = {"inputs": np.arange(12).reshape(6, 2)}
    mb = train_lib.micro_batches(batch, 3)["inputs"]          # [3, 2, 2]: micro-batch i = rows i, i + 3
    np.testing.assert_array_equal(mb[0], [[0, 1], [6, 7]])
    np.testing.assert_array_equal(mb[2], [[4, 5], [10, 11]])
