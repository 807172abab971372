"""What each closed form of the mini-batch hand VJP (``miras_jax/engine/minibatch/vjp.py``) buys.

    python -m experiments.bench_vjp [--presets=moneta,yaad,memora] [--variants=...] [--T=4096]

fwd+bwd tokens/s of ``bench_engine``'s program (``--impls=xla``, its shape flags) per variant,
each in its own subprocess, one JSON line per measurement:

  ``hand``        the library as it is (hand-written backward, every closed form);
  ``autodiff``    ``jax.grad`` of the same forward (``vjp.chunk_fwd``) instead of the hand backward;
  ``no_coeffs``   the decay coefficients' VJP by ``jax.vjp`` (recomputing the ``exp`` of the decay
                  matrix) instead of ``decay.coefficients_vjp``;
  ``no_acts``     the activation's first / second derivatives by nested ``jax.jvp`` instead of
                  ``memory.activation_derivatives``' one-``tanh`` gelu forms;
  ``no_softmax``  Memora's ``from_dual`` (softmax) VJP by ``jax.vjp`` instead of ``from_dual_vjp``.

A variant that does not apply to a preset (no softmax) is skipped. (A closed form of the l_q
scale's VJP from its two kept sums was measured the same way and dropped: it did not pay.)
"""

from __future__ import annotations

import json
import subprocess
import sys

from absl import flags

from experiments import bench_engine, cli

flags.DEFINE_list("variants", ["hand", "autodiff", "no_coeffs", "no_acts", "no_softmax"],
                  "variants to measure")
flags.DEFINE_string("variant", "", "internal: the child's variant")
FLAGS = flags.FLAGS
FLAGS.set_default("presets", ["moneta", "yaad", "memora"])
FLAGS.set_default("impls", ["xla"])
FLAGS.set_default("modes", ["fwd+bwd"])


def _applies(preset: str, variant: str) -> bool:
    import miras_jax as mj

    ret = mj.presets.get(preset).retention
    if variant == "no_softmax":
        return hasattr(ret, "from_dual_vjp")
    return True


def _patch(variant: str, preset: str) -> None:
    """Swap one closed form for its autodiff equivalent (this process only)."""
    import jax
    import jax.numpy as jnp

    import miras_jax as mj
    from miras_jax import memory as memory_lib
    from miras_jax.engine import plan as plan_lib
    from miras_jax.engine.minibatch import decay
    from miras_jax.engine.minibatch import vjp

    if variant == "autodiff":
        plan_lib.hand_vjp_blocker = lambda spec, channel=False: "bench_vjp: autodiff"
    elif variant == "no_coeffs":
        def coefficients_vjp(C, beta, D, dC, dbeta):
            lr = -jnp.diagonal(C)                                      # D_ii = 1
            log_beta = jnp.log(beta)
            log_a = jnp.concatenate([log_beta[:1], jnp.diff(log_beta)])
            _, f = jax.vjp(lambda l, a: decay.coefficients(l, a, decay.decay_matrix(a)), lr, log_a)
            return f((dC, dbeta))
        vjp.coefficients_vjp = coefficients_vjp
    elif variant == "no_acts":
        def acts(name, x, n):
            out, f = [], memory_lib.ACTIVATIONS[name]
            for _ in range(n):
                out.append(f(x))
                f = (lambda g: lambda z: jax.jvp(g, (z,), (jnp.ones_like(z),))[1])(f)
            return out
        vjp._acts = acts
    elif variant == "no_softmax":
        delattr(type(mj.presets.get(preset).retention), "from_dual_vjp")
    elif variant != "hand":
        raise ValueError(f"unknown variant {variant!r}")


def main(argv):
    del argv
    f = FLAGS
    if f.child:
        preset, impl, T, mode = f.child.split(",")
        _patch(f.variant, preset)
        out = bench_engine.measure(preset, impl, int(T), mode)
        print(json.dumps({"variant": f.variant, **out}), flush=True)
        return
    passthrough = [a for a in sys.argv[1:] if not a.startswith(("--presets", "--variants", "--T="))]
    for T in f.T:
        for preset in f.presets:
            for variant in f.variants:
                if not _applies(preset, variant):
                    continue
                cmd = [sys.executable, "-m", "experiments.bench_vjp", *passthrough, f"--variant={variant}",
                       f"--child={preset},xla,{T},fwd+bwd"]
                out = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode or not lines:
                    print(json.dumps({"preset": preset, "variant": variant, "T": int(T),
                                      "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
                else:
                    print(lines[-1], flush=True)


if __name__ == "__main__":
    cli.run(main)
