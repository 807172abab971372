"""Test setup: 8 virtual CPU devices (for sharding tests) and strict dtype promotion."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
