"""Data-parallel accumulation: each device adds its rows of a batch, ``psum`` adds the devices."""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import ArrayLike, Float, Real

from .._errors import with_context
from ..core.stats import LayerStats, _check_batch, _update
from .mesh import _mesh_for, _on_mesh

__all__ = ["sharded_update_stats", "sharded_update_stats_by_path"]


def _pad_rows(a, d: int):
    """Pad the first axis with zeros (``False`` for masks) to a multiple of ``d``."""
    pad = (-a.shape[0]) % d
    return jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) if pad else a


@functools.partial(jax.jit, static_argnames=("mesh", "axis"))
def _accumulate(stats, xs, ys, masks, task, weights, *, mesh, axis):
    d = mesh.shape[axis]
    rows = []
    for x, y, mask in zip(xs, ys, masks, strict=True):
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if mask is None and x.shape[0] % d:
            mask = jnp.ones(x.shape[0], bool)
        mask = None if mask is None else _pad_rows(mask.reshape(-1), d)
        rows.append((_pad_rows(x, d), _pad_rows(y, d), mask))

    def local(stats, rows, task, weights):
        # Each device sums its own rows from zero, the axis adds the devices' sums.
        parts = [
            _update(jax.tree.map(jnp.zeros_like, s), x, y, task, m, w)
            for s, (x, y, m), w in zip(stats, rows, weights, strict=True)
        ]
        parts = jax.lax.psum(parts, axis)
        return [jax.tree.map(jnp.add, s, p) for s, p in zip(stats, parts, strict=True)]

    args = _on_mesh((list(stats), rows, task, weights), mesh, (P(), P(axis), P(), P()), axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(), P()), out_specs=P())(*args)


def _check_task(task, num_tasks: int, caller: str):
    if isinstance(task, bool) or not (
        isinstance(task, int | np.integer) or jnp.issubdtype(jnp.asarray(task).dtype, jnp.integer)
    ):
        raise TypeError(f"{caller}: task must be an integer task index, got {task!r:.60}.")
    if isinstance(task, int | np.integer) and not 0 <= task < num_tasks:
        raise ValueError(f"{caller}: task {task} is out of range for {num_tasks} tasks.")
    return jnp.asarray(task, jnp.int32)


def sharded_update_stats_by_path(
    stats: Mapping[str, LayerStats],
    batches: Mapping[str, tuple[Real[ArrayLike, "..."], Real[ArrayLike, "..."]]],
    task: ArrayLike,
    *,
    mask: ArrayLike | Mapping[str, ArrayLike | None] | None = None,
    weight: float | Float[ArrayLike, ""] = 1.0,
    mesh: Mesh | None = None,
    axis: str = "data",
) -> dict[str, LayerStats]:
    """Add one batch of task ``task`` to the statistics of several layers, data-parallel.

    For every path, the rows of ``x`` and ``y`` (leading axes flattened) are split over the mesh
    axis ``axis``; device ``d`` computes ``A_d = X̃_dᵀ diag(v) X̃_d``, ``P_d = X̃_dᵀ diag(v) Y_d``
    and the other sums of :func:`update_stats` on its rows, and ``psum`` over the axis gives
    ``A = Σ_d A_d`` etc., added to ``stats``. All layers go through one jitted step. Rows that pad
    a batch to a multiple of the axis size get mask 0 and add exactly nothing; the result equals
    :func:`update_stats` up to the order of floating-point additions.

    Args:
        stats: the statistics so far, one :class:`LayerStats` per layer path.
        batches: ``{path: (x, y)}`` for the same paths: layer inputs ``(..., n_in)`` and the
            fine-tuned model's outputs ``(..., n_out)`` of that layer, any leading axes.
        task: index of the fine-tuned model ``k`` (may be traced).
        mask: ``None``, one 0/1 mask over the leading axes shared by every layer, or
            ``{path: mask}`` (missing or ``None`` entries mean no mask).
        weight: multiplies this batch's contribution.
        mesh: the mesh to shard rows over; default a one-axis mesh over ``jax.local_devices()``.
            On a mesh that spans several processes, give global ``jax.Array`` inputs.
        axis: the mesh axis that splits the rows; other mesh axes hold replicas.

    Returns:
        ``{path: LayerStats}``, replicated over the mesh.

    Raises:
        ValueError, TypeError: paths, shapes, dtypes, task or mesh do not fit, naming the path.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import init_stats
        >>> stats = {"a": init_stats(2, 1, 1), "b": init_stats(1, 3, 1)}
        >>> batches = {"a": (jnp.ones((5, 2)), jnp.ones((5, 1))),
        ...            "b": (jnp.ones((5, 1)), jnp.zeros((5, 3)))}
        >>> out = sharded_update_stats_by_path(stats, batches, 0)
        >>> out["a"].count.tolist(), out["b"].gram.tolist()
        ([5.0], [[5.0, 5.0], [5.0, 5.0]])
    """
    caller = "sharded_update_stats_by_path"
    mesh = _mesh_for(mesh, axis, caller)
    if not isinstance(stats, Mapping) or not isinstance(batches, Mapping):
        raise TypeError(f"{caller}: stats and batches must be mappings from layer path to values.")
    if set(stats) != set(batches):
        raise ValueError(
            f"{caller}: stats and batches must have the same paths; only in stats: "
            f"{sorted(set(stats) - set(batches))}, only in batches: "
            f"{sorted(set(batches) - set(stats))}."
        )
    paths = list(stats)
    if not paths:
        return {}
    xs, ys, masks = [], [], []
    for path in paths:
        s = stats[path]
        if not isinstance(s, LayerStats):
            raise TypeError(f"{caller}: stats[{path!r}] is a {type(s).__name__}, not LayerStats.")
        pair = batches[path]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise ValueError(f"{caller}: batches[{path!r}] must be an (x, y) pair.")
        if mesh.is_multi_process and not all(
            isinstance(a, jax.Array) and not a.is_fully_addressable for a in pair
        ):
            raise ValueError(
                f"{caller}: layer {path!r}: the mesh spans several processes, so x and y must be "
                "global jax.Arrays (e.g. jax.make_array_from_process_local_data); to pass each "
                "process's own rows, accumulate on its local devices and call allreduce_stats."
            )
        x, y = jnp.asarray(pair[0]), jnp.asarray(pair[1])
        m = mask.get(path) if isinstance(mask, Mapping) else mask
        m = None if m is None else jnp.asarray(m)
        try:
            _check_batch(s, x, y, m)
        except (ValueError, TypeError) as e:
            raise with_context(e, f"{caller}: layer {path!r}") from e
        xs.append(x)
        ys.append(y)
        masks.append(m)
    first = stats[paths[0]]
    for path in paths:
        if stats[path].num_tasks != first.num_tasks:
            raise ValueError(
                f"{caller}: stats[{path!r}] has {stats[path].num_tasks} tasks but "
                f"stats[{paths[0]!r}] has {first.num_tasks}; all layers count the same tasks."
            )
    task = _check_task(task, first.num_tasks, caller)
    weights = [jnp.asarray(weight, stats[p].gram.dtype) for p in paths]
    out = _accumulate([stats[p] for p in paths], xs, ys, masks, task, weights, mesh=mesh, axis=axis)
    return dict(zip(paths, out, strict=True))


def sharded_update_stats(
    stats: LayerStats,
    x: Real[ArrayLike, "*batch n_in"],
    y: Real[ArrayLike, "*rows n_out"],
    task: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    weight: float | Float[ArrayLike, ""] = 1.0,
    mesh: Mesh | None = None,
    axis: str = "data",
) -> LayerStats:
    """:func:`update_stats` with the batch's rows split over a mesh axis and summed with ``psum``.

    One layer of :func:`sharded_update_stats_by_path`, which states the maths and the arguments.

    Returns:
        The updated :class:`LayerStats`, replicated over the mesh.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import init_stats
        >>> s = sharded_update_stats(init_stats(2, 1, 1), jnp.ones((3, 2)), jnp.ones((3, 1)), 0)
        >>> s.gram.tolist(), s.count.tolist()
        ([[3.0, 3.0, 3.0], [3.0, 3.0, 3.0], [3.0, 3.0, 3.0]], [3.0])
    """
    out = sharded_update_stats_by_path(
        {"": stats}, {"": (x, y)}, task, mask=mask, weight=weight, mesh=mesh, axis=axis
    )
    return out[""]
