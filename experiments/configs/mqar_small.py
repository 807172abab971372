"""Small MQAR for quick comparisons of presets and variants: vocab 512, 16 key-value pairs, sequence
64, width 64, 2 layers of 2 heads, chunk 16, batch 32, AdamW 3e-3 with cosine over 1500 steps.
One preset takes 5-10 minutes on one core of the 2-core CPU, so it tells within minutes whether a
variant leaves the loss plateau that the issue-size ``mqar`` config needs hours to show
(experiments/README.md, "MQAR diagnostics").

Data: power-law query positions (``mqar_query_power=0.01``) and the reserved token 0 at the
non-query positions (``mqar_filler=zero``): the easier variant, as in Zoology's Figure-2 sweep
(``random_non_queries=False``), NOT the default of Zoology's ``MQARConfig`` (random tokens there,
``random_non_queries=True``; our ``mqar`` config's default). It stays on the zero filler because its
documented numbers were measured so: the "MQAR diagnostics" table and README.md's Gated DeltaNet run
(99% at step 1300). ``--set=mqar_filler=random`` gives Zoology's default data."""

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
