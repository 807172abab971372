"""Blocks and language models: Llama-style stacks whose mixers are Miras layers or attention.

``MirasBlock``: ``x + mixer(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``. ``MirasLM``: embedding,
blocks, final RMSNorm, tied or untied head. ``LMConfig.pattern`` says which mixer each block has,
cycled over the depth: ``"M"`` a Miras layer, ``"S"`` sliding-window attention, ``"A"`` global
attention. ``pattern="M"`` is a pure Miras model, ``"MS"`` a Moneta-H-style hybrid, ``"A"`` the
Transformer++ baseline (RoPE softmax attention) in the same stack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from miras_jax import presets
from miras_jax.engine import segments as segments_lib
from miras_jax.nn.attention import Attention
from miras_jax.nn.layer import MirasLayer, default_lr_max

MIXERS = {"M": "miras", "S": "sliding-window attention", "A": "global attention"}
# ``LMConfig.dtype``: the dtype of the blocks' matmuls and activations (projections, the memory's
# inputs q / k / v, attention, the MLP). float32 stays: the parameters (cast at use), the residual
# stream between blocks, the gates, the memory state with its inner updates and every accumulation
# (engine/), the norms, the logits and the loss. (A bfloat16 residual stream cost the smoke task
# 0.05 nats after 300 steps; a float32 one tracks the float32 model: tests/test_precision.py.)
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# ``LMConfig.remat``: what each block keeps for the backward pass (the rest is recomputed). "none":
# no rematerialisation; "nothing": only the block's input (the least memory); "dots": the matmul
# outputs without batch dimensions; "block_inputs": the normed inputs of the mixer and the MLP.
REMAT_POLICIES = {
    "none": None,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "block_inputs": jax.checkpoint_policies.save_only_these_names("mixer_in", "mlp_in"),
}


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A language model. ``mlp_hidden`` defaults to ``8/3 d`` rounded up to a multiple of 8."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    preset: str = "moneta"
    preset_kwargs: tuple = ()             # ((name, value), ...): hashable
    hparams: tuple = ()                   # ((name, value), ...): spec.with_hparams (p, q, ...)
    pattern: str = "M"
    window: int = 64                      # sliding-window attention span
    chunk_size: int = 64
    implementation: str = "auto"
    remat_every: int = 0
    gate_rank: int = 32
    conv_kernel: int = 4
    decay_init: tuple = ()                # (lo, hi): initial decay spread over heads (MirasLayer)
    lr_max: float | None = None           # inner step size ceiling; None: nn.layer.default_lr_max(spec)
    grad_horizon: int = 0                 # truncated BPTT through the memory every N tokens; 0: exact
    seq_mode: str = "auto"                # on a seq mesh axis: auto / summary / pipeline / hierarchy (engine/context.py)
    seq_global_chunk: int = 0             # hierarchy: the global memory's chunk; 0: context.default_global_chunk
    mlp_hidden: int | None = None
    tie_embeddings: bool = True
    dtype: str = "float32"                # activations and matmuls: "float32" or "bfloat16" (params float32)
    remat: str = "none"                   # per-block rematerialisation policy: REMAT_POLICIES
    scan_blocks: bool = False             # run the blocks as a lax.scan over pattern periods (compiles once)

    def __post_init__(self):
        bad = set(self.pattern) - set(MIXERS)
        if not self.pattern or bad:
            raise ValueError(f"pattern must be a non-empty string over {sorted(MIXERS)} "
                             f"({MIXERS}), got {self.pattern!r}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "window", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")

    @property
    def compute_dtype(self):
        return COMPUTE_DTYPES[self.dtype]

    def mixer(self, i: int) -> str:
        return self.pattern[i % len(self.pattern)]

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or -(-(8 * self.d_model) // 3 // 8) * 8

    def spec(self):
        """The Miras layers' spec: the preset with ``preset_kwargs``, then ``hparams``."""
        spec = presets.get(self.preset, **dict(self.preset_kwargs))
        return spec.with_hparams(**dict(self.hparams)) if self.hparams else spec

    def resolved(self) -> LMConfig:
        """This config with ``lr_max`` the number the Miras layers use (``default_lr_max(spec, chunk_size)``
        when None) and, for a preset with the ``anchor`` option, its value in ``preset_kwargs``, so
        what is saved records the step ceiling and retention map a model trained with."""
        if "M" not in self.pattern:
            return self
        out = self
        kw = dict(self.preset_kwargs)
        if presets.takes(self.preset, "anchor") and "anchor" not in kw:
            kw["anchor"] = self.spec().retention.anchor
            out = dataclasses.replace(out, preset_kwargs=tuple(sorted(kw.items())))
        if out.lr_max is None:
            out = dataclasses.replace(out, lr_max=default_lr_max(out.spec(), out.chunk_size))
        return out


def normed(norm: nnx.RMSNorm, x, dtype):
    """``norm(x)`` computed in float32, returned in the compute ``dtype``."""
    return norm(x.astype(jnp.float32)).astype(dtype)


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.w_gate, self.w_up, self.w_down = lin(d_model, hidden), lin(d_model, hidden), lin(hidden, d_model)

    def __call__(self, x):
        return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


class MirasBlock(nnx.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, ``x + SwiGLU(norm(x))``."""

    def __init__(self, cfg: LMConfig, kind: str, *, rngs: nnx.Rngs):
        self.kind = kind
        self.dtype = dt = cfg.compute_dtype
        if kind == "M":
            self.mixer = MirasLayer(cfg.d_model, cfg.num_heads, cfg.spec(), chunk_size=cfg.chunk_size,
                                    implementation=cfg.implementation, remat_every=cfg.remat_every,
                                    gate_rank=cfg.gate_rank, conv_kernel=cfg.conv_kernel,
                                    decay_init=tuple(cfg.decay_init) or None, lr_max=cfg.lr_max,
                                    grad_horizon=cfg.grad_horizon, seq_mode=cfg.seq_mode,
                                    seq_global_chunk=cfg.seq_global_chunk, dtype=dt, rngs=rngs)
        else:
            self.mixer = Attention(cfg.d_model, cfg.num_heads, window=cfg.window if kind == "S" else None,
                                   dtype=dt, rngs=rngs)
        self.norm1 = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.norm2 = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden, dtype=dt, rngs=rngs)

    def __call__(self, x, segment_ids=None, segment_align: int = 0):
        x = x + self.mixer(checkpoint_name(normed(self.norm1, x, self.dtype), "mixer_in"),
                           segment_ids, segment_align).astype(x.dtype)
        return x + self.mlp(checkpoint_name(normed(self.norm2, x, self.dtype), "mlp_in")).astype(x.dtype)

    def prefill(self, x, max_len: int, segment_ids=None):
        """``(x', cache)``; ``segment_ids [b, t]``: a packed prompt, the cache continues its last document."""
        h = normed(self.norm1, x, self.dtype)
        kw = {} if segment_ids is None else dict(segment_ids=segment_ids)
        y, cache = self.mixer.prefill(h, **kw) if self.kind == "M" else self.mixer.prefill(h, max_len, **kw)
        x = x + y.astype(x.dtype)
        return x + self.mlp(normed(self.norm2, x, self.dtype)).astype(x.dtype), cache

    def step(self, x_t, cache, reset=None):
        """``(x_t', cache)``; ``reset [b]`` (bool): the token starts a new document."""
        kw = {} if reset is None else dict(reset=reset)
        y, cache = self.mixer.step(normed(self.norm1, x_t, self.dtype), cache, **kw)
        x_t = x_t + y.astype(x_t.dtype)
        return x_t + self.mlp(normed(self.norm2, x_t, self.dtype)).astype(x_t.dtype), cache


class MirasLM(nnx.Module):
    """Token ids ``[b, t]`` -> logits ``[b, t, vocab]``; ``prefill`` / ``step`` for decoding."""

    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.blocks = nnx.List([MirasBlock(cfg, cfg.mixer(i), rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.head = None if cfg.tie_embeddings else nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False,
                                                               rngs=rngs)

    def _check(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array [b, t], got {tokens.dtype}{list(tokens.shape)}")

    def _embed(self, tokens):
        return self.embed(tokens)  # the residual stream stays float32

    def _logits(self, h):
        """float32 logits whatever the compute dtype (the final norm and the head run in float32)."""
        h = self.norm(h.astype(jnp.float32))
        return self.embed.attend(h) if self.head is None else self.head(h)

    def _apply(self, graphdef, segment_align: int = 0):
        """``(state, h) -> block(h)`` for blocks of ``graphdef``, rematerialised per ``cfg.remat``."""
        run = lambda s, x, seg: nnx.merge(graphdef, s)(x, seg, segment_align)  # noqa: E731 - pure in the state
        return run if self.cfg.remat == "none" else jax.checkpoint(run, policy=REMAT_POLICIES[self.cfg.remat])

    def _blocks(self, h, segment_ids=None, segment_align: int = 0):
        """All blocks on ``h``. ``cfg.scan_blocks``: the blocks of each whole pattern period (``"M"``:
        one block, ``"MS"``: two) are one ``lax.scan`` step over their states stacked on the fly, so
        the program holds one period whatever the depth (a 24-block model compiles like one block;
        the parameters keep their per-block layout); the remaining ``num_layers % period`` blocks run
        after it."""
        period = len(self.cfg.pattern)
        split = [nnx.split(blk) for blk in self.blocks]
        n = len(split) // period * period if self.cfg.scan_blocks else 0
        if n:
            graphdefs = [gd for gd, _ in split[:period]]
            stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[st for _, st in split[j:n:period]])
                       for j in range(period)]                 # per period position: leaves [n / period, ...]

            def period_step(h, states):
                for gd, st in zip(graphdefs, states):
                    h = self._apply(gd, segment_align)(st, h, segment_ids)
                return h, None

            h, _ = jax.lax.scan(period_step, h, stacked)
        for gd, st in split[n:]:
            h = self._apply(gd, segment_align)(st, h, segment_ids)
        return h

    def __call__(self, tokens, positions=None, segment_ids=None, segment_align: int = 0):
        """Logits ``[b, t, V]`` (float32); with ``positions: [b, n]`` (int) only those positions'
        ``[b, n, V]`` (the head is the costly part with a large vocabulary and few scored tokens, e.g.
        MQAR). ``segment_ids [b, t]`` (int; 0 = padding): packed rows, every mixer (memory,
        convolution, attention) restricted to each token's document (``mj.memorize``);
        ``segment_align``: every document starts at a multiple of it (a packer's padding; the memory
        layers whose chunk divides it run the cheaper one-document chunks, ``mj.memorize``)."""
        self._check(tokens)
        if segment_ids is not None:
            segment_ids = segments_lib.check_segment_ids(segment_ids, tokens.shape)
        segment_align = segments_lib.check_align(segment_ids, segment_align)
        h = self._blocks(self._embed(tokens), segment_ids, segment_align)
        if positions is not None:
            h = jnp.take_along_axis(h, positions[..., None], axis=1)
        return self._logits(h)

    def prefill(self, tokens, max_len: int | None = None, segment_ids=None,
                last_only: bool = False) -> tuple[jax.Array, Any]:
        """``(logits [b, t, V], cache)`` (``last_only``: ``[b, 1, V]``, the last position's: what
        decoding needs, without a ``[b, t, V]`` array); ``max_len`` bounds global-attention caches
        (default: the prompt length + 256). ``segment_ids [b, t]`` (int; 0 = padding): a packed
        prompt, logits as ``self(tokens, segment_ids=...)``; the cache continues each row's last
        document (memory state, conv buffers and attention keys of that document only)."""
        self._check(tokens)
        if segment_ids is not None:
            segment_ids = segments_lib.check_segment_ids(segment_ids, tokens.shape)
        max_len = max_len or tokens.shape[1] + 256
        h = self._embed(tokens)
        caches = []
        for blk in self.blocks:
            h, c = blk.prefill(h, max_len, segment_ids)
            caches.append(c)
        return self._logits(h[:, -1:] if last_only else h), tuple(caches)

    def step(self, token, caches, reset=None):
        """``token: [b]`` int -> ``(logits [b, V], caches)``. ``reset [b]`` (bool): the token starts a
        new document in its row (every block restarts: memory, conv buffers, attention keys), as a
        change of ``segment_ids`` in the full forward. Decoding takes real tokens only (no padding).
        To decode with ``reset`` inside a ``lax.scan``, prefill with ``segment_ids`` (all ones for a
        single document): a mini-batch layer's cache then tracks documents from the start, so its
        structure does not change inside the loop."""
        h = self._embed(token)
        new = []
        for blk, c in zip(self.blocks, caches):
            h, c = blk.step(h, c, reset)
            new.append(c)
        return self._logits(h), tuple(new)


def count_params(model: nnx.Module) -> int:
    """Trainable parameter count (``nnx.Param`` leaves)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def generate(model: MirasLM, prompt, steps: int, *, key=None, temperature: float = 1.0):
    """Sample ``steps`` tokens after ``prompt: [b, t]`` (greedy if ``key`` is None or
    ``temperature == 0``): one ``prefill``, then recurrent ``step``s in a ``jax.lax.scan``.
    Returns ``[b, steps]`` int32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    graphdef, state = nnx.split(model)
    logits, caches = model.prefill(prompt, max_len=prompt.shape[1] + steps, last_only=True)

    def pick(logits, k):
        if key is None or temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(k, logits / temperature).astype(jnp.int32)

    keys = jax.random.split(key if key is not None else jax.random.key(0), steps)

    def body(carry, k):  # carry: the token just sampled and the caches before it
        tok, caches = carry
        logits, caches = nnx.merge(graphdef, state).step(tok, caches)
        return (pick(logits, k), caches), tok

    (last, _), toks = jax.lax.scan(body, (pick(logits[:, -1], keys[0]), caches), keys[1:])
    return jnp.concatenate([toks.T, last[:, None]], axis=1)
