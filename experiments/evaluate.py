"""Evaluate a saved run: rebuilds the model from the checkpoint's config and prints one JSON line.

    python -m experiments.evaluate --workdir=runs/smoke [--data=PATH] [--step=N] [--eval_batches=N]

MQAR: query accuracy; charlm: validation loss and bits per byte; niah: accuracy per context length.
"""

from __future__ import annotations


from absl import app, flags

from experiments import cli, configs
from experiments import train as train_lib
from experiments.checkpoint import CheckpointError


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)", required=True)
    flags.DEFINE_string("data", None, "text file (charlm task, niah 'text' haystack)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")
    flags.DEFINE_integer("eval_batches", None, "override the number of evaluation batches")


def evaluate_run(workdir: str, *, data_path=None, step=None, eval_batches=None) -> dict:
    cfg, graphdef, params, rest, restored_step = train_lib.load_run(workdir, step=step)
    if eval_batches is not None:
        cfg = configs.override(cfg, [f"eval_batches={eval_batches}"])
    task = train_lib.make_task(cfg, data_path)
    _, eval_step = train_lib.make_steps(graphdef, rest, None, segment_align=task.segment_align)
    out = {"workdir": workdir, "step": restored_step, "task": cfg.task, "preset": cfg.model.preset,
           **train_lib.evaluate(eval_step, params, task.eval_sets)}
    out.update(train_lib.lm_summary(out, task.tokens_per_byte))
    return out


def main(argv):
    del argv
    try:
        out = evaluate_run(flags.FLAGS.workdir, data_path=flags.FLAGS.data, step=flags.FLAGS.step, eval_batches=flags.FLAGS.eval_batches)
    except (ValueError, FileNotFoundError, train_lib.TrainingError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None
    print(train_lib.dumps(out))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
