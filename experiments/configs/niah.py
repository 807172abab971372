"""Single needle in a haystack (pass-key in noise), byte level, trained at the first length and
evaluated at every length of ``niah_lengths``."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="niah", steps=2000, batch=16, seq_len=256, lr=3e-3, warmup=100, eval_every=250,
        checkpoint_every=250, niah_lengths=(256, 512, 1024),
        model=LMConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, preset="moneta",
                       chunk_size=64),
    )
