"""Ahead-of-time check of a training config for a target TPU topology, without the hardware.

    python -m experiments.aot --config=mqar --mesh=data:4,fsdp:4 --topology=v5e:4x4 [--set=...]

1. The model is built from shapes only (``nnx.eval_shape``); every parameter, optimizer-state
   and batch array gets its ``NamedSharding`` (``miras_jax.sharding`` rules) on an
   ``AbstractMesh`` of the topology's size, and the train step is lowered for TPU: shape,
   sharding-rule and lowering errors (including Pallas kernels, as Mosaic custom calls:
   ``pallas_kernels``) show up here, before a job starts. Reports the per-device parameter +
   optimizer bytes and ``model_flops_per_token``.
2. With TPU support installed (``pip install -e '.[tpu]'``: libtpu) it compiles the same step
   (donating params and optimizer state, as ``train.py`` does) with XLA:TPU for the topology's
   real devices (``jax.experimental.topologies``) and reports, per device: XLA's memory analysis
   (``peak_hbm_bytes`` and its parts), the chip's ``hbm_bytes``, ``fits``, ``compile_s`` and
   XLA's FLOP count. A compile that runs out of HBM reports ``compiled: false, fits: false`` and
   the bytes the error states. Without libtpu: ``compiled: false`` and a note saying so.
Prints one JSON object.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from experiments import cli, configs
from experiments import train as train_lib
from miras_jax import sharding
from miras_jax.nn import MirasLM

GiB = 2 ** 30
# HBM per chip (bytes) by chip type, as Google Cloud's TPU pages state it.
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
LIBTPU_NOTE = "libtpu not installed: pip install -e '.[tpu]'"
# Parameters that are a Miras layer's initial memory (state read once per sequence, not a weight
# applied to every token): left out of model_flops_per_token's 6 N.
_STATE_PARAMS = ("memory_w0",)


def define_flags():
    flags.DEFINE_string("config", "mqar", f"config name: {configs.names()}")
    flags.DEFINE_string("mesh", "data:4,fsdp:4", "mesh, e.g. data:4,fsdp:4")
    flags.DEFINE_string("topology", "v5e:4x4", "TPU topology 'type:AxB[xC]' (chips)")
    flags.DEFINE_string("preset", None, "override the Miras preset")
    flags.DEFINE_list("set", [], "config overrides field=value")


def _parse_topology(topology: str) -> tuple[str, list[int]]:
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", topology)
    if not m:
        raise ValueError(f"topology must look like 'v5e:4x4' or 'v4:2x2x2', got {topology!r}")
    return m.group(1), [int(x) for x in m.group(2).split("x")]


def topology_devices(topology: str) -> int:
    """Chips of ``"v5e:4x4"`` (16) or ``"v4:2x2x2"`` (8)."""
    return math.prod(_parse_topology(topology)[1])


def hbm_bytes(topology: str) -> int | None:
    """HBM of one chip of ``topology`` (``"v5e:4x4"`` -> 16 GiB); None for a chip type not in
    ``HBM_BYTES``."""
    return HBM_BYTES.get(_parse_topology(topology)[0])


def memory_fields(mem) -> dict:
    """Per-device bytes from ``compiled.memory_analysis()``: its argument / output / temp / alias
    parts and ``peak_hbm_bytes = argument + output + temp - alias`` (a donated input aliased to
    an output is counted once), plus ``generated_code_bytes`` (the program itself) and
    ``xla_peak_memory_bytes``: XLA's own ``peak_memory_in_bytes`` where this jax has it (on v5e
    larger than peak + code, e.g. 54.2 MB against 19.7 + 17.9 MB for ``mqar``; what else it
    counts is not documented)."""
    part = lambda name: int(getattr(mem, f"{name}_size_in_bytes"))  # noqa: E731
    out = {f"{name}_bytes": part(name) for name in ("argument", "output", "temp", "alias")}
    live = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    out["peak_hbm_bytes"] = live - out["alias_bytes"]
    out["generated_code_bytes"] = part("generated_code")
    peak = getattr(mem, "peak_memory_in_bytes", None)
    out["xla_peak_memory_bytes"] = int(peak) if peak is not None else None
    return out


_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_SIZE = r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?"


def oom_bytes(message: str) -> dict:
    """Bytes an XLA:TPU out-of-memory error states, e.g. ``"... required for HLO temporaries
    (64.00G) exceeds available HBM (15.75G)"`` or ``"Used 20.5G of 15.75G hbm"`` ->
    ``oom_required_bytes``, ``oom_available_bytes`` (XLA's G is GiB); None where not stated.
    The required bytes are what the message counts: in the first form the temporaries alone
    (arguments and outputs come on top)."""
    size = lambda m, i: int(float(m.group(i)) * _UNITS[m.group(i + 1).upper()])  # noqa: E731
    used = re.search(rf"Used {_SIZE} of {_SIZE}", message)
    if used:
        return {"oom_required_bytes": size(used, 1), "oom_available_bytes": size(used, 3)}
    words = ("required", "available")
    found = [re.search(rf"{w}[^\d()]{{0,40}}\(?{_SIZE}", message, re.IGNORECASE) for w in words]
    return {f"oom_{w}_bytes": size(m, 1) if m else None for w, m in zip(words, found)}


def model_flops_per_token(model_cfg, params, seq_len: int, scored_fraction: float = 1.0) -> int:
    """Training FLOPs (fwd + bwd) per token of the outer model, the usual 6 N estimate:
    ``6 N_body + 6 d V s + sum over attention blocks of 12 d T_ctx``, where ``N_body`` is the
    parameters outside the embedding and the head, less the Miras layers' initial memories
    (``memory_w0``: state, not per-token weights); ``6 d V s`` the head on the fraction ``s`` of
    tokens it scores (MQAR: the query positions, else 1); ``T_ctx = seq_len`` for a global ("A")
    and ``min(window, seq_len)`` for a sliding-window ("S") block (PaLM's convention, no causal
    halving). The Miras memory's inner loop (its per-token forward, inner gradient and update,
    and their backward) is omitted: XLA's count (``xla_flops_per_token``) includes it."""
    d, vocab = model_cfg.d_model, model_cfg.vocab_size
    n_body = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        if keys[0] in ("embed", "head") or any(k in _STATE_PARAMS for k in keys):
            continue
        n_body += int(np.prod(x.shape))
    attention = sum(12 * d * (seq_len if model_cfg.mixer(i) == "A" else min(model_cfg.window, seq_len))
                    for i in range(model_cfg.num_layers) if model_cfg.mixer(i) != "M")
    return int(6 * n_body + 6 * d * vocab * scored_fraction + attention)


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda z: isinstance(z, NamedSharding))):
        split = math.prod(s.mesh.shape[a] for dim in s.spec if dim for a in (dim if isinstance(dim, tuple) else (dim,)))
        total += int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize // split
    return total


def compile_for_topology(step, args, out_shardings, topology: str, axis_sizes) -> dict:
    """Compile ``step`` with XLA:TPU for ``topology``'s devices (needs libtpu): ``args`` and
    ``out_shardings`` are moved from their abstract mesh onto a real one of ``axis_sizes``.
    Returns the report's compile fields (see ``check``); never raises for a failed compile."""
    hbm = hbm_bytes(topology)
    if not libtpu_installed():
        return {"compiled": False, "fits": None, "hbm_bytes": hbm, "compile_note": LIBTPU_NOTE}
    from jax.experimental import topologies

    t0 = time.perf_counter()
    try:
        topo = topologies.get_topology_desc(topology, "tpu")
        real = jax.sharding.Mesh(np.asarray(topo.devices).reshape(axis_sizes), sharding.AXES)
        move = lambda s: NamedSharding(real, s.spec)  # noqa: E731
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=move(x.sharding)), args)
        out_shardings = jax.tree.map(move, out_shardings, is_leaf=lambda z: isinstance(z, NamedSharding))
        with jax.numpy_dtype_promotion("standard"):
            lowered = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings).trace(*args).lower()
        t0 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 — report, do not fail the check
        msg = str(e)
        seconds = round(time.perf_counter() - t0, 2)
        report = {"compiled": False, "fits": None, "hbm_bytes": hbm, "compile_s": seconds,
                  "compile_note": f"{type(e).__name__}: {msg[:400]}"}
        if "libtpu_lockfile" in msg:  # libtpu allows one process per host unless told otherwise
            report["compile_note"] += (" (another process holds libtpu: run one check at a time, or on a "
                                       "host without TPU chips set ALLOW_MULTIPLE_LIBTPU_LOAD=1)")
        if "RESOURCE_EXHAUSTED" in msg:
            report.update(fits=False, **oom_bytes(msg))
        return report
    seconds = time.perf_counter() - t0
    mem = memory_fields(compiled.memory_analysis())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
    flops = (cost or {}).get("flops")
    return {"compiled": True, "compile_s": round(seconds, 2), "hbm_bytes": hbm,
            "fits": None if hbm is None else mem["peak_hbm_bytes"] <= hbm, **mem,
            "xla_flops_per_device": None if flops is None else float(flops)}


def check(cfg: configs.TrainConfig, mesh_text: str, topology: str = "v5e:4x4") -> dict:
    """Lower (and with libtpu compile) ``cfg``'s train step for ``topology`` on ``mesh_text``.

    The report's compile fields are per device (bytes; ``compile_s`` seconds):
    ``peak_hbm_bytes = argument_bytes + output_bytes + temp_bytes - alias_bytes``, ``hbm_bytes``
    the chip's HBM (None for an unknown chip type), ``fits = peak_hbm_bytes <= hbm_bytes``,
    ``xla_flops_per_device`` XLA's ``cost_analysis()['flops']`` of one device's program (as XLA
    counts it: a Pallas kernel counts only what its cost estimate says) and
    ``xla_flops_per_token = xla_flops_per_device * devices / (batch * seq_len)``, beside
    ``model_flops_per_token`` (see that function). XLA counts a loop body once, so with
    ``model.scan_blocks`` (or ``grad_accum`` > 1) its count misses the other iterations: the
    report then gives ``xla_flops_per_token: null`` and says why in ``xla_flops_note``.
    ``micro_batch = batch / (data x fsdp devices) / grad_accum``: the sequences one batch shard
    holds in one forward / backward."""
    sizes = sharding.parse_mesh(mesh_text)
    n, chips = math.prod(sizes.values()), topology_devices(topology)
    if n != chips:
        raise ValueError(f"mesh {mesh_text!r} has {n} devices but topology {topology!r} has {chips}")
    mesh = AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)
    per_shard = sharding.per_batch_shard(cfg.batch, sizes)
    vocab = configs.task_vocab(cfg)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    model = nnx.eval_shape(lambda: MirasLM(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx, _ = train_lib.make_optimizer(cfg)
    opt = jax.eval_shape(tx.init, params)
    p_sh, o_sh = sharding.param_shardings(mesh, params), sharding.param_shardings(mesh, opt)
    r_sh = jax.tree.map(lambda _: NamedSharding(mesh, sharding.P()), rest)
    batch = train_lib.make_task(cfg, None).train_batch(0, 0) if cfg.task == "mqar" else {
        k: np.zeros((cfg.batch, cfg.seq_len), np.int32 if k != "mask" else np.float32)
        for k in ("inputs", "targets", "mask")}
    scored = np.shape(batch["positions"])[1] / cfg.seq_len if "positions" in batch else 1.0
    b_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=b_sh[k]) for k, v in batch.items()}

    train_fn, _ = train_lib.step_fns(graphdef, tx, mesh, cfg.grad_accum)  # the step train.py runs

    def step(params, opt_state, rest_d, batch):
        return train_fn(params, opt_state, rest_d, batch)[:3]

    args = (_abstract(params, p_sh), _abstract(opt, o_sh), _abstract(rest, r_sh), batch)
    out_sh = (p_sh, o_sh, NamedSharding(mesh, sharding.P()))
    with jax.numpy_dtype_promotion("standard"):
        lowered = jax.jit(step, out_shardings=out_sh).trace(*args).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    m = re.search(r"mhlo.num_partitions = (\d+)", text)
    report = {"config": cfg.task, "preset": cfg.model.preset, "implementation": cfg.model.implementation,
              "mesh": mesh_text, "topology": topology, "devices": n, "lowered": True,
              "num_partitions": int(m.group(1)) if m else None,
              "batch": cfg.batch, "grad_accum": cfg.grad_accum,
              "micro_batch": per_shard // cfg.grad_accum,  # sequences per batch shard per step
              "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
              "param_bytes_per_device": _per_device_bytes(params, p_sh),
              "opt_state_bytes_per_device": _per_device_bytes(opt, o_sh),
              "pallas_kernels": text.count("tpu_custom_call"), "hlo_chars": len(text),
              "model_flops_per_token": model_flops_per_token(model_cfg, params, cfg.seq_len, scored)}
    report.update(compile_for_topology(step, args, out_sh, topology, mesh.axis_sizes))
    flops = report.get("xla_flops_per_device")
    if flops is not None and (cfg.model.scan_blocks or cfg.grad_accum > 1):
        report["xla_flops_per_token"] = None
        report["xla_flops_note"] = ("XLA's cost analysis counts a loop body (scanned blocks, accumulated "
                                    "micro-batches) once")
    elif flops is not None:
        report["xla_flops_per_token"] = round(flops * n / (cfg.batch * cfg.seq_len))
    return report


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        cfg = configs.override(configs.get(f.config), list(f.set) + ([f"model.preset={f.preset}"] if f.preset else []))
        print(json.dumps(check(cfg, f.mesh, f.topology)))
    except ValueError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    define_flags()
    cli.run(main)
