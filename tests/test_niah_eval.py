"""experiments/niah_eval.py: RULER-style S-NIAH prompts (exact length, needle at depth), the scoring
(independent of the model's ability: oracle / wrong fake runners), the answer log-likelihood against
the model's logits, and the command line."""

import json
import os
import re
import subprocess
import sys
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import configs, data, train
from experiments import niah_eval as ne
from experiments import tokenizer as tokenizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the subprocesses share the suite's persistent compilation cache (conftest.py)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2"}
BYTES = tokenizers.load("bytes")
SENTENCE_END = re.compile(r"[.!?][\"')\]]?\s")
WORDS = ("river", "stone", "light", "garden", "window", "winter", "music", "paper", "morning", "silver",
         "the", "a", "of", "and", "under", "over", "quiet", "green", "old", "small")


def _text(seed: int, sentences: int) -> str:
    """Sentences of 3-11 words ending in '.', '!' or '?', a paragraph break now and then."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(sentences):
        words = " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))
        out.append(words[0].upper() + words[1:] + rng.choice([".", ".", ".", "!", "?"]))
        out.append("\n\n" if i % 7 == 6 else " ")
    return "".join(out)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hay") / "text.txt"
    path.write_text(_text(0, 150))  # ~8 KB
    return str(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_file):
    """A tiny byte-level run (3 steps), trained once for the module."""
    workdir = str(tmp_path_factory.mktemp("niah_run") / "run")
    cfg = configs.override(configs.get("charlm"), [
        "steps=3", "batch=2", "seq_len=32", "eval_every=3", "eval_batches=1", "checkpoint_every=3",
        "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.chunk_size=16"])
    train.train(cfg, workdir, data_path=text_file, progress=False)
    return workdir


@pytest.fixture(scope="module")
def hay(text_file):
    return ne.load_haystack(text_file, BYTES, 1024)


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("needle", list(ne.NEEDLES))
@pytest.mark.parametrize("length", [512, 777])
def test_prompts_are_exact_length_one_needle_at_depth_question_last(hay, needle, length):
    s = ne.build_samples(hay, BYTES, length, needle, samples=3, depths=5, seed=1)
    assert s.prompts.shape == (15, length) and s.prompts.dtype == np.int32
    np.testing.assert_array_equal(s.depths, np.repeat([0, 0.25, 0.5, 0.75, 1], 3))
    for i, row in enumerate(s.prompts):
        text = BYTES.decode(row)
        assert len(text) == length  # bytes: one token per character (the test text is ASCII)
        t = ne.templates(needle, s.keys[i], s.values[i])
        assert text.startswith(t["prefix"]) and text.endswith(t["question"])
        assert text.count(t["needle"]) == 1 and text.count(s.values[i]) == 1 and text.count(s.keys[i]) == 3
        at = text.index(t["needle"])
        assert at == s.needle_at[i] and len(t["needle"]) == s.needle_len[i]
        # the haystack around the needle is a window of the haystack file, cut at the needle
        h0, n_hay = int(s.haystack_at[i]), int(s.haystack_len[i])
        hay_text = text[h0:at] + text[at + len(t["needle"]):h0 + n_hay + len(t["needle"])]
        assert len(hay_text) == n_hay and hay_text in BYTES.decode(hay.tokens)
        assert n_hay == length - len(t["prefix"]) - len(t["needle"]) - len(t["question"])
        # at a sentence boundary, at most one sentence away from the requested depth
        p, target = at - h0, int(round(s.depths[i] * n_hay))
        assert p == 0 or (hay_text[p - 1] in ".!?" and (p == n_hay or hay_text[p].isspace())), p
        lo, hi = sorted((p, target))
        assert len(SENTENCE_END.findall(hay_text[lo:hi])) <= 1, (p, target)
        assert s.placed[i] == p / n_hay
        assert BYTES.decode(s.answer_ids[i]) == " " + s.values[i]


def test_values_keys_and_determinism(hay):
    a = ne.build_samples(hay, BYTES, 600, "passkey", samples=8, depths=3, seed=5)
    b = ne.build_samples(hay, BYTES, 600, "passkey", samples=8, depths=3, seed=5)
    c = ne.build_samples(hay, BYTES, 600, "passkey", samples=8, depths=3, seed=6)
    np.testing.assert_array_equal(a.prompts, b.prompts)
    assert a.values == b.values and a.keys == b.keys
    assert a.values != c.values and not np.array_equal(a.prompts, c.prompts)
    assert len(set(a.values)) == len(a.values) == 24 and len(set(a.keys)) == 24
    assert all(re.fullmatch(r"[1-9]\d{4,6}", v) for v in a.values)
    assert len({len(v) for v in a.values}) > 1  # 5, 6 and 7 digits
    # another length draws its own prompts; a length's prompts do not depend on the others
    d = ne.build_samples(hay, BYTES, 601, "passkey", samples=8, depths=3, seed=5)
    assert d.values != a.values
    for needle, pattern in [("number", r"[1-9]\d{6}"), ("word", r"[a-z]+-[a-z]+"),
                            ("uuid", r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")]:
        s = ne.build_samples(hay, BYTES, 600, needle, samples=4, depths=2, seed=0)
        assert all(re.fullmatch(pattern, v) for v in s.values), s.values
        assert len(set(s.values)) == 8
        if needle == "word":
            assert not set(s.values) & set(s.keys)
        if needle == "uuid":
            assert all(str(uuid.UUID(v)) == v for v in s.values)


def test_noise_haystack_and_ruler_names():
    noise = ne.load_haystack("noise", BYTES, 700)
    s = ne.build_samples(noise, BYTES, 700, "passkey", samples=2, depths=3, seed=0)
    for i, row in enumerate(s.prompts):
        text = BYTES.decode(row)
        h0, at, n = int(s.haystack_at[i]), int(s.needle_at[i]), int(s.needle_len[i])
        hay_text = text[h0:at] + text[at + n:h0 + int(s.haystack_len[i]) + n]
        assert len(hay_text) == s.haystack_len[i] and hay_text in data.NOISE_FILLER * 20
    assert ne.ruler_task("passkey", "noise") == "niah_single_1"
    assert ne.ruler_task("number", "essay.txt") == "niah_single_2"
    assert ne.ruler_task("uuid", "essay.txt") == "niah_single_3"
    assert ne.ruler_task("word", "essay.txt") == "niah_single_3 (word values)"
    assert ne.ruler_task("passkey", "essay.txt") is None and ne.ruler_task("number", "noise") is None
    t = ne.templates("number", "gentle-harbor", "1234567")
    assert t["needle"] == " One of the special magic numbers for gentle-harbor is: 1234567."
    assert t["question"] == (
        "\nWhat is the special magic number for gentle-harbor mentioned in the provided text? "
        "The special magic number for gentle-harbor mentioned in the provided text is")


def test_bpe_prompts_are_exact_length():
    tok = tokenizers.train_bpe([_text(s, 40) for s in range(6)], 300)
    h = ne.load_haystack("noise", tok, 900)
    for length in (ne.min_length(tok, "word"), 900):
        s = ne.build_samples(h, tok, length, "word", samples=2, depths=3, seed=0)
        assert s.prompts.shape == (6, length)
        for i, row in enumerate(s.prompts):
            text = tok.decode(row)
            assert text.count(s.values[i]) == 1 and text.endswith("mentioned in the provided text is")


def test_corpus_directory_haystack(tmp_path, text_file):
    from experiments import prepare

    out = tmp_path / "corpus"
    prepare.prepare(text_file, str(out), tokenizer="bytes", text_unit="paragraph", num_shards=1,
                    validation_fraction=0.5, seed=0, workers=1, progress=False)
    h = ne.load_haystack(str(out), BYTES, 300)
    text = BYTES.decode(h.tokens)
    paragraphs = [p.strip() for p in open(text_file).read().split("\n\n")]
    assert all(p.strip() in paragraphs for p in text.split("\n\n"))
    assert h.starts[0] == 0 and len(h.starts) > 10
    with pytest.raises(ValueError, match=r"has \d+ tokens .* fewer than the 100000 needed"):
        ne.load_haystack(str(out), BYTES, 100_000)


def test_length_and_haystack_errors(hay, text_file, tmp_path):
    shortest = ne.min_length(BYTES, "uuid")
    ne.build_samples(hay, BYTES, shortest, "uuid", samples=2, depths=2)
    with pytest.raises(ValueError, match=f"length {shortest - 1} is too short .* >= {shortest}"):
        ne.build_samples(hay, BYTES, shortest - 1, "uuid")
    n = len(open(text_file).read())
    with pytest.raises(ValueError, match=f"haystack {re.escape(text_file)} has {n} tokens"):
        ne.load_haystack(text_file, BYTES, n + 1)
    with pytest.raises(FileNotFoundError, match="haystack not found"):
        ne.load_haystack(str(tmp_path / "nope.txt"), BYTES, 10)
    with pytest.raises(ValueError, match="unknown needle"):
        ne.templates("needle")


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------


class FakeRunner:
    """A "model" that answers from the prompt: ``mode="oracle"`` reads the needle's value (and
    writes what a model would: `` VALUE.`` then text), ``"wrong"`` answers zeros, ``"half"`` is an
    oracle on even rows only. Its answer log-likelihood is minus the prompt's index in ``values``
    (0 without them). It records the shapes it was called with."""

    def __init__(self, tok, mode="oracle", values=None):
        self.tok, self.mode, self.values, self.calls = tok, mode, values, []

    def _value(self, row):
        return re.search(r" is: (\S+)\.", self.tok.decode(row)).group(1)

    def decode(self, prompts, steps):
        self.calls.append(("decode", prompts.shape, steps))
        out = np.zeros((len(prompts), steps), np.int32)
        for i, row in enumerate(prompts):
            value = self._value(row)
            if self.mode == "wrong" or (self.mode == "half" and self.values.index(value) % 2):
                value = "0" * len(value)
            ids = self.tok.encode(f" {value}. And so")[:steps]
            out[i, :len(ids)] = ids
        return out

    def answer_logprobs(self, prompts, answer_ids, width=None):
        self.calls.append(("logprobs", prompts.shape, width))
        assert [self.tok.decode(a) for a in answer_ids] == [" " + self._value(r) for r in prompts]
        if self.values is None:
            return np.zeros(len(prompts))
        return -np.array([self.values.index(self._value(r)) for r in prompts], np.float64)


def test_scoring_with_fake_models(hay):
    s = ne.build_samples(hay, BYTES, 600, "number", samples=2, depths=3, seed=0)
    oracle = FakeRunner(BYTES, values=s.values)
    r = ne.score(oracle, BYTES, s)
    assert r["accuracy"] == 1.0 and r["correct"].all() and r["samples"] == 6
    # answers " 1234567": 8 tokens
    assert oracle.calls == [("decode", (6, 600), 8 + ne.EXTRA_TOKENS), ("logprobs", (6, 600), 8)]
    assert r["predictions"][0].startswith(" " + s.values[0])
    assert r["answer_logprob"] == -2.5
    np.testing.assert_array_equal(r["logprob"], -np.arange(6))
    assert r["by_depth"] == {"0": {"samples": 2, "accuracy": 1.0, "answer_logprob": -0.5},
                             "50": {"samples": 2, "accuracy": 1.0, "answer_logprob": -2.5},
                             "100": {"samples": 2, "accuracy": 1.0, "answer_logprob": -4.5}}
    assert ne.score(FakeRunner(BYTES, "wrong", s.values), BYTES, s)["accuracy"] == 0.0
    half = ne.score(FakeRunner(BYTES, "half", s.values), BYTES, s)
    np.testing.assert_array_equal(half["correct"], [True, False] * 3)
    assert half["accuracy"] == 0.5 and [d["accuracy"] for d in half["by_depth"].values()] == [0.5] * 3
    # in calls of 4 prompts: the last call topped up to 4 (one shape), the same results
    batched = FakeRunner(BYTES, "half", s.values)
    r4 = ne.score(batched, BYTES, s, batch_size=4)
    assert [c[1] for c in batched.calls] == [(4, 600)] * 4
    np.testing.assert_array_equal(r4["correct"], half["correct"])
    np.testing.assert_array_equal(r4["logprob"], half["logprob"])
    assert r4["predictions"] == half["predictions"]
    # RULER's string match: the value anywhere in the output, case-insensitive
    got = ne.string_match([" 123", "x 123 y", "12", "AB-c"], ["123", "123", "123", "ab-C"])
    np.testing.assert_array_equal(got, [True, True, False, True])


def test_the_runs_tokenizer(tmp_path):
    assert ne.load_tokenizer(str(tmp_path)).kind == "bytes"
    tokenizers.train_bpe([_text(s, 40) for s in range(6)], 300).save(tmp_path / "tokenizer")
    tok = ne.load_tokenizer(str(tmp_path))
    assert tok.kind == "hf" and tok.vocab_size == 300


def test_decode_text_cuts_at_eos():
    class Tok:
        eos_id, vocab_size = 0, 256
        decode = staticmethod(BYTES.decode)

    assert ne.decode_text(Tok(), np.array([72, 105, 0, 72])) == "Hi"
    assert ne.decode_text(BYTES, np.array([72, 105, 300, 33])) == "Hi!"  # beyond the vocabulary: dropped


def test_evaluate_with_an_oracle_model(run_dir, text_file, tmp_path, monkeypatch):
    """The whole evaluation (run, tokenizer, haystack, rows, plot) with the model swapped for an oracle."""
    monkeypatch.setattr(ne, "Runner", lambda model: FakeRunner(BYTES))
    rows = []
    out = ne.evaluate(run_dir, text_file, [700, 500], needle="word", samples=2, depths=3, seed=0,
                      output_dir=str(tmp_path / "plots"), emit=rows.append)
    assert out == rows and [r["length"] for r in rows[:2]] == [500, 700]
    for r in rows[:2]:
        assert r["accuracy"] == 1.0 and r["samples"] == 6 and r["step"] == 3 and r["needle"] == "word"
        assert r["ruler"] == "niah_single_3 (word values)" and set(r["by_depth"]) == {"0", "50", "100"}
    assert rows[2]["summary"] and rows[2]["accuracy"] == 1.0 and rows[2]["lengths"] == [500, 700]
    assert os.path.isfile(tmp_path / "plots" / "niah.png")
    monkeypatch.setattr(ne, "Runner", lambda model: FakeRunner(BYTES, "wrong"))
    assert ne.evaluate(run_dir, "noise", [500], depths=1, output_dir=str(tmp_path))[0]["accuracy"] == 0.0


def test_evaluate_errors(run_dir, text_file, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="haystack not found"):
        ne.evaluate(run_dir, str(tmp_path / "missing.txt"), [512])
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        ne.evaluate(str(tmp_path / "norun"), text_file, [512])
    with pytest.raises(ValueError, match="length 100 is too short"):
        ne.evaluate(run_dir, text_file, [100, 512])
    n = len(open(text_file).read())
    with pytest.raises(ValueError, match=f"has {n} tokens"):
        ne.evaluate(run_dir, text_file, [512, 2 * n])
    for bad, message in [(dict(lengths=[]), "empty"), (dict(samples=0), "samples"),
                         (dict(depths=0), "depths"), (dict(needle="pin"), "unknown needle"),
                         (dict(batch_size=-1), "batch_size"), (dict(lengths=["5a"]), "integers")]:
        kw = {"lengths": [512], **bad}
        with pytest.raises(ValueError, match=message):
            ne.evaluate(run_dir, text_file, kw.pop("lengths"), **kw)
    bpe = tokenizers.train_bpe([_text(s, 40) for s in range(6)], 300)
    monkeypatch.setattr(ne, "load_tokenizer", lambda workdir: bpe)
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but its model only 256"):
        ne.evaluate(run_dir, text_file, [512])
    monkeypatch.undo()
    real = train.load_run

    def as_mqar(*a, **k):
        cfg, *rest = real(*a, **k)
        return (configs.override(cfg, ["task=mqar"]), *rest)

    monkeypatch.setattr(train, "load_run", as_mqar)
    with pytest.raises(ValueError, match="is an MQAR run"):
        ne.evaluate(run_dir, text_file, [512])


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


def test_answer_logprob_equals_the_models_logits(run_dir):
    cfg, graphdef, params, rest, _ = train.load_run(run_dir)
    model = train.merge(graphdef, params, rest)
    runner = ne.Runner(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(32, 127, size=(3, 40)).astype(np.int32)
    answers = [rng.integers(48, 58, size=n).astype(np.int32) for n in (5, 7, 6)]
    got = runner.answer_logprobs(prompts, answers)
    pad = np.zeros((3, 7), np.int32)
    for i, a in enumerate(answers):
        pad[i, :len(a)] = a
    seq = np.concatenate([prompts, pad], axis=1)                                      # [3, 47]
    forward = nnx.jit(lambda m, x: m(x))                                               # the plain forward
    logp = np.asarray(jax.nn.log_softmax(forward(model, jnp.asarray(seq)), axis=-1))  # [3, 47, V]
    for i, a in enumerate(answers):
        want = np.mean([logp[i, 40 - 1 + j, a[j]] for j in range(len(a))])
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    # greedy recurrent decoding continues the prompt as the full forward's argmax does
    out = runner.decode(prompts, 3)
    assert out.shape == (3, 3) and out.dtype == np.int32
    seq = np.concatenate([prompts, out[:, :2]], axis=1)                               # [3, 42]
    full = np.asarray(forward(model, jnp.asarray(seq)))                               # [3, 42, V]
    np.testing.assert_array_equal(out, np.argmax(full[:, 39:], -1))


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.niah_eval", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.slow   # ~20-30 s: compiles the decoder and the forward
def test_command_line_end_to_end(run_dir, text_file, tmp_path):
    proc = _cli(f"--workdir={run_dir}", f"--haystack={text_file}", "--lengths=420", "--samples=1",
                "--depths=2", "--needle=number", "--batch_size=1", f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["length"] == 420 and lines[0]["samples"] == 2
    assert 0.0 <= lines[0]["accuracy"] <= 1.0 and -np.inf < lines[0]["answer_logprob"] < 0
    assert set(lines[0]["by_depth"]) == {"0", "100"} and lines[0]["ruler"] == "niah_single_2"
    assert lines[1]["summary"] and lines[1]["plot"] == str(tmp_path / "niah.png")
    assert os.path.isfile(tmp_path / "niah.png")


def test_command_line_usage_error(run_dir, tmp_path):
    proc = _cli(f"--workdir={run_dir}", f"--haystack={tmp_path / 'missing.txt'}", timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 2 and lines[0].startswith("niah_eval: error: haystack not found"), lines
    assert lines[1] == "(python -m experiments.niah_eval --helpshort lists the flags)"
