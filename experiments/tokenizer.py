"""Tokenizers for language modelling: one interface over UTF-8 bytes, Hugging Face ``tokenizers``
and SentencePiece.

Every :class:`Tokenizer` has ``kind`` (``"bytes" | "hf" | "sentencepiece"``), ``vocab_size``,
``eos_id`` (``int`` or ``None``) and::

    encode(text)          str -> int32 ids [t]           (no special tokens added)
    encode_batch(texts)   list[str] -> list of int32 [t_i] (HF: its parallel batch encoder)
    decode(ids)           int array-like [t] -> str
    save(directory)       writes directory/miras_tokenizer.json (+ the model file)

``load(path)`` reads any of them back: ``"bytes"``, a ``tokenizer.json`` (HF), a SentencePiece
``.model`` file, or a directory written by ``save``, which holds ``miras_tokenizer.json`` =
``{"kind", "vocab_size", "file", "eos_id"}`` and the copied model file (``file``: its name in the
directory, ``null`` for bytes). :func:`train_bpe` trains a byte-level BPE from an iterator of texts
(streaming: the corpus is never held in memory); its ``decode(encode(s)) == s`` for any text.

``tokenizers`` and ``sentencepiece`` are imported only when used (``pip install tokenizers
sentencepiece``). Run directories keep their tokenizer in ``<workdir>/tokenizer/`` (``save``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from experiments import data

META_FILE = "miras_tokenizer.json"
KINDS = ("bytes", "hf", "sentencepiece")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")  # eos of a bare tokenizer.json


def _import(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"this tokenizer needs the package {module} (pip install {module})") from e


class Tokenizer:
    """Base class: ``kind``, ``vocab_size``, ``eos_id`` and the methods of the module docstring."""

    kind: str = ""
    vocab_size: int = 0
    eos_id: int | None = None
    file: str | None = None          # the model file's name inside a saved directory

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 token ids [t]."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's int32 ids [t_i] (one loop here; subclasses batch)."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Any) -> str:
        """int token ids [t] -> str."""
        raise NotImplementedError

    def _save_model(self, directory: str) -> None:
        """Write the model file ``self.file`` into ``directory`` (none for bytes)."""

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``directory/miras_tokenizer.json`` and the model file; :func:`load` reads it back."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self._save_model(directory)
        meta = {"kind": self.kind, "vocab_size": int(self.vocab_size), "file": self.file,
                "eos_id": None if self.eos_id is None else int(self.eos_id)}
        write_json(os.path.join(directory, META_FILE), meta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class BytesTokenizer(Tokenizer):
    """UTF-8 bytes, vocab 256, no EOS: the ids of :func:`experiments.data.encode`."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return data.encode(text)

    def decode(self, ids: Any) -> str:
        return data.decode(ids)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (any ``tokenizer.json``)."""

    kind = "hf"
    file = "tokenizer.json"

    def __init__(self, tok, eos_id: int | None):
        self.tok = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = eos_id

    @classmethod
    def from_file(cls, path: str, eos_id: int | None | str = "guess") -> HFTokenizer:
        """Read a ``tokenizer.json``; ``eos_id="guess"``: the first special token named in
        ``EOS_CANDIDATES``, else ``None``."""
        tokenizers = _import("tokenizers")
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception for any bad file
            raise ValueError(f"cannot read tokenizer file {path}: {' '.join(str(e).split())}") from None
        if eos_id == "guess":
            special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
            eos_id = next((special[c] for c in EOS_CANDIDATES if c in special), None)
        return cls(tok, eos_id)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)  # fast: no offsets
        return [np.asarray(e.ids, np.int32) for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Any) -> str:
        return self.tok.decode(np.asarray(ids).reshape(-1).tolist(), skip_special_tokens=False)

    def _save_model(self, directory: str) -> None:
        self.tok.save(os.path.join(directory, self.file))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model`` file)."""

    kind = "sentencepiece"
    file = "tokenizer.model"

    def __init__(self, proto: bytes, name: str = "<bytes>"):
        spm = _import("sentencepiece")
        self.proto = proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:
            raise ValueError(f"cannot read SentencePiece model {name}: {' '.join(str(e).split())}") from None
        self.vocab_size = int(self.sp.get_piece_size())
        eos = int(self.sp.eos_id())
        self.eos_id = eos if eos >= 0 else None

    @classmethod
    def from_file(cls, path: str) -> SentencePieceTokenizer:
        with open(path, "rb") as f:
            return cls(f.read(), path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.sp.encode(text, out_type=int), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self.sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Any) -> str:
        return self.sp.decode(np.asarray(ids).reshape(-1).tolist())

    def _save_model(self, directory: str) -> None:
        with open(os.path.join(directory, self.file), "wb") as f:
            f.write(self.proto)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then ``os.replace``)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _load_directory(directory: str) -> Tokenizer:
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"tokenizer directory {directory} holds no {META_FILE} (write one with "
                                "Tokenizer.save)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        kind = meta["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt tokenizer description {meta_path}: {e!r}") from None
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r} in {meta_path}; valid kinds: {', '.join(KINDS)}")
    if kind == "bytes":
        tok = BytesTokenizer()
    else:
        model = os.path.join(directory, str(meta.get("file")))
        if not os.path.isfile(model):
            raise FileNotFoundError(f"tokenizer model file {model} (named in {meta_path}) not found")
        tok = (HFTokenizer.from_file(model, meta.get("eos_id")) if kind == "hf"
               else SentencePieceTokenizer.from_file(model))
    if meta.get("vocab_size") != tok.vocab_size:
        raise ValueError(f"{meta_path} says vocab_size={meta.get('vocab_size')} but its model has "
                         f"{tok.vocab_size} tokens")
    return tok


def load(path: str | os.PathLike) -> Tokenizer:
    """``"bytes"``, a ``tokenizer.json`` (HF), a SentencePiece ``.model`` or a :meth:`Tokenizer.save`
    directory -> :class:`Tokenizer`. A missing path raises ``FileNotFoundError``; an unreadable file
    or an unknown kind ``ValueError``, both naming the path."""
    path = os.fspath(path)
    if path == "bytes":
        return BytesTokenizer()
    if path.startswith("bpe:"):
        raise ValueError(f"tokenizer {path!r} is trained, not loaded: experiments.prepare "
                         "--tokenizer=bpe:<vocab> trains one and saves it with the corpus")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (expected 'bytes', a tokenizer.json, a "
                                "SentencePiece .model file or a directory written by Tokenizer.save)")
    if os.path.isdir(path):
        return _load_directory(path)
    if path.endswith(".json"):
        return HFTokenizer.from_file(path)
    if path.endswith(".model"):
        return SentencePieceTokenizer.from_file(path)
    raise ValueError(f"unknown tokenizer file type: {path} (expected a tokenizer.json or a SentencePiece "
                     ".model file)")


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              special_tokens: Sequence[str] = ("<|endoftext|>",), batch_size: int = 1000,
              show_progress: bool = False) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, all 256 bytes in the
    initial alphabet, so ``decode(encode(s)) == s`` for any text) on an iterable of texts.

    The texts are streamed to the trainer in batches of ``batch_size`` (the trainer keeps word
    counts, not the corpus). ``vocab_size`` counts the 256 bytes and the special tokens; a small
    corpus can give fewer tokens. ``eos_id`` is the first special token's id (``None`` without
    special tokens).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or \
            vocab_size < 256 + len(special_tokens):
        raise ValueError(f"a byte-level BPE's vocab_size must be an integer >= 256 + {len(special_tokens)} "
                         f"special tokens, got {vocab_size!r}")
    tk = _import("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def batches():
        batch = []
        for text in texts:
            batch.append(text)
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    tok.train_from_iterator(batches(), trainer=trainer)
    eos = tok.token_to_id(special_tokens[0]) if special_tokens else None
    return HFTokenizer(tok, eos)
