"""Recurrent decoding of packed rows: ``prefill(..., segment_ids)`` of a packed prompt, then ``step``s
with ``reset`` at each new document, give every token the output of the packed full forward
(``segment_ids`` over the whole row): memory (exact and mini-batch, boundaries off the chunk grid),
short convolution, sliding-window and global attention, and ``MirasLM`` mixing them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from miras_jax.engine import segments
from miras_jax.nn import LMConfig, MirasLM, MirasLayer
from miras_jax.nn.attention import Attention

SLOW = pytest.mark.slow
DECODE_TOL = 1e-4   # as tests/test_nn.py: float32, same math in another order
D, H, CHUNK = 16, 2, 4
# two rows, T = 14, chunks [0:4] [4:8] [8:12] [12:14]. Row 0: documents start at 5 and 10 (off
# the grid). Row 1: pads inside the prompt (3, and 6 at its end), document 5 starts at 5 and
# continues after the pad, document 6 starts at 11 (off the grid), then two more documents, one of a
# single token, one starting on the grid (12). Decoding takes real tokens only: the pads stay in
# the prompt (7 tokens: the last document starts in its partial chunk; 8: on the grid). IDS_SHORT:
# a prompt inside the first chunk (2 tokens), the next document starting at 2.
IDS = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
                 [7, 7, 7, 0, 7, 5, 0, 5, 5, 5, 5, 6, 8, 9]], jnp.int32)
IDS_SHORT = IDS.at[1, 2:11].set(5)
CASES = [(IDS, 7), (IDS, 8), (IDS_SHORT, 2)]

_forward = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg))   # the packed full forward (eager was slow)
_prefill = nnx.jit(lambda m, x, seg: m.prefill(x, segment_ids=seg))
_step = nnx.jit(lambda m, x, cache, reset: m.step(x, cache, reset=reset))


def _decode(module, x, ids, prompt, *prefill_args):
    """Prefill ``x[:, :prompt]`` with its ``segment_ids``, then one ``step`` per token, ``reset`` where
    ``segments.boundaries`` starts a document; the outputs of all ``t`` tokens."""
    reset = jax.vmap(lambda s: segments.boundaries(s)[0])(ids)
    pre = _prefill if not prefill_args else nnx.jit(
        lambda m, x, seg: m.prefill(x, *prefill_args, segment_ids=seg))
    y, cache = pre(module, x[:, :prompt], ids[:, :prompt])
    ys = [y]
    for t in range(prompt, x.shape[1]):
        y_t, cache = _step(module, x[:, t], cache, reset[:, t])
        ys.append(y_t[:, None])
    return jnp.concatenate(ys, axis=1)


def _x(seed=1):
    return jax.random.normal(jax.random.key(seed), (2, IDS.shape[1], D))


@pytest.mark.parametrize("preset", [pytest.param("moneta", marks=SLOW), "gated_deltanet", pytest.param("titans", marks=SLOW),
                                    pytest.param("memora", marks=SLOW)])
def test_layer_decode_across_boundaries_equals_packed_forward(preset):
    """Mini-batch (buffered decode: the chunk-start state and buffer restart on the row's grid) and
    exact specs; conv buffers restart too."""
    layer = MirasLayer(D, H, preset, chunk_size=CHUNK, gate_rank=4, rngs=nnx.Rngs(0))
    x = _x()
    for ids, prompt in CASES:
        full = _forward(layer, x, ids)
        assert bool(jnp.all(jnp.isfinite(full)))
        np.testing.assert_allclose(_decode(layer, x, ids, prompt), full, rtol=DECODE_TOL, atol=DECODE_TOL,
                                   err_msg=f"{preset} prompt={prompt}")


@pytest.mark.parametrize("window", [None, 3])
def test_attention_decode_across_boundaries_equals_packed_forward(window):
    """The KV cache keeps only the last document's keys after a packed prefill, and forgets every
    key at a reset (global and sliding-window; the window wraps its slots)."""
    attn = Attention(D, H, window=window, rngs=nnx.Rngs(0))
    x = _x()
    for ids, prompt in CASES:
        np.testing.assert_allclose(_decode(attn, x, ids, prompt, ids.shape[1]), _forward(attn, x, ids),
                                   rtol=DECODE_TOL, atol=DECODE_TOL, err_msg=f"window={window} prompt={prompt}")


@pytest.mark.parametrize("pattern,preset", [("MSA", "moneta"), pytest.param("MA", "gated_deltanet", marks=SLOW)])
def test_lm_decode_across_boundaries_equals_packed_forward(pattern, preset):
    cfg = LMConfig(vocab_size=40, d_model=D, num_layers=len(pattern), num_heads=H, preset=preset,
                   pattern=pattern, window=3, chunk_size=CHUNK, gate_rank=4)
    model = MirasLM(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(2), IDS.shape, 0, 40)
    full = _forward(model, toks, IDS)
    np.testing.assert_allclose(_decode(model, toks, IDS, 7), full, rtol=DECODE_TOL, atol=DECODE_TOL)


def test_step_without_reset_after_a_packed_prefill_continues_the_last_document():
    """``reset=None`` on a cache from a packed prefill (no boundary at tokens 7, 8): the mini-batch
    state still treats the earlier document's buffer tokens and the pads as gone."""
    layer = MirasLayer(D, H, "moneta", chunk_size=CHUNK, gate_rank=4, rngs=nnx.Rngs(0))
    x = _x()
    full = layer(x, IDS)
    y, cache = _prefill(layer, x[:, :7], IDS[:, :7])
    step = nnx.jit(lambda m, x, cache: m.step(x, cache))
    out = [y]
    for t in (7, 8):
        y_t, cache = step(layer, x[:, t], cache)
        out.append(y_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(out, axis=1), full[:, :9], rtol=DECODE_TOL, atol=DECODE_TOL)
