"""experiments/lm_eval_adapter.py: the lm-evaluation-harness model ``miras_jax`` on a tiny byte-level
run. Its log-likelihoods (batched, padded, bucketed) equal the model's own cross-entropy on unpadded
sequences; rolling windows score every token once; greedy generation through prefill + step equals
argmax decoding with the full forward and stops at ``until``; a local task runs offline end to end."""

import os

# lm-eval reads datasets through Hugging Face libraries: never the network here
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("lm_eval")

from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402

from experiments import configs, data, train  # noqa: E402
from experiments import lm_eval_adapter as adapter  # noqa: E402
from experiments import tokenizer as tokenizers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "data", "lm_eval_task")
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt.gz")
# the subprocesses share the suite's persistent compilation cache (conftest.py)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
       "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
# float32 log-probabilities summed over ~20-40 tokens: the batched program against the unpadded one
RTOL, ATOL = 1e-5, 1e-4


def _text(chars: int) -> str:
    with gzip.open(SHAKESPEARE, "rt") as f:
        return f.read(chars)


TEXT = _text(400)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-step charlm run (1 Moneta layer, width 32) on 6 KB of Shakespeare."""
    root = tmp_path_factory.mktemp("lm_eval_run")
    corpus = root / "text.txt"
    corpus.write_text(_text(6000))
    cfg = configs.override(configs.get("charlm"), [
        "steps=3", "batch=2", "seq_len=32", "eval_every=3", "eval_batches=1", "checkpoint_every=3",
        "model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.chunk_size=16"])
    workdir = str(root / "run")
    train.train(cfg, workdir, data_path=str(corpus), progress=False)
    return workdir


@pytest.fixture(scope="module")
def lm(run_dir):
    return adapter.MirasEvalLM(run_dir, batch_size=4)


@pytest.fixture(scope="module")
def forward(run_dir):
    """``tokens [t] -> logits [t, V]``: the saved model's plain forward on one unpadded row."""
    _, graphdef, params, rest, _ = train.load_run(run_dir)
    gdef, state = nnx.split(train.merge(graphdef, params, rest))
    fn = jax.jit(lambda s, t: nnx.merge(gdef, s)(t))
    return lambda toks: fn(state, jnp.asarray([list(toks)], jnp.int32))[0]


def _req(kind, args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _direct(forward, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """``-sum CE`` of ``cont`` after ``ctx`` and whether argmax reproduces it: one forward."""
    seq = ctx + cont
    logp, greedy = _score(forward(seq[:-1])[-len(cont):], jnp.asarray(cont, jnp.int32))
    return float(logp), bool(greedy)


@jax.jit   # eagerly, each new continuation length compiled each of these ops again
def _score(logits, cont):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, cont)
    return -jnp.sum(ce), jnp.all(jnp.argmax(logits, -1) == cont)


def _ids(text: str) -> list[int]:
    return [int(i) for i in data.encode(text)]


def test_registered_beside_lm_evals_own_models():
    assert get_model(adapter.MODEL_NAME) is adapter.MirasEvalLM
    assert "hf" in model_registry and "dummy" in model_registry   # lm-eval's own models still listed


def test_loglikelihood_equals_the_models_cross_entropy(lm, forward):
    """Six pairs of 21-41 tokens in two batches of 4 (buckets 64 and 32, empty padding rows): one with
    a trailing-space context (the space is scored with the continuation), one with an empty context
    (no eos: its first byte is the context) and one whose continuation is the model's greedy byte."""
    pairs = [(TEXT[:12], TEXT[12:21]), (TEXT[:5], TEXT[5:22]), (TEXT[:30], TEXT[30:41]), ("", TEXT[:21])]
    spaced = next(k for k in range(15, 40) if TEXT[k - 1] == " ")
    pairs.append((TEXT[:spaced], TEXT[spaced:23]))
    # a context whose greedy next byte is ASCII (a one-character continuation): is_greedy is True
    starts = list(range(0, 200, 7))
    greedy = [int(jnp.argmax(forward(_ids(TEXT[k:k + 20]))[-1])) for k in starts]
    k, g = next((k, g) for k, g in zip(starts, greedy) if 32 <= g < 127)
    pairs.append((TEXT[k:k + 20], chr(g)))
    got = lm.loglikelihood([_req("loglikelihood", p) for p in pairs])
    assert len(got) == len(pairs)
    for (ctx, cont), (logp, is_greedy) in zip(pairs, got):
        spaces = len(ctx) - len(ctx.rstrip())      # lm-eval's rule: trailing spaces join the continuation
        ctx, cont = ctx[:len(ctx) - spaces], ctx[len(ctx) - spaces:] + cont
        c, x = (_ids(ctx), _ids(cont)) if ctx else (_ids(cont)[:1], _ids(cont)[1:])
        want, want_greedy = _direct(forward, c, x)
        np.testing.assert_allclose(logp, want, rtol=RTOL, atol=ATOL, err_msg=repr((ctx, cont)))
        assert is_greedy == want_greedy, (ctx, cont)
        assert isinstance(logp, float) and isinstance(is_greedy, bool)
    assert got[-1][1] is True


def test_empty_context_conditions_on_eos(lm, forward, monkeypatch):
    """With an ``eos_id`` the empty context is ``[eos_id]`` and every continuation token is scored;
    without one the first token is the context (a one-token continuation scores 0.0)."""
    assert lm.encode_pair("", "ab") == ([ord("a")], [ord("b")])
    assert lm.loglikelihood([_req("loglikelihood", ("", "a"))]) == [(0.0, True)]

    class EosBytes(tokenizers.BytesTokenizer):
        eos_id = ord("\n")

    monkeypatch.setattr(lm, "tokenizer", EosBytes())
    cont = TEXT[:21]
    assert lm.encode_pair("", cont) == ([ord("\n")], _ids(cont))
    (logp, is_greedy), = lm.loglikelihood([_req("loglikelihood", ("", cont))])
    want, want_greedy = _direct(forward, [ord("\n")], _ids(cont))
    np.testing.assert_allclose(logp, want, rtol=RTOL, atol=ATOL)
    assert is_greedy == want_greedy


def test_loglikelihood_rolling_sums_disjoint_windows(lm, forward):
    """A 300-byte text with max_length 128 (4x the run's seq_len): three windows, every byte after
    the first predicted once, the last window with a full 128-token context."""
    text = TEXT[:300]
    toks, n, L = _ids(text), len(_ids(text)), lm.max_length
    assert L == 4 * 32 and n - 1 > 2 * L
    windows = lm.rolling_windows(text)
    assert [w for _, w in windows] == [L, L, n - 1 - 2 * L]
    want, s = 0.0, 1                         # targets toks[s:e]; inputs: up to L tokens before e - 1
    while s < n:
        e = min(s + L, n)
        want += _direct(forward, toks[max(0, e - 1 - L):s], toks[s:e])[0]
        s = e
    got, = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def _argmax_decode(forward, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by recomputing the full forward on the growing sequence."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(forward(seq)[-1])))
    return seq[len(prompt):]


@pytest.mark.parametrize("granule", [16, 64])
def test_generate_until_equals_full_forward_argmax_and_stops(lm, forward, monkeypatch, granule):
    """Prompts of 20 and 21 bytes in one batch: prefill 16 bytes (granule 16) or 1 (the default 64:
    prompts shorter than it go through ``step``), the rest of each prompt through ``step``; then
    ``until`` stops the decoding loop as soon as the stop string appears."""
    monkeypatch.setattr(adapter, "PREFILL_STEP", granule)
    p20, p21 = TEXT[100:120], TEXT[200:221]
    ref20 = _argmax_decode(forward, _ids(p20), 4)
    ref21 = _argmax_decode(forward, _ids(p21), 3)
    got = lm.generate_until([_req("generate_until", (p20, {"max_gen_toks": 4})),
                             _req("generate_until", (p21, {"max_gen_toks": 3, "until": ["\x00never"]}))])
    assert got == [data.decode(ref20), data.decode(ref21)]

    calls = []
    step = lm._step
    monkeypatch.setattr(lm, "_step", lambda *a: calls.append(1) or step(*a))
    text = data.decode(ref20)
    stop = text[1:] or text
    out, = lm.generate_until([_req("generate_until", (p20, {"max_gen_toks": 12, "until": [stop]}))])
    assert out == text[:text.find(stop)]
    prompt_steps = 20 - adapter.prefill_length(20, granule)
    assert len(calls) <= prompt_steps + 3      # the prompt after the prefill, then at most 3 of 12 tokens
    assert adapter._cut("abcabc", ["c", "b"]) == ("a", True) and adapter._cut("ab", ["z"]) == ("ab", False)


def test_shapes_are_bucketed():
    assert [adapter.bucket_length(n, 128) for n in (1, 16, 17, 33, 100, 128)] == [16, 16, 32, 64, 128, 128]
    assert adapter.bucket_length(90, 80) == 80
    assert [adapter.prefill_length(n, 64) for n in (1, 5, 63, 64, 130)] == [1, 1, 1, 64, 128]
    assert adapter.prefill_length(20, 16) == 16


def test_local_task_end_to_end_offline(run_dir):
    """simple_evaluate on the local multiple-choice and perplexity tasks (include_path, no built-in
    task index), a few examples each: lm-eval's metric keys, values in range."""
    results = adapter.evaluate(run_dir, ["miras_tiny_mc", "miras_tiny_ppl"], include_path=TASKS,
                               builtin_tasks=False, limit=3, batch_size=4, bootstrap_iters=0)
    lines = {line["task"]: line for line in adapter.task_lines(results)}
    mc, ppl = lines["miras_tiny_mc"], lines["miras_tiny_ppl"]
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= mc[key] <= 1.0
    assert ppl["byte_perplexity,none"] >= 1.0 and ppl["word_perplexity,none"] >= 1.0
    assert math.isclose(ppl["bits_per_byte,none"], math.log2(ppl["byte_perplexity,none"]), rel_tol=1e-6)
    assert mc["sample_len"] == ppl["sample_len"] == 3
    assert results["config"]["model"] == "miras_jax" and results["config"]["step"] == 3
    assert results["config"]["tokenizer"] == "bytes" and results["config"]["max_length"] == 128


def test_refuses_mqar_runs_missing_runs_and_foreign_tokenizers(run_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        adapter.MirasEvalLM(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="unknown model arguments .*pretrained"):
        adapter.MirasEvalLM(run_dir, pretrained="gpt2")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        adapter.MirasEvalLM(run_dir, batch_size=0)
    assert adapter.MirasEvalLM(run_dir, max_length=48, batch_size="auto").max_length == 48

    load_run = train.load_run

    def as_mqar(workdir, step=None):
        cfg, *rest = load_run(workdir, step)
        return (dataclasses.replace(cfg, task="mqar"), *rest)

    with monkeypatch.context() as m:
        m.setattr(adapter.train_lib, "load_run", as_mqar)
        with pytest.raises(ValueError, match="is an MQAR run"):
            adapter.MirasEvalLM(run_dir)

    class Big(tokenizers.BytesTokenizer):
        vocab_size = 1000

    monkeypatch.setattr(adapter.tokenizer_lib, "load", lambda path: Big())
    with pytest.raises(ValueError, match="has 1000 tokens but the model's vocabulary has 256"):
        adapter.MirasEvalLM(run_dir)


def test_unknown_task_is_a_clear_error(run_dir):
    with pytest.raises(ValueError, match=r"unknown tasks \['nope'\]"):
        adapter.evaluate(run_dir, ["nope"], include_path=TASKS, builtin_tasks=False)


@pytest.mark.slow   # ~30 s: a fresh process imports jax + lm-eval and compiles the tiny model's programs
def test_command_prints_one_line_per_task_and_writes_results(run_dir, tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.lm_eval_adapter", f"--workdir={run_dir}",
                           "--tasks=miras_tiny_mc,miras_tiny_ppl,miras_tiny_gen", f"--include_path={TASKS}",
                           "--nobuiltin_tasks", "--limit=2", "--bootstrap_iters=0", f"--output={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    by_task = {ln["task"]: ln for ln in lines}
    assert len(lines) == 3 and set(by_task) == {"miras_tiny_gen", "miras_tiny_mc", "miras_tiny_ppl"}
    assert 0.0 <= by_task["miras_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= by_task["miras_tiny_mc"]["acc,none"] <= 1.0
    results = json.loads(out.read_text())
    assert set(results["results"]) == {"miras_tiny_gen", "miras_tiny_mc", "miras_tiny_ppl"}


def test_command_usage_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.lm_eval_adapter",
                           f"--workdir={tmp_path / 'none'}", "--tasks=miras_tiny_mc",
                           f"--include_path={TASKS}", "--nobuiltin_tasks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 2, proc.stderr[-3000:]
    first = proc.stderr.splitlines()[0]
    assert first.startswith("lm_eval_adapter: error: no checkpoints in"), proc.stderr[-3000:]
