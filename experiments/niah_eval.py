"""RULER-style single needle in a haystack (S-NIAH) evaluation of a saved run, by context length.

    python -m experiments.niah_eval --workdir=runs/lm --haystack=data/tinyshakespeare.txt.gz \\
        --lengths=512,1024,2048 [--needle=passkey|number|word|uuid] [--samples=10] [--depths=5] \\
        [--seed=0] [--step=N] [--output_dir=DIR] [--batch_size=N]

Every prompt is exactly ``length`` tokens of the run's tokenizer (``<workdir>/tokenizer/`` if the run
has one, else bytes), no padding, so the prompts of one length are one batch::

    Some special magic {values} are hidden within the following text. Make sure to memorize it. I
    will quiz you about the {values} afterwards.\\n
    <haystack ... One of the special magic {values} for {key} is: {value}. ... haystack>\\n
    What is the special magic {value_name} for {key} mentioned in the provided text? The special
    magic {value_name} for {key} mentioned in the provided text is

(RULER's ``niah`` template with a single needle and a singular question; RULER's answer prefix ends
the prompt, and the answer is `` {value}``.) ``key`` is an adjective-noun word (``"gentle-harbor"``, as
RULER's word keys). Each prompt has its own key, value and haystack window: the haystack tokens the
length leaves, from a random sentence start of the haystack on. The needle goes at the window's
sentence boundary nearest ``d * window tokens``, ``d`` from ``--depths`` evenly spaced depths in
[0, 1] (one depth: 0.5): 0 is right after the instructions, 1 after the window's last whole sentence
(the window ends mid-sentence, before the question). ``--samples`` prompts per depth and length.

Needles (``--needle``), after RULER's S-NIAH tasks:

* ``passkey`` (``niah_single_1``, the pass-key retrieval task): value a 5-7 digit number, wording
  "pass key(s)"; RULER puts it in repeated noise: ``--haystack=noise`` ("The grass is green. The sky is
  blue. The sun is yellow. Here we go. There and back again." repeated). RULER's own
  niah_single_1 uses 7-digit values and the word "numbers".
* ``number`` (``niah_single_2``): value a 7-digit number, in real text (RULER: Paul Graham's essays).
* ``uuid`` (``niah_single_3``): value a UUID (36 characters), in real text.
* ``word``: ``niah_single_3`` with RULER's word values (an adjective-noun word, distinct from the
  key) instead of a UUID: a short value a small or byte-level model can hold.

``--haystack``: ``noise``, a text file (``.gz`` read too) or a tokenized corpus directory written by
``experiments/prepare.py`` (its validation documents, decoded with the corpus's tokenizer, joined by
blank lines). The text is tokenized with the run's tokenizer; the prompt is the token concatenation of
the instructions, the haystack window cut around the needle and the question, each tokenized on its
own (a byte tokenizer gives exactly the text's bytes; a BPE may tokenize the seams differently from
the joined text). Any needle goes in any haystack; the output's ``ruler`` names the RULER task when
the pair is one (passkey + noise, number / uuid + text; word + text is ``"niah_single_3 (word
values)"``), else ``null``.

Scoring: greedy decoding with the model's recurrent decoder (``miras_jax.nn.generate``: one prefill of
the whole prompt, then ``step``s) for as many tokens as the longest answer of the length plus
``EXTRA_TOKENS``; a prompt is solved when its value occurs in the decoded text (case-insensitive:
RULER's ``string_match_all`` with one value). ``answer_logprob``: the answer's log-likelihood per
token (`` {value}``, teacher-forced, from one forward of prompt + answer), averaged over prompts: it
moves before accuracy does in models too small to retrieve.

Memory: all prompts of a length run as one call by default. ``generate``'s prefill computes logits
at every prompt position, ``[b, length, vocab]`` float32 (50 prompts of 4096 tokens with a 32k
vocabulary: 27 GB); ``--batch_size`` bounds the prompts per call (one compile per length still).

Output: one JSON line per length on stdout ``{"workdir", "step", "needle", "haystack", "ruler",
"length", "samples", "accuracy", "answer_logprob", "by_depth": {"<depth %>": {"samples", "accuracy",
"answer_logprob"}}}``, then a summary line (``"summary": true``, the means over lengths and the
plot's path); ``niah.png`` (accuracy and answer log-likelihood vs length, and the depth x length
accuracy map with more than one depth) in ``--output_dir`` (default: the workdir). stderr gets one
progress line per length. Everything is deterministic in ``--seed`` (length ``L``'s prompts come from
``np.random.default_rng([seed, L])``, whatever the other lengths).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from experiments import cli, configs, data
from experiments import tokenizer as tokenizers
from experiments import train as train_lib
from experiments.checkpoint import CheckpointError
from miras_jax.nn import generate

EXTRA_TOKENS = 4          # decoded beyond the longest answer of a length
MIN_HAYSTACK_TOKENS = 16  # the shortest haystack a length must leave
READ_CHARS_PER_TOKEN = 64  # haystack text read: at most max(1 MiB, this * longest length) characters
NOISE = "noise"


# ------------------------------------------------------------------------------------------------
# needles and prompt templates
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Needle:
    """One S-NIAH variant: the value's name (singular / plural), the RULER task it follows and the
    haystack kind that task uses (``"noise"`` or ``"text"``)."""

    name: str
    plural: str
    ruler: str
    ruler_haystack: str


NEEDLES = {
    "passkey": Needle("pass key", "pass keys", "niah_single_1", "noise"),
    "number": Needle("number", "numbers", "niah_single_2", "text"),
    "word": Needle("word", "words", "niah_single_3 (word values)", "text"),
    "uuid": Needle("uuid", "uuids", "niah_single_3", "text"),
}

PREFIX = ("Some special magic {plural} are hidden within the following text. Make sure to memorize it. "
          "I will quiz you about the {plural} afterwards.\n")
NEEDLE = " One of the special magic {plural} for {key} is: {value}."
QUESTION = ("\nWhat is the special magic {name} for {key} mentioned in the provided text? "
            "The special magic {name} for {key} mentioned in the provided text is")
ANSWER = " {value}"

# keys (and word values): adjective-noun words, as RULER's (which draws them from wonderwords' lists)
ADJECTIVES = ("amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "crimson", "curious",
              "distant", "eager", "elegant", "fancy", "fierce", "gentle", "golden", "hollow", "humble", "icy",
              "jolly", "lively", "lucky", "mellow", "misty", "noble", "odd", "proud", "quiet", "rapid",
              "silent", "tender")
NOUNS = ("anchor", "badger", "banner", "candle", "canyon", "cactus", "comet", "falcon", "garden", "glacier",
         "harbor", "helmet", "island", "kettle", "lantern", "meadow", "mirror", "orchard", "otter", "pebble",
         "pepper", "quartz", "raven", "river", "saddle", "signal", "spoon", "thistle", "tunnel", "velvet",
         "walnut", "willow")
WORDS = tuple(f"{a}-{n}" for a in ADJECTIVES for n in NOUNS)


def check_needle(needle: str) -> Needle:
    if needle not in NEEDLES:
        raise ValueError(f"unknown needle {needle!r}; valid needles: {', '.join(NEEDLES)}")
    return NEEDLES[needle]


def templates(needle: str, key: str = "{key}", value: str = "{value}") -> dict[str, str]:
    """The texts of one prompt: ``prefix``, ``needle``, ``question`` and the ``answer`` continuation."""
    n = check_needle(needle)
    fields = dict(name=n.name, plural=n.plural, key=key, value=value)
    return {"prefix": PREFIX.format(**fields), "needle": NEEDLE.format(**fields),
            "question": QUESTION.format(**fields), "answer": ANSWER.format(**fields)}


def ruler_task(needle: str, haystack: str) -> str | None:
    """The RULER task a (needle, haystack) pair is, or None (e.g. a pass key in real text)."""
    n = check_needle(needle)
    return n.ruler if n.ruler_haystack == ("noise" if haystack == NOISE else "text") else None


def _values(rng: np.random.Generator, needle: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` (key, value) pairs; keys distinct, values distinct (while the pools allow)."""
    pool = len(WORDS)
    if needle == "word":
        idx = rng.choice(pool, size=2 * n, replace=2 * n > pool)
        return [WORDS[i] for i in idx[:n]], [WORDS[i] for i in idx[n:]]
    keys = [WORDS[i] for i in rng.choice(pool, size=n, replace=n > pool)]
    values, seen = [], set()
    while len(values) < n:
        if needle == "passkey":
            digits = int(rng.integers(5, 8))
            v = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
        elif needle == "number":
            v = str(int(rng.integers(10 ** 6, 10 ** 7)))
        else:
            v = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if v not in seen:
            seen.add(v)
            values.append(v)
    return keys, values


def _longest(needle: str) -> tuple[str, str]:
    """The longest key and value (in characters) ``_values`` can draw."""
    key = max(WORDS, key=len)
    uuid_ = "f" * 8 + "-ffff" * 3 + "-" + "f" * 12
    value = {"passkey": "9" * 7, "number": "9" * 7, "word": key, "uuid": uuid_}
    return key, value[needle]


def fixed_tokens(tok: tokenizers.Tokenizer, needle: str, key: str, value: str) -> int:
    """Tokens of a prompt that are not haystack: instructions + needle + question."""
    t = templates(needle, key, value)
    return sum(len(tok.encode(t[k])) for k in ("prefix", "needle", "question"))


def min_length(tok: tokenizers.Tokenizer, needle: str) -> int:
    """The shortest length this needle takes: instructions + needle + question with the longest key
    and value, plus ``MIN_HAYSTACK_TOKENS`` of haystack."""
    return fixed_tokens(tok, needle, *_longest(needle)) + MIN_HAYSTACK_TOKENS


# ------------------------------------------------------------------------------------------------
# the haystack
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Haystack:
    """Haystack token ids and where its sentences start.

    name: ``"noise"`` or the path it was read from.
    tokens: int32 [N], ids of the run's tokenizer.
    starts: int64 [s], sorted token indices at which a sentence starts (0 first).
    """

    name: str
    tokens: np.ndarray
    starts: np.ndarray


def sentence_starts(tokens: np.ndarray, tok: tokenizers.Tokenizer) -> np.ndarray:
    """Sorted token indices at which a sentence starts: 0, and every ``i`` whose previous token's text
    ends a sentence (``.``, ``!`` or ``?``, maybe followed by a closing quote or bracket) and is followed
    by whitespace (at the end of that token or the start of token ``i``) or a capital letter (a
    SentencePiece piece decoded alone drops its leading space)."""
    tokens = np.asarray(tokens)
    if len(tokens) < 2:
        return np.zeros(1, np.int64)
    ids = np.unique(tokens)
    size = int(ids.max()) + 1
    ends, trail, lead = np.zeros(size, bool), np.zeros(size, bool), np.zeros(size, bool)
    for i in ids:
        text = tok.decode(np.asarray([i], np.int32))
        core = text.rstrip().rstrip("\"')]")
        ends[i] = core.endswith((".", "!", "?"))
        trail[i] = text[-1:].isspace()
        lead[i] = text[:1].isspace() or text[:1].isupper()
    prev, cur = tokens[:-1], tokens[1:]
    cut = ends[prev] & (trail[prev] | lead[cur])
    return np.concatenate([[0], 1 + np.flatnonzero(cut)]).astype(np.int64)


def _read_text(path: str, limit: int) -> str:
    """The first ``limit`` characters (about) of a text file; gzip files are decompressed."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(4 * limit)
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read haystack {path}: {e}") from None
    if b"\x00" in raw[:1 << 16]:
        raise ValueError(f"haystack {path} looks binary (NUL bytes); pass a text file or a corpus directory")
    return raw.decode("utf-8", errors="ignore")[:limit]


def _read_corpus(directory: str, run_tok: tokenizers.Tokenizer, limit: int) -> str:
    """Validation documents of a prepared corpus, decoded with its tokenizer (the run's if it has
    none), joined by blank lines, until ``limit`` characters."""
    from experiments import lm_data

    meta = lm_data.load_meta(directory)
    if "validation" not in meta["splits"]:
        raise ValueError(f"corpus {directory} has no validation split (splits: {', '.join(meta['splits'])})")
    tok_dir = os.path.join(directory, meta.get("tokenizer") or "tokenizer")
    tok = tokenizers.load(tok_dir) if os.path.isdir(tok_dir) else run_tok
    texts, size = [], 0
    for doc in lm_data.documents(directory, "validation"):
        texts.append(tok.decode(doc))
        size += len(texts[-1]) + 2
        if size >= limit:
            break
    return "\n\n".join(texts)


def load_haystack(path: str, tok: tokenizers.Tokenizer, min_tokens: int) -> Haystack:
    """``"noise"``, a text file or a prepared corpus directory -> :class:`Haystack` of at least
    ``min_tokens`` tokens (``ValueError`` saying how many it has otherwise)."""
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if path == NOISE:
        per = len(tok.encode(data.NOISE_FILLER))
        reps = min_tokens // max(per, 1) + 2
        while True:  # a BPE's token count is not additive over repeats: grow until it fits
            tokens = tok.encode(data.NOISE_FILLER * reps)
            if len(tokens) >= min_tokens:
                break
            reps *= 2
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"haystack not found: {path} (expected 'noise', a text file or a corpus "
                                    "directory written by experiments/prepare.py)")
        limit = max(1 << 20, READ_CHARS_PER_TOKEN * min_tokens)
        text = _read_corpus(path, tok, limit) if os.path.isdir(path) else _read_text(path, limit)
        tokens = tok.encode(text)
        if len(tokens) < min_tokens:
            raise ValueError(f"haystack {path} has {len(tokens)} tokens of the run's tokenizer ({len(text)} "
                             f"characters), fewer than the {min_tokens} needed (the longest length)")
    tokens = np.asarray(tokens, np.int32)
    return Haystack(path, tokens, sentence_starts(tokens, tok))


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Samples:
    """The prompts of one length (b = samples * depths, depth-major).

    prompts: int32 [b, length]. answer_ids: b int32 arrays, the tokens of `` {value}``.
    depths: float [b] requested depth; placed: float [b] where the needle went (haystack tokens
    before it / haystack tokens). needle_at: int [b] the needle's first token in the prompt;
    needle_len: int [b] its tokens. haystack_at: int [b] the haystack's first token in the prompt;
    haystack_len: int [b] its tokens (the needle not counted).
    """

    needle: str
    length: int
    prompts: np.ndarray
    keys: list[str]
    values: list[str]
    answer_ids: list[np.ndarray]
    depths: np.ndarray
    placed: np.ndarray
    needle_at: np.ndarray
    needle_len: np.ndarray
    haystack_at: np.ndarray
    haystack_len: np.ndarray


def depth_grid(depths: int) -> np.ndarray:
    """``depths`` evenly spaced depths in [0, 1] (0.5 alone for one)."""
    if isinstance(depths, bool) or not isinstance(depths, (int, np.integer)) or depths < 1:
        raise ValueError(f"depths must be an integer >= 1, got {depths!r}")
    return np.array([0.5]) if depths == 1 else np.linspace(0.0, 1.0, depths)


def build_samples(haystack: Haystack, tok: tokenizers.Tokenizer, length: int, needle: str = "passkey", *,
                  samples: int = 10, depths: int = 5, seed: int = 0) -> Samples:
    """``samples`` prompts per depth of :func:`depth_grid`, each exactly ``length`` tokens (see the
    module docstring). Deterministic in ``(seed, length)``."""
    check_needle(needle)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    shortest = min_length(tok, needle)
    if length < shortest:
        raise ValueError(f"length {length} is too short for needle {needle!r}: the instructions, needle and "
                         f"question take up to {shortest - MIN_HAYSTACK_TOKENS} tokens, so lengths must be "
                         f">= {shortest} (with {MIN_HAYSTACK_TOKENS} tokens of haystack)")
    grid = depth_grid(depths)
    rng = np.random.default_rng([seed, length])
    b = samples * len(grid)
    keys, values = _values(rng, needle, b)
    req = np.repeat(grid, samples)
    rows, answer_ids = [], []
    out = {k: np.zeros(b, np.int64) for k in ("needle_at", "needle_len", "haystack_at", "haystack_len")}
    placed = np.zeros(b)
    total = len(haystack.tokens)
    for i in range(b):
        t = templates(needle, keys[i], values[i])
        prefix, nd, question = (np.asarray(tok.encode(t[k]), np.int32)
                                for k in ("prefix", "needle", "question"))
        n_hay = length - len(prefix) - len(nd) - len(question)
        if n_hay < 1:
            raise ValueError(f"length {length} leaves no haystack for key {keys[i]!r} and value "
                             f"{values[i]!r}")
        if n_hay > total:
            raise ValueError(f"haystack {haystack.name} has {total} tokens, fewer than the {n_hay} length "
                             f"{length} needs")
        # a window of n_hay tokens starting at a random sentence start
        starts = haystack.starts[haystack.starts <= total - n_hay]
        s = int(rng.choice(starts))
        window = haystack.tokens[s:s + n_hay]
        # sentence boundaries in the window: its start, the sentence starts inside it, its end if one
        cuts = haystack.starts[(haystack.starts >= s) & (haystack.starts <= s + n_hay)] - s
        p = int(cuts[np.argmin(np.abs(cuts - req[i] * n_hay))])        # nearest to the requested depth
        rows.append(np.concatenate([prefix, window[:p], nd, window[p:], question]))
        answer_ids.append(np.asarray(tok.encode(t["answer"]), np.int32))
        placed[i] = p / n_hay
        out["needle_at"][i], out["needle_len"][i] = len(prefix) + p, len(nd)
        out["haystack_at"][i], out["haystack_len"][i] = len(prefix), n_hay
    prompts = np.stack(rows).astype(np.int32)
    assert prompts.shape == (b, length), prompts.shape
    return Samples(needle, length, prompts, keys, values, answer_ids, req, placed, **out)


# ------------------------------------------------------------------------------------------------
# the model: greedy decoding and answer log-likelihood
# ------------------------------------------------------------------------------------------------


class Runner:
    """A model's two jitted programs: :meth:`decode` (greedy, recurrent) and :meth:`answer_logprobs`
    (one forward). Each compiles once per shape."""

    def __init__(self, model):
        self.graphdef, self.state = nnx.split(model)
        gdef = self.graphdef

        @functools.partial(jax.jit, static_argnums=2)
        def _decode(state, prompts, steps):
            return generate(nnx.merge(gdef, state), prompts, steps)

        @jax.jit
        def _logprobs(state, inputs, positions, targets, mask):
            logits = nnx.merge(gdef, state)(inputs, positions)                       # [b, a, V]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [b, a]
            return jnp.sum(picked * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

        self._decode, self._logprobs = _decode, _logprobs

    def decode(self, prompts: np.ndarray, steps: int) -> np.ndarray:
        """Greedy continuation: int32 [b, steps] after ``prompts`` int32 [b, t] (one prefill, then the
        recurrent ``step``s)."""
        return np.asarray(self._decode(self.state, jnp.asarray(prompts, jnp.int32), int(steps)))

    def answer_logprobs(self, prompts: np.ndarray, answer_ids: Sequence[np.ndarray],
                        width: int | None = None) -> np.ndarray:
        """float [b]: mean log p(answer token | prompt, answer before it) over each answer's tokens,
        from one forward of ``prompts + answers``, the answers right-padded to ``width`` tokens
        (default: the longest; the model is causal, so the padding changes nothing before it)."""
        b, t = prompts.shape
        a = max(len(x) for x in answer_ids) if width is None else width
        answers = np.zeros((b, a), np.int32)
        mask = np.zeros((b, a), np.float32)
        for i, x in enumerate(answer_ids):
            answers[i, :len(x)], mask[i, :len(x)] = x, 1.0
        seq = np.concatenate([np.asarray(prompts, np.int32), answers], axis=1)   # [b, t + a]
        positions = np.broadcast_to(t - 1 + np.arange(a, dtype=np.int32), (b, a))  # predict answer tokens
        out = self._logprobs(self.state, jnp.asarray(seq[:, :-1]), jnp.asarray(positions),
                             jnp.asarray(answers), jnp.asarray(mask))
        return np.asarray(out, np.float64)


def decode_text(tok: tokenizers.Tokenizer, ids: np.ndarray) -> str:
    """Generated ids -> text: cut at the tokenizer's EOS, ids beyond its vocabulary dropped."""
    ids = np.asarray(ids).reshape(-1)
    if tok.eos_id is not None and (ids == tok.eos_id).any():
        ids = ids[:int(np.argmax(ids == tok.eos_id))]
    return tok.decode(ids[(ids >= 0) & (ids < tok.vocab_size)].astype(np.int32))


def string_match(predictions: Sequence[str], values: Sequence[str]) -> np.ndarray:
    """RULER's string match with one reference: bool [b], the value occurs in the prediction
    (case-insensitive)."""
    return np.array([v.lower() in p.lower() for p, v in zip(predictions, values, strict=True)], bool)


def _in_batches(fn, n: int, batch_size: int) -> np.ndarray:
    """``fn(rows)`` over ``range(n)`` in calls of ``batch_size`` rows (0: one call), the last call topped
    up with copies of its last row (one shape, one compile); the outputs concatenated, copies dropped."""
    if batch_size <= 0 or batch_size >= n:
        return np.asarray(fn(np.arange(n)))
    out = []
    for start in range(0, n, batch_size):
        rows = np.minimum(np.arange(start, start + batch_size), n - 1)
        out.append(np.asarray(fn(rows))[:min(batch_size, n - start)])
    return np.concatenate(out)


def score(runner, tok: tokenizers.Tokenizer, s: Samples, batch_size: int = 0) -> dict[str, Any]:
    """Decode and score one length's samples with ``runner`` (anything with ``decode(prompts, steps)``
    and ``answer_logprobs(prompts, answer_ids, width)``), ``batch_size`` prompts per call (0: all).
    Returns ``length, samples, accuracy, answer_logprob, by_depth`` and the per-prompt ``correct``
    [b], ``logprob`` [b], ``predictions``."""
    width = max(len(x) for x in s.answer_ids)
    steps = width + EXTRA_TOKENS
    b = len(s.prompts)
    generated = _in_batches(lambda rows: runner.decode(s.prompts[rows], steps), b, batch_size)
    predictions = [decode_text(tok, g) for g in generated]
    correct = string_match(predictions, s.values)
    logprob = _in_batches(
        lambda rows: runner.answer_logprobs(s.prompts[rows], [s.answer_ids[i] for i in rows], width),
        b, batch_size).astype(np.float64)
    by_depth = {}
    for d in np.unique(s.depths):
        sel = s.depths == d
        by_depth[f"{100 * d:g}"] = {"samples": int(sel.sum()), "accuracy": float(correct[sel].mean()),
                                    "answer_logprob": float(logprob[sel].mean())}
    return {"length": s.length, "samples": len(correct), "accuracy": float(correct.mean()),
            "answer_logprob": float(logprob.mean()), "by_depth": by_depth,
            "correct": correct, "logprob": logprob, "predictions": predictions}


# ------------------------------------------------------------------------------------------------
# the evaluation
# ------------------------------------------------------------------------------------------------


def _check_lengths(lengths: Sequence[int]) -> list[int]:
    if not lengths:
        raise ValueError("--lengths is empty; pass e.g. --lengths=512,1024,2048")
    out = []
    for n in lengths:
        try:
            n = int(n)
        except (TypeError, ValueError):
            raise ValueError(f"--lengths must be integers, got {n!r}") from None
        if n < 1:
            raise ValueError(f"--lengths must be >= 1, got {n}")
        out.append(n)
    return sorted(set(out))


def load_tokenizer(workdir: str) -> tokenizers.Tokenizer:
    """The run's tokenizer (:func:`experiments.train.run_tokenizer`: ``<workdir>/tokenizer``, else bytes)."""
    return train_lib.run_tokenizer(workdir)


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def evaluate(workdir: str, haystack: str, lengths: Sequence[int], *, needle: str = "passkey",
             samples: int = 10, depths: int = 5, seed: int = 0, step: int | None = None,
             output_dir: str | None = None, batch_size: int = 0, emit: Callable[[dict], None] | None = None,
             quiet: bool = True) -> list[dict]:
    """Evaluate the run in ``workdir`` (module docstring); returns the rows (one per length, then the
    summary), passing each to ``emit`` as soon as it is done, and writes ``niah.png``."""
    check_needle(needle)
    lengths = _check_lengths(lengths)
    grid = depth_grid(depths)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
        raise ValueError(f"--batch_size must be >= 0 (0: all prompts of a length at once), got "
                         f"{batch_size!r}")
    if haystack != NOISE and not os.path.exists(haystack):
        raise FileNotFoundError(f"haystack not found: {haystack} (expected 'noise', a text file or a corpus "
                                "directory written by experiments/prepare.py)")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"run directory not found: {workdir}")
    cfg, graphdef, params, rest, got = train_lib.load_run(workdir, step=step)
    if cfg.task == "mqar":
        raise ValueError(f"{workdir} is an MQAR run (its tokens are key / value ids of a "
                         f"{cfg.mqar_vocab}-token vocabulary, not text): niah_eval evaluates language-model "
                         "runs (charlm / niah / corpus)")
    tok = load_tokenizer(workdir)
    vocab = configs.task_vocab(cfg)
    if tok.vocab_size > vocab:
        raise ValueError(f"the run's tokenizer has {tok.vocab_size} tokens but its model only {vocab}")
    shortest = min_length(tok, needle)
    if lengths[0] < shortest:
        raise ValueError(f"length {lengths[0]} is too short for needle {needle!r}: the instructions, needle "
                         f"and question take up to {shortest - MIN_HAYSTACK_TOKENS} tokens of the run's "
                         f"tokenizer, so lengths must be >= {shortest}")
    hay = load_haystack(haystack, tok, lengths[-1])
    runner = Runner(train_lib.merge(graphdef, params, rest))
    ruler = ruler_task(needle, haystack)
    head = {"workdir": workdir, "step": int(got), "needle": needle, "haystack": haystack, "ruler": ruler}
    rows = []
    for length in lengths:
        t0 = time.perf_counter()
        s = build_samples(hay, tok, length, needle, samples=samples, depths=depths, seed=seed)
        r = score(runner, tok, s, batch_size)
        row = {**head, **{k: r[k] for k in ("length", "samples", "accuracy", "answer_logprob", "by_depth")}}
        rows.append(row)
        _say(f"niah_eval: length {length}: {row['samples']} prompts, accuracy {row['accuracy']:.3f}, answer "
             f"log-prob {row['answer_logprob']:.3f} ({time.perf_counter() - t0:.1f} s with compiling)", quiet)
        if emit is not None:
            emit(row)
    out_dir = output_dir or workdir
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, "niah.png")
    plot(rows, grid, png, f"{os.path.basename(os.path.normpath(workdir))} step {got}: {needle} in "
                          f"{'noise' if haystack == NOISE else os.path.basename(os.path.normpath(haystack))}")
    summary = {**head, "summary": True, "lengths": lengths, "samples": rows[0]["samples"],
               "accuracy": float(np.mean([r["accuracy"] for r in rows])),
               "answer_logprob": float(np.mean([r["answer_logprob"] for r in rows])), "plot": png}
    if emit is not None:
        emit(summary)
    return rows + [summary]


def plot(rows: list[dict], grid: np.ndarray, path: str, title: str) -> None:
    """Accuracy and answer log-likelihood vs length; the depth x length accuracy map (> 1 depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in rows]
    n = 3 if len(grid) > 1 else 2
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    axes[0].plot(lengths, [r["accuracy"] for r in rows], "o-")
    axes[0].set_ylim(-0.05, 1.05)
    axes[0].set_ylabel("accuracy (string match)")
    axes[1].plot(lengths, [r["answer_logprob"] for r in rows], "o-")
    axes[1].set_ylabel("answer log-likelihood / token (nats)")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
    if n == 3:
        keys = [f"{100 * d:g}" for d in grid]
        acc = np.array([[r["by_depth"][k]["accuracy"] for r in rows] for k in keys])   # [depths, lengths]
        im = axes[2].imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        axes[2].set_xticks(range(len(lengths)), [str(n) for n in lengths])
        axes[2].set_yticks(range(len(keys)), [f"{k}%" for k in keys])
        axes[2].set_xlabel("context length (tokens)")
        axes[2].set_ylabel("needle depth")
        for (j, i), v in np.ndenumerate(acc):
            axes[2].text(i, j, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=axes[2], label="accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def define_flags():
    """Command-line flags (defined only when run as a script, so modules import side-effect free)."""
    flags.DEFINE_string("workdir", None, "the run's directory (holds checkpoints/)", required=True)
    flags.DEFINE_string("haystack", None, "'noise', a text file or a corpus directory "
                        "(experiments/prepare.py)", required=True)
    flags.DEFINE_list("lengths", ["512", "1024", "2048"], "context lengths in tokens of the run's tokenizer")
    flags.DEFINE_enum("needle", "passkey", list(NEEDLES), "the S-NIAH variant (module docstring)")
    flags.DEFINE_integer("samples", 10, "prompts per depth and length")
    flags.DEFINE_integer("depths", 5, "needle depths, evenly spaced in [0, 1] (1: the middle)")
    flags.DEFINE_integer("seed", 0, "seed of the keys, values, haystack windows")
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest good one)")
    flags.DEFINE_string("output_dir", None, "where niah.png goes (default: the workdir)")
    flags.DEFINE_integer("batch_size", 0, "prompts per model call (0: all prompts of a length in one call); "
                         "lower it when a length's batch does not fit in memory")


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        evaluate(f.workdir, f.haystack, f.lengths, needle=f.needle, samples=f.samples, depths=f.depths,
                 seed=f.seed, step=f.step, output_dir=f.output_dir, batch_size=f.batch_size,
                 emit=lambda row: print(train_lib.dumps(row), flush=True), quiet=False)
    except (ValueError, FileNotFoundError, IsADirectoryError, train_lib.TrainingError, CheckpointError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
