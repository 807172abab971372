"""Data tasks (experiments/data.py): MQAR, the byte corpus, needle-in-a-haystack, resumable iterators."""

import functools
import gzip
import os

import numpy as np
import pytest

from experiments import data as D

SHAKESPEARE = os.path.join(os.path.dirname(__file__), "..", "data", "tinyshakespeare.txt.gz")  # shipped
MQAR = {"batch": 8, "seq_len": 64, "vocab": 40, "num_pairs": 8}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------- MQAR


def test_mqar_shapes_and_dtypes():
    out = D.mqar_batch(0, 0, **MQAR)
    assert set(out) == {"inputs", "targets", "mask"}
    for k, dtype in [("inputs", np.int32), ("targets", np.int32), ("mask", np.float32)]:
        assert out[k].shape == (8, 64) and out[k].dtype == dtype
    assert out["inputs"].min() >= 1 and out["inputs"].max() < 40  # token 0 reserved


def test_mqar_deterministic_in_seed_and_step():
    assert _equal(D.mqar_batch(3, 5, **MQAR), D.mqar_batch(3, 5, **MQAR))
    assert not np.array_equal(D.mqar_batch(3, 5, **MQAR)["inputs"], D.mqar_batch(3, 6, **MQAR)["inputs"])
    assert not np.array_equal(D.mqar_batch(3, 5, **MQAR)["inputs"], D.mqar_batch(4, 5, **MQAR)["inputs"])


@pytest.mark.parametrize("cfg", [MQAR, {"batch": 4, "seq_len": 16, "vocab": 10, "num_pairs": 4},
                                 {"batch": 3, "seq_len": 128, "vocab": 1000, "num_pairs": 1}])
def test_mqar_queries_recall_the_paired_values(cfg):
    n, half = cfg["num_pairs"], cfg["vocab"] // 2
    out = D.mqar_batch(1, 2, **cfg)
    for x, y, m in zip(out["inputs"], out["targets"], out["mask"], strict=True):
        keys, values = x[0:2 * n:2], x[1:2 * n:2]
        assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
        assert ((keys >= 1) & (keys < half)).all() and ((values >= half) & (values < cfg["vocab"])).all()
        pos = np.flatnonzero(m)
        assert len(pos) == n and set(np.unique(m).tolist()) <= {0.0, 1.0}
        assert pos.min() >= 2 * n and pos.max() < cfg["seq_len"] - 1
        pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
        assert sorted(x[pos].tolist()) == sorted(keys.tolist())  # every key queried exactly once
        for p in pos:
            assert y[p] == pair[x[p]]
        assert (y[m == 0] == 0).all()


def test_mqar_mixed_rows_are_mqar_rows_with_their_own_pair_count():
    cfg = {"batch": 64, "seq_len": 64, "vocab": 40}
    out = D.mqar_mixed_batch(2, 3, pairs=(2, 4, 8), **cfg)
    assert _equal(out, D.mqar_mixed_batch(2, 3, pairs=(2, 4, 8), **cfg))
    counts = out["mask"].sum(1).astype(int)
    assert set(counts.tolist()) == {2, 4, 8}  # 64 rows: every count drawn (p of a miss ~ 1e-11)
    for x, y, m, n in zip(out["inputs"], out["targets"], out["mask"], counts, strict=True):
        pair = dict(zip(x[0:2 * n:2].tolist(), x[1:2 * n:2].tolist(), strict=True))
        pos = np.flatnonzero(m)
        assert pos.min() >= 2 * n and sorted(x[pos].tolist()) == sorted(pair)
        assert all(y[p] == pair[x[p]] for p in pos)
    with pytest.raises(ValueError, match="pairs must name"):
        D.mqar_mixed_batch(0, 0, pairs=(), **cfg)
    with pytest.raises(ValueError, match=r"seq_len must be >= 4 \* num_pairs = 68"):
        D.mqar_mixed_batch(0, 0, pairs=(4, 17), **cfg)


def test_mqar_power_law_queries_sit_at_even_offsets_mostly_soon_after_the_pairs():
    cfg = {"batch": 256, "seq_len": 256, "vocab": 8192, "num_pairs": 16}
    n = cfg["num_pairs"]
    out = D.mqar_batch(0, 1, query_power=0.01, **cfg)
    assert _equal(out, D.mqar_batch(0, 1, query_power=0.01, **cfg))
    for x, y, m in zip(out["inputs"], out["targets"], out["mask"], strict=True):
        pair = dict(zip(x[0:2 * n:2].tolist(), x[1:2 * n:2].tolist(), strict=True))
        pos = np.flatnonzero(m)
        assert len(pos) == n and sorted(x[pos].tolist()) == sorted(pair)
        assert all(y[p] == pair[x[p]] for p in pos)
        assert ((pos - 2 * n) % 2 == 0).all() and pos.min() >= 2 * n and pos.max() <= cfg["seq_len"] - 2
    # weights (g + 1)^(a - 1): for a = 0.01 the first quarter of the 112 slots holds well over a quarter
    gaps = (np.flatnonzero(out["mask"]) % cfg["seq_len"] - 2 * n) // 2
    assert np.mean(gaps < 28) > 0.4
    uni = D.mqar_batch(0, 1, query_power=1.0, **cfg)
    gaps_u = (np.flatnonzero(uni["mask"]) % cfg["seq_len"] - 2 * n) // 2
    assert abs(np.mean(gaps_u < 28) - 0.25) < 0.03
    # query_power=0 keeps the original uniform placement (any position), bit for bit
    assert _equal(D.mqar_batch(0, 1, **cfg), D.mqar_batch(0, 1, query_power=0.0, **cfg))
    with pytest.raises(ValueError, match="query_power"):
        D.mqar_batch(0, 1, query_power=1.5, **cfg)


def test_mqar_zero_filler_keeps_pairs_and_queries_and_zeroes_the_rest():
    cfg = {"batch": 64, "seq_len": 128, "vocab": 512, "num_pairs": 16}
    n = cfg["num_pairs"]
    for power in (0.0, 0.01):
        rnd = D.mqar_batch(3, 2, query_power=power, **cfg)
        zero = D.mqar_batch(3, 2, query_power=power, filler="zero", **cfg)
        assert _equal(rnd, D.mqar_batch(3, 2, query_power=power, filler="random", **cfg))  # default
        for k in ("targets", "mask"):
            np.testing.assert_array_equal(zero[k], rnd[k])         # same pairs, same queries
        keep = np.zeros_like(rnd["mask"], bool)
        keep[:, :2 * n] = True
        keep |= rnd["mask"] > 0
        np.testing.assert_array_equal(zero["inputs"][keep], rnd["inputs"][keep])
        assert (zero["inputs"][~keep] == 0).all() and (rnd["inputs"][~keep] > 0).all()
    mixed = D.mqar_mixed_batch(0, 0, pairs=(2, 4), filler="zero", **{k: cfg[k] for k in ("batch", "seq_len", "vocab")})
    assert (mixed["inputs"][:, -1] == 0).all()  # the last position is never a query
    with pytest.raises(ValueError, match="filler must be one of"):
        D.mqar_batch(0, 0, filler="noise", **cfg)
    with pytest.raises(ValueError, match="filler must be one of"):
        D.mqar_mixed_batch(0, 0, pairs=(2,), filler=None, **{k: cfg[k] for k in ("batch", "seq_len", "vocab")})


@pytest.mark.parametrize("kw,match", [
    ({"vocab": 3}, "vocab must be an integer >= 4"),
    ({"vocab": 16, "num_pairs": 8}, "num_pairs=8 needs that many distinct keys.*holds only 7"),
    ({"seq_len": 31}, r"seq_len must be >= 4 \* num_pairs = 32"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"seq_len": -1}, "seq_len must be a positive integer"),
    ({"num_pairs": 0}, "num_pairs must be a positive integer"),
])
def test_mqar_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        D.mqar_batch(0, 0, **{**MQAR, **kw})


def test_mqar_bad_seed_or_step():
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        D.mqar_batch(0, -1, **MQAR)


# ----------------------------------------------------------------------------------------------- ByteCorpus

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
        + "Ünïcödé ok — ") * 2


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(TEXT.encode())
    return path


def test_corpus_split_sizes(corpus_file):
    raw = corpus_file.read_bytes()
    c = D.ByteCorpus.from_file(str(corpus_file))
    assert len(c.train) == int(len(raw) * 0.9) and len(c.train) + len(c.val) == len(raw)
    assert c.train.tobytes() + c.val.tobytes() == raw and c.vocab_size == 256
    c3 = D.ByteCorpus.from_file(corpus_file, val_fraction=0.25)
    assert len(c3.val) == len(raw) - int(len(raw) * 0.75)


def test_corpus_batch_windows(corpus_file):
    c = D.ByteCorpus.from_file(str(corpus_file))
    for split in ("train", "val"):
        out = c.batch(0, 7, batch=6, seq_len=32, split=split)
        data = c.split(split)
        assert out["inputs"].shape == out["targets"].shape == out["mask"].shape == (6, 32)
        assert out["inputs"].dtype == out["targets"].dtype == np.int32 and out["mask"].dtype == np.float32
        assert (out["mask"] == 1).all()
        np.testing.assert_array_equal(out["targets"][:, :-1], out["inputs"][:, 1:])
        for x, y in zip(out["inputs"], out["targets"], strict=True):
            starts = [i for i in range(len(data) - 32) if np.array_equal(data[i:i + 32], x)]
            assert any(np.array_equal(data[i + 1:i + 33], y) for i in starts)


def test_corpus_batch_deterministic(corpus_file):
    c = D.ByteCorpus.from_file(str(corpus_file))
    assert _equal(c.batch(1, 2, batch=4, seq_len=16), c.batch(1, 2, batch=4, seq_len=16))
    assert not np.array_equal(c.batch(1, 2, batch=4, seq_len=16)["inputs"],
                              c.batch(1, 3, batch=4, seq_len=16)["inputs"])


def test_corpus_eval_batches_cover_val_in_order(corpus_file):
    c = D.ByteCorpus.from_file(str(corpus_file), val_fraction=0.5)
    t, b = 16, 3
    batches = list(c.eval_batches(batch=b, seq_len=t))
    n_windows = (len(c.val) - 1) // t
    assert len(batches) == n_windows // b == c.num_eval_batches(batch=b, seq_len=t) > 1
    inputs = np.concatenate([x["inputs"] for x in batches]).reshape(-1)
    targets = np.concatenate([x["targets"] for x in batches]).reshape(-1)
    np.testing.assert_array_equal(inputs, c.val[:len(inputs)])
    np.testing.assert_array_equal(targets, c.val[1:len(inputs) + 1])
    assert all((x["mask"] == 1).all() for x in batches)
    assert _equal(batches[0], next(c.eval_batches(batch=b, seq_len=t)))
    assert len(list(c.eval_batches(batch=b, seq_len=t, max_batches=1))) == 1
    train = list(c.eval_batches(batch=b, seq_len=t, split="train"))
    np.testing.assert_array_equal(train[0]["inputs"][0], c.train[:t])


def test_corpus_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found: .*missing.txt"):
        D.ByteCorpus.from_file(str(tmp_path / "missing.txt"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        D.ByteCorpus.from_file(str(tmp_path))
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        D.ByteCorpus.from_file(str(tmp_path / "empty.txt"))
    (tmp_path / "nul.bin").write_bytes(b"hello world\x00more text")
    with pytest.raises(ValueError, match="looks binary"):
        D.ByteCorpus.from_file(str(tmp_path / "nul.bin"))
    (tmp_path / "noise.bin").write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 4096, np.uint8)))
    with pytest.raises(ValueError, match="looks binary"):
        D.ByteCorpus.from_file(str(tmp_path / "noise.bin"))
    # mostly non-ASCII but valid UTF-8: text
    (tmp_path / "utf8.txt").write_text("日本語のテキスト。" * 300, encoding="utf-8")
    assert len(D.ByteCorpus.from_file(str(tmp_path / "utf8.txt")).val) > 0
    (tmp_path / "tiny.txt").write_bytes(b"a")
    with pytest.raises(ValueError, match="too small"):
        D.ByteCorpus.from_file(str(tmp_path / "tiny.txt"))


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_corpus_bad_val_fraction(corpus_file, frac):
    with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\)"):
        D.ByteCorpus.from_file(str(corpus_file), val_fraction=frac)


def test_corpus_bad_split_and_short_split(corpus_file):
    c = D.ByteCorpus.from_file(str(corpus_file))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        c.batch(0, 0, batch=2, seq_len=8, split="test")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        c.eval_batches(batch=2, seq_len=8, split="test")
    n = len(c.val)
    with pytest.raises(ValueError, match=f"val split .* has {n} bytes, too short for seq_len={n}"):
        c.batch(0, 0, batch=2, seq_len=n, split="val")
    with pytest.raises(ValueError, match=f"too short for seq_len={n}"):
        c.eval_batches(batch=1, seq_len=n)
    with pytest.raises(ValueError, match="fewer than one full batch"):
        c.eval_batches(batch=10_000, seq_len=8)
    c.batch(0, 0, batch=2, seq_len=n - 1, split="val")  # exactly fits


def test_encode_decode_round_trip():
    text = "Hello, wörld! ✓\n"
    tokens = D.ByteCorpus.encode(text)
    assert tokens.dtype == np.int32 and len(tokens) == len(text.encode())
    assert D.ByteCorpus.decode(tokens) == text
    assert D.decode([104, 105, 255]) == "hi\ufffd"
    with pytest.raises(ValueError, match=r"byte tokens must lie in \[0, 256\)"):
        D.decode([300])


def test_shipped_tinyshakespeare_reads_through_gzip():
    c = D.ByteCorpus.from_file(SHAKESPEARE)
    n = len(gzip.decompress(open(SHAKESPEARE, "rb").read()))
    assert n == 1115394  # the tinyshakespeare collection, bytes
    assert len(c.train) == int(n * 0.9) and len(c.train) + len(c.val) == n
    assert D.decode(c.train[:14]) == "First Citizen:"
    out = c.batch(0, 0, batch=4, seq_len=256)
    np.testing.assert_array_equal(out["targets"][:, :-1], out["inputs"][:, 1:])


# ----------------------------------------------------------------------------------------------------- NIAH


@pytest.fixture(scope="module")
def text_corpus():
    return D.ByteCorpus.from_bytes((TEXT * 10).encode())


@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("needle", ["passkey", "number", "word"])
def test_niah(needle, haystack, text_corpus):
    t = 400
    out = D.niah_batch(0, 3, batch=8, seq_len=t, needle=needle, haystack=haystack, corpus=text_corpus)
    assert out["inputs"].shape == out["targets"].shape == out["mask"].shape == (8, t)
    assert out["inputs"].dtype == out["targets"].dtype == np.int32 and out["mask"].dtype == np.float32
    np.testing.assert_array_equal(out["targets"][:, :-1], out["inputs"][:, 1:])
    template, query, _ = D._NEEDLES[needle]
    offsets = []
    for x, y, m, answer in zip(out["inputs"], out["targets"], out["mask"], out["answers"], strict=True):
        s = D.decode(x)
        needle_text = template.format(answer, answer)
        assert answer in needle_text and needle_text in s
        assert D.decode(y[m == 1]) == answer and m.sum() == len(answer)
        assert D.decode(x[m == 1][:1]) == query[-1]  # first scored position reads the end of the query
        assert s.endswith(query + answer) and D.decode(y[-1:]) == "."
        if needle == "passkey":
            assert len(answer) == 5 and answer.isdigit()
        elif needle == "number":
            assert len(answer) == 7 and answer.isdigit()
        else:
            assert 5 <= len(answer) <= 8 and answer.isalpha() and answer.islower()
        offsets.append(s.index(needle_text))
    assert len(set(offsets)) > 1  # the depth varies across the batch
    assert ((out["depths"] >= 0) & (out["depths"] <= 1)).all() and len(set(out["depths"].tolist())) > 1
    assert len(out["answers"]) == 8 and len(set(out["answers"])) > 1
    again = D.niah_batch(0, 3, batch=8, seq_len=t, needle=needle, haystack=haystack, corpus=text_corpus)
    assert _equal(out, again)
    other = D.niah_batch(0, 4, batch=8, seq_len=t, needle=needle, haystack=haystack, corpus=text_corpus)
    assert other["answers"] != out["answers"]


def test_niah_text_haystack_comes_from_the_corpus(text_corpus):
    out = D.niah_batch(1, 0, batch=2, seq_len=300, haystack="text", corpus=text_corpus)
    train = text_corpus.train.tobytes()
    for x, answer in zip(out["inputs"], out["answers"], strict=True):
        s = x.astype(np.uint8).tobytes()
        needle_text = D._NEEDLES["passkey"][0].format(answer, answer).encode()
        i = s.index(needle_text)
        hay = s[:i] + s[i + len(needle_text):s.index(D._NEEDLES["passkey"][1].encode())]
        assert hay in train


def test_niah_errors(text_corpus):
    short = D.niah_min_seq_len("passkey") - 1
    with pytest.raises(ValueError, match=f"seq_len={short} is too short for needle='passkey'"):
        D.niah_batch(0, 0, batch=2, seq_len=short)
    D.niah_batch(0, 0, batch=2, seq_len=short + 1)
    with pytest.raises(ValueError, match="haystack='text' needs a corpus"):
        D.niah_batch(0, 0, batch=2, seq_len=400, haystack="text")
    with pytest.raises(ValueError, match="unknown needle 'key'"):
        D.niah_batch(0, 0, batch=2, seq_len=400, needle="key")
    with pytest.raises(ValueError, match="unknown haystack 'sand'"):
        D.niah_batch(0, 0, batch=2, seq_len=400, haystack="sand")
    with pytest.raises(ValueError, match="fewer than the .* haystack bytes"):
        D.niah_batch(0, 0, batch=2, seq_len=len(text_corpus.train) + 1000, haystack="text",
                     corpus=text_corpus)


# ------------------------------------------------------------------------------------------------ iterators


def test_data_iterator_resume():
    fn = functools.partial(D.mqar_batch, **MQAR)
    it = D.DataIterator(fn, seed=5)
    [next(it) for _ in range(3)]
    state = it.get_state()
    assert state == {"step": 3}
    expected = [next(it) for _ in range(3)]
    resumed = D.DataIterator(fn, seed=5)
    resumed.set_state(state)
    assert all(_equal(a, next(resumed)) for a in expected)
    resumed.set_state({"step": np.asarray(4)})
    assert _equal(next(resumed), expected[1]) and resumed.get_state() == {"step": 5}
    with pytest.raises(ValueError, match="state must be a dict with key 'step'"):
        resumed.set_state({"pos": 1})
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        resumed.set_state({"step": -1})


def test_grain_dataset_matches_batch_fn_and_resumes():
    grain = pytest.importorskip("grain")
    fn = functools.partial(D.mqar_batch, **MQAR)
    ds = D.make_dataset(fn, seed=5)
    assert isinstance(ds, grain.MapDataset)
    assert _equal(ds[7], fn(5, 7))
    it = iter(ds.to_iter_dataset())
    [next(it) for _ in range(2)]
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    it2 = iter(ds.to_iter_dataset())
    it2.set_state(state)
    assert all(_equal(a, next(it2)) for a in expected)
    assert _equal(expected[0], fn(5, 2))
    assert len(D.make_dataset(fn, seed=5, num_steps=10)) == 10


def test_corrupt_gzip_corpus_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.txt.gz"
    path.write_bytes(gzip.compress(b"hello world " * 100)[:40])
    with pytest.raises(ValueError, match="corrupt gzip"):
        D.ByteCorpus.from_file(path)
