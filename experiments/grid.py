"""Train a grid of variants that differ only in numeric hyper-parameters as ONE vmapped program.

    python -m experiments.grid --config=mqar --preset=moneta --grid=p=1,1.5,2,3,4 --grid=q=2,3,4 \
        --workdir=runs/grid_pq [--steps=N] [--set=...] [--shard_grid]

Every variant has the same model structure, initialisation, data and optimizer; only spec
hyper-parameters (``HParam`` state of the Miras layers: ``p``, ``q``, ``delta_scale``,
``lr_scale``, ...) and the optimizer's peak learning rate ``lr`` (``--grid=lr=1e-4,1e-3``) differ.
The ``K`` variants' params / optimizer states / hparams are stacked on a leading axis and one
``jax.vmap``-ed train step updates them all (``--shard_grid``: that axis is split over the devices).
Variant ``i`` follows exactly the run ``train.py`` would make with ``--set=model.hparams=<its
values>`` (and ``--set=lr=<its lr>``) (tested). A grid ``lr`` scales the AdamW updates by
``lr / cfg.lr``: AdamW's update is linear in its learning rate (the schedule is ``lr`` times a
shape, the moments do not depend on it), so this is the run with that ``lr`` up to rounding.

Writes ``<workdir>/metrics.jsonl`` (per step: ``loss`` = mean, ``losses`` = per variant),
``<workdir>/variants/<name>/`` (a normal run directory: ``checkpoints/`` + ``summary.json``, so
``experiments.evaluate`` works on it), ``results.md`` (table) and ``heatmap.png`` (2-D grids).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import cli, configs, data
from experiments import train as train_lib
from experiments.checkpoint import Checkpointer
from miras_jax import presets


def define_flags():
    flags.DEFINE_string("config", "mqar", f"config name: {configs.names()}")
    flags.DEFINE_string("preset", None, "override the Miras preset")
    flags.DEFINE_multi_string("grid", [], "name=v1,v2,... (repeat for a product grid)")
    flags.DEFINE_string("workdir", "runs/grid", "output directory")
    flags.DEFINE_integer("steps", None, "override the number of training steps")
    flags.DEFINE_string("data", None, "text file (charlm)")
    flags.DEFINE_list("set", [], "config overrides field=value")
    flags.DEFINE_bool("shard_grid", False, "split the variant axis over the devices")
    flags.DEFINE_bool("progress", True, "progress bar")
    flags.DEFINE_bool("overwrite", False, "delete the grid already in --workdir and start afresh")


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    """``["p=1,2", "q=3"]`` -> ``{"p": [1.0, 2.0], "q": [3.0]}``."""
    out = {}
    for item in items:
        name, eq, values = item.partition("=")
        if not eq or not values:
            raise ValueError(f"--grid takes name=v1,v2,..., got {item!r}")
        try:
            out[name] = [float(v) for v in values.split(",") if v]
        except ValueError:
            raise ValueError(f"--grid values must be numbers: {item!r}") from None
    if not out:
        raise ValueError("give at least one --grid=name=v1,v2,...")
    return out


def variants(grid: dict[str, list[float]]) -> list[dict[str, float]]:
    names = list(grid)
    return [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))]


def variant_name(v: dict) -> str:
    return "_".join(f"{k}{x:g}" for k, x in v.items())


def _hparam_leaves(rest_dict) -> list[tuple]:
    """Paths of every ``HParam`` leaf (``.../hparams/<component>/<name>``) in the model's state."""
    paths = [tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(rest_dict)[0]]
    return [p for p in paths if "hparams" in p]


def with_hparams(rest_dict, values: dict):
    """A copy of the (pure-dict) model state with the named hparams set in every Miras layer."""
    out = jax.tree.map(lambda x: x, rest_dict)
    leaves = _hparam_leaves(rest_dict)
    for name, value in values.items():
        paths = [p for p in leaves if str(p[-1]).split("/")[-1] == name]
        if not paths:
            valid = sorted({str(p[-1]).split("/")[-1] for p in leaves})
            raise ValueError(f"the model has no hyper-parameter {name!r}; valid: {valid}")
        for path in paths:
            node = out
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = jnp.asarray(value, jnp.float32)
    return out


def make_step(graphdef, tx):
    """``(step, loss_fn)`` for ONE variant, with its hparam state ``rest_d`` as an argument:
    ``step(params, opt_state, rest_d, batch, lr_scale=1.0) -> (params, opt_state, loss, accuracy)``
    (``lr_scale``: the variant's learning rate over ``tx``'s); ``jax.vmap(step, in_axes=(0, 0, 0,
    None, 0))`` runs a grid."""
    def loss_fn(params, rest_d, batch):
        model = nnx.merge(graphdef, params, rest_d)
        return train_lib.masked_loss(model(batch["inputs"], batch.get("positions")), batch)

    def step(params, opt_state, rest_d, batch, lr_scale=1.0):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest_d, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    return step, loss_fn


def _split_lr(v: dict) -> tuple[dict, float | None]:
    """A variant's model hparams and its optimizer learning rate (``None``: the config's)."""
    return {k: x for k, x in v.items() if k != "lr"}, v.get("lr")


def grid_configs(cfg, vs):
    """The ``train.py`` config of each variant (``model.hparams``; ``lr`` if the grid sets it)."""
    out = []
    for v in vs:
        hp, lr = _split_lr(v)
        c = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, hparams=tuple({**dict(cfg.model.hparams), **hp}.items())))
        out.append(c if lr is None else dataclasses.replace(c, lr=lr))
    return out


GRID_FILES = ("metrics.jsonl", "variants", "results.md", "heatmap.png")


def run_grid(cfg: configs.TrainConfig, grid: dict, workdir: str, *, data_path=None, shard: bool = False,
             progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Train the grid's variants as one vmapped program into ``workdir``; a ``workdir`` that already
    holds a grid is refused unless ``overwrite`` (which deletes ``GRID_FILES`` first)."""
    held = [n for n in GRID_FILES[:2] if os.path.exists(os.path.join(workdir, n))]
    if held and not overwrite:
        raise train_lib.TrainingError(f"{workdir} already holds a grid ({', '.join(held)}); train into a new "
                                      "--workdir, or pass --overwrite to delete it and start afresh")
    with jax.numpy_dtype_promotion("standard"):
        return _run_grid(cfg, grid, workdir, data_path=data_path, shard=shard, progress=progress,
                         overwrite=overwrite)


def _run_grid(cfg, grid, workdir, *, data_path, shard, progress, overwrite):
    cfg = train_lib.resolved(cfg)
    vs = variants(grid)
    K = len(vs)
    spec = presets.get(cfg.model.preset, **dict(cfg.model.preset_kwargs))
    hps = [_split_lr(v)[0] for v in vs]
    lrs = [cfg.lr if lr is None else lr for lr in (_split_lr(v)[1] for v in vs)]
    if not min(lrs) > 0:
        raise ValueError(f"a grid lr must be > 0, got {min(lrs)}")
    for v in hps:                     # every variant must be a valid spec (clear error otherwise)
        spec.with_hparams(**v).validate()
    task = train_lib.make_task(cfg, data_path)
    graphdef, params, rest, tx, schedule = train_lib.build(cfg, task.vocab)
    if overwrite:
        train_lib.clear_run(workdir, GRID_FILES)
    os.makedirs(workdir, exist_ok=True)  # only now: a grid that fails validation leaves no directory
    rest_dict = nnx.to_pure_dict(rest)
    rests = [with_hparams(rest_dict, v) for v in hps]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    params_k = stack([params] * K)
    rest_k = stack(rests)
    opt_k = jax.vmap(tx.init)(params_k)
    scale_k = jnp.asarray([lr / cfg.lr for lr in lrs], jnp.float32)   # [K]: lr over tx's learning rate
    if shard:
        n = jax.device_count()
        if K % n:
            raise ValueError(f"--shard_grid needs the {K} variants to divide over {n} devices")
        mesh = jax.make_mesh((n,), ("grid",))
        put = lambda t: jax.device_put(t, NamedSharding(mesh, P("grid")))  # noqa: E731
        params_k, rest_k, opt_k, scale_k = put(params_k), put(rest_k), put(opt_k), put(scale_k)

    step, loss_fn = make_step(graphdef, tx)
    grid_step = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, 0)), donate_argnums=(0, 1))
    grid_eval = jax.jit(jax.vmap(loss_fn, in_axes=(0, 0, None)))

    it = data.DataIterator(task.train_batch, cfg.seed)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    open(metrics_path, "w").close()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"grid x{K}", unit="step")
    t0, losses, evals = time.perf_counter(), None, {}
    for s in range(1, cfg.steps + 1):
        params_k, opt_k, loss, acc = grid_step(params_k, opt_k, rest_k, next(it), scale_k)
        losses = np.asarray(loss)
        if not np.all(np.isfinite(losses)):
            bad = [variant_name(v) for v, x in zip(vs, losses) if not math.isfinite(x)]
            logging.warning("non-finite loss at step %d for %s (kept; its row is NaN)", s, bad)
        row = None
        if s % cfg.log_every == 0 or s == cfg.steps:
            row = {"step": s, "loss": float(np.nanmean(losses)), "losses": losses.tolist(),
                   "elapsed_s": time.perf_counter() - t0}
        if s % cfg.eval_every == 0 or s == cfg.steps:
            evals = {}
            for name, batches in task.eval_sets.items():
                out = [grid_eval(params_k, rest_k, b) for b in batches]
                evals[f"eval_{name}_loss"] = np.mean([np.asarray(o[0]) for o in out], axis=0).tolist()
                evals[f"eval_{name}_accuracy"] = np.mean([np.asarray(o[1]) for o in out], axis=0).tolist()
            row = {**(row or {"step": s, "loss": float(np.nanmean(losses))}), **evals}
        if row is not None:
            with open(metrics_path, "a") as f:
                f.write(train_lib.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.nanmean(losses):.4f}")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0
    results = []
    for i, (v, vcfg) in enumerate(zip(vs, grid_configs(cfg, vs))):
        vdir = os.path.join(workdir, "variants", variant_name(v))
        os.makedirs(vdir, exist_ok=True)
        take = lambda t: jax.tree.map(lambda x: np.asarray(x[i]), t)  # noqa: E731
        with Checkpointer(os.path.join(vdir, "checkpoints")) as ck:
            ck.save(cfg.steps, {"params": take(params_k), "opt_state": take(opt_k),
                                "step": jnp.asarray(cfg.steps, jnp.int32)},
                    {"data": it.get_state(), "config": train_lib._config_dict(vcfg)}, force=True)
        row = {"variant": variant_name(v), **v, "final_loss": float(losses[i]),
               **{k: float(x[i]) for k, x in evals.items()}}
        with open(os.path.join(vdir, "summary.json"), "w") as f:
            f.write(train_lib.dumps({**row, "config": train_lib._config_dict(vcfg)}, indent=1))
        results.append(row)
    write_report(results, grid, cfg, workdir, wall)
    return results


def write_report(results, grid, cfg, workdir, wall):
    metric = next((k for k in ("eval_val_loss", "eval_mqar_loss") if k in results[0]), "final_loss")
    keys = [k for k in results[0] if k not in ("variant",)]
    lines = [f"# Grid: {cfg.task} / {cfg.model.preset}, {cfg.steps} steps, {len(results)} variants "
             f"in one program ({wall:.0f} s)", "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    for r in sorted(results, key=lambda r: r[metric]):
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    names = list(grid)
    if len(names) >= 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        a, b = names[:2]
        table = np.full((len(grid[a]), len(grid[b])), np.nan)
        for r in results:
            table[grid[a].index(r[a]), grid[b].index(r[b])] = r[metric]
        fig, ax = plt.subplots(figsize=(1.2 * len(grid[b]) + 2, 0.8 * len(grid[a]) + 1.5))
        im = ax.imshow(table, cmap="viridis_r")
        ax.set_xticks(range(len(grid[b])), [f"{x:g}" for x in grid[b]])
        ax.set_yticks(range(len(grid[a])), [f"{x:g}" for x in grid[a]])
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                ax.text(j, i, f"{table[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, label=metric)
        ax.set_title(f"{cfg.model.preset}: {metric}")
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, "heatmap.png"), dpi=100)
        plt.close(fig)


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        cfg = configs.get(f.config)
        sets = list(f.set) + ([f"steps={f.steps}"] if f.steps else []) + (
            [f"model.preset={f.preset}"] if f.preset else [])
        cfg = configs.override(cfg, sets)
        results = run_grid(cfg, parse_grid(f.grid), f.workdir, data_path=f.data, shard=f.shard_grid,
                           progress=f.progress, overwrite=f.overwrite)
    except (ValueError, FileNotFoundError, train_lib.TrainingError) as e:
        raise app.UsageError(str(e)) from None
    for r in results:
        print(train_lib.dumps(r))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
