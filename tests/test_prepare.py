"""experiments.prepare: text / JSONL / Parquet -> ArrayRecord token shards. Every document lands
exactly once, in the shard its hash names, in input order; the output does not depend on --workers;
restarts keep finished shards; bad input names the file (and line)."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import prepare
from experiments import tokenizer as tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["the", "memory", "learns", "at", "test", "time", "naïve", "café", "日本語", "🤖", "—", "ok,", "x\ty"]
SEED, FRACTION, SHARDS = 3, 0.2, 3          # 3 train shards, 1 validation shard


def _text(rng, lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(lines))


def _write_jsonl(path, texts, opener=open):
    """One object per line with an extra field; one blank line after the first (not a document)."""
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=i % 2 == 0) for i, t in enumerate(texts)]
    lines.insert(1, "")
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return [(str(path), i if i == 0 else i + 1, t) for i, t in enumerate(texts)]   # index = line - 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file (paragraphs), JSONL, gzipped JSONL and Parquet; returns (glob, expected documents)."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    paras = [_text(rng, rng.integers(1, 4)) for _ in range(15)]
    (root / "a.txt").write_text("\n\n".join(paras) + "\n\n\n", encoding="utf-8")
    docs = [(str(root / "a.txt"), i, p) for i, p in enumerate(paras)]
    docs += _write_jsonl(root / "b.jsonl", [_text(rng, 2) for _ in range(14)] + [""])
    docs += _write_jsonl(root / "c.jsonl.gz", [_text(rng, 3) for _ in range(12)], gzip.open)
    texts = [_text(rng, 2) for _ in range(16)]
    pq.write_table(pa.table({"text": texts, "n": list(range(16))}), root / "d.parquet", row_group_size=5)
    docs += [(str(root / "d.parquet"), i, t) for i, t in enumerate(texts)]
    return str(root / "*"), docs


def _run(corpus, out, **kw):
    args = dict(tokenizer="bytes", text_unit="paragraph", num_shards=SHARDS, validation_fraction=FRACTION,
                seed=SEED, workers=1, progress=False)
    return prepare.prepare(corpus[0], str(out), **{**args, **kw})


def _records(out) -> dict[str, list[np.ndarray]]:
    meta = prepare.read_meta(str(out))
    return {name: list(prepare.iter_shard(os.path.join(out, name), meta["dtype"]))
            for split in prepare.SPLITS for name in meta["splits"][split]["shards"]}


def _expected(docs, tok, num_shards=SHARDS) -> dict[str, list[np.ndarray]]:
    """Each shard's records: the encodings of its non-empty documents, in input order."""
    out = {prepare.shard_name(s, i, n): [] for s, n in (("train", num_shards),
                                                       ("validation", prepare.validation_shards(num_shards)))
           for i in range(n)}
    for source, index, text in docs:
        split, shard = prepare.assign(SEED, source, index, FRACTION, num_shards)
        n = num_shards if split == "train" else prepare.validation_shards(num_shards)
        if text:
            out[prepare.shard_name(split, shard, n)].append(tok.encode(text))
    return out


def _same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(
        len(got[k]) == len(want[k]) and all(map(np.array_equal, got[k], want[k])) for k in got)


def test_iter_documents_reads_every_format(corpus):
    pattern, docs = corpus
    paths = prepare.expand_inputs(pattern)
    assert paths == sorted(paths) and [os.path.basename(p) for p in paths] == \
        ["a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet"]
    seen = []
    assert list(prepare.iter_documents(paths, text_unit="paragraph", report=seen.append)) == docs
    assert sum(seen) == sum(os.path.getsize(p) for p in paths)


def test_text_units(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\n  \nthree\r\n\r\nfour")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("zipped\n\nfile")
    paths = prepare.expand_inputs([str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")])
    assert [t for _, _, t in prepare.iter_documents(paths, text_unit="paragraph")] == \
        ["one\ntwo", "three", "four", "zipped", "file"]
    assert [t for _, _, t in prepare.iter_documents(paths)] == \
        ["one\ntwo\n\n\n  \nthree\r\n\r\nfour", "zipped\n\nfile"]


def test_every_document_once_in_its_shard_and_counts(corpus, tmp_path):
    meta = _run(corpus, tmp_path / "out")
    assert meta == prepare.read_meta(str(tmp_path / "out"))
    tok = tokenizers.load(str(tmp_path / "out" / meta["tokenizer"]))
    assert tok.kind == "bytes" and meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    got, want = _records(tmp_path / "out"), _expected(corpus[1], tok)
    assert _same(got, want)
    assert all(r.dtype == np.uint16 for rs in got.values() for r in rs)
    texts = [t for _, _, t in corpus[1]]
    for split in prepare.SPLITS:
        entry = meta["splits"][split]
        records = [r for n in entry["shards"] for r in got[n]]
        assert entry["documents"] == len(records) > 0
        assert entry["tokens"] == sum(map(len, records)) == entry["bytes"]     # bytes tokenizer
    assert sum(meta["splits"][s]["documents"] for s in prepare.SPLITS) == sum(map(bool, texts))
    assert sum(meta["splits"][s]["skipped_empty"] for s in prepare.SPLITS) == texts.count("") == 1
    assert meta["inputs"] == prepare.expand_inputs(corpus[0]) and meta["seed"] == SEED


def test_workers_and_passes_do_not_change_the_output(corpus, tmp_path, monkeypatch):
    one, two = _run(corpus, tmp_path / "one"), _run(corpus, tmp_path / "two", workers=2)
    monkeypatch.setattr(prepare, "_MAX_OPEN", 1)                      # 4 passes over the input
    passes = _run(corpus, tmp_path / "passes", workers=2)
    assert one == two == passes
    for name in one["splits"]["train"]["shards"] + one["splits"]["validation"]["shards"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes() == \
            (tmp_path / "passes" / name).read_bytes()


def test_restart_rewrites_only_missing_shards_and_refuses_other_flags(corpus, tmp_path):
    out = tmp_path / "out"
    meta = _run(corpus, out)
    names = meta["splits"]["train"]["shards"] + meta["splits"]["validation"]["shards"]
    before = {n: (out / n).read_bytes() for n in names}
    old = 1_000_000_000
    for n in names:
        os.utime(out / n, ns=(old, old))
    os.remove(out / names[1])
    (out / (names[2] + ".tmp")).write_bytes(b"half-written")          # an interrupted shard: redone
    os.remove(out / names[2])
    os.remove(out / "meta.json")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        prepare.read_meta(str(out))
    assert _run(corpus, out) == meta
    assert {n: (out / n).read_bytes() for n in names} == before
    assert [n for n in names if os.stat(out / n).st_mtime_ns != old] == names[1:3]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]

    with pytest.raises(ValueError, match=r"different settings \(seed\); pass --overwrite"):
        _run(corpus, out, seed=SEED + 1)
    assert _run(corpus, out) == meta                                   # the refusal changed nothing
    other = _run(corpus, out, num_shards=2, overwrite=True)
    assert other["splits"]["train"]["shards"] == [prepare.shard_name("train", i, 2) for i in range(2)]
    assert not (out / names[0]).exists()                               # the old shards are gone

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a corpus")
    with pytest.raises(ValueError, match="is not empty and holds no prepare_config.json"):
        _run(corpus, tmp_path / "mine")


def test_bpe_tokenizer_is_trained_and_saved(corpus, tmp_path):
    meta = _run(corpus, tmp_path / "out", tokenizer="bpe:300")
    tok = tokenizers.load(str(tmp_path / "out" / "tokenizer"))
    assert tok.kind == "hf" and meta["vocab_size"] == tok.vocab_size
    assert meta["eos_id"] == tok.eos_id is not None
    got = _records(tmp_path / "out")
    assert _same(got, _expected(corpus[1], tok))
    decoded = sorted(tok.decode(r) for rs in got.values() for r in rs)
    assert decoded == sorted(t for _, _, t in corpus[1] if t)
    assert meta["splits"]["train"]["tokens"] < meta["splits"]["train"]["bytes"]


def test_max_docs_and_read_meta_errors(corpus, tmp_path):
    meta = _run(corpus, tmp_path / "out", max_docs=20)
    assert sum(meta["splits"][s]["documents"] for s in prepare.SPLITS) == 20   # the first 20 are not empty
    assert _same(_records(tmp_path / "out"), _expected(corpus[1][:20], tokenizers.load("bytes")))
    assert (prepare.token_dtype(65536), prepare.token_dtype(65537)) == ("uint16", "uint32")

    out = tmp_path / "out"
    os.remove(out / meta["splits"]["train"]["shards"][0])
    with pytest.raises(FileNotFoundError, match="train-00000-of-00003.array_record"):
        prepare.read_meta(str(out))
    (out / "meta.json").write_text("{broken")
    with pytest.raises(ValueError, match="meta.json is not valid JSON"):
        prepare.read_meta(str(out))
    (out / "meta.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ValueError, match="format 'other/1'"):
        prepare.read_meta(str(out))
    with pytest.raises(FileNotFoundError, match="no meta.json in .*experiments/prepare.py"):
        prepare.read_meta(str(tmp_path))


def test_worker_errors_stop_the_run_and_a_fixed_rerun_starts_afresh(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(40)) + "{oops\n")
    out = tmp_path / "out"
    for workers in (1, 2):
        with pytest.raises(ValueError, match=f"{src}:41: not valid JSON"):
            prepare.prepare(str(src), str(out), num_shards=2, workers=workers, progress=False)
    assert not (out / "meta.json").exists()
    src.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(41)))
    meta = prepare.prepare(str(src), str(out), num_shards=2, workers=2, progress=False)   # no --overwrite
    assert sum(meta["splits"][s]["documents"] for s in prepare.SPLITS) == 41


def _docs(path, **kw):
    return list(prepare.iter_documents([str(path)], **kw))


def test_bad_input_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found: .*missing.txt"):
        prepare.expand_inputs(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=r"matches no files"):
        prepare.expand_inputs(str(tmp_path / "*.jsonl"))
    with pytest.raises(ValueError, match="no input files"):
        prepare.expand_inputs(" , ")

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("ok\n\ncaf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}: not valid UTF-8 at byte offset 7"):
        _docs(latin)
    with pytest.raises(ValueError, match=f"{latin}: not valid UTF-8 at byte offset 7"):
        _docs(latin, text_unit="paragraph")

    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=f"{jl}:2: no field 'text' \\(fields: 'body'\\)"):
        _docs(jl)
    jl.write_text('{"text": "fine"}\n\n{"text": "unterminated\n')
    with pytest.raises(ValueError, match=f"{jl}:3: not valid JSON"):
        _docs(jl)
    jl.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=f"{jl}:1: field 'text' is int"):
        _docs(jl)
    jl.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"{jl}:1: not valid UTF-8 at byte offset 13"):
        _docs(jl)
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(ValueError, match=f"{gz}: corrupt gzip"):
        _docs(gz)

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="x.parquet: no column 'text' \\(columns: 'content'\\)"):
        _docs(tmp_path / "x.parquet")
    (tmp_path / "y.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="y.parquet: not a readable Parquet file"):
        _docs(tmp_path / "y.parquet")
    with pytest.raises(ValueError, match="cannot tell the format of .*data.csv"):
        _docs(tmp_path / "data.csv")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.prepare", "--noprogress", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_command_line(corpus, tmp_path):
    proc = _cli(f"--inputs={corpus[0]}", f"--output={tmp_path / 'out'}", "--text_unit=paragraph",
                "--workers=2", f"--num_shards={SHARDS}", f"--validation_fraction={FRACTION}",
                f"--seed={SEED}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert len(lines) == 1 and summary["output"] == str(tmp_path / "out")
    meta = prepare.read_meta(str(tmp_path / "out"))
    assert summary["train_documents"] == meta["splits"]["train"]["documents"]
    assert summary["validation_tokens"] == meta["splits"]["validation"]["tokens"]
    assert summary["skipped_empty"] == 1 and summary["seconds"] >= 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    proc = _cli(f"--inputs={bad}", f"--output={tmp_path / 'bad_out'}", "--workers=1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 2 and lines[0].startswith(f"prepare: error: {bad}:2: no field 'text'"), proc.stderr
    assert lines[1] == "(python -m experiments.prepare --helpshort lists the flags)"


def test_exclude_leaves_files_out(tmp_path):
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    got = prepare.expand_inputs(f"{tmp_path}/**/*.txt", exclude=["*/sub/*", "*/b.txt"])
    assert [os.path.basename(p) for p in got] == ["a.txt"]
    with pytest.raises(ValueError, match="leaves none"):
        prepare.expand_inputs(f"{tmp_path}/**/*.txt", exclude=["*.txt"])
