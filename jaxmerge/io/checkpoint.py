"""Orbax checkpoints of parameters and of calibration statistics, written atomically.

Parameters are stored as a plain Orbax ``StandardCheckpointer`` checkpoint, so checkpoints written
by other Orbax users (or by a ``CheckpointManager``: pass the item directory, e.g.
``run/1000/default``) load here and merged parameters load anywhere. Restoring is against an
abstract target: shapes, dtypes and shardings come from a template pytree, or from the
checkpoint's own metadata (on the default device) when no template is given.

Statistics (a ``{layer path: LayerStats}`` mapping) are stored with a JSON record of the format
version, task names, layer paths, shapes, dtype and per-task row counts, so a later run can merge
without the calibration data, and statistics saved by several runs or hosts can be summed
(:func:`combine_saved_stats`; the statistics are a monoid).

Every writer refuses to replace an existing path unless ``overwrite=True`` and never writes into
the destination: the checkpoint is completed in a hidden sibling directory and renamed into place,
so a run killed at any point leaves every previous checkpoint complete and readable (at worst a
hidden ``.NAME.tmp-*`` directory remains, deleted by the next write). An overwrite renames the old
checkpoint to ``.NAME.old-*``, renames the new one in and then deletes the old one; a kill between
the two renames leaves ``PATH`` absent and the old checkpoint readable there, and the loaders of
this module read it when ``PATH`` is absent. One writer per path at a time.
"""

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ..core.stats import LayerStats, combine_stats

__all__ = [
    "save_params",
    "load_params",
    "SavedStats",
    "save_stats",
    "load_stats",
    "combine_saved_stats",
]

STATS_FORMAT = "jaxmerge.stats"
STATS_VERSION = 1

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, overwrite: bool, what: str) -> Iterator[Path]:
    """Yield a fresh, not-yet-existing temporary path; on success it becomes ``path``.

    The temporary path is a hidden sibling ``.NAME.tmp-*`` of ``path`` (same file system, so the
    final rename is atomic). On an exception it is removed and ``path`` is untouched. An
    overwrite renames the old ``path`` to ``.NAME.old-*``, renames the new one in and deletes the
    old one; a run killed between those two renames leaves the complete old checkpoint under
    ``.NAME.old-*``, where the loaders find it (and where it counts as existing). Leftovers of
    killed runs are deleted by the next successful write.
    """
    path = Path(path).absolute()
    exists = path.exists() or path.is_symlink() or any(path.parent.glob(f".{path.name}.old-*"))
    if exists and not overwrite:
        raise FileExistsError(f"{what}: {path} exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    try:
        yield tmp
        if not tmp.is_dir():
            raise RuntimeError(f"{what}: nothing was written to the temporary directory {tmp}.")
        if path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{tag}"
            os.rename(path, old)
            os.rename(tmp, path)
        else:
            os.rename(tmp, path)
        for stale in (
            *path.parent.glob(f".{path.name}.tmp-*"),
            *path.parent.glob(f".{path.name}.old-*"),
        ):
            _remove(stale)
    finally:
        for partial in path.parent.glob(f"{tmp.name}*"):  # ours, and Orbax's own temporary
            _remove(partial)


def _remove(path: Path) -> None:
    """Delete a directory tree, a file or a symbolic link (never what a link points to)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _flat(tree) -> dict[str, Any]:
    """``{"a/b/0": leaf}`` for any pytree (dict keys, attributes and indices as path parts)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _abstract(leaf, default_sharding):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding if leaf.sharding is not None else default_sharding
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    a = np.asarray(leaf)
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=default_sharding)


def _checkpoint_dir(path: PathLike, what: str) -> Path:
    """The directory to read for ``path``: itself, or the complete previous checkpoint that an
    overwrite killed between its two renames left at ``.NAME.old-*``."""
    path = Path(path).absolute()
    if not path.exists():
        previous = list(path.parent.glob(f".{path.name}.old-*"))
        if len(previous) == 1:
            path = previous[0]
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no checkpoint directory at {path}.")
    if not (path / "_CHECKPOINT_METADATA").exists() and not (path / "_METADATA").exists():
        raise ValueError(
            f"{what}: {path} is not an Orbax checkpoint (no _CHECKPOINT_METADATA or _METADATA); "
            "for a CheckpointManager directory pass the item directory, e.g. <dir>/<step>/default."
        )
    return path


def _unreadable(what: str, path: Path, error: BaseException | None = None) -> ValueError:
    detail = "" if error is None else f" ({type(error).__name__}: {str(error)[:300]})"
    return ValueError(
        f"{what}: {path} is incomplete or corrupted: its metadata or arrays cannot be read"
        f"{detail}. A write was probably interrupted; write the checkpoint again."
    )


def save_params(path: PathLike, params: Any, *, overwrite: bool = False) -> Path:
    """Write a parameter pytree as an Orbax checkpoint, atomically.

    Args:
        path: destination directory; must not exist unless ``overwrite``.
        params: any pytree of arrays (e.g. Flax ``{"params": ...}`` variables).
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        TypeError: a leaf is not an array or a number (its path is named).
        ValueError: ``params`` has no array leaves.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> d = tempfile.mkdtemp()
        >>> p = save_params(f"{d}/merged", {"dense": {"kernel": jnp.ones((2, 3))}})
        >>> load_params(p)["dense"]["kernel"].shape
        (2, 3)
    """
    leaves = _flat(params)
    if not leaves:
        raise ValueError("save_params: params has no array leaves; nothing to save.")
    for key, leaf in leaves.items():
        if not isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float):
            raise TypeError(
                f"save_params: params/{key} is a {type(leaf).__name__}; every leaf must be an "
                "array or a number."
            )
    with atomic_directory(path, overwrite=overwrite, what="save_params") as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp, params)
            ckptr.wait_until_finished()
    return Path(path).absolute()


def load_params(path: PathLike, template: Any = None) -> Any:
    """Read a parameter pytree from an Orbax checkpoint, restoring against an abstract target.

    Args:
        path: an Orbax (``StandardCheckpointer`` / ``PyTreeCheckpointer``) checkpoint directory.
        template: optional pytree with the expected structure: arrays (their shapes, dtypes and
            shardings are used), ``jax.ShapeDtypeStruct`` or numpy arrays. Dtypes may differ from
            the stored ones (values are cast); shapes and paths must agree. Without a template
            the checkpoint's metadata gives the structure, shapes and dtypes, placed on the
            default device.

    Returns:
        The restored pytree (the template's structure when given).

    Raises:
        FileNotFoundError: no directory at ``path``.
        ValueError: not an Orbax checkpoint, an incomplete or corrupted one (unreadable metadata
            or arrays), or the template's paths or shapes differ from the stored ones (every
            difference is listed).

    Examples:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> d = tempfile.mkdtemp()
        >>> _ = save_params(f"{d}/p", {"w": jnp.ones(3)})
        >>> load_params(f"{d}/p", {"w": jax.ShapeDtypeStruct((3,), jnp.bfloat16)})["w"].dtype
        dtype(bfloat16)
        >>> load_params(f"{d}/p", {"w": jnp.ones(4)})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: load_params: ... w: stored shape (3,), template shape (4,)...
    """
    path = _checkpoint_dir(path, "load_params")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata  # None when Orbax cannot read it
        if stored is None or stored.tree is None:
            raise _unreadable("load_params", path)
        stored = stored.tree
        if template is None:
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=default), stored
            )
        else:
            target = jax.tree.map(lambda x: _abstract(x, default), template)
            _compare(_flat(stored), _flat(target), path)
        try:
            return ckptr.restore(path, target)
        except (ValueError, OSError) as error:  # tensorstore: missing or torn array data
            raise _unreadable("load_params", path, error) from error


def _compare(stored: dict, target: dict, path: Path) -> None:
    problems = [f"missing from the checkpoint: {k}" for k in target if k not in stored]
    problems += [f"in the checkpoint but not the template: {k}" for k in stored if k not in target]
    problems += [
        f"{k}: stored shape {tuple(stored[k].shape)}, template shape {tuple(target[k].shape)}"
        for k in target
        if k in stored and tuple(stored[k].shape) != tuple(target[k].shape)
    ]
    if problems:
        shown = "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
        raise ValueError(f"load_params: {path} does not match the template: {shown}.")


class SavedStats(NamedTuple):
    """Statistics read back from disk.

    Attributes:
        stats: ``{layer path: LayerStats}`` in the saved order.
        tasks: the task names, one per row of ``count``/``task_diag``.

    Examples:
        See :func:`save_stats` (a save and load round trip).
    """

    stats: dict[Any, LayerStats]
    tasks: tuple[str, ...]


def _encode_key(key) -> str | list:
    if isinstance(key, str):
        return key
    if isinstance(key, tuple) and all(isinstance(k, str | int) for k in key):
        return list(key)
    raise TypeError(
        f"save_stats: layer path {key!r} must be a str or a tuple of str/int (JSON-storable)."
    )


def save_arrays_and_record(path: PathLike, arrays, meta, *, overwrite: bool, what: str) -> Path:
    """Write a pytree of arrays (item ``stats``) and a JSON record (``metadata``) atomically."""
    with atomic_directory(path, overwrite=overwrite, what=what) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(
                tmp,
                args=ocp.args.Composite(
                    stats=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(meta)
                ),
            )
    return Path(path).absolute()


def save_stats(
    path: PathLike,
    stats: Mapping[Any, Any],
    *,
    tasks: Sequence[Any],
    overwrite: bool = False,
) -> Path:
    """Write per-layer statistics and their metadata as one Orbax checkpoint, atomically.

    The checkpoint holds the arrays of every :class:`LayerStats` and a JSON record: format name
    and version, ``tasks``, and per layer its path, ``n_in``, ``n_out``, dtype and the row count
    of every task.

    Args:
        path: destination directory; must not exist unless ``overwrite``.
        stats: ``{layer path: LayerStats}``; a path is a string or a tuple of strings/ints.
        tasks: one name per task (``num_tasks`` of every layer).
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        TypeError: a value is not a ``LayerStats`` or a layer path is not storable.
        ValueError: empty ``stats``, duplicate task names, or a layer's ``num_tasks`` differs
            from ``len(tasks)``.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from jaxmerge import init_stats, update_stats
        >>> s = update_stats(init_stats(2, 1, 2), jnp.ones((3, 2)), jnp.ones((3, 1)), 1)
        >>> d = tempfile.mkdtemp()
        >>> _ = save_stats(f"{d}/stats", {"dense": s}, tasks=["sst2", "mnli"])
        >>> saved = load_stats(f"{d}/stats")
        >>> saved.tasks, saved.stats["dense"].count.tolist()
        (('sst2', 'mnli'), [0.0, 3.0])
    """
    tasks = tuple(tasks)
    if not all(isinstance(t, str) for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"save_stats: tasks must be distinct strings, got {list(tasks)}.")
    if not stats:
        raise ValueError("save_stats: no layers given (stats is empty).")
    layers, arrays = [], []
    for key, s in stats.items():
        if not isinstance(s, LayerStats):
            raise TypeError(f"save_stats: stats[{key!r}] is a {type(s).__name__}, not LayerStats.")
        if s.num_tasks != len(tasks):
            raise ValueError(
                f"save_stats: stats[{key!r}] has {s.num_tasks} tasks but {len(tasks)} task names "
                "were given."
            )
        layers.append(
            {
                "path": _encode_key(key),
                "n_in": s.n_in,
                "n_out": s.n_out,
                "dtype": str(jnp.dtype(s.gram.dtype)),
                "count": np.asarray(s.count).tolist(),
            }
        )
        arrays.append(s._asdict())
    meta = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "tasks": list(tasks),
        "layers": layers,
    }
    return save_arrays_and_record(path, arrays, meta, overwrite=overwrite, what="save_stats")


def read_arrays_and_record(path: PathLike, *, fmt: str, name: str, version: int, what: str, target):
    """``(record, arrays)`` of a checkpoint written by :func:`save_arrays_and_record`.

    The record must name format ``fmt`` (``name`` in messages) at a version up to ``version``;
    ``target(record, sharding)`` gives the abstract arrays (shapes, dtypes, the default device's
    ``sharding``) to restore against. A missing, foreign, newer, incomplete or corrupted
    checkpoint is a ``FileNotFoundError`` or ``ValueError`` naming ``what`` and the path.
    """
    path = _checkpoint_dir(path, what)
    if not (path / "metadata").is_dir() or not (path / "stats").is_dir():
        raise ValueError(f"{what}: {path} is not a jaxmerge {name} checkpoint.")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            meta = ckptr.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        except (ValueError, OSError) as error:  # a torn JSON record
            raise _unreadable(what, path, error) from error
        meta = meta["metadata"]
        if meta.get("format") != fmt:
            raise ValueError(
                f"{what}: {path} is not a jaxmerge {name} checkpoint (format "
                f"{meta.get('format')!r})."
            )
        if meta.get("version", 0) > version:
            raise ValueError(
                f"{what}: {path} has format version {meta['version']}; this jaxmerge reads "
                f"up to version {version}. Upgrade jaxmerge."
            )
        try:
            arrays = ckptr.restore(
                path,
                args=ocp.args.Composite(stats=ocp.args.StandardRestore(target(meta, default))),
            )["stats"]
        except (ValueError, OSError) as error:
            raise _unreadable(what, path, error) from error
    return meta, arrays


def load_stats(path: PathLike) -> SavedStats:
    """Read statistics written by :func:`save_stats`.

    The arrays are restored against abstract targets built from the saved record (shapes and
    dtypes), on the default device.

    Raises:
        FileNotFoundError: no directory at ``path``.
        ValueError: the directory is not a jaxmerge statistics checkpoint, is incomplete or
            corrupted (unreadable record or arrays), or is of a newer format version.

    Examples:
        See :func:`save_stats`.
    """

    def target(meta, sharding):
        k, out = len(meta["tasks"]), []
        for layer in meta["layers"]:
            n1, m, dtype = layer["n_in"] + 1, layer["n_out"], jnp.dtype(layer["dtype"])
            shapes = dict(gram=(n1, n1), cross=(n1, m), out_sq=(m,), task_diag=(k, n1), count=(k,))
            out.append({f: jax.ShapeDtypeStruct(s, dtype, sharding=sharding)
                        for f, s in shapes.items()})  # fmt: skip
        return out

    meta, arrays = read_arrays_and_record(
        path,
        fmt=STATS_FORMAT,
        name="statistics",
        version=STATS_VERSION,
        what="load_stats",
        target=target,
    )
    stats = {}
    for layer, a in zip(meta["layers"], arrays, strict=True):
        key = layer["path"]
        stats[tuple(key) if isinstance(key, list) else key] = LayerStats(**a)
    return SavedStats(stats, tuple(meta["tasks"]))


def combine_saved_stats(paths: Sequence[PathLike]) -> SavedStats:
    """Sum statistics saved by several runs or hosts (each over disjoint calibration rows).

    Every file must have the same task names, layer paths, shapes and dtypes. Plain sums add to
    the statistics of the union; per-task normalised statistics (weight ``1/Nₖ``) add correctly
    when each file holds different tasks.

    Raises:
        ValueError: no paths, or the files disagree (the first difference is named).

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from jaxmerge import init_stats, update_stats
        >>> d = tempfile.mkdtemp()
        >>> s = update_stats(init_stats(1, 1, 1), jnp.ones((2, 1)), jnp.ones((2, 1)), 0)
        >>> for host in range(2):
        ...     _ = save_stats(f"{d}/host{host}", {"fc": s}, tasks=["a"])
        >>> combine_saved_stats([f"{d}/host0", f"{d}/host1"]).stats["fc"].count.tolist()
        [4.0]
    """
    if not paths:
        raise ValueError("combine_saved_stats: no paths given.")
    total = load_stats(paths[0])
    for p in paths[1:]:
        part = load_stats(p)
        if part.tasks != total.tasks:
            raise ValueError(
                f"combine_saved_stats: {p} has tasks {list(part.tasks)}, {paths[0]} has "
                f"{list(total.tasks)}."
            )
        if list(part.stats) != list(total.stats):
            raise ValueError(
                f"combine_saved_stats: {p} has layers {list(part.stats)}, {paths[0]} has "
                f"{list(total.stats)}."
            )
        try:
            combined = {k: combine_stats(total.stats[k], part.stats[k]) for k in total.stats}
        except ValueError as e:
            raise ValueError(f"combine_saved_stats: {p}: {e}") from None
        total = SavedStats(combined, total.tasks)
    return total
