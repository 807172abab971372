"""The pods fit table: ``experiments.aot`` for every (config, model, implementation) cell on one TPU
topology, each in its own subprocess (a 780M compile holds several GB), one JSON line per cell
appended to ``--out``, and a Markdown table of what is there.

    python -m experiments.fit_table --configs=lm340m,lm780m --topology=v5e:16x16 \
        --mesh=data:8,fsdp:16,tensor:2 --out=runs/fit_v5e_256.jsonl
    python -m experiments.fit_table --out=runs/fit_v5e_256.jsonl --table_only   # the Markdown table

Each cell searches the largest micro-batch that fits: ``cap = batch / (data x fsdp devices)``
sequences per batch shard (the whole global batch in one step), then ``cap / 2``, ... down to 1, each
one compile of the real accumulating step (``grad_accum = cap / micro_batch``), stopping at the
first that fits. The table shows that micro-batch, its accumulation steps and its peak HBM.

Needs the real TPU compiler (``pip install -e ".[tpu]"``); a probe already in ``--out`` is skipped,
so an interrupted table resumes. Models: ``preset:pattern`` (``moneta:M`` pure Moneta, ``moneta:A``
Transformer++, ``moneta:MS`` the Moneta / sliding-window hybrid); an attention-only model has no
Miras layer, so it runs once (``xla``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from absl import flags

from experiments import cli, configs
from miras_jax import presets, sharding
from miras_jax.engine import plan as plan_lib

MODELS = ("moneta:M", "yaad:M", "memora:M", "titans:M", "gated_deltanet:M", "moneta:A", "moneta:MS")
GIB = 2 ** 30


def define_flags():
    flags.DEFINE_list("configs", ["lm340m", "lm780m"], "configs (experiments/configs)")
    flags.DEFINE_list("models", list(MODELS), "preset:pattern cells")
    flags.DEFINE_list("impls", ["xla", "pallas"], "model.implementation values")
    flags.DEFINE_string("topology", "v5e:16x16", "TPU topology")
    flags.DEFINE_string("mesh", "data:8,fsdp:16,tensor:2", "device mesh")
    flags.DEFINE_list("set", [], "extra config overrides for every cell")
    flags.DEFINE_string("out", "runs/fit_table.jsonl", "JSON lines, one per cell (appended)")
    flags.DEFINE_bool("table_only", False, "only print the Markdown table of --out")


def cells(configs, models, impls):
    """``(config, preset, pattern, impl)``; attention-only models once, with ``xla``; ``pallas`` only
    where a kernel covers the preset (``mj.plan``)."""
    for c in configs:
        for m in models:
            preset, pattern = m.split(":")
            for impl in (impls if "M" in pattern else impls[:1]):
                if impl == "pallas" and plan_lib.kernel_blocker(presets.get(preset)) is not None:
                    continue
                yield c, preset, pattern, impl


def key(row: dict) -> tuple:
    return (row["cell_config"], row["preset"], row["pattern"], row["implementation"], row["topology"],
            row.get("micro_batch", 1))


def micro_batches(cap: int) -> list[int]:
    """The probe order ``cap, cap // 2, ..., 1`` (those that divide ``cap``): the first that fits is the
    largest micro-batch, with the fewest accumulation steps."""
    return [b for b in (cap >> i for i in range(cap.bit_length())) if b and cap % b == 0]


def cap(config: str, mesh: str) -> int:
    """Sequences per batch shard when ``config``'s whole global batch is one step on ``mesh``."""
    return sharding.per_batch_shard(configs.get(config).batch, sharding.parse_mesh(mesh))


def run_cell(config, preset, pattern, impl, topology, mesh, sets, micro_batch, cap_) -> dict:
    """One ``experiments.aot`` subprocess; its JSON object plus the cell and the wall time."""
    cmd = [sys.executable, "-m", "experiments.aot", f"--config={config}", f"--preset={preset}",
           f"--topology={topology}", f"--mesh={mesh}",
           "--set=" + ",".join([f"model.implementation={impl}", f"model.pattern={pattern}",
                                f"grad_accum={cap_ // micro_batch}", *sets])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    row = json.loads(lines[-1]) if lines else {"compiled": False, "error": _last_error(proc.stderr)}
    return {**row, "cell_config": config, "preset": preset, "pattern": pattern, "implementation": impl,
            "topology": topology, "mesh": mesh, "micro_batch": micro_batch, "grad_accum": cap_ // micro_batch,
            "wall_s": round(time.perf_counter() - t0, 1)}


def _last_error(stderr: str) -> str:
    """The exception line of a failed subprocess's traceback (else its last line)."""
    lines = stderr.strip().splitlines()
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception): ", ln)]
    return (errors or lines or [""])[-1][:400]


def best(rows: list[dict]) -> list[dict]:
    """One row per cell: its largest fitting micro-batch, else its smallest probe (why it fails)."""
    cells_: dict[tuple, dict] = {}
    for r in rows:
        k, b = key(r)[:-1], r.get("micro_batch", 1)
        old = cells_.get(k)
        ob = None if old is None else old.get("micro_batch", 1)
        if old is None or (r.get("fits") and (not old.get("fits") or b > ob)) or (
                not r.get("fits") and not old.get("fits") and b < ob):
            cells_[k] = r
    return list(cells_.values())


def table(rows: list[dict]) -> str:
    """Markdown, one row per cell (``best``): compiled, fits, the micro-batch (sequences per batch
    shard) and accumulation steps, peak HBM per chip in GiB, compile time."""
    out = ["| config | model | impl | compiled | fits | micro-batch / shard | accum | peak HBM / chip (GiB) "
           "| compile (s) | note |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in best(rows):
        model = {"M": r["preset"], "A": "Transformer++", "MS": f"{r['preset']} + SWA hybrid"}.get(r["pattern"])
        peak = r.get("peak_hbm_bytes")
        note = r.get("compile_note") or r.get("error") or ""
        if r.get("oom_required_bytes"):
            note = f"OOM: temporaries {r['oom_required_bytes'] / GIB:.2f} GiB"
        out.append(f"| {r['cell_config']} | {model} | {r['implementation']} | {r.get('compiled')} | "
                   f"{r.get('fits')} | {r.get('micro_batch', 1)} | {r.get('grad_accum', 1)} | "
                   f"{'' if peak is None else f'{peak / GIB:.2f}'} | "
                   f"{r.get('compile_s', '')} | {str(note)[:120]} |")
    return "\n".join(out)


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def main(argv):
    del argv
    f = flags.FLAGS
    if not f.table_only:
        done = {key(r): r for r in read(f.out)}
        os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
        for config, preset, pattern, impl in cells(f.configs, f.models, f.impls):
            c = cap(config, f.mesh)
            for b in micro_batches(c):
                row = done.get((config, preset, pattern, impl, f.topology, b))
                if row is None:
                    row = run_cell(config, preset, pattern, impl, f.topology, f.mesh, f.set, b, c)
                    with open(f.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    print(json.dumps({k: row.get(k) for k in (
                        "cell_config", "preset", "pattern", "implementation", "micro_batch", "grad_accum",
                        "compiled", "fits", "peak_hbm_bytes", "compile_s")}), flush=True)
                if row.get("fits") is not False:
                    break  # the largest that fits, or a failure that is not out-of-memory
    print(table(read(f.out)))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
