"""Sample text from a saved byte-level run (charlm / niah): prefill the prompt, then decode
recurrently (O(1) state per Miras layer, window cache per attention layer).

    python -m experiments.generate --workdir=runs/lm --prompt="ROMEO:" --tokens=200 [--temperature=0.8]

The sampler (prefill + the decode scan) is compiled once per prompt length and token count; stderr
says when it compiles and how long sampling took.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from experiments import cli, data
from experiments import train as train_lib
from experiments.checkpoint import CheckpointError
from miras_jax.nn import generate


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)", required=True)
    flags.DEFINE_string("prompt", "\n", "prompt text (byte-level models)")
    flags.DEFINE_integer("tokens", 200, "tokens to sample")
    flags.DEFINE_float("temperature", 0.8, "sampling temperature (0: greedy)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def sample(workdir: str, prompt: str, tokens: int, *, temperature: float = 0.8, seed: int = 0, step=None,
           quiet: bool = True) -> str:
    """``tokens`` bytes sampled after ``prompt`` from the run in ``workdir`` (greedy at temperature 0).
    ``quiet=False`` reports progress (restore, compile, sampling speed) on stderr."""
    if not prompt:
        raise ValueError("the prompt must not be empty")
    if tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    cfg, graphdef, params, rest, got = train_lib.load_run(workdir, step=step)
    if cfg.task == "mqar":
        raise ValueError(f"{workdir} is an MQAR run (its tokens are key / value ids of a {cfg.mqar_vocab}-token "
                         "vocabulary, not bytes): generate samples text from byte-level runs (charlm / niah)")
    model = train_lib.merge(graphdef, params, rest)
    gdef, state = nnx.split(model)
    ids = jnp.asarray(data.encode(prompt))[None]
    key = None if temperature == 0 else jax.random.key(seed)
    run = jax.jit(lambda state, ids, key: generate(nnx.merge(gdef, state), ids, tokens, key=key,
                                                   temperature=temperature))
    _say(f"restored step {got} of {workdir} ({cfg.model.preset}, pattern {cfg.model.pattern}); compiling "
         f"the sampler for a {ids.shape[1]}-byte prompt and {tokens} tokens ...", quiet)
    t0 = time.perf_counter()
    compiled = run.lower(state, ids, key).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(state, ids, key))
    t2 = time.perf_counter()
    _say(f"compiled in {t1 - t0:.1f} s; sampled {tokens} tokens in {t2 - t1:.2f} s "
         f"({tokens / max(t2 - t1, 1e-9):.0f} tokens/s)", quiet)
    return data.decode(out[0])


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        text = sample(f.workdir, f.prompt, f.tokens, temperature=f.temperature, seed=f.seed, step=f.step,
                      quiet=False)
    except (ValueError, FileNotFoundError, train_lib.TrainingError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None
    print(f.prompt + text)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
