"""Compare presets on one task with the same budget and (about) the same parameter count.

    python -m experiments.compare --config=mqar --presets=moneta,yaad,memora,gated_deltanet \
        --workdir=runs/compare_mqar [--steps=N] [--target_params=N] [--data=PATH] [--set=...]

``transformer`` in ``--presets`` is Transformer++ (every block attention, ``model.pattern=A``). A
``--config=corpus`` run takes its vocabulary from the corpus (``--data=DIR``).
Each preset trains with the config's steps / batch / sequence length (``--steps`` overrides); with
``--target_params`` the model width of each run is the multiple of ``2 * num_heads`` whose
parameter count is closest to it (presets differ in gate and memory parameters). Runs go to
``<workdir>/<preset>/`` (a run already there is refused unless ``--overwrite``); ``<workdir>/results.md`` gets a Markdown table (parameters, final train
loss, every eval metric, tokens/s, wall time) and ``<workdir>/compare.png`` the eval-loss curves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
from absl import app, flags
from flax import nnx

from experiments import cli, configs
from experiments import train as train_lib
from miras_jax import presets
from miras_jax.nn import MirasLM, count_params


def define_flags():
    """Command-line flags (defined only when run as a script)."""
    flags.DEFINE_string("config", "mqar", f"config name: {configs.names()}")
    flags.DEFINE_list("presets", ["moneta", "yaad", "memora", "gated_deltanet"], "presets to compare")
    flags.DEFINE_string("workdir", "runs/compare", "output directory")
    flags.DEFINE_integer("steps", None, "override the number of training steps")
    flags.DEFINE_integer("target_params", None, "match every model to about this many parameters")
    flags.DEFINE_string("data", None, "text file (charlm) or tokenized corpus directory (corpus)")
    flags.DEFINE_list("set", [], "config overrides field=value")
    flags.DEFINE_bool("overwrite", False, "replace the runs already in <workdir>/<preset>")


TRANSFORMER = "transformer"   # Transformer++: attention in every block


def params_for(cfg: configs.TrainConfig, vocab: int) -> int:
    """Parameter count of ``cfg``'s model, from shapes only (no initialisation compute)."""
    model = nnx.eval_shape(lambda: MirasLM(dataclasses.replace(cfg.model, vocab_size=vocab), rngs=nnx.Rngs(0)))
    return count_params(model)


def match_width(cfg: configs.TrainConfig, vocab: int, target: int) -> configs.TrainConfig:
    """The config with the ``d_model`` (a multiple of ``2 * num_heads``) whose count is closest to ``target``."""
    step = 2 * cfg.model.num_heads
    best = None
    for d in range(step, 8 * cfg.model.d_model + step, step):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=d))
        n = params_for(c, vocab)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (c, n)
        if n > target:
            break
    return best[0]


def compare(cfg: configs.TrainConfig, preset_names: list[str], workdir: str, *, target_params=None,
            data_path=None, overwrite: bool = False) -> list[dict]:
    unknown = [p for p in preset_names if p not in (*presets.names(), TRANSFORMER)]
    if unknown:
        raise ValueError(f"unknown presets {unknown}; valid: {[*presets.names(), TRANSFORMER]}")
    if cfg.task == "corpus":
        cfg = train_lib.corpus_config(cfg, data_path)
    vocab = configs.task_vocab(cfg)
    results = []
    for name in preset_names:
        c = configs.override(cfg, ["model.pattern=A"] if name == TRANSFORMER else [f"model.preset={name}"])
        if target_params:
            c = match_width(c, vocab, target_params)
        t0 = time.perf_counter()
        summary = train_lib.train(c, os.path.join(workdir, name), data_path=data_path, progress=False,
                                  overwrite=overwrite)
        row = {"preset": name, "d_model": c.model.d_model, "params": summary["params"],
               "final_loss": summary["final_loss"], "tokens_per_s": summary["train_tokens_per_s"],
               "wall_s": time.perf_counter() - t0,
               **{k: v for k, v in summary.items() if k.startswith(("eval_", "val_", "reached_"))}}
        results.append(row)
        print(json.dumps(row), flush=True)
    write_report(results, cfg, workdir)
    return results


def write_report(results: list[dict], cfg: configs.TrainConfig, workdir: str) -> None:
    keys = ["preset", "d_model", "params", "final_loss"]
    keys += sorted({k for r in results for k in r if k.startswith(("eval_", "val_", "reached_")) and k != "eval_curve"})
    keys += ["tokens_per_s", "wall_s"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"# {cfg.task}: {cfg.steps} steps, batch {cfg.batch}, sequence {cfg.seq_len}, "
             f"pattern {cfg.model.pattern}, {cfg.model.num_layers} layers", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in results]
    lines += ["", f"jax {jax.__version__}, {jax.devices()[0].platform}, measured by experiments/compare.py"]
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        with open(os.path.join(workdir, r["preset"], "metrics.jsonl")) as f:
            rows = [json.loads(ln) for ln in f]
        key = next((k for k in rows[-1] if k.startswith("eval_") and k.endswith("_loss")), None)
        pts = [(x["step"], x[key]) for x in rows if key and key in x]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"{r['preset']} ({r['params'] / 1e6:.2f}M)")
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(f"{cfg.task}: presets compared")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "compare.png"), dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        cfg = configs.override(configs.get(f.config), list(f.set) + ([f"steps={f.steps}"] if f.steps else []))
        os.makedirs(f.workdir, exist_ok=True)
        compare(cfg, list(f.presets), f.workdir, target_params=f.target_params, data_path=f.data,
                overwrite=f.overwrite)
    except (ValueError, FileNotFoundError, train_lib.TrainingError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
