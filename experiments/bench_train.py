"""Training targets of the experiments issue, one JSON line per run.

    python -m experiments.bench_train --suite=mqar [--presets=moneta,yaad,memora,gated_deltanet]
        [--budget_s=4000] [--workdir=runs/bench_mqar]
    python -m experiments.bench_train --suite=charlm --data=data/tinyshakespeare.txt.gz
        [--presets=moneta,yaad,memora,transformer] [--budget_s=900]

mqar: the ``mqar`` config (vocab 8192, 64 pairs, sequence 256, width 128, 2 layers, Zoology's
default data; 2500 steps of warmup + cosine) per preset, stopped when the held-out query accuracy
reaches 99% or the time budget runs out; reports the training time to the target. charlm: the
``charlm`` config (about 1M parameters at width 128) per preset for ``--budget_s`` of training,
then the validation loss in nats per byte, next to nanoGPT's baby-GPT-on-CPU reference (1.91 /
1.64 / 1.53 after 2 / 5 / 14.5 minutes on this machine). ``transformer`` is the Transformer++ baseline (``pattern="A"``) in the same stack.
Every line carries the training throughput (tokens/s, forward + backward + optimizer). Each
invocation measures afresh: a preset's run directory ``<workdir>/<preset>`` from an earlier
invocation is replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from experiments import cli, configs
from experiments import train as train_lib

NANOGPT_CPU = {"2min": 1.91, "5min": 1.64, "14.5min": 1.53}  # nats/char, measured on this machine


def define_flags():
    flags.DEFINE_enum("suite", "mqar", ["mqar", "charlm"], "which target")
    flags.DEFINE_list("presets", None, "presets (default: the issue's); 'transformer' = pattern A")
    flags.DEFINE_float("budget_s", None, "training time per run (default 1800 mqar, 900 charlm)")
    flags.DEFINE_string("data", None, "text file for charlm")
    flags.DEFINE_string("workdir", None, "runs go to <workdir>/<preset> (default runs/bench_<suite>)")
    flags.DEFINE_list("set", [], "extra config overrides")


def fit_steps(cfg: configs.TrainConfig, budget_s: float, workdir: str, data_path=None, probe: int = 60,
              margin: float = 0.93) -> int:
    """Number of steps that fill ``budget_s`` of training, from a ``probe``-step run's median
    throughput (its compile excluded) times ``margin`` (room for evaluations and checkpoints): the
    cosine schedule then ends inside the budget instead of being cut off at a high learning rate."""
    probe_cfg = dataclasses.replace(cfg, steps=probe, time_budget_s=0.0, eval_every=10 * probe,
                                    checkpoint_every=10 * probe, log_every=10)
    s = train_lib.train(probe_cfg, workdir, data_path=data_path, progress=False, overwrite=True)
    steps_per_s = s["train_tokens_per_s"] / (cfg.batch * cfg.seq_len)
    return max(int(margin * budget_s * steps_per_s), cfg.warmup + 1)


def run(suite: str, names: list[str], budget_s: float, workdir: str, data_path=None, sets=()) -> list[dict]:
    out = []
    for name in names:
        over = [f"time_budget_s={budget_s}", *sets]
        over += ["model.pattern=A"] if name == "transformer" else [f"model.preset={name}"]
        if suite == "mqar":  # the config's cosine schedule (annealing matters: experiments/README.md), stop at 99%
            over = ["stop_at_target=true", "log_every=50", *over]
        cfg = configs.override(configs.get(suite), over)
        if suite == "charlm" and not any(x.startswith("steps=") for x in sets):
            cfg = dataclasses.replace(cfg, steps=fit_steps(cfg, budget_s, os.path.join(workdir, name + "_probe"),
                                                           data_path))
        s = train_lib.train(cfg, os.path.join(workdir, name), data_path=data_path, progress=False, overwrite=True)
        row = {"suite": suite, "preset": name, "params": s["params"], "steps": s["steps_done"],
               "steps_planned": cfg.steps, "train_s": s.get("train_s"),
               "train_tokens_per_s": s["train_tokens_per_s"], "budget_s": budget_s}
        if suite == "mqar":
            row.update(accuracy=s.get("eval_mqar_accuracy"), reached_99=s.get("reached_target_at_step") is not None,
                       time_to_99_s=s.get("reached_target_after_s"), step_at_99=s.get("reached_target_at_step"))
        else:
            row.update(val_loss=s.get("eval_val_loss"), val_bits_per_byte=s.get("val_bits_per_byte"),
                       val_perplexity=s.get("val_perplexity"),
                       val_curve=[(round(r["elapsed_s"]), round(r["eval_val_loss"], 4)) for r in s["eval_curve"]],
                       nanogpt_cpu_reference=NANOGPT_CPU)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    default = {"mqar": ["moneta", "yaad", "memora", "gated_deltanet"],
               "charlm": ["moneta", "yaad", "memora", "transformer"]}[f.suite]
    budget = f.budget_s or (4000.0 if f.suite == "mqar" else 900.0)
    try:
        run(f.suite, f.presets or default, budget, f.workdir or f"runs/bench_{f.suite}", f.data, f.set)
    except (ValueError, FileNotFoundError, train_lib.TrainingError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
