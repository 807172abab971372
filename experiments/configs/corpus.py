"""Language modelling on a tokenized corpus (``--data=DIR``, written by ``python -m experiments.prepare``):
packed rows of 256 tokens with ``segment_ids`` (each document restarts every memory), documents aligned
to the 64-token chunk grid. A small Moneta (4 layers, width 128) that trains on a 2-core CPU; the
vocabulary is the corpus tokenizer's."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="corpus", steps=2000, batch=8, seq_len=256, lr=2e-3, warmup=100, weight_decay=0.1,
        eval_every=250, eval_batches=16, checkpoint_every=250,
        model=LMConfig(vocab_size=256, d_model=128, num_layers=4, num_heads=4, preset="moneta", chunk_size=64),
    )
