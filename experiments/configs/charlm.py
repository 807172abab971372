"""Character (byte) level LM on a text file (``--data=PATH``, 90/10 split): about 1M parameters at
nanoGPT's baby-GPT-on-CPU scale (4 layers, width 128, block 64, batch 12). Context 64 is one chunk:
many small steps train this size fastest on a CPU (5000 steps of Moneta take about 14 minutes on 2
cores); ``bench_train`` fits ``steps`` to its time budget per preset."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="charlm", steps=5000, batch=12, seq_len=64, lr=2e-3, warmup=100, weight_decay=0.1,
        eval_every=500, eval_batches=50, checkpoint_every=1000,
        model=LMConfig(vocab_size=256, d_model=128, num_layers=4, num_heads=4, preset="moneta",
                       chunk_size=64),
    )
