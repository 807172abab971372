"""Context-length benchmark: one full LM training step (forward, backward, AdamW update) of the
``charlm`` model (vocab 256, width 128, 4 layers, 4 heads; layers at the engine default "xla",
chunk 64) per (model, T), at equal tokens per step (batch = tokens_per_step // T, at least 1).

    python -m experiments.bench_context [--models=gdn,moneta,yaad,memora,titans,transformer,hybrid]
        [--T=512,2048,8192,32768] [--tokens_per_step=16384] [--warmup=1] [--steps=3] [--out=DIR]
    python -m experiments.bench_context --plot_only=DIR/results.jsonl      # redraw DIR/context.png

Models: the Miras presets (``pattern="M"``; gdn = gated_deltanet), ``transformer`` (Transformer++,
``pattern="A"``, global attention) and ``hybrid`` (``pattern="MS"``: gated_deltanet + sliding-window
attention, window ``--window``). Data: seeded random tokens (speed, not learning).
Each point runs in its own subprocess and prints one JSON line: ``compile_s`` (trace + lower +
compile of the train step), ``step_s`` (median of ``--steps`` timed steps after ``--warmup``),
``tokens_per_s = batch * T / step_s``, ``peak_rss_mb`` (ru_maxrss: the point's process peak,
compile included), ``grad_norm`` (last step; "nan"/"inf" when not finite), ``finite`` (loss and
grad norm finite at every step; else ``first_nonfinite_step``), ``device_peak_mb`` (accelerators
only). A failed point (exception, device OOM, host RSS over ``--max_rss_gb``, ``--point_timeout_s``)
is a line with ``"error"``; larger T of that model are then skipped (``--skip_after_error``).
``--out`` also writes ``results.jsonl`` and ``context.png`` (tokens/s and peak RSS vs T).
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

from absl import app, flags

from experiments import cli

# name -> (pattern, preset); the preset of "A" is unused
MODELS = {
    "gdn": ("M", "gated_deltanet"),
    "moneta": ("M", "moneta"),
    "yaad": ("M", "yaad"),
    "memora": ("M", "memora"),
    "titans": ("M", "titans"),
    "transformer": ("A", None),
    "hybrid": ("MS", "gated_deltanet"),
}


def define_flags():
    flags.DEFINE_list("models", list(MODELS), f"models to measure: {list(MODELS)}")
    flags.DEFINE_list("T", ["512", "2048", "8192", "32768"], "context lengths")
    flags.DEFINE_integer("tokens_per_step", 16384, "tokens per step; batch = tokens_per_step // T (>= 1)")
    flags.DEFINE_integer("warmup", 1, "untimed steps after the compile")
    flags.DEFINE_integer("steps", 3, "timed steps (median reported)")
    flags.DEFINE_integer("seed", 0, "model init and random-token seed")
    flags.DEFINE_integer("window", None, "sliding window of 'hybrid' (default: LMConfig's)")
    flags.DEFINE_list("set", [], "extra charlm config overrides (e.g. model.chunk_size=128)")
    flags.DEFINE_string("out", None, "directory for results.jsonl and context.png")
    flags.DEFINE_string("plot_only", None, "only redraw the plot from this results.jsonl (next to it)")
    flags.DEFINE_float("max_rss_gb", None, "kill a point whose host RSS exceeds this "
                       "(default: 85% of MemAvailable at start)")
    flags.DEFINE_float("point_timeout_s", 3600.0, "kill a point after this many seconds")
    flags.DEFINE_bool("skip_after_error", True, "after a model's point fails, skip its larger T")
    flags.DEFINE_string("one", None, "internal: measure one point 'model:T' in this process")


def point_config(model: str, T: int, tokens_per_step: int, sets=(), window: int | None = None):
    """``(TrainConfig, batch)`` of one point: the charlm config at ``seq_len=T``."""
    from experiments import configs

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; valid: {list(MODELS)}")
    pattern, preset = MODELS[model]
    batch = max(tokens_per_step // T, 1)
    over = [f"seq_len={T}", f"batch={batch}", f"model.pattern={pattern}"]
    over += [f"model.preset={preset}"] if preset else []
    over += [f"model.window={window}"] if window is not None and "S" in pattern else []
    return configs.override(configs.get("charlm"), over + list(sets)), batch


def random_batch(seed: int, batch: int, T: int, vocab: int = 256) -> dict:
    """``inputs, targets`` int32 [batch, T] (targets = inputs shifted by one), ``mask`` ones."""
    import numpy as np

    tok = np.random.default_rng([seed, T]).integers(0, vocab, (batch, T + 1), dtype=np.int32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": np.ones((batch, T), np.float32)}


def _num(x: float):
    return round(x, 4) if math.isfinite(x) else str(x)


def measure(model: str, T: int, *, tokens_per_step: int = 16384, warmup: int = 1, steps: int = 3,
            seed: int = 0, sets=(), window: int | None = None) -> dict:
    """One point in this process, with ``experiments.train``'s model, optimizer and train step."""
    import jax

    from experiments import train as train_lib
    from miras_jax.nn import count_params

    try:
        cfg, batch = point_config(model, T, tokens_per_step, sets, window)
    except ValueError as e:
        return {"model": model, "T": T, "error": f"ValueError: {e}"}
    m = cfg.model
    row = {"model": model, "pattern": m.pattern, "preset": m.preset if "M" in m.pattern else None,
           "T": T, "batch": batch, "tokens_per_step": batch * T, "implementation": m.implementation,
           "chunk_size": m.chunk_size, "window": m.window if "S" in m.pattern else None,
           "backend": jax.default_backend(), "device_count": jax.device_count()}
    try:
        with jax.numpy_dtype_promotion("standard"):   # as train.train (optax's int32 step count)
            t0 = time.perf_counter()
            graphdef, params, rest, tx, _ = train_lib.build(cfg, 256)
            opt_state = tx.init(params)
            row["params"] = count_params(train_lib.merge(graphdef, params, rest))
            train_step, _ = train_lib.make_steps(graphdef, rest, tx)
            data = jax.device_put(random_batch(seed, batch, T))
            jax.block_until_ready((params, opt_state, data))
            row["build_s"] = round(time.perf_counter() - t0, 3)
            t0 = time.perf_counter()
            step = train_step.lower(params, opt_state, data).compile()
            row["compile_s"] = round(time.perf_counter() - t0, 3)
            times, bad = [], None
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                params, opt_state, loss, _, gnorm = jax.block_until_ready(step(params, opt_state, data))
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                loss, gnorm = float(loss), float(gnorm)
                if bad is None and not (math.isfinite(loss) and math.isfinite(gnorm)):
                    bad = i + 1
            finite = bad is None
        step_s = statistics.median(times) if times else float("nan")
        row.update(step_s=round(step_s, 4), step_times=[round(t, 4) for t in times],
                   tokens_per_s=round(batch * T / step_s, 1) if times else None,
                   loss=_num(loss), grad_norm=_num(gnorm), finite=finite)
        if not finite:   # 1-based over warmup + timed steps (a NaN gradient poisons the params after it)
            row["first_nonfinite_step"] = bad
    except Exception as e:  # noqa: BLE001  (device OOM, compile failure, ...): reported, not raised
        msg = f"{type(e).__name__}: {e}".strip()
        row["error"] = msg if len(msg) < 600 else msg[:300] + " ... " + msg[-300:]
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    row["peak_rss_note"] = "ru_maxrss of this point's own process: its peak so far, compile included"
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["device_peak_mb"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    row.update(warmup=warmup, steps=steps, jax=jax.__version__)
    return row


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_point(model: str, T: int, *, args: list[str], max_rss_mb: float, timeout_s: float) -> dict:
    """One point in a fresh subprocess (``--one``); its JSON line, or an error line if it died."""
    cmd = [sys.executable, "-m", "experiments.bench_context", f"--one={model}:{T}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()), daemon=True)
               for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    t0, killed, peak = time.monotonic(), None, 0.0
    while proc.poll() is None:
        peak = max(peak, _rss_mb(proc.pid))
        if max_rss_mb and peak > max_rss_mb:
            killed = f"killed: host RSS {peak:.0f} MB over --max_rss_gb={max_rss_mb / 1024:.1f}"
        elif time.monotonic() - t0 > timeout_s:
            killed = f"killed: still running after --point_timeout_s={timeout_s:g}"
        if killed:
            proc.kill()
            proc.wait()
            break
        time.sleep(0.1)
    for r in readers:
        r.join()
    lines = [ln for ln in out.get("stdout", "").splitlines() if ln.startswith("{")]
    if lines and not killed:
        return json.loads(lines[-1])
    pattern, preset = MODELS[model]
    row = {"model": model, "pattern": pattern, "preset": preset, "T": T}
    if killed:
        row.update(error=killed, peak_rss_mb=round(peak, 1),
                   peak_rss_note="VmRSS sampled by the parent until the kill")
    else:
        rc = proc.returncode
        why = (f"killed by signal {signal.Signals(-rc).name}" + (" (out of memory?)" if rc == -9 else "")
               if rc < 0 else f"exit status {rc}")
        tail = out.get("stderr", "").strip().splitlines()[-1:]
        row["error"] = why + (f": {tail[0]}" if tail else "")
    return row


def plot(rows: list[dict], path: str) -> bool:
    """tokens/s vs T and peak RSS vs T, one line per model; hollow markers: not finite."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot ({path})", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, name in enumerate(models):
        ok = sorted((r for r in rows if r["model"] == name and "error" not in r), key=lambda r: r["T"])
        color = f"C{i}"
        Ts = [r["T"] for r in ok]
        failed = sorted(r["T"] for r in rows if r["model"] == name and "error" in r)
        label = name + (f" (error at T={','.join(map(str, failed))})" if failed else "")
        ax1.plot(Ts, [r["tokens_per_s"] for r in ok], "-", color=color, label=label)
        ax2.plot(Ts, [r["peak_rss_mb"] for r in ok], "-", color=color, label=name)
        for r in ok:
            face = color if r.get("finite") else "none"
            ax1.plot(r["T"], r["tokens_per_s"], "o", color=color, markerfacecolor=face)
            ax2.plot(r["T"], r["peak_rss_mb"], "o", color=color, markerfacecolor=face)
    tps = {r.get("tokens_per_step") for r in rows if "error" not in r}
    ax1.set(xscale="log", yscale="log", xlabel="context length T", ylabel="tokens / s (train step)",
            title=f"training throughput, {'/'.join(map(str, sorted(tps)))} tokens/step")
    ax2.set(xscale="log", xlabel="context length T", ylabel="peak RSS (MB)", title="process peak RSS")
    ticks = sorted({r["T"] for r in rows})
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    backends = {f"{r['backend']} x{r['device_count']}" for r in rows if "backend" in r}
    ax1.legend(title="hollow: not finite", fontsize=8)
    fig.suptitle(f"bench_context ({', '.join(sorted(backends))})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def _default_max_rss_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) for ln in f if ln.startswith("MemAvailable:"))
        return 0.85 * avail / 1024
    except (OSError, StopIteration):
        return 0.0


def main(argv):
    del argv
    f = flags.FLAGS
    if f.plot_only:
        path = os.path.join(os.path.dirname(os.path.abspath(f.plot_only)), "context.png")
        if plot(_read(f.plot_only), path):
            print(f"wrote {path}")
        return
    common = dict(tokens_per_step=f.tokens_per_step, warmup=f.warmup, steps=f.steps, seed=f.seed,
                  sets=f.set, window=f.window)
    if f.one:
        model, _, T = f.one.rpartition(":")
        print(json.dumps(measure(model, int(T), **common)), flush=True)
        return
    bad = [m for m in f.models if m not in MODELS]
    if bad:
        raise app.UsageError(f"unknown models {bad}; valid: {list(MODELS)}")
    if f.tokens_per_step < 1 or f.steps < 1 or f.warmup < 0:
        raise app.UsageError("need --tokens_per_step >= 1, --steps >= 1, --warmup >= 0")
    Ts = sorted(int(t) for t in f.T)
    try:   # a bad --set / --window fails here, not in every point
        for model in f.models:
            point_config(model, Ts[0], f.tokens_per_step, f.set, f.window)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    args = [f"--tokens_per_step={f.tokens_per_step}", f"--warmup={f.warmup}", f"--steps={f.steps}",
            f"--seed={f.seed}"] + ([f"--set={','.join(f.set)}"] if f.set else []) + (
            [f"--window={f.window}"] if f.window is not None else [])
    max_rss_mb = f.max_rss_gb * 1024 if f.max_rss_gb is not None else _default_max_rss_mb()
    results = None
    if f.out:
        os.makedirs(f.out, exist_ok=True)
        results = open(os.path.join(f.out, "results.jsonl"), "w")
    rows = []
    try:
        for model in f.models:
            failed = None
            for T in Ts:
                if failed is not None:
                    pattern, preset = MODELS[model]
                    row = {"model": model, "pattern": pattern, "preset": preset, "T": T,
                           "error": f"skipped: T={failed} failed (--noskip_after_error to try anyway)"}
                else:
                    row = run_point(model, T, args=args, max_rss_mb=max_rss_mb, timeout_s=f.point_timeout_s)
                    if "error" in row and f.skip_after_error:
                        failed = T
                rows.append(row)
                print(json.dumps(row), flush=True)
                if results:
                    results.write(json.dumps(row) + "\n")
                    results.flush()
    finally:
        if results:
            results.close()
    if f.out and plot(rows, os.path.join(f.out, "context.png")):
        print(f"wrote {os.path.join(f.out, 'results.jsonl')} and context.png", file=sys.stderr)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
