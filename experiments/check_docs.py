"""Run every command the README and ``experiments/README.md`` show, in order, and report each.

    python3 -m experiments.check_docs [--files=README.md,experiments/README.md] [--cap_s=120] [--skip_install]

Standard library only, so it runs on a fresh clone before anything is installed.

A command is a line of a fenced ``bash`` block (backslash continuations joined, ``#`` comments
dropped) or an inline code span that starts with ``python -m experiments.`` (or environment
assignments and ``taskset`` before it). Each runs with ``bash -c`` in the repository root, in
document order (later commands read what earlier ones wrote), under the virtual environment the
README's set-up command makes (``.venv``). A command still running after ``--cap_s`` seconds is
stopped and reported ``"status": "running at cap"`` (it started and worked without an error: most
experiment commands train for minutes to hours; their measured durations are in the text beside
them); one that exits is ``"ok"`` (rc 0), ``"needs setup"`` (rc 3: a prerequisite outside the
project, e.g. the PyTorch peers' venv, is missing; its message says how to install it) or ``"failed"``. A span with a placeholder (``<run>``,
``[--flag]``, ``a|b``, ``...``) is reported ``"template"`` and not run. One JSON line per command;
the exit status is 1 if any command failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING_EXIT = 3  # experiments.cli.MISSING_EXIT: a documented prerequisite (a peer venv, ...) is missing
_INLINE = re.compile(r"`((?:[A-Z_]+=\S+\s+|taskset -c \d+\s+)*python\s+-m\s+experiments\.[^`]*)`")
_TEMPLATE = re.compile(r"<[^>]*>|[=/][A-Z]\b|(?<![.\w])\[[^\]]*\]|\|\w|\.\.\.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m experiments.check_docs", description=__doc__.split("\n")[0])
    p.add_argument("--files", default="README.md,experiments/README.md", help="markdown files, in order")
    p.add_argument("--cap_s", type=float, default=120.0, help="stop a command after this many seconds")
    p.add_argument("--skip_install", action="store_true", help="skip the set-up command that makes .venv")
    p.add_argument("--only", default=None, help="run only commands containing this text")
    return p.parse_args(argv)


def commands(path: str) -> list[tuple[int, str]]:
    """``[(line number, command), ...]`` in document order (see the module docstring)."""
    with open(path) as f:
        lines = f.read().splitlines()
    out, in_bash, in_code, pending, start = [], False, False, "", 0
    prose = []  # the text outside code blocks (blank lines in their place keep the numbering)
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        prose.append("" if in_code or stripped.startswith("```") else line)
        if stripped.startswith("```"):
            in_code = not in_code
            in_bash = in_code and stripped in ("```bash", "```sh")
            continue
        if in_bash:
            if not pending:
                start = i
            if stripped.endswith("\\"):
                pending += stripped[:-1] + " "
                continue
            cmd = " ".join(re.sub(r"\s+#.*$", "", pending + stripped).split())
            pending = ""
            if cmd and not cmd.startswith("#"):
                out.append((start, cmd))
    text = "\n".join(prose)  # inline spans may wrap over lines
    out += [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in _INLINE.finditer(text)]
    return sorted(out, key=lambda x: x[0])


def run_one(cmd: str, cap_s: float, env: dict) -> dict:
    """Run ``cmd`` (``bash -c``) in the repository root for at most ``cap_s`` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=cap_s)
        status = {0: "ok", MISSING_EXIT: "needs setup"}.get(proc.returncode, "failed")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        status = "running at cap"
    tail = [ln for ln in (out or "").replace("\r", "\n").splitlines() if ln.strip()][-3:]
    return {"status": status, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "tail": [ln[:300] for ln in tail]}


def main(argv=None):
    f = parse_args(argv)
    env = {**os.environ, "VIRTUAL_ENV": os.path.join(ROOT, ".venv"),
           "PATH": os.path.join(ROOT, ".venv", "bin") + os.pathsep + os.environ.get("PATH", "")}
    failed = 0
    for path in f.files.split(","):
        if not os.path.exists(os.path.join(ROOT, path)):
            sys.exit(f"check_docs: error: no file {path} in {ROOT}")
        for line, cmd in commands(os.path.join(ROOT, path)):
            rec = {"file": path, "line": line, "command": cmd}
            if f.only and f.only not in cmd:
                continue
            if _TEMPLATE.search(cmd):
                rec["status"] = "template"
            elif "experiments.check_docs" in cmd:
                rec["status"] = "skipped (this command)"
            elif f.skip_install and "pip install" in cmd and "venv" in cmd:
                rec["status"] = "skipped (set-up)"
            else:
                rec.update(run_one(cmd, f.cap_s, env))
                failed += rec["status"] == "failed"
            print(json.dumps(rec), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
