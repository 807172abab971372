"""experiments.lm_data: packed language-modelling rows from ArrayRecord token shards.

The corpora are written here by ``write_corpus``, which follows prepare.py's contract (meta.json +
``<split>-<i:05d>-of-<n:05d>.array_record``, one record per document). Token ``1 + j * SPAN + p`` is
position p of document j, so every token of a batch names its document and position.
"""

import json
import os

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from experiments import lm_data as L

SPAN = 300  # longest test document; token 1 + j * SPAN + p is document j's position p


def make_docs(n: int, seed: int = 0, max_len: int = SPAN) -> list[np.ndarray]:
    """n documents of random lengths in [0, max_len]; document j's tokens encode (j, position)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, size=n)
    lengths[:3] = [0, 1, 2]  # an empty, a one-token (both dropped) and a one-target document
    return [1 + j * SPAN + np.arange(k) for j, k in enumerate(lengths)]


def write_corpus(directory, splits: dict, *, shards: int = 2, dtype: str = "uint16", vocab_size=None) -> str:
    """A tokenized corpus as experiments/prepare.py writes it: shard i of a split holds its i-th
    contiguous block of documents, so reading the shards in order gives the documents in order."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    info = {}
    for split, docs in splits.items():
        names = [f"{split}-{i:05d}-of-{shards:05d}.array_record" for i in range(shards)]
        for name, block in zip(names, np.array_split(np.arange(len(docs)), shards), strict=True):
            writer = ArrayRecordWriter(os.path.join(directory, name), "group_size:1")
            for j in block:
                writer.write(np.asarray(docs[j], dtype).tobytes())
            writer.close()
        tokens = sum(len(d) for d in docs)
        info[split] = {"shards": names, "documents": len(docs), "tokens": tokens,
                       "bytes": tokens * np.dtype(dtype).itemsize}
    if vocab_size is None:
        vocab_size = 1 + max(int(d.max()) for docs in splits.values() for d in docs if len(d))
    meta = {"format": "miras_jax.tokens/1", "vocab_size": vocab_size, "dtype": dtype, "eos_id": None,
            "tokenizer": "tokenizer", "splits": info}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f)
    return directory


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(directory, train documents): 120 training documents of 0..300 tokens, 3 shards."""
    docs = make_docs(120)
    val = make_docs(20, seed=1)
    return write_corpus(tmp_path_factory.mktemp("corpus"), {"train": docs, "validation": val}, shards=3), docs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(directory, documents): 30 documents, about 18 batches of 4 x 64 per epoch."""
    docs = make_docs(30, seed=2)
    return write_corpus(tmp_path_factory.mktemp("small"), {"train": docs}), docs


def take(ds, n: int) -> list[dict]:
    it = iter(ds)
    return [next(it) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def pieces(batches: list[dict], *, seq_len: int, batch_size: int,
           align: int = 0) -> list[tuple[int, int, int, int]]:
    """Checks every row of ``batches`` against the batch contract and returns its document pieces
    ``(document, first input position, length, column in the row)`` in order of appearance."""
    out = []
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "segment_ids", "segment_positions", "mask"}
        for k, x in batch.items():
            assert x.shape == (batch_size, seq_len), k
            assert x.dtype == (np.float32 if k == "mask" else np.int32), k
        seg = batch["segment_ids"]
        np.testing.assert_array_equal(batch["mask"], (seg != 0).astype(np.float32))
        np.testing.assert_array_equal(L.loss_mask(batch), batch["mask"])
        pad = seg == 0
        for k in ("inputs", "targets", "segment_positions"):
            assert not batch[k][pad].any(), k
        for r in range(batch_size):
            ids = [s for s in np.unique(seg[r]) if s]
            assert ids == list(range(1, len(ids) + 1))  # documents 1, 2, ... within the row
            starts = []
            for s in ids:
                (cols,) = np.nonzero(seg[r] == s)
                assert np.array_equal(cols, np.arange(cols[0], cols[0] + len(cols)))  # one contiguous run
                starts.append(int(cols[0]))
                if align:
                    assert cols[0] % align == 0
                inp, tgt = batch["inputs"][r, cols] - 1, batch["targets"][r, cols] - 1
                doc, pos = inp // SPAN, inp % SPAN
                assert (doc == doc[0]).all() and (tgt // SPAN == doc[0]).all()  # one document
                np.testing.assert_array_equal(pos, pos[0] + np.arange(len(cols)))  # consecutive tokens
                np.testing.assert_array_equal(tgt % SPAN, pos + 1)  # targets = next token, same document
                np.testing.assert_array_equal(batch["segment_positions"][r, cols], np.arange(len(cols)))
                assert pos[0] % seq_len == 0  # piece k starts at input position k * seq_len
                out.append((int(doc[0]), int(pos[0]), len(cols), int(cols[0])))
            assert starts == sorted(starts)  # ids number the documents from the left
    return out


def coverage(found: list[tuple], docs: list[np.ndarray], epochs: int = 1) -> None:
    """Every target position 1..n-1 of every document scored exactly ``epochs`` times, nothing else."""
    counts = {j: np.zeros(len(d), int) for j, d in enumerate(docs)}
    for j, p0, n, _ in found:
        counts[j][p0 + 1:p0 + 1 + n] += 1
    for j, d in enumerate(docs):
        want = np.full(len(d), epochs)
        want[:1] = 0
        np.testing.assert_array_equal(counts[j], want, err_msg=f"document {j} of {len(d)} tokens")


def one_epoch(directory, **kw) -> list[dict]:
    return list(L.packed_dataset(directory, "train", num_epochs=1, **kw))


# ----------------------------------------------------------------------------------------------------------
# reading the shards
# ----------------------------------------------------------------------------------------------------------


def test_documents_in_file_order_uint32(tmp_path):
    docs = [np.array([70_000, 1, 2**31 - 1]), np.array([], int), np.array([5])]
    d = write_corpus(tmp_path, {"train": docs}, dtype="uint32", vocab_size=2**31)
    ds = L.documents(d, "train")
    assert len(ds) == 3
    for got, want in zip(ds, docs, strict=True):
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, want)
    assert L.load_meta(d)["splits"]["train"]["documents"] == 3


# ----------------------------------------------------------------------------------------------------------
# packed rows
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len,batch_size,bins", [(64, 4, None), (128, 3, 8)])
def test_one_epoch_scores_every_target_once(corpus, seq_len, batch_size, bins):
    d, docs = corpus
    batches = one_epoch(d, seq_len=seq_len, batch_size=batch_size, seed=0, num_packing_bins=bins)
    coverage(pieces(batches, seq_len=seq_len, batch_size=batch_size), docs)
    # rows are full except near the end of a packed group: little padding
    assert np.mean([b["mask"].mean() for b in batches[:-1]]) > 0.8


def test_align_starts_documents_at_chunk_starts(corpus):
    d, docs = corpus
    tight = pieces(one_epoch(d, seq_len=64, batch_size=4, seed=1), seq_len=64, batch_size=4)
    assert any(col % 16 for *_, col in tight)  # not aligned by chance
    for align in (16, 48):  # 48 does not divide seq_len = 64
        batches = one_epoch(d, seq_len=64, batch_size=4, seed=1, align=align)
        found = pieces(batches, seq_len=64, batch_size=4, align=align)  # asserts col % align == 0
        coverage(found, docs)
        assert any(col for *_, col in found)  # rows do hold several documents


def test_deterministic_in_the_seed_and_a_new_order_each_epoch(small):
    d, docs = small
    kw = dict(seq_len=64, batch_size=4)
    a = take(L.packed_dataset(d, "train", seed=3, **kw), 8)
    assert same_batches(a, take(L.packed_dataset(d, "train", seed=3, **kw), 8))
    assert not same_batches(a, take(L.packed_dataset(d, "train", seed=4, **kw), 8))

    two = list(L.packed_dataset(d, "train", seed=3, num_epochs=2, **kw))
    found = pieces(two, **kw)
    coverage(found, docs, epochs=2)
    firsts = [j for j, p0, *_ in found if p0 == 0]  # each document's first piece, once per epoch
    seen, orders = set(), ([], [])
    for j in firsts:
        orders[j in seen].append(j)
        seen.add(j)
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]


def test_unshuffled_reads_documents_in_file_order(small):
    d, docs = small
    found = pieces(one_epoch(d, seq_len=64, batch_size=4, seed=0, shuffle=False, num_packing_bins=1),
                   seq_len=64, batch_size=4)
    assert [j for j, *_ in found] == sorted(j for j, *_ in found)


@pytest.mark.parametrize("count", [2, 3])
def test_host_shards_are_disjoint_and_complete(corpus, count):
    d, docs = corpus
    per_host = [pieces(one_epoch(d, seq_len=64, batch_size=2, seed=5, shard=(i, count)), seq_len=64,
                       batch_size=2) for i in range(count)]
    coverage([p for host in per_host for p in host], docs)  # exactly once over all hosts
    hosts = [{j for j, *_ in host} for host in per_host]
    assert all(hosts) and sum(map(len, hosts)) == len(set.union(*hosts))


# ----------------------------------------------------------------------------------------------------------
# checkpointing
# ----------------------------------------------------------------------------------------------------------


# both states fall inside a packed group of 8 rows (3 x 3 = 9 rows read); after 22 batches the group
# being emitted holds the end of the first epoch and the start of the second
@pytest.mark.parametrize("n", [3, 22])
def test_resume_from_json_state(small, n):
    d, _ = small
    ds = L.packed_dataset(d, "train", seq_len=64, batch_size=3, seed=7, align=8, num_packing_bins=8)
    it = iter(ds)
    expected = [next(it) for _ in range(n + 5)][n:]
    it = iter(ds)
    for _ in range(n):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(ds)
    resumed.set_state(state)
    assert same_batches(expected, [next(resumed) for _ in range(5)])


def test_resume_with_a_worker_process(small):
    d, _ = small
    kw = dict(seq_len=64, batch_size=4, seed=9)
    expected = take(L.packed_dataset(d, "train", **kw), 6)
    ds = L.packed_dataset(d, "train", worker_count=1, worker_buffer_size=2, **kw)
    it = iter(ds)
    try:
        got = [next(it) for _ in range(3)]
        state = json.loads(json.dumps(it.get_state()))
    finally:
        it.close()
    assert same_batches(expected[:3], got)  # one worker packs what the main process would
    resumed = iter(ds)
    try:
        resumed.set_state(state)
        assert same_batches(expected[3:], [next(resumed) for _ in range(3)])
    finally:
        resumed.close()


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def test_eval_rows_one_deterministic_pass(corpus):
    d, _ = corpus
    val = make_docs(20, seed=1)
    rows = list(L.eval_rows(d, "validation", seq_len=64, batch_size=4))
    batches = [b for b, _ in rows]
    coverage(pieces(batches, seq_len=64, batch_size=4), val)
    assert [n for _, n in rows] == [int(b["mask"].sum()) for b in batches]
    assert sum(n for _, n in rows) == sum(max(len(v) - 1, 0) for v in val)
    again = list(L.eval_rows(d, "validation", seq_len=64, batch_size=4, max_batches=2))
    assert len(again) == 2 and same_batches(batches[:2], [b for b, _ in again])


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


def test_missing_and_corrupt_corpora(tmp_path, small):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        L.load_meta(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        L.packed_dataset(tmp_path, "train", seq_len=8, batch_size=1, seed=0)
    meta = tmp_path / "meta.json"
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        L.load_meta(tmp_path)
    good = json.loads(open(os.path.join(small[0], "meta.json")).read())
    for change, match in [({"format": "other/1"}, "format 'other/1'"), ({"dtype": "int8"}, "dtype 'int8'"),
                          ({"vocab_size": 70_000}, "vocab_size 70000"), ({"splits": {}}, "no 'splits'"),
                          ({"splits": {"train": {}}}, "split 'train' must list its shard")]:
        meta.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            L.load_meta(tmp_path)
    meta.write_text(json.dumps(good))
    with pytest.raises(FileNotFoundError, match="shard 'train-00000-of-00002.array_record'.* is missing"):
        L.load_meta(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'test'.*valid splits: train"):
        L.documents(small[0], "test")


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=1), "seq_len must be an integer >= 2"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(seed=-1), "seed must be"),
    (dict(align=65), "align=65 must be at most seq_len=64"),
    (dict(align=-2), "align must be"),
    (dict(shard=(2, 2)), r"shard index must be an integer in \[0, 2\)"),
    (dict(shard=(-1, 2)), "shard index"),
    (dict(shard=(0, 0)), "shard count must be"),
    (dict(shard=3), "shard must be a pair"),
    (dict(shard=(30, 31)), "30 documents: none left for host 30 of 31"),
    (dict(num_epochs=0), "num_epochs must be"),
    (dict(worker_count=-1), "worker_count must be"),
])
def test_bad_arguments(small, kw, match):
    args = dict(seq_len=64, batch_size=4, seed=0) | kw
    with pytest.raises(ValueError, match=match):
        L.packed_dataset(small[0], "train", **args)


def test_eval_rows_bad_max_batches(small):
    with pytest.raises(ValueError, match="max_batches must be"):
        L.eval_rows(small[0], "train", seq_len=64, batch_size=4, max_batches=0)
