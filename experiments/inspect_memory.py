"""Look inside a saved run's Miras memories on one training batch: per (layer, head) the gates, how
far the memory moved from ``W_0``, and how much of its read survives the memory's LayerNorm.

    python -m experiments.inspect_memory --workdir=runs/mqar_moneta [--step=N] [--data=PATH]

Prints one JSON line per (Miras layer, head), all over the batch's tokens:

    lr_mean, lr_max, decay_mean, decay_min    the gates (``decay`` only if the spec has it)
    v_norm_mean                               ``|v_t|``
    memory_ratio        max over rows of ``||W_T||_F / ||W_0||_F``, per memory leaf
    accumulator_growth  max over rows of ``||A_T||_F / ||A_0||_F``, per leaf (accumulating
                        retentions only, e.g. Moneta's l_q: ``W = A / ||A||_q^(q-2)``)
    read_std, read_std_0  median over (rows, tokens) of the std of the memory's read of ``q_t``
                        before its LayerNorm and residual, with ``W_T`` and with ``W_0``; below
                        ``sqrt(eps)`` = 3.2e-3 (``memory.layer_norm``) the LN's eps swamps it.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli, train as train_lib
from experiments.checkpoint import CheckpointError
from miras_jax.engine.api import memorize_batched


def _fro(a):
    """``||a||_F`` over the last two axes."""
    return jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))


def _bare_read(memory, params, x):
    """The memory's read of ``x`` without its LayerNorm and residual (identity for a matrix)."""
    if memory.kind != "mlp":
        return memory.apply(params, x)
    return dataclasses.replace(memory, layer_norm=False, residual=False).apply(params, x)


def layer_stats(layer, x) -> list[dict]:
    """One dict per head (keys: the module docstring) for a ``MirasLayer`` on its input ``x: [b, t, d]``."""
    q, k, v, _ = layer._qkv(x, None)
    gates = layer._gates(x)
    spec, w0 = layer.spec, layer.memory_init()
    _, st = memorize_batched(spec, w0, q, k, v, gates, chunk_size=layer.chunk_size,
                             implementation=layer.implementation)
    mem = spec.memory
    # [b, t, h, k] -> per head, the memory's bare read with W_T (per row) and with W_0
    read_t = jax.vmap(jax.vmap(lambda p, qq: jax.vmap(lambda x1: _bare_read(mem, p, x1))(qq),
                               in_axes=(0, 1), out_axes=1))(st[0], q)
    read_0 = jax.vmap(lambda p, qq: jax.vmap(jax.vmap(lambda x1: _bare_read(mem, p, x1)))(qq),
                      in_axes=(0, 2), out_axes=2)(w0, q)
    std_t, std_0 = np.asarray(jnp.std(read_t, axis=-1)), np.asarray(jnp.std(read_0, axis=-1))
    ratio = [np.asarray(jnp.max(_fro(w) / _fro(w_0)[None], axis=0))
             for w, w_0 in zip(mem.leaves(st[0]), mem.leaves(w0))]
    growth = None
    if spec.retention.accumulate:
        growth = [np.asarray(jnp.max(_fro(a) / _fro(w_0)[None], axis=0))
                  for a, w_0 in zip(jax.tree.leaves(st[1]), mem.leaves(w0))]
    vn = np.asarray(jnp.linalg.norm(v, axis=-1))
    out = []
    for h in range(layer.h):
        row = {"head": h, "lr_mean": float(np.mean(gates["lr"][..., h])), "lr_max": float(np.max(gates["lr"][..., h])),
               "v_norm_mean": float(vn[..., h].mean()), "memory_ratio": [float(r[h]) for r in ratio],
               "read_std": float(np.median(std_t[:, :, h])), "read_std_0": float(np.median(std_0[:, :, h]))}
        if "decay" in gates:
            d = np.asarray(gates["decay"])[:, :, h]
            row.update(decay_mean=float(d.mean()), decay_min=float(d.min()))
        if growth is not None:
            row["accumulator_growth"] = [float(g[h]) for g in growth]
        out.append(row)
    return out


def inspect(model, tokens) -> list[dict]:
    """``layer_stats`` of every Miras block of ``model`` (a ``MirasLM``) on ``tokens: [b, t]``, each
    row with its ``layer`` index."""
    rows = []
    h = model.embed(jnp.asarray(tokens))
    for i, blk in enumerate(model.blocks):
        if blk.kind == "M":
            rows += [{"layer": i, **r} for r in layer_stats(blk.mixer, blk.norm1(h))]
        h = blk(h)
    return rows


def inspect_run(workdir: str, step: int | None = None, data_path: str | None = None) -> list[dict]:
    """``inspect`` of a saved run on its training batch at the checkpoint's step."""
    cfg, graphdef, params, rest, got = train_lib.load_run(workdir, step)
    batch = train_lib.make_task(cfg, data_path).train_batch(cfg.seed, got)
    with jax.numpy_dtype_promotion("standard"):
        return [{"step": got, **r} for r in inspect(train_lib.merge(graphdef, params, rest), batch["inputs"])]


def define_flags():
    flags.DEFINE_string("workdir", None, "a training run's --workdir", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")
    flags.DEFINE_string("data", None, "the run's text file (charlm / text-haystack NIAH runs)")


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        rows = inspect_run(f.workdir, f.step, f.data)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
