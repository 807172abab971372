"""Grid throughput: K variants as one vmapped program vs K sequential runs of the same variants.

    python -m experiments.bench_grid [--config=smoke] [--preset=moneta] [--K=1,3,5,15] [--steps=10]
        [--set=model.d_model=64,...]

Both sides use the same jitted single-variant step (``grid.make_step``): the grid vmaps it over
the K variants (one call per step); the sequential side calls it once per variant per step.
Step timing excludes compilation (two warm-up steps each). One JSON line per K: steps/s of the
grid (all K variants advanced) and of the sequential loop, their ratio, the compile time of each
program, and ``runs_speedup``: K separate runs (K processes, each compiling its own program:
``K * (compile_1 + steps / rate_1)``) against one grid run (``compile_K + steps / rate_K``) for
``--run_steps`` steps, computed from those measured parts.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments import cli, configs, data, grid
from experiments import train as train_lib


def define_flags():
    flags.DEFINE_string("config", "smoke", "config name")
    flags.DEFINE_string("preset", "moneta", "Miras preset")
    flags.DEFINE_list("K", ["1", "3", "5", "15"], "numbers of variants")
    flags.DEFINE_integer("steps", 10, "timed steps")
    flags.DEFINE_list("set", [], "config overrides")
    flags.DEFINE_integer("run_steps", 400, "steps of a whole run for runs_speedup")


def _compile_s(fn, *args) -> float:
    t0 = time.perf_counter()
    fn.lower(*args).compile()
    return time.perf_counter() - t0


def measure(cfg, K: int, steps: int, run_steps: int) -> dict:
    task = train_lib.make_task(cfg, None)
    graphdef, params, rest, tx, _ = train_lib.build(cfg, task.vocab)
    rest_d = nnx.to_pure_dict(rest)
    ps = [1.0 + 3.0 * i / max(K - 1, 1) for i in range(K)]          # p in [1, 4]
    rests = [grid.with_hparams(rest_d, {"p": p}) for p in ps]
    step, _ = grid.make_step(graphdef, tx)
    one = jax.jit(step, donate_argnums=(0, 1))
    many = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None)), donate_argnums=(0, 1))
    stack = lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts)  # noqa: E731
    it = data.DataIterator(task.train_batch, cfg.seed)
    batches = [next(it) for _ in range(steps + 2)]

    pk, ok, rk = stack([params] * K), jax.vmap(tx.init)(stack([params] * K)), stack(rests)
    c_grid = _compile_s(many, pk, ok, rk, batches[0])
    c_one = _compile_s(one, params, tx.init(params), rests[0], batches[0])
    for b in batches[:2]:     # two warm-up steps: the 2nd call sees committed outputs (new cache key)
        pk, ok, *_ = many(pk, ok, rk, b)
    jax.block_until_ready(pk)
    t0 = time.perf_counter()
    for b in batches[2:]:
        pk, ok, loss, _ = many(pk, ok, rk, b)
    jax.block_until_ready(loss)
    t_grid = time.perf_counter() - t0

    states = [(jax.tree.map(jnp.copy, params), tx.init(params)) for _ in range(K)]
    for b in batches[:2]:
        states = [one(p, o, r, b)[:2] for (p, o), r in zip(states, rests)]
    jax.block_until_ready(states)
    t0 = time.perf_counter()
    for b in batches[2:]:
        states = [one(p, o, r, b)[:2] for (p, o), r in zip(states, rests)]
    jax.block_until_ready(states)
    t_seq = time.perf_counter() - t0
    return {"preset": cfg.model.preset, "d_model": cfg.model.d_model, "layers": cfg.model.num_layers,
            "batch": cfg.batch, "seq_len": cfg.seq_len, "K": K, "steps": steps,
            "grid_steps_per_s": round(steps / t_grid, 3), "sequential_steps_per_s": round(steps / t_seq, 3),
            "grid_speedup": round(t_seq / t_grid, 2), "compile_grid_s": round(c_grid, 2),
            "compile_one_s": round(c_one, 2), "run_steps": run_steps,
            "runs_speedup": round(K * (c_one + run_steps * t_seq / steps / K) /
                                  (c_grid + run_steps * t_grid / steps), 2), "jax": jax.__version__}


def main(argv):
    del argv
    f = flags.FLAGS
    cfg = configs.override(configs.get(f.config), [f"model.preset={f.preset}", *f.set])
    with jax.numpy_dtype_promotion("standard"):
        for K in map(int, f.K):
            print(json.dumps(measure(cfg, K, f.steps, f.run_steps)), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
