"""Demo: every preset memorises random key/value pairs; prints the recall error per preset.

    python -m experiments.demo [--pairs=16] [--dim=32] [--seed=0]

Each preset reads a sequence of ``pairs`` (k, v) pairs with orthonormal keys (repeated
``--epochs`` times), then is queried with the keys; the relative recall error
``||M(k_i) - v_i|| / ||v_i||`` and the throughput of the token-level engine are printed, one JSON
line per preset.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import cli

import miras_jax as mj

FLAGS = flags.DEFINE_integer("pairs", 16, "number of key/value pairs (< dim)")
flags.DEFINE_integer("dim", 32, "key/value dimension")
flags.DEFINE_integer("epochs", 1, "how often the pair sequence is repeated")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_float("lr", 1.0, "inner learning rate gate for every token")


def recall_error(name: str, n: int, d: int, epochs: int, lr: float, seed: int) -> dict:
    spec = mj.presets.get(name)
    key = jax.random.key(seed)
    basis, _ = jnp.linalg.qr(jax.random.normal(key, (d, d)))
    keys = basis[:n]
    values = jax.random.normal(jax.random.fold_in(key, 1), (n, d))
    k = jnp.tile(keys, (epochs, 1))
    v = jnp.tile(values, (epochs, 1))
    T = k.shape[0]
    if spec.num_steps > 1:
        k = jnp.repeat(k[:, None], spec.num_steps, axis=1)
        v = jnp.repeat(v[:, None], spec.num_steps, axis=1)
    gates = {"lr": jnp.full((T,), lr), "decay": jnp.full((T,), 0.999), "momentum": jnp.full((T,), 0.5),
             "delta": jnp.full((T,), 1.0)}
    if name == "gla":
        gates["decay"] = jnp.full((T, d), 0.999)
    if name == "memora":
        gates["lr"] = jnp.full((T,), 0.05)   # a multiplicative step: keep the simplex well inside
    params = spec.memory.init(jax.random.fold_in(key, 2), d, d)
    run = jax.jit(lambda p, k, v, g: mj.memorize(spec, p, k[:, 0] if k.ndim == 3 else k, k, v, g)[1].memory)
    memory = jax.block_until_ready(run(params, k, v, gates))
    t0 = time.perf_counter()
    memory = jax.block_until_ready(run(params, k, v, gates))
    dt = time.perf_counter() - t0
    read = jax.vmap(lambda x: spec.memory.apply(memory, x))(keys)
    err = jnp.linalg.norm(read - values, axis=-1) / jnp.linalg.norm(values, axis=-1)
    return {"preset": name, "pairs": n, "dim": d, "epochs": epochs,
            "recall_rel_err": round(float(err.mean()), 4), "tokens_per_s": round(T / dt)}


def main(argv):
    del argv
    f = flags.FLAGS
    if not 0 < f.pairs <= f.dim:
        raise app.UsageError(f"--pairs must be in [1, --dim], got {f.pairs} with --dim={f.dim}")
    for name in mj.presets.names():
        print(json.dumps(recall_error(name, f.pairs, f.dim, f.epochs, f.lr, f.seed)), flush=True)


if __name__ == "__main__":
    cli.run(main)
