"""Shared validation of the static kernel configuration (block sizes per backend)."""

from __future__ import annotations

RETENTIONS = ("linear", "scale", "lag")


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_blocks(backend: str, **dims: int) -> None:
    """Block-size rules: Triton loads only power-of-two blocks and its dots need sides >= 16;
    Mosaic takes any size here (every block spans whole trailing dims; small sides are padded
    to the (8, 128) tiling inside the kernel)."""
    for name, d in dims.items():
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"{name} must be a positive int, got {d!r}")
        if backend == "triton" and (not _pow2(d) or d < 16):
            raise ValueError(f"the Triton (GPU) kernel needs {name} to be a power of two >= 16, got {d}")
