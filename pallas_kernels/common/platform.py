"""Which kernel body runs: compiled Mosaic on TPU, compiled Triton on GPU, the interpreter on
CPU, chosen per *lowering platform* with ``jax.lax.platform_dependent``. So on a CPU host
``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` emits the Mosaic kernel and
``("cuda",)`` the Triton kernel, while running ``f`` there interprets the TPU body."""

from __future__ import annotations

import jax

from pallas_kernels.common import sweep_gpu, sweep_tpu

BACKENDS = ("tpu", "triton")


def sweeps(backend: str):
    """The sweep module of a backend: ``"tpu"`` (Mosaic) or ``"triton"`` (GPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return sweep_tpu if backend == "tpu" else sweep_gpu


def dispatch(call, *, backend: str | None = None, interpret: bool | None = None):
    """Run ``call(backend, interpret)``.

    ``interpret=None, backend=None`` (default): per lowering platform — TPU: Mosaic, CUDA:
    Triton, anything else (CPU): the TPU body interpreted. An explicit ``backend`` and/or
    ``interpret`` pins that choice on every platform (tests run both bodies interpreted).
    """
    if backend is not None or interpret is not None:
        return call(backend or "tpu", bool(interpret))
    return jax.lax.platform_dependent(
        tpu=lambda: call("tpu", False),
        cuda=lambda: call("triton", False),
        default=lambda: call("tpu", True))
