"""``memorize``: the public entry point, with input validation and implementation dispatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import chex
import jax
import jax.numpy as jnp
import numpy as np

from miras_jax._checks import concrete
from miras_jax.engine import context, dispatch
from miras_jax.engine import horizon as horizon_lib
from miras_jax.engine import pallas as pallas_path
from miras_jax.engine import plan as plan_lib
from miras_jax.engine import segments as segments_lib
from miras_jax.engine import window as window_lib
from miras_jax.engine.plan import IMPLEMENTATIONS
from miras_jax.engine.tokens import MemoryState, init_state

if TYPE_CHECKING:
    from miras_jax.spec import MirasSpec

GATE_DOCS = {
    "lr": "inner learning rate eta_t (beta_t for the delta family), shape [T] ([T, n] per sub-step)",
    "decay": "retention alpha_t, shape [T] or channel-wise [T, d_k] (matrix memory)",
    "momentum": "momentum m_t, shape [T]",
    "delta": "Huber threshold delta_t, shape [T]",
    "omega": "Omega rule weight gamma_t of token t's loss in the window, shape [T]",
}


# where each known gate must lie (checked on concrete values; ``None``: unbounded on that side)
GATE_RANGES = {"lr": (0.0, None), "decay": (0.0, 1.0), "momentum": (0.0, 1.0), "delta": (0.0, None),
               "omega": (0.0, 1.0)}


def check_gates(spec, gates) -> None:
    """Reject gate names that no spec reads (a misspelt ``lrr`` would otherwise be ignored while
    the spec fails for the missing ``lr``, or silently if the gate were optional) and concrete gate
    values that are NaN / inf or outside ``GATE_RANGES`` (``lr, delta >= 0``; ``decay, momentum`` in
    ``[0, 1]``). Under ``jit`` / ``vmap`` / ``grad`` the gates are tracers: only names and shapes are
    checked then (values cannot be known at trace time); a layer produces them in range by
    construction (``MirasLayer``: ``lr_max sigmoid``, ``sigmoid``, ``softplus``)."""
    if gates is None:
        return
    if not isinstance(gates, dict):
        raise TypeError(f"gates must be a dict of per-token arrays, got {type(gates).__name__}")
    unknown = sorted(set(gates) - set(GATE_DOCS))
    if unknown:
        raise ValueError(f"unknown gate name(s) {unknown}; known gates: {sorted(GATE_DOCS)} "
                         f"(spec {spec.name!r} reads {list(spec.required_gates)})")
    for name in spec.required_gates:
        if name not in gates:
            continue
        val = concrete(gates[name])
        if val is None or val.size == 0:
            continue
        val = np.asarray(val, np.float32)
        lo, hi = GATE_RANGES[name]
        if not np.all(np.isfinite(val)):
            raise ValueError(f"gate {name!r} has non-finite values ({int(np.sum(~np.isfinite(val)))} of {val.size})")
        if (lo is not None and val.min() < lo) or (hi is not None and val.max() > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise ValueError(f"gate {name!r} must lie in {rng} ({GATE_DOCS[name]}); "
                             f"got values in [{val.min():.4g}, {val.max():.4g}]")


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _check_array(name, x, ndims, shape_txt):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if not _is_float(x):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must have shape {shape_txt}, got {tuple(x.shape)}")


def check_inputs(spec, params, q, k, v, gates):
    """Validate shapes / dtypes / gates / hyper-parameters; returns the gates the spec reads,
    each an array with leading axis ``T``. Raises ``ValueError`` / ``TypeError`` with the reason."""
    n = spec.num_steps
    _check_array("q", q, (2,), "[T, d_k]")
    _check_array("k", k, (2, 3) if n > 1 else (2,), "[T, d_k]" + (" or [T, n, d_k]" if n > 1 else ""))
    _check_array("v", v, (2, 3) if n > 1 else (2,), "[T, d_v]" + (" or [T, n, d_v]" if n > 1 else ""))
    T, d_k = q.shape
    d_v = v.shape[-1]
    if k.shape[0] != T or v.shape[0] != T:
        raise ValueError(f"q, k, v must share the token axis: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[-1] != d_k:
        raise ValueError(f"q and k must share d_k: q {tuple(q.shape)}, k {tuple(k.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.ndim == 3 and x.shape[1] != n:
            raise ValueError(f"{name} has {x.shape[1]} sub-steps per token but the spec takes "
                             f"num_steps={n}: {name} {tuple(x.shape)}")

    expected = jax.eval_shape(lambda: spec.memory.init(jax.random.key(0), d_k, d_v))
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), params)
    same_tree = jax.tree.structure(expected) == jax.tree.structure(got)
    if not same_tree or any(a.shape != b.shape for a, b in zip(jax.tree.leaves(expected),
                                                                 jax.tree.leaves(got))):
        shapes = jax.tree.map(lambda s: tuple(s.shape), expected)
        raise ValueError(f"memory params do not match {type(spec.memory).__name__} for d_k={d_k}, "
                         f"d_v={d_v}: expected shapes {shapes}, got "
                         f"{jax.tree.map(lambda s: tuple(s.shape), got)}")
    if not all(_is_float(x) for x in jax.tree.leaves(params)):
        raise TypeError("memory params must be floating-point arrays")
    spec.retention.check_params(params)
    spec.validate()

    gates = {} if gates is None else gates
    check_gates(spec, gates)
    out = {}
    for name in spec.required_gates:
        if name not in gates:
            raise ValueError(f"spec {spec.name!r} needs gate {name!r} ({GATE_DOCS.get(name, '')}); "
                             f"got gates {sorted(gates)}; required: {list(spec.required_gates)}")
        g = jnp.asarray(gates[name])
        if not _is_float(g):
            raise TypeError(f"gate {name!r} must be floating-point, got dtype {g.dtype}")
        if g.ndim == 0:
            g = jnp.broadcast_to(g, (T,))
        allowed = [(T,)]
        if name == "lr" and n > 1:
            allowed.append((T, n))
        if name == "decay" and getattr(spec.memory, "kind", None) == "linear":
            allowed.append((T, d_k))
        if tuple(g.shape) not in allowed:
            extra = ""
            if name == "decay" and g.ndim == 2:
                extra = " (channel-wise decay needs a linear/matrix memory)"
            raise ValueError(f"gate {name!r} must have shape one of {allowed}{extra}, got {tuple(g.shape)}")
        out[name] = g
    return out


def memorize(spec: MirasSpec, params: chex.ArrayTree, q: chex.Array, k: chex.Array, v: chex.Array,
             gates: dict[str, chex.Array] | None = None, *, chunk_size: int = 1,
             implementation: str = "auto", initial_state: MemoryState | None = None,
             remat_every: int = 0, grad_horizon: int | None = None,
             segment_ids: chex.Array | None = None, segment_align: int = 0) -> tuple[chex.Array, MemoryState]:
    """Run the memory of ``spec`` over one sequence: write ``(k_t, v_t)``, read ``q_t``.

    Args:
      spec: a :class:`~miras_jax.spec.MirasSpec` (e.g. ``presets.get("moneta")``).
      params: initial memory parameters ``W_0`` (``spec.memory.init(key, d_k, d_v)``).
      q: ``[T, k]`` queries; k: ``[T, k]`` keys (``[T, n, k]`` for ``num_steps = n``);
      v: ``[T, v]`` values (``[T, n, v]``).
      gates: dict of per-token arrays, see ``GATE_DOCS``; known gates the spec does not read are
        ignored, unknown names raise. Concrete values are checked (``check_gates``: finite, ``lr`` and
        ``delta >= 0``, ``decay`` and ``momentum`` in ``[0, 1]``); traced ones (under ``jit``) are not.
      chunk_size: tokens per chunk. Exact families (Hebbian: linear attention, RetNet, Mamba2, GLA;
        delta: DeltaNet, Gated DeltaNet, Longhorn, DeltaProduct) equal the token recurrence for
        any chunk size; every other spec uses the mini-batch form (gradients at the chunk-start
        memory, ``engine/minibatch/reference.py``); ``chunk_size=1`` is always exact.
      implementation: ``"reference"`` (token-level ``lax.scan``, or the chunked reference loops
        when ``chunk_size > 1``), ``"xla"`` (fast chunked forms), ``"pallas"`` (the kernels of
        ``pallas_kernels/``: compiled on TPU / GPU, interpreted on CPU; raises for specs they do
        not cover, naming the component), ``"auto"`` (the default: ``"pallas"`` on TPU / GPU where
        a kernel covers the spec; else ``"xla"`` where a chunk form covers it and
        ``chunk_size > 1``; else ``"reference"``). ``mj.plan(spec, implementation, chunk_size)``
        says which engine runs and why (``engine/plan.py``).
      initial_state: a ``MemoryState`` to continue from (segments); default ``init_state(params)``.
      remat_every: with ``"xla"`` mini-batch forms, ``jax.checkpoint`` groups of this many chunks.
      grad_horizon: ``None`` / 0: exact gradients. ``H`` (a multiple of ``chunk_size``): truncated
        backpropagation through the memory state: same forward, but gradients do not flow through
        the state across segments of ``H`` tokens (``engine/horizon.py``; optional: with the
        anchored MLP presets and gates in range the exact gradient stays bounded, README "Numerics").
      segment_ids: ``None`` (one document) or int ``[T]`` for a packed row (``engine/segments.py``):
        0 marks padding (no write, ``y = 0``); a change of id starts a document, which restarts the
        memory, retention and optimizer state from ``init_state(params)``; the first document
        starts from ``initial_state``.
      segment_align: ``A > 0``: every document of ``segment_ids`` starts at a multiple of ``A``
        (checked where the ids are concrete; e.g. a packer that pads documents to multiples of
        ``A``). Same result; where ``A`` is a multiple of the mini-batch form's chunk, it runs each
        chunk as one document (no second weight product per chunk).

    Returns:
      ``(y, final_state)``: ``y: [T, v]`` with ``y_t = M_{W_t}(q_t)`` read after the write of
      token t, and the final ``MemoryState`` (``.memory`` has the structure of ``params``).
      State is kept in float32 (float64 if given float64); ``y`` has the dtype of ``v``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(remat_every, int) or remat_every < 0:
        raise ValueError(f"remat_every must be a non-negative int, got {remat_every!r}")
    horizon_lib.check_horizon(grad_horizon, chunk_size)
    gates = check_inputs(spec, params, q, k, v, gates)
    packed = segment_ids is not None
    if packed:
        segment_ids = segments_lib.check_segment_ids(segment_ids, (q.shape[0],))
    segment_align = segments_lib.check_align(segment_ids, segment_align)
    spec, q, k, gates = window_lib.lower_inputs(spec, q, k, gates)   # feature maps, window 1 (engine/window.py)
    implementation = plan_lib.resolve(spec, implementation, chunk_size, channel=plan_lib.channel_decay(spec, gates))

    leaves = [q, k, v, *gates.values(), *jax.tree.leaves(params)]
    # float32 accumulation, float64 only if asked for (x64 mode and a float64 input).
    wide = any(jnp.result_type(x) == jnp.float64 for x in leaves)
    dtype = jnp.float64 if wide and jax.config.jax_enable_x64 else jnp.float32
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    spec = spec.replace(hparams=cast(spec.hparams))
    reset_state = init_state(spec, cast(params))
    state = reset_state if initial_state is None else cast(initial_state)
    if packed:
        reset_state = segments_lib.row_reset_state(spec, reset_state, state)
    bounds = segments_lib.boundaries(segment_ids) if packed else ()
    if window_lib.is_omega(spec):   # the window over the whole row, before any split (grad_horizon)
        k, v, gates = window_lib.window_inputs(spec, k, v, gates, bounds or None)
    xs = (q, k, v, gates) + bounds

    def run(st, xs):
        q_, k_, v_, g_ = xs[:4]
        segs = (*xs[4:], reset_state) if packed else None
        if implementation == "pallas":
            one = lambda x: x[None, :, None]  # noqa: E731   [T, ...] -> [1, T, 1, ...]
            segs1 = None if not packed else (xs[4][None], xs[5][None],
                                             jax.tree.map(lambda x: x[None, None], reset_state))
            y_, fin = pallas_path.run_batched(spec, jax.tree.map(lambda x: x[None, None], st), one(q_), one(k_),
                                              one(v_), {n: one(g) for n, g in g_.items()}, chunk_size=chunk_size,
                                              segments=segs1)
            return y_[0, :, 0], jax.tree.map(lambda x: x[0, 0], fin)
        return dispatch.run(spec, st, q_, k_, v_, g_, chunk_size=chunk_size, implementation=implementation,
                            remat_every=remat_every, segments=segs, segment_align=segment_align)

    y, final = horizon_lib.truncated(run, state, (*cast(xs[:4]), *xs[4:]), q.shape[0], grad_horizon, axis=0)
    param_dtypes = jax.tree.map(lambda x: jnp.result_type(x), params)
    final = final._replace(memory=jax.tree.map(lambda x, d: x.astype(d), final.memory, param_dtypes))
    return y.astype(v.dtype), final


def memorize_batched(spec: MirasSpec, params: chex.ArrayTree, q: chex.Array, k: chex.Array, v: chex.Array,
                     gates: dict[str, chex.Array] | None = None, *, chunk_size: int = 1,
                     implementation: str = "auto", initial_state: MemoryState | None = None,
                     remat_every: int = 0, mesh=None, batch_axes="data", head_axes=None,
                     grad_horizon: int | None = None,
                     segment_ids: chex.Array | None = None, segment_align: int = 0,
                     seq_axis: str | None = None, seq_mode: str = "auto",
                     seq_microbatches: int | None = None,
                     seq_global_chunk: int | None = None) -> tuple[chex.Array, MemoryState]:
    """Canonical batched entry point: ``q, k: [B, T, H, k]``, ``v: [B, T, H, v]``.

    ``params`` holds one memory per head (leading axis ``H`` on every leaf); gates are
    ``[B, T, H]`` (channel-wise decay ``[B, T, H, k]``; DeltaProduct ``lr`` ``[B, T, H, n]`` and
    ``k, v: [B, T, H, n, d]``). Returns ``y: [B, T, H, v]`` and a ``MemoryState`` whose leaves
    lead with ``[B, H]`` (pass it back as ``initial_state``). The ``B * H`` rows are one vmap
    (``"reference"`` / ``"xla"``) or rows of one kernel grid (``"pallas"``). With ``"pallas"`` and a
    ``mesh``, the kernel is entered through ``shard_map``: batch split over ``batch_axes``, heads
    over ``head_axes``. For ``"reference"`` / ``"xla"``, pass ``head_axes`` when the heads are
    sharded: the rows are then vmapped as ``[B, H]`` (a ``B * H`` reshape across two sharded axes
    would make XLA all-gather them); the batch alone may be sharded either way. ``grad_horizon``:
    as in :func:`memorize` (truncated backpropagation through the state, segments of that many tokens).
    ``segment_ids``: int ``[B, T]`` for packed rows (as in :func:`memorize`; shared by the heads), and
    ``segment_align`` as there (the Pallas kernels run every packed row in their general form).
    ``seq_axis`` (with ``mesh``): context parallelism, the token axis split over that mesh axis, each
    device a contiguous slice (``engine/context.py``; exact): ``seq_mode`` ``"summary"`` (the exact
    families: slices exchange affine state summaries), ``"pipeline"`` (any spec: the state travels
    device to device over ``seq_microbatches`` micro-batches of the local rows, default one row each),
    ``"auto"`` (summary where it exists) or ``"hierarchy"`` (an approximation: a global memory at chunk
    ``seq_global_chunk`` (default ``context.default_global_chunk``) relayed over the devices, then
    every slice in parallel from it).
    """
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"memorize_batched takes q of shape [B, T, H, d_k], got {getattr(q, 'shape', q)}")
    check_gates(spec, gates)   # values here: inside the per-row vmap below they are tracers
    B, T, H, _ = q.shape
    for name, x in jax.tree_util.tree_flatten_with_path((k, v, gates or {}))[0]:
        if x.shape[:3] != (B, T, H):
            raise ValueError(f"{jax.tree_util.keystr(name)} must lead with [B, T, H] = {(B, T, H)}, "
                             f"got {tuple(x.shape)}")
    for x in jax.tree.leaves(params):
        if x.shape[0] != H:
            raise ValueError(f"memory params need a leading head axis of size H={H}, got {tuple(x.shape)}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    packed = segment_ids is not None
    if packed:
        segment_ids = segments_lib.check_segment_ids(segment_ids, (B, T))
    segment_align = segments_lib.check_align(segment_ids, segment_align)
    spec, q, k, gates = window_lib.lower_inputs(spec, q, k, gates)   # feature maps, window 1 (engine/window.py)
    implementation = plan_lib.resolve(spec, implementation, chunk_size,
                                      channel=plan_lib.channel_decay(spec, gates, token_ndim=3))
    if seq_axis is not None:
        if window_lib.is_omega(spec):
            raise NotImplementedError(f"spec {spec.name!r}: an Omega window of {spec.bias.window} tokens does "
                                      "not run split over a seq mesh axis yet (the window crosses slices)")
        return _seq_sharded(spec, params, q, k, v, gates or {}, chunk_size=chunk_size,
                            implementation=implementation, initial_state=initial_state, remat_every=remat_every,
                            mesh=mesh, batch_axes=batch_axes, head_axes=head_axes, grad_horizon=grad_horizon,
                            segment_ids=segment_ids, segment_align=segment_align, seq_axis=seq_axis,
                            seq_mode=seq_mode, seq_microbatches=seq_microbatches,
                            seq_global_chunk=seq_global_chunk)
    if implementation == "pallas":
        return _pallas_batched(spec, params, q, k, v, gates or {}, chunk_size, initial_state, mesh,
                               batch_axes, head_axes, grad_horizon, segment_ids)
    to_bh = lambda t: jax.tree.map(lambda x: jnp.swapaxes(x, 1, 2), t)  # noqa: E731
    qh, kh, vh, gh = to_bh((q, k, v, gates or {}))

    def one(p, q_, k_, v_, g_, s_, seg_):
        return memorize(spec, p, q_, k_, v_, g_, chunk_size=chunk_size, implementation=implementation,
                        initial_state=s_, remat_every=remat_every, grad_horizon=grad_horizon,
                        segment_ids=seg_, segment_align=segment_align)

    s_axis = 0 if initial_state is not None else None
    seg_axis = 0 if packed else None
    if head_axes is not None:   # heads sharded: rows stay [B, H], no reshape across two sharded axes
        heads = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, s_axis, None))
        y, state = jax.vmap(heads, in_axes=(None, 0, 0, 0, 0, s_axis, seg_axis))(
            params, qh, kh, vh, gh, initial_state, segment_ids)
        return jnp.swapaxes(y, 1, 2), state
    # otherwise one vmap over the B*H rows (b-major: a batch split over devices stays one block per
    # device), not vmap(B) of vmap(H): with B = 1 per device the nested form has a size-1 axis, on
    # which XLA CPU's YNN reductions run ~10x slower ([1,4,64,256] row sums 143 us vs 15 us on
    # [4,64,256]); the MLP presets' fwd+bwd was ~30% slower
    rows = lambda t: jax.tree.map(lambda x: x.reshape((B * H,) + x.shape[2:]), t)  # noqa: E731
    pr = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (B,) + x.shape), params)
    seg_rows = None if not packed else jnp.repeat(segment_ids, H, axis=0)   # b-major rows, as rows()
    y, state = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, s_axis, seg_axis))(*rows((pr, qh, kh, vh, gh)),
                                                                          rows(initial_state), seg_rows)
    state = jax.tree.map(lambda x: x.reshape((B, H) + x.shape[1:]), state)
    return jnp.swapaxes(y.reshape((B, H) + y.shape[1:]), 1, 2), state


def _seq_sharded(spec, params, q, k, v, gates, *, mesh, seq_axis, seq_mode, seq_microbatches, batch_axes,
                 head_axes, chunk_size, implementation, initial_state, remat_every, grad_horizon,
                 segment_ids, segment_align, seq_global_chunk=None):
    """``memorize_batched`` with the tokens split over ``seq_axis`` (``engine/context.py``)."""
    if mesh is None:
        raise ValueError(f"seq_axis needs a mesh (got seq_axis={seq_axis!r}, mesh=None)")
    if seq_axis not in mesh.shape:
        raise ValueError(f"seq_axis {seq_axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    if seq_microbatches is not None and (not isinstance(seq_microbatches, int) or seq_microbatches < 1):
        raise ValueError(f"seq_microbatches must be a positive int or None, got {seq_microbatches!r}")
    n = mesh.shape[seq_axis]
    if segment_align and (q.shape[1] // max(n, 1)) % segment_align:
        segment_align = 0   # the slices do not start on the alignment grid: the general packed form
    horizon_lib.check_horizon(grad_horizon, chunk_size)

    if seq_global_chunk is not None and (not isinstance(seq_global_chunk, int) or seq_global_chunk < 1):
        raise ValueError(f"seq_global_chunk must be a positive int or None, got {seq_global_chunk!r}")

    def local(p, q_, k_, v_, g_, st, seg, chunk=None):
        return memorize_batched(spec, p, q_, k_, v_, g_, chunk_size=chunk or chunk_size, implementation=implementation,
                                initial_state=st, remat_every=remat_every, grad_horizon=grad_horizon,
                                segment_ids=seg, segment_align=segment_align if seg is not None else 0)

    return context.memorize_seq_sharded(local, spec, params, q, k, v, gates, mesh=mesh, seq_axis=seq_axis,
                                        batch_axes=batch_axes, head_axes=head_axes, initial_state=initial_state,
                                        segment_ids=segment_ids, mode=seq_mode, microbatches=seq_microbatches,
                                        chunk_size=chunk_size, grad_horizon=grad_horizon,
                                        global_chunk=seq_global_chunk)


def _pallas_batched(spec, params, q, k, v, gates, chunk_size, initial_state, mesh, batch_axes, head_axes,
                    grad_horizon=None, segment_ids=None):
    """``memorize_batched`` on the Pallas kernels (one grid over all batch x head rows); ``segment_ids``
    ``[B, T]`` (checked): packed rows."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    horizon_lib.check_horizon(grad_horizon, chunk_size)
    B = q.shape[0]
    head0 = lambda t: jax.tree.map(lambda x: x[0, :, 0], t)  # noqa: E731
    check_inputs(spec, jax.tree.map(lambda x: x[0], params), head0(q), head0(k), head0(v), head0(gates))
    missing = [n for n in spec.required_gates if n not in gates]
    if missing:
        raise ValueError(f"spec {spec.name!r} needs gates {missing}")
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    reset_state = None
    if initial_state is None or segment_ids is not None:
        st = jax.vmap(lambda p: init_state(spec, p))(f32(params))
        reset_state = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (B,) + x.shape), st)
    state = reset_state if initial_state is None else f32(initial_state)
    if segment_ids is not None:
        reset_state = segments_lib.row_reset_state(spec, reset_state, state)
    spec = spec.replace(hparams=f32(spec.hparams))
    g = {n: f32(gates[n]) for n in spec.required_gates}
    xs = (f32(q), f32(k), f32(v), g)
    if segment_ids is not None:
        xs += jax.vmap(segments_lib.boundaries)(segment_ids)      # (reset, real) [B, T]
    if window_lib.is_omega(spec):   # the window over the whole row, before any split (grad_horizon)
        heads = jax.vmap(lambda k_, v_, g_, b_: window_lib.window_inputs(spec, k_, v_, g_, b_),
                         in_axes=(1, 1, 1, None), out_axes=1)
        bounds = xs[4:] or None
        k_w, v_w, g_w = jax.vmap(heads, in_axes=(0, 0, 0, None if bounds is None else 0))(*xs[1:4], bounds)
        xs = (xs[0], k_w, v_w, g_w) + xs[4:]

    def run(st, xs):
        segs = None if segment_ids is None else (*xs[4:], reset_state)
        return pallas_path.run_batched(spec, st, *xs[:4], chunk_size=chunk_size, mesh=mesh, batch_axes=batch_axes,
                                       head_axes=head_axes, segments=segs)

    y, final = horizon_lib.truncated(run, state, xs, q.shape[1], grad_horizon, axis=1)
    param_dtypes = jax.tree.map(lambda x: jnp.result_type(x), params)
    final = final._replace(memory=jax.tree.map(lambda x, d: x.astype(d), final.memory, param_dtypes))
    return y.astype(v.dtype), final
