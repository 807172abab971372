"""Our engine and the PyTorch peers, measured in alternation on the same machine.

    python -m experiments.bench_side_by_side --peer_python=/work/peers/venv/bin/python \
        [--presets=gated_deltanet,moneta,yaad,memora] [--rounds=3] [--allocator=tcmalloc]

The machine is shared and its speed drifts by tens of percent over minutes, so a ratio is only
meaningful when both sides are measured close together: each round runs, one after the other,
every preset through ``experiments.bench_engine`` (``xla``, fwd+bwd, its own subprocess) and every
peer through ``experiments/bench_peers.py`` (its own venv; see that script for the setup), all
with the same allocator. Prints every measurement's JSON line, then one summary line per preset:
the median tokens/s of each side over the rounds and their ratio (``gated_deltanet`` against fla's
``naive_chunk_gated_delta_rule``; every other preset against titans-pytorch's ``NeuralMemory``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

from experiments import cli

flags.DEFINE_string("peer_python", "/work/peers/venv/bin/python", "python of the peer venv (torch)")
flags.DEFINE_list("presets", ["gated_deltanet", "moneta", "yaad", "memora"], "our presets")
flags.DEFINE_integer("rounds", 3, "alternating rounds")
flags.DEFINE_integer("T", 4096, "sequence length")
flags.DEFINE_integer("chunk", 64, "chunk size (both sides)")
flags.DEFINE_integer("iters", 5, "timed iterations per measurement (median)")
flags.DEFINE_integer("host_devices", 1, "ours: split the batch over N single-threaded host devices")
flags.DEFINE_enum("allocator", "tcmalloc", ["tcmalloc", "glibc"], "allocator for both sides")
flags.DEFINE_string("tcmalloc", "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "tcmalloc path")
FLAGS = flags.FLAGS

PEER_OF = {"gated_deltanet": "fla_naive_chunk_gdn"}
DEFAULT_PEER = "titans_neural_memory"


def _run(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bench_side_by_side: {' '.join(cmd[:4])} ... failed: {tail}")
    return json.loads(lines[-1])


def main(argv):
    del argv
    f = FLAGS
    if not os.path.isfile(f.peer_python):
        cli.missing(f"--peer_python={f.peer_python} not found; set up the peer venv as described "
                    "in experiments/bench_peers.py")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if f.allocator == "tcmalloc":
        if not os.path.isfile(f.tcmalloc):
            cli.missing(f"tcmalloc not found at {f.tcmalloc} (apt-get install libtcmalloc-minimal4)")
        env["LD_PRELOAD"] = f.tcmalloc
    here = os.path.dirname(os.path.abspath(__file__))
    peers = sorted({PEER_OF.get(p, DEFAULT_PEER) for p in f.presets})
    ours: dict[str, list[float]] = {p: [] for p in f.presets}
    theirs: dict[str, list[float]] = {p: [] for p in peers}
    for _ in range(f.rounds):
        for preset in f.presets:
            rec = _run([sys.executable, "-m", "experiments.bench_engine", f"--chunk={f.chunk}",
                        f"--iters={f.iters}", f"--host_devices={f.host_devices}",
                        f"--child={preset},xla,{f.T},fwd+bwd"], env)
            ours[preset].append(rec["tokens_per_s"])
            print(json.dumps(rec), flush=True)
        for peer in peers:
            rec = _run([f.peer_python, os.path.join(here, "bench_peers.py"), "--child", f"--peer={peer}",
                        f"--T={f.T}", f"--chunk={f.chunk}", f"--iters={f.iters}"], env)
            theirs[peer].append(rec["tokens_per_s"])
            print(json.dumps(rec), flush=True)
    for preset in f.presets:
        peer = PEER_OF.get(preset, DEFAULT_PEER)
        a, b = statistics.median(ours[preset]), statistics.median(theirs[peer])
        print(json.dumps({"summary": preset, "peer": peer, "rounds": f.rounds, "allocator": f.allocator,
                          "host_devices": f.host_devices,
                          "ours_tokens_per_s": round(a, 1), "peer_tokens_per_s": round(b, 1),
                          "ratio": round(a / b, 2), "ours_all": ours[preset], "peer_all": theirs[peer]}),
              flush=True)


if __name__ == "__main__":
    cli.run(main)
