"""Zoology's MQAR sweep as one command: held-out accuracy against recurrent state size, per preset.

    python -m experiments.mqar_sweep --workdir=runs/mqar_sweep [--seq_lens=64,128,256,512] \
        [--widths=64,128,256,512] [--presets=gated_deltanet,moneta,yaad,memora,transformer] \
        [--lrs=1e-4,4.6416e-4,2.1544e-3,1e-2] [--steps=N] [--filler=zero] [--set=...] [--dry_run]

A cell is (sequence length, width, preset): the ``mqar`` config (vocab 8192, 2 layers of 2 heads,
power-law query positions ``mqar_query_power=0.01``) at that sequence length, with the number of
key-value pairs Zoology's sweep gives it (:data:`KV_PAIRS`) and that ``d_model``. A cell's learning
rates train as ONE vmapped program (``experiments.grid`` with ``--grid=lr=...``); its result is the
best learning rate's held-out accuracy: ``eval_mqar_accuracy`` after the last step, on the
config's ``eval_batches`` batches drawn with seed + 1 (never trained on). ``transformer`` is
Transformer++ (``model.pattern=A``, as in ``experiments.compare``). State sizes: :func:`state_size`.

Zoology's values (HazyResearch/zoology: ``zoology/experiments/paper/figure2.py`` and
``zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py``, the paper's Figure 2):

* (sequence length, key-value pairs): (64, 4), (128, 8), (256, 16), (512, 64); vocab 8192;
* widths 64, 128, 256, 512; learning rates ``np.logspace(-4, -2, 4)``; the best of them per model;
* data: ``train_power_a = test_power_a = 0.01`` and ``random_non_queries=False``. That figure's
  sequences hold token 0 at the non-query positions, so this sweep's default is ``--filler=zero``,
  although the default of Zoology's ``MQARConfig`` (and of our ``mqar`` config) is random tokens
  there: ``--filler=random``.

Ours, not Zoology's: batch, steps and the AdamW warmup + cosine schedule of the ``mqar`` config
(Zoology: batch 512 / 512 / 256 / 128 by length, 100k training sequences for 64 epochs, 3000 test
sequences); 2 layers for every preset (Zoology's ``paper_configs`` version: 2 for every mixer, its
``figure2.py``: 4 for the non-attention mixers); 2 heads (Zoology's attention: 1); our blocks keep
their SwiGLU MLPs (Zoology's figure: none). A sequence length outside Zoology's four gets
``seq_len // 16`` pairs (the ratio of its three shorter lengths).

Writes ``<workdir>/results.jsonl`` (one line per cell), ``<workdir>/mqar_accuracy_vs_state.png``
(accuracy against state size, one panel per sequence length, one line per preset over the widths)
and ``<workdir>/<cell>/`` (the cell's grid: ``metrics.jsonl``, ``results.md``,
``variants/lr<lr>/summary.json``; the checkpoints are deleted unless ``--keep_checkpoints``). A
rerun skips the cells already in ``results.jsonl`` (with the same settings) and redoes unfinished
ones; ``--overwrite`` starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import jax
import numpy as np
from absl import app, flags

from experiments import cli, compare, configs, grid
from experiments import train as train_lib
from miras_jax import presets
from miras_jax.engine.tokens import init_state

# Zoology's Figure 2: sequence length -> key-value pairs
KV_PAIRS = {64: 4, 128: 8, 256: 16, 512: 64}
ZOOLOGY_LRS = tuple(float(x) for x in np.logspace(-4, -2, 4))   # 1e-4, 4.64e-4, 2.15e-3, 1e-2
ZOOLOGY_WIDTHS = (64, 128, 256, 512)
DEFAULT_PRESETS = ("gated_deltanet", "moneta", "yaad", "memora", compare.TRANSFORMER)
RESULTS, PLOT = "results.jsonl", "mqar_accuracy_vs_state.png"


def define_flags():
    """Command-line flags (defined only when run as a script)."""
    flags.DEFINE_string("workdir", "runs/mqar_sweep", "output directory")
    flags.DEFINE_list("seq_lens", [str(n) for n in KV_PAIRS], "sequence lengths (pairs: KV_PAIRS)")
    flags.DEFINE_list("widths", [str(d) for d in ZOOLOGY_WIDTHS], "model widths d_model")
    flags.DEFINE_list("presets", list(DEFAULT_PRESETS), "presets; 'transformer' = pattern A; structural "
                      "options after a colon: 'atlas:window=4;degree=2' (model.preset_kwargs)")
    flags.DEFINE_list("lrs", [repr(x) for x in ZOOLOGY_LRS], "learning rates, one vmapped grid per cell")
    flags.DEFINE_integer("steps", None, "training steps per cell (default: the config's)")
    flags.DEFINE_enum("filler", "zero", ["zero", "random"],
                      "non-query tokens: zero (Zoology's Figure 2) or random (Zoology's MQARConfig default)")
    flags.DEFINE_string("config", "mqar", "base config")
    flags.DEFINE_list("set", [], "config overrides field=value (after the sweep's own)")
    flags.DEFINE_bool("dry_run", False, "print the cells and their state sizes; train nothing")
    flags.DEFINE_bool("overwrite", False, "delete results.jsonl and rerun every cell")
    flags.DEFINE_bool("keep_checkpoints", False, "keep each variant's checkpoint")
    flags.DEFINE_bool("progress", False, "progress bar per cell")


# ------------------------------------------------------------------------------------------------
# state size
# ------------------------------------------------------------------------------------------------


def _head_state(spec, head_dim: int) -> int:
    """Numbers in one head's recurrent memory state (see :func:`state_size`)."""
    with jax.numpy_dtype_promotion("standard"):
        st = jax.eval_shape(lambda: init_state(spec, spec.memory.init(jax.random.key(0), head_dim, head_dim)))
    carried = (st.memory, spec.retention.acc(st.retention), st.optimizer)   # the anchor is not state
    return sum(math.prod(x.shape) for x in jax.tree.leaves(carried))


def state_size(cfg: configs.TrainConfig, seq_len: int | None = None) -> int:
    """Numbers (floats) of recurrent state one sequence carries through ``cfg``'s model, summed over
    its layers, at ``seq_len`` tokens (default ``cfg.seq_len``):

    * Miras layer (``M``): ``h`` heads times one head's memory state as the engine carries it
      (``init_state``): the memory (matrix memory: ``k * v``; MLP memory: its weights, ``2 * 4 k^2``
      for the 2-layer, 4x-expansion memory), plus a retention accumulator (Moneta's l_q: as many
      again) and inner-optimizer state (Titans' momentum: as many again). Not counted: a preset's
      anchor ``z_* = to_dual(W_0)`` (the same for every sequence), the short convolutions' buffers
      (``(K - 1) (1 + 2n) h k``) and a chunk-wise decoder's token buffer.
    * global attention (``A``): the KV cache, ``2 * seq_len * d_model``.
    * sliding-window attention (``S``): ``2 * min(window, seq_len) * d_model``.

    ``k = v = d_model / num_heads``. E.g. Gated DeltaNet, width 64, 2 heads, 2 layers: ``2 * 2 *
    32 * 32 = 4096``; Transformer++ at width 64, 2 layers, 64 tokens: ``2 * 2 * 64 * 64 = 16384``.
    """
    m = cfg.model
    seq_len = cfg.seq_len if seq_len is None else seq_len
    kinds = [m.mixer(i) for i in range(m.num_layers)]
    per_head = _head_state(m.spec(), m.d_model // m.num_heads) if "M" in kinds else 0
    span = {"A": seq_len, "S": min(m.window, seq_len)}
    return sum(m.num_heads * per_head if kind == "M" else 2 * span[kind] * m.d_model for kind in kinds)


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------


def kv_pairs(seq_len: int) -> int:
    """Key-value pairs at ``seq_len``: Zoology's (:data:`KV_PAIRS`), else ``seq_len // 16``."""
    if seq_len in KV_PAIRS:
        return KV_PAIRS[seq_len]
    if seq_len < 16:
        raise ValueError(f"seq_len must be >= 16 (pairs = seq_len // 16 outside {sorted(KV_PAIRS)}), "
                         f"got {seq_len}")
    return seq_len // 16


@dataclasses.dataclass(frozen=True)
class Cell:
    seq_len: int
    num_pairs: int
    d_model: int
    preset: str

    @property
    def name(self) -> str:
        return f"L{self.seq_len}_d{self.d_model}_{safe_name(self.preset)}"


def split_preset(entry: str) -> tuple[str, str]:
    """``"atlas:window=4;degree=2"`` -> ``("atlas", "window=4;degree=2")`` (structural options, as
    ``model.preset_kwargs``); a plain name -> ``(name, "")``."""
    name, _, kw = entry.partition(":")
    return name, kw


def safe_name(entry: str) -> str:
    """A preset entry as a directory name: ``atlas:window=4;degree=2`` -> ``atlas-window4-degree2``."""
    return entry.replace(":", "-").replace(";", "-").replace("=", "")


def cells(seq_lens, widths, preset_names) -> list[Cell]:
    """Every (sequence length, width, preset), sequence length outermost."""
    unknown = [p for p in preset_names if split_preset(p)[0] not in (*presets.names(), compare.TRANSFORMER)]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; valid: {[*presets.names(), compare.TRANSFORMER]}")
    if not (seq_lens and widths and preset_names):
        raise ValueError("give at least one sequence length, width and preset")
    return [Cell(int(t), kv_pairs(int(t)), int(d), p) for t in seq_lens for d in widths for p in preset_names]


def base_config(name: str = "mqar", filler: str = "zero", sets=(),
                steps: int | None = None) -> configs.TrainConfig:
    """The sweep's config before a cell's sequence length / pairs / width / preset: ``name`` with
    ``mqar_filler=filler``, then ``sets``, then ``steps``; evaluated once, after the last step,
    unless ``sets`` names ``eval_every``."""
    cfg = configs.override(configs.get(name), [f"mqar_filler={filler}", *sets]
                           + ([f"steps={steps}"] if steps else []))
    if cfg.task != "mqar":
        raise ValueError(f"the sweep needs an MQAR config, got task={cfg.task!r}")
    if not any(s.startswith("eval_every=") for s in sets):
        cfg = dataclasses.replace(cfg, eval_every=cfg.steps)
    return cfg


def cell_config(base: configs.TrainConfig, cell: Cell) -> configs.TrainConfig:
    name, kw = split_preset(cell.preset)
    arch = ["model.pattern=A"] if name == compare.TRANSFORMER else [f"model.preset={name}"]
    if kw:
        arch.append(f"model.preset_kwargs={kw}")
    return configs.override(base, [f"seq_len={cell.seq_len}", f"num_pairs={cell.num_pairs}",
                                   f"model.d_model={cell.d_model}", *arch])


def _settings(cfg: configs.TrainConfig, lrs) -> dict:
    """What a cell's result depends on besides the cell itself (a rerun must match it)."""
    return {"lrs": [float(x) for x in lrs], "steps": cfg.steps, "batch": cfg.batch, "vocab": cfg.mqar_vocab,
            "filler": cfg.mqar_filler, "query_power": cfg.mqar_query_power,
            "num_layers": cfg.model.num_layers, "num_heads": cfg.model.num_heads, "warmup": cfg.warmup,
            "eval_batches": cfg.eval_batches, "seed": cfg.seed}


def describe(base: configs.TrainConfig, cell_list: list[Cell], lrs) -> list[dict]:
    """One dict per cell: what ``--dry_run`` prints (no training)."""
    return [{"cell": c.name, "seq_len": c.seq_len, "num_pairs": c.num_pairs, "d_model": c.d_model,
             "preset": c.preset, "state_size": state_size(cell_config(base, c)),
             "lrs": [float(x) for x in lrs]}
            for c in cell_list]


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def run_cell(base: configs.TrainConfig, cell: Cell, lrs, workdir: str, *, keep_checkpoints: bool = False,
             progress: bool = False) -> dict:
    """Train one cell's learning rates as one grid into ``workdir/<cell>`` (replacing what is there)
    and return its result line."""
    cfg = cell_config(base, cell)
    cdir = os.path.join(workdir, cell.name)
    t0 = time.perf_counter()
    results = grid.run_grid(cfg, {"lr": [float(x) for x in lrs]}, cdir, progress=progress, overwrite=True)
    wall = time.perf_counter() - t0
    if not keep_checkpoints:
        for r in results:
            shutil.rmtree(os.path.join(cdir, "variants", r["variant"], "checkpoints"), ignore_errors=True)
    acc = {r["lr"]: r.get("eval_mqar_accuracy", float("nan")) for r in results}
    loss = {r["lr"]: r.get("eval_mqar_loss", float("nan")) for r in results}
    finite = {lr: a for lr, a in acc.items() if math.isfinite(a)}
    best = max(finite, key=finite.get) if finite else None
    return {"cell": cell.name, "seq_len": cell.seq_len, "num_pairs": cell.num_pairs, "d_model": cell.d_model,
            "preset": cell.preset, "state_size": state_size(cfg),
            "params": compare.params_for(cfg, cfg.mqar_vocab),
            "best_lr": best, "accuracy": finite[best] if best is not None else float("nan"),
            "accuracy_by_lr": {f"{lr:.6g}": a for lr, a in acc.items()},
            "loss_by_lr": {f"{lr:.6g}": x for lr, x in loss.items()},
            "wall_s": wall, **_settings(cfg, lrs)}


def run_sweep(base: configs.TrainConfig, cell_list: list[Cell], lrs, workdir: str, *, overwrite: bool = False,
              keep_checkpoints: bool = False, progress: bool = False) -> list[dict]:
    """Every cell (skipping those already in ``results.jsonl`` with the same settings), then the plot."""
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"give one or more learning rates > 0, got {list(lrs)}")
    for c in cell_list:                      # fail on a bad cell before training any
        cell_config(base, c)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, RESULTS)
    if overwrite and os.path.exists(path):
        os.remove(path)
    done = {r["cell"]: r for r in _read(path)}
    rows = []
    for c in cell_list:
        want = _settings(cell_config(base, c), lrs)
        if c.name in done:
            have = {k: done[c.name].get(k) for k in want}
            if have != want:
                diff = ", ".join(f"{k}: {have[k]} -> {want[k]}" for k in want if have[k] != want[k])
                raise train_lib.TrainingError(f"{path} holds cell {c.name} with other settings ({diff}); "
                                              "pass --overwrite to rerun every cell, or use a new --workdir")
            rows.append(done[c.name])
            continue
        row = run_cell(base, c, lrs, workdir, keep_checkpoints=keep_checkpoints, progress=progress)
        with open(path, "a") as f:
            f.write(train_lib.dumps(row) + "\n")
        print(train_lib.dumps(row), flush=True)
        rows.append(row)
    plot(_read(path), os.path.join(workdir, PLOT))
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Best-lr accuracy against state size: one panel per sequence length, one line per preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lens = sorted({r["seq_len"] for r in rows})
    names = list(dict.fromkeys(r["preset"] for r in rows))
    markers = "osD^v<>pPX*h"
    fig, axes = plt.subplots(1, max(len(lens), 1), figsize=(4 * max(len(lens), 1), 3.6), squeeze=False,
                             sharey=True)
    for ax, t in zip(axes[0], lens):
        for i, name in enumerate(names):
            pts = sorted((r["state_size"], r["accuracy"] if r["accuracy"] is not None else float("nan"))
                         for r in rows if r["seq_len"] == t and r["preset"] == name)
            if pts:
                ax.plot(*zip(*pts), marker=markers[i % len(markers)], label=name)
        pairs = next(r["num_pairs"] for r in rows if r["seq_len"] == t)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("state size (floats per sequence)")
        ax.set_title(f"sequence {t}, {pairs} pairs")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out MQAR accuracy (best lr)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        lrs = [float(x) for x in f.lrs]
        base = base_config(f.config, f.filler, list(f.set), f.steps)
        cell_list = cells([int(x) for x in f.seq_lens], [int(x) for x in f.widths], list(f.presets))
        if f.dry_run:
            for row in describe(base, cell_list, lrs):
                print(json.dumps(row))
            print(f"{len(cell_list)} cells x {len(lrs)} learning rates, {base.steps} steps, "
                  f"batch {base.batch}, vocab {base.mqar_vocab}, filler {base.mqar_filler}")
            return
        run_sweep(base, cell_list, lrs, f.workdir, overwrite=f.overwrite, keep_checkpoints=f.keep_checkpoints,
                  progress=f.progress)
    except (ValueError, FileNotFoundError, train_lib.TrainingError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
