"""experiments.tokenizer: bytes / Hugging Face BPE / SentencePiece behind one interface, saved and
loaded from a directory, with clear errors for missing or corrupt files."""

import gzip
import json
import os

import numpy as np
import pytest

from experiments import data
from experiments import tokenizer as tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt.gz")

# ascii, accents, combining marks, CJK, emoji (4-byte UTF-8), controls, the special token's text
UNICODE = ["", "hello world", "naïve café — ñ", "e\u0301 a\u0308", "日本語のテキスト", "🤖🚀 x 👩‍👩‍👧",
           "\x00\t\r\n  \x7f", "<|endoftext|> in text", "  leading and trailing  \n\n"]


def _shakespeare(chars: int) -> str:
    with gzip.open(SHAKESPEARE, "rt") as f:
        return f.read(chars)


def _random_unicode(seed: int, n: int = 20, length: int = 40) -> list[str]:
    """Random strings of code points from the whole Unicode range (no surrogates)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cps = rng.integers(1, 0x10FFFF, size=length)
        cps = np.where((cps >= 0xD800) & (cps < 0xE000), cps - 0x1000, cps)   # no surrogates
        out.append("".join(map(chr, cps)))
    return out


@pytest.fixture(scope="module")
def bpe():
    paragraphs = _shakespeare(8000).split("\n\n")
    return tokenizers.train_bpe(iter(paragraphs), 300)


def test_bytes_tokenizer_is_data_encode(tmp_path):
    tok = tokenizers.load("bytes")
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("bytes", 256, None)
    for text in UNICODE:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and np.array_equal(ids, data.encode(text))
        assert tok.decode(ids) == text
    assert all(np.array_equal(a, data.encode(t)) for a, t in zip(tok.encode_batch(UNICODE), UNICODE))
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / tokenizers.META_FILE).read_text()) == \
        {"kind": "bytes", "vocab_size": 256, "file": None, "eos_id": None}
    assert tokenizers.load(tmp_path / "tok").kind == "bytes"


def test_bpe_round_trips_any_text_and_saves(bpe, tmp_path):
    assert bpe.kind == "hf" and 256 < bpe.vocab_size <= 300
    assert bpe.eos_id == bpe.tok.token_to_id("<|endoftext|>")
    texts = UNICODE + _random_unicode(0) + [_shakespeare(3000)]
    ids = bpe.encode_batch(texts)
    for text, x in zip(texts, ids):
        assert x.dtype == np.int32 and np.array_equal(x, bpe.encode(text))
        assert x.size == 0 or 0 <= x.min() <= x.max() < bpe.vocab_size
        assert bpe.decode(x) == text
    assert len(ids[-1]) < 0.7 * len(texts[-1].encode())        # merges learned: fewer tokens than bytes

    bpe.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / tokenizers.META_FILE).read_text())
    assert meta == {"kind": "hf", "vocab_size": bpe.vocab_size, "file": "tokenizer.json",
                    "eos_id": bpe.eos_id}
    for loaded in (tokenizers.load(tmp_path / "tok"), tokenizers.load(tmp_path / "tok" / "tokenizer.json")):
        assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == ("hf", bpe.vocab_size, bpe.eos_id)
        assert all(np.array_equal(a, b) for a, b in zip(loaded.encode_batch(texts), ids))


def test_train_bpe_rejects_a_vocabulary_smaller_than_the_bytes():
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.train_bpe(iter(["abc"]), 200)


def test_sentencepiece_model_loads_and_saves(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_shakespeare(20000))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=100,
                                   minloglevel=2)
    tok = tokenizers.load(str(tmp_path / "sp.model"))
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("sentencepiece", 100, 2)
    text = "first citizen: before we proceed any further, hear me speak."
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and 0 < len(ids) < len(text) and ids.max() < 100
    assert tok.decode(ids) == text
    assert all(np.array_equal(a, tok.encode(t)) for a, t in zip(tok.encode_batch([text, "you are"]),
                                                                 [text, "you are"]))
    tok.save(tmp_path / "tok")
    loaded = tokenizers.load(tmp_path / "tok")
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id) == ("sentencepiece", 100, 2)
    assert np.array_equal(loaded.encode(text), ids)


def test_load_errors_name_the_path(tmp_path, bpe):
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match="nope/tokenizer.json"):
        tokenizers.load(missing)
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text('{"version": "1.0", "model": {"type": "WhatIsThis"}}')
    with pytest.raises(ValueError, match=f"cannot read tokenizer file {corrupt}"):
        tokenizers.load(str(corrupt))
    bad_model = tmp_path / "bad.model"
    bad_model.write_bytes(b"not a protobuf \xff\xff")
    with pytest.raises(ValueError, match="bad.model"):
        tokenizers.load(str(bad_model))
    other = tmp_path / "vocab.txt"
    other.write_text("a\nb\n")
    with pytest.raises(ValueError, match="unknown tokenizer file type.*vocab.txt"):
        tokenizers.load(str(other))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no miras_tokenizer.json"):
        tokenizers.load(tmp_path)
    bpe.save(tmp_path / "saved")
    meta = tmp_path / "saved" / tokenizers.META_FILE
    meta.write_text(json.dumps({"kind": "wordpiece", "vocab_size": 3, "file": None, "eos_id": None}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizers.load(tmp_path / "saved")
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt tokenizer description"):
        tokenizers.load(tmp_path / "saved")
    with pytest.raises(ValueError, match="trained, not loaded"):
        tokenizers.load("bpe:300")
