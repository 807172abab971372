"""Shared test inputs (random sequences with realistic gates) and the default / slow split of grids."""

import jax
import jax.numpy as jnp
import pytest


def rotate(names, options, name_id=str, option_id=str):
    """The grid ``names x options`` as ``pytest.param(name, option)``s: name ``i`` runs option
    ``i mod len(options)`` by default and the rest under ``-m slow``. Every name and every option
    stays in the default suite (not every pair: the full grid is ``-m 'slow or not slow'``)."""
    out = []
    for i, name in enumerate(names):
        for j, opt in enumerate(options):
            marks = () if j == i % len(options) else (pytest.mark.slow,)
            out.append(pytest.param(name, opt, marks=marks, id=f"{name_id(name)}-{option_id(opt)}"))
    return out


def some_slow(names, slow):
    """``names`` as pytest params, those in ``slow`` marked ``slow`` (run with ``-m slow``)."""
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in names]


def unit_rows(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def random_inputs(seed, T, d_k, d_v, *, num_steps=1, channel_decay=False, dtype=jnp.float32):
    """``q, k`` l2-normalised; ``v`` normal; gates in realistic ranges."""
    ks = jax.random.split(jax.random.key(seed), 8)
    kshape = (T, num_steps, d_k) if num_steps > 1 else (T, d_k)
    vshape = (T, num_steps, d_v) if num_steps > 1 else (T, d_v)
    q = unit_rows(jax.random.normal(ks[0], (T, d_k)))
    k = unit_rows(jax.random.normal(ks[1], kshape))
    v = jax.random.normal(ks[2], vshape)
    lr_shape = (T, num_steps) if num_steps > 1 else (T,)
    gates = {
        "lr": jax.random.uniform(ks[3], lr_shape, minval=0.05, maxval=0.9),
        "decay": jax.random.uniform(ks[4], (T, d_k) if channel_decay else (T,), minval=0.8, maxval=1.0),
        "momentum": jax.random.uniform(ks[5], (T,), minval=0.5, maxval=0.95),
        "delta": jax.random.uniform(ks[6], (T,), minval=0.1, maxval=1.0),
        "omega": jax.random.uniform(ks[7], (T,), minval=0.3, maxval=1.0),
    }
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), jax.tree.map(cast, gates)
