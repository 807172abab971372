"""Prepare a tokenized corpus: text / JSONL / Parquet files -> ArrayRecord shards of token ids.

    python -m experiments.prepare --inputs='corpus/*.jsonl.gz' --tokenizer=bpe:32768 --output=corpora/web
    python -m experiments.prepare --inputs=data/tinyshakespeare.txt.gz --text_unit=paragraph \\
        --tokenizer=bytes --output=corpora/shakespeare --num_shards=2
    python -m experiments.prepare ... --max_docs=1000      # a quick run on the first 1000 documents

Inputs (``--inputs``: comma-separated globs, expanded and sorted): ``text`` files (one document per
file, or per blank-line-separated paragraph with ``--text_unit=paragraph``), ``jsonl`` (one JSON object
per line, the document in ``--field``) and ``parquet`` (column ``--field``); text and JSONL may be
gzip-compressed. ``--format=auto`` goes by the extension (``.txt .text .md .rst``, ``.jsonl .json
.ndjson``, each optionally ``.gz``; ``.parquet``). A document is ``(source, index, text)``: its file as
expanded from the glob, its index in that file (text: 0, or the paragraph number; JSONL: the 0-based
line number; Parquet: the row number) and its text.

``--tokenizer``: ``bytes``, a ``tokenizer.json`` / SentencePiece ``.model`` / saved tokenizer
directory (:func:`experiments.tokenizer.load`), or ``bpe:<vocab>``: train a byte-level BPE of that
vocabulary on the training documents first (streaming).

Output directory, format ``miras_jax.tokens/1``::

    meta.json                 written LAST, atomically: its presence means the corpus is complete
    prepare_config.json       the flags (and input files' sizes), written FIRST: a rerun must match
    tokenizer/                the tokenizer (experiments.tokenizer.Tokenizer.save; load it from here)
    train-00000-of-00008.array_record, ..., validation-00000-of-00001.array_record
    shard_stats/<shard>.json  per-shard counts (restarts add up finished shards from these)

``meta.json``::

    {"format": "miras_jax.tokens/1", "vocab_size": int, "dtype": "uint16" | "uint32",
     "eos_id": int | null, "tokenizer": "tokenizer",
     "splits": {"train":      {"shards": [file names], "documents": int, "tokens": int,
                               "bytes": int, "skipped_empty": int},
                "validation": {...the same}},
     "inputs": [input files], "seed": int, "validation_fraction": float}

``dtype`` is ``uint16`` when ``vocab_size <= 65536``, else ``uint32``; ``bytes`` counts the UTF-8 bytes
of the documents' text. Each shard is an ArrayRecord file (options ``group_size:1,uncompressed``:
cheap random access) with one record per document: its token ids as raw little-endian ``dtype`` bytes
(``np.asarray(ids, dtype).tobytes()``), no EOS appended; empty documents are skipped (counted in
``skipped_empty``). Within a shard, records are in input order (file order, then index).

A document goes to validation when ``u < validation_fraction`` and to shard ``s`` of its split, with
``u`` and ``s`` from a blake2b hash of ``(seed, source, index)`` (:func:`assign`): the split does not
depend on the order of processing, ``--workers`` or ``--max_docs``. Train has ``--num_shards`` shards,
validation ``max(1, num_shards // 8)``. Output is byte-identical for any ``--workers``.

Streaming: the shards are split into jobs of at most 16 shards; a job streams the whole input,
tokenizing only its shards' documents in bounded batches and appending them to its shards as it goes;
``--workers`` processes run the jobs. Memory does not grow with the corpus, only with the documents
per shard: an ArrayRecord writer holds ~16 MB of buffers plus ~50 bytes of index per record until it
closes (a reader ~27 bytes per record), so choose ``--num_shards`` for shards of at most a few
million documents. On disk each record costs ~70 bytes beyond its tokens.

Restarts: a shard is written to ``<name>.tmp`` and renamed when complete; a rerun with the same flags
skips finished shards; a rerun with different flags into a non-empty directory is refused unless
``--overwrite`` (an earlier attempt that finished no shard is replaced silently). Stdout gets one JSON
summary line; bad input is a one-line error naming the file (and line), exit status 2.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from absl import app, flags

from experiments import cli
from experiments import tokenizer as tokenizers

FORMAT = "miras_jax.tokens/1"
FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_UNITS = ("file", "paragraph")
SPLITS = ("train", "validation")
WRITER_OPTIONS = "group_size:1,uncompressed"
META = "meta.json"
CONFIG = "prepare_config.json"
TOKENIZER_DIR = "tokenizer"
STATS_DIR = "shard_stats"
_EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
               ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_BATCH_DOCS = 512            # documents per tokenizer call
_BATCH_CHARS = 1 << 22       # ... or this many characters, whichever comes first
_REPORT_LINES = 4096         # progress updates every this many lines
_MAX_OPEN = 16               # shards one pass over the input writes (an open writer buffers ~16 MB)

Report = Callable[[int], None]   # called with the number of input bytes (on disk) just consumed


# ------------------------------------------------------------------------------------------------
# reading documents
# ------------------------------------------------------------------------------------------------


def expand_inputs(inputs: str | Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """Comma-separated globs (or a list of them) -> sorted, de-duplicated file paths, less those
    matching a pattern of ``exclude`` (``fnmatch``, e.g. ``*/test/*``). ``FileNotFoundError`` for a
    missing file or a glob matching nothing; ``ValueError`` for no patterns at all, a directory, or
    nothing left after ``exclude``."""
    patterns = inputs.split(",") if isinstance(inputs, str) else list(inputs)
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise ValueError("no input files: --inputs names no file or glob")
    paths = set()
    for pattern in patterns:
        matches = glob.glob(pattern, recursive=True)
        if not matches:
            if glob.has_magic(pattern):
                raise FileNotFoundError(f"input pattern {pattern!r} matches no files")
            raise FileNotFoundError(f"input file not found: {pattern}")
        for path in matches:
            if os.path.isdir(path):
                raise ValueError(f"input {path} is a directory; name its files (e.g. {path}/*.jsonl)")
            paths.add(os.path.normpath(path))
    kept = sorted(p for p in paths if not any(fnmatch.fnmatch(p, e) for e in exclude))
    if not kept:
        raise ValueError(f"--exclude {','.join(exclude)} leaves none of the {len(paths)} input files")
    return kept


def input_format(path: str, fmt: str = "auto") -> str:
    """``"text" | "jsonl" | "parquet"`` of ``path``: ``fmt`` itself, or from the extension if ``"auto"``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    gz = path.endswith(".gz")
    if fmt == "auto":
        ext = os.path.splitext(path[:-3] if gz else path)[1].lower()
        if ext not in _EXTENSIONS:
            raise ValueError(f"cannot tell the format of {path} from its extension; pass --format "
                             "(text, jsonl or parquet)")
        fmt = _EXTENSIONS[ext]
    if fmt == "parquet" and gz:
        raise ValueError(f"{path}: gzip-compressed Parquet is not supported (Parquet compresses itself)")
    return fmt


def _open(path: str):
    """``(raw, stream)``: the file on disk and its (gunzipped if it starts with the gzip magic) bytes."""
    raw = open(path, "rb")
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if raw.peek(2)[:2] == b"\x1f\x8b" else raw)


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 at byte offset {offset + e.start} "
                         f"({data[e.start:e.start + 4]!r}...)") from None


class _Lines:
    """Iterate ``(line_number, offset, line bytes)`` over ``stream`` (1-based line numbers, byte
    offsets in the decompressed text), reporting raw bytes consumed every few thousand lines."""

    def __init__(self, raw, stream, report: Report | None):
        self.raw, self.stream, self.report, self.done = raw, stream, report, 0

    def __iter__(self):
        offset = 0
        for n, line in enumerate(self.stream, 1):
            yield n, offset, line
            offset += len(line)
            if self.report is not None and n % _REPORT_LINES == 0:
                self.flush(self.raw.tell())

    def flush(self, position: int) -> None:
        if self.report is not None and position > self.done:
            self.report(position - self.done)
            self.done = position


def _read_text(path: str, text_unit: str, report: Report | None) -> Iterator[tuple[int, str]]:
    raw, stream = _open(path)
    with raw, stream:
        if text_unit == "file":
            yield 0, _decode(stream.read(), path)
            if report is not None:
                report(os.fstat(raw.fileno()).st_size)
            return
        lines = _Lines(raw, stream, report)
        para, start, index = [], 0, 0
        for _, offset, line in lines:
            if line.strip():
                if not para:
                    start = offset
                para.append(line)
            elif para:
                yield index, _decode(b"".join(para), path, start).rstrip("\r\n")
                para, index = [], index + 1
        if para:
            yield index, _decode(b"".join(para), path, start).rstrip("\r\n")
        lines.flush(os.fstat(raw.fileno()).st_size)


def _read_jsonl(path: str, field: str, report: Report | None) -> Iterator[tuple[int, str]]:
    raw, stream = _open(path)
    with raw, stream:
        lines = _Lines(raw, stream, report)
        for n, offset, line in lines:
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(_decode(line, where, offset))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: not a JSON object but {type(obj).__name__}")
            if field not in obj:
                fields = ", ".join(map(repr, obj)) or "none"
                raise ValueError(f"{where}: no field {field!r} (fields: {fields}); choose one with --field")
            text = obj[field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
            yield n - 1, text
        lines.flush(os.fstat(raw.fileno()).st_size)


def _read_parquet(path: str, field: str, report: Report | None) -> Iterator[tuple[int, str]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading Parquet needs the package pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(map(repr, schema.names))}); "
                         "choose one with --field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {field!r} holds {kind}, not strings")
    size, rows, index, done = os.path.getsize(path), max(1, pf.metadata.num_rows), 0, 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise ValueError(f"{path}: row {index}: column {field!r} is null")
                yield index, text
                index += 1
            if report is not None:
                report(size * index // rows - done)
                done = size * index // rows
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read row {index} onwards ({e})") from None
    if report is not None:
        report(size - done)


def iter_documents(paths: Sequence[str], fmt: str = "auto", field: str = "text", text_unit: str = "file",
                   *, report: Report | None = None) -> Iterator[tuple[str, int, str]]:
    """Stream ``(source, index, text)`` over the files ``paths`` in order (see the module docstring).

    ``report(n)`` (optional) is called as input bytes are consumed (on-disk sizes; summed over a
    full pass it is the total size of ``paths``). Bad input raises ``ValueError`` naming the file
    (and line for JSONL, byte offset for non-UTF-8 text).
    """
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"unknown text_unit {text_unit!r}; valid units: {', '.join(TEXT_UNITS)}")
    for path in paths:
        kind = input_format(path, fmt)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
        if kind == "parquet":
            docs = _read_parquet(path, field, report)
        elif kind == "jsonl":
            docs = _read_jsonl(path, field, report)
        else:
            docs = _read_text(path, text_unit, report)
        try:
            for index, text in docs:
                yield path, index, text
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt gzip file ({e})") from None


# ------------------------------------------------------------------------------------------------
# splits and shards
# ------------------------------------------------------------------------------------------------


def validation_shards(num_shards: int) -> int:
    """Number of validation shards for ``num_shards`` train shards: ``max(1, num_shards // 8)``."""
    return max(1, num_shards // 8)


def assign(seed: int, source: str, index: int, validation_fraction: float,
           num_shards: int) -> tuple[str, int]:
    """``(split, shard)`` of document ``(source, index)``: blake2b of ``"{seed}\\0{source}\\0{index}"``;
    bytes 0-8 as ``u in [0, 1)`` choose validation when ``u < validation_fraction``, bytes 8-16 modulo
    the split's shard count (``num_shards`` train, :func:`validation_shards` validation) the shard."""
    h = hashlib.blake2b(f"{seed}\0{source}\0{index}".encode(), digest_size=16).digest()
    if int.from_bytes(h[:8], "little") < validation_fraction * 2.0**64:
        return "validation", int.from_bytes(h[8:], "little") % validation_shards(num_shards)
    return "train", int.from_bytes(h[8:], "little") % num_shards


def shard_name(split: str, index: int, count: int) -> str:
    """``<split>-<index:05d>-of-<count:05d>.array_record``."""
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
    """``"uint16"`` if ``vocab_size <= 65536`` else ``"uint32"``."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def iter_shard(path: str, dtype: str, chunk: int = 1024) -> Iterator[np.ndarray]:
    """The records of one shard as ``dtype`` arrays [t_i], in order."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard not found: {path}")
    reader = ArrayRecordReader(path)
    if not reader.ok():
        raise ValueError(f"corrupt shard {path}")
    try:
        n = reader.num_records()
        for start in range(0, n, chunk):
            for record in reader.read(start, min(n, start + chunk)):
                yield np.frombuffer(record, np.dtype(dtype).newbyteorder("<"))
    finally:
        reader.close()


class _ShardWriter:
    """Append records to ``<name>.tmp``; :meth:`finish` writes the stats file, then renames the shard."""

    def __init__(self, output: str, name: str, dtype: str):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.output, self.name, self.dtype = output, name, np.dtype(dtype).newbyteorder("<")
        self.path = os.path.join(output, name)
        self.writer = ArrayRecordWriter(self.path + ".tmp", WRITER_OPTIONS)
        self.stats = {"documents": 0, "tokens": 0, "bytes": 0, "skipped_empty": 0}

    def write(self, ids: np.ndarray, nbytes: int) -> None:
        self.writer.write(np.asarray(ids).astype(self.dtype).tobytes())
        self.stats["documents"] += 1
        self.stats["tokens"] += len(ids)
        self.stats["bytes"] += nbytes

    def finish(self) -> dict:
        self.writer.close()
        tokenizers.write_json(os.path.join(self.output, STATS_DIR, self.name + ".json"), self.stats)
        os.replace(self.path + ".tmp", self.path)
        return self.stats


@dataclasses.dataclass(frozen=True)
class _Job:
    """One pass over the input: stream every document, write those of ``shards`` (names)."""

    paths: tuple[str, ...]
    fmt: str
    field: str
    text_unit: str
    seed: int
    validation_fraction: float
    num_shards: int
    max_docs: int | None
    output: str
    dtype: str
    vocab_size: int
    shards: tuple[str, ...]


def _all_shards(num_shards: int) -> dict[tuple[str, int], str]:
    counts = {"train": num_shards, "validation": validation_shards(num_shards)}
    return {(s, i): shard_name(s, i, n) for s, n in counts.items() for i in range(n)}


def _run_job(job: _Job, report: Report | None) -> None:
    """Stream the input; tokenize and write the documents that belong to ``job.shards``."""
    tok = tokenizers.load(os.path.join(job.output, TOKENIZER_DIR))
    names = _all_shards(job.num_shards)
    writers = {key: _ShardWriter(job.output, name, job.dtype)
               for key, name in names.items() if name in job.shards}
    batch, chars = [], 0

    def flush():
        ids = tok.encode_batch([text for _, text in batch])
        for (key, text), x in zip(batch, ids, strict=True):
            if x.size and (x.min() < 0 or x.max() >= job.vocab_size):
                raise ValueError(f"tokenizer produced ids outside [0, {job.vocab_size})")
            writers[key].write(x, len(text.encode("utf-8")))
        batch.clear()

    docs = iter_documents(job.paths, job.fmt, job.field, job.text_unit, report=report)
    for n, (source, index, text) in enumerate(docs):
        if job.max_docs is not None and n >= job.max_docs:
            break
        key = assign(job.seed, source, index, job.validation_fraction, job.num_shards)
        if key not in writers:
            continue
        if not text:
            writers[key].stats["skipped_empty"] += 1
            continue
        batch.append((key, text))
        chars += len(text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            flush()
            chars = 0
    if batch:
        flush()
    for w in writers.values():
        w.finish()


_COUNTERS = None


def _init_worker(counters, threads: int) -> None:
    global _COUNTERS
    _COUNTERS = counters
    os.environ["RAYON_NUM_THREADS"] = str(threads)           # the HF tokenizer's thread pool
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker(job: _Job, slot: int) -> None:
    def report(n: int) -> None:
        _COUNTERS[slot] += n
    _run_job(job, report)


def _run_jobs(jobs: list[_Job], processes: int, bar) -> None:
    """Run ``jobs`` in this process (``processes == 1``) or on a pool of spawned processes;
    ``bar`` counts input bytes read, summed over the jobs (each reads the whole input)."""
    if processes == 1:
        for job in jobs:
            _run_job(job, bar.update)
        return
    ctx = mp.get_context("spawn")     # no fork: the parent may hold threads (tokenizers, jax)
    counters = ctx.RawArray("q", len(jobs))
    threads = max(1, (os.cpu_count() or 1) // processes)
    with ctx.Pool(processes, initializer=_init_worker, initargs=(counters, threads)) as pool:
        results = [pool.apply_async(_worker, (job, slot)) for slot, job in enumerate(jobs)]
        while True:
            for r in results:
                if r.ready() and not r.successful():
                    r.get()                              # raises the worker's error
            bar.update(sum(counters[:]) - bar.n)
            if all(r.ready() for r in results):
                break
            time.sleep(0.2)


# ------------------------------------------------------------------------------------------------
# the output directory
# ------------------------------------------------------------------------------------------------


def _fingerprint(spec: str) -> str | None:
    """sha256 of a tokenizer file (or of a saved directory's files); None for bytes."""
    if spec == "bytes":
        return None
    files = ([os.path.join(spec, n) for n in sorted(os.listdir(spec))] if os.path.isdir(spec) else [spec])
    h = hashlib.sha256()
    for path in files:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _owned(name: str) -> bool:
    return name in (META, CONFIG, TOKENIZER_DIR, TOKENIZER_DIR + ".tmp", STATS_DIR) or \
        name.endswith((".array_record", ".array_record.tmp", ".json.tmp"))


def _clean(output: str) -> None:
    """Delete what :func:`prepare` writes in ``output`` (and nothing else)."""
    for name in os.listdir(output):
        path = os.path.join(output, name)
        if _owned(name):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _check_output(output: str, config: dict, overwrite: bool) -> None:
    """Refuse a non-empty ``output`` prepared with other flags (or not by us); ``overwrite``: clean it.
    An earlier attempt that finished no shard (e.g. stopped by bad input) is cleaned silently."""
    if not os.path.isdir(output) or not os.listdir(output):
        return
    if overwrite:
        _clean(output)
        return
    names = os.listdir(output)
    if CONFIG in names and all(_owned(n) for n in names) and \
            not any(n == META or n.endswith(".array_record") for n in names):
        _clean(output)
        return
    try:
        with open(os.path.join(output, CONFIG)) as f:
            old = json.load(f)
    except FileNotFoundError:
        old = None
    except ValueError:
        old = {}
    if old == config:
        return
    if old is None:
        why = f"is not empty and holds no {CONFIG}"
    else:
        diff = [k for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        why = f"holds a corpus prepared with different settings ({', '.join(diff) or 'unreadable config'})"
    raise ValueError(f"output directory {output} {why}; pass --overwrite to replace it or choose another "
                     "--output")


def _tokenizer(spec: str, tok: tokenizers.Tokenizer | None, output: str, job: _Job,
               progress: bool) -> tokenizers.Tokenizer:
    """The run's tokenizer (``tok``, or trained on the training documents for ``bpe:<n>``), saved in
    ``output/tokenizer``; one saved there by an interrupted run of the same flags is reused."""
    final = os.path.join(output, TOKENIZER_DIR)
    if os.path.isfile(os.path.join(final, tokenizers.META_FILE)):
        return tokenizers.load(final)
    if tok is None:
        from tqdm import tqdm

        size = sum(os.path.getsize(p) for p in job.paths)
        with tqdm(total=size, unit="B", unit_scale=True, desc="train BPE", file=sys.stderr,
                  disable=not progress) as bar:
            tok = tokenizers.train_bpe(_train_texts(job, bar.update), _bpe_vocab(spec))
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return tok


def _train_texts(job: _Job, report: Report | None) -> Iterator[str]:
    """The non-empty training documents among the first ``job.max_docs`` (all if None)."""
    docs = iter_documents(job.paths, job.fmt, job.field, job.text_unit, report=report)
    for n, (source, index, text) in enumerate(docs):
        if job.max_docs is not None and n >= job.max_docs:
            return
        if text and assign(job.seed, source, index, job.validation_fraction, job.num_shards)[0] == "train":
            yield text


def _bpe_vocab(spec: str) -> int:
    try:
        vocab = int(spec[len("bpe:"):])
    except ValueError:
        raise ValueError(f"--tokenizer={spec}: bpe:<vocab> needs an integer vocabulary size, "
                         "e.g. bpe:32768") from None
    if vocab < 257:
        raise ValueError(f"--tokenizer={spec}: a byte-level BPE needs a vocabulary of at least 257 "
                         "(256 bytes and the end-of-text token)")
    return vocab


def _check_args(num_shards, workers, max_docs, seed, validation_fraction, text_unit, tokenizer) -> None:
    for name, value, low in (("num_shards", num_shards, 1), ("workers", workers, 1),
                             ("max_docs", max_docs, 1), ("seed", seed, 0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction!r}")
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"unknown text_unit {text_unit!r}; valid units: {', '.join(TEXT_UNITS)}")
    if tokenizer.startswith("bpe:"):
        _bpe_vocab(tokenizer)


def _split_totals(output: str, shards: list[str]) -> dict:
    """A split's ``meta.json`` entry: its shards and their summed ``shard_stats``."""
    entry = {"shards": shards, "documents": 0, "tokens": 0, "bytes": 0, "skipped_empty": 0}
    for name in shards:
        with open(os.path.join(output, STATS_DIR, name + ".json")) as f:
            stats = json.load(f)
        for k in ("documents", "tokens", "bytes", "skipped_empty"):
            entry[k] += stats[k]
    return entry


def prepare(inputs: str | Sequence[str], output: str, *, tokenizer: str = "bytes", fmt: str = "auto",
            field: str = "text", text_unit: str = "file", num_shards: int = 8,
            validation_fraction: float = 0.01, seed: int = 0, workers: int | None = None,
            max_docs: int | None = None, overwrite: bool = False, progress: bool = True,
            exclude: Sequence[str] = ()) -> dict:
    """Tokenize ``inputs`` (globs) into the shards of ``output`` (format in the module docstring);
    returns the ``meta.json`` dict. Finished shards of an interrupted run with the same settings are
    kept; ``overwrite`` deletes what an earlier run wrote in ``output`` and starts afresh.
    ``workers`` (default ``os.cpu_count()``) only changes the speed, never the output; ``exclude``:
    globs of files to leave out (:func:`expand_inputs`)."""
    _check_args(num_shards, workers, max_docs, seed, validation_fraction, text_unit, tokenizer)
    bpe = tokenizer.startswith("bpe:")
    tok = None if bpe else tokenizers.load(tokenizer)          # bad tokenizers fail before any write
    paths = expand_inputs(inputs, exclude)
    for path in paths:
        input_format(path, fmt)
    patterns = [p.strip() for p in (inputs.split(",") if isinstance(inputs, str) else inputs) if p.strip()]
    config = {"inputs": patterns, "exclude": list(exclude), "files": [[p, os.path.getsize(p)] for p in paths], "format": fmt,
              "field": field, "text_unit": text_unit, "tokenizer": tokenizer,
              "tokenizer_sha256": None if bpe else _fingerprint(tokenizer), "num_shards": num_shards,
              "validation_fraction": validation_fraction, "seed": seed, "max_docs": max_docs}
    _check_output(output, config, overwrite)
    os.makedirs(os.path.join(output, STATS_DIR), exist_ok=True)
    tokenizers.write_json(os.path.join(output, CONFIG), config)
    if os.path.exists(os.path.join(output, META)):
        os.remove(os.path.join(output, META))          # complete again only when this run finishes

    job = _Job(tuple(paths), fmt, field, text_unit, seed, validation_fraction, num_shards, max_docs, output,
               dtype="", vocab_size=0, shards=())
    tok = _tokenizer(tokenizer, tok, output, job, progress)
    dtype = token_dtype(tok.vocab_size)
    names = list(_all_shards(num_shards).values())
    pending = [n for n in names if not (os.path.isfile(os.path.join(output, n)) and
                                        os.path.isfile(os.path.join(output, STATS_DIR, n + ".json")))]
    if pending:
        from tqdm import tqdm

        count = min(workers or os.cpu_count() or 1, len(pending))
        passes = max(count, -(-len(pending) // _MAX_OPEN))   # each job: one pass, <= _MAX_OPEN shards
        jobs = [dataclasses.replace(job, dtype=dtype, vocab_size=tok.vocab_size,
                                    shards=tuple(pending[i::passes])) for i in range(passes)]
        with tqdm(total=passes * sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True,
                  file=sys.stderr, desc=f"tokenize ({count} worker{'s' * (count > 1)})",
                  disable=not progress) as bar:
            _run_jobs(jobs, count, bar)

    splits = {s: _split_totals(output, [n for n in names if n.startswith(s + "-")]) for s in SPLITS}
    meta = {"format": FORMAT, "vocab_size": tok.vocab_size, "dtype": dtype, "eos_id": tok.eos_id,
            "tokenizer": TOKENIZER_DIR, "splits": splits, "inputs": paths, "seed": seed,
            "validation_fraction": validation_fraction}
    tokenizers.write_json(os.path.join(output, META), meta)
    return meta


def read_meta(directory: str) -> dict:
    """``directory/meta.json`` of a finished corpus, checked (:func:`experiments.lm_data.load_meta`:
    format, keys, every shard) and its tokenizer present. ``FileNotFoundError`` / ``ValueError`` naming
    what is missing or corrupt."""
    from experiments import lm_data

    meta = lm_data.load_meta(directory)
    missing = [s for s in SPLITS if s not in meta["splits"]]
    if missing:
        raise ValueError(f"corrupt {os.path.join(directory, META)}: missing splits {', '.join(missing)}")
    tok = os.path.join(directory, meta.get("tokenizer", "tokenizer"), tokenizers.META_FILE)
    if not os.path.isfile(tok):
        raise FileNotFoundError(f"tokenizer {tok} (listed in {os.path.join(directory, META)}) not found")
    return meta


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def define_flags():
    """Command-line flags (defined only when run as a script)."""
    flags.DEFINE_list("inputs", None, "comma-separated input files / globs (text, JSONL, Parquet; "
                      ".gz allowed)")
    flags.DEFINE_enum("format", "auto", FORMATS, "input format; auto: from each file's extension")
    flags.DEFINE_string("field", "text", "the JSONL field / Parquet column holding the text")
    flags.DEFINE_enum("text_unit", "file", TEXT_UNITS, "text files: one document per file, or per "
                      "blank-line-separated paragraph")
    flags.DEFINE_string("tokenizer", "bytes", "'bytes', a tokenizer.json / SentencePiece .model / saved "
                        "tokenizer directory, or bpe:<vocab> (train a byte-level BPE on the training "
                        "documents)")
    flags.DEFINE_string("output", None, "output directory")
    flags.DEFINE_integer("num_shards", 8, "number of train shards (validation: max(1, num_shards // 8))")
    flags.DEFINE_float("validation_fraction", 0.01, "fraction of documents held out for validation")
    flags.DEFINE_integer("seed", 0, "seed of the document -> split / shard hash")
    flags.DEFINE_integer("workers", None, "worker processes (default: os.cpu_count()); the output is "
                         "the same for any number")
    flags.DEFINE_integer("max_docs", None, "read only the first this many documents (quick runs)")
    flags.DEFINE_list("exclude", [], "comma-separated globs of input files to leave out (e.g. '*/test/*')")
    flags.DEFINE_bool("overwrite", False, "delete the corpus already in --output and start afresh")
    flags.DEFINE_bool("progress", True, "show a progress bar (stderr)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.inputs:
        raise app.UsageError("--inputs is required (comma-separated input files / globs)")
    if not f.output:
        raise app.UsageError("--output is required (the corpus directory)")
    start = time.time()
    try:
        meta = prepare(f.inputs, f.output, tokenizer=f.tokenizer, fmt=f.format, field=f.field,
                       text_unit=f.text_unit, num_shards=f.num_shards,
                       validation_fraction=f.validation_fraction, seed=f.seed, workers=f.workers,
                       max_docs=f.max_docs, overwrite=f.overwrite, progress=f.progress, exclude=f.exclude)
    except ImportError as e:
        cli.missing(str(e))
    except (ValueError, OSError) as e:
        raise app.UsageError(str(e)) from None
    train, val = meta["splits"]["train"], meta["splits"]["validation"]
    print(json.dumps({"output": f.output, "train_documents": train["documents"],
                      "train_tokens": train["tokens"], "validation_documents": val["documents"],
                      "validation_tokens": val["tokens"],
                      "skipped_empty": train["skipped_empty"] + val["skipped_empty"],
                      "vocab_size": meta["vocab_size"], "dtype": meta["dtype"],
                      "seconds": round(time.time() - start, 2)}), flush=True)


if __name__ == "__main__":
    define_flags()
    cli.run(main)


__all__ = ["FORMAT", "assign", "expand_inputs", "input_format", "iter_documents", "iter_shard", "prepare",
           "read_meta", "shard_name", "token_dtype", "validation_shards"]
