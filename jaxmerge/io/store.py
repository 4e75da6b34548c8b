"""The statistics store: one on-disk format for every statistics artifact.

A statistics checkpoint is a list of **entries**, each a statistics container (a
:class:`~jaxmerge.LayerStats`, an :class:`~jaxmerge.EmbedStats`, or the container of a user's
layer kind) under a key, with the :class:`~jaxmerge.LayerSpec` of its member layers when it is a
layer group of a model. Per-layer statistics given by hand (:func:`save_stats`: ``{layer path:
LayerStats}``, no specs) and a whole model's per-task sums (:func:`~jaxmerge.save_model_stats`:
one entry per layer group, a leading task axis) are the same format: one layer is a model with
one group. The checkpoint is one Orbax Composite (item ``stats``: the arrays; item ``metadata``:
a JSON record) written atomically with the conventions of :mod:`jaxmerge.io.checkpoint`. The
record (format ``jaxmerge.stats``, version 2)::

    {"format": "jaxmerge.stats", "version": 2, "tasks": [...], "per_task": bool,
     "source": {...} | null,          # what the statistics were computed from (provenance)
     "entries": [{"key": str | [str | int, ...], "container": "LayerStats",
                  "fields": {name: {"shape": [...], "dtype": "float32"}, ...},
                  "layers": [LayerSpec fields, ...], "count": rows per task}, ...]}

so a checkpoint is read (against abstract arrays built from the record alone) without knowing
its kinds' shapes. ``per_task`` says whether the arrays hold one slot of plain sums per task
(:class:`~jaxmerge.ModelStats`) or one container per layer (:class:`SavedStats`); each loader
names the other when given the wrong kind of file. Checkpoints of the two formats of earlier
versions (``jaxmerge.stats`` version 1, per layer; ``jaxmerge.model_stats`` versions 1 and 2)
are read too.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ..core.stats import LayerStats, combine_stats
from ..kinds import LayerSpec, kind_of
from .checkpoint import PathLike, _checkpoint_dir, _unreadable, atomic_directory

__all__ = ["SavedStats", "save_stats", "load_stats", "combine_saved_stats"]

FORMAT = "jaxmerge.stats"
VERSION = 2  # 2: one format for per-layer and whole-model statistics (entries, fields)
_LEGACY_MODEL_FORMAT = "jaxmerge.model_stats"  # jaxmerge 0.1's whole-model format, versions 1-2


class Entry(NamedTuple):
    """One stored container: its key, the statistics, the member layers' specs (or ``()``)."""

    key: Any
    stats: Any
    layers: tuple[LayerSpec, ...]


class Stored(NamedTuple):
    """A statistics checkpoint read back: task names, source, entries in the saved order."""

    tasks: tuple[str, ...]
    source: dict | None
    entries: list[Entry]


def _encode_key(key, what: str) -> str | list:
    if isinstance(key, str):
        return key
    if isinstance(key, tuple) and all(isinstance(k, str | int) for k in key):
        return list(key)
    raise TypeError(
        f"{what}: layer path {key!r} must be a str or a tuple of str/int (JSON-storable)."
    )


def _container(layers: Sequence[LayerSpec]) -> type:
    return kind_of(layers[0].kind).container(layers) if layers else LayerStats


def write(path: PathLike, entries: Sequence[Entry], *, tasks, per_task: bool, source, overwrite,
          what: str) -> Path:  # fmt: skip
    """Write ``entries`` as one statistics checkpoint, atomically (see the module docs)."""
    records, arrays = [], []
    for entry in entries:
        fields = entry.stats._asdict()
        count = np.asarray(entry.stats.count)
        records.append(
            {
                "key": _encode_key(entry.key, what),
                "container": type(entry.stats).__name__,
                "fields": {
                    name: {"shape": list(np.shape(a)), "dtype": str(jnp.dtype(a.dtype))}
                    for name, a in fields.items()
                },
                "layers": [dataclasses.asdict(spec) for spec in entry.layers],
                "count": (np.diagonal(count) if per_task else count).tolist(),
            }
        )
        arrays.append(fields)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "tasks": list(tasks),
        "per_task": per_task,
        "source": source,
        "entries": records,
    }
    with atomic_directory(path, overwrite=overwrite, what=what) as tmp:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(
                tmp,
                args=ocp.args.Composite(
                    stats=ocp.args.StandardSave(arrays), metadata=ocp.args.JsonSave(meta)
                ),
            )
    return Path(path).absolute()


def _legacy_entries(meta) -> list[dict]:
    """The entries of a record of an earlier format, in the current record's form."""
    k = len(meta["tasks"])
    out = []
    if meta["format"] == FORMAT:  # version 1: {layers: [{path, n_in, n_out, dtype, count}]}
        for layer in meta["layers"]:
            n1, m = layer["n_in"] + 1, layer["n_out"]
            shapes = dict(gram=(n1, n1), cross=(n1, m), out_sq=(m,), task_diag=(k, n1), count=(k,))
            fields = {f: {"shape": s, "dtype": layer["dtype"]} for f, s in shapes.items()}
            out.append({"key": layer["path"], "fields": fields, "layers": []})
        return out
    for group in meta["groups"]:  # jaxmerge.model_stats: {groups: [{key, dtype, layers}]}
        specs = tuple(LayerSpec.from_record(spec) for spec in group["layers"])
        dtype = jnp.dtype(group["dtype"])
        zeros = jax.eval_shape(lambda s=specs, d=dtype: kind_of(s[0].kind).init_stats(s, k, d))
        fields = {f: {"shape": (k, *a.shape), "dtype": group["dtype"]}  # a task axis in front
                  for f, a in zeros._asdict().items()}  # fmt: skip
        out.append({"key": group["key"], "fields": fields, "layers": group["layers"]})
    return out


def read(path: PathLike, *, per_task: bool, what: str) -> Stored:
    """A statistics checkpoint written by :func:`write` (or by an earlier jaxmerge), its arrays
    on the default device.

    Raises:
        FileNotFoundError: no directory at ``path``.
        ValueError: not a jaxmerge statistics checkpoint, the other kind (per-task sums of a
            model where per-layer statistics are read, or the reverse), incomplete or corrupted
            (an unreadable record or arrays), or of a newer format version.
    """
    path = _checkpoint_dir(path, what)
    if not (path / "metadata").is_dir() or not (path / "stats").is_dir():
        raise ValueError(f"{what}: {path} is not a jaxmerge statistics checkpoint.")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        try:
            meta = ckptr.restore(path, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        except (ValueError, OSError) as error:  # a torn JSON record
            raise _unreadable(what, path, error) from error
        meta = meta["metadata"]
        fmt, version = meta.get("format"), meta.get("version", 0)
        if fmt not in (FORMAT, _LEGACY_MODEL_FORMAT):
            raise ValueError(f"{what}: {path} is not a jaxmerge statistics checkpoint "
                             f"(format {fmt!r}).")  # fmt: skip
        if fmt == FORMAT and version > VERSION:
            raise ValueError(
                f"{what}: {path} has format version {version}; this jaxmerge reads up to "
                f"version {VERSION}. Upgrade jaxmerge."
            )
        current = fmt == FORMAT and version == VERSION
        stored_per_task = meta["per_task"] if current else fmt == _LEGACY_MODEL_FORMAT
        if stored_per_task != per_task:
            held, reader = (
                ("the per-task sums of a whole model", "load_model_stats")
                if stored_per_task
                else ("per-layer statistics", "load_stats")
            )
            raise ValueError(f"{what}: {path} holds {held}; read it with jaxmerge.{reader}.")
        records = meta["entries"] if current else _legacy_entries(meta)
        target = [
            {
                f: jax.ShapeDtypeStruct(tuple(d["shape"]), jnp.dtype(d["dtype"]), sharding=sharding)
                for f, d in r["fields"].items()
            }
            for r in records
        ]
        try:
            arrays = ckptr.restore(
                path, args=ocp.args.Composite(stats=ocp.args.StandardRestore(target))
            )["stats"]
        except (ValueError, OSError) as error:
            raise _unreadable(what, path, error) from error
    entries = []
    for r, a in zip(records, arrays, strict=True):
        layers = tuple(LayerSpec.from_record(spec) for spec in r["layers"])
        key = tuple(r["key"]) if isinstance(r["key"], list) else r["key"]
        container = _container(layers)
        if r.get("container", container.__name__) != container.__name__:
            raise ValueError(
                f"{what}: {path}: entry {key!r} holds a {r['container']}, but its layers' kind "
                f"{layers[0].kind!r} keeps a {container.__name__}: is the kind registered as "
                "it was when the statistics were saved?"
            )
        entries.append(Entry(key, container(**a), layers))
    return Stored(tuple(meta["tasks"]), meta.get("source"), entries)


# ---- per-layer statistics -----------------------------------------------------------------------


class SavedStats(NamedTuple):
    """Per-layer statistics read back from disk (:func:`load_stats`).

    Attributes:
        stats: ``{layer path: LayerStats}`` in the saved order.
        tasks: the task names, one per row of ``count``/``task_diag``.

    Examples:
        See :func:`save_stats` (a save and load round trip).
    """

    stats: dict[Any, LayerStats]
    tasks: tuple[str, ...]


def save_stats(
    path: PathLike,
    stats: Mapping[Any, Any],
    *,
    tasks: Sequence[Any],
    overwrite: bool = False,
) -> Path:
    """Write per-layer statistics as one statistics checkpoint, atomically.

    The checkpoint (see the module docs) holds the arrays of every :class:`LayerStats` and a
    JSON record: format name and version, ``tasks``, and per layer its path, fields' shapes and
    dtypes and the row count of every task.

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
    for key, s in stats.items():
        if not isinstance(s, LayerStats):
            raise TypeError(f"save_stats: stats[{key!r}] is a {type(s).__name__}, not LayerStats.")
        if s.num_tasks != len(tasks):
            raise ValueError(
                f"save_stats: stats[{key!r}] has {s.num_tasks} tasks but {len(tasks)} task names "
                "were given."
            )
    entries = [Entry(key, s, ()) for key, s in stats.items()]
    return write(path, entries, tasks=tasks, per_task=False, source=None, overwrite=overwrite,
                 what="save_stats")  # fmt: skip


def load_stats(path: PathLike) -> SavedStats:
    """Read statistics written by :func:`save_stats` (on the default device).

    Raises:
        FileNotFoundError: no directory at ``path``.
        ValueError: the directory is not a jaxmerge statistics checkpoint, holds a model's
            per-task sums (:func:`~jaxmerge.load_model_stats` reads those), is incomplete or
            corrupted (unreadable record or arrays), or is of a newer format version.

    Examples:
        See :func:`save_stats`.
    """
    stored = read(path, per_task=False, what="load_stats")
    return SavedStats({e.key: e.stats for e in stored.entries}, stored.tasks)


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
