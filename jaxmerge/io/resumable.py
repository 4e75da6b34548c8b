"""A resumable fold: accumulate a state over batches, checkpointing so a killed run can continue.

``accumulate_resumable(update, init, batches, directory)`` computes
``state = update(… update(update(init, b₀), b₁) …, b_{N−1})`` like ``functools.reduce``, and every
``save_every`` batches (and at the end) writes the state and the number of batches consumed, ``n``,
to ``directory`` as an Orbax checkpoint step ``n``. Each step is written to a temporary directory
and renamed when complete, so a run killed at any moment leaves the previous steps readable; the
newest ``keep`` steps are kept. Run again with the same arguments and it restores the newest step,
skips its ``n`` batches and continues: the result is bit-for-bit that of an uninterrupted run,
provided ``batches`` yields the same sequence each time and ``update`` is deterministic.

Each step also records what it was computed from: ``source`` (a JSON record the caller gives, e.g.
fingerprints of the parameters and the options) and a fingerprint of the ``n`` batches consumed
(:mod:`jaxmerge.io.provenance`). A resume whose ``source`` differs, or whose first ``n`` batches are
not the ones the step consumed, is an error naming what differs: partial sums of other inputs are
never continued.
"""

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from .provenance import add_batch, differences, short

__all__ = ["accumulate_resumable"]

State = TypeVar("State")


def _target(state):
    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        raise TypeError(
            f"accumulate_resumable: state leaves must be jax arrays, got {type(x).__name__}; "
            "wrap them with jnp.asarray."
        )

    return jax.tree.map(leaf, state)


def _check_like(state, target):
    if jax.tree.structure(state) != jax.tree.structure(target):
        raise ValueError(
            f"accumulate_resumable: update changed the state's structure from "
            f"{jax.tree.structure(target)} to {jax.tree.structure(state)}."
        )
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, new), old in zip(leaves, jax.tree.leaves(target), strict=True):
        if jax.numpy.shape(new) != old.shape or jax.numpy.result_type(new) != old.dtype:
            raise ValueError(
                f"accumulate_resumable: update changed the state: {jax.tree_util.keystr(path)} "
                f"{old.dtype}{list(old.shape)} became "
                f"{jax.numpy.result_type(new)}{list(jax.numpy.shape(new))}."
            )


def accumulate_resumable(
    update: Callable[[State, Any], State],
    init: State,
    batches: Iterable[Any],
    directory: str | os.PathLike,
    *,
    save_every: int = 10,
    keep: int = 2,
    source: Mapping[str, Any] | None = None,
    check_data: bool = True,
    digest=None,
) -> State:
    """Fold ``update`` over ``batches`` from ``init``, resuming from checkpoints in ``directory``.

    Args:
        update: ``update(state, batch) -> state``; must keep the state's structure, shapes and
            dtypes (e.g. ``lambda s, b: update_stats(s, *b, task=0)``).
        init: the initial state, a pytree of ``jax.Array``; also the template (shapes, dtypes,
            shardings) the checkpoint is restored against.
        batches: an iterable yielding the same batches in the same order on every run. On
            resume, the first ``n`` are drawn and discarded, so let it load data lazily.
        directory: checkpoint directory (created if absent); one per accumulation.
        save_every: checkpoint after every this many batches; the final state is always saved.
        keep: number of newest checkpoints to keep (at least 1).
        source: a JSON-serialisable record of what the state is computed from (e.g.
            fingerprints of parameters, options); a resume with a different ``source`` fails.
        check_data: fingerprint the batches (leaves must be arrays or numbers), so that a resume
            whose first batches differ from those the checkpoint consumed fails.
        digest: with ``check_data``, the ``hashlib`` digest to fingerprint the batches with
            (every batch, skipped or folded, in order), so that afterwards it is the fingerprint
            of all of them; a new ``hashlib.sha256()`` by default.

    Returns:
        The final state. A rerun after completion returns it again without calling ``update``.

    Raises:
        ValueError: ``save_every`` or ``keep`` below 1, ``update`` changed the state's
            structure, shapes or dtypes, or the checkpoint was made from other inputs:
            another ``source``, other batches, or more batches than ``batches`` yields.
        TypeError: a state leaf is not a ``jax.Array``, or (``check_data``) a batch leaf has no
            stable bytes.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> d = tempfile.mkdtemp()
        >>> add = lambda s, b: s + b
        >>> accumulate_resumable(add, jnp.zeros(()), [jnp.float32(i) for i in range(5)], d,
        ...                      save_every=2).item()
        10.0
        >>> accumulate_resumable(add, jnp.zeros(()), [jnp.float32(i) for i in range(7)], d,
        ...                      save_every=2).item()  # resumes after batch 5: adds 5 and 6
        21.0
    """
    if save_every < 1 or keep < 1:
        raise ValueError(
            f"accumulate_resumable: save_every ({save_every}) and keep ({keep}) must be >= 1."
        )
    target = _target(init)
    source = json.loads(json.dumps(dict(source or {})))  # as it reads back (tuples → lists)
    digest = hashlib.sha256() if digest is None else digest
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
    )

    def save(manager, step, state, force=False):
        record = {"source": source, "data": digest.hexdigest() if check_data else None}
        args = ocp.args.Composite(state=ocp.args.StandardSave({"state": state}),
                                  record=ocp.args.JsonSave(record))  # fmt: skip
        manager.save(step, args=args, force=force)

    with ocp.CheckpointManager(Path(directory).absolute(), options=options) as manager:
        consumed = manager.latest_step()
        record = None
        if consumed is None:
            consumed, state = 0, init
        else:
            record = _restore_record(manager, consumed, directory)
            wrong = differences(record["source"], source)
            if wrong:
                raise ValueError(
                    f"accumulate_resumable: {directory} holds a state computed from other "
                    f"inputs ({'; '.join(wrong)}); delete it to start over."
                )
            restored = manager.restore(
                consumed,
                args=ocp.args.Composite(state=ocp.args.StandardRestore({"state": target})),
            )
            state = restored["state"]["state"]
        it = iter(batches)
        skipped = 0
        for batch in itertools.islice(it, consumed):
            skipped += 1
            if check_data:
                add_batch(digest, batch, "accumulate_resumable")
        if skipped < consumed:
            raise ValueError(
                f"accumulate_resumable: {directory} holds a state after {consumed} batches but "
                f"batches yields only {skipped}; the data changed. Use a new directory."
            )
        if check_data and record is not None and record["data"] not in (None, digest.hexdigest()):
            raise ValueError(
                f"accumulate_resumable: the first {consumed} batches differ from those the state "
                f"in {directory} was computed from (fingerprint {short(record['data'])}, now "
                f"{short(digest.hexdigest())}); the data changed. Delete it to start over."
            )
        saved = consumed
        for batch in it:
            if check_data:
                add_batch(digest, batch, "accumulate_resumable")
            state = update(state, batch)
            _check_like(state, target)
            consumed += 1
            if consumed % save_every == 0:
                save(manager, consumed, state)
                saved = consumed
        if saved != consumed or manager.latest_step() is None:
            save(manager, consumed, state, force=True)
        manager.wait_until_finished()
    return state


def _restore_record(manager, step: int, directory) -> dict:
    """The record of checkpoint ``step``: ``{"source": ..., "data": ...}``."""
    if not (Path(directory) / str(step) / "record").is_dir():
        raise ValueError(
            f"accumulate_resumable: {directory} holds a state without a record of its inputs "
            "(written by an older jaxmerge, or not by accumulate_resumable); delete it to start "
            "over."
        )
    restored = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return restored["record"]
