"""Pallas kernels vs the XLA path on an accelerator: correctness check, then tokens/s and the
achieved fraction of peak FLOP/s, one JSON line per (preset, implementation, T, mode).

    python -m experiments.bench_pallas [--presets=gated_deltanet,moneta] [--T=4096] [--B=8 --H=16]
        [--chunk=64] [--modes=fwd,fwd+bwd] [--peak_tflops=67] [--check]

Meant for a GPU or TPU (on a CPU the kernels are interpreted and only ``--check`` is useful).
``--check`` first compares ``implementation="pallas"`` with ``"xla"`` on the device (values and
gradients w.r.t. q, k, v, gates and the initial memory; max error relative to the largest XLA
entry). FLOPs are the chunk algorithm's model count (``config.flops`` per chunk, forward; x3 for
fwd+bwd), the same for both implementations, so ``peak_frac`` compares them like for like.
Default peak: 67 TFLOP/s, an H100 SXM's float32 (non-tensor-core) figure.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_list("presets", ["gated_deltanet", "deltanet", "mamba2", "moneta", "yaad", "memora"], "presets")
    flags.DEFINE_list("impls", ["xla", "pallas"], "implementations")
    flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd")
    flags.DEFINE_list("T", ["4096"], "sequence lengths")
    flags.DEFINE_integer("chunk", 64, "chunk size")
    flags.DEFINE_integer("B", 8, "batch")
    flags.DEFINE_integer("H", 16, "heads")
    flags.DEFINE_integer("d", 64, "head dim (d_k = d_v)")
    flags.DEFINE_integer("iters", 10, "timed iterations (median reported)")
    flags.DEFINE_float("peak_tflops", 67.0, "device peak, TFLOP/s")
    flags.DEFINE_bool("check", False, "compare pallas with xla on the device first")


def inputs(preset: str, B: int, H: int, T: int, d: int, seed: int = 0):
    import jax
    import jax.numpy as jnp

    import miras_jax as mj

    spec = mj.presets.get(preset)
    ks = jax.random.split(jax.random.key(seed), 8)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q = unit(jax.random.normal(ks[0], (B, T, H, d)))
    k = unit(jax.random.normal(ks[1], (B, T, H, d)))
    v = jax.random.normal(ks[2], (B, T, H, d))
    gates = {
        "lr": jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))) * (0.1 if spec.memory.kind == "mlp" else 1.0),
        "decay": jax.nn.sigmoid(4.0 + jax.random.normal(ks[4], (B, T, H))),
        "delta": jax.nn.softplus(jax.random.normal(ks[6], (B, T, H))),
    }
    gates = {g: gates[g] for g in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[7], H))
    return spec, (params, q, k, v, gates)


def program(spec, impl: str, mode: str, chunk: int):
    import jax
    import jax.numpy as jnp

    import miras_jax as mj

    def fwd(params, q, k, v, gates):
        return mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=chunk, implementation=impl)[0]

    if mode == "fwd":
        return jax.jit(fwd)
    return jax.jit(jax.grad(lambda *a: jnp.sum(fwd(*a) ** 2), argnums=(0, 1, 2, 3, 4)))


def model_flops(spec, B, H, T, d, chunk, mode) -> float:
    from miras_jax.engine import plan as plan_lib

    cfg = plan_lib.kernel_config(spec, chunk)
    per_chunk = cfg.flops(d, d) if spec.memory.kind == "linear" else cfg.flops(d, spec.memory.expansion * d)
    total = per_chunk[0] * B * H * -(-T // cfg.chunk_size)
    return total * (3 if mode == "fwd+bwd" else 1)


def check(preset, T, chunk) -> dict:
    import jax
    import numpy as np

    spec, args = inputs(preset, 2, 4, T, 64, seed=1)
    out = {"preset": preset, "T": T, "check": True}
    for mode in ("fwd", "fwd+bwd"):
        ref = jax.tree.leaves(program(spec, "xla", mode, chunk)(*args))
        got = jax.tree.leaves(program(spec, "pallas", mode, chunk)(*args))
        err = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(b))) + 1e-12))
                  for a, b in zip(got, ref))
        out[f"max_rel_err_{mode}"] = err
    return out


def measure(preset, impl, T, mode) -> dict:
    import jax

    f = FLAGS
    spec, args = inputs(preset, f.B, f.H, T, f.d)
    fn = program(spec, impl, mode, f.chunk)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(f.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = model_flops(spec, f.B, f.H, T, f.d, f.chunk, mode)
    return {"preset": preset, "impl": impl, "B": f.B, "H": f.H, "d": f.d, "T": T, "chunk": f.chunk,
            "mode": mode, "tokens_per_s": round(f.B * T / med, 1), "median_ms": round(1e3 * med, 3),
            "model_tflops_per_s": round(flops / med / 1e12, 3),
            "peak_frac": round(flops / med / 1e12 / f.peak_tflops, 4), "compile_s": round(compile_s, 2),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def main(argv):
    del argv
    f = FLAGS
    for T in map(int, f.T):
        for preset in f.presets:
            if f.check:
                try:
                    print(json.dumps(check(preset, min(T, 1024), f.chunk)), flush=True)
                except Exception as e:  # noqa: BLE001 — report and go on to the next preset
                    print(json.dumps({"preset": preset, "check": True, "error": f"{type(e).__name__}: {e}"[:800]}),
                          flush=True)
            for impl in f.impls:
                for mode in f.modes:
                    try:
                        print(json.dumps(measure(preset, impl, T, mode)), flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(json.dumps({"preset": preset, "impl": impl, "T": T, "mode": mode,
                                          "error": f"{type(e).__name__}: {e}"[:800]}), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
