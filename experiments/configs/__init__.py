"""Training configs as Python modules: ``experiments/configs/<name>.py`` defines ``get_config()``.

``get(name)`` imports it; ``names()`` lists them. A config is a :class:`TrainConfig`; command-line
overrides go through :func:`override` (``--steps``, ``--preset``, ``--set=field=value,...``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from miras_jax.nn import LMConfig

TASKS = ("mqar", "charlm", "niah", "corpus")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides ``--workdir`` / ``--data`` / ``--resume``."""

    task: str = "mqar"
    model: LMConfig = LMConfig()
    steps: int = 1000
    batch: int = 32
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    # task options
    mqar_vocab: int = 8192
    num_pairs: int = 64
    mqar_train_pairs: tuple = ()   # non-empty: training rows draw their number of pairs from these
    mqar_query_power: float = 0.0  # 0: queries uniform after the pairs; (0, 1]: Zoology's power law
    mqar_filler: str = "random"    # non-query positions: "random" tokens (Zoology's default) or "zero"
    niah_lengths: tuple = (256, 512, 1024)
    niah_needle: str = "passkey"
    niah_haystack: str = "noise"
    target_accuracy: float = 0.99  # MQAR / NIAH: report the time at which eval accuracy reaches it
    stop_at_target: bool = False   # ... and stop there
    time_budget_s: float = 0.0     # > 0: stop (eval + checkpoint) after this much training time
    tensorboard: bool = True       # also write <workdir>/tensorboard when tensorboardX is installed
    grad_accum: int = 1            # micro-batches per step: the batch is split, gradients summed (exact)
    # corpus task (a directory written by experiments.prepare, --data=DIR): packed rows (lm_data)
    align_documents: bool = True   # documents start at multiples of model.chunk_size (segment_align)
    data_workers: int = 0          # grain worker processes (0: in the training process)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for name in ("steps", "batch", "seq_len", "log_every", "eval_every", "eval_batches",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.grad_accum < 1 or self.batch % self.grad_accum:
            raise ValueError(f"grad_accum must be >= 1 and divide batch={self.batch}, got {self.grad_accum}")
        if not self.lr > 0 or self.warmup < 0 or self.clip <= 0:
            raise ValueError(f"need lr > 0, warmup >= 0, clip > 0; got {self.lr}, {self.warmup}, {self.clip}")


def names() -> tuple[str, ...]:
    pkg = importlib.import_module(__name__)
    return tuple(sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")))


def task_vocab(cfg: TrainConfig) -> int:
    """The model's vocabulary for ``cfg``'s task: MQAR's ``mqar_vocab``; for byte tasks (charlm,
    niah) ``model.vocab_size``, at least 256 (a byte stream uses ids below 256 of a larger one); for a
    tokenized corpus ``model.vocab_size`` (set from the corpus's ``meta.json`` when the run starts)."""
    if cfg.task == "corpus":
        return cfg.model.vocab_size
    return cfg.mqar_vocab if cfg.task == "mqar" else max(256, cfg.model.vocab_size)


def get(name: str) -> TrainConfig:
    if name not in names():
        raise ValueError(f"unknown config {name!r}; valid: {list(names())}")
    return importlib.import_module(f"{__name__}.{name}").get_config()


def _pairs(value: str) -> tuple:
    """``"p=3.5;window=4;degree=none;anchor=false"`` -> ``(("p", 3.5), ("window", 4), ("degree", None),
    ("anchor", False))``: integer literals as ints (structural options: window, degree, num_steps),
    other numbers as floats (hyper-parameters take either), none / true / false, else text."""
    out = []
    for item in filter(None, value.split(";")):
        name, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"expected name=value;name=value, got {value!r}")
        out.append((name, _scalar(v)))
    return tuple(out)


parse_pairs = _pairs   # public: benchmarks parse "preset:name=value;..." the same way


def _scalar(v: str):
    low = v.strip().lower()
    if low in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[low]
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _parse(value: str, like):
    if isinstance(like, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected a boolean, got {value!r}")
        return value.lower() in ("true", "1")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, tuple):
        return tuple(float(x) if any(c in x for c in ".eE") else int(x) for x in value.split(":") if x)
    if like is None:  # optional numbers (mlp_hidden, lr_max): "none" keeps the default rule
        if value.lower() == "none":
            return None
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
    return value


def override(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply ``field=value`` assignments; ``model.field=value`` reaches the :class:`LMConfig`.
    Tuples are written ``a:b:c``; ``model.hparams`` / ``model.preset_kwargs`` as ``p=3;q=4``. Unknown fields raise with the valid names."""
    top, model = {}, {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not field=value")
        key, value = item.split("=", 1)
        target, obj, field = (model, cfg.model, key[6:]) if key.startswith("model.") else (top, cfg, key)
        valid = [f.name for f in dataclasses.fields(obj)]
        if field not in valid or field == "model":
            raise ValueError(f"unknown config field {key!r}; valid: {valid} (model.* for {type(cfg.model).__name__})")
        try:
            target[field] = (_pairs(value) if field in ("hparams", "preset_kwargs")
                             else _parse(value, getattr(obj, field)))
        except ValueError as e:
            raise ValueError(f"bad value for {key!r}: {e}") from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model), **top)
