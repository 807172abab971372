"""Ahead-of-time check of a training config for a target TPU topology, without the hardware.

    python -m experiments.aot --config=mqar --mesh=data:4,fsdp:4 --topology=v5e:4x4 [--set=...]

1. The model is built from shapes only (``nnx.eval_shape``); every parameter, optimizer-state
   and batch array gets its ``NamedSharding`` (``miras_jax.sharding`` rules) on an
   ``AbstractMesh`` of the topology's size, and the train step is lowered for TPU: shape,
   sharding-rule and lowering errors (including Pallas kernels, as Mosaic custom calls) show up
   here, before a job starts. Reports the per-device parameter + optimizer bytes.
2. With TPU support installed (``jax[tpu]``: libtpu), it also compiles for the topology
   (``jax.experimental.topologies``) and reports XLA's per-device memory analysis; without it the
   report says so (``compiled: false`` and why).
Prints one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

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


def define_flags():
    flags.DEFINE_string("config", "mqar", f"config name: {configs.names()}")
    flags.DEFINE_string("mesh", "data:4,fsdp:4", "mesh, e.g. data:4,fsdp:4")
    flags.DEFINE_string("topology", "v5e:4x4", "TPU topology 'type:AxB[xC]' (chips)")
    flags.DEFINE_string("preset", None, "override the Miras preset")
    flags.DEFINE_list("set", [], "config overrides field=value")


def topology_devices(topology: str) -> int:
    """Chips of ``"v5e:4x4"`` (16) or ``"v4:2x2x2"`` (8)."""
    m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", topology)
    if not m:
        raise ValueError(f"topology must look like 'v5e:4x4' or 'v4:2x2x2', got {topology!r}")
    return math.prod(int(x) for x in m.group(2).split("x"))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _per_device_bytes(tree, shardings) -> int:
    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings, is_leaf=lambda z: isinstance(z, NamedSharding))):
        split = math.prod(s.mesh.shape[a] for dim in s.spec if dim for a in (dim if isinstance(dim, tuple) else (dim,)))
        total += int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize // split
    return total


def check(cfg: configs.TrainConfig, mesh_text: str, topology: str = "v5e:4x4") -> dict:
    """Lower (and where possible compile) ``cfg``'s train step for ``topology`` on ``mesh_text``."""
    sizes = sharding.parse_mesh(mesh_text)
    n, chips = math.prod(sizes.values()), topology_devices(topology)
    if n != chips:
        raise ValueError(f"mesh {mesh_text!r} has {n} devices but topology {topology!r} has {chips}")
    mesh = AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)
    per = math.prod(sizes[a] for a in sharding.RULES["batch"])
    if cfg.batch % per:
        raise ValueError(f"batch={cfg.batch} is not divisible by the batch axes' {per} devices")
    vocab = cfg.mqar_vocab if cfg.task == "mqar" else 256
    model = nnx.eval_shape(lambda: MirasLM(dataclasses.replace(cfg.model, vocab_size=vocab), rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx, _ = train_lib.make_optimizer(cfg)
    opt = jax.eval_shape(tx.init, params)
    p_sh, o_sh = sharding.param_shardings(mesh, params), sharding.param_shardings(mesh, opt)
    r_sh = jax.tree.map(lambda _: NamedSharding(mesh, sharding.P()), rest)
    batch = train_lib.make_task(cfg, None).train_batch(0, 0) if cfg.task == "mqar" else {
        k: np.zeros((cfg.batch, cfg.seq_len), np.int32 if k != "mask" else np.float32)
        for k in ("inputs", "targets", "mask")}
    b_sh = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=b_sh[k]) for k, v in batch.items()}

    def step(params, opt_state, rest_d, batch):
        def loss_fn(p):
            with sharding.use_mesh(mesh):
                logits = nnx.merge(graphdef, p, rest_d)(batch["inputs"], batch.get("positions"))
            return train_lib.masked_loss(logits, batch)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state, loss

    args = (_abstract(params, p_sh), _abstract(opt, o_sh), _abstract(rest, r_sh), batch)
    with jax.numpy_dtype_promotion("standard"):
        lowered = jax.jit(step, out_shardings=(p_sh, o_sh, NamedSharding(mesh, sharding.P()))).trace(
            *args).lower(lowering_platforms=("tpu",))
    text = lowered.as_text()
    m = re.search(r"mhlo.num_partitions = (\d+)", text)
    report = {"config": cfg.task, "preset": cfg.model.preset, "mesh": mesh_text, "topology": topology,
              "devices": n, "lowered": True, "num_partitions": int(m.group(1)) if m else None,
              "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
              "param_bytes_per_device": _per_device_bytes(params, p_sh),
              "opt_state_bytes_per_device": _per_device_bytes(opt, o_sh),
              "pallas_kernels": text.count("tpu_custom_call"), "hlo_chars": len(text)}
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(topology.split(":")[1], "tpu")
        real = jax.sharding.Mesh(np.asarray(topo.devices).reshape(mesh.axis_sizes), sharding.AXES)
        conc = lambda t: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(real, x.sharding.spec)), t)
        with jax.numpy_dtype_promotion("standard"):
            compiled = jax.jit(step).trace(*map(conc, args)).lower().compile()
        mem = compiled.memory_analysis()
        report.update(compiled=True, temp_bytes_per_device=getattr(mem, "temp_size_in_bytes", None))
    except Exception as e:  # noqa: BLE001 — no libtpu here: report, do not fail the check
        report.update(compiled=False, compile_note=f"{type(e).__name__}: {str(e)[:160]}")
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
