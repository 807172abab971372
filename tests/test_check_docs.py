"""experiments.check_docs: which commands a markdown file shows, and how one is run."""

import os

from experiments import check_docs

DOC = """# t
Inline `python -m experiments.demo --pairs=4` and a wrapped one `python -m
experiments.evaluate --workdir=runs/x` in prose; `python -m experiments.train --workdir=<run>` is a template.

```bash
python -m experiments.train --config=smoke \\
    --steps=3   # a comment
# a comment line
XLA_FLAGS=--x python -m experiments.train --config=smoke --mesh=data:2
```

```python
python -m not.a.command
```
"""


def test_commands_in_document_order_with_lines(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text(DOC)
    got = check_docs.commands(str(path))
    assert got == [(2, "python -m experiments.demo --pairs=4"),
                   (2, "python -m experiments.evaluate --workdir=runs/x"),
                   (3, "python -m experiments.train --workdir=<run>"),
                   (6, "python -m experiments.train --config=smoke --steps=3"),
                   (9, "XLA_FLAGS=--x python -m experiments.train --config=smoke --mesh=data:2")]
    templates = [c for _, c in got if check_docs._TEMPLATE.search(c)]
    assert templates == ["python -m experiments.train --workdir=<run>"]
    assert not check_docs._TEMPLATE.search('pip install -e ".[test]"')


def test_run_one_reports_ok_failed_and_cap():
    env = dict(os.environ)
    assert check_docs.run_one("echo hi", 30, env)["status"] == "ok"
    bad = check_docs.run_one("echo oops; exit 4", 30, env)
    assert bad["status"] == "failed" and bad["rc"] == 4 and bad["tail"] == ["oops"]
    assert check_docs.run_one("exit 3", 30, env)["status"] == "needs setup"   # cli.MISSING_EXIT
    slow = check_docs.run_one("sleep 20", 0.5, env)
    assert slow["status"] == "running at cap" and slow["wall_s"] < 15


def test_the_readmes_show_commands():
    readme = check_docs.commands(os.path.join(check_docs.ROOT, "README.md"))
    assert any("pip install" in c for _, c in readme) and ("python -m pytest -q -n 2" in [c for _, c in readme])
