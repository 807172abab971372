"""Context parallelism: one sequence split over a ``seq`` mesh axis, each of its ``N`` devices
holding a contiguous slice of ``T / N`` tokens of every row. Exact: outputs, final state and
gradients equal one device's (``memorize_batched(..., mesh=, seq_axis=)``).

``summary`` (the exact families, ``plan.exact_family``: Hebbian, delta)
    A slice maps the state entering it affinely, ``S_out = S_in F + D`` (``W: [v, k]``, ``F: [k, k]``),
    and the rows of ``W`` evolve independently. So ONE local engine call on the augmented memory
    ``[W; I]`` (``[v + k, k]``: values ``[v; 0]``, entering state ``[0; I]``, reset state ``[W_0; 0]``)
    gives ``D`` (its first ``v`` rows), ``F`` (its last ``k`` rows) and the reads
    ``y_t = y^D_t + S_in y^F_t``. The devices all-gather their ``(F_j, D_j)`` (the only collective),
    each composes the prefix of its left neighbours with ``jax.lax.associative_scan`` over the device
    axis, ``(F_a, D_a) . (F_b, D_b) = (F_a F_b, D_a F_b + D_b)``, and finishes with one matmul.
    Cost: the local engine on ``v + k`` value rows instead of ``v``; ``N (k + v) k`` numbers gathered
    per (row, head).

``pipeline`` (every spec: MLP memories, the mini-batch forms)
    No affine summary exists, so the state travels: the local batch is cut into ``M`` micro-batches
    and at step ``s`` device ``i`` runs micro-batch ``s - i`` from the state device ``i - 1`` sent it
    (``ppermute``) at step ``s - 1``. ``N + M - 1`` steps of one micro-batch's slice each: the
    bubble is ``(N - 1) / (N + M - 1)`` of the steps (devices idle at the start and the end);
    ``M = b`` (one row per micro-batch, the default) makes it smallest. The final states come back
    by a ``psum`` over ``seq`` (only the last device's are non-zero). The mini-batch forms depend on
    the chunk grid, so a slice must be a whole number of chunks.

``hierarchy`` (any spec; an APPROXIMATION, after TNT, arXiv 2511.07343; ours in the details)
    A global memory steps through the sequence at a coarse chunk ``G`` (``seq_global_chunk``, a
    multiple of ``chunk_size`` dividing the slice; default :func:`default_global_chunk`, at most
    ``GLOBAL_CHUNKS`` chunks: the mini-batch form holds ``[G, G]`` arrays per chunk): ``S_j`` = the state after
    slice ``j`` from ``S_{j-1}`` by the spec's mini-batch form at chunk ``G`` (``S_0`` the initial
    state), relayed device to device as in the pipeline. Then every slice runs at the fine chunk
    ``chunk_size`` from ``S_{j-1}``, all slices at once; its outputs are the layer's, the last
    slice's final state the returned one. ``G = chunk_size`` gives the exact result (the pipeline's);
    a larger ``G`` takes the coarse gradients at fewer chunk-start states: fewer sequential steps in
    the relay (``T / (N G)`` per device) for an approximate state at each slice start.
    ``hierarchy_reference`` is its one-device definition.

Packed rows (``segment_ids``): a slice whose first real token starts a new document (its id differs
from the last real id before the slice) enters from the row's reset state instead of its left
neighbour's; the flags come from the whole row (``entry_resets``) before the slices are cut.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from miras_jax.engine import window as window_lib
from miras_jax.engine import exact
from miras_jax.engine import plan as plan_lib
from miras_jax.engine import segments as segments_lib
from miras_jax.engine.tokens import MemoryState, init_state

SEQ_MODES = ("auto", "summary", "pipeline", "hierarchy")
GLOBAL_CHUNKS = 16   # the hierarchy's default global chunk: at most this many chunks


def default_global_chunk(t: int, chunk_size: int) -> int:
    """The largest multiple ``g`` of ``chunk_size`` dividing a slice of ``t`` tokens with
    ``g <= GLOBAL_CHUNKS * chunk_size`` (``t`` a multiple of ``chunk_size``)."""
    n = t // chunk_size
    return chunk_size * max(j for j in range(1, min(n, GLOBAL_CHUNKS) + 1) if n % j == 0)


def seq_mode(spec, mode: str = "auto") -> str:
    """``"summary"`` for the exact families, ``"pipeline"`` otherwise (``mode="auto"``); an explicit
    ``"summary"`` for a spec without an affine chunk summary is a ``ValueError`` naming why."""
    if mode not in SEQ_MODES:
        raise ValueError(f"seq_mode must be one of {SEQ_MODES}, got {mode!r}")
    family = plan_lib.exact_family(spec)
    if mode == "auto":
        return "summary" if family else "pipeline"
    if mode == "summary" and not family:
        raise ValueError(f"seq_mode='summary' needs an exact (affine) family; {spec.name!r}: "
                         f"{plan_lib.exact_blocker(spec)} (use 'pipeline')")
    return mode


def entry_resets(segment_ids, n: int) -> jax.Array:
    """``[B, T] -> [B, n]`` bool: slice ``j`` (tokens ``[j T/n, (j+1) T/n)``) begins a new document at
    its first real token while an earlier real token of the row exists (``segments.boundaries``)."""
    doc = segments_lib.document_ids(segment_ids)                 # 1, 2, ... nondecreasing; pads 0
    B, T = doc.shape
    t = T // n
    before = jnp.concatenate([jnp.zeros((B, 1), doc.dtype), jax.lax.cummax(doc, axis=1)[:, :-1]], axis=1)
    before = before[:, ::t]                                          # last real doc id before slice j
    big = jnp.iinfo(doc.dtype).max
    first = jnp.min(jnp.where(doc > 0, doc, big).reshape(B, n, t), axis=2)   # first real doc id in it
    return (before > 0) & (first != big) & (first != before)


def _axes(x):
    return x if x is None or isinstance(x, tuple) else tuple(x) if isinstance(x, list) else (x,)


def _tok_spec(ndim, b, s, h):
    return P(b, s, h, *(None,) * (ndim - 3))


def splits(spec, T: int, n: int, chunk_size: int, grad_horizon=None, mode: str = "auto",
           global_chunk: int | None = None) -> bool:
    """Whether ``T`` tokens split over ``n`` devices as :func:`check` asks (never for an Omega window
    of more than one token: it would cross the slices; the layer then gathers the tokens)."""
    if window_lib.is_omega(window_lib.lower_spec(spec)):
        return False
    try:
        check(spec, T, n, chunk_size, seq_mode(spec, mode), grad_horizon, global_chunk)
    except ValueError:
        return False
    return True


def check(spec, T: int, n: int, chunk_size: int, mode: str, grad_horizon, global_chunk=None) -> None:
    """Slices of equal length; for the pipeline, whole chunks (the mini-batch forms' chunk grid);
    for the hierarchy, whole global chunks, themselves whole chunks."""
    if T % n:
        raise ValueError(f"sequence length {T} must be divisible by the seq axis size {n}")
    t = T // n
    if mode == "hierarchy":
        g = (default_global_chunk(t, chunk_size) if t % chunk_size == 0 else chunk_size) \
            if global_chunk is None else global_chunk
        if g < 1 or t % g or g % chunk_size:
            raise ValueError(f"seq_global_chunk={g} must divide each device's slice ({t} tokens) and be a "
                             f"multiple of chunk_size={chunk_size}")
    if mode in ("pipeline", "hierarchy") and t % chunk_size:
        raise ValueError(f"each device's slice ({T} / {n} = {t} tokens) must be a multiple of "
                         f"chunk_size={chunk_size} (the chunk grid of the mini-batch form)")
    if grad_horizon and t % grad_horizon:
        raise ValueError(f"grad_horizon={grad_horizon} must divide each device's slice of {t} tokens")


def memorize_seq_sharded(local_call, spec, params, q, k, v, gates, *, mesh, seq_axis, batch_axes,
                         head_axes, initial_state, segment_ids, mode: str, microbatches, chunk_size: int,
                         grad_horizon=None, global_chunk: int | None = None):
    """``memorize_batched`` with the token axis split over ``seq_axis`` of ``mesh``.

    ``local_call(params, q, k, v, gates, initial_state, segment_ids, chunk=None) -> (y, state)`` runs
    one slice (``memorize_batched`` without a mesh; ``chunk`` overrides its chunk size). Shapes as
    ``memorize_batched``'s; returns ``(y, state)``."""
    mode = seq_mode(spec, mode)
    n = mesh.shape[seq_axis]
    B, T, H = q.shape[:3]
    check(spec, T, n, chunk_size, mode, grad_horizon, global_chunk)
    b_ax, h_ax = _axes(batch_axes), _axes(head_axes)
    packed = segment_ids is not None
    new = entry_resets(segment_ids, n) if packed else jnp.zeros((B, n), bool)
    seg = segments_lib.document_ids(segment_ids) if packed else jnp.zeros((B, T), jnp.int32)
    if initial_state is None:
        st = jax.vmap(lambda p: init_state(spec, p))(params)
        initial_state = jax.tree.map(lambda x: jnp.broadcast_to(x[None], (B,) + x.shape), st)
    tok = lambda x: _tok_spec(x.ndim, b_ax, seq_axis, h_ax)  # noqa: E731
    in_specs = (jax.tree.map(lambda x: P(h_ax), params), tok(q), tok(k), tok(v), jax.tree.map(tok, gates),
                jax.tree.map(lambda x: P(b_ax, h_ax), initial_state), P(b_ax, seq_axis), P(b_ax, seq_axis))
    out_specs = (tok(v), jax.tree.map(lambda x: P(b_ax, h_ax), initial_state))
    body = {"summary": _summary, "pipeline": _pipeline, "hierarchy": _hierarchy}[mode]
    kw = dict(local_call=local_call, spec=spec, seq_axis=seq_axis, n=n, packed=packed,
              microbatches=microbatches, horizon=bool(grad_horizon))
    if mode == "hierarchy":
        kw["global_chunk"] = default_global_chunk(T // n, chunk_size) if global_chunk is None else global_chunk
    fn = lambda *a: body(*a, **kw)  # noqa: E731
    # check_vma=False: the engines' loops start from carries that do not vary over the mesh axes
    # (as the Pallas entry, pallas_kernels/common/sharding.py); gradients are checked against one
    # device in tests/test_context.py
    y, state = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        params, q, k, v, gates, initial_state, seg, new)
    return y, state


def _summary(params, q, k, v, gates, s0, seg, new, *, local_call, spec, seq_axis, n, packed, microbatches,
             horizon):
    del microbatches
    W0 = params["W"].astype(jnp.float32)                         # [h, v, k]
    h, dv, dk = W0.shape
    b = q.shape[0]
    f32 = jnp.float32
    p_aug = {"W": jnp.concatenate([W0, jnp.zeros((h, dk, dk), f32)], axis=1)}
    v_aug = jnp.concatenate([v.astype(f32), jnp.zeros(v.shape[:-1] + (dk,), f32)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(dk, dtype=f32), (b, h, dk, dk))
    s_aug = MemoryState({"W": jnp.concatenate([jnp.zeros((b, h, dv, dk), f32), eye], axis=2)}, (), ())
    y_aug, fin = local_call(p_aug, q, k, v_aug, gates, s_aug, seg if packed else None)
    yD, yF = y_aug[..., :dv], y_aug[..., dv:]                   # [b, t, h, v], [b, t, h, k]
    D, F = fin.memory["W"][:, :, :dv], fin.memory["W"][:, :, dv:]   # [b, h, v, k], [b, h, k, k]
    if packed:   # a slice opening a new document forgets what entered it: S_out = W_0 F + D
        e = new[:, 0, None, None, None]
        D = jnp.where(e, jnp.einsum("hvk,bhkj->bhvj", W0, F) + D, D)
        F = jnp.where(e, 0.0, F)
    Fs = jax.lax.all_gather(F, seq_axis)                         # [n, b, h, k, k]
    Ds = jax.lax.all_gather(D, seq_axis)                         # [n, b, h, v, k]
    compose = functools.partial(exact.compose_chunks, False)     # the chunk summaries' monoid
    Fp, Dp = jax.lax.associative_scan(compose, (Fs, Ds), axis=0)   # slices 0..j composed
    S0 = s0.memory["W"].astype(f32)
    ends = S0[None] @ Fp + Dp                                    # state after slice j: [n, b, h, v, k]
    i = jax.lax.axis_index(seq_axis)
    S_in = jnp.where(i == 0, S0, ends[jnp.maximum(i - 1, 0)])
    if horizon:
        S_in = jax.lax.stop_gradient(S_in)
    if packed:
        S_in = jnp.where(new[:, 0, None, None, None], W0[None], S_in)
    y = yD + jnp.einsum("bhvk,bthk->bthv", S_in, yF)
    final = MemoryState({"W": ends[-1].astype(s0.memory["W"].dtype)}, s0.retention, s0.optimizer)
    return y.astype(v.dtype), final


def _pipeline(params, q, k, v, gates, s0, seg, new, *, local_call, spec, seq_axis, n, packed, microbatches,
              horizon, collect_starts: bool = False):
    """The relay (module docstring); ``collect_starts``: return each row's state entering this
    device's slice instead of ``(y, final)`` (the hierarchy's global chain)."""
    b = q.shape[0]
    M = b if microbatches is None else microbatches
    if M < 1 or b % M:
        raise ValueError(f"microbatches={M} must divide the {b} rows each device holds")
    mb = b // M
    split = lambda t: jax.tree.map(lambda x: x.reshape((M, mb) + x.shape[1:]), t)  # noqa: E731
    xs = split((q, k, v, gates, seg))
    s0m, newm = split(s0), split(new[:, 0])
    one = jax.tree.map(lambda x: x[0], (xs, s0m))
    y_shape, fin_shape = jax.eval_shape(lambda x, s: local_call(params, *x[:4], s, x[4] if packed else None), *one)
    like = lambda t, ref: jax.tree.map(lambda x, r: x.astype(r.dtype), t, ref)  # noqa: E731
    s0m = like(s0m, jax.tree.map(lambda r: jax.ShapeDtypeStruct((M,) + r.shape, r.dtype), fin_shape))
    reset = jax.vmap(lambda p: init_state(spec, p))(params)
    reset = like(jax.tree.map(lambda x: jnp.broadcast_to(x[None], (mb,) + x.shape), reset), fin_shape)
    i = jax.lax.axis_index(seq_axis)
    perm = [(j, j + 1) for j in range(n - 1)]
    rows = lambda c, t: jax.tree.map(  # noqa: E731   per-row where on [mb, ...] leaves
        lambda a, z: jnp.where(c.reshape((mb,) + (1,) * (a.ndim - 1)), a, z), *t)

    def step(carry, s):
        recv, ybuf, fbuf, sbuf = carry
        m = s - i
        mc = jnp.clip(m, 0, M - 1)
        x = jax.tree.map(lambda a: a[mc], xs)
        if horizon:   # truncated backpropagation: no gradient through the state between slices
            recv = jax.lax.stop_gradient(recv)
        start = jax.tree.map(lambda a, r: jnp.where(i == 0, a[mc], r), s0m, recv)
        if packed:
            start = rows(newm[mc], (segments_lib.row_reset_state(spec, reset, start), start))
        valid = (m >= 0) & (m < M)
        sbuf = jax.tree.map(lambda buf, a: buf.at[mc].set(jnp.where(valid, a, buf[mc])), sbuf, start)
        # a device outside its M steps (the bubble) skips the engine (its result would be dropped)
        y, fin = jax.lax.cond(valid, lambda: local_call(params, *x[:4], start, x[4] if packed else None),
                              lambda: (jnp.zeros(y_shape.shape, y_shape.dtype), start))
        ybuf = ybuf.at[mc].set(jnp.where(valid, y, ybuf[mc]))
        keep = valid & (i == n - 1)
        fbuf = jax.tree.map(lambda buf, f: buf.at[mc].set(jnp.where(keep, f, buf[mc])), fbuf, fin)
        recv = jax.tree.map(lambda f: jax.lax.ppermute(f, seq_axis, perm), fin)
        return (recv, ybuf, fbuf, sbuf), None

    ybuf = jnp.zeros((M,) + y_shape.shape, y_shape.dtype)
    fbuf = jax.tree.map(jnp.zeros_like, s0m)
    recv = jax.tree.map(lambda x: x[0], s0m)
    carry = (recv, ybuf, fbuf, s0m)
    (_, ybuf, fbuf, sbuf), _ = jax.lax.scan(step, carry, jnp.arange(n + M - 1))
    merge = lambda x: x.reshape((b,) + x.shape[2:])  # noqa: E731
    if collect_starts:
        return jax.tree.map(merge, sbuf)
    final = jax.tree.map(lambda f: jax.lax.psum(f, seq_axis), fbuf)
    return merge(ybuf), jax.tree.map(merge, final)


def _hierarchy(params, q, k, v, gates, s0, seg, new, *, local_call, global_chunk, seq_axis, n, packed, **kw):
    """The global chain at chunk ``global_chunk`` relayed over the devices, then every slice at the
    fine chunk from its entering global state (module docstring)."""
    coarse = lambda *a: local_call(*a, chunk=global_chunk)  # noqa: E731
    starts = _pipeline(params, q, k, v, gates, s0, seg, new, local_call=coarse, seq_axis=seq_axis, n=n,
                       packed=packed, collect_starts=True, **kw)
    y, fin = local_call(params, q, k, v, gates, starts, seg if packed else None)
    last = jax.lax.axis_index(seq_axis) == n - 1
    final = jax.tree.map(lambda f: jax.lax.psum(jnp.where(last, f, jnp.zeros_like(f)), seq_axis), fin)
    return y, final


def hierarchy_reference(memorize_fn, n: int, q, k, v, gates, *, chunk_size: int, global_chunk: int | None = None,
                        initial_state=None):
    """The hierarchy's definition on one device, slice by slice: ``memorize_fn(q, k, v, gates,
    initial_state, chunk_size) -> (y, state)`` is ``memorize_batched`` with the rest bound."""
    T = q.shape[1]
    t = T // n
    g = default_global_chunk(t, chunk_size) if global_chunk is None else global_chunk
    cut = lambda x, j: jax.tree.map(lambda a: a[:, j * t:(j + 1) * t], x)  # noqa: E731
    state, ys = initial_state, []
    for j in range(n):
        xs = cut((q, k, v, gates), j)
        y, fin = memorize_fn(*xs, state, chunk_size)
        ys.append(y)
        if j < n - 1:
            _, state = memorize_fn(*xs, state, g)
    return jnp.concatenate(ys, axis=1), fin
