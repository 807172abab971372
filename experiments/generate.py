"""Sample text from a saved byte-level run (charlm / niah): prefill the prompt, then decode
recurrently (O(1) state per Miras layer, window cache per attention layer).

    python -m experiments.generate --workdir=runs/lm --prompt="ROMEO:" --tokens=200 [--temperature=0.8]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import cli, data
from experiments import train as train_lib
from miras_jax.nn import generate


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)", required=True)
    flags.DEFINE_string("prompt", "\n", "prompt text (byte-level models)")
    flags.DEFINE_integer("tokens", 200, "tokens to sample")
    flags.DEFINE_float("temperature", 0.8, "sampling temperature (0: greedy)")
    flags.DEFINE_integer("seed", 0, "sampling seed")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")


def sample(workdir: str, prompt: str, tokens: int, *, temperature: float = 0.8, seed: int = 0, step=None) -> str:
    cfg, graphdef, params, rest, _ = train_lib.load_run(workdir, step=step)
    if cfg.model.vocab_size != 256 and cfg.task == "mqar":
        raise ValueError("generate samples text from byte-level runs (charlm / niah); this run is MQAR")
    if not prompt:
        raise ValueError("the prompt must not be empty")
    model = train_lib.merge(graphdef, params, rest)
    ids = jnp.asarray(data.encode(prompt))[None]
    out = generate(model, ids, tokens, key=None if temperature == 0 else jax.random.key(seed),
                   temperature=temperature)
    return data.decode(out[0])


def main(argv):
    del argv
    try:
        text = sample(flags.FLAGS.workdir, flags.FLAGS.prompt, flags.FLAGS.tokens, temperature=flags.FLAGS.temperature,
                      seed=flags.FLAGS.seed, step=flags.FLAGS.step)
    except (ValueError, FileNotFoundError, train_lib.TrainingError) as e:
        raise app.UsageError(str(e)) from None
    print(flags.FLAGS.prompt + text)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
