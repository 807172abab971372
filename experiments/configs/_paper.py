"""The Miras paper's language-model sizes (Table 5) for pods: ``lm170m`` (12 blocks x 768),
``lm340m`` (24 x 1024), ``lm780m`` (24 x 1536); 16 heads, context 4096, vocabulary 32000 (until a
tokenizer says otherwise: a byte corpus uses ids < 256 of it), bfloat16 activations with float32
parameters and memory, per-block rematerialisation, the blocks scanned (the program holds one, so
it compiles in minutes); a global batch of 128 x 4096 = 524,288 tokens (``grad_accum``
micro-batches per step when the chips cannot hold a batch at once). Usable with every
preset (``--preset=``) and pattern (``--set=model.pattern=A`` Transformer++, ``MS`` a hybrid).
``python -m experiments.aot --config=lm780m --preset=moneta --topology=v5e:16x16 --mesh=...``
checks that a config compiles and fits a TPU slice (experiments/README.md, "Pods")."""

from experiments.configs import TrainConfig
from miras_jax.nn import LMConfig

SIZES = {"lm170m": (12, 768), "lm340m": (24, 1024), "lm780m": (24, 1536)}


def paper_config(name: str) -> TrainConfig:
    depth, width = SIZES[name]
    return TrainConfig(
        task="charlm", steps=30000, batch=128, seq_len=4096, lr=1e-3, warmup=1000, weight_decay=0.1,
        clip=1.0, log_every=10, eval_every=1000, eval_batches=16, checkpoint_every=1000,
        model=LMConfig(vocab_size=32000, d_model=width, num_layers=depth, num_heads=16, preset="moneta",
                       chunk_size=64, dtype="bfloat16", remat="nothing", scan_blocks=True),
    )
