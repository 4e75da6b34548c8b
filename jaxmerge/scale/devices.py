"""Device-parallel solves: same-shaped layers stacked and split over a mesh axis
(:func:`solve_layers`)."""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .._internal import SolveOptions, solve_structure, solve_structured, structure_options
from ..core.bases import Basis, Custom, LowRank, check_basis
from ..core.layers import as_layer
from ..core.psd import SolveStatus
from ..core.qp import LayerSolution, SolveError, solve_layer
from ..core.stats import LayerStats
from ..core.systems import map_systems
from ..kinds import LayerSpec
from .mesh import _mesh_for, _on_mesh

__all__ = ["solve_layers"]


def _layer_inputs(path, stats, base, finetuned, basis, prior, options):
    """One layer of :func:`solve_layers` as a one-member group of the merge's group solve:
    ``(static, lane)``: the group's structure (``solve_structure``) without its
    ridge and ``α`` (the same for every layer) and the arrays one lane of the stack solves."""
    where = f"solve_layers: layer {path!r}"
    if not isinstance(stats, LayerStats):
        raise TypeError(f"{where}: stats is a {type(stats).__name__}, not LayerStats.")
    if isinstance(basis, Custom):
        if isinstance(basis.directions, Mapping) or not len(basis.directions):
            raise ValueError(f"{where}: Custom needs a non-empty sequence of directions.")
        dirs = [as_layer(d, f"{where}: Custom.directions[{j}]")
                for j, d in enumerate(basis.directions)]  # fmt: skip
        basis = Custom(dirs, per_output=bool(basis.per_output))
    else:
        check_basis(basis, where)
    if path not in base:
        raise ValueError(f"{where}: missing from base (it has statistics).")
    fts = []
    for k, model in enumerate(finetuned):
        if path not in model:
            raise ValueError(f"{where}: missing from finetuned[{k}] (it has statistics).")
        fts.append(_as_params(as_layer(model[path], f"{where}: finetuned[{k}]")))
    b0 = _as_params(as_layer(base[path], f"{where}: base"))
    if prior is not None:
        full = basis == "full" or isinstance(basis, LowRank)
        prior = as_layer(prior, f"{where}: prior") if full else jnp.asarray(prior)
    n_in, n_out = b0["kernel"].shape
    spec = LayerSpec(path, "dense", n_in, n_out, "kernel", "bias" if "bias" in b0 else None)
    static, knobs = solve_structure((spec,), (SolveOptions(basis, prior, **options),))
    (_, _, prior, dirs) = knobs[0]
    return static, (stats, b0, fts, prior, dirs)


def _as_params(layer):
    """A ``(kernel, bias)`` layer as the parameter dict of a dense layer."""
    kernel, bias = layer
    return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def _group_key(static, lane):
    leaves, treedef = jax.tree.flatten(lane)
    return static, treedef, tuple((a.shape, jnp.asarray(a).dtype) for a in leaves)


_STATIC = ("static", "ridge", "alpha", "mesh", "axis")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _solve_stack(lanes, *, static, ridge, alpha, mesh, axis):
    def one(lane):
        stats, base, fts, prior, dirs = lane
        knobs = [(ridge, alpha, prior, dirs)]
        ((_, sol),) = solve_structured(static, False, knobs, stats, [base], [fts], [base])
        finite = jnp.all(jnp.isfinite(sol.kernel))
        if sol.bias is not None:
            finite &= jnp.all(jnp.isfinite(sol.bias))
        return sol, finite & (sol.status != SolveStatus.NONFINITE)

    # Small systems are batched off CPU (map_systems); full and low-rank lanes run one by one so
    # that the solver's fallbacks stay lazy (see the module docs).
    basis = static[1][0][0]
    big = basis == "full" or isinstance(basis, LowRank)
    per_device = functools.partial(jax.lax.map if big else map_systems, one)
    lanes = _on_mesh(lanes, mesh, P(axis), axis)
    # check_vma=False: the solver's lax.cond branches return constants that are not marked as
    # varying over the axis; every lane is independent, so there is nothing to check.
    solve = jax.shard_map(
        per_device, mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False
    )
    return solve(lanes)


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
    arguments, computed by the merge's own group solve (each layer a dense layer of its own
    group; its energies ``E₀, L, ρ`` are measured against the base as the merge measures them,
    equal to :func:`solve_layer`'s up to rounding). Layers whose group solves have the same
    structure (basis, options, and the shapes and dtypes of statistics, parameters and prior)
    are stacked along a new leading axis of length ``G``, padded to a multiple of the axis size
    ``D`` and split over the mesh axis, and every device solves its ``⌈G/D⌉`` layers (batched
    for the scalar, diagonal and custom bases on GPU and TPU, one after the other for the full
    and low-rank ones and on CPU; see the module docs). One compiled program per structure.

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
        ValueError, TypeError: a path is missing or its shapes, dtypes or options do not fit, or
            ``basis`` or ``prior`` has entries for paths without statistics.
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
    for name, option in (("basis", basis), ("prior", prior)):
        unknown = [p for p in option if p not in stats] if isinstance(option, Mapping) else []
        if unknown:
            raise ValueError(
                f"solve_layers: {name} has entries for paths without statistics: {unknown}; "
                f"its keys are the paths of stats ({list(stats)[:8]})."
            )
    ridge, alpha, jitter = float(ridge), float(alpha), float(jitter)
    options = dict(ridge=ridge, alpha=alpha, rcond=rcond, jitter=jitter)
    groups: dict[Any, list[tuple[str, Any]]] = {}
    for path in stats:
        layer_basis = basis.get(path, "full") if isinstance(basis, Mapping) else basis
        layer_prior = None if prior is None else prior.get(path)
        static, lane = _layer_inputs(
            path, stats[path], base, finetuned, layer_basis, layer_prior, options
        )
        groups.setdefault(_group_key(static, lane), []).append((path, lane))

    d = mesh.shape[axis]
    solutions: dict[str, LayerSolution] = {}
    for (static, _, _), members in groups.items():
        paths = [p for p, _ in members]
        lanes = [a for _, a in members]
        lanes += [lanes[-1]] * ((-len(lanes)) % d)  # pad the stack with copies of a real layer
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *lanes)
        out, finite = _solve_stack(
            _place(stacked, mesh, axis), static=static, ridge=ridge, alpha=alpha, mesh=mesh,
            axis=axis,
        )  # fmt: skip
        out, finite = _gather((out, finite), mesh)
        if throw and not np.all(np.asarray(finite)[: len(paths)]):
            for path, lane, ok in zip(paths, lanes, np.asarray(finite), strict=False):
                if not ok:
                    _raise_for(path, static, lane, options)
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


def _raise_for(path, static, lane, options):
    """Re-solve one failed layer with ``throw=True`` for the detailed error, naming the path."""
    stats, b0, fts, prior, dirs = lane
    _, (opt,) = structure_options(static, [(options["ridge"], options["alpha"], prior, dirs)])
    try:
        solve_layer(stats, b0, fts, basis=opt.basis, prior=prior, **options)
    except SolveError as e:
        raise SolveError(f"solve_layers: layer {path!r}: {e}") from None
    raise SolveError(f"solve_layers: layer {path!r}: the merge would not be finite.")
