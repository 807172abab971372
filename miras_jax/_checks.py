"""Small helpers for validating hyper-parameters that may be concrete arrays or tracers."""

from __future__ import annotations

import jax
import numpy as np


def concrete(x):
    """``np.ndarray`` of ``x`` if its value is known now (not a tracer), else ``None``."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except Exception:  # noqa: BLE001 - anything not convertible is "unknown"
        return None


def check_range(name: str, x, *, low=None, high=None, low_open=False, what: str = "") -> None:
    """Raise ``ValueError`` if the concrete value(s) of ``x`` fall outside ``[low, high]``."""
    val = concrete(x)
    if val is None:
        return
    if not np.all(np.isfinite(val)):
        raise ValueError(f"hyper-parameter {name} must be finite, got {val}")
    if low is not None:
        bad = val <= low if low_open else val < low
        if np.any(bad):
            op = ">" if low_open else ">="
            raise ValueError(f"hyper-parameter {name} must be {op} {low}{what}, got {val}")
    if high is not None and np.any(val > high):
        raise ValueError(f"hyper-parameter {name} must be <= {high}{what}, got {val}")
