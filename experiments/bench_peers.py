"""Benchmark two PyTorch peer implementations on the CPU, for comparison with miras_jax.

Standalone script: it is NOT part of miras_jax, is never imported by the tests, and needs its own
virtual environment with PyTorch (never install torch into the project's venv). It measures, in
float32, forward + backward (``loss = out.sum(); loss.backward()``) of

* ``fla_naive_chunk_gdn``: ``naive_chunk_gated_delta_rule`` from fla-core 0.6.0
  (``fla/ops/gated_delta_rule/naive.py``, pure PyTorch), q/k L2-normalised,
  ``beta = sigmoid(randn)``, ``g = logsigmoid(randn)`` (per-token log decay), shape
  q, k, v: [B, T, H, d].
* ``titans_neural_memory``: titans-pytorch 0.5.5 ``NeuralMemory(dim=H*d, heads=H, dim_head=d,
  chunk_size=chunk)`` with its default memory model ``MemoryMLP(d, depth=2, expansion_factor=4)``
  on ``seq`` of shape [B, T, H*d].

Each measurement runs in a fresh child process (so ``peak_rss_mb`` = that process's
``resource.getrusage(RUSAGE_SELF).ru_maxrss``), with ``torch.set_num_threads(threads)``,
``--warmup`` untimed iterations, then the median over ``--iters`` timed iterations;
``tokens_per_s = B * T / median_seconds``. One JSON line is printed per measurement; besides the
comparison fields it carries ``median_s``, ``times_s`` (every timed iteration), ``loadavg_1m`` and
``other_cpu``: CPU cores used by *other* processes during the timed iterations (from /proc/stat
minus this process's own CPU time). On a shared 2-core machine, trust only lines with
``other_cpu`` near 0; ``--retries N`` re-runs a measurement whose ``other_cpu`` exceeds
``--max-other-cpu``. Even on a quiet machine, run-to-run spread is about +-15%.

Peer venv setup (the commands that worked on the 2-core CPU machine, Python 3.11)::

    python3 -m venv /work/peers/venv
    /work/peers/venv/bin/pip install torch==2.13.0          # CPU build from the machine's disk;
                                                            # never plain `torch` or a range
    /work/peers/venv/bin/pip install --no-deps titans-pytorch==0.5.5 fla-core==0.6.0
    # their small pure-Python deps; check first that no other torch is pulled in:
    /work/peers/venv/bin/pip install --dry-run einops einx tensordict assoc-scan tqdm \
        x-transformers hyper-connections axial-positional-embedding rotary-embedding-torch
    /work/peers/venv/bin/pip install einops einx tensordict assoc-scan tqdm \
        x-transformers hyper-connections axial-positional-embedding rotary-embedding-torch
    # (resolved to: einops 0.8.2, einx 0.4.3, tensordict 0.15.3, assoc-scan 0.0.6, tqdm 4.70.1,
    #  x-transformers 2.31.10, hyper-connections 0.4.11, axial-positional-embedding 0.3.12,
    #  rotary-embedding-torch 0.9.1, plus accelerated-scan, cloudpickle, frozendict, loguru,
    #  numpy, packaging, pyvers, torch-einops-utils; torch stayed at 2.13.0+cpu)
    # optional allocator:
    apt-get update && apt-get install -y libtcmalloc-minimal4
    #   -> /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

fla's package ``__init__`` needs Triton; this script bypasses it by loading the single module file
``fla/ops/gated_delta_rule/naive.py`` with ``importlib.util.spec_from_file_location``.

Usage (from /work/main)::

    /work/peers/venv/bin/python experiments/bench_peers.py                 # both peers, glibc+tcmalloc
    /work/peers/venv/bin/python experiments/bench_peers.py --retries 8     # re-run contended ones
    /work/peers/venv/bin/python experiments/bench_peers.py --peer fla_naive_chunk_gdn \\
        --allocators glibc

``--allocators tcmalloc`` runs the child with ``LD_PRELOAD=<--tcmalloc path>``; the reported
``allocator`` is read from the child's own ``/proc/self/maps``, not assumed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PEERS = ("fla_naive_chunk_gdn", "titans_neural_memory")
DEFAULT_TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

SETUP_HINT = (
    "bench_peers.py needs a separate peer venv with torch==2.13.0, fla-core==0.6.0 and "
    "titans-pytorch==0.5.5 (+ their pure-Python deps); see this script's module docstring, and run "
    "it with that venv's python, e.g. /work/peers/venv/bin/python experiments/bench_peers.py"
)


def _die(msg: str) -> None:
    sys.stderr.write(f"bench_peers: {msg}\n{SETUP_HINT}\n")
    sys.exit(2)


def _import_torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:
        _die(f"cannot import torch ({e})")
    return torch


def _load_fla_naive():
    """Load fla/ops/gated_delta_rule/naive.py without executing fla's (Triton-needing) __init__."""
    spec = importlib.util.find_spec("fla")  # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        _die("package 'fla' (fla-core==0.6.0) not found")
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "gated_delta_rule", "naive.py")
    if not os.path.isfile(path):
        _die(f"fla is installed but {path} is missing (expected fla-core==0.6.0)")
    mspec = importlib.util.spec_from_file_location("_bench_fla_gdn_naive", path)
    mod = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(mod)
    except ImportError as e:
        _die(f"cannot load {path} ({e})")
    return mod.naive_chunk_gated_delta_rule


def _load_titans():
    try:
        from titans_pytorch import NeuralMemory  # noqa: PLC0415
    except ImportError as e:
        _die(f"cannot import titans_pytorch.NeuralMemory ({e})")
    return NeuralMemory


def _allocator() -> str:
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "tcmalloc" in f.read() else "glibc"
    except OSError:
        return "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"


def _busy_cpu_seconds() -> float | None:
    """Machine-wide busy CPU seconds (all processes) from /proc/stat, or None if unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...
    busy = sum(fields[:3]) + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _make_fla_step(torch, args):
    import torch.nn.functional as F  # noqa: PLC0415

    fn = _load_fla_naive()
    B, T, H, d = args.B, args.T, args.H, args.d
    gen = torch.Generator().manual_seed(args.seed)
    leaves = {
        "q": torch.randn(B, T, H, d, generator=gen),
        "k": torch.randn(B, T, H, d, generator=gen),
        "v": torch.randn(B, T, H, d, generator=gen),
        "beta": torch.randn(B, T, H, generator=gen),
        "g": torch.randn(B, T, H, generator=gen),
    }
    for t in leaves.values():
        t.requires_grad_(True)

    def step():
        for t in leaves.values():
            t.grad = None
        q = F.normalize(leaves["q"], p=2, dim=-1)
        k = F.normalize(leaves["k"], p=2, dim=-1)
        beta = torch.sigmoid(leaves["beta"])
        g = F.logsigmoid(leaves["g"])  # log decay in (-inf, 0)
        o, _ = fn(q, k, leaves["v"], g, beta, chunk_size=args.chunk)
        o.sum().backward()

    return step


def _make_titans_step(torch, args):
    NeuralMemory = _load_titans()
    torch.manual_seed(args.seed)
    dim = args.H * args.d
    mem = NeuralMemory(
        dim=dim,
        heads=args.H,
        dim_head=args.d,
        chunk_size=args.chunk,
        default_model_kwargs=dict(depth=2, expansion_factor=4.0),
    )
    seq = torch.randn(args.B, args.T, dim, requires_grad=True)

    def step():
        mem.zero_grad(set_to_none=True)
        seq.grad = None
        retrieved, _ = mem(seq)
        retrieved.sum().backward()

    return step


def run_child(args) -> dict:
    torch = _import_torch()
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    make = {"fla_naive_chunk_gdn": _make_fla_step, "titans_neural_memory": _make_titans_step}[args.peer]
    step = make(torch, args)
    load0 = os.getloadavg()[0]
    for _ in range(args.warmup):
        step()
    times = []
    busy0, own0, wall0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    busy1, own1, wall1 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    med = statistics.median(times)
    # CPU cores used by OTHER processes while the timed iterations ran (contention check).
    other = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
    return {
        "peer": args.peer,
        "B": args.B,
        "H": args.H,
        "d": args.d,
        "T": args.T,
        "chunk": args.chunk,
        "mode": "fwd+bwd",
        "tokens_per_s": round(args.B * args.T / med, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "allocator": _allocator(),
        "torch": torch.__version__,
        "median_s": round(med, 4),
        "iters": args.iters,
        "threads": args.threads,
        "loadavg_1m": round(max(load0, os.getloadavg()[0]), 2),
        "other_cpu": None if other is None else round(other, 2),
        "times_s": [round(t, 4) for t in times],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", choices=PEERS + ("all",), default="all")
    p.add_argument("--allocators", default="glibc,tcmalloc",
                   help="comma list of glibc,tcmalloc; each measurement runs in its own child process")
    p.add_argument("--tcmalloc", default=DEFAULT_TCMALLOC, help="path of the tcmalloc shared library")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--d", type=int, default=64, help="head dim (keys and values)")
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-other-cpu", type=float, default=0.1,
                   help="a measurement during which other processes used more CPU cores than this is "
                        "flagged (stderr) and, with --retries, repeated")
    p.add_argument("--retries", type=int, default=0,
                   help="re-run a contended measurement up to this many times (30 s apart)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        rec = run_child(args)
        if rec["other_cpu"] is not None and rec["other_cpu"] > args.max_other_cpu:
            sys.stderr.write(f"bench_peers: WARNING: other processes used {rec['other_cpu']} CPU cores "
                             "during the timed iterations; timings are not trustworthy\n")
        print(json.dumps(rec), flush=True)
        return 0

    # Fail early, in the parent, with a clear message if a peer is missing.
    _import_torch()
    peers = PEERS if args.peer == "all" else (args.peer,)
    if "fla_naive_chunk_gdn" in peers:
        _load_fla_naive()
    if "titans_neural_memory" in peers:
        _load_titans()
    allocs = [a.strip() for a in args.allocators.split(",") if a.strip()]
    for a in allocs:
        if a not in ("glibc", "tcmalloc"):
            _die(f"unknown allocator {a!r} (use glibc and/or tcmalloc)")
    if "tcmalloc" in allocs and not os.path.isfile(args.tcmalloc):
        _die(f"tcmalloc not found at {args.tcmalloc} (apt-get install -y libtcmalloc-minimal4, or pass "
             "--tcmalloc PATH, or --allocators glibc)")

    passthrough = [f"--{k}={getattr(args, k)}" for k in
                   ("B", "H", "d", "T", "chunk", "threads", "warmup", "iters", "seed")]
    passthrough.append(f"--max-other-cpu={args.max_other_cpu}")
    rc = 0
    for peer in peers:
        for alloc in allocs:
            env = dict(os.environ)
            env.pop("LD_PRELOAD", None)
            if alloc == "tcmalloc":
                env["LD_PRELOAD"] = args.tcmalloc
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--peer={peer}", *passthrough]
            for attempt in range(args.retries + 1):
                if attempt:
                    time.sleep(30)
                r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
                out = r.stdout.strip()
                if r.returncode != 0 or not out:
                    break
                line = out.splitlines()[-1]
                other = json.loads(line).get("other_cpu")
                if other is None or other <= args.max_other_cpu:
                    break
                if attempt < args.retries:
                    sys.stderr.write(f"bench_peers: retrying {peer}/{alloc} (other_cpu={other})\n")
            if r.returncode != 0 or not out:
                sys.stderr.write(f"bench_peers: {peer} with {alloc} failed (exit {r.returncode})\n")
                rc = 1
                continue
            print(line, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
