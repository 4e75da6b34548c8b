r"""Whole-model calibration statistics as an artifact: accumulate (resumably), save, combine, load.

:func:`~jaxmerge.collect_stats` returns the statistics of every layer group already weighted per
task (``wₖ = 1/Nₖ``) and summed over tasks. Weighted sums of different runs do not add up to the
statistics of the union of their rows, so the artifact keeps the **plain sums of each task
separately**: :class:`ModelStats` holds, for every group, the :class:`~jaxmerge.LayerStats` (or
:class:`~jaxmerge.EmbedStats`) arrays with a leading task axis,

    ``sums[key].stats.gram[k] = Σ_{i ∈ task k} x̃ᵢ x̃ᵢᵀ``  (row ``k`` of ``count``/``task_diag``
    only is non-zero in slot ``k``),

an exact monoid: runs over disjoint calibration rows (batches, hosts, tasks) add
(:func:`combine_model_stats`). :meth:`ModelStats.normalized` turns the sums into what
:func:`~jaxmerge.solve_stats` takes, ``Σₖ (1/Nₖ) · sumsₖ`` in task order — the same operations
:func:`~jaxmerge.collect_stats` performs, so a merge from saved statistics equals a merge from the
data.

:func:`accumulate_model_stats` computes the sums with one jitted update per batch and, given a
``directory``, checkpoints every ``save_every`` batches through
:func:`~jaxmerge.accumulate_resumable` (one sub-directory per task): a killed run restarted with
the same arguments resumes after its last saved batch and gives the sums of an uninterrupted run
bit for bit. :func:`save_model_stats` writes one checkpoint in the one statistics format of
:mod:`jaxmerge.io.store` (the arrays and a JSON record of the task names, group keys, fields and
every member's :class:`~jaxmerge.LayerSpec`) atomically, with the conventions of
:mod:`jaxmerge.io.checkpoint`: it refuses to overwrite unless asked, and a kill at any moment
leaves every earlier checkpoint readable.

Statistics know where they came from: :attr:`ModelStats.source` holds the fingerprint of every
fine-tuned tree, of every task's calibration batches, of the layer structure and the options
(:mod:`jaxmerge.io.provenance`); it is saved with them, a resume with other inputs fails
(:func:`~jaxmerge.accumulate_resumable`), and :func:`~jaxmerge.solve_stats` checks the fine-tunes
it is given against it (:meth:`ModelStats.check_source`).
"""

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _internal
from .._flax.fold import to_pure
from ..model.collect import GroupStats
from . import store
from .provenance import add_batch, short, tree_fingerprint
from .resumable import accumulate_resumable

__all__ = [
    "ModelStats",
    "accumulate_model_stats",
    "combine_model_stats",
    "save_model_stats",
    "load_model_stats",
]


class ModelStats(NamedTuple):
    """Per-task plain sums of every layer group of a model (see the module docs).

    Attributes:
        sums: ``{group key: GroupStats}`` whose arrays carry a leading task axis ``K``; slot ``k``
            holds the plain (weight 1) sums of task ``k``'s unmasked rows.
        tasks: one name per task.
        source: what the sums were computed from, or ``None`` (unknown: built by hand, or
            saved by jaxmerge before version 2 of the format): ``{"finetuned": [fingerprint of
            each task's tree], "calibration": [[fingerprint of each run's batches] per task],
            "layers": fingerprint of the layer structure, "options": {...}}``.

    Examples:
        See :func:`save_model_stats` (a save and load round trip).
    """

    sums: dict[str, GroupStats]
    tasks: tuple[str, ...]
    source: dict[str, Any] | None = None

    def check_source(self, finetuned: Sequence[Any], what: str = "solve_stats") -> None:
        """Raise unless ``finetuned`` are the trees the statistics were computed from, in order.

        Raises:
            ValueError: a tree's fingerprint differs from the recorded one (naming the task, and
                the recorded task it matches when the trees are swapped), or no source is
                recorded.
        """
        if self.source is None:
            raise ValueError(
                f"{what}: these statistics record no source (built by hand or saved by an older "
                "jaxmerge), so the fine-tuned trees cannot be checked against them; recompute "
                "them, or pass check_source=False to accept them as they are."
            )
        if len(finetuned) != len(self.tasks):
            raise ValueError(
                f"{what}: the statistics hold {len(self.tasks)} tasks {list(self.tasks)} but "
                f"{len(finetuned)} fine-tuned trees were given; give one per task, in order."
            )
        recorded = self.source["finetuned"]
        given = [tree_fingerprint(t, what) for t in finetuned]
        wrong = []
        for k, (name, want, got) in enumerate(zip(self.tasks, recorded, given, strict=True)):
            if want != got:
                same = [self.tasks[j] for j, r in enumerate(recorded) if r == got]
                hint = f" (it is the tree of task {same[0]!r}: swapped?)" if same else ""
                wrong.append(
                    f"task {k} ({name!r}): recorded {short(want)}, given {short(got)}{hint}"
                )
        if wrong:
            raise ValueError(
                f"{what}: the fine-tuned trees are not those the statistics were computed from: "
                f"{'; '.join(wrong)}. Give them in the statistics' task order "
                f"{list(self.tasks)}, or pass check_source=False to accept them."
            )

    def normalized(self) -> dict[str, GroupStats]:
        """``{key: GroupStats}`` weighted ``1/Nₖ`` per task and summed over tasks, for
        :func:`~jaxmerge.solve_stats`.

        Raises:
            ValueError: a task has no rows at some group (naming the task and the group).
        """
        stats = {key: group.stats for key, group in self.sums.items()}
        rows = jax.device_get({key: s.count for key, s in stats.items()})  # (K, K) per group
        total = jax.tree.map(lambda a: jnp.zeros_like(a[0]), stats)
        for k, name in enumerate(self.tasks):
            for key in stats:
                if rows[key][k, k] == 0:
                    raise ValueError(
                        f"ModelStats: task {name!r} has no calibration rows at layer group "
                        f"{key!r}; combine the statistics of every task before merging."
                    )
            total = _internal.add_normalized(total, jax.tree.map(lambda a, k=k: a[k], stats), k)
        return {key: GroupStats(total[key], group.layers) for key, group in self.sums.items()}


def _structure(plan) -> str:
    """Fingerprint of a plan's layer groups (their members' specs)."""
    groups = [[dataclasses.asdict(s) for s in plan.group_specs(g)] for g in plan.groups]
    return hashlib.sha256(json.dumps(groups, sort_keys=True).encode()).hexdigest()


def _hashed(batches, digest):
    for batch in batches:
        add_batch(digest, batch, "accumulate_model_stats")
        yield batch


def _task_names(tasks, num_tasks: int) -> tuple[str, ...]:
    names = tuple(f"task{k}" for k in range(num_tasks)) if tasks is None else tuple(tasks)
    if len(names) != num_tasks or len(set(names)) != num_tasks:
        raise ValueError(
            f"model statistics: tasks must be {num_tasks} distinct names (one per fine-tuned "
            f"model), got {list(names)}."
        )
    if not all(isinstance(t, str) for t in names):
        raise TypeError(f"model statistics: task names must be strings, got {list(names)}.")
    return names


def _as_state(sums: Mapping[str, Any]) -> list[dict]:
    """Sums as a checkpointable list (sorted keys: group keys may hold '/')."""
    return [sums[key]._asdict() for key in sorted(sums)]


def _from_state(state: list[dict], like: Mapping[str, Any]) -> dict[str, Any]:
    return {key: type(like[key])(**a) for key, a in zip(sorted(like), state, strict=True)}


def accumulate_model_stats(
    model,
    finetuned: Sequence[Any],
    calibration: Sequence[Iterable[Any]],
    *,
    tasks: Sequence[str] | None = None,
    directory: str | os.PathLike | None = None,
    save_every: int = 10,
    mask_key: str | None = "mask",
    call_kwargs: Mapping[str, Any] | None = None,
    dtype=None,
    progress: bool = True,
) -> ModelStats:
    """Per-task plain sums of every supported layer group (parallel inputs), resumably.

    For task ``k`` and every layer group the inputs are fine-tuned model ``k``'s own activations
    and the targets its outputs (the statistics of :func:`~jaxmerge.collect_stats`, before the
    per-task weighting).

    Args:
        model: a ``flax.linen.Module`` or ``flax.nnx.Module``.
        finetuned: the ``K`` fine-tuned parameter trees.
        calibration: ``K`` iterables of batches (the same sequence on every run when resuming).
        tasks: one name per task (default ``task0``, ``task1``, ...).
        directory: where to checkpoint the running sums (``directory/task-k``); ``None`` keeps
            nothing. A rerun with the same directory and data resumes after the last saved
            batch; the directory can be deleted once the result is saved.
        save_every: checkpoint every this many batches of a task (and after its last batch).
        mask_key: key of a 0/1 padding mask in dict batches.
        call_kwargs: static keyword arguments of every forward call.
        dtype: accumulation dtype (float32; float64 under ``jax_enable_x64``).
        progress: show a progress bar.

    Returns:
        A :class:`ModelStats`.

    Raises:
        ValueError: empty or missing calibration, non-finite activations (naming the layer and
            task), or a resume from partial sums of other inputs: other fine-tuned trees,
            options, layers or batches, or fewer batches (see
            :func:`~jaxmerge.accumulate_resumable`).

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Dense(1)
        >>> x = jnp.ones((3, 2))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> ms = accumulate_model_stats(model, [params, params], [[x], [x, x]], progress=False)
        >>> ms.sums[""].stats.count.tolist()  # [task, count of each task]
        [[3.0, 0.0], [0.0, 6.0]]
    """
    finetuned = [to_pure(t) for t in finetuned]
    names = _task_names(tasks, len(finetuned))
    like = jax.tree.leaves(finetuned[0])[0] if finetuned else None
    iters, first = _internal.peek(calibration, len(finetuned), mask_key=mask_key, like=like)
    plan = _internal.plan_of(model, call_kwargs, finetuned[0], first, mask_key)
    iters = _internal.checked_ids(plan, iters)
    dtype = jnp.dtype(dtype) if dtype is not None else _internal.default_dtype()
    k_tasks = len(finetuned)
    fn = plan.stats_fn(plan.groups, k_tasks, dtype, own=True)
    source = {
        "finetuned": [tree_fingerprint(t, "accumulate_model_stats") for t in finetuned],
        "calibration": [],
        "layers": _structure(plan),
        "options": {
            "mask_key": mask_key,
            "dtype": dtype.name,
            "call_kwargs": repr(sorted((call_kwargs or {}).items())),
        },  # fmt: skip
    }
    per_task = []
    with _internal.progress_bar(progress) as bar:
        job = bar.add_task("statistics", total=None)
        for k, batches in enumerate(iters):
            bar.update(job, description=f"statistics: task {k + 1}/{k_tasks} ({names[k]})")
            zero = _internal.zero_sums(plan, plan.groups, k_tasks, dtype)
            digest = hashlib.sha256()  # the task's calibration fingerprint

            def update(sums, batch, k=k):
                bar.advance(job)
                return fn(sums, finetuned[k], None, batch, k)

            if directory is None:
                sums = functools.reduce(update, _hashed(batches, digest), zero)
            else:
                state = accumulate_resumable(
                    lambda s, b, update=update, zero=zero: _as_state(
                        update(_from_state(s, zero), b)
                    ),
                    _as_state(zero),
                    batches,
                    Path(directory) / f"task-{k}",
                    save_every=save_every,
                    keep=1,
                    digest=digest,
                    source={
                        "task": [k, names[k]],
                        "finetuned": source["finetuned"][k],
                        "layers": source["layers"],
                        **source["options"],
                    },  # fmt: skip
                )
                sums = _from_state(state, zero)
            per_task.append(_internal.finished_task(plan, plan.groups, sums, finetuned[k], k))
            source["calibration"].append([digest.hexdigest()])
    out = {}
    for group in plan.groups:
        key = plan.key(group)
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *(s[key] for s in per_task))
        out[key] = GroupStats(stacked, plan.group_specs(group))
    return ModelStats(out, names, source)


def combine_model_stats(*parts: ModelStats) -> ModelStats:
    """Sum the statistics of runs over disjoint calibration rows (batches, hosts or tasks).

    Raises:
        ValueError: no parts, the parts disagree on tasks, groups, layers, shapes, dtypes, the
            fine-tuned trees or the options (the first difference is named), or two parts hold
            the same calibration batches of a task (they would count twice).

    The result's :attr:`~ModelStats.source` lists every part's calibration fingerprints; it is
    ``None`` when a part has none.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Dense(1)
        >>> x = jnp.ones((3, 2))
        >>> p = model.init(jax.random.key(0), x)["params"]
        >>> a = accumulate_model_stats(model, [p], [[x]], progress=False)
        >>> b = accumulate_model_stats(model, [p], [[2 * x]], progress=False)
        >>> combine_model_stats(a, b).sums[""].stats.count.tolist()
        [[6.0]]
    """
    if not parts:
        raise ValueError("combine_model_stats: no statistics given.")
    total = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if part.tasks != total.tasks:
            raise ValueError(
                f"combine_model_stats: part {i} has tasks {list(part.tasks)}, part 0 has "
                f"{list(total.tasks)}."
            )
        if list(part.sums) != list(total.sums):
            raise ValueError(
                f"combine_model_stats: part {i} has layer groups {list(part.sums)}, part 0 has "
                f"{list(total.sums)}."
            )
        sums = {}
        for key, a in total.sums.items():
            b = part.sums[key]
            la, lb = jax.tree.leaves(a.stats), jax.tree.leaves(b.stats)
            if (
                a.layers != b.layers
                or type(a.stats) is not type(b.stats)
                or any(
                    (x.shape, x.dtype) != (y.shape, y.dtype) for x, y in zip(la, lb, strict=True)
                )
            ):
                raise ValueError(
                    f"combine_model_stats: layer group {key!r} differs between part 0 and part "
                    f"{i} (layers, shapes or dtypes)."
                )
            sums[key] = GroupStats(jax.tree.map(jnp.add, a.stats, b.stats), a.layers)
        total = ModelStats(
            sums, total.tasks, _combined_source(total.source, part.source, i, total.tasks)
        )
    return total


def _combined_source(a, b, i: int, tasks) -> dict | None:
    """The source of the sum of part ``i`` (source ``b``) and the parts before it (``a``)."""
    if a is None or b is None:
        return None
    for field in ("finetuned", "layers", "options"):
        if a[field] != b[field]:
            raise ValueError(
                f"combine_model_stats: part {i} was computed from other {field} than part 0 "
                f"({'fine-tuned trees' if field == 'finetuned' else field} differ); only "
                "statistics of the same model and fine-tunes add."
            )
    calibration = []
    for name, seen, new in zip(tasks, a["calibration"], b["calibration"], strict=True):
        twice = set(seen) & set(new)
        if twice:
            raise ValueError(
                f"combine_model_stats: part {i} holds the same calibration batches of task "
                f"{name!r} as an earlier part (fingerprint {short(twice.pop())}); they would "
                "count twice."
            )
        calibration.append(seen + new)
    return {**a, "calibration": calibration}


def save_model_stats(
    path: str | os.PathLike, stats: ModelStats, *, overwrite: bool = False
) -> Path:
    """Write :class:`ModelStats` as one Orbax checkpoint, atomically.

    The checkpoint (the one statistics format of :mod:`jaxmerge.io.store`) holds every group's
    arrays and a JSON record: format name and version, task names, the statistics'
    :attr:`~ModelStats.source`, and per group its key, fields' shapes and dtypes and members'
    :class:`~jaxmerge.LayerSpec` fields.

    Args:
        path: destination directory; must not exist unless ``overwrite``.
        stats: the statistics.
        overwrite: replace an existing checkpoint at ``path``.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        TypeError: ``stats`` is not a :class:`ModelStats`.
        ValueError: no groups.

    Examples:
        >>> import tempfile, jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Dense(1)
        >>> x = jnp.ones((3, 2))
        >>> p = model.init(jax.random.key(0), x)["params"]
        >>> ms = accumulate_model_stats(model, [p], [[x]], tasks=["a"], progress=False)
        >>> d = tempfile.mkdtemp()
        >>> back = load_model_stats(save_model_stats(f"{d}/stats", ms))
        >>> back.tasks, back.sums[""].layers[0].kind, back.sums[""].stats.count.tolist()
        (('a',), 'dense', [[3.0]])
    """
    if not isinstance(stats, ModelStats):
        raise TypeError(
            f"save_model_stats: stats must be a ModelStats, got {type(stats).__name__}."
        )
    if not stats.sums:
        raise ValueError("save_model_stats: no layer groups (stats.sums is empty).")
    entries = [store.Entry(key, group.stats, group.layers) for key, group in stats.sums.items()]
    return store.write(path, entries, tasks=stats.tasks, per_task=True, source=stats.source,
                       overwrite=overwrite, what="save_model_stats")  # fmt: skip


def load_model_stats(path: str | os.PathLike) -> ModelStats:
    """Read statistics written by :func:`save_model_stats` (on the default device).

    Raises:
        FileNotFoundError: no directory at ``path``.
        ValueError: not a jaxmerge statistics checkpoint, per-layer statistics
            (:func:`~jaxmerge.load_stats` reads those), incomplete or corrupted (unreadable
            record or arrays), or of a newer format version.

    Examples:
        See :func:`save_model_stats`.
    """

    stored = store.read(path, per_task=True, what="load_model_stats")
    sums = {e.key: GroupStats(e.stats, e.layers) for e in stored.entries}
    return ModelStats(sums, stored.tasks, stored.source)
