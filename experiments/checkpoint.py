"""Atomic, resumable training checkpoints: a thin wrapper around ``orbax.checkpoint.CheckpointManager``.

Layout: ``<directory>/<step>/state`` (the array pytree, :class:`ocp.args.StandardSave`) and
``<directory>/<step>/meta`` (a JSON dict: data-iterator state, run config). Typed PRNG keys
(``jax.random.key``) are stored as their ``jax.random.key_data`` and re-wrapped on restore.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp
from absl import logging

if TYPE_CHECKING:
    from typing_extensions import Self

CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """No checkpoint could be restored (none there, all corrupt, or not matching the template);
    ``failures``: ``[(step, one-line reason), ...]`` for the checkpoints that were tried."""

    def __init__(self, message: str, failures: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.failures = failures or []


def _is_key(leaf: Any) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _key_impl(leaf: Any) -> Any:
    """The PRNG impl of a key array or of a key-typed ``jax.ShapeDtypeStruct``."""
    impl = []
    jax.eval_shape(lambda k: impl.append(jax.random.key_impl(k)), leaf)
    return impl[0]


def _key_data_template(leaf: Any) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, leaf)  # the key's shape + a trailing impl axis, uint32
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(leaf, "sharding", None))


def _flat_shapes(tree: Any) -> dict[tuple, tuple]:
    return {k: tuple(getattr(v, "shape", ())) for k, v in ocp.tree.to_flat_dict(tree).items()}


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """Where a run in ``workdir`` keeps its checkpoints."""
    return os.path.join(os.fspath(workdir), CHECKPOINT_SUBDIR)


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finalized checkpoints in ``directory`` (ascending; [] if none or no directory)."""
    if not os.path.isdir(directory):
        return []
    return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


def _has_checkpoint(directory: str | os.PathLike) -> bool:
    return bool(saved_steps(directory))


def _one_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``e`` (tensorstore's message names the file)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:240]}"


@contextlib.contextmanager
def _held_stderr(grace_s: float = 1.0):
    """Hold back what is printed to stderr inside the block; yields a list: append to it to mark
    that a read failed, and what was printed is dropped instead of replayed.

    A failed read of a corrupt checkpoint makes orbax close its worker event loop while other reads
    are in flight; each of them then prints a traceback ("Event loop is closed", "Task exception
    was never retrieved", "Exception ignored in <coroutine>": thousands of lines) from background
    threads and the garbage collector. Inside the block fd 2 and ``sys.stderr`` go to a temporary
    file and unraisable exceptions are dropped; after a failure the workers get ``grace_s`` to finish
    (and the failed coroutines are collected) before stderr is given back."""
    sys.stderr.flush()
    saved_fd, saved_stderr, saved_hook = os.dup(2), sys.stderr, sys.unraisablehook
    failed: list = []
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 2)
        sys.stderr, sys.unraisablehook = tmp, (lambda _: None)
        try:
            yield failed
        finally:
            if failed:
                deadline = time.monotonic() + grace_s
                while time.monotonic() < deadline:
                    gc.collect()
                    time.sleep(0.05)
            tmp.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            sys.stderr, sys.unraisablehook = saved_stderr, saved_hook
            if not failed:
                tmp.seek(0)
                sys.stderr.write(tmp.read())


class Checkpointer:
    """Saves ``state`` (a pytree of arrays) and ``meta`` (a JSON dict) every ``save_every`` steps, keeping
    the newest ``max_to_keep``. Saving is synchronous."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, save_every: int = 100):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._corrupt: set[int] = set()

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Saves if ``force`` or ``step % save_every == 0``; returns whether a checkpoint was written.

        Blocks until the checkpoint is on disk. Orbax writes into ``<step>.orbax-checkpoint-tmp`` and
        renames it to ``<step>`` when complete, so a crash mid-save never leaves a half-written
        checkpoint under a final step directory (the leftover temporary directory is ignored). A step
        already on disk is not rewritten (returns False) unless :meth:`restore` found it corrupt.
        """
        step = int(step)
        if not (force or step % self.save_every == 0):
            return False
        if step in self._corrupt:  # found corrupt by restore: replace it
            self._manager.delete(step)
            self._corrupt.discard(step)
        if step in self._manager.all_steps():
            return False
        state = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)  # typed keys: data
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        # force: our test above replaces orbax's policy, which refuses steps below the newest on disk
        # (after restore fell back past a corrupt checkpoint, those steps must still be saved)
        saved = self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()
        return bool(saved)

    def all_steps(self) -> list[int]:
        """Steps of the finalized checkpoints on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalized step (possibly corrupt: :meth:`restore` checks), or None."""
        return (self.all_steps() or [None])[-1]

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Returns ``(state, meta, step)``; ``state_template`` (arrays or ``jax.ShapeDtypeStruct``) gives
        the structure, shapes, dtypes and (if present) shardings of the result. With ``step=None`` the newest
        checkpoint that restores cleanly is used; a corrupt one is skipped with a warning. Raises
        :class:`CheckpointError` when nothing restores or the checkpoint's tree does not match the template.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (has {steps})")
        leaves, treedef = jax.tree_util.tree_flatten(state_template)
        is_key = [_is_key(x) for x in leaves]
        target = treedef.unflatten([_key_data_template(x) if k else x for x, k in zip(leaves, is_key)])
        failures, found = [], None
        with _held_stderr() as failed:
            for s in [step] if step is not None else steps[::-1]:
                try:
                    found = (*self._restore_step(s, target), s)
                    break
                except CheckpointError:
                    raise
                except Exception as e:  # noqa: BLE001 - any other failure means a corrupt checkpoint
                    failures.append((s, _one_line(e)))
                    failed.append(s)
                    self._corrupt.add(s)
        for s, why in failures:  # one line each, after the held-back noise is dropped
            logging.warning("checkpoint %s/%d could not be restored (%s)%s", self.directory, s, why,
                            "" if step is not None or found is None else "; fell back to an older one")
        if found is not None:
            state, meta, s = found
            out = [jax.random.wrap_key_data(x, impl=_key_impl(t)) if k else x
                   for x, t, k in zip(treedef.flatten_up_to(state), leaves, is_key)]
            return treedef.unflatten(out), meta, s
        tried = ", ".join(str(s) for s, _ in failures)
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored (tried steps {tried}, "
                              f"each warned above; step {failures[0][0]}: {failures[0][1]})", failures)

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the JSON metadata (e.g. the config needed to build a template); newest readable by default."""
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (has {steps})")
        candidates = steps[::-1] if step is None else [step]
        failures, meta = [], None
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        with _held_stderr() as failed:
            for s in candidates:
                try:
                    meta = self._manager.restore(s, args=args)["meta"]
                    break
                except Exception as e:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
                    failures.append(f"step {s}: {_one_line(e)}")
                    failed.append(s)
        for why in failures:
            logging.warning("metadata of checkpoint %s could not be read (%s)", self.directory, why)
        if meta is not None:
            return meta
        which = "" if step is None else f" for step {step}"
        raise CheckpointError(f"no checkpoint{which} in {self.directory} with readable metadata "
                              f"(has {steps}); tried: {failures}")

    def _restore_step(self, step: int, target: Any) -> tuple[Any, dict]:
        on_disk = self._manager.item_metadata(step)["state"]  # None if the tree metadata file is missing
        if on_disk is not None:
            want, have = _flat_shapes(target), _flat_shapes(on_disk)
            if want != have:
                name = lambda keys: "/".join(map(str, keys))
                missing = [name(k) for k in sorted(want.keys() - have.keys())]
                extra = [name(k) for k in sorted(have.keys() - want.keys())]
                differ = [f"{name(k)} {have[k]} vs {want[k]}" for k in sorted(want.keys() & have.keys())
                          if want[k] != have[k]]
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} does not match the state template (from a different "
                    f"model?): missing from checkpoint {missing}, not in template {extra}, "
                    f"shape (checkpoint vs template) differs for {differ}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_resume(workdir: str, resume: str | bool | None) -> str | None:
    """The checkpoint directory to resume from, or None to start fresh.

    ``True``/``"auto"``/``"latest"``: ``checkpoint_dir(workdir)`` if it holds a checkpoint, else None.
    A path: that checkpoint directory (or a workdir holding one under ``checkpoints/``); it must exist and
    hold a checkpoint, else FileNotFoundError. ``False``/``""``/``None``: None.
    """
    if resume is None or resume is False or resume == "":
        return None
    if resume is True or resume in ("auto", "latest"):
        directory = checkpoint_dir(workdir)
        return directory if _has_checkpoint(directory) else None
    path = os.path.abspath(os.fspath(resume))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume path {path} does not exist")
    for directory in (path, checkpoint_dir(path)):
        if _has_checkpoint(directory):
            return directory
    raise FileNotFoundError(f"resume path {path} holds no checkpoint")
