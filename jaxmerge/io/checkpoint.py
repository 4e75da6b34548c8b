"""Orbax checkpoints of parameters, and the atomic writes of every checkpoint jaxmerge writes.

Parameters are stored as a plain Orbax ``StandardCheckpointer`` checkpoint, so checkpoints written
by other Orbax users (or by a ``CheckpointManager``: pass the item directory, e.g.
``run/1000/default``) load here and merged parameters load anywhere. Restoring is against an
abstract target: shapes, dtypes and shardings come from a template pytree, or from the
checkpoint's own metadata (on the default device) when no template is given.

Statistics are stored in the one format of :mod:`jaxmerge.io.store`, with the conventions
below.

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .._flax.fold import path_of

__all__ = ["save_params", "load_params"]

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


def _flat(tree) -> dict[str, Any]:
    """``{"a/b/0": leaf}`` for any pytree (dict keys, attributes and indices as path parts)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_of(path, params=True): leaf for path, leaf in leaves}


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
