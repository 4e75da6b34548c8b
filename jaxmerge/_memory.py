"""Peak memory of statistics accumulation, and layer groups that fit a memory budget.

The statistics of a layer with ``n`` inputs, ``m`` outputs and ``K`` tasks hold, in the
accumulation dtype of ``b`` bytes (4 for float32)::

    S(n, m) = b · ((n+1)² + (n+1)·m + m + K·(n+1) + K)        gram, cross, out_sq, task_diag, count

One 11008 → 4096 projection in float32: ``S ≈ 485 MB + 180 MB``. One sharded accumulation step
(:func:`sharded_update_stats_by_path`) over a group ``G`` of layers, with ``N`` rows per layer in
the batch split over ``D`` devices and inputs of ``b_in`` bytes, needs on every device at most::

    peak = 3 · Σ_{ℓ∈G} S(n_ℓ, m_ℓ)  +  Σ_{ℓ∈G} ⌈N/D⌉ · (n_ℓ + 1 + m_ℓ) · (b_in + 2b)

The first term is the statistics held (replicated on every device), the device's partial sums
before the ``psum`` and the updated statistics; the second is the device's rows in the input
dtype plus two working copies in the accumulation dtype (the bias-augmented inputs and their
masked or cast copies). The formula counts the accumulation only: the model's parameters and its
forward activations come on top. It is an upper bound: XLA's buffer assignment reuses the working
copies' memory when the statistics dominate, and ``benchmarks/memory.py`` measures 0.67–0.79 of
it on CPU (width 512 to 2048, one to eight layers per group, two devices, float32 or bfloat16
inputs), the measured peak equal to XLA's own estimate. Statistics scale with the square of the
width and do not shrink with more devices, so a wide model is accumulated in several passes over
the calibration data, one group of layers per pass (:func:`plan_layer_groups`), solving each
group before the next (:func:`merge_in_groups`).
"""

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ._flax.fold import flatten, from_pure, to_pure, unflatten
from ._report import MergeReport
from .kinds import kind_of
from .model import collect_stats, solve_stats
from .model.collect import _peek
from .model.plan import _Plan

__all__ = ["stats_bytes", "accumulation_bytes", "plan_layer_groups", "merge_in_groups"]


def _positive(name: str, value, caller: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{caller}: {name} must be a positive integer, got {value!r}.")
    return int(value)


def _shape(path, shape, caller: str) -> tuple[int, int]:
    if not isinstance(shape, tuple | list) or len(shape) != 2:
        raise ValueError(
            f"{caller}: layer {path!r}: expected an (n_in, n_out) pair, got {shape!r}."
        )
    return _positive("n_in", shape[0], f"{caller}: layer {path!r}"), _positive(
        "n_out", shape[1], f"{caller}: layer {path!r}"
    )


def _itemsize(dtype, name: str, caller: str) -> int:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{caller}: {name} {dtype!r} is not a dtype.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{caller}: {name} must be floating point, got {dtype}.")
    return dtype.itemsize


def stats_bytes(n_in: int, n_out: int, num_tasks: int, *, dtype=jnp.float32) -> int:
    """Bytes of one layer's :class:`LayerStats`: ``b · ((n+1)² + (n+1)m + m + K(n+1) + K)``.

    Args:
        n_in: input width ``n``.
        n_out: output width ``m``.
        num_tasks: number of tasks ``K``.
        dtype: accumulation dtype (``b`` bytes per entry).

    Returns:
        The size in bytes.

    Examples:
        A LLaMA-7B MLP down-projection, float32, two tasks (about 485 MB of it is the Gram
        matrix):

        >>> round(stats_bytes(11008, 4096, 2) / 1e6, 1)
        665.3
    """
    caller = "stats_bytes"
    n, m = _shape("", (n_in, n_out), caller)
    k = _positive("num_tasks", num_tasks, caller)
    p = n + 1
    return _itemsize(dtype, "dtype", caller) * (p * p + p * m + m + k * p + k)


def accumulation_bytes(
    shapes: Mapping[str, Any],
    *,
    num_tasks: int,
    rows: int,
    devices: int = 1,
    input_dtype=jnp.float32,
    dtype=jnp.float32,
) -> int:
    """Peak bytes per device of one sharded accumulation step over a group of layers.

    ``3 · Σ S(n_ℓ, m_ℓ) + Σ ⌈rows/devices⌉ · (n_ℓ + 1 + m_ℓ) · (b_in + 2b)`` (see the module
    docs for the terms).

    Args:
        shapes: ``{path: (n_in, n_out)}`` of the layers accumulated together.
        num_tasks: number of tasks ``K``.
        rows: rows (examples × tokens) per layer in one batch, before sharding.
        devices: size of the mesh axis the rows are split over.
        input_dtype: dtype of the layer inputs and outputs fed in (``b_in`` bytes).
        dtype: accumulation dtype (``b`` bytes).

    Returns:
        The bound in bytes.

    Raises:
        ValueError, TypeError: a shape, count or dtype is not valid (naming the layer).

    Examples:
        >>> accumulation_bytes({"a": (3, 2)}, num_tasks=1, rows=8, devices=2)
        660
    """
    caller = "accumulation_bytes"
    k = _positive("num_tasks", num_tasks, caller)
    local = -(-_positive("rows", rows, caller) // _positive("devices", devices, caller))
    b = _itemsize(dtype, "dtype", caller)
    b_in = _itemsize(input_dtype, "input_dtype", caller)
    total = 0
    for path, shape in shapes.items():
        n, m = _shape(path, shape, caller)
        total += 3 * stats_bytes(n, m, k, dtype=dtype) + local * (n + 1 + m) * (b_in + 2 * b)
    return total


def plan_layer_groups(
    shapes: Mapping[str, Any],
    budget_bytes: int,
    *,
    num_tasks: int,
    rows: int,
    devices: int = 1,
    input_dtype=jnp.float32,
    dtype=jnp.float32,
) -> list[list[str]]:
    """Split layers, in order, into consecutive groups whose accumulation fits ``budget_bytes``.

    Greedy: a layer joins the current group while :func:`accumulation_bytes` of the group stays
    within the budget, otherwise it starts a new group. Keeping the given (call) order makes each
    group a contiguous stretch of the model, as the sequential algorithm needs; for a fixed order
    the greedy split has the fewest groups.

    Args:
        shapes: ``{path: (n_in, n_out)}`` in call order.
        budget_bytes: bytes per device available to the accumulation.
        num_tasks, rows, devices, input_dtype, dtype: as in :func:`accumulation_bytes`.

    Returns:
        The groups, lists of paths; one accumulation pass each.

    Raises:
        ValueError: a single layer does not fit the budget (naming it and its need).

    Examples:
        >>> shapes = {"l0": (1023, 1024), "l1": (1023, 1024), "l2": (1023, 512)}
        >>> plan_layer_groups(shapes, 80_000_000, num_tasks=2, rows=512)
        [['l0', 'l1'], ['l2']]
    """
    caller = "plan_layer_groups"
    options = dict(num_tasks=num_tasks, rows=rows, devices=devices)
    options.update(input_dtype=input_dtype, dtype=dtype)
    costs = {path: accumulation_bytes({path: shape}, **options) for path, shape in shapes.items()}
    return _greedy(costs, _positive("budget_bytes", budget_bytes, caller), shapes, caller)


def _greedy(costs: Mapping[str, int], budget: int, shapes: Mapping[str, Any], caller: str):
    """Consecutive groups of ``costs``' keys, each summing to at most ``budget``."""
    groups: list[list[str]] = []
    used = budget + 1
    for key, need in costs.items():
        if need > budget:
            raise ValueError(
                f"{caller}: layer {key!r} {tuple(shapes[key])} alone needs {need:,} bytes, over "
                f"the budget of {budget:,}; raise the budget, lower rows per batch or add devices."
            )
        if used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += need
    return groups


def _unit_bytes(specs, num_tasks: int, rows: int, dtype) -> int:
    """:func:`accumulation_bytes` of one shared-input group of a model (one GroupStats)."""
    _itemsize(dtype, "dtype", "merge_in_groups")
    return kind_of(specs[0].kind).stats_bytes(specs, num_tasks, rows, dtype)


def merge_in_groups(
    model: Any,
    base: Any,
    finetuned: Sequence[Any],
    calibration: Sequence[Iterable[Any]],
    *,
    budget_bytes: int | None = None,
    rows: int | None = None,
    groups: Sequence[Sequence[str]] | None = None,
    basis: Any = "full",
    prior: Any = None,
    ridge: Any = 0.0,
    alpha: float = 1.0,
    fallback: Any = "mean",
    heldout: Sequence[Iterable[Any]] | None = None,
    mask_key: str | None = "mask",
    call_kwargs: Mapping[str, Any] | None = None,
    rcond: float | None = None,
    progress: bool = True,
    throw: bool = True,
) -> tuple[Any, MergeReport]:
    """The parallel :func:`merge`, with statistics held for one group of layers at a time.

    Each pass reads all the calibration data once, collects the statistics of one group of
    layers (:func:`collect_stats` with ``paths``), solves them (:func:`solve_stats`), keeps only
    their merged parameters and drops the statistics. In the parallel algorithm a layer's
    statistics depend only on the fine-tuned models and the data, so the result is the merge of
    :func:`merge` with ``algorithm="parallel"``, whatever the grouping; peak memory is that of the
    largest group instead of the whole model, for one forward pass per task, batch and group.

    Groups are given (``groups``, lists of layer paths; layers sharing an input are always
    collected together) or planned in call order under ``budget_bytes`` per device with the
    bound of :func:`accumulation_bytes` for ``rows`` rows per layer and batch (see
    :func:`plan_layer_groups`; an embedding counts its diagonal statistics).

    Args:
        model, base, finetuned: as in :func:`merge`.
        calibration: ``K`` re-iterable collections of batches (lists, or datasets whose
            ``iter()`` starts over): every pass reads them again.
        budget_bytes: bytes per device for the statistics of one pass (with ``rows``).
        rows: rows (examples × tokens) a layer sees per batch, for the budget.
        groups: explicit passes, each a list of layer paths, covering every supported layer.
        basis, prior, ridge, alpha, fallback, heldout, mask_key, call_kwargs, rcond, progress,
            throw: as in :func:`merge`.

    Returns:
        ``(merged, report)`` as from :func:`merge`; the report lists every solved layer in call
        order.

    Raises:
        ValueError, TypeError: neither or both of ``groups`` and ``budget_bytes``, unknown or
            missing layer paths, a one-shot iterator as calibration, or what :func:`merge` raises.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
        >>> x = jax.random.normal(jax.random.key(0), (8, 4))
        >>> base = model.init(jax.random.key(1), x)["params"]
        >>> fts = [jax.tree.map(lambda a, i=i: a + 0.1 * i, base) for i in (1, 2)]
        >>> merged, report = merge_in_groups(model, base, fts, [[x], [x + 1]],
        ...                                  groups=[["layers_0"], ["layers_2"]], progress=False)
        >>> [layer.path for layer in report.layers]
        ['layers_0', 'layers_2']
    """
    caller = "merge_in_groups"
    started = time.perf_counter()
    if (groups is None) == (budget_bytes is None):
        raise ValueError(f"{caller}: give exactly one of groups= and budget_bytes= (with rows=).")
    if not isinstance(finetuned, Sequence) or isinstance(finetuned, Mapping) or not finetuned:
        raise ValueError(f"{caller}: finetuned must be a non-empty sequence of parameter trees.")
    for name, data in (("calibration", calibration), ("heldout", heldout or ())):
        for k, batches in enumerate(data):
            if isinstance(batches, Iterator):
                raise TypeError(
                    f"{caller}: {name}[{k}] is a one-shot iterator; every pass reads the data "
                    "again: give a list or a re-iterable dataset."
                )
    _, first = _peek(calibration, len(finetuned))
    plan = _Plan(model, call_kwargs, to_pure(base), first, mask_key)
    units = {plan.key(g): g for g in plan.groups}
    owner = {p: key for key, g in units.items() for p in g}
    if groups is not None:
        passes: list[list[str]] = []
        for i, group in enumerate(groups):
            unknown = [p for p in group if p not in owner]
            if isinstance(group, str) or unknown:
                raise ValueError(
                    f"{caller}: groups[{i}] must be a list of layer paths; unknown: "
                    f"{unknown or group!r}. Layers: {list(owner)}."
                )
            keys = list(dict.fromkeys(owner[p] for p in group))
            passes.append([k for k in keys if not any(k in done for done in passes)])
        missing = [p for p in owner if not any(owner[p] in done for done in passes)]
        if missing:
            raise ValueError(f"{caller}: layers in no group: {missing}; every layer needs a pass.")
    else:
        if rows is None:
            raise ValueError(f"{caller}: budget_bytes needs rows= (rows per layer and batch).")
        k = len(finetuned)
        costs = {
            key: _unit_bytes(plan.group_specs(g), k, _positive("rows", rows, caller), jnp.float32)
            for key, g in units.items()
        }
        shapes = {key: (plan.specs[g[0]].n_in, sum(plan.specs[p].n_out for p in g))
                  for key, g in units.items()}  # fmt: skip
        passes = _greedy(costs, _positive("budget_bytes", budget_bytes, caller), shapes, caller)

    merged_flat, like, treedef, reports = None, None, None, []
    for keys in passes:
        if not keys:
            continue
        paths = [p for key in keys for p in units[key]]
        options = dict(paths=paths, mask_key=mask_key, call_kwargs=call_kwargs, progress=progress)
        stats = collect_stats(model, finetuned, calibration, **options)
        held = None if heldout is None else collect_stats(model, finetuned, heldout, **options)
        merged, report = solve_stats(
            stats, base, finetuned, basis=basis, prior=prior, ridge=ridge, alpha=alpha,
            fallback=fallback, rcond=rcond, heldout=held, progress=progress, throw=throw,
        )  # fmt: skip
        flat, tdef = flatten(to_pure(merged))
        if merged_flat is None:
            merged_flat, like, treedef = dict(flat), merged, tdef
        for group in stats.values():
            for spec in group.layers:
                for name in spec.param_names:
                    leaf = f"{spec.path}/{name}" if spec.path else name
                    merged_flat[leaf] = flat[leaf]
        reports.append(report)
        del stats, held
    order = list(plan.specs)
    layers = sorted((r for rep in reports for r in rep.layers), key=lambda r: order.index(r.path))
    fallbacks = {
        p: rule
        for p, rule in reports[0].fallbacks.items()
        if all(p in r.fallbacks for r in reports)
    }
    report = MergeReport(
        "parallel", len(finetuned), tuple(layers), fallbacks, time.perf_counter() - started
    )
    merged = from_pure(like, unflatten(treedef, merged_flat, list(merged_flat)))
    return merged, report
