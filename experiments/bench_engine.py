"""Engine benchmark: tokens/s, achieved FLOP/s and peak RSS per (preset, implementation, T, chunk, mode).

    python -m experiments.bench_engine [--presets=gated_deltanet,moneta] [--T=4096] [--chunk=64]
        [--impls=xla,reference] [--modes=fwd,fwd+bwd] [--iters=5]

Shape: B=2, H=4, head dim 64 (``--B --H --d``), float32, through ``mj.memorize_batched``.
Each measurement runs in its own subprocess so ``peak_rss_mb`` is that measurement's own peak.
``fwd+bwd`` differentiates ``sum(y^2)`` w.r.t. q, k, v, every gate and the initial memory.
FLOPs: XLA's cost analysis counts a loop body once, so it is taken on a one-chunk program (one
token for the token engine) and multiplied by the number of chunks; ``peak_frac`` divides the
achieved FLOP/s by ``--peak_gflops`` (190: this 2-core CPU's float32 matmul peak, JAX_NOTES).
Prints one JSON line per measurement.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags

from experiments import cli, configs
from experiments.bench_packed import packed_ids, segments_flag

flags.DEFINE_list("presets", ["gated_deltanet", "deltanet", "mamba2", "titans", "moneta", "yaad", "memora"],
                  "presets to measure")
flags.DEFINE_list("impls", ["xla", "reference"], "implementations")
flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd")
flags.DEFINE_list("T", ["4096"], "sequence lengths")
flags.DEFINE_integer("chunk", 64, "chunk size for 'xla'")
flags.DEFINE_integer("B", 2, "batch")
flags.DEFINE_integer("H", 4, "heads")
flags.DEFINE_integer("d", 64, "head dim (d_k = d_v)")
flags.DEFINE_integer("iters", 5, "timed iterations (median reported)")
flags.DEFINE_integer("remat_every", 0, "remat groups of chunks (xla mini-batch forms)")
flags.DEFINE_float("peak_gflops", 190.0, "machine float32 matmul peak, GFLOP/s")
flags.DEFINE_integer("host_devices", 1, "> 1: split the batch over this many host CPU devices, each "
                     "running single-threaded (data parallel over the cores; B must divide)")
flags.DEFINE_bool("traced_hparams", False, "pass the spec's hyper-parameters as a jit argument (as vmapped "
                  "grids do) instead of closing over them: no static-q l_q fast path")
flags.DEFINE_list("segments", ["0"], "packed rows: 0 = one document per row; N = documents of random "
                  "lengths (mean N tokens) with segment_ids; Na = the same documents each padded to a "
                  "multiple of --chunk, with segment_align=chunk; several values: an A/B in one run")
flags.DEFINE_string("child", "", "internal: run one measurement 'preset,impl,T,mode'")
FLAGS = flags.FLAGS


def _program(preset: str, impl: str, T: int, mode: str):
    """``(jitted fn, args, spec)`` for one measurement."""
    import jax
    import jax.numpy as jnp

    import miras_jax as mj

    f = FLAGS
    B, H, d = f.B, f.H, f.d
    name, _, kw = preset.partition(":")      # structural options: "omeganet:window=4;degree=none"
    spec = mj.presets.get(name, **dict(configs.parse_pairs(kw)))
    from miras_jax.engine.window import write_gain
    n = spec.num_steps
    ks = jax.random.split(jax.random.key(0), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    sub = (n,) if n > 1 else ()
    q = unit(jax.random.normal(ks[0], (B, T, H, d)))
    k = unit(jax.random.normal(ks[1], (B, T, H) + sub + (d,)))
    v = jax.random.normal(ks[2], (B, T, H) + sub + (d,))
    gates = {
        "lr": jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H) + sub)) * (0.1 if spec.memory.kind == "mlp" else 1.0)
        / write_gain(spec),
        "decay": jax.nn.sigmoid(4.0 + jax.random.normal(ks[4], (B, T, H) + ((d,) if name == "gla" else ()))),
        "momentum": jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H))),
        "delta": jax.nn.softplus(jax.random.normal(ks[6], (B, T, H))),
        "omega": jax.nn.sigmoid(2.0 + jax.random.normal(ks[6], (B, T, H))),
    }
    gates = {g: gates[g] for g in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[7], H))
    kw = dict(chunk_size=f.chunk if impl == "xla" else 1, implementation=impl, remat_every=f.remat_every)
    mean, align = segments_flag(f.segments[0])
    if mean:
        kw["segment_ids"] = jnp.asarray(packed_ids(B, T, mean, f.chunk if align else 0))
        if align and impl == "xla":
            kw["segment_align"] = f.chunk

    def fwd(params, q, k, v, gates, hp=None):
        s = spec if hp is None else spec.replace(hparams=hp)
        return mj.memorize_batched(s, params, q, k, v, gates, **kw)[0]

    if mode == "fwd":
        fn = jax.jit(fwd)
    else:
        fn = jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a) ** 2), argnums=(0, 1, 2, 3, 4)))
    args = (params, q, k, v, gates)
    hp = (spec.hparams,) if f.traced_hparams else ()
    if f.host_devices > 1:   # batch rows over the host devices (one core each), params replicated
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((f.host_devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        rows = lambda t: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), t)  # noqa: E731
        args = (jax.device_put(params, NamedSharding(mesh, P())), *rows((q, k, v, gates)))
        hp = jax.device_put(hp, NamedSharding(mesh, P()))
    return fn, args + hp, kw


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def measure(preset: str, impl: str, T: int, mode: str) -> dict:
    import jax

    f = FLAGS
    B, H, d = f.B, f.H, f.d
    fn, args, kw = _program(preset, impl, T, mode)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    unit = kw["chunk_size"]
    fn1, args1, _ = _program(preset, impl, unit, mode)
    # XLA counts one partition of an SPMD program: x host_devices for the whole batch
    flops = _flops(fn1.lower(*args1).compile()) * (-(-T // unit)) * f.host_devices
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(f.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "preset": preset, "impl": impl, "B": B, "H": H, "d": d, "T": T,
        "chunk": kw["chunk_size"], "mode": mode, "tokens_per_s": round(B * T / med, 1),
        "median_s": round(med, 4), "gflops_per_s": round(flops / med / 1e9, 2),
        "peak_frac": round(flops / med / 1e9 / f.peak_gflops, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "compile_s": round(compile_s, 2), "remat_every": f.remat_every, "host_devices": f.host_devices,
        "traced_hparams": f.traced_hparams, "segments": f.segments[0],
        "pad_frac": round(float((kw["segment_ids"] == 0).mean()), 4) if "segment_ids" in kw else 0.0,
        "allocator": "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc",
        "jax": jax.__version__,
    }


def main(argv):
    del argv
    f = FLAGS
    if f.child:
        if f.host_devices > 1:   # before jax is imported (it is imported lazily, in measure)
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count="
                                       f"{f.host_devices} --xla_cpu_multi_thread_eigen=false").strip()
        preset, impl, T, mode = f.child.split(",")
        print(json.dumps(measure(preset, impl, int(T), mode)), flush=True)
        return
    for seg in f.segments:
        try:
            segments_flag(seg)
        except ValueError as e:
            cli.fail(str(e))
    passthrough = [a for a in sys.argv[1:]
                   if not a.startswith(("--presets", "--impls", "--modes", "--T=", "--segments"))]
    for T, preset, impl, mode, seg in itertools.product(f.T, f.presets, f.impls, f.modes, f.segments):
        cmd = [sys.executable, "-m", "experiments.bench_engine", *passthrough, f"--segments={seg}",
               f"--child={preset},{impl},{T},{mode}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            print(json.dumps({"preset": preset, "impl": impl, "T": int(T), "mode": mode, "segments": seg,
                              "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
        else:
            print(lines[-1], flush=True)


if __name__ == "__main__":
    cli.run(main)
