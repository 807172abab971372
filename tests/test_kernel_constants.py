"""pallas_kernels never imports miras_jax, so the constants it shares with the library are written
twice; these checks keep the two copies equal."""

import inspect

import jax.numpy as jnp
import numpy as np

import miras_jax as mj
from miras_jax import memory
from pallas_kernels.common import math as kmath
from pallas_kernels.common import residuals as kres


def test_gelu_and_layer_norm_constants_match_the_library():
    assert (kmath.GELU_C, kmath.GELU_A) == (memory._GELU_C, memory._GELU_A)
    assert kmath.LN_EPS == inspect.signature(memory.layer_norm).parameters["eps"].default
    x = jnp.linspace(-4.0, 4.0, 33)
    np.testing.assert_allclose(kmath.gelu(x), memory.ACTIVATIONS["gelu"](x), rtol=1e-6, atol=1e-6)  # float32 rounding


def test_kernel_residuals_cover_the_biases_they_name():
    """Every residual kind the kernels implement is some bias' ``residual_kind``, and the
    hyper-parameters they read are the biases' names."""
    kinds = {mj.bias.DotBias.residual_kind, mj.bias.L2Bias.residual_kind, mj.bias.L1Bias.residual_kind,
             mj.bias.LpBias.residual_kind, *(mj.bias.HuberBias(form=f).residual_kind for f in mj.bias.HUBER_FORMS)}
    assert set(kres.KINDS) == kinds
    names = set()
    for b in (mj.bias.LpBias(), mj.bias.L1Bias(), mj.bias.HuberBias()):
        names |= set(b.default_hparams())
    assert set(kres.HPARAMS) <= names
