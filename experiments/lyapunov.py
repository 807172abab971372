"""Is a memory's inner recurrence chaotic? Finite-time Lyapunov exponents, one JSON line per point.

``token``: the state's tangent ``dW_t = J_t dW_{t-1}`` (``J_t`` the Jacobian of ``token_step``),
renormalised every token: ``lambda = mean_t log ||J_t dW_{t-1}|| / ||dW_{t-1}||`` over the second
half of the sequence (the first half lets the tangent align). ``lambda > 0``: nearby memories
separate like ``exp(lambda t)``, so the exact gradient of a late read with respect to early
inputs grows like that too; ``lambda <= 0``: the recurrence is non-expansive.
``chunk``: the same question for the mini-batch chunked form that training runs (``--chunk``):
``log ||d mean(y^2) / dk||`` at ``T`` minus at ``T / 2``, per token.

    python -m experiments.lyapunov --presets=yaad,gated_deltanet --lrs=0.05 --decays=0.95,0.9999

Random unit keys / queries, normal values, constant gates (``delta`` 1, ``momentum`` 0.9).
"""

from __future__ import annotations

import itertools
import json

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_list("presets", ["yaad", "titans", "moneta", "memora", "gated_deltanet"], "presets")
    flags.DEFINE_list("lrs", ["0.05"], "inner step sizes (gate lr)")
    flags.DEFINE_list("decays", ["0.95"], "decays (gate decay)")
    flags.DEFINE_integer("T", 1024, "tokens")
    flags.DEFINE_integer("dim", 32, "key / value dim")
    flags.DEFINE_integer("chunk", 64, "chunk size of the 'chunk' measure")
    flags.DEFINE_list("measures", ["token"], "token and/or chunk")
    flags.DEFINE_bool("x64", True, "float64 (else float32)")
    flags.DEFINE_integer("seed", 0, "seed")


def inputs(spec, T, d, lr, decay, key, dtype):
    """``(q, k, v, gates)`` with unit-norm q / k and the spec's gates held constant."""
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(key, 3)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (T, d), dtype)), unit(jax.random.normal(ks[1], (T, d), dtype))
    v = jax.random.normal(ks[2], (T, d), dtype)
    full = {"lr": lr, "decay": decay, "delta": 1.0, "momentum": 0.9}
    return q, k, v, {n: jnp.full((T,), full[n], dtype) for n in spec.required_gates}


def token_exponent(spec, params, k, v, gates, key):
    """Mean log growth per token of a renormalised tangent over the second half: ``float``."""
    import jax
    import jax.numpy as jnp
    from miras_jax.engine.tokens import init_state, token_step
    state = init_state(spec, params)
    leaves, tdef = jax.tree.flatten(state)
    tan = tdef.unflatten([jax.random.normal(kk, x.shape, x.dtype)
                          for kk, x in zip(jax.random.split(key, len(leaves)), leaves)])

    def body(carry, xs):
        st, t = carry
        st, t = jax.jvp(lambda s: token_step(spec, s, *xs), (st,), (t,))
        norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(t)))
        return (st, jax.tree.map(lambda x: x / norm, t)), jnp.log(norm)

    _, logs = jax.jit(lambda: jax.lax.scan(body, (state, tan), (k, v, gates)))()
    return float(jnp.mean(logs[logs.shape[0] // 2:]))


def chunk_exponent(spec, params, q, k, v, gates, chunk):
    """``(log ||dL/dk||_T - log ||dL/dk||_{T/2}) / (T / 2)`` for the chunked engine: ``float``."""
    import jax
    import jax.numpy as jnp
    import miras_jax as mj

    def norm(T):
        def loss(k_):
            y, _ = mj.memorize(spec, params, q[:T], k_, v[:T], {n: g[:T] for n, g in gates.items()},
                               chunk_size=chunk, implementation="xla")
            return jnp.mean(y ** 2)
        return jnp.linalg.norm(jax.jit(jax.grad(loss))(k[:T]))

    T = q.shape[0]
    return float((jnp.log(norm(T)) - jnp.log(norm(T // 2))) / (T - T // 2))


def main(argv):
    del argv
    import jax
    jax.config.update("jax_enable_x64", FLAGS.x64)
    import jax.numpy as jnp
    import miras_jax as mj
    dtype = jnp.float64 if FLAGS.x64 else jnp.float32
    for name, lr, decay in itertools.product(FLAGS.presets, map(float, FLAGS.lrs), map(float, FLAGS.decays)):
        spec = mj.presets.get(name)
        spec = spec.replace(hparams=jax.tree.map(lambda x: jnp.asarray(x, dtype), spec.hparams))
        keys = jax.random.split(jax.random.key(FLAGS.seed), 3)
        params = jax.tree.map(lambda x: x.astype(dtype), spec.memory.init(keys[0], FLAGS.dim, FLAGS.dim))
        q, k, v, gates = inputs(spec, FLAGS.T, FLAGS.dim, lr, decay, keys[1], dtype)
        row = {"preset": name, "memory": spec.memory.kind, "lr": lr, "decay": decay, "T": FLAGS.T,
               "dim": FLAGS.dim, "dtype": jnp.dtype(dtype).name}
        if "token" in FLAGS.measures:
            row["lyapunov_token"] = token_exponent(spec, params, k, v, gates, keys[2])
        if "chunk" in FLAGS.measures:
            row["chunk"] = FLAGS.chunk
            row["grad_growth_chunk"] = chunk_exponent(spec, params, q, k, v, gates, FLAGS.chunk)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
