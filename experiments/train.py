"""Train a Miras (or Transformer++ / hybrid) language model on MQAR, a byte-level corpus or S-NIAH.

    python -m experiments.train --config=smoke --workdir=runs/smoke
    python -m experiments.train --config=mqar --preset=gated_deltanet --workdir=runs/mqar_gdn
    python -m experiments.train --config=charlm --data=path/to/text.txt --workdir=runs/lm
    python -m experiments.train --config=corpus --data=corpora/stdlib --workdir=runs/corpus  # experiments.prepare's output
    python -m experiments.train ... --resume=auto       # continue the run in --workdir exactly
    python -m experiments.train ... --overwrite         # delete the run in --workdir, start afresh

A run directory holds one run: training into a directory that already holds one (checkpoints or
metrics) without ``--resume=auto`` or ``--overwrite`` is refused.

Everything a run writes is under ``--workdir``: ``checkpoints/`` (orbax, atomic: params, optimizer
state, step, data-iterator state, config), ``metrics.jsonl`` (one JSON object per logged step, with
``step`` and ``loss``; evaluations add ``eval_*``), ``loss.png`` and ``summary.json``.
Optimiser: AdamW, linear warmup + cosine decay, global-norm clipping. A NaN/Inf loss stops the run
with a clear message; the last good checkpoint is kept. SIGTERM (preemption) or Ctrl-C stops after the
current step with a checkpoint of it (exit status 128 + the signal); ``--resume=auto`` continues.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments import cli, configs, data, lm_data
from experiments.checkpoint import CheckpointError, Checkpointer, resolve_resume, saved_steps
from miras_jax import presets, sharding
from miras_jax.nn import LMConfig, MirasLM, count_params
from miras_jax.nn.layer import LR_MAX_UNRESOLVED


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_string("config", "mqar", f"config name: {configs.names()}")
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, plots (default runs/<config>)")
    flags.DEFINE_integer("steps", None, "override the number of training steps")
    flags.DEFINE_string("preset", None, f"override the Miras preset: {presets.names()}")
    flags.DEFINE_string("data", None, "text file for the charlm task (and the niah 'text' haystack)")
    flags.DEFINE_string("resume", None, "'auto' (continue --workdir's run) or a checkpoint directory")
    flags.DEFINE_bool("overwrite", False, "delete the run already in --workdir (its checkpoints, metrics, "
                      "summary, plot, tensorboard) and start afresh")
    flags.DEFINE_list("set", [], "config overrides field=value (model.field=value for the model)")
    flags.DEFINE_integer("stop_after", None, "stop after this many steps of the run (as if interrupted)")
    flags.DEFINE_bool("progress", True, "show a progress bar")
    flags.DEFINE_string("mesh", None, "device mesh, e.g. 'data:2,fsdp:4' (axes data, fsdp, tensor); "
                        "on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N")
    flags.DEFINE_bool("distributed", False, "multi-host: call jax.distributed.initialize() first "
                      "(coordinator / process ids from the environment, e.g. on TPU pods)")


class TrainingError(RuntimeError):
    """A run cannot go on (NaN loss, bad data, ...); what was saved before is kept."""


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    vocab: int
    train_batch: Any            # (seed, step) -> batch dict
    eval_sets: dict             # name -> list of batch dicts
    iterator: Any = None        # (start step, saved data state | None) -> iterator with get_state(); None:
                                # data.DataIterator over train_batch
    local_rows: bool = False    # the iterator yields this host's rows only (else the global batch)
    segment_align: int = 0      # packed rows: every document starts at a multiple of this
    tokens_per_byte: float = 1.0  # validation text: scored tokens per UTF-8 byte (bits per byte)


def corpus_config(cfg: configs.TrainConfig, data_path: str | None) -> configs.TrainConfig:
    """A corpus run's config: the model's vocabulary is the corpus tokenizer's (``meta.json``)."""
    if not data_path:
        raise ValueError("the corpus task needs --data=DIR (a corpus written by python -m experiments.prepare)")
    vocab = lm_data.load_meta(data_path)["vocab_size"]
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


class _Rows:
    """A packed-row grain iterator as a training iterator: the model's keys only (``inputs``,
    ``targets``, ``mask``, ``segment_ids``); ``get_state`` / ``set_state`` are grain's (JSON)."""

    KEYS = ("inputs", "targets", "mask", "segment_ids")

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self.it)
        return {k: batch[k] for k in self.KEYS}

    def get_state(self) -> dict:
        return self.it.get_state()

    def set_state(self, state: dict) -> None:
        self.it.set_state(state)


def corpus_align(cfg: configs.TrainConfig) -> int:
    """The packer's alignment of a corpus run (``segment_align``): ``model.chunk_size`` with
    ``align_documents``, else 0."""
    return cfg.model.chunk_size if cfg.align_documents and cfg.model.chunk_size > 1 else 0


def _corpus_task(cfg: configs.TrainConfig, data_path: str | None) -> Task:
    """Language modelling on a tokenized corpus (``experiments.prepare``): packed rows with
    ``segment_ids`` from ``lm_data`` (documents aligned to the chunk grid with ``align_documents``),
    this host's share of the documents; validation on the first ``eval_batches`` packed rows."""
    if not data_path:
        raise ValueError("the corpus task needs --data=DIR (a corpus written by python -m experiments.prepare)")
    meta = lm_data.load_meta(data_path)
    if cfg.model.vocab_size != meta["vocab_size"]:
        raise ValueError(f"the corpus {data_path} has a {meta['vocab_size']}-token vocabulary "
                         f"({os.path.join(data_path, 'meta.json')}) but the model has {cfg.model.vocab_size}: "
                         "train on the corpus the run was trained on (its tokenizer is in the run's tokenizer/)")
    align = corpus_align(cfg)
    count = jax.process_count()
    if cfg.batch % count:
        raise ValueError(f"batch={cfg.batch} must be divisible by the {count} processes")

    def iterator(start: int, state: dict | None):
        ds = lm_data.packed_dataset(data_path, "train", seq_len=cfg.seq_len, batch_size=cfg.batch // count,
                                    seed=cfg.seed, shard=(jax.process_index(), count), align=align,
                                    worker_count=cfg.data_workers)
        it = _Rows(iter(ds))
        if state is not None:
            it.set_state(state)
        elif start:
            raise TrainingError(f"cannot resume the corpus run at step {start}: its checkpoint holds no "
                                "data-iterator state")
        return it

    val = meta["splits"].get("validation", {})
    evals = [{k: b[k] for k in _Rows.KEYS} for b, _ in lm_data.eval_rows(
        data_path, "validation", seq_len=cfg.seq_len, batch_size=cfg.batch, max_batches=cfg.eval_batches,
        align=align)] if val.get("documents") else []
    targets = val.get("tokens", 0) - val.get("documents", 0)   # a document's first token is not predicted
    tokens_per_byte = targets / val["bytes"] if val.get("bytes") else float("nan")
    return Task(meta["vocab_size"], None, {"val": evals} if evals else {}, iterator=iterator, local_rows=True,
                segment_align=align, tokens_per_byte=tokens_per_byte)


def make_task(cfg: configs.TrainConfig, data_path: str | None) -> Task:
    drop = lambda b: {k: b[k] for k in ("inputs", "targets", "mask")}
    if cfg.task == "corpus":
        return _corpus_task(cfg, data_path)
    if cfg.task == "mqar":
        ev = functools.partial(data.mqar_batch, batch=cfg.batch, seq_len=cfg.seq_len, vocab=cfg.mqar_vocab,
                               num_pairs=cfg.num_pairs, query_power=cfg.mqar_query_power,
                               filler=cfg.mqar_filler)
        ev = _with_positions(ev, cfg.num_pairs)
        fn = ev
        if cfg.mqar_train_pairs:  # mixed training; evaluation stays at num_pairs
            fn = functools.partial(data.mqar_mixed_batch, batch=cfg.batch, seq_len=cfg.seq_len,
                                   vocab=cfg.mqar_vocab, pairs=cfg.mqar_train_pairs,
                                   query_power=cfg.mqar_query_power, filler=cfg.mqar_filler)
            fn = _with_positions(fn, max(cfg.mqar_train_pairs))
        fn(0, 0)  # validate the options now
        evals = {"mqar": [ev(cfg.seed + 1, i) for i in range(cfg.eval_batches)]}
        return Task(cfg.mqar_vocab, fn, evals)
    if cfg.task == "charlm":
        if not data_path:
            raise ValueError("the charlm task needs --data=PATH (a text file)")
        corpus = data.ByteCorpus.from_file(data_path)
        fn = functools.partial(corpus.batch, batch=cfg.batch, seq_len=cfg.seq_len, split="train")
        fn(0, 0)
        evals = {"val": list(corpus.eval_batches(batch=cfg.batch, seq_len=cfg.seq_len, split="val",
                                                 max_batches=cfg.eval_batches))}
        return Task(configs.task_vocab(cfg), fn, evals)
    corpus = data.ByteCorpus.from_file(data_path) if data_path else None
    niah = lambda length: functools.partial(
        data.niah_batch, batch=cfg.batch, seq_len=length, needle=cfg.niah_needle,
        haystack=cfg.niah_haystack, corpus=corpus)
    fn = lambda seed, step: drop(niah(cfg.seq_len)(seed, step))
    fn(0, 0)
    evals = {f"niah_{n}": [drop(niah(n)(cfg.seed + 1, i)) for i in range(cfg.eval_batches)]
             for n in cfg.niah_lengths}
    return Task(configs.task_vocab(cfg), fn, evals)


# ------------------------------------------------------------------------------------------------
# model, loss, steps
# ------------------------------------------------------------------------------------------------


def build(cfg: configs.TrainConfig, vocab: int):
    """``(graphdef, params (pure dict), rest (nnx.State), optimizer)``."""
    model = MirasLM(dataclasses.replace(cfg.model, vocab_size=vocab), rngs=nnx.Rngs(cfg.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(cfg)
    return graphdef, nnx.to_pure_dict(params), rest, tx, schedule


def make_optimizer(cfg: configs.TrainConfig):
    """``(tx, schedule)``: AdamW, linear warmup + cosine decay to 10%, global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                                  end_value=cfg.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay))
    return tx, schedule


def merge(graphdef, params, rest) -> MirasLM:
    """The model with ``params`` (a pure dict, as trained and checkpointed) put back in."""
    return nnx.merge(graphdef, params, rest)


def _with_positions(batch_fn, n: int):
    """Adds ``positions [b, n]``: the scored positions of each row (exactly ``n`` per row), so the
    model computes logits only there."""
    def fn(seed, step):
        b = batch_fn(seed, step)
        pos = np.argsort(-b["mask"], axis=1, kind="stable")[:, :n]
        return {**b, "positions": np.sort(pos, axis=1).astype(np.int32)}
    return fn


def _scored(batch):
    """``(targets, mask)`` at the scored positions (``positions`` if the batch has them)."""
    targets, m = batch["targets"], batch["mask"]
    if "positions" in batch:
        targets = jnp.take_along_axis(targets, batch["positions"], axis=1)
        m = jnp.take_along_axis(m, batch["positions"], axis=1)
    return targets, m


def masked_sums(logits, batch):
    """``(sum of cross-entropy, sum of correct argmax)`` over ``mask`` (float32)."""
    targets, m = _scored(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * m), jnp.sum((jnp.argmax(logits, -1) == targets).astype(m.dtype) * m)


def masked_count(batch):
    """The number of scored tokens (at least 1): the denominator of the batch means."""
    return jnp.maximum(jnp.sum(_scored(batch)[1]), 1.0)


def masked_loss(logits, batch):
    """Mean cross-entropy over ``mask``; accuracy of ``argmax`` on the same positions. With
    ``positions`` in the batch, ``logits`` are ``[b, n, V]`` at those positions only."""
    ce, correct = masked_sums(logits, batch)
    n = masked_count(batch)
    return ce / n, correct / n


def micro_batches(batch: dict, n: int) -> dict:
    """``[B, ...] -> [n, B / n, ...]``, micro-batch ``i`` = rows ``i, i + n, ...``: strided, so rows
    sharded over the batch axes give every device the same share of each micro-batch."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


def step_fns(graphdef, tx, mesh=None, grad_accum: int = 1, segment_align: int = 0):
    """Pure ``train_step(params, opt_state, rest, batch) -> (params, opt_state, loss, accuracy,
    grad_norm)`` and ``loss_fn(params, rest, batch) -> (loss, accuracy)`` (what ``make_steps`` jits
    and ``experiments.aot`` compiles for a TPU topology). With a ``mesh`` the model is traced under
    it (activation constraints, shard_map'd kernels). ``grad_accum = n``: the batch runs as ``n``
    micro-batches in a ``lax.scan`` (one at a time in memory) whose gradients add up to the whole
    batch's, ``grad sum_i CE_i / N`` with ``N`` the batch's scored tokens: the same step as
    ``n = 1`` up to float rounding. Packed rows (``segment_ids`` in the batch) run with
    ``segment_align`` (their documents' alignment, ``MirasLM.__call__``)."""

    def sums_fn(params, rest, batch):
        with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            seg = batch.get("segment_ids")
            logits = merge(graphdef, params, rest)(batch["inputs"], batch.get("positions"), segment_ids=seg,
                                                   segment_align=segment_align if seg is not None else 0)
        return masked_sums(logits, batch)

    def loss_fn(params, rest, batch):
        ce, correct = sums_fn(params, rest, batch)
        n = masked_count(batch)
        return ce / n, correct / n

    def accumulated(params, rest, batch):
        n = masked_count(batch)

        def micro_loss(p, mb):
            ce, correct = sums_fn(p, rest, mb)
            return ce / n, (ce, correct)

        def body(carry, mb):
            (_, (ce, correct)), g = jax.value_and_grad(micro_loss, has_aux=True)(params, mb)
            g_sum, ce_sum, ok_sum = carry
            return (jax.tree.map(jnp.add, g_sum, g), ce_sum + ce, ok_sum + correct), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, ce, correct), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro_batches(batch, grad_accum))
        return (ce / n, correct / n), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def train_step(params, opt_state, rest, batch):
        if grad_accum == 1:
            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        else:
            (loss, acc), grads = accumulated(params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc, optax.tree.norm(grads)

    return train_step, loss_fn


def make_steps(graphdef, rest, tx, placement: Placement | None = None, grad_accum: int = 1,
               segment_align: int = 0):
    """Jitted ``train_step(params, opt_state, batch)`` and ``eval_step(params, batch)`` (``step_fns``
    with ``rest`` fixed). With a ``placement`` the steps keep params / optimizer state on their
    ``NamedSharding``s and trace the model under the mesh."""
    mesh = placement.mesh if placement else None
    train_fn, loss_fn = step_fns(graphdef, tx, mesh, grad_accum, segment_align)
    kw = {}
    if placement is not None:
        kw = dict(out_shardings=(placement.params, placement.opt_state, *(sharding.replicated(mesh),) * 3))
    train_step = jax.jit(lambda p, o, b: train_fn(p, o, rest, b), donate_argnums=(0, 1), **kw)
    eval_step = jax.jit(lambda p, b: loss_fn(p, rest, b))
    return train_step, eval_step


@dataclasses.dataclass
class Placement:
    """Where a run's arrays live: the mesh and the ``NamedSharding`` trees of params / opt state."""

    mesh: Any
    params: Any
    opt_state: Any

    def put_batch(self, batch: dict) -> dict:
        """This host's rows of a global batch -> global arrays sharded over the batch axes."""
        local = data.host_rows(batch, jax.process_index(), jax.process_count())
        return {key: jax.make_array_from_process_local_data(
            sharding.batch_sharding(self.mesh, np.ndim(x)), local[key], np.shape(x)) for key, x in batch.items()}

    def put_local(self, local: dict) -> dict:
        """This host's rows (a per-host data pipeline) -> global arrays sharded over the batch axes."""
        count = jax.process_count()
        return {key: jax.make_array_from_process_local_data(
            sharding.batch_sharding(self.mesh, np.ndim(x)), x, (np.shape(x)[0] * count, *np.shape(x)[1:]))
            for key, x in local.items()}


def place(mesh_text: str, params, tx, batch: int) -> tuple[Placement, Any, Any]:
    """``(placement, params, opt_state)`` on the mesh of ``--mesh`` text, parameters sharded by
    ``miras_jax.sharding``'s rules and the optimizer state following them."""
    mesh = sharding.make_mesh(mesh_text)
    per = sharding._axis_size(mesh, tuple(a for a in sharding.RULES["batch"] if mesh.shape[a] > 1))
    if batch % per:
        raise ValueError(f"batch={batch} must be divisible by the mesh's batch axes "
                         f"{sharding.RULES['batch']} (size {per}) of --mesh={mesh_text}")
    p_sh = sharding.param_shardings(mesh, params)
    params = jax.device_put(params, p_sh)
    # optimizer moments follow their parameters (same path suffix -> same rule); counts replicated
    o_sh = sharding.param_shardings(mesh, jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    return Placement(mesh, p_sh, o_sh), params, opt_state


def evaluate(eval_step, params, eval_sets: dict, put=lambda b: b) -> dict:
    """``{eval_<name>_loss, eval_<name>_accuracy}`` averaged over each set's batches."""
    out = {}
    for name, batches in eval_sets.items():
        ls, accs = zip(*[(float(a), float(b)) for a, b in (eval_step(params, put(bt)) for bt in batches)])
        out[f"eval_{name}_loss"] = float(np.mean(ls))
        out[f"eval_{name}_accuracy"] = float(np.mean(accs))
    return out


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def lm_summary(evals: dict, tokens_per_byte: float = 1.0) -> dict:
    """LM figures from the validation loss (nats / token): perplexity and bits per byte (``loss / ln 2 x
    tokens_per_byte``: 1 for byte-level runs; a tokenized corpus's scored tokens per byte)."""
    if "eval_val_loss" not in evals:
        return {}
    loss = evals["eval_val_loss"]
    return {"val_bits_per_byte": loss / math.log(2) * tokens_per_byte, "val_perplexity": math.exp(loss)}


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) as None: what ``metrics.jsonl`` and
    ``summary.json`` hold is standard JSON (``null``), which every reader accepts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """``json.dumps`` of :func:`strict_json` (non-finite floats as ``null``; never a bare ``NaN``)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kw)


def _read_metrics(path: str, upto: int | None) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return [r for r in rows if upto is None or r["step"] <= upto]


def _write_metrics(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


class _TensorBoard:
    """Scalars of every metrics row to ``<workdir>/tensorboard`` when ``tensorboardX`` is installed
    (``pip install tensorboardX``); otherwise a no-op. Same numbers as ``metrics.jsonl``. The writer
    opens on the first row; after ``resume_at(step)`` it opens with ``purge_step = step + 1``, so
    TensorBoard drops what an interrupted run had logged past the checkpoint it resumes from."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.logdir, self.enabled, self.writer, self.purge_step = logdir, enabled, None, None

    def resume_at(self, step: int) -> None:
        self.purge_step = step + 1

    def write(self, row: dict) -> None:
        if self.writer is None and self.enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self.enabled = False
                return
            self.writer = SummaryWriter(self.logdir, purge_step=self.purge_step)
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, row["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    for key in sorted({k for r in rows for k in r if k.startswith("eval_") and k.endswith("_loss")}):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class StopOnSignal:
    """SIGTERM / SIGINT while training: finish the current step, save a checkpoint and stop (a TPU
    VM's or a scheduler's preemption notice is a SIGTERM; Ctrl-C is a SIGINT). ``received``: the
    signal's name, or None. The handlers are only installed in the main thread; a second signal
    acts as it would without them."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self._old = None, {}

    def _on(self, signum, frame):
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "loss.png", "tensorboard", "tokenizer")


def existing_run(workdir: str) -> str | None:
    """What of a run ``workdir`` already holds (``"checkpoints up to step 300, metrics.jsonl"``), or None."""
    found = []
    steps = saved_steps(os.path.join(workdir, "checkpoints"))
    if steps:
        found.append(f"checkpoints up to step {steps[-1]}")
    found += [name for name in ("metrics.jsonl", "summary.json") if os.path.exists(os.path.join(workdir, name))]
    return ", ".join(found) or None


def clear_run(workdir: str, names: tuple[str, ...] = RUN_FILES) -> None:
    """Delete a run's files (``names``) from ``workdir``; anything else there is kept."""
    for name in names:
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def check_workdir(workdir: str, resume, resume_dir: str | None, overwrite: bool) -> None:
    """A run directory holds one run: refuse to start a second one in it (TrainingError) unless
    ``resume`` continues it (``"auto"``, or ``resume_dir``, what ``resolve_resume`` made of it, is
    its own checkpoint directory) or ``overwrite`` deletes it first."""
    if overwrite and resume:
        raise ValueError("--overwrite deletes the run in --workdir and --resume continues it: pass one")
    if overwrite or not os.path.isdir(workdir):
        return
    own = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if resume in ("auto", "latest", True) or (resume_dir is not None and os.path.abspath(resume_dir) == own):
        return
    held = existing_run(workdir)
    if held:
        raise TrainingError(f"{workdir} already holds a run ({held}); continue it with --resume=auto, train "
                            "into a new --workdir, or pass --overwrite to delete it and start afresh")


def train(cfg: configs.TrainConfig, workdir: str, *, data_path: str | None = None, resume: str | None = None,
          stop_after: int | None = None, progress: bool = True, mesh: str | None = None,
          overwrite: bool = False) -> dict:
    """Run (or continue) a training run; returns the summary dict (also in ``summary.json``).

    ``resume``: ``"auto"`` continues the run in ``workdir`` (or starts one if it holds none), a path
    continues from that checkpoint directory. ``overwrite``: delete the run in ``workdir`` first.
    Without either, a ``workdir`` that already holds a run is refused (:func:`check_workdir`).
    ``mesh`` ("data:2,fsdp:4"): shard the run over a device mesh (``miras_jax.sharding``); the
    checkpoints are saved sharded and restore onto any other mesh shape."""
    # optax's AdamW mixes its int32 step count with floats: trace under standard promotion even
    # if the caller (e.g. the test suite) runs with strict promotion.
    with jax.numpy_dtype_promotion("standard"):
        return _train(cfg, workdir, data_path=data_path, resume=resume, stop_after=stop_after,
                      progress=progress, mesh=mesh, overwrite=overwrite)


def _train(cfg, workdir, *, data_path, resume, stop_after, progress, mesh=None, overwrite=False) -> dict:
    if cfg.task == "corpus":
        cfg = corpus_config(cfg, data_path)
    cfg = resolved(cfg)
    resume_dir = resolve_resume(workdir, resume) if resume else None  # fail before building the model
    check_workdir(workdir, resume, resume_dir, overwrite)
    task = make_task(cfg, data_path)
    graphdef, params, rest, tx, schedule = build(cfg, task.vocab)
    if overwrite:
        clear_run(workdir)
    os.makedirs(workdir, exist_ok=True)  # only now: a run that fails validation leaves no directory
    if cfg.task == "corpus":   # the tokenizer travels with the run (evaluate / generate / lm-eval)
        _copy_tokenizer(data_path, workdir)
    placement = None
    if mesh:
        placement, params, opt_state = place(mesh, params, tx, cfg.batch)
    else:
        opt_state = tx.init(params)
    train_step, eval_step = make_steps(graphdef, rest, tx, placement, cfg.grad_accum, task.segment_align)
    put = placement.put_batch if placement is not None else (lambda b: b)
    put_train = placement.put_local if (placement is not None and task.local_rows) else put
    ckpt_dir = os.path.join(workdir, "checkpoints")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    cfg_dict = _config_dict(cfg)
    start, data_state = 0, None
    with (Checkpointer(ckpt_dir, max_to_keep=3, save_every=cfg.checkpoint_every) as ckpt,
          _TensorBoard(os.path.join(workdir, "tensorboard"), enabled=cfg.tensorboard) as tb,
          StopOnSignal() as stopper):
        if resume_dir is not None:
            template = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
            try:
                if os.path.abspath(resume_dir) == os.path.abspath(ckpt_dir):
                    state, meta, _ = ckpt.restore(template)
                else:
                    with Checkpointer(resume_dir) as src:
                        state, meta, _ = src.restore(template)
            except CheckpointError as e:
                raise TrainingError(f"cannot resume: {e}. Start afresh with --overwrite, or resume from "
                                    "another checkpoint directory") from None
            if not _same_model(meta.get("config", {}).get("model"), cfg_dict["model"]):
                diff = "; ".join(_model_diff(meta.get("config", {}).get("model"), cfg_dict["model"]))
                raise TrainingError(f"cannot resume from {resume_dir}: its model differs from this run's in "
                                    f"{diff}. Pass the checkpoint's settings, or train into a new --workdir")
            params, opt_state = state["params"], state["opt_state"]
            start, data_state = int(state["step"]), meta.get("data")
            print(f"resumed from {resume_dir} at step {start} of {cfg.steps}", file=sys.stderr, flush=True)
            tb.resume_at(start)
        rows = _read_metrics(metrics_path, start) if resume_dir is not None else []
        _write_metrics(metrics_path, rows)  # once: drops rows past the restored step; then append
        it = (task.iterator(start, data_state) if task.iterator is not None
              else data.DataIterator(task.train_batch, cfg.seed, step=start))
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        n_params = count_params(merge(graphdef, params, rest))
        tokens_per_step = cfg.batch * cfg.seq_len
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, desc=f"{cfg.task}/{cfg.model.preset}", unit="step")
        t_run, t_last, seen = time.perf_counter(), time.perf_counter(), 0
        reached = next((r for r in rows if r.get("reached_target")), None)
        # a resumed (possibly finished) run starts from its last evaluation
        last_eval = next(({k: v for k, v in r.items() if k.startswith("eval_")} for r in reversed(rows)
                          if any(k.startswith("eval_") for k in r)), {})
        t_offset = rows[-1].get("elapsed_s", 0.0) if rows else 0.0  # training time before a resume
        done, bar_tps = start, 0.0  # the bar shows the last logged tokens/s between log steps
        for step in range(start + 1, end + 1):
            batch = put_train(next(it))
            params, opt_state, loss, acc, gnorm = train_step(params, opt_state, batch)
            loss = float(loss)
            seen += tokens_per_step
            done = step
            if not math.isfinite(loss):
                last = ckpt.latest_step()
                kept = (f"The last good checkpoint (step {last}) in {ckpt_dir} is kept" if last is not None
                        else "No checkpoint was saved before it (set checkpoint_every lower to keep one)")
                raise TrainingError(f"loss is {loss} at step {step}; stopping. {kept}; lower --set=lr=... "
                                    "or --set=clip=...")
            now = time.perf_counter()
            elapsed = t_offset + now - t_run
            out_of_time = bool(cfg.time_budget_s) and elapsed >= cfg.time_budget_s
            final = step == end or out_of_time or stopper.received is not None
            row = None
            if step % cfg.log_every == 0 or final:
                row = {"step": step, "loss": loss, "accuracy": float(acc), "grad_norm": float(gnorm),
                       "lr": float(schedule(step - 1)), "tokens_per_s": seen / max(now - t_last, 1e-9),
                       "elapsed_s": elapsed}
                t_last, seen, bar_tps = now, 0, row["tokens_per_s"]
            if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                last_eval = evaluate(eval_step, params, task.eval_sets, put)
                row = {**(row or {"step": step, "loss": loss, "elapsed_s": elapsed}), **last_eval}
                accs = [v for k, v in last_eval.items() if k.endswith("_accuracy")]
                if cfg.task in ("mqar", "niah") and reached is None and accs and min(accs) >= cfg.target_accuracy:
                    reached = row
                    row["reached_target"] = True
                    final = final or cfg.stop_at_target
            if row is not None:
                rows.append(row)
                with open(metrics_path, "a") as f:
                    f.write(dumps(row) + "\n")
                tb.write(row)
            ckpt.save(step, {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)},
                      {"data": it.get_state(), "config": cfg_dict}, force=step == cfg.steps or final)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{bar_tps:.0f}")
            if final:
                break
        if bar is not None:
            bar.close()
    summary = {"config": cfg_dict, "params": n_params, "steps_done": done, "finished": done == cfg.steps,
               "final_loss": rows[-1]["loss"] if rows else None, **last_eval}
    if stopper.received:
        summary["stopped_by"] = stopper.received
    summary["train_s"] = rows[-1].get("elapsed_s") if rows else None
    summary["eval_curve"] = [{k: v for k, v in r.items() if k in ("step", "elapsed_s") or k.startswith("eval_")}
                             for r in rows if any(k.startswith("eval_") for k in r)]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    summary["train_tokens_per_s"] = float(np.median(tps)) if tps else None
    summary.update(lm_summary(last_eval, task.tokens_per_byte))
    if reached is not None:
        summary["target_accuracy"] = cfg.target_accuracy
        summary["reached_target_at_step"] = reached["step"]
        summary["reached_target_after_s"] = reached.get("elapsed_s")
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        f.write(dumps(summary, indent=1))
    if rows:
        plot(rows, os.path.join(workdir, "loss.png"), f"{cfg.task} / {cfg.model.preset} / {cfg.model.pattern}")
    return summary


def _copy_tokenizer(data_path: str, workdir: str) -> None:
    """The corpus's ``tokenizer/`` into ``workdir/tokenizer`` (replaced atomically)."""
    src = os.path.join(data_path, lm_data.load_meta(data_path).get("tokenizer", "tokenizer"))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"the corpus {data_path} has no tokenizer directory {src}")
    dst = os.path.join(workdir, "tokenizer")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def run_tokenizer(workdir: str):
    """The tokenizer of the run in ``workdir``: its ``tokenizer/`` (corpus runs), else bytes."""
    from experiments import tokenizer

    path = os.path.join(workdir, "tokenizer")
    return tokenizer.load(path if os.path.isdir(path) else "bytes")


def resolved(cfg: configs.TrainConfig) -> configs.TrainConfig:
    """``cfg`` with the model's defaulted numbers filled in (``LMConfig.resolved``): what a run
    saves, and what a resume compares against."""
    return dataclasses.replace(cfg, model=cfg.model.resolved())


def _tuples(v):
    """JSON lists back to (nested) tuples."""
    return tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v


def config_from_dict(d: dict) -> configs.TrainConfig:
    """Inverse of ``_config_dict``; the model config as ``_saved_model`` reads it."""
    return configs.TrainConfig(**{k: _tuples(v) for k, v in d.items() if k != "model"},
                               model=LMConfig(**_saved_model(d["model"])))


def _saved_model(saved: dict) -> dict:
    """A checkpoint's model config: a field it predates is its default, and an unresolved ``lr_max``
    (None or absent: written before runs saved the resolved value) is ``LR_MAX_UNRESOLVED[memory kind]``,
    what the layers used then (since then Moneta's MLP memory defaults to 3e-3, Memora's to 3). A
    preset with the ``anchor`` option saved without it predates anchored retention: ``anchor=False``
    (and Yaad's surrogate slope ``a = 10``), the map it trained with."""
    d = {**dataclasses.asdict(LMConfig()), **{k: _tuples(v) for k, v in saved.items()}}
    kw = dict(d["preset_kwargs"])
    if "M" in d["pattern"] and presets.takes(d["preset"], "anchor") and "anchor" not in kw:
        kw["anchor"] = False
        if d["preset"] == "yaad":
            kw.setdefault("a", 10.0)
        d["preset_kwargs"] = tuple(sorted(kw.items()))
    if d["lr_max"] is None and "M" in d["pattern"]:
        d["lr_max"] = LR_MAX_UNRESOLVED[LMConfig(**d).spec().memory.kind]
    return d


def load_run(workdir: str, step: int | None = None):
    """``(cfg, graphdef, params, rest, step)`` of a saved run (latest good checkpoint by default)."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir!r} (expected {ckpt_dir})")
    with Checkpointer(ckpt_dir) as ckpt:
        meta = ckpt.restore_meta(step)
        cfg = config_from_dict(meta["config"])
        graphdef, params, rest, tx, _ = build(cfg, configs.task_vocab(cfg))
        state, _, got = ckpt.restore({"params": params, "opt_state": tx.init(params),
                                      "step": jnp.zeros((), jnp.int32)}, step=step)
    return cfg, graphdef, state["params"], rest, got


def _same_model(saved: dict | None, current: dict) -> bool:
    """Whether a checkpoint's model config (read by ``_saved_model``: adding an ``LMConfig`` field
    must not orphan older checkpoints) is this run's (resolved) one."""
    if saved is None:
        return False
    return _json(_saved_model(saved)) == current


def _model_diff(saved: dict | None, current: dict) -> list[str]:
    """``["field (checkpoint X, this run Y)", ...]`` for the model fields that differ."""
    if saved is None:
        return ["everything (the checkpoint records no model config)"]
    old = _json(_saved_model(saved))
    return [f"model.{k} (checkpoint {old.get(k)!r}, this run {current.get(k)!r})"
            for k in sorted(set(old) | set(current)) if old.get(k) != current.get(k)]


def _json(d):
    return json.loads(json.dumps(d, default=list))


def _config_dict(cfg: configs.TrainConfig) -> dict:
    return _json(dataclasses.asdict(cfg))


def config_from_flags() -> configs.TrainConfig:
    f = flags.FLAGS
    cfg = configs.get(f.config)
    sets = list(f.set)
    if f.steps is not None:
        sets.append(f"steps={f.steps}")
    if f.preset is not None:
        if f.preset not in presets.names():
            raise ValueError(f"unknown preset {f.preset!r}; valid: {list(presets.names())}")
        sets.append(f"model.preset={f.preset}")
    return configs.override(cfg, sets)


def main(argv):
    del argv
    f = flags.FLAGS
    if f.distributed:
        jax.distributed.initialize()
    try:
        cfg = config_from_flags()
        workdir = f.workdir or os.path.join("runs", f.config)
        summary = train(cfg, workdir, data_path=f.data, resume=f.resume, stop_after=f.stop_after,
                        progress=f.progress, mesh=f.mesh, overwrite=f.overwrite)
    except (ValueError, FileNotFoundError, IsADirectoryError, TrainingError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None
    print(dumps({k: v for k, v in summary.items() if k != "config"}), flush=True)
    if summary.get("stopped_by"):
        print(f"stopped by {summary['stopped_by']} at step {summary['steps_done']}, checkpoint saved; "
              "--resume=auto continues", file=sys.stderr, flush=True)
        sys.exit(128 + signal.Signals[summary["stopped_by"]].value)


if __name__ == "__main__":
    define_flags()
    cli.run(main)


__all__ = ["LMConfig", "Task", "TrainingError", "build", "evaluate", "make_task", "masked_loss", "resolved", "train"]
