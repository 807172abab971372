"""MQAR at the issue's target size: vocab 8192, 64 key-value pairs, sequence 256, width 128, 2 layers
(the default preset is Moneta; ``--preset`` picks another)."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="mqar", steps=3000, batch=32, seq_len=256, lr=3e-3, warmup=100, eval_every=250,
        checkpoint_every=250, mqar_vocab=8192, num_pairs=64,
        model=LMConfig(d_model=128, num_layers=2, num_heads=2, preset="moneta", chunk_size=64),
    )
