"""Command-line mistakes (issue 29, item 3): one line on stderr (plus the --helpshort pointer),
exit status 2, no flag dump and no traceback."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args,message", [
    (["--config=smoke", "--preset=mambo"], "train: error: unknown preset 'mambo'"),
    (["--config=charlm", "--data=/nonexistent/text.txt"], "train: error: corpus file not found"),
    (["--config=smoke", "--steps=abc"], "train: error: flag --steps=abc"),
    (["--config=smoke", "--set=model.nope=1"], "train: error: unknown config field 'model.nope'"),
])
def test_train_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *args, f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 2 and lines[0].startswith(message), proc.stderr[-2000:]
    assert lines[1] == "(python -m experiments.train --helpshort lists the flags)"
