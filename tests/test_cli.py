"""Command-line mistakes (issue 29, item 3): one line on stderr (plus the --helpshort pointer),
exit status 2, no flag dump and no traceback."""

import json
import os
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the subprocesses share the suite's persistent compilation cache (conftest.py): the smoke
# training step several of them compile is compiled once
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}


@pytest.mark.parametrize("args,message", [
    (["--config=smoke", "--preset=mambo"], "train: error: unknown preset 'mambo'"),
    (["--config=charlm", "--data=/nonexistent/text.txt"], "train: error: corpus file not found"),
    (["--config=smoke", "--steps=abc"], "train: error: flag --steps=abc"),
    pytest.param(["--config=smoke", "--set=model.nope=1"], "train: error: unknown config field 'model.nope'",
                 marks=pytest.mark.slow),   # the message itself: test_train (in process)
])
def test_train_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *args, f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 2 and lines[0].startswith(message), proc.stderr[-2000:]
    assert lines[1] == "(python -m experiments.train --helpshort lists the flags)"


def _train_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.train", "--config=smoke", "--noprogress", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def _truncate_newest_file(step_dir):
    """Cut the largest array file of a checkpoint to 1000 bytes (a crash mid-copy, a full disk)."""
    files = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
    os.truncate(max(files, key=os.path.getsize), 1000)


@pytest.mark.slow   # ~20-80 s; the default suite stays under 15 min
def test_corrupt_checkpoint_recovery_is_quiet(tmp_path):
    """Issue 29, item 2: a corrupt newest checkpoint costs one warning line on resume (orbax's
    worker tracebacks, thousands of lines before, are held back); all corrupt: one warning per
    checkpoint and the one-line error, exit 2."""
    wd = tmp_path / "run"
    first = _train_cli(f"--workdir={wd}", "--steps=30", "--set=checkpoint_every=10")
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stderr == ""                                    # no orbax / backend INFO lines
    ckpts = wd / "checkpoints"
    _truncate_newest_file(ckpts / "30")
    resumed = _train_cli(f"--workdir={wd}", "--steps=40", "--set=checkpoint_every=10", "--resume=auto")
    lines = resumed.stderr.strip().splitlines()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(lines) == 2, resumed.stderr[-3000:]
    assert "checkpoint" in lines[0] and "/30 could not be restored" in lines[0] and "fell back" in lines[0]
    assert lines[1].startswith("resumed from") and "at step 20 of 40" in lines[1]
    for step in ("20", "30", "40"):                              # 30 saved afresh, then 40
        _truncate_newest_file(ckpts / step)
    failed = _train_cli(f"--workdir={wd}", "--steps=50", "--resume=auto")
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert len(lines) == 5, failed.stderr[-3000:]                # 3 warnings, the error, the hint
    assert all("could not be restored" in ln for ln in lines[:3])
    assert lines[3].startswith("train: error: cannot resume: no checkpoint") and "--overwrite" in lines[3]


@pytest.mark.slow   # default suite time (3 subprocess runs; test_train.test_a_workdir_holds_one_run checks the refusal in process)
def test_a_second_run_into_a_workdir_is_refused_in_one_line(tmp_path):
    wd = tmp_path / "run"
    assert _train_cli(f"--workdir={wd}", "--steps=2").returncode == 0
    again = _train_cli(f"--workdir={wd}", "--steps=2", "--preset=deltanet")
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 2, again.stderr[-2000:]
    assert "already holds a run" in lines[0] and "--overwrite" in lines[0]
    bad = _train_cli(f"--workdir={tmp_path / 'new'}", "--steps=-3")
    assert bad.returncode == 2 and not os.path.exists(tmp_path / "new")


@pytest.mark.slow   # default suite time (2 subprocess runs; test_train evaluates saved runs in process)
def test_evaluate_prints_its_json_line_and_nothing_else(tmp_path):
    wd = tmp_path / "run"
    assert _train_cli(f"--workdir={wd}", "--steps=2").returncode == 0
    proc = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={wd}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path):
    """A preemption notice (SIGTERM) stops the run after the current step with a checkpoint of it,
    exit status 143; --resume=auto continues from that step."""
    import signal
    import time

    wd = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", "--config=smoke", "--noprogress",
                             "--steps=100000", "--set=log_every=1", f"--workdir={wd}"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 240
    while not (wd / "metrics.jsonl").exists() or os.path.getsize(wd / "metrics.jsonl") < 200:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = json.loads(out)["steps_done"]
    assert err.strip().splitlines() == [f"stopped by SIGTERM at step {step}, checkpoint saved; --resume=auto continues"]
    assert os.path.isdir(wd / "checkpoints" / str(step))
    resumed = _train_cli(f"--workdir={wd}", "--steps=100000", "--resume=auto", "--stop_after=2")
    assert resumed.returncode == 0 and f"at step {step} of 100000" in resumed.stderr, resumed.stderr[-2000:]
    assert json.loads(resumed.stdout)["steps_done"] == step + 2
