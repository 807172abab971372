"""Perplexity, bits per byte and loss by token position of a saved corpus run, at its training context
and longer ones (length extrapolation: train at T, evaluate at 2T, 4T, 8T).

    python -m experiments.eval_lm --workdir=runs/corpus --data=corpora/stdlib --lengths=1,2,4,8

For each context length ``L = m T`` (``m`` in ``--lengths``, ``T`` the run's ``seq_len``) the validation
documents are packed into rows of ``L`` tokens exactly as in training (``lm_data.eval_rows``: a
document longer than ``L + 1`` tokens is cut into pieces, each restarting the memory), and every
target is scored once. One JSON line per length: ``loss`` (nats / token, token-weighted over the whole
pass), ``perplexity``, ``bits_per_byte`` (``loss / ln 2 x`` scored tokens per byte of the split; a
document's first token is not predicted, its bytes are counted) and ``loss_by_position``: the mean
loss of targets at position ``p`` of their document piece, in log-spaced buckets. ``positions.png``
plots those curves, one per length: a model that extrapolates keeps its loss flat (or falling) past
position ``T``.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from experiments import cli, lm_data
from experiments import train as train_lib
from experiments.checkpoint import CheckpointError


def define_flags():
    flags.DEFINE_string("workdir", None, "the run's directory (a --config=corpus run)", required=True)
    flags.DEFINE_string("data", None, "the tokenized corpus the run was trained on (experiments.prepare)",
                        required=True)
    flags.DEFINE_list("lengths", ["1", "2", "4"], "context lengths as multiples of the run's seq_len")
    flags.DEFINE_integer("batch", 4, "rows per forward")
    flags.DEFINE_integer("max_batches", None, "stop each length after this many batches (default: the whole split)")
    flags.DEFINE_string("split", "validation", "the corpus split to score")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")


def buckets(L: int) -> np.ndarray:
    """Bucket edges over positions ``[0, L)``: 0, 1, 2, 4, ..., L (log-spaced)."""
    edges = [0] + [2 ** i for i in range(int(math.log2(max(L, 1))) + 1)]
    return np.unique(np.minimum(np.array(edges + [L]), L))


def token_losses(model_fn, batch) -> np.ndarray:
    """``[b, t]`` cross-entropy of every target (0 on padding)."""
    logits = model_fn(batch["inputs"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return np.asarray(ce, np.float64) * np.asarray(batch["mask"])


def evaluate_lengths(workdir: str, data_path: str, multiples, *, batch: int = 4, max_batches=None,
                     split: str = "validation", step=None) -> list[dict]:
    """One dict per context length (see the module docstring)."""
    cfg, graphdef, params, rest, got = train_lib.load_run(workdir, step=step)
    if cfg.task != "corpus":
        raise ValueError(f"{workdir} is a {cfg.task!r} run: eval_lm scores runs of --config=corpus on their corpus")
    meta = lm_data.load_meta(data_path)
    if meta["vocab_size"] != cfg.model.vocab_size:
        raise ValueError(f"the corpus {data_path} has a {meta['vocab_size']}-token vocabulary but the run's model "
                         f"has {cfg.model.vocab_size}")
    info = meta["splits"].get(split)
    if not info or not info.get("documents"):
        raise ValueError(f"split {split!r} of {data_path} has no documents")
    per_byte = (info["tokens"] - info["documents"]) / max(info["bytes"], 1)
    align = train_lib.corpus_align(cfg)
    model = train_lib.merge(graphdef, params, rest)
    fn = jax.jit(lambda x, seg: model(x, segment_ids=seg, segment_align=align))
    out = []
    for m in multiples:
        L = int(m) * cfg.seq_len
        edges = buckets(L)
        sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1)
        total, n, t0 = 0.0, 0, time.perf_counter()
        for b, _ in lm_data.eval_rows(data_path, split, seq_len=L, batch_size=batch, max_batches=max_batches,
                                      align=align):
            ce = token_losses(fn, {k: jnp.asarray(b[k]) for k in ("inputs", "targets", "segment_ids", "mask")})
            real = b["mask"] > 0
            pos = b["segment_positions"][real]
            idx = np.searchsorted(edges, pos, side="right") - 1
            np.add.at(sums, idx, ce[real])
            np.add.at(counts, idx, 1)
            total, n = total + float(ce.sum()), n + int(real.sum())
        loss = total / max(n, 1)
        out.append({"workdir": workdir, "step": got, "preset": cfg.model.preset, "split": split,
                    "train_seq_len": cfg.seq_len, "length": L, "tokens": n, "loss": loss,
                    "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2) * per_byte,
                    "loss_by_position": [{"from": int(a), "to": int(z), "tokens": int(c),
                                          "loss": (s / c if c else None)}
                                         for a, z, s, c in zip(edges[:-1], edges[1:], sums, counts)],
                    "seconds": round(time.perf_counter() - t0, 2)})
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        pts = [((b["from"] + b["to"]) / 2, b["loss"]) for b in r["loss_by_position"] if b["loss"] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"context {r['length']}")
    if results:
        ax.axvline(results[0]["train_seq_len"], color="gray", ls="--", lw=1, label="training context")
    ax.set_xscale("symlog")
    ax.set_xlabel("position in document")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"{results[0]['preset'] if results else ''}: loss by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        multiples = [int(m) for m in f.lengths]
        if not multiples or min(multiples) < 1:
            raise ValueError(f"--lengths must be positive integers, got {f.lengths}")
        results = evaluate_lengths(f.workdir, f.data, multiples, batch=f.batch, max_batches=f.max_batches,
                                   split=f.split, step=f.step)
    except (ValueError, FileNotFoundError, train_lib.TrainingError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None
    for r in results:
        print(train_lib.dumps(r), flush=True)
    plot(results, os.path.join(f.workdir, "positions.png"))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
