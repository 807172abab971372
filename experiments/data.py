"""Data tasks for training and evaluation runs: MQAR, a byte-level corpus, needle-in-a-haystack.

Every batch is a dict of numpy arrays (axis letters: b batch, t tokens)::

    inputs  int32   [b, t]   token ids the model reads
    targets int32   [b, t]   next-token targets: the model reads inputs[:, :p + 1], predicts targets[:, p]
    mask    float32 [b, t]   1 where the target is scored, 0 elsewhere

Batches are pure functions of ``(seed, step)`` (``np.random.default_rng([seed, step])``), so the state
of a training run's data iterator is just the step number and resuming is exact (see
:class:`DataIterator` and, with ``grain`` installed, :func:`make_dataset`).

Tasks:

* :func:`mqar_batch` -- multi-query associative recall (Zoology), generated on the fly.
* :class:`ByteCorpus` -- byte-level language modelling on any text file (vocab 256, 90/10 split).
* :func:`niah_batch` -- single needle in a haystack (RULER S-NIAH style), byte level.
"""

from __future__ import annotations

import codecs
import gzip
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # grain is optional and imported lazily by make_dataset
    import grain

Batch = dict[str, Any]
BatchFn = Callable[[int, int], Batch]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_seed_step(seed: int, step: int) -> None:
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# 1. MQAR
# ----------------------------------------------------------------------------------------------------------


def mqar_batch(seed: int, step: int, *, batch: int, seq_len: int, vocab: int, num_pairs: int,
               query_power: float = 0.0, filler: str = "random") -> Batch:
    """Multi-query associative recall batch: ``inputs, targets`` int32 [b, t], ``mask`` float32 [b, t].

    Per sequence (t = seq_len, n = num_pairs, h = vocab // 2):

    * positions ``[0, 2n)``: ``k_1 v_1 k_2 v_2 ... k_n v_n`` with distinct keys from ``[1, h)`` and
      distinct values from ``[h, vocab)``;
    * positions ``[2n, t)``: noise tokens uniform in ``[1, vocab)`` (token 0 is reserved), except that
      every key is queried once, in random order, at distinct random positions in ``[2n, t - 1)``;
    * at a query position p (``inputs[p] = k_i``): ``targets[p] = v_i`` and ``mask[p] = 1``; everywhere
      else ``targets = 0`` and ``mask = 0``. Exactly n positions per row are scored.

    ``query_power = a``: 0 places the queries uniformly as above; ``a`` in ``(0, 1]`` places them as
    Zoology does, at the even offsets ``2 g`` after the pairs (``g < (t - 2n) / 2``), drawn without
    replacement with weights ``(g + 1)^(a - 1)`` (``a = 0.01``: Zoology's default power law, most
    queries soon after the pairs; ``a = 1``: uniform over the even offsets).

    ``filler``: what fills the non-query positions after the pairs: ``"random"`` (uniform in
    ``[1, vocab)``, as above; noise keys can repeat a pair's key: Zoology's ``multiquery_ar`` default,
    ``random_non_queries=True``, which draws from ``[0, vocab)``) or ``"zero"`` (the reserved token 0:
    ``random_non_queries=False``, the easier variant that Zoology's Figure-2 sweep sets).

    Deterministic in ``(seed, step)``.
    """
    _check_seed_step(seed, step)
    _check_positive(batch=batch, seq_len=seq_len, num_pairs=num_pairs)
    _check_filler(filler)
    if isinstance(vocab, bool) or not isinstance(vocab, (int, np.integer)) or vocab < 4:
        raise ValueError(f"vocab must be an integer >= 4, got {vocab!r}")
    half = vocab // 2
    if half - 1 < num_pairs:
        raise ValueError(f"num_pairs={num_pairs} needs that many distinct keys, but the key half [1, "
                         f"{half}) of vocab={vocab} holds only {half - 1}; use vocab >= {2 * num_pairs + 2}")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len must be >= 4 * num_pairs = {4 * num_pairs} (room for the pairs and the "
                         f"queries), got seq_len={seq_len}")
    _check_query_power(query_power)
    rng = np.random.default_rng([seed, step])
    return _mqar_rows(rng, batch, seq_len, vocab, num_pairs, query_power, filler)


FILLERS = ("random", "zero")


def _check_filler(filler) -> None:
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")


def _check_query_power(a) -> None:
    if not (a == 0.0 or 0.0 < a <= 1.0):
        raise ValueError(f"query_power must be 0 (uniform positions) or in (0, 1] (power law), got {a!r}")


def _query_positions(rng: np.random.Generator, b: int, seq_len: int, n: int, power: float) -> np.ndarray:
    """``[b, n]`` distinct query positions in ``[2n, seq_len - 1)`` (see :func:`mqar_batch`)."""
    if power == 0.0:
        return rng.permuted(np.tile(np.arange(2 * n, seq_len - 1), (b, 1)), axis=1)[:, :n]
    slots = (seq_len - 2 * n) // 2  # offsets 2g with 2n + 2g <= seq_len - 2
    log_w = (power - 1.0) * np.log1p(np.arange(slots))
    # weighted sampling without replacement = the n largest of log w + Gumbel noise
    g = np.argsort(-(log_w + rng.gumbel(size=(b, slots))), axis=1)[:, :n]
    return 2 * n + 2 * g


def mqar_mixed_batch(seed: int, step: int, *, batch: int, seq_len: int, vocab: int,
                     pairs: tuple[int, ...], query_power: float = 0.0, filler: str = "random") -> Batch:
    """MQAR batch whose rows draw their number of pairs uniformly from ``pairs`` (Zoology-style mixed
    training: short problems teach the write/read mechanism that long ones use). Row format as
    :func:`mqar_batch` (``query_power`` and ``filler`` too); a row with n pairs scores n positions.
    Deterministic in ``(seed, step)``."""
    pairs = tuple(pairs)
    if not pairs:
        raise ValueError("pairs must name at least one number of key-value pairs")
    for n in pairs:
        mqar_batch(0, 0, batch=1, seq_len=seq_len, vocab=vocab, num_pairs=n)  # validates each n
    _check_seed_step(seed, step)
    _check_positive(batch=batch)
    rng = np.random.default_rng([seed, step, 1])
    counts = rng.multinomial(batch, [1 / len(pairs)] * len(pairs))
    _check_query_power(query_power)
    _check_filler(filler)
    parts = [_mqar_rows(rng, c, seq_len, vocab, n, query_power, filler)
             for n, c in zip(pairs, counts, strict=True) if c]
    order = rng.permutation(batch)
    return {k: np.concatenate([p[k] for p in parts])[order] for k in ("inputs", "targets", "mask")}


def _mqar_rows(rng: np.random.Generator, b: int, seq_len: int, vocab: int, n: int, power: float,
               filler: str) -> Batch:
    half = vocab // 2
    keys = rng.permuted(np.tile(np.arange(1, half), (b, 1)), axis=1)[:, :n]             # [b, n]
    values = rng.permuted(np.tile(np.arange(half, vocab), (b, 1)), axis=1)[:, :n]       # [b, n]
    query_pos = _query_positions(rng, b, seq_len, n, power)                             # [b, n]

    # drawn either way, so the rows after these (mixed batches share rng) are the same for both fillers
    inputs = rng.integers(1, vocab, size=(b, seq_len))
    if filler == "zero":
        inputs[:] = 0
    inputs[:, 0:2 * n:2] = keys
    inputs[:, 1:2 * n:2] = values
    rows = np.arange(b)[:, None]
    inputs[rows, query_pos] = keys
    targets = np.zeros((b, seq_len), np.int32)
    targets[rows, query_pos] = values
    mask = np.zeros((b, seq_len), np.float32)
    mask[rows, query_pos] = 1.0
    return {"inputs": inputs.astype(np.int32), "targets": targets, "mask": mask}


# ----------------------------------------------------------------------------------------------------------
# 2. Byte-level corpus
# ----------------------------------------------------------------------------------------------------------

_BINARY_HEAD = 64 * 1024
_TEXT_BYTES = np.zeros(256, bool)
_TEXT_BYTES[32:127] = True
_TEXT_BYTES[[9, 10, 11, 12, 13]] = True  # \t \n \v \f \r


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 token ids [t]."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens: Any) -> str:
    """Byte token ids (any int array-like [t], values in [0, 256)) -> str, invalid UTF-8 replaced."""
    arr = np.asarray(tokens).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"byte tokens must lie in [0, 256), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _looks_binary(data: bytes) -> bool:
    """NUL bytes anywhere, or > 30% non-text bytes in the first 64 KiB that are not valid UTF-8."""
    if b"\x00" in data:
        return True
    head = data[:_BINARY_HEAD]
    non_text = np.count_nonzero(~_TEXT_BYTES[np.frombuffer(head, np.uint8)])
    if non_text <= 0.3 * len(head):
        return False
    try:  # a cut multi-byte character at the end of the head is fine
        codecs.getincrementaldecoder("utf-8")().decode(head, final=len(data) <= _BINARY_HEAD)
    except UnicodeDecodeError:
        return True
    return False


class ByteCorpus:
    """Byte-level language-modelling corpus (vocab 256): ``train`` and ``val`` uint8 arrays.

    Build it with :meth:`from_file` (or :meth:`from_bytes`); train is the first ``1 - val_fraction`` of
    the bytes and val the rest (nanoGPT's 90/10 split by default).
    """

    vocab_size = 256
    encode = staticmethod(encode)
    decode = staticmethod(decode)

    def __init__(self, train: np.ndarray, val: np.ndarray, name: str = "<bytes>"):
        self.train = np.asarray(train, np.uint8)
        self.val = np.asarray(val, np.uint8)
        self.name = name

    def __repr__(self) -> str:
        return f"ByteCorpus({self.name!r}, train={len(self.train)} bytes, val={len(self.val)} bytes)"

    @classmethod
    def from_bytes(cls, data: bytes, val_fraction: float = 0.1, name: str = "<bytes>") -> ByteCorpus:
        """Split text ``data`` into train (first ``1 - val_fraction``) and val (the rest)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
        if not data:
            raise ValueError(f"corpus {name} is empty")
        if _looks_binary(data):
            raise ValueError(f"corpus {name} looks binary (NUL bytes, or mostly non-text bytes that are not "
                             "valid UTF-8); pass a text file")
        arr = np.frombuffer(data, np.uint8)
        n_train = int(len(arr) * (1.0 - val_fraction))
        if n_train == 0 or n_train == len(arr):
            raise ValueError(f"corpus {name} ({len(arr)} bytes) is too small for val_fraction="
                             f"{val_fraction}: the {'train' if n_train == 0 else 'val'} split would be empty")
        return cls(arr[:n_train], arr[n_train:], name)

    @classmethod
    def from_file(cls, path: str | os.PathLike, val_fraction: float = 0.1) -> ByteCorpus:
        """Read a text file's bytes (gzip-compressed files, e.g. the shipped ``data/tinyshakespeare.txt.gz``,
        are decompressed) and split them (see :meth:`from_bytes`)."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"corpus path is a directory, not a text file: {path}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"corpus file not found: {path}")
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":  # the gzip magic number
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as e:
                raise ValueError(f"corpus {path} is a corrupt gzip file ({e})") from None
        return cls.from_bytes(data, val_fraction, name=path)

    def split(self, split: str) -> np.ndarray:
        """The uint8 bytes of split ``"train"`` or ``"val"``."""
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"unknown split {split!r}; valid splits: 'train', 'val'")

    def _windows(self, split: str, seq_len: int) -> np.ndarray:
        data = self.split(split)
        if len(data) < seq_len + 1:
            raise ValueError(f"{split} split of {self.name} has {len(data)} bytes, too short for seq_len="
                             f"{seq_len} (needs >= seq_len + 1 = {seq_len + 1})")
        return data

    def batch(self, seed: int, step: int, *, batch: int, seq_len: int, split: str = "train") -> Batch:
        """Random windows: ``inputs, targets`` int32 [b, t] with ``targets[:, p] = inputs[:, p + 1]``
        (windows of t + 1 bytes at uniform random offsets), ``mask`` float32 ones [b, t].

        Deterministic in ``(seed, step, split)``.
        """
        _check_seed_step(seed, step)
        _check_positive(batch=batch, seq_len=seq_len)
        data = self._windows(split, seq_len)
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        offsets = rng.integers(0, len(data) - seq_len, size=batch)                       # [b]
        win = data[offsets[:, None] + np.arange(seq_len + 1)].astype(np.int32)           # [b, t + 1]
        return {"inputs": win[:, :-1], "targets": win[:, 1:], "mask": np.ones((batch, seq_len), np.float32)}

    def num_eval_batches(self, *, batch: int, seq_len: int, split: str = "val") -> int:
        """Number of full batches :meth:`eval_batches` yields without ``max_batches``."""
        _check_positive(batch=batch, seq_len=seq_len)
        return (len(self._windows(split, seq_len)) - 1) // seq_len // batch

    def eval_batches(self, *, batch: int, seq_len: int, split: str = "val",
                     max_batches: int | None = None) -> Iterator[Batch]:
        """Deterministic in-order pass over ``split``: window w reads bytes ``[w t, (w + 1) t]`` (inputs
        ``[w t, (w + 1) t)``, targets shifted by one), so every byte after the first is scored once; the
        windows are grouped into batches of ``batch`` and the last partial batch is dropped.
        Yields dicts like :meth:`batch` (``mask`` all ones).
        """
        n = self.num_eval_batches(batch=batch, seq_len=seq_len, split=split)
        if n == 0:
            raise ValueError(f"{split} split of {self.name} has {len(self.split(split))} bytes: fewer than "
                             f"one full batch of {batch} windows of seq_len={seq_len}")
        if max_batches is not None:
            _check_positive(max_batches=max_batches)
            n = min(n, max_batches)
        return self._eval_iter(self.split(split), n, batch, seq_len)

    @staticmethod
    def _eval_iter(data: np.ndarray, n: int, batch: int, seq_len: int) -> Iterator[Batch]:
        idx = np.arange(batch)[:, None] * seq_len + np.arange(seq_len + 1)                # [b, t + 1]
        for i in range(n):
            win = data[i * batch * seq_len + idx].astype(np.int32)                        # [b, t + 1]
            mask = np.ones((batch, seq_len), np.float32)
            yield {"inputs": win[:, :-1], "targets": win[:, 1:], "mask": mask}


# ----------------------------------------------------------------------------------------------------------
# 3. Single needle in a haystack
# ----------------------------------------------------------------------------------------------------------

NOISE_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# kind -> (needle template, query, longest answer in bytes)
_NEEDLES = {
    "passkey": ("The pass key is {}. Remember it. {} is the pass key. ",
                "What is the pass key? The pass key is ", 5),
    "number": ("The special magic number is {}. ",
               "What is the special magic number? The special magic number is ", 7),
    "word": ("The special magic word is {}. ",
             "What is the special magic word? The special magic word is ", 8),
}
HAYSTACKS = ("noise", "text")


def _answer(rng: np.random.Generator, needle: str) -> str:
    if needle == "passkey":
        return str(rng.integers(10_000, 100_000))
    if needle == "number":
        return str(rng.integers(1_000_000, 10_000_000))
    letters = rng.integers(ord("a"), ord("z") + 1, size=rng.integers(5, 9))
    return bytes(letters.astype(np.uint8)).decode()


def niah_min_seq_len(needle: str = "passkey") -> int:
    """Smallest seq_len :func:`niah_batch` accepts: 2 * (longest needle + query) bytes."""
    if needle not in _NEEDLES:
        raise ValueError(f"unknown needle {needle!r}; valid needles: {', '.join(_NEEDLES)}")
    template, query, longest = _NEEDLES[needle]
    return 2 * (len(template.format("x" * longest, "x" * longest)) + len(query))


def niah_batch(seed: int, step: int, *, batch: int, seq_len: int, needle: str = "passkey",
               haystack: str = "noise", corpus: ByteCorpus | None = None) -> Batch:
    """Single needle in a haystack, bytes: ``inputs, targets`` int32 [b, t], ``mask`` float32 [b, t],
    ``answers`` (list of b str) and ``depths`` float32 [b] (needle offset / haystack length, in [0, 1]).

    Each row is built from a byte string s of length t + 1::

        s = haystack[:d] + needle_text + haystack[d:] + query + answer + "."

    e.g. needle_text = "The pass key is 48213. Remember it. 48213 is the pass key. ", query = "What is the
    pass key? The pass key is ", answer = "48213". ``inputs = s[:-1]``, ``targets = s[1:]``, and
    ``mask = 1`` exactly on the ``len(answer)`` positions whose target is an answer byte (the last
    ``len(answer) + 1`` input positions except the final one). A row is solved when every masked target
    is predicted, under teacher forcing or greedily from the prompt ``inputs[i, :a + 1]`` with ``a`` the
    first masked position.

    needle: ``"passkey"`` (5-digit number), ``"number"`` (7-digit number) or ``"word"`` (5-8 random
    lowercase letters). haystack: ``"noise"`` (the repeated filler sentence of the pass-key papers; the
    needle goes at a sentence boundary) or ``"text"`` (a random contiguous slice of ``corpus.train``; the
    needle goes at any byte). Deterministic in ``(seed, step)``.
    """
    _check_seed_step(seed, step)
    _check_positive(batch=batch, seq_len=seq_len)
    min_len = niah_min_seq_len(needle)
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; valid haystacks: {', '.join(HAYSTACKS)}")
    if haystack == "text" and corpus is None:
        raise ValueError("haystack='text' needs a corpus (a ByteCorpus whose train bytes form the haystack)")
    if seq_len < min_len:
        raise ValueError(f"seq_len={seq_len} is too short for needle={needle!r}: it must be >= {min_len} "
                         "(2 * (needle + query bytes))")
    template, query, _ = _NEEDLES[needle]
    rng = np.random.default_rng([seed, step])
    rows, answers, depths = [], [], []
    for _ in range(batch):
        answer = _answer(rng, needle)
        needle_b = template.format(answer, answer).encode()
        tail = (query + answer + ".").encode()
        hay_len = seq_len + 1 - len(needle_b) - len(tail)                                  # > 0 by min_len
        if haystack == "noise":
            hay = (NOISE_FILLER * (hay_len // len(NOISE_FILLER) + 1)).encode()[:hay_len]
            arr = np.frombuffer(hay, np.uint8)
            cuts = np.flatnonzero((arr[:-1] == ord(".")) & (arr[1:] == ord(" "))) + 2   # sentence starts
            depth = int(rng.choice(np.concatenate([[0], cuts])))
        else:
            train = corpus.train
            if len(train) < hay_len:
                raise ValueError(f"corpus train split has {len(train)} bytes, fewer than the {hay_len} "
                                 f"haystack bytes seq_len={seq_len} needs")
            start = int(rng.integers(0, len(train) - hay_len + 1))
            hay = train[start:start + hay_len].tobytes()
            depth = int(rng.integers(0, hay_len + 1))
        s = np.frombuffer(hay[:depth] + needle_b + hay[depth:] + tail, np.uint8)
        rows.append(s)
        answers.append(answer)
        depths.append(depth / hay_len)
    seqs = np.stack(rows).astype(np.int32)                                                # [b, t + 1]
    mask = np.zeros((batch, seq_len), np.float32)
    for i, answer in enumerate(answers):
        mask[i, seq_len - 1 - len(answer):seq_len - 1] = 1.0
    return {"inputs": seqs[:, :-1], "targets": seqs[:, 1:], "mask": mask, "answers": answers,
            "depths": np.asarray(depths, np.float32)}


# ----------------------------------------------------------------------------------------------------------
# 4. Iterators with an exact, checkpointable position
# ----------------------------------------------------------------------------------------------------------


class DataIterator:
    """``next(it)`` is ``batch_fn(seed, step)`` with step = 0, 1, 2, ...; the state is just the step.

    ``batch_fn`` is any ``(seed, step) -> batch`` function, e.g.
    ``functools.partial(mqar_batch, batch=64, seq_len=256, vocab=8192, num_pairs=16)``. Save
    :meth:`get_state` with a checkpoint and :meth:`set_state` it on restore: the following batches are
    exactly those of the uninterrupted run.
    """

    def __init__(self, batch_fn: BatchFn, seed: int, *, step: int = 0):
        _check_seed_step(seed, step)
        self.batch_fn, self.seed, self.step = batch_fn, seed, step

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> Batch:
        out = self.batch_fn(self.seed, self.step)
        self.step += 1
        return out

    def get_state(self) -> dict[str, int]:
        """``{"step": int}``: the step of the next batch."""
        return {"step": int(self.step)}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`get_state` dict."""
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"state must be a dict with key 'step' (from get_state()), got {state!r}")
        step = state["step"]
        if isinstance(step, np.ndarray) and step.ndim == 0:  # restored checkpoints may hold 0-d arrays
            step = step.item()
        _check_seed_step(self.seed, step)
        self.step = int(step)


def host_rows(batch: Batch, index: int, count: int) -> Batch:
    """Host ``index``'s rows of a global batch (``count`` hosts, contiguous equal blocks of rows): what
    one process of a multi-host run feeds to ``jax.make_array_from_process_local_data``."""
    if not 0 <= index < count:
        raise ValueError(f"host index must be in [0, {count}), got {index}")
    out = {}
    for key, x in batch.items():
        x = np.asarray(x)
        if x.shape[0] % count:
            raise ValueError(f"batch of {x.shape[0]} rows ({key!r}) cannot be split over {count} hosts")
        rows = x.shape[0] // count
        out[key] = x[index * rows:(index + 1) * rows]
    return out


def make_dataset(batch_fn: BatchFn, seed: int, num_steps: int | None = None,
                 shard: tuple[int, int] | None = None) -> grain.MapDataset:
    """``grain.MapDataset`` whose item ``step`` is ``batch_fn(seed, step)``, for steps
    ``[0, num_steps)`` (default: effectively unbounded). Random access, so ``ds[step]`` resumes anywhere;
    ``ds.to_iter_dataset()`` gives grain's own checkpointable iterator. ``shard=(index, count)``:
    each item is host ``index``'s rows of the global batch (``host_rows``; e.g.
    ``(jax.process_index(), jax.process_count())``).
    """
    try:
        import grain
    except ImportError as e:
        raise ImportError("make_dataset needs the optional dependency grain (pip install grain); "
                          "DataIterator works without it") from e
    _check_seed_step(seed, 0)
    if num_steps is None:
        num_steps = sys.maxsize
    _check_positive(num_steps=num_steps)
    ds = grain.MapDataset.range(num_steps).map(lambda step: batch_fn(seed, int(step)))
    if shard is not None:
        ds = ds.map(lambda b: host_rows(b, *shard))
    return ds
