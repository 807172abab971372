"""Tiny MQAR run for tests and quick checks: trains in well under a minute on a 2-core CPU."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="mqar", steps=60, batch=16, seq_len=64, lr=1e-2, warmup=10, log_every=5, eval_every=30,
        eval_batches=2, checkpoint_every=30, mqar_vocab=64, num_pairs=4,
        model=LMConfig(d_model=32, num_layers=2, num_heads=2, preset="gated_deltanet", chunk_size=16,
                       gate_rank=8),
    )
