"""What packed rows cost, measured as an interleaved A/B in one process (this machine drifts by tens
of percent between runs, so the variants alternate call by call and the ratio of medians is the
measurement): fwd+bwd of ``memorize_batched`` on one document per row (``0``), documents of random
lengths anywhere (``N``: mean N tokens) and the same documents padded to multiples of the chunk with
``segment_align`` (``Na``). One JSON line per (preset, variant).

    python -m experiments.bench_packed --presets=moneta,gated_deltanet --variants=0,512a,512 --rounds=12
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

from experiments import cli


def define_flags():
    """Command-line flags (defined only when run as a script: bench_engine imports this module)."""
    flags.DEFINE_list("presets", ["moneta", "gated_deltanet"], "presets")
    flags.DEFINE_list("variants", ["0", "512a", "512"], "0 | N | Na (see the module docstring); the first is the base")
    flags.DEFINE_integer("T", 4096, "sequence length")
    flags.DEFINE_integer("B", 2, "batch")
    flags.DEFINE_integer("H", 4, "heads")
    flags.DEFINE_integer("d", 64, "head dim")
    flags.DEFINE_integer("chunk", 64, "chunk size")
    flags.DEFINE_integer("rounds", 12, "timed calls per variant (interleaved)")


def segments_flag(value: str) -> tuple[int, bool]:
    """``"512"`` -> ``(512, False)``, ``"512a"`` -> ``(512, True)`` (documents aligned to the chunk grid)."""
    align = value.endswith("a")
    try:
        return int(value[:-1] if align else value), align
    except ValueError:
        raise ValueError(f"--segments takes N or Na (N >= 0 tokens), got {value!r}") from None


def packed_ids(B: int, T: int, mean: int, align: int = 0, seed: int = 0):
    """``[B, T]`` int32 segment ids: documents of lengths uniform in ``[1, 2 mean - 1]`` back to back;
    ``align > 0``: each followed by padding (id 0) to a multiple of ``align`` (the same lengths)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.zeros((B, T), np.int32)
    for b in range(B):
        t, doc = 0, 1
        while t < T:
            n = int(rng.integers(1, 2 * mean))
            out[b, t:t + n] = doc
            t, doc = t + n + (-n % align if align else 0), doc + 1
    return out




def _inputs(spec, B, T, H, d):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 6)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (B, T, H, d))), unit(jax.random.normal(ks[1], (B, T, H, d)))
    v = jax.random.normal(ks[2], (B, T, H, d))
    gates = {"lr": jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H))) * (0.1 if spec.memory.kind == "mlp" else 1.0),
             "decay": jax.nn.sigmoid(4.0 + jax.random.normal(ks[4], (B, T, H))),
             "momentum": jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H)))}
    params = jax.vmap(lambda kk: spec.memory.init(kk, d, d))(jax.random.split(ks[5], H))
    return params, q, k, v, {g: gates[g] for g in spec.required_gates}


def measure(preset: str, variants: list[str]) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import miras_jax as mj

    f = flags.FLAGS
    spec = mj.presets.get(preset)
    args = _inputs(spec, f.B, f.T, f.H, f.d)
    fns, pads = {}, {}
    for var in variants:
        mean, align = segments_flag(var)
        kw = dict(chunk_size=f.chunk, implementation="xla")
        pads[var] = 0.0
        if mean:
            seg = packed_ids(f.B, f.T, mean, f.chunk if align else 0)
            kw["segment_ids"], pads[var] = jnp.asarray(seg), float((seg == 0).mean())
            if align:
                kw["segment_align"] = f.chunk
        loss = lambda p, q, k, v, g, kw=kw: jnp.sum(mj.memorize_batched(spec, p, q, k, v, g, **kw)[0] ** 2)  # noqa: E731
        fns[var] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        jax.block_until_ready(fns[var](*args))
    times = {var: [] for var in variants}
    for _ in range(f.rounds):
        for var in variants:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[var](*args))
            times[var].append(time.perf_counter() - t0)
    base = statistics.median(times[variants[0]])
    out = []
    for var in variants:
        med = statistics.median(times[var])
        out.append({"preset": preset, "variant": var, "B": f.B, "T": f.T, "H": f.H, "d": f.d, "chunk": f.chunk,
                    "median_s": round(med, 4), "tokens_per_s": round(f.B * f.T / med, 1),
                    "vs_base": round(base / med - 1, 4), "pad_frac": round(pads[var], 4),
                    "real_tokens_vs_base": round(base / med * (1 - pads[var]) - 1, 4), "rounds": f.rounds,
                    "jax": jax.__version__})
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    for var in f.variants:
        try:
            segments_flag(var)
        except ValueError as e:
            cli.fail(str(e))
    for preset in f.presets:
        for row in measure(preset, list(f.variants)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
