"""Context parallelism's cost: one sequence on one device against the same sequence split over a
``seq`` mesh axis of host devices (``engine/context.py``), and the exact forms' chunk-state scan,
sequential against associative (``exact._scan_states``). One JSON line per measurement.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.bench_context_parallel \
        [--presets=gated_deltanet,moneta] [--lengths=8192,32768,131072] [--seq=8] [--modes=fwd,fwd+bwd] \
        [--seq_modes=auto,hierarchy]

Rows: ``{"bench": "seq_axis", "preset", "T", "devices", "seq_mode", "mode", "tokens_per_s", "s"}``
(``devices`` 1: ``memorize_batched`` without a mesh; ``N``: ``seq:N``) and ``{"bench": "state_scan",
"family", "T", "state_scan", "mode", "tokens_per_s"}``. ``B = 1`` sequence of ``H`` heads of width
``d``; the median of ``--iters`` timed calls after one warm-up. On a CPU the host devices share its
cores, so ``seq:N`` shows the method's overhead (the summary's extra ``k`` value rows, the
pipeline's bubble), not a speed-up.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from miras_jax import presets, sharding
from miras_jax.engine import api, context, exact

flags.DEFINE_list("presets", ["gated_deltanet", "moneta"], "presets (summary where exact, else pipeline)")
flags.DEFINE_list("lengths", ["8192", "32768", "131072"], "sequence lengths")
flags.DEFINE_integer("seq", 8, "devices on the seq axis (host devices: XLA_FLAGS)")
flags.DEFINE_list("seq_modes", ["auto"], "seq_mode per seq-axis point: auto (summary / pipeline), pipeline, "
                  "hierarchy (global chunk: the slice)")
flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and / or fwd+bwd")
flags.DEFINE_integer("heads", 2, "heads")
flags.DEFINE_integer("dim", 64, "head width d_k = d_v")
flags.DEFINE_integer("chunk", 64, "chunk size")
flags.DEFINE_integer("iters", 3, "timed calls per point (median)")
flags.DEFINE_list("state_scan_lengths", ["2048", "16384", "65536"], "lengths of the state-scan comparison "
                  "(empty: skip it)")
FLAGS = flags.FLAGS


def _time(fn, *args, iters):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _inputs(spec, T, H, d):
    ks = jax.random.split(jax.random.key(0), 4)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (1, T, H, d))), unit(jax.random.normal(ks[1], (1, T, H, d)))
    v = jax.random.normal(ks[2], (1, T, H, d))
    gates = {"lr": jnp.full((1, T, H), 0.1), "decay": jnp.full((1, T, H), 0.99), "momentum": jnp.full((1, T, H), 0.5),
             "delta": jnp.ones((1, T, H))}
    gates = {n: g for n, g in gates.items() if n in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[3], H))
    return params, (q, k, v, gates)


def seq_axis_point(name, T, n, mode, *, H, d, chunk, iters, seq_mode="auto"):
    spec = presets.get(name)
    params, args = _inputs(spec, T, H, d)
    kw = dict(chunk_size=chunk, implementation="xla")
    if n > 1:
        kw.update(mesh=sharding.make_mesh(f"seq:{n}"), seq_axis="seq", batch_axes=None, seq_mode=seq_mode)

    def fwd(p, a):
        return api.memorize_batched(spec, p, *a, **kw)[0]

    fn = jax.jit(fwd) if mode == "fwd" else jax.jit(jax.grad(lambda p, a: jnp.sum(fwd(p, a) ** 2), argnums=(0, 1)))
    s = _time(fn, params, args, iters=iters)
    return {"bench": "seq_axis", "preset": name, "T": T, "devices": n,
            "seq_mode": context.seq_mode(spec, seq_mode) if n > 1 else None, "mode": mode,
            "tokens_per_s": round(T / s), "s": round(s, 4)}


def state_scan_point(family, T, scan, mode, *, H, d, chunk, iters):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (H, T, d))
    k = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    v = jax.random.normal(ks[1], (H, T, d))
    lr, la, W0 = jnp.full((H, T), 0.3), jnp.full((H, T), -0.01), jnp.zeros((H, d, d))
    c = min(chunk, 32) if family == "delta" else chunk
    form = exact.delta_chunked if family == "delta" else exact.hebbian_chunked
    run = jax.vmap(lambda q, k, v, lr, la, W0: form(q, k, v, lr, la, W0, c, state_scan=scan))

    def loss(q, k, v):
        y, W = run(q, k, v, lr, la, W0)
        return jnp.sum(y * y) + jnp.sum(W)

    fn = jax.jit(lambda q, k, v: run(q, k, v, lr, la, W0)) if mode == "fwd" else jax.jit(jax.grad(loss, (0, 1, 2)))
    s = _time(fn, q, k, v, iters=iters)
    return {"bench": "state_scan", "family": family, "T": T, "chunk": c, "heads": H, "state_scan": scan,
            "mode": mode, "tokens_per_s": round(H * T / s)}


def main(_):
    kw = dict(H=FLAGS.heads, d=FLAGS.dim, chunk=FLAGS.chunk, iters=FLAGS.iters)
    if FLAGS.seq > len(jax.devices()):
        raise app.UsageError(f"--seq={FLAGS.seq} needs {FLAGS.seq} devices, have {len(jax.devices())} "
                             f"(XLA_FLAGS=--xla_force_host_platform_device_count={FLAGS.seq})")
    for T in map(int, FLAGS.state_scan_lengths):
        for family in ("delta", "hebbian"):
            for mode in FLAGS.modes:
                for scan in exact.STATE_SCANS:
                    print(json.dumps(state_scan_point(family, T, scan, mode, **kw)), flush=True)
    for name in FLAGS.presets:
        for T in map(int, FLAGS.lengths):
            for mode in FLAGS.modes:
                print(json.dumps(seq_axis_point(name, T, 1, mode, **kw)), flush=True)
                for seq_mode in FLAGS.seq_modes:
                    print(json.dumps(seq_axis_point(name, T, FLAGS.seq, mode, seq_mode=seq_mode, **kw)), flush=True)


if __name__ == "__main__":
    cli.run(main)
