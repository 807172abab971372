"""``MirasLayer``: the Miras sequence mixer as a Flax NNX module (the block of the Miras paper, arXiv 2504.13173).

Axis letters: ``b`` batch, ``t`` tokens, ``d`` model width, ``h`` heads, ``k`` key/head dim,
``v`` value dim, ``r`` gate rank. Per token ``x_t: [d]``::

    q, k, v = SiLU(causal_conv_4(W_q x)), ...          per channel, kernel 4 (depthwise)
    q, k    = q / ||q||, k / ||k||                     per head
    gates   = range(up(down(x)) + bias)                low rank r, one value per head
    y_mem   = memorize(spec, W_0, q, k, v, gates)      the memory (engine/), one per head
    out     = W_o (RMSNorm_head(y_mem) * SiLU(W_g x))

Gate ranges and initialisations (``GATE_INIT``): ``lr = lr_max sigmoid(z)`` (``lr_max`` = 1 for
matrix memories, 0.01 for MLP memories (TTT-MLP, Yaad), 5e-3 for an MLP memory with momentum
(Titans; ``LR_MAX_MOMENTUM_MLP``), 1e-3 under the l_q retention (Moneta; ``LR_MAX_LQ_MLP``), 0.1
under the KL retention (Memora; ``LR_MAX_KL_MLP``); initial ``lr`` ~ ``lr_max / 2``), ``decay = sigmoid(z)``
(initial ~0.95, channel-wise ``[k]`` per head for GLA), ``momentum = sigmoid(z)`` (~0.9),
``delta = softplus(z)`` (~1). ``z = x W_down W_up + bias`` with ``W_up`` initialised small, so
gates start near their bias values and the bias sets the initial range. ``decay_init=(lo, hi)``
spreads the initial decay over the heads instead (multi-scale, as RetNet's per-head gammas):
``1 - decay`` log-spaced from ``1 - lo`` to ``1 - hi``, so some heads start with long memories
(recall tasks need retention near 1 over hundreds of tokens; 0.95^128 ~ 1e-3). The initial memory
``W_0`` (one per head, ``spec.memory.init``) is an outer parameter.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from miras_jax import presets, sharding
from miras_jax.engine import context
from miras_jax.engine import decode as decode_lib
from miras_jax.engine import plan as plan_lib
from miras_jax.engine import segments as segments_lib
from miras_jax.engine import window as window_lib
from miras_jax.engine.api import memorize_batched
from miras_jax.engine.horizon import check_horizon
from miras_jax.engine.tokens import init_state
from miras_jax.spec import MirasSpec

GATE_INIT = {"lr": 0.0, "decay": 2.944, "momentum": 2.197, "delta": 0.541,  # logit(.95), logit(.9)
             "omega": 2.944}   # the Omega window starts as a near-uniform sum
# The inner step's ceiling (``lr = lr_max sigmoid(.)``), each the largest that keeps the memory's
# recurrence stable (exact gradients finite and O(1) at 16k tokens, every decay in [0.5, 0.9999]):
LR_MAX = {"linear": 1.0,     # a matrix memory with unit keys: the delta rule is non-expansive up to 1
          "mlp": 0.01}       # an MLP memory: a chunk's correlated writes add up; larger grows chaotic
# What a run saved before ``lr_max`` was resolved into its config trained with (train._saved_model).
LR_MAX_UNRESOLVED = {"linear": 1.0, "mlp": 0.1}
# Moneta (MLP): W = A / ||A||_q^(q-2) behind a LayerNorm makes each write grow A in proportion to A;
# above ~sqrt(1 - a^2) / 10 the accumulator runs away and the read collapses to its residual.
LR_MAX_LQ_MLP = 1e-3
# Memora (MLP): a multiplicative step (W = c softmax(a log W - lr g)) tolerates a larger one; above
# 0.1 log W drifts when nothing is retained (decay near 1).
LR_MAX_KL_MLP = 0.1
LR_MAX_MOMENTUM_MLP = 5e-3   # Titans: momentum 0.9 multiplies the effective step about 10x
LR_MAX_BY_RETENTION = {("mlp", "lq"): LR_MAX_LQ_MLP, ("mlp", "kl"): LR_MAX_KL_MLP}
GATE_RANGE = {"decay": jax.nn.sigmoid, "momentum": jax.nn.sigmoid, "delta": jax.nn.softplus,
              "omega": jax.nn.sigmoid}  # lr: below
# Muon (Atlas): NS(S) has singular values ~1 whatever the gradient's scale, so the step eta moves W by
# ~eta in spectral norm per token; with decay a, ||W|| ~ eta / (1 - a): 0.1 keeps it O(1) at a = 0.9.
LR_MAX_MUON = 0.1


def default_lr_max(spec: MirasSpec, chunk_size: int = 1) -> float:
    """The inner step ceiling a layer gets when ``lr_max`` is not given: ``LR_MAX_MOMENTUM_MLP`` for an
    MLP memory with momentum, ``LR_MAX_BY_RETENTION`` for (memory kind, retention name) if listed,
    else ``LR_MAX[memory kind]``. Muon: ``LR_MAX_MUON`` (matrix) or ``LR_MAX_MOMENTUM_MLP`` (its step
    has a fixed size whatever the gradient's). An Omega window under GD / momentum: divided by
    ``window.write_gain`` (c tokens over poly features write up to ``c sum_j 1/j!`` unit keys at once)
    and by ``chunk_size`` (the chunk form takes a chunk's ``C c`` writes at one point; poly features'
    constant 1 makes them all share a direction, so the step's curvature grows with ``C c``)."""
    kind = spec.memory.kind
    if spec.optimizer.update_form == "muon":
        return LR_MAX_MUON if kind == "linear" else LR_MAX_MOMENTUM_MLP
    if kind == "mlp" and spec.optimizer.name == "momentum_gd":
        base = LR_MAX_MOMENTUM_MLP
    else:
        base = LR_MAX_BY_RETENTION.get((kind, spec.retention.name), LR_MAX[kind])
    if not window_lib.is_omega(spec):
        return base
    return base / (window_lib.write_gain(spec) * max(int(chunk_size), 1))


def decay_bias(num_heads: int, lo: float, hi: float):
    """Per-head logits whose sigmoids run from ``lo`` to ``hi`` with ``1 - decay`` log-spaced: ``[h]``."""
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"decay_init needs 0 < lo <= hi < 1, got ({lo}, {hi})")
    d = 1.0 - jnp.exp(jnp.linspace(jnp.log(1.0 - lo), jnp.log(1.0 - hi), num_heads, dtype=jnp.float32))
    return jnp.log(d) - jnp.log1p(-d)


def causal_conv(x, w, buf=None, segment_ids=None):
    """Depthwise causal convolution: ``y_t = sum_j w_j x_{t - K + 1 + j}``.

    ``x: [b, t, c]``, ``w: [K, c]``, ``buf: [b, K - 1, c]`` (the previous ``K - 1`` inputs; zeros
    at the start of a sequence). Returns ``(y [b, t, c], new_buf [b, K - 1, c])``.
    ``segment_ids [b, t]`` (packed rows, no ``buf``): a tap reaches only inputs of ``t``'s document.
    """
    K = w.shape[0]
    if buf is None:
        buf = jnp.zeros((x.shape[0], K - 1, x.shape[2]), x.dtype)
    xp = jnp.concatenate([buf.astype(x.dtype), x], axis=1)  # [b, K - 1 + t, c]
    t = x.shape[1]
    if segment_ids is None:
        y = sum(xp[:, j:j + t] * w[j] for j in range(K))
    else:
        segment_ids = segments_lib.document_ids(segment_ids)
        sp = jnp.concatenate([jnp.full((x.shape[0], K - 1), -1, jnp.int32), segment_ids], axis=1)
        y = sum(jnp.where((sp[:, j:j + t] == segment_ids)[..., None], xp[:, j:j + t] * w[j], 0.0)
                for j in range(K))
    return y, xp[:, xp.shape[1] - (K - 1):]


def l2_normalize(x, eps: float = 1e-6):
    """``x / ||x||`` over the last axis; the norm in float32, the result in ``x``'s dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


class HParam(nnx.Variable):
    """A numeric hyper-parameter of the spec (``p``, ``q``, ...): state, but not trained."""


class LayerCache(NamedTuple):
    """Recurrent state of one ``MirasLayer``: conv buffers ``[b, K - 1, h k]`` and the memory's
    decode state (leaves lead with ``[b, h]``)."""

    conv: tuple
    memory: Any


class MirasLayer(nnx.Module):
    """Multi-head Miras mixer for any spec / preset. ``x: [b, t, d] -> [b, t, d]``.

    Args:
      d_model: width ``d``. num_heads: ``h``. head_dim: ``k = v`` (default ``d / h``).
      spec: a ``MirasSpec`` or a preset name (``presets.get``); ``preset_kwargs`` for the latter.
      chunk_size / implementation / remat_every: passed to ``memorize_batched``.
      gate_rank: rank ``r`` of the gate projections. conv_kernel: ``K``.
      channel_decay: ``decay`` per key channel (``[k]`` per head); default: True for "gla".
      decay_init: ``(lo, hi)`` initial decays spread over the heads. lr_max: the inner step size's
        ceiling (``lr = lr_max sigmoid(z)``); default ``default_lr_max(spec)``.
      grad_horizon: truncated backpropagation through the memory state every this many tokens
        (``engine/horizon.py``; a multiple of ``chunk_size``); 0 (default): exact gradients.
      seq_mode / seq_global_chunk: on a mesh with a ``seq`` axis, how the memory runs context-parallel
        (``memorize_batched``; ``engine/context.py``); ``seq_global_chunk`` 0: ``context.default_global_chunk``.
      dtype: the projections' and the memory inputs' dtype (float32 or bfloat16); the parameters,
        gates, memory state and its updates stay float32.
    """

    def __init__(self, d_model: int, num_heads: int, spec, *, head_dim: int | None = None,
                 preset_kwargs: dict | None = None, chunk_size: int = 64, implementation: str = "auto",
                 remat_every: int = 0, gate_rank: int = 32, conv_kernel: int = 4,
                 channel_decay: bool | None = None, decay_init: tuple[float, float] | None = None,
                 lr_max: float | None = None, grad_horizon: int = 0, seq_mode: str = "auto",
                 seq_global_chunk: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        if isinstance(spec, str):
            spec = presets.get(spec, **(preset_kwargs or {}))
        if num_heads < 1 or (head_dim is None and d_model % num_heads):
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads} "
                             "(or pass head_dim)")
        head_dim = head_dim or d_model // num_heads
        lr_max = default_lr_max(spec, chunk_size) if lr_max is None else lr_max
        if not (isinstance(lr_max, (int, float)) and 0.0 < lr_max < float("inf")):
            raise ValueError(f"lr_max must be a positive finite number, got {lr_max!r}")
        self.lr_max = float(lr_max)
        if conv_kernel < 1 or gate_rank < 1:
            raise ValueError(f"conv_kernel and gate_rank must be >= 1, got {conv_kernel}, {gate_rank}")
        # static structure (hashable) + numeric hyper-parameters as non-trainable state, so the
        # module holds no raw arrays outside Variables and a grid can vmap over ``HParam``s.
        self._structure = (spec.memory, spec.bias, spec.retention, spec.optimizer, spec.grad_at, spec.name)
        self.hparams = nnx.Dict({f"{c}/{n}": HParam(jnp.asarray(x, jnp.float32))
                                 for c, d in spec.hparams.items() for n, x in d.items()})
        self.h, self.k = num_heads, head_dim
        self.chunk_size, self.implementation, self.remat_every = chunk_size, implementation, remat_every
        check_horizon(grad_horizon, chunk_size)
        self.grad_horizon = int(grad_horizon)
        context.seq_mode(spec, seq_mode)   # a ValueError now, not at the first call on a seq mesh
        if not isinstance(seq_global_chunk, int) or seq_global_chunk < 0:
            raise ValueError(f"seq_global_chunk must be an int >= 0, got {seq_global_chunk!r}")
        self.seq_mode, self.seq_global_chunk = seq_mode, seq_global_chunk
        self.channel_decay = (spec.name == "gla") if channel_decay is None else channel_decay
        if self.channel_decay and spec.memory.kind != "linear":
            raise ValueError("channel-wise decay needs a matrix (linear) memory")
        hk = num_heads * head_dim
        self.n = n = spec.num_steps     # keys / values per token (DeltaProduct: n > 1)
        self.dtype = jnp.dtype(dtype)
        lin = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=self.dtype, rngs=rngs)
        self.wq, self.wk, self.wv, self.wg, self.wo = lin(d_model, hk), lin(d_model, n * hk), \
            lin(d_model, n * hk), lin(d_model, hk), lin(hk, d_model)
        # one depthwise kernel per stream: q, then the n keys, then the n values
        conv_init = jax.random.normal(rngs.params(), (1 + 2 * n, conv_kernel, hk)) / conv_kernel ** 0.5
        self.conv = nnx.Param(conv_init.at[:, -1].add(1.0))  # starts near identity
        self.gates = tuple(spec.required_gates)
        self.gate_down = nnx.Linear(d_model, gate_rank, use_bias=False, rngs=rngs)
        ups = {}
        for g in self.gates:
            width = num_heads * (head_dim if (g == "decay" and self.channel_decay) else n if g == "lr" else 1)
            w = 0.01 * jax.random.normal(rngs.params(), (gate_rank, width)) / gate_rank ** 0.5
            bias = jnp.full((width,), GATE_INIT[g], jnp.float32)  # strong dtype: a weak-typed
            # leaf would come back strong from the first optimizer step and recompile train_step
            if g == "decay" and decay_init:
                bias = jnp.repeat(decay_bias(num_heads, *decay_init), width // num_heads)
            ups[g] = (nnx.Param(w), nnx.Param(bias))
        self.gate_up = nnx.Dict({g: nnx.List(list(p)) for g, p in ups.items()})
        keys = jax.random.split(rngs.params(), num_heads)
        w0 = jax.vmap(lambda kk: spec.memory.init(kk, head_dim, head_dim))(keys)   # leaves [h, out, in]
        self.memory_w0 = nnx.List([nnx.Param(w) for w in spec.memory.leaves(w0)])
        self.out_norm = nnx.RMSNorm(head_dim, rngs=rngs)

    # -- pieces -------------------------------------------------------------------------------

    @property
    def spec(self) -> MirasSpec:
        hp = {c: {} for c in ("bias", "retention", "optimizer")}
        for key, var in self.hparams.items():
            c, n = key.split("/")
            hp[c][n] = var[...]
        return MirasSpec(*self._structure[:4], grad_at=self._structure[4], name=self._structure[5],
                         hparams=hp)

    def memory_init(self):
        """The initial memory ``W_0`` of every head (leaves ``[h, out, in]``)."""
        return self.spec.memory.from_leaves([w[...] for w in self.memory_w0])

    def _qkv(self, x, conv_bufs, segment_ids=None):
        """``q [b, t, h, k]``, ``k, v [b, t, h, k]`` (``[b, t, h, n, k]`` for ``n > 1`` keys per
        token), conv buffers (one per stream: q, the n keys, the n values)."""
        b, t, _ = x.shape
        hk = self.h * self.k
        streams = [self.wq(x)]
        for proj in (self.wk, self.wv):
            y = proj(x)
            streams += [y[..., j * hk:(j + 1) * hk] for j in range(self.n)]
        outs, bufs = [], []
        for i, y in enumerate(streams):
            y, nb = causal_conv(y, self.conv[...][i].astype(y.dtype), None if conv_bufs is None else conv_bufs[i],
                                segment_ids)
            outs.append(jax.nn.silu(y).reshape(b, t, self.h, self.k))
            bufs.append(nb)
        q, ks, vs = outs[0], outs[1:1 + self.n], outs[1 + self.n:]
        k, v = (ks[0], vs[0]) if self.n == 1 else (jnp.stack(ks, axis=3), jnp.stack(vs, axis=3))
        return l2_normalize(q), l2_normalize(k), v, tuple(bufs)

    def _gates(self, x):
        """``{name: [b, t, h]}`` (``decay`` ``[b, t, h, k]`` if channel-wise)."""
        b, t, _ = x.shape
        z0 = self.gate_down(x.astype(jnp.float32))  # gates in float32: decays near 1 need its precision
        out = {}
        for g in self.gates:
            w, bias = self.gate_up[g]
            z = z0 @ w[...] + bias[...]
            z = z.reshape(b, t, self.h, -1)
            keep = (g == "decay" and self.channel_decay) or (g == "lr" and self.n > 1)
            z = z if keep else z[..., 0]
            out[g] = self.lr_max * jax.nn.sigmoid(z) if g == "lr" else GATE_RANGE[g](z)
        return out

    @property
    def plan(self):
        """The engine plan of this layer's memory (``mj.plan``): which engine runs it and why."""
        return plan_lib.plan(self.spec, self.implementation, self.chunk_size, channel=self.channel_decay)

    def _mesh_kw(self, batch: int, T: int) -> dict:
        """``memorize_batched``'s sharding arguments on the active mesh (none without one): the
        heads' mesh axes; for ``"pallas"`` the mesh and batch axes of its ``shard_map``; on a mesh
        with a ``seq`` axis, context parallelism (``engine/context.py``) where ``T`` splits into
        equal slices (of whole chunks for the pipeline), else the tokens are gathered (XLA)."""
        mesh = sharding.active_mesh()
        if mesh is None:
            return {}
        kw = dict(head_axes=sharding.mesh_axes("heads", self.h))
        if self.plan.implementation == "pallas":
            kw.update(mesh=mesh, batch_axes=sharding.mesh_axes("batch", batch))
        n = mesh.shape.get("seq", 1)
        g = self.seq_global_chunk or None
        if n > 1 and context.splits(self.spec, T, n, self.chunk_size, self.grad_horizon, self.seq_mode, g):
            kw.update(mesh=mesh, batch_axes=sharding.mesh_axes("batch", batch), seq_axis="seq",
                      seq_mode=self.seq_mode, seq_global_chunk=g)
        return kw

    def _out(self, x, y):
        b, t = x.shape[:2]
        y = self.out_norm(y.astype(jnp.float32)).astype(self.dtype).reshape(b, t, self.h * self.k)
        return self.wo(y * jax.nn.silu(self.wg(x)))

    # -- full sequence, prefill, step --------------------------------------------------------

    def __call__(self, x, segment_ids=None, segment_align: int = 0):
        """``x [b, t, d] -> [b, t, d]``; ``segment_ids [b, t]``: packed rows (``mj.memorize``: each
        document restarts the memory; the convolution and the memory see only their document);
        ``segment_align``: every document starts at a multiple of it (``mj.memorize``)."""
        q, k, v, _ = self._qkv(x, None, segment_ids)
        # heads over the mesh's tensor axis, batch over data/fsdp (no-op without an active mesh)
        q, k, v = (sharding.constrain(a, ("batch", "seq", "heads", "dim")) for a in (q, k, v))
        y, _ = memorize_batched(self.spec, self.memory_init(), q, k, v, self._gates(x),
                                chunk_size=self.chunk_size, implementation=self.plan.implementation,
                                remat_every=self.remat_every, grad_horizon=self.grad_horizon,
                                segment_ids=segment_ids, segment_align=segment_align,
                                **self._mesh_kw(q.shape[0], q.shape[1]))
        y = sharding.constrain(y, ("batch", "seq", "heads", "dim"))
        return self._out(x, y)

    def _gate_shapes(self):
        return {g: ((self.k,) if (g == "decay" and self.channel_decay) else (self.n,) if (g == "lr" and self.n > 1)
                    else ()) for g in self.gates}

    def _vmap_bh(self, fn, *args):
        return jax.vmap(jax.vmap(fn))(*args)

    def _reset_state(self):
        """``init_state(spec, W_0)`` of every head (leaves ``[h, ...]``): where a document restarts."""
        w0 = jax.tree.map(lambda a: a.astype(jnp.float32), self.memory_init())
        return jax.vmap(lambda p: init_state(self.spec, p))(w0)

    def prefill(self, x, segment_ids=None):
        """``(y [b, t, d], LayerCache)``: the full-sequence forward plus the state after it.

        ``segment_ids [b, t]``: a packed prompt (``y`` as ``self(x, segment_ids)``); the cache
        continues the row's last document: conv buffers hold only its inputs (others zeroed), the
        memory is the packed forward's state (buffered specs: the last chunk's tokens of earlier
        documents and pads no longer write, ``decode.decode_prefill``)."""
        if segment_ids is not None:
            return self._prefill_packed(x, segment_ids)
        q, k, v, bufs = self._qkv(x, None)
        gates = self._gates(x)
        c, impl = self.chunk_size, self.plan.implementation
        T = x.shape[1]
        kw = dict(chunk_size=c, implementation=impl, remat_every=self.remat_every)
        if not decode_lib.buffered(self.spec, c, impl):
            y, st = memorize_batched(self.spec, self.memory_init(), q, k, v, gates, **kw,
                                     **self._mesh_kw(x.shape[0], T))
            ds = self._vmap_bh(lambda s, w: decode_lib.DecodeState(s, (), jnp.zeros((), jnp.int32), win=w), st,
                               self._window(k, v, gates))
            return self._out(x, y), LayerCache(bufs, ds)
        # mini-batch form: full chunks through the engine, the remainder into the chunk buffer.
        m = T - T % c
        head = lambda a: a[:, :m]
        b = x.shape[0]
        if m:
            y1, st = memorize_batched(self.spec, self.memory_init(), head(q), head(k), head(v),
                                      jax.tree.map(head, gates), **kw, **self._mesh_kw(b, m))
        else:  # shorter than one chunk: the initial state, for every batch row
            y1 = jnp.zeros((b, 0, self.h, self.k), v.dtype)
            w0 = jax.tree.map(lambda a: a.astype(jnp.float32), self.memory_init())
            st0 = jax.vmap(lambda p: init_state(self.spec, p))(w0)
            st = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), st0)
        ds = self._vmap_bh(lambda s, w: decode_lib.decode_init(
            self.spec, s, chunk_size=c, implementation=impl, d_k=self.k, d_v=self.k,
            gate_shapes=self._gate_shapes(), win=w), st,
            self._window(head(k), head(v), jax.tree.map(head, gates)) if m else None)
        ys = [y1]
        for i in range(m, T):  # the remainder (< c tokens), token by token into the buffer
            y_i, ds = self._memory_step(ds, q[:, i], k[:, i], v[:, i], jax.tree.map(lambda a, i=i: a[:, i], gates))
            ys.append(y_i[:, None])
        return self._out(x, jnp.concatenate(ys, axis=1)), LayerCache(bufs, ds)

    def _prefill_packed(self, x, segment_ids):
        """``prefill`` of a packed prompt: full chunks through the engine with ``segment_ids``, the
        remainder through ``decode.decode_prefill`` (one engine call on the partial chunk)."""
        q, k, v, bufs = self._qkv(x, None, segment_ids)
        b, T = x.shape[:2]
        # conv buffers: the last K - 1 inputs, zeroed outside the last document (and before the row)
        last = jax.vmap(decode_lib.last_document)(segment_ids)                        # [b, t]
        K1 = bufs[0].shape[1]
        keep = jnp.concatenate([jnp.zeros((b, K1), bool), last], axis=1)[:, T:]       # [b, K - 1]
        bufs = tuple(jnp.where(keep[..., None], buf, jnp.zeros_like(buf)) for buf in bufs)
        gates = self._gates(x)
        c, impl = self.chunk_size, self.plan.implementation
        kw = dict(chunk_size=c, implementation=impl, remat_every=self.remat_every)
        if not decode_lib.buffered(self.spec, c, impl):
            y, st = memorize_batched(self.spec, self.memory_init(), q, k, v, gates, segment_ids=segment_ids,
                                     **kw, **self._mesh_kw(b, T))
            ds = self._vmap_bh(lambda s, w: decode_lib.DecodeState(s, (), jnp.zeros((), jnp.int32), win=w), st,
                               self._window(k, v, gates, segment_ids))
            return self._out(x, y), LayerCache(bufs, ds)
        m = T - T % c
        head = lambda a: a[:, :m]  # noqa: E731
        rs = self._reset_state()
        if m:
            y1, st = memorize_batched(self.spec, self.memory_init(), head(q), head(k), head(v),
                                      jax.tree.map(head, gates), segment_ids=head(segment_ids), **kw,
                                      **self._mesh_kw(b, m))
        else:
            y1 = jnp.zeros((b, 0, self.h, self.k), v.dtype)
            st = jax.tree.map(lambda a: jnp.broadcast_to(a, (b,) + a.shape), rs)
        reset, real = jax.vmap(segments_lib.boundaries)(segment_ids)                  # [b, t]
        tail = lambda a: a[:, m:]  # noqa: E731

        win = self._window(head(k), head(v), jax.tree.map(head, gates), head(segment_ids)) if m else None
        if win is None and window_lib.is_omega(window_lib.lower_spec(self.spec)):
            win = self._vmap_bh(lambda _: decode_lib.empty_window(self.spec, self.k, self.k, self._gate_shapes()),
                                jnp.zeros((b, self.h)))

        def one(st, q, k, v, g, reset, real, rs, w):
            return decode_lib.decode_prefill(self.spec, st, q, k, v, g, reset, real, rs, chunk_size=c, win=w)

        # [b, r, h, ...] -> per (b, h): heads after the token axis
        th = lambda a: jnp.moveaxis(tail(a), 2, 1)  # noqa: E731
        y2, ds = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, 0, 0, None, None, 0, 0)),
                          in_axes=(0, 0, 0, 0, 0, 0, 0, None, 0))(
            st, th(q), th(k), th(v), jax.tree.map(th, gates), tail(reset), tail(real), rs, win)
        y = jnp.concatenate([y1, jnp.moveaxis(y2, 1, 2).astype(y1.dtype)], axis=1)
        return self._out(x, y), LayerCache(bufs, ds)

    def _window(self, k, v, gates, segment_ids=None):
        """An Omega window's decode state after ``k, v [b, t, h, .]``, gates ``[b, t, h]`` (leaves
        ``[b, h, c - 1, ...]``, ``window.window_state``), or ``None`` for other specs."""
        spec = self.spec
        low = window_lib.lower_spec(spec)
        if not window_lib.is_omega(low):
            return None

        def one(k, v, g, seg):
            k, g = window_lib.lower_keys(spec, k, g)
            return window_lib.window_state(low, k, v, g, None if seg is None else segments_lib.boundaries(seg))

        th = lambda a: jnp.moveaxis(a, 2, 1)  # noqa: E731   [b, t, h, ...] -> [b, h, t, ...]
        inner = jax.vmap(one, in_axes=(0, 0, 0, None))
        return jax.vmap(inner, in_axes=(0, 0, 0, None if segment_ids is None else 0))(
            th(k), th(v), jax.tree.map(th, gates), segment_ids)

    def _memory_step(self, ds, q_t, k_t, v_t, gates_t, reset=None):
        """``q_t, k_t, v_t: [b, h, k]``, gates ``[b, h(, k)]``, ``reset [b]`` -> ``(y [b, h, v], ds)``."""
        kw = dict(chunk_size=self.chunk_size, implementation=self.plan.implementation)
        if reset is None and ds.lo is None:
            def one(ds, q, k, v, g):
                return decode_lib.decode_step(self.spec, ds, q, k, v, g, **kw)
            return self._vmap_bh(one, ds, q_t, k_t, v_t, gates_t)

        def one_doc(ds, q, k, v, g, r, rs):   # reset r: per row, shared by the heads; rs: per head
            return decode_lib.decode_step(self.spec, ds, q, k, v, g, reset_t=r, reset_state=rs, **kw)
        inner = jax.vmap(one_doc, in_axes=(0, 0, 0, 0, 0, None, 0))
        return jax.vmap(inner, in_axes=(0, 0, 0, 0, 0, 0, None))(ds, q_t, k_t, v_t, gates_t, reset,
                                                                self._reset_state())

    def step(self, x_t, cache: LayerCache, reset=None):
        """One token: ``x_t: [b, d] -> (y_t [b, d], LayerCache)``.

        ``reset [b]`` (bool): the token starts a new document (packed rows, ``engine/segments.py``):
        before it writes, its row's conv buffers become zeros and the memory restarts from
        ``init_state(spec, W_0)`` (buffered mini-batch specs: on the row's chunk grid, as the packed
        forward, ``engine/decode.py``). Decoding takes real tokens only: there is no pad token."""
        x = x_t[:, None]
        conv = cache.conv
        if reset is not None:
            reset = jnp.asarray(reset, bool)
            conv = tuple(jnp.where(reset[:, None, None], jnp.zeros_like(buf), buf) for buf in conv)
        q, k, v, bufs = self._qkv(x, conv)
        gates = jax.tree.map(lambda a: a[:, 0], self._gates(x))
        y, ds = self._memory_step(cache.memory, q[:, 0], k[:, 0], v[:, 0], gates, reset)
        return self._out(x, y[:, None])[:, 0], LayerCache(bufs, ds)
