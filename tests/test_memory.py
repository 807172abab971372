"""Memory architectures: the closed-form GELU derivatives behind the MLP memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from miras_jax import memory as M

F64_TOL = 1e-12  # closed form vs autodiff of the same float64 formula


def _nth_derivative(f, n):
    for _ in range(n):
        f = jax.grad(f)
    return jax.vmap(f)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_gelu_tanh_matches_jax_nn_gelu(x64, order):
    """``gelu_tanh`` and its custom JVPs (gelu', gelu'') equal autodiff of ``jax.nn.gelu``."""
    x = jnp.concatenate([jnp.linspace(-8.0, 8.0, 161), jnp.array([0.0, 1e-7, -1e-7])])
    ref = _nth_derivative(lambda z: jax.nn.gelu(z, approximate=True), order)(x)
    got = _nth_derivative(M.gelu_tanh, order)(x)
    np.testing.assert_allclose(got, ref, rtol=F64_TOL, atol=F64_TOL)


@pytest.mark.parametrize("name", ["gelu", "silu", "identity"])
def test_activation_derivatives_equal_autodiff(x64, name):
    """``activation_derivatives`` (one shared evaluation) == value, first and second autodiff derivatives."""
    x = jnp.linspace(-6.0, 6.0, 97)
    f = M.ACTIVATIONS[name]
    got = M.activation_derivatives(name, x, 3)
    assert len(got) == 3 and len(M.activation_derivatives(name, x, 2)) == 2
    for order, g in enumerate(got):
        np.testing.assert_allclose(g, _nth_derivative(f, order)(x), rtol=F64_TOL, atol=F64_TOL)


def test_gelu_tanh_check_grads(x64):
    x = jnp.linspace(-4.0, 4.0, 33)
    check_grads(M.gelu_tanh, (x,), order=3, modes=("fwd", "rev"))


def test_mlp_memory_uses_the_closed_form_gelu():
    mem = M.mlp_memory()
    params = mem.init(jax.random.key(0), 8, 8)
    x = jax.random.normal(jax.random.key(1), (8,))
    w0, w1 = params["layers"]
    h = w1 @ jax.nn.gelu(w0 @ x, approximate=True)
    np.testing.assert_allclose(mem.apply(params, x), x + M.layer_norm(h), rtol=1e-6, atol=1e-6)
