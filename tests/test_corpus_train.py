"""Training on a tokenized corpus end to end: experiments.prepare -> lm_data's packed rows (with
``segment_ids``, documents on the chunk grid) -> experiments.train; the run carries its tokenizer, a
resumed run continues with the exact next batch, and a corpus of another vocabulary is refused."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import configs, evaluate, prepare
from experiments import train as train_lib

TEXT = "\n\n".join(f"Paragraph {i}: " + " ".join(f"word{(i * 7 + j) % 53}" for j in range(5 + i % 40))
                   for i in range(400))
TINY = configs.override(configs.get("corpus"), [
    "steps=6", "batch=2", "seq_len=64", "log_every=1", "eval_every=3", "eval_batches=2", "checkpoint_every=2",
    "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.chunk_size=16"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "text.txt").write_text(TEXT)
    prepare.prepare([str(root / "text.txt")], str(root / "bpe"), tokenizer="bpe:300", text_unit="paragraph",
                    num_shards=2, validation_fraction=0.1, workers=1, progress=False)
    prepare.prepare([str(root / "text.txt")], str(root / "bytes"), tokenizer="bytes", text_unit="paragraph",
                    num_shards=2, validation_fraction=0.1, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """One finished 6-step run on the BPE corpus: ``(workdir, summary)``."""
    workdir = str(tmp_path_factory.mktemp("run") / "a")
    return workdir, train_lib.train(TINY, workdir, data_path=str(corpus / "bpe"), progress=False)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def test_corpus_run_resumes_exactly_and_carries_its_tokenizer(corpus, run, tmp_path):
    data = str(corpus / "bpe")
    (a, summary), b = run, str(tmp_path / "b")
    assert summary["config"]["model"]["vocab_size"] == 300 and summary["finished"]
    assert np.isfinite(summary["val_perplexity"]) and summary["val_bits_per_byte"] > 0
    train_lib.train(TINY, b, data_path=data, stop_after=3, progress=False)
    shutil.rmtree(os.path.join(b, "checkpoints", "3"))      # a crash before step 3's checkpoint: resume at 2
    train_lib.train(TINY, b, data_path=data, resume="auto", progress=False)
    np.testing.assert_array_equal([r["loss"] for r in _rows(b)], [r["loss"] for r in _rows(a)])
    _, _, pa, _, _ = train_lib.load_run(a)
    _, _, pb, _, _ = train_lib.load_run(b)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    tok = train_lib.run_tokenizer(a)
    assert tok.vocab_size == 300 and tok.decode(tok.encode("Paragraph 7: word3")) == "Paragraph 7: word3"
    out = evaluate.evaluate_run(a, data_path=data)
    assert out["eval_val_loss"] == pytest.approx(summary["eval_val_loss"], rel=1e-6)


def test_training_batches_are_packed_and_aligned(corpus):
    task = train_lib.make_task(train_lib.corpus_config(TINY, str(corpus / "bpe")), str(corpus / "bpe"))
    assert task.segment_align == 16 and task.local_rows
    it = task.iterator(0, None)
    most = 0
    for _ in range(30):
        batch = next(it)
        assert set(batch) == {"inputs", "targets", "mask", "segment_ids"}
        seg = batch["segment_ids"]
        starts = (seg != 0) & (seg != np.pad(seg, ((0, 0), (1, 0)))[:, :-1])
        assert np.all(np.nonzero(starts)[1] % 16 == 0)
        most = max(most, int(seg.max()))
    assert most >= 2   # rows hold several documents
    with pytest.raises(train_lib.TrainingError, match="no data-iterator state"):
        task.iterator(5, None)


def test_a_corpus_of_another_vocabulary_is_refused(corpus, run, tmp_path):
    with pytest.raises(ValueError, match="256-token vocabulary .* the model has 300"):
        evaluate.evaluate_run(run[0], data_path=str(corpus / "bytes"))
    with pytest.raises(ValueError, match="needs --data=DIR"):
        train_lib.train(TINY, str(tmp_path / "x"), progress=False)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        train_lib.train(TINY, str(tmp_path / "x"), data_path=str(tmp_path), progress=False)


def test_eval_lm_scores_every_validation_target_once_at_each_length(corpus, run):
    from experiments import eval_lm, lm_data

    data = str(corpus / "bpe")
    val = lm_data.load_meta(data)["splits"]["validation"]
    results = eval_lm.evaluate_lengths(run[0], data, [1, 2])
    assert [r["length"] for r in results] == [64, 128]
    for r in results:
        assert r["tokens"] == val["tokens"] - val["documents"]   # every target once
        by_pos = [b for b in r["loss_by_position"] if b["tokens"]]
        assert sum(b["tokens"] for b in by_pos) == r["tokens"]
        assert sum(b["loss"] * b["tokens"] for b in by_pos) / r["tokens"] == pytest.approx(r["loss"], rel=1e-9)
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]))
    np.testing.assert_array_equal(eval_lm.buckets(64), [0, 1, 2, 4, 8, 16, 32, 64])
    with pytest.raises(ValueError, match="256-token vocabulary"):
        eval_lm.evaluate_lengths(run[0], str(corpus / "bytes"), [1])
