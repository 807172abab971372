"""EleutherAI's lm-evaluation-harness on a saved run: the model ``miras_jax`` and a command.

    python -m experiments.lm_eval_adapter --workdir=runs/lm --tasks=lambada_openai,hellaswag --limit=100
    python -m experiments.lm_eval_adapter --workdir=runs/lm --tasks=my_task --include_path=DIR \
        --nobuiltin_tasks --output=results.json

Needs the ``eval`` extra (``pip install "lm-eval>=0.4.5"``: datasets, pandas, scikit-learn, ...; no
PyTorch). Importing this module registers :class:`MirasEvalLM` in lm-eval's model registry as
``miras_jax``, so in Python ``lm_eval.simple_evaluate(model="miras_jax", model_args="workdir=RUN")``
works after ``import experiments.lm_eval_adapter``. The command prints one JSON line per task with
its metrics (``{"task": ..., "acc,none": ..., ...}``) and writes lm-eval's whole results JSON to
``--output``.

**``lm_eval --model miras_jax`` does not work**, and this command is the entry point: lm-eval (0.4.13)
resolves ``--model`` in its registry, which holds its own models (the lazy ``module:Class`` table of
``lm_eval.models``) and whatever the running process registered; it discovers no plugins (no entry
point group, no import-a-module option), so its CLI process never imports this module. Its CLI is
reachable with the model registered through ``python -c "import experiments.lm_eval_adapter;
from lm_eval.__main__ import cli_evaluate; cli_evaluate()" run --model miras_jax --model_args
workdir=RUN --tasks ...``.

Model arguments (``--model_args`` / ``model_args=``): ``workdir=RUN`` (required), ``step=N`` (a
checkpoint step; default the latest good one), ``batch_size=B`` (default 8; ``auto`` is 8),
``max_length=L`` (tokens per forward; default ``4 * seq_len`` of the run's training). The run's
tokenizer is ``RUN/tokenizer/`` (``experiments.tokenizer``) if it exists, else UTF-8 bytes. MQAR runs
(key / value ids, not text) and a tokenizer larger than the model's vocabulary are refused.

What each request computes:

* ``loglikelihood``: the sum of the continuation tokens' log-probabilities given the context, and
  whether greedy argmax reproduces every continuation token. As lm-eval's HF model: the context's
  trailing spaces move to the continuation; ``encode(context + continuation)`` is split at
  ``len(encode(context))``; ``context + continuation`` is cut from the left to ``max_length + 1``
  tokens. An empty context conditions on the tokenizer's ``eos_id``; without one (byte-level runs)
  the continuation's first token is the context and only the rest are scored (a one-token
  continuation then scores 0.0, greedy). A continuation longer than ``max_length`` is refused.
* ``loglikelihood_rolling``: the text in disjoint windows of ``max_length`` predictions
  (``lm_eval.utils.get_rolling_token_windows``, as lm-eval's HF model), conditioned on ``eos_id``;
  without one the first token is the condition and is not scored (the text's other tokens are; the
  task's per-byte / per-word figures still divide by the whole text).
* ``generate_until``: greedy decoding with the model's recurrent state (``MirasLM.prefill`` + ``step``)
  for at most ``max_gen_toks`` tokens (default 64), cut at the first ``until`` string (and at
  ``eos_id``). The prompt keeps its last ``max_length - max_gen_toks`` tokens (at least one).
  Sampling options (``do_sample``, ``temperature``) are ignored with a warning: decoding is greedy.

Batching (JAX compiles once per shape): scoring requests are sorted by length, ``batch_size`` rows a
batch (the last batch padded with empty rows), right-padded to the next power of two (at least 16,
at most ``max_length``); the model is causal, so padding after a sequence does not change its
logits. Generation prefills each batch's common prompt prefix rounded down to a multiple of
``lcm(64, chunk_size)`` (whole memory chunks; one token for shorter prompts) and feeds the rest of
each prompt through ``step`` (compiled once): at most ``max_length / 64 + 1`` prefill programs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

try:
    import lm_eval
    # lm-eval's own models first: get_model adds them only to an empty registry
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
except ImportError as e:  # pragma: no cover - the message names the extra
    raise ImportError('experiments.lm_eval_adapter needs lm-evaluation-harness: pip install "lm-eval>=0.4.5" '
                      '(the "eval" extra)') from e
from tqdm import tqdm

from experiments import cli, tokenizer as tokenizer_lib, train as train_lib
from experiments.checkpoint import CheckpointError

log = logging.getLogger(__name__)

MODEL_NAME = "miras_jax"
DEFAULT_BATCH = 8
DEFAULT_MAX_GEN_TOKS = 64
MIN_BUCKET = 16        # the shortest padded scoring length
PREFILL_STEP = 64      # generation prefills a multiple of lcm(this, the chunk size), or one token


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)", required=True)
    flags.DEFINE_list("tasks", None, "lm-eval task (or group) names, comma-separated", required=True)
    flags.DEFINE_string("include_path", None, "a directory of extra task YAMLs (lm-eval's --include_path)")
    flags.DEFINE_bool("builtin_tasks", True, "index lm-eval's ~15k built-in tasks too (about 10 s on a CPU); "
                      "--nobuiltin_tasks with --include_path for local tasks only")
    flags.DEFINE_float("limit", None, "examples per task: a count, or a fraction of the task if < 1")
    flags.DEFINE_integer("batch_size", None, f"rows per forward (default {DEFAULT_BATCH})")
    flags.DEFINE_integer("max_length", None, "tokens per forward (default 4x the run's seq_len)")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")
    flags.DEFINE_integer("num_fewshot", None, "few-shot examples (default: each task's own)")
    flags.DEFINE_integer("bootstrap_iters", 100000, "bootstrap iterations for stderrs (0: none)")
    flags.DEFINE_string("output", None, "write lm-eval's whole results JSON here")


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------


def bucket_length(n: int, cap: int) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: the next power of two, at
    least ``MIN_BUCKET``, at most ``cap`` (``n <= cap``)."""
    return min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), cap)


def prefill_length(n: int, granule: int) -> int:
    """The prompt prefix a generation batch prefills (``n``: its shortest prompt, >= 1): the largest
    multiple of ``granule`` <= ``n``, or 1 below it; the rest of each prompt goes through ``step``."""
    return n - n % granule if n >= granule else 1


def _as_int(name: str, value, default: int | None, least: int = 1) -> int | None:
    """A model argument as an int >= ``least``; ``None`` or lm-eval's ``"auto[:N]"``: ``default``."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        out = int(value)
        ok = out >= least and out == float(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"model argument {name} must be an integer >= {least}, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


class MirasEvalLM(LM):
    """A saved miras_jax run as an lm-eval ``LM`` (see the module docstring for what each request
    computes). ``device`` / ``max_batch_size`` (passed by lm-eval) are ignored: JAX places the model
    on its default device."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int | str | None = None,
                 max_length: int | None = None, max_batch_size=None, device=None, **unknown):
        super().__init__()
        del max_batch_size, device
        if unknown:
            raise ValueError(f"unknown model arguments {sorted(unknown)} for {MODEL_NAME}; valid: workdir, "
                             "step, batch_size, max_length")
        if not workdir:
            raise ValueError(f"{MODEL_NAME} needs model_args workdir=RUN (a run directory)")
        workdir = os.fspath(workdir)
        step = _as_int("step", step, None, least=0)
        cfg, graphdef, params, rest, got = train_lib.load_run(workdir, step)
        if cfg.task == "mqar":
            raise ValueError(f"{workdir} is an MQAR run (its tokens are key / value ids of a "
                             f"{cfg.mqar_vocab}-token vocabulary, not text): lm-eval scores text, so use a "
                             "language-model run (charlm, ...)")
        model = train_lib.merge(graphdef, params, rest)
        tok_dir = os.path.join(workdir, "tokenizer")
        self.tokenizer = tokenizer_lib.load(tok_dir if os.path.isdir(tok_dir) else "bytes")
        vocab = model.cfg.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"the tokenizer of {workdir} has {self.tokenizer.vocab_size} tokens but the "
                             f"model's vocabulary has {vocab} (cfg.model.vocab_size={cfg.model.vocab_size}): "
                             "not this run's tokenizer")
        self.cfg, self.workdir, self.step = cfg, workdir, got
        self._batch_size = _as_int("batch_size", batch_size, DEFAULT_BATCH)
        self._max_length = _as_int("max_length", max_length, 4 * cfg.seq_len)
        self._graphdef, self._state = nnx.split(model)
        gdef = self._graphdef

        def score(state, inputs, targets):
            """``inputs, targets [b, t]`` -> ``(log p(target) [b, t], argmax == target [b, t])``."""
            logits = nnx.merge(gdef, state)(inputs)
            logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return logp, jnp.argmax(logits, axis=-1) == targets

        def prefill(state, tokens, max_len):
            logits, caches = nnx.merge(gdef, state).prefill(tokens, max_len=max_len)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), caches

        def step_fn(state, token, caches):
            logits, caches = nnx.merge(gdef, state).step(token, caches)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches

        self._score = jax.jit(score)
        self._prefill = jax.jit(prefill, static_argnums=2)
        self._step = jax.jit(step_fn)

    # -- properties lm-eval reads ------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_id

    def get_model_info(self) -> dict:
        """What ``simple_evaluate`` adds to ``results["config"]``."""
        return {"workdir": os.path.abspath(self.workdir), "step": int(self.step), "task": self.cfg.task,
                "preset": self.cfg.model.preset, "pattern": self.cfg.model.pattern,
                "tokenizer": self.tokenizer.kind, "vocab_size": int(self.tokenizer.vocab_size),
                "max_length": self.max_length}

    # -- tokens ------------------------------------------------------------------------------------

    def tok_encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(np.asarray(ids, np.int32))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` as the module docstring says (empty context: ``[eos_id]``,
        or the continuation's first token without one)."""
        if not context:
            cont = self.tok_encode(continuation)
            if self.eos_id is not None:
                return [self.eos_id], cont
            return cont[:1], cont[1:]
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    # -- scoring -----------------------------------------------------------------------------------

    def score_tokens(self, rows: Sequence[tuple[Sequence[int], int]], *,
                     bar=None) -> list[tuple[float, bool]]:
        """``rows``: ``(tokens, n)``: score the last ``n`` of ``tokens`` (``1 <= len(tokens) <=
        max_length + 1``, ``n < len(tokens)``) each given the ones before it -> ``(sum log p, all
        greedy)`` per row (``(0.0, True)`` for ``n = 0``). Sorted by length, batched, right-padded."""
        out: list[tuple[float, bool] | None] = [(0.0, True) if n == 0 else None for _, n in rows]
        order = sorted((i for i, (_, n) in enumerate(rows) if n), key=lambda i: -len(rows[i][0]))
        if bar is not None:
            bar.update(len(rows) - len(order))
        b = self.batch_size
        for start in range(0, len(order), b):
            idx = order[start:start + b]
            t = bucket_length(max(max(len(rows[i][0]) for i in idx) - 1, 1), self.max_length)
            inputs = np.zeros((b, t), np.int32)
            targets = np.zeros((b, t), np.int32)
            for r, i in enumerate(idx):
                toks, n = rows[i]
                if not 0 < n < len(toks) <= self.max_length + 1:
                    raise ValueError(f"cannot score {n} of {len(toks)} tokens with "
                                     f"max_length={self.max_length}")
                inputs[r, :len(toks) - 1] = toks[:-1]
                targets[r, :len(toks) - 1] = toks[1:]
            logp, greedy = jax.device_get(self._score(self._state, inputs, targets))
            for r, i in enumerate(idx):
                toks, n = rows[i]
                end = len(toks) - 1
                span = slice(end - n, end)
                out[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
            if bar is not None:
                bar.update(len(idx))
        return out  # type: ignore[return-value]

    def _truncated(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds "
                             f"max_length={self.max_length}; pass a larger max_length in model_args")
        return (context + continuation)[-(self.max_length + 1):], len(continuation)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [req.args for req in requests]
        rows = [self._truncated(*self.encode_pair(ctx, cont)) for ctx, cont in args]
        with tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood requests") as bar:
            out = self.score_tokens(rows, bar=bar)
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], int]]:
        """``text``'s scoring rows ``(tokens, n)``: lm-eval's disjoint rolling windows of ``max_length``
        predictions after ``eos_id`` (after the first token without one)."""
        toks = self.tok_encode(text)
        prefix = self.eos_id
        if prefix is None:
            if len(toks) < 2:
                return []
            prefix, toks = toks[0], toks[1:]
        windows = map(lm_utils.make_disjoint_window,
                      lm_utils.get_rolling_token_windows(token_list=toks, prefix_token=prefix,
                                                         max_seq_len=self.max_length, context_len=1))
        return [(ctx + cont, len(cont)) for ctx, cont in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        per_text = [self.rolling_windows(t) for t in texts]
        rows = [w for ws in per_text for w in ws]
        with tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0,
                  desc="Running loglikelihood_rolling windows") as bar:
            scores = self.score_tokens(rows, bar=bar)
        out, k = [], 0
        for text, ws in zip(texts, per_text):
            total = float(sum(s for s, _ in scores[k:k + len(ws)]))
            k += len(ws)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # -- generation --------------------------------------------------------------------------------

    def _gen_options(self, gen_kwargs: dict) -> tuple[list[str], int]:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_gen = int(kw.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if max_gen < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen}")
        if kw.pop("do_sample", False) or float(kw.pop("temperature", 0.0) or 0.0) > 0:
            _warn_once("miras_jax decodes greedily: do_sample / temperature are ignored")
        return [u for u in until if u], max_gen

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        jobs = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, max_gen = self._gen_options(gen_kwargs)
            prompt = self.tok_encode(context)
            if not prompt:
                if self.eos_id is None:
                    raise ValueError("generate_until with an empty context needs a tokenizer with an eos_id "
                                     "(byte-level runs have none)")
                prompt = [self.eos_id]
            prompt = prompt[-max(1, self.max_length - max_gen):]
            jobs.append((i, prompt, until, max_gen))
        jobs.sort(key=lambda j: -len(j[1]))
        out: list[str | None] = [None] * len(jobs)
        with tqdm(total=len(jobs), disable=disable_tqdm or self.rank != 0,
                  desc="Running generate_until requests") as bar:
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start:start + self.batch_size]
                for (i, _, _, _), text in zip(batch, self._generate_batch(batch)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        return out  # type: ignore[return-value]

    def _generate_batch(self, batch) -> list[str]:
        """Greedy continuations of ``batch`` (``(index, prompt ids, until, max_gen)``, longest prompt
        first): prefill the common prefix, then one ``step`` per token for every row (a row still in
        its prompt is fed its next prompt token; its prediction is dropped)."""
        b = self.batch_size
        prompts = [p for _, p, _, _ in batch]
        prompts += [prompts[0]] * (b - len(prompts))         # padding rows: never read
        lens = [len(p) for p in prompts]
        p = prefill_length(min(lens), math.lcm(PREFILL_STEP, self.cfg.model.chunk_size))
        max_gen = max(m for _, _, _, m in batch)
        max_len = max(self.max_length, max(lens) + max_gen)  # global attention's cache slots
        prefix = jnp.asarray(np.array([q[:p] for q in prompts], np.int32))
        pred, caches = self._prefill(self._state, prefix, max_len)
        gen: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        t = p                                                 # tokens consumed by every row
        while True:
            pred_host = np.asarray(pred)
            feed = np.zeros((b,), np.int32)
            for r in range(b):
                if t < lens[r]:
                    feed[r] = prompts[r][t]
                    continue
                feed[r] = pred_host[r]
                if r < len(batch) and not done[r]:
                    _, _, until, m = batch[r]
                    tok = int(pred_host[r])
                    if tok == self.eos_id:
                        done[r] = True
                        continue
                    gen[r].append(tok)
                    done[r] = len(gen[r]) >= m or (bool(until) and _cut(self.tok_decode(gen[r]), until)[1])
            if all(done):
                break
            pred, caches = self._step(self._state, jnp.asarray(feed), caches)
            t += 1
        return [_cut(self.tok_decode(g), until)[0] for g, (_, _, until, _) in zip(gen, batch)]


def _cut(text: str, until: Sequence[str]) -> tuple[str, bool]:
    """``(text before the earliest stop string, whether one occurs)``."""
    hits = [k for k in (text.find(u) for u in until) if k >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


# register once per process: ``python -m`` runs this file as ``__main__`` and ``main`` imports the
# module proper (a second class under the same name would be refused by the registry)
if __name__ != "__main__" and MODEL_NAME not in model_registry:
    register_model(MODEL_NAME)(MirasEvalLM)


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------


def evaluate(workdir: str, tasks: Sequence[str], *, include_path: str | None = None,
             builtin_tasks: bool = True, limit: float | None = None, batch_size: int | None = None,
             max_length: int | None = None, step: int | None = None, num_fewshot: int | None = None,
             bootstrap_iters: int = 100000) -> dict:
    """``lm_eval.simple_evaluate`` of the run in ``workdir`` on ``tasks``; returns lm-eval's results
    dict (``results[task][metric]``, ``config``, ...)."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("--tasks is empty: name at least one lm-eval task")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"--include_path {include_path} is not a directory")
    if not builtin_tasks and include_path is None:
        raise ValueError("--nobuiltin_tasks needs --include_path (there would be no tasks at all)")
    manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = " and ".join(filter(None, ["lm-eval's built-in tasks" if builtin_tasks else "",
                                           include_path]))
        raise ValueError(f"unknown tasks {missing} (not in {where}); `lm-eval ls tasks` lists them")
    model_args = {k: v for k, v in dict(workdir=workdir, step=step, max_length=max_length).items()
                  if v is not None}
    if limit is not None and limit >= 1:
        limit = int(limit) if float(limit).is_integer() else limit
    return lm_eval.simple_evaluate(model=MODEL_NAME, model_args=model_args, tasks=list(tasks),
                                   batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=False)


def task_lines(results: dict) -> list[dict]:
    """One dict per task: ``{"task": name, metric: value, ...}`` (lm-eval's ``results["results"]``)."""
    return [{"task": name, **{k: v for k, v in metrics.items() if k != "alias"}}
            for name, metrics in results["results"].items()]


def main(argv):
    del argv
    import importlib

    importlib.import_module("experiments.lm_eval_adapter")  # registers miras_jax (this file may be __main__)
    f = flags.FLAGS
    try:
        results = evaluate(f.workdir, f.tasks, include_path=f.include_path, builtin_tasks=f.builtin_tasks,
                           limit=f.limit, batch_size=f.batch_size, max_length=f.max_length, step=f.step,
                           num_fewshot=f.num_fewshot, bootstrap_iters=f.bootstrap_iters)
    except (ValueError, FileNotFoundError, train_lib.TrainingError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None
    for line in task_lines(results):
        print(train_lib.dumps(line), flush=True)
    if f.output:
        os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
        with open(f.output, "w") as fh:
            json.dump(results, fh, indent=1, default=lm_utils.handle_non_serializable, allow_nan=True)
            fh.write("\n")


if __name__ == "__main__":
    define_flags()
    cli.run(main)


__all__ = ["MODEL_NAME", "MirasEvalLM", "bucket_length", "evaluate", "prefill_length", "task_lines"]

