"""Devices and hosts: sharded statistics, device-parallel solves, reductions across processes.

Statistics are sums (see :mod:`jaxmerge._stats`), so spreading them is plain arithmetic:

* **Data parallel accumulation.** The calibration rows of a batch are split over the ``axis``
  (default ``"data"``) of a mesh; every device adds its rows to private sums with the same kernel
  as :func:`update_stats`, and ``jax.lax.psum`` over the axis adds the devices' sums. A batch whose
  row count does not divide the axis size is padded with rows of mask 0, which add exactly nothing.
* **Device-parallel solves.** Layer solves are independent. Layers with the same shapes and options
  are stacked, the stack is padded to a multiple of the axis size and split over the axis, and
  every device solves its slice with :func:`solve_layer` inside ``jax.shard_map``: the ``pmap``
  pattern written with current JAX. Small systems (scalar, diagonal and custom bases) are vmapped
  (batched solves). Full and low-rank systems run one after the other on their device
  (``lax.map``): under ``vmap`` the solver's fallbacks (``lax.cond``) turn into selects that
  compute every branch, which would pay an eigendecomposition, several times the cost of the
  Cholesky factorisation, for every layer.
* **Several hosts.** After ``jax.distributed.initialize``, either accumulate on a mesh that spans
  every process (inputs are then global ``jax.Array``), or accumulate each process's rows on its
  local devices and add the processes' statistics with :func:`allreduce_stats`. Every process ends
  with the same statistics and, solving the same statistics, the same merge.

Meshes come from the caller; by default a one-axis mesh over ``jax.local_devices()``. Both
``jax.sharding.AxisType.Explicit`` and ``Auto`` meshes work; extra mesh axes hold replicas.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import ArrayLike, Float, Real

from ._bases import Basis, Custom, LowRank
from ._errors import with_context
from ._layers import as_layer
from ._solve import SolveStatus
from ._solve_layer import LayerSolution, SolveError, solve_layer
from ._stats import LayerStats, _check_batch, _update

__all__ = [
    "sharded_update_stats",
    "sharded_update_stats_by_path",
    "solve_layers",
    "allreduce_stats",
]


# ---- meshes -------------------------------------------------------------------------------------


@functools.cache
def _local_mesh(axis: str) -> Mesh:
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), (axis,), devices=devices)


def _on_mesh(tree, mesh: Mesh, specs, axis: str):
    """Lay ``tree`` out on ``mesh`` as ``specs`` (a prefix of it) before ``shard_map``.

    ``shard_map`` reshards inputs on ``Auto`` axes itself; on ``Explicit`` axes the arrays' types
    must already carry the sharding, which ``jax.reshard`` gives them.
    """
    explicit = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis]
    if explicit != jax.sharding.AxisType.Explicit:
        return tree
    return jax.tree.map(
        lambda spec, t: jax.reshard(t, NamedSharding(mesh, spec)),
        specs,
        tree,
        is_leaf=lambda x: isinstance(x, P),
    )


def _mesh_for(mesh: Mesh | None, axis: str, caller: str) -> Mesh:
    if mesh is None:
        return _local_mesh(axis)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"{caller}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(
            f"{caller}: the mesh has axes {mesh.axis_names}, not {axis!r}; pass axis= one of them."
        )
    return mesh


# ---- sharded accumulation -----------------------------------------------------------------------


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


# ---- several processes --------------------------------------------------------------------------


@functools.cache
def _process_mesh() -> Mesh:
    """One device per process, on an axis named ``processes``."""
    firsts = {}
    for dev in jax.devices():
        firsts.setdefault(dev.process_index, dev)
    devices = np.array([firsts[i] for i in sorted(firsts)])
    return Mesh(devices, ("processes",))


@functools.partial(jax.jit, static_argnames="mesh")
def _psum_processes(tree, *, mesh):
    return jax.shard_map(
        lambda t: jax.lax.psum(jax.tree.map(lambda a: a[0], t), "processes"),
        mesh=mesh,
        in_specs=P("processes"),
        out_specs=P(),
    )(tree)


def allreduce_stats(stats: Any) -> Any:
    """Add statistics over all processes: every process gets ``Σ_processes stats``.

    Call it on every process (after ``jax.distributed.initialize``) with statistics of the same
    structure, shapes and dtypes, each accumulated from that process's own calibration rows
    (e.g. with :func:`sharded_update_stats` on the default, process-local mesh). The sum runs on
    the devices (one per process) as a ``psum`` collective; every process receives the same
    result. Statistics accumulated on a mesh spanning all processes are already global: do not
    reduce them again.

    Args:
        stats: a :class:`LayerStats` or any pytree of them (e.g. ``{path: LayerStats}``).

    Returns:
        The same structure holding the sums, on this process's first device.

    Raises:
        ValueError: the statistics are already global arrays spanning several processes.

    Examples:
        With one process the statistics are returned as they are:

        >>> import jax.numpy as jnp
        >>> from jaxmerge import init_stats, update_stats
        >>> s = update_stats(init_stats(1, 1, 1), jnp.ones((2, 1)), jnp.ones((2, 1)), 0)
        >>> allreduce_stats({"layer": s})["layer"].count.tolist()
        [2.0]
    """
    leaves = jax.tree.leaves(stats)
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                "allreduce_stats: the statistics are global arrays over several processes "
                "(accumulated on a multi-process mesh), hence already reduced."
            )
    if jax.process_count() == 1:
        return stats
    mesh = _process_mesh()
    (device,) = [d for d in mesh.devices if d.process_index == jax.process_index()]
    sharding = NamedSharding(mesh, P("processes"))

    def as_global(a):
        local = jax.device_put(jnp.asarray(a)[None], device)
        return jax.make_array_from_single_device_arrays(
            (mesh.size,) + local.shape[1:], sharding, [local]
        )

    summed = _psum_processes(jax.tree.map(as_global, stats), mesh=mesh)
    return jax.tree.map(lambda a: a.addressable_data(0), summed)


# ---- device-parallel solves ---------------------------------------------------------------------


def _basis_key(basis, path: str):
    """A hashable description of the basis and its directions (``None`` unless Custom)."""
    if isinstance(basis, Custom):
        if isinstance(basis.directions, Mapping) or not len(basis.directions):
            raise ValueError(
                f"solve_layers: layer {path!r}: Custom needs a non-empty sequence of directions."
            )
        dirs = [
            as_layer(d, f"solve_layers: layer {path!r}: Custom.directions[{j}]")
            for j, d in enumerate(basis.directions)
        ]
        return ("custom", bool(basis.per_output)), dirs
    if isinstance(basis, LowRank) or basis in ("scalar", "diagonal", "full"):
        return basis, None
    raise ValueError(
        f"solve_layers: layer {path!r}: unknown basis {basis!r}; use 'scalar', 'diagonal', "
        "'full', LowRank(r) or Custom(directions)."
    )


def _layer_inputs(path, stats, base, finetuned, basis, prior):
    """The per-layer pytree solved by one lane of the stack, and its static basis key."""
    where = f"solve_layers: layer {path!r}"
    if not isinstance(stats, LayerStats):
        raise TypeError(f"{where}: stats is a {type(stats).__name__}, not LayerStats.")
    spec, dirs = _basis_key(basis, path)
    if path not in base:
        raise ValueError(f"{where}: missing from base (it has statistics).")
    fts = []
    for k, model in enumerate(finetuned):
        if path not in model:
            raise ValueError(f"{where}: missing from finetuned[{k}] (it has statistics).")
        fts.append(as_layer(model[path], f"{where}: finetuned[{k}]"))
    b0 = as_layer(base[path], f"{where}: base")
    if prior is not None:
        full = spec == "full" or isinstance(spec, LowRank)
        prior = as_layer(prior, f"{where}: prior") if full else jnp.asarray(prior)
    return spec, (stats, b0, fts, prior, dirs)


def _group_key(spec, args):
    leaves, treedef = jax.tree.flatten(args)
    return spec, treedef, tuple((a.shape, jnp.asarray(a).dtype) for a in leaves)


_STATIC = ("spec", "ridge", "alpha", "rcond", "jitter", "mesh", "axis")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _solve_stack(args, *, spec, ridge, alpha, rcond, jitter, mesh, axis):
    def one(a):
        stats, base, fts, prior, dirs = a
        basis = spec if dirs is None else Custom(dirs, per_output=spec[1])
        sol = solve_layer(
            stats,
            base,
            fts,
            basis=basis,
            ridge=ridge,
            prior=prior,
            alpha=alpha,
            rcond=rcond,
            jitter=jitter,
            throw=False,
        )
        finite = jnp.all(jnp.isfinite(sol.kernel))
        if sol.bias is not None:
            finite &= jnp.all(jnp.isfinite(sol.bias))
        return sol, finite & (sol.status != SolveStatus.NONFINITE)

    # Small systems are vmapped; full and low-rank lanes run one by one so that the solver's
    # fallbacks stay lazy (see the module docs).
    big = spec == "full" or isinstance(spec, LowRank)
    per_device = functools.partial(jax.lax.map, one) if big else jax.vmap(one)
    args = _on_mesh(args, mesh, P(axis), axis)
    # check_vma=False: the solver's lax.cond branches return constants that are not marked as
    # varying over the axis; every lane is independent, so there is nothing to check.
    solve = jax.shard_map(
        per_device, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False
    )
    return solve(args)


def _place(stacked, mesh: Mesh, axis: str):
    """The stacked inputs split over ``axis`` (built from every process's identical copy when
    the mesh spans processes)."""
    sharding = NamedSharding(mesh, P(axis))
    if not mesh.is_multi_process:
        return jax.device_put(stacked, sharding)

    def put(a):
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, stacked)


def _gather(out, mesh: Mesh):
    if not mesh.is_multi_process:
        return out
    from jax.experimental import multihost_utils

    return jax.tree.map(jnp.asarray, multihost_utils.process_allgather(out, tiled=True))


def solve_layers(
    stats: Mapping[str, LayerStats],
    base: Mapping[str, Any],
    finetuned: Sequence[Mapping[str, Any]],
    *,
    basis: Basis | str | Mapping[str, Any] = "full",
    ridge: float = 0.0,
    prior: Mapping[str, Any] | None = None,
    alpha: float = 1.0,
    rcond: float | None = None,
    jitter: float = 0.0,
    mesh: Mesh | None = None,
    axis: str = "data",
    throw: bool = True,
) -> dict[str, LayerSolution]:
    """Solve many layers' merge QPs at once, spread over the devices of a mesh.

    Each layer's answer is that of :func:`solve_layer` (which states the QP) with the same
    arguments. Layers whose statistics, parameters, basis and prior have the same shapes and
    dtypes form a group; a group's inputs are stacked along a new leading axis of length ``G``,
    padded to a multiple of the axis size ``D`` and split over the mesh axis, and every device
    solves its ``⌈G/D⌉`` layers (vmapped for the scalar, diagonal and custom bases, one after the
    other for the full and low-rank ones; see the module docs). One compiled program per group.

    Args:
        stats: ``{path: LayerStats}``; the layers to solve.
        base: ``{path: layer-like}`` of the base model (a kernel, ``(kernel, bias)`` or a
            ``{"kernel", "bias"}`` dict); may hold more paths than ``stats``.
        finetuned: the ``K`` fine-tuned models as ``{path: layer-like}``, in task order.
        basis: one basis for every layer, or ``{path: basis}`` (see :func:`solve_layer`).
        ridge: ``λ ≥ 0`` for every layer.
        prior: optional ``{path: prior}`` (see :func:`solve_layer`); missing paths use 0.
        alpha: RegMean's ``α`` for every layer.
        rcond: the solver's relative cut-off (see :func:`psd_solve`).
        jitter: the solver's optional relative ridge retry (see :func:`psd_solve`).
        mesh: the mesh to spread layers over; default a one-axis mesh over ``jax.local_devices()``.
            On a mesh spanning several processes every process must pass the same inputs; the
            work is split over all processes' devices and every process gets every solution.
        axis: the mesh axis that splits the stack of layers.
        throw: raise :class:`SolveError` (naming the layer) when a merge would not be finite.

    Returns:
        ``{path: LayerSolution}`` in the order of ``stats``.

    Raises:
        ValueError, TypeError: a path is missing or its shapes, dtypes or options do not fit.
        SolveError: ``throw=True`` and a layer's inputs hold NaN or Inf.

    Examples:
        Two layers; in each, two fine-tunes change the weight of disjoint inputs, which the full
        basis recovers exactly:

        >>> import jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> w1, w2 = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [2.0]])
        >>> x1, x2 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
        >>> stats = {p: layer_stats([x1, x2], [x1 @ w1, x2 @ w2]) for p in ("a", "b")}
        >>> base = {p: jnp.zeros((2, 1)) for p in ("a", "b")}
        >>> sols = solve_layers(stats, base, [{"a": w1, "b": w1}, {"a": w2, "b": w2}])
        >>> [sols[p].kernel.ravel().round(6).tolist() for p in ("a", "b")]
        [[1.0, 2.0], [1.0, 2.0]]
    """
    mesh = _mesh_for(mesh, axis, "solve_layers")
    for name, tree in (("stats", stats), ("base", base)):
        if not isinstance(tree, Mapping):
            raise TypeError(f"solve_layers: {name} must be a mapping from layer path to values.")
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or not finetuned:
        raise ValueError(
            "solve_layers: finetuned must be a non-empty sequence of {path: layer} mappings, "
            "one per fine-tuned model in task order."
        )
    if prior is not None and not isinstance(prior, Mapping):
        raise TypeError("solve_layers: prior must be None or a mapping {path: prior}.")
    ridge, alpha, jitter = float(ridge), float(alpha), float(jitter)
    groups: dict[Any, list[tuple[str, Any]]] = {}
    for path in stats:
        layer_basis = basis.get(path, "full") if isinstance(basis, Mapping) else basis
        layer_prior = None if prior is None else prior.get(path)
        spec, args = _layer_inputs(path, stats[path], base, finetuned, layer_basis, layer_prior)
        groups.setdefault(_group_key(spec, args), []).append((path, args))

    d = mesh.shape[axis]
    solutions: dict[str, LayerSolution] = {}
    for (spec, _, _), members in groups.items():
        paths = [p for p, _ in members]
        lanes = [a for _, a in members]
        lanes += [lanes[-1]] * ((-len(lanes)) % d)  # pad the stack with copies of a real layer
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *lanes)
        out, finite = _solve_stack(
            _place(stacked, mesh, axis),
            spec=spec,
            ridge=ridge,
            alpha=alpha,
            rcond=rcond,
            jitter=jitter,
            mesh=mesh,
            axis=axis,
        )
        out, finite = _gather((out, finite), mesh)
        if throw and not np.all(np.asarray(finite)[: len(paths)]):
            for path, args, ok in zip(paths, lanes, np.asarray(finite), strict=False):
                if not ok:
                    options = dict(ridge=ridge, alpha=alpha, rcond=rcond, jitter=jitter)
                    _raise_for(path, spec, args, options)
        for path, sol in zip(paths, _unstack(out, len(paths)), strict=True):
            solutions[path] = sol
    return {p: solutions[p] for p in stats}


def _unstack(stacked, n: int) -> list:
    """The first ``n`` entries of a stacked pytree, each left on the device that holds it."""

    def lanes(a):
        if not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1:
            return [a[i] for i in range(n)]
        blocks = {s.index[0].start or 0: s.data for s in a.addressable_shards}
        out = []
        for start in sorted(blocks):
            out.extend(blocks[start][j] for j in range(blocks[start].shape[0]))
        return out[:n]

    per_leaf, treedef = jax.tree.flatten(stacked)
    per_leaf = [lanes(a) for a in per_leaf]
    return [treedef.unflatten([leaf[i] for leaf in per_leaf]) for i in range(n)]


def _raise_for(path, spec, args, options):
    """Re-solve one failed layer with ``throw=True`` for the detailed error, naming the path."""
    stats, b0, fts, prior, dirs = args
    basis = spec if dirs is None else Custom(dirs, per_output=spec[1])
    try:
        solve_layer(stats, b0, fts, basis=basis, prior=prior, **options)
    except SolveError as e:
        raise SolveError(f"solve_layers: layer {path!r}: {e}") from None
    raise SolveError(f"solve_layers: layer {path!r}: the merge would not be finite.")
