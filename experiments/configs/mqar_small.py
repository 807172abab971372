"""Small MQAR for quick comparisons of presets and variants: vocab 512, 16 key-value pairs, sequence
64, width 64, 2 layers of 2 heads, chunk 16, batch 32, AdamW 3e-3 with cosine over 1500 steps,
Zoology's default data (power-law query positions, zero filler). One preset takes 5-10 minutes on
one core of the 2-core CPU, so it tells within minutes whether a variant leaves the loss plateau
that the issue-size ``mqar`` config needs hours to show (experiments/README.md, "MQAR diagnostics")."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        task="mqar", steps=1500, batch=32, seq_len=64, lr=3e-3, warmup=50, eval_every=100, log_every=50,
        checkpoint_every=500, mqar_vocab=512, num_pairs=16, mqar_query_power=0.01, mqar_filler="zero",
        stop_at_target=True,
        model=LMConfig(d_model=64, num_layers=2, num_heads=2, preset="moneta", chunk_size=16,
                       decay_init=(0.99, 0.999)),
    )
