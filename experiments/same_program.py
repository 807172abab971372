"""Fingerprint of each preset's traced program: a refactor that leaves every fingerprint unchanged
leaves every benchmark unchanged (XLA compiles the same HLO).

    python -m experiments.same_program [--impl=xla] [--chunk=32] [--presets=...]      # one JSON line
    git worktree add /tmp/old <commit>; PYTHONPATH=/tmp/old python -m experiments.same_program   # before

Per preset: ``jax.grad`` (w.r.t. q, k, v, every gate and the initial memory) of ``sum(y^2)`` through
``mj.memorize_batched`` at ``B=2, T=256, H=2, d=16``, lowered to HLO; source locations and the
module name stripped; sha256 (12 hex digits). ``"error <Type>"`` where the implementation refuses
the preset. Run it on both commits (``PYTHONPATH`` picks the tree) and compare the two lines.
"""

from __future__ import annotations

import hashlib
import json
import re

import jax
import jax.numpy as jnp
from absl import flags

from experiments import cli

B, T, H, D = 2, 256, 2, 16


def define_flags():
    flags.DEFINE_string("impl", "xla", "implementation: reference / xla / pallas / auto")
    flags.DEFINE_integer("chunk", 32, "chunk_size")
    flags.DEFINE_list("presets", [], "presets (default: all)")


def inputs(spec, seed: int = 0):
    """``(q, k, v, gates, params)`` of the fingerprint's shape for ``spec`` (unit keys, gates in range)."""
    n = spec.num_steps
    ks = jax.random.split(jax.random.key(seed), 5)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    shape = (B, T, H, n, D) if n > 1 else (B, T, H, D)
    q = unit(jax.random.normal(ks[0], (B, T, H, D)))
    k, v = unit(jax.random.normal(ks[1], shape)), jax.random.normal(ks[2], shape)
    gates = {g: jax.random.uniform(ks[3], (B, T, H) + ((n,) if (g == "lr" and n > 1) else ()),
                                   minval=0.1, maxval=0.9) for g in spec.required_gates}
    params = jax.vmap(lambda kk: spec.memory.init(kk, D, D))(jax.random.split(ks[4], H))
    if spec.retention.domain != "real":
        params = jax.tree.map(lambda x: jnp.clip(jnp.abs(x), 0.1, 0.9), params)
    return q, k, v, gates, params


def fingerprint(spec, impl: str, chunk: int) -> str:
    import miras_jax as mj

    def loss(q, k, v, gates, params):
        y, _ = mj.memorize_batched(spec, params, q, k, v, gates, chunk_size=chunk, implementation=impl)
        return jnp.sum(y * y)

    try:
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*inputs(spec)).as_text(dialect="hlo")
    except (NotImplementedError, ValueError) as e:
        return f"error {type(e).__name__}"
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"^HloModule \S+", "HloModule m", text, flags=re.M)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main(argv):
    del argv
    import miras_jax as mj

    f = flags.FLAGS
    names = f.presets or mj.presets.names()
    print(json.dumps({n: fingerprint(mj.presets.get(n), f.impl, f.chunk) for n in names}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
