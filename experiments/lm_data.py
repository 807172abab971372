"""Packed language-modelling rows from a tokenized corpus (``experiments/prepare.py``), with grain.

Input: a directory with ``meta.json`` (format ``miras_jax.tokens/1``) and ArrayRecord shards
``<split>-<i:05d>-of-<n:05d>.array_record``, one record per document (its token ids as little-endian
``uint16`` / ``uint32`` bytes).

Every batch is a dict of numpy arrays (axis letters: b batch, t tokens, t = seq_len)::

    inputs            int32   [b, t]   token ids the model reads (0 on padding)
    targets           int32   [b, t]   next token of the same document (0 on padding)
    segment_ids       int32   [b, t]   documents 1, 2, ... within the row, 0 = padding
    segment_positions int32   [b, t]   position of the token within its document piece (0 on padding)
    mask              float32 [b, t]   segment_ids != 0: the scored targets (see :func:`loss_mask`)

A document ``d`` of n tokens contributes ``inputs = d[:-1]``, ``targets = d[1:]`` (n - 1 targets;
documents with n < 2 are dropped). A document longer than ``seq_len + 1`` tokens is cut into pieces of
at most ``seq_len + 1`` tokens overlapping by one, so every token but the first is a target exactly
once per epoch; each piece is its own document (segment id) in its row, and restarts the memory. With
``align = C`` every document of a row starts at a multiple of C (the pads between have segment id 0).

``segment_positions`` is not named ``positions`` on purpose: ``experiments/train.py`` reads a batch's
``positions`` as the scored positions ``[b, n]`` at which the model computes logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from absl import flags

FORMAT = "miras_jax.tokens/1"
DTYPES = ("uint16", "uint32")
PAD = 0

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# 1. The corpus on disk
# ----------------------------------------------------------------------------------------------------------


def load_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """``meta.json`` of a tokenized corpus, checked: the format string, the dtype, the vocabulary and
    every split's shard files. ``FileNotFoundError`` / ``ValueError`` naming the path otherwise."""
    directory = os.fspath(directory)
    path = os.path.join(directory, "meta.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"tokenized corpus directory not found: {directory}")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(directory, "prepare_config.json")):
            raise FileNotFoundError(f"{path} not found: the preparation of {directory} has not finished "
                                    "(rerun the same experiments.prepare command)")
        raise FileNotFoundError(f"no meta.json in {directory}: is it a directory written by "
                                "experiments/prepare.py?")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("dtype") not in DTYPES:
        raise ValueError(f"{path} has dtype {meta.get('dtype')!r}, expected one of {DTYPES}")
    vocab = meta.get("vocab_size")
    top = np.iinfo(meta["dtype"]).max + 1
    if isinstance(vocab, bool) or not isinstance(vocab, int) or not 0 < vocab <= top:
        raise ValueError(f"{path} has vocab_size {vocab!r}, expected an integer in [1, {top}] for "
                         f"dtype {meta['dtype']}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{path} has no 'splits' object (split name -> {{'shards': [...], ...}})")
    for name, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not shards or not all(isinstance(s, str) for s in shards):
            raise ValueError(f"{path}: split {name!r} must list its shard file names in 'shards'")
        for shard in shards:
            if not os.path.isfile(os.path.join(directory, shard)):
                raise FileNotFoundError(f"shard {shard!r} of split {name!r} listed in {path} is missing: "
                                        f"{os.path.join(directory, shard)}")
    return meta


def _split_paths(directory: str, meta: dict, split: str) -> list[str]:
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r} in {directory}; valid splits: {', '.join(meta['splits'])}")
    return [os.path.join(directory, s) for s in meta["splits"][split]["shards"]]


class _Decode(grain.transforms.Map):
    """ArrayRecord bytes -> int32 token ids [n]."""

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype).newbyteorder("<")

    def map(self, record: bytes) -> np.ndarray:
        return np.frombuffer(record, self.dtype).astype(np.int32)


def documents(directory: str | os.PathLike, split: str) -> grain.MapDataset:
    """The documents of ``split`` in file order: a ``grain.MapDataset`` of int32 token ids [n]."""
    directory = os.fspath(directory)
    meta = load_meta(directory)
    source = grain.sources.ArrayRecordDataSource(_split_paths(directory, meta, split))
    return grain.MapDataset.source(source).map(_Decode(meta["dtype"]))


# ----------------------------------------------------------------------------------------------------------
# 2. Packed rows
# ----------------------------------------------------------------------------------------------------------


class _Pieces(grain.experimental.FlatMapTransform):
    """A document [n] -> its pieces ``{"inputs": [l], "targets": [l]}`` with l <= piece_len: piece k
    reads tokens ``[k L, (k + 1) L]`` (L = piece_len), so consecutive pieces share one token and every
    token but the first is a target once. Documents of fewer than 2 tokens give no piece."""

    max_fan_out = 1  # unused by grain's FlatMapIterDataset (documents can be arbitrarily long)

    def __init__(self, piece_len: int):
        self.piece_len = piece_len

    def flat_map(self, doc: np.ndarray) -> list[dict[str, np.ndarray]]:
        L, n = self.piece_len, len(doc)
        # piece at s: inputs doc[s : s + L], targets doc[s + 1 : s + L + 1], cut at the document's end
        return [{"inputs": doc[s:min(s + L, n - 1)], "targets": doc[s + 1:s + L + 1]}
                for s in range(0, n - 1, L)]


def _row(packed: dict[str, np.ndarray]) -> Batch:
    """grain's packer output (``inputs``, ``targets`` and their ``*_segment_ids``, ``*_positions``) ->
    one row of the batch contract."""
    seg = packed["inputs_segment_ids"]
    return {"inputs": packed["inputs"], "targets": packed["targets"], "segment_ids": seg,
            "segment_positions": packed["inputs_positions"], "mask": (seg != PAD).astype(np.float32)}


class _Stack:
    """Rows -> a batch of exactly ``batch_size`` rows: a short last batch (finite epochs) is topped up
    with empty rows (all padding), so the shapes never change."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, rows) -> Batch:
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        missing = self.batch_size - len(rows)
        if missing:
            out = {k: np.concatenate([x, np.zeros((missing, *x.shape[1:]), x.dtype)]) for k, x in out.items()}
        return out


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_shard(shard) -> tuple[int, int]:
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (index, count), got {shard!r}") from None
    count = _check_int("shard count", count, 1)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < count:
        raise ValueError(f"shard index must be an integer in [0, {count}), got {index!r}")
    return int(index), count


def _seed32(seed: int, stream: int) -> int:
    """A 32-bit seed for one of the pipeline's random streams. grain shuffles epoch e with seed + e, so
    user seeds s and s + 1 must not map to neighbouring grain seeds."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def packed_dataset(directory: str | os.PathLike, split: str, *, seq_len: int, batch_size: int, seed: int,
                   shard: tuple[int, int] = (0, 1), num_epochs: int | None = None, shuffle: bool = True,
                   align: int = 0, num_packing_bins: int | None = None, worker_count: int = 0,
                   worker_buffer_size: int = 1) -> grain.IterDataset:
    """Packed training batches (see the module docstring for the batch contract) as a grain
    ``IterDataset``; ``iter(ds)`` is checkpointable with ``get_state()`` / ``set_state()`` (the state is
    a JSON-serialisable dict).

    Pipeline: documents ``[index::count]`` (this host's share, disjoint over hosts) -> shuffle with
    ``seed`` (a new order each epoch) -> repeat ``num_epochs`` times (None: forever) -> pieces of at most
    ``seq_len`` targets -> first-fit packing into ``num_packing_bins`` rows of ``seq_len`` (default
    ``batch_size``; rows of a packed group are shuffled) -> batches of ``batch_size`` rows. With finite
    epochs the last batch is topped up with empty rows. Pieces of consecutive epochs can share a packed
    group when repeating.

    Args:
      directory: a tokenized corpus (``meta.json`` + ArrayRecord shards).
      split: a split named in ``meta.json``, e.g. ``"train"``.
      seq_len: t, the row length (>= 2).
      batch_size: b, rows per batch (this host's rows).
      seed: a non-negative integer; same seed, same batches.
      shard: ``(index, count)``: this host's share of the documents, e.g.
        ``(jax.process_index(), jax.process_count())``.
      num_epochs: passes over the documents; None repeats forever.
      shuffle: shuffle the documents (and the rows of each packed group); False keeps file order.
      align: C > 0 starts every document of a row at a multiple of C (``1 <= C <= seq_len``); 0 or 1
        packs tightly.
      num_packing_bins: rows the first-fit packer fills at once (more rows, less padding).
      worker_count: grain worker processes (``mp_prefetch``); 0 runs in this process. The batches
        depend on the worker count (each worker packs its own share of the documents) but not on
        anything else.
      worker_buffer_size: batches each worker prefetches.
    """
    seq_len = _check_int("seq_len", seq_len, 2)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    index, count = _check_shard(shard)
    if num_epochs is not None:
        num_epochs = _check_int("num_epochs", num_epochs, 1)
    align = _check_int("align", align, 0)
    if align > seq_len:
        raise ValueError(f"align={align} must be at most seq_len={seq_len} (documents start at multiples of "
                         "align within a row of seq_len tokens); use 0 for no alignment")
    bins = batch_size if num_packing_bins is None else _check_int("num_packing_bins", num_packing_bins, 1)
    worker_count = _check_int("worker_count", worker_count, 0)
    worker_buffer_size = _check_int("worker_buffer_size", worker_buffer_size, 1)

    docs = documents(directory, split)
    if len(docs) <= index:
        raise ValueError(f"split {split!r} of {os.fspath(directory)} has {len(docs)} documents: none "
                         f"left for host {index} of {count}")
    docs = docs[index::count]
    if shuffle:
        docs = docs.shuffle(seed=_seed32(seed, 0))
    docs = docs.repeat(num_epochs)

    ds = grain.experimental.FlatMapIterDataset(docs.to_iter_dataset(), _Pieces(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len}
    # grain's packer pads every element's end up to a multiple of its alignment: the next document of
    # the row starts there, and the cells in between keep segment id 0 and value 0.
    alignment = {"inputs": align, "targets": align} if align > 1 else None
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=bins,
                                                    seed=_seed32(seed, 1), shuffle_bins=shuffle,
                                                    pack_alignment_struct=alignment)
    ds = ds.map(_row).batch(batch_size, batch_fn=_Stack(batch_size))
    if worker_count:
        # grain 0.2.18 reads an absl flag when it starts a worker, which fails outside absl.app (tests,
        # notebooks) unless the flags count as parsed; absl.app parses the command line anyway.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count,
                                                         per_worker_buffer_size=worker_buffer_size))
    return ds


def loss_mask(batch: Batch) -> np.ndarray:
    """float32 [b, t]: 1 where ``targets`` is scored (``segment_ids != 0``), 0 on padding. The batches
    carry it as ``mask`` already (the convention of ``experiments/data.py``)."""
    return (np.asarray(batch["segment_ids"]) != PAD).astype(np.float32)


def eval_rows(directory: str | os.PathLike, split: str, *, seq_len: int, batch_size: int,
              max_batches: int | None = None, shard: tuple[int, int] = (0, 1),
              align: int = 0) -> Iterator[tuple[Batch, int]]:
    """One deterministic pass over ``split`` for validation: ``(batch, target_tokens)`` pairs.

    The batches are packed as in :func:`packed_dataset` (same contract, so the model sees documents as in
    training), without shuffling, in file order, one epoch; the last batch is topped up with empty
    rows. ``target_tokens`` is the batch's number of scored targets (``mask.sum()``), so over the pass
    ``perplexity = exp(sum of per-batch summed losses / sum of target_tokens)``. Without
    ``max_batches`` every target of the split is scored exactly once. ``shard`` splits the documents
    over hosts as in training (sum the loss and token counts over hosts; hosts can get different
    numbers of batches, so a multi-host evaluation needs ``max_batches`` or its own padding).
    """
    if max_batches is not None:
        max_batches = _check_int("max_batches", max_batches, 1)
    ds = packed_dataset(directory, split, seq_len=seq_len, batch_size=batch_size, seed=0, shard=shard,
                        num_epochs=1, shuffle=False, align=align)
    return _eval_iter(ds, max_batches)


def _eval_iter(ds: grain.IterDataset, max_batches: int | None) -> Iterator[tuple[Batch, int]]:
    for i, batch in enumerate(ds):
        if max_batches is not None and i >= max_batches:
            return
        yield batch, int(np.count_nonzero(batch["segment_ids"]))
