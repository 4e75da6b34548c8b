"""Peak memory of statistics accumulation, and layer groups that fit a memory budget.

The statistics of a layer with ``n`` inputs, ``m`` outputs and ``K`` tasks hold, in the
accumulation dtype of ``b`` bytes (4 for float32)::

    S(n, m) = b · ((n+1)² + (n+1)·m + m + K·(n+1) + K)        gram, cross, out_sq, task_diag, count

One 11008 → 4096 projection in float32: ``S ≈ 485 MB + 180 MB``. One sharded accumulation step
(:func:`sharded_update_stats_by_path`) over a group ``G`` of layers, with ``N`` rows per layer in
the batch split over ``D`` devices and inputs of ``b_in`` bytes, needs on every device at most::

    peak = 3 · Σ_ℓ S(n_ℓ, m_ℓ)  +  b · max_ℓ (n_ℓ+1)²
           + Σ_ℓ (n_ℓ + 1 + m_ℓ) · (R · b_in + ⌈N/D⌉ · c · b)  +  1 KiB · |G|

with ``R = ⌈N/D⌉`` when ``D`` divides ``N`` (else ``N + D·⌈N/D⌉``) and ``c = 3`` working copies
for inputs narrower than the sums (else 2); :func:`accumulation_bytes` explains each term. The
formula counts the accumulation only: the model's parameters and its forward activations come on
top. It is an upper bound of XLA's buffer assignment for the step on CPU: checked at one and eight
devices in ``tests/test_distributed.py``, and when it was last revised over about 1,250 groups,
batch sizes, dtypes and masks at one, two and eight devices (at most 0.9997 of it).
``benchmarks/memory.py`` measures 0.70–0.77 of it for float32 inputs and 0.64–0.68 for bfloat16
ones (width 2048, one to eight layers per group, two devices), the measured peak equal to XLA's
own estimate. Statistics scale with the square of the width and do not shrink with more devices,
so a wide model is accumulated in several passes over the calibration data, one group of layers
per pass (:func:`plan_layer_groups`), solving each group before the next
(:func:`merge_in_groups`).
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from .. import _internal
from ..kinds import kind_of
from ..model.report import MergeReport

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

    An upper bound, term by term (``b``, ``b_in``: bytes of the accumulation and input dtypes;
    ``L = ⌈rows/devices⌉``, the rows of one device)::

        3 · Σ_ℓ S(n_ℓ, m_ℓ)                    statistics held, partial sums, updated statistics
        + b · max_ℓ (n_ℓ + 1)²                  one Gram matrix being assembled
        + Σ_ℓ (n_ℓ+1+m_ℓ) · R · b_in            the batch in the input dtype (see R below)
        + Σ_ℓ (n_ℓ+1+m_ℓ) · L · c · b           working copies of the device's rows
        + 1024 · |G|                            alignment and tuple tables

    * The statistics (:func:`stats_bytes`) are held replicated on every device; each device sums
      its rows into partial statistics of the same size before the ``psum``; the step outputs the
      updated statistics. ``S`` is exact for each.
    * The augmented Gram matrix is assembled from ``XᵀX`` and the column sums (``jnp.block``) and
      the unweighted one is kept for ``task_diag``: in a group of layers of different widths XLA
      holds one such temporary besides the partial sums (a 512 → 256 layer grouped with a
      16 → 48 one, 1 to 128 rows per device: 8–11% over the bound without this term). Only one
      layer's is counted: the updates run one after the other.
    * ``R = L`` when ``devices`` divides ``rows``: the step's arguments are the device's shard.
      Otherwise the rows are padded to a multiple of ``devices`` inside the step, so the batch
      enters it replicated, ``rows`` on every device, and the padded copy ``devices · L`` rows
      too: ``R = rows + devices · L`` (2047 rows of a 32 → 32 layer on eight devices: 5× the
      bound that counted ``L`` rows). Batches that split evenly are far cheaper.
    * ``c`` working copies of the device's rows in the accumulation dtype: ``c = 3`` for inputs
      narrower than it, ``c = 2`` otherwise. On CPU, which has no bfloat16 matmul, a masked
      bfloat16 batch is converted to float32, and its masked product is formed twice (for the
      column sums and for the matmul): 14 bytes per row and input column, 13.5 per row and
      column for a 256 → 16 layer, over the 10 of two copies. Float32 inputs need up to two
      copies (4 to 12 bytes per row and column, input included, against the 12 counted); where
      the rows dominate and no mask is given, the bound is up to 2.8× XLA's figure.
    * XLA aligns each buffer (64 bytes on CPU) and keeps tables of the tuples it passes: about
      500 bytes per layer measured, which dominates only layers of a few units.

    Args:
        shapes: ``{path: (n_in, n_out)}`` of the layers accumulated together.
        num_tasks: number of tasks ``K``.
        rows: rows (examples × tokens) per layer in one batch, before sharding.
        devices: size of the mesh axis the rows are split over.
        input_dtype: dtype of the layer inputs and outputs fed in (``b_in`` bytes).
        dtype: accumulation dtype (``b`` bytes).

    Returns:
        The bound in bytes. It is subadditive over the layers (the Gram term is the largest, not
        a sum), so the sum of the layers' own bounds bounds their group.

    Raises:
        ValueError, TypeError: a shape, count or dtype is not valid (naming the layer).

    Examples:
        >>> accumulation_bytes({"a": (3, 2)}, num_tasks=1, rows=8, devices=2)
        1748
    """
    caller = "accumulation_bytes"
    k = _positive("num_tasks", num_tasks, caller)
    n_rows = _positive("rows", rows, caller)
    d = _positive("devices", devices, caller)
    local = -(-n_rows // d)
    held = local if n_rows % d == 0 else n_rows + d * local
    b = _itemsize(dtype, "dtype", caller)
    b_in = _itemsize(input_dtype, "input_dtype", caller)
    copies = 3 if b_in < b else 2
    total, gram = 0, 0
    for path, shape in shapes.items():
        n, m = _shape(path, shape, caller)
        gram = max(gram, b * (n + 1) ** 2)
        total += 3 * stats_bytes(n, m, k, dtype=dtype) + 1024  # alignment, tuple tables
        total += (n + 1 + m) * (held * b_in + local * copies * b)
    return total + gram


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
        >>> plan_layer_groups(shapes, 90_000_000, num_tasks=2, rows=512)
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
    strict: bool = False,
) -> tuple[Any, MergeReport]:
    """The parallel :func:`merge`, with statistics held for one group of layers at a time.

    Each pass reads all the calibration data once, collects the statistics of one group of
    layers, solves them, keeps their merged parameters and drops the statistics, with the very
    stages (collect, solve, fold, report) of :func:`merge`. In the parallel algorithm a layer's
    statistics depend only on the fine-tuned models and the data, so the result is the merge of
    :func:`merge` with ``algorithm="parallel"`` bit for bit, whatever the grouping; peak memory is
    that of the largest group instead of the whole model, for one forward pass per task, batch
    and group.

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
            throw, strict: as in :func:`merge`.

    Returns:
        ``(merged, report)`` as from :func:`merge`; the report lists every solved layer in call
        order, and (``unsolved``) every parameter a fine-tune changed that was not solved.

    Warns:
        UnsolvedParametersWarning: as :func:`merge` (once per call, not per pass).

    Raises:
        ValueError, TypeError: neither or both of ``groups`` and ``budget_bytes``, ``rows``
            with ``groups``, unknown or missing layer paths, a one-shot iterator as calibration,
            or what :func:`merge` raises (:class:`~jaxmerge.UnsolvedParametersError` with
            ``strict=True``).

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
    if (groups is None) == (budget_bytes is None):
        raise ValueError(f"{caller}: give exactly one of groups= and budget_bytes= (with rows=).")
    if groups is not None and rows is not None:
        raise ValueError(f"{caller}: rows= sizes the budget; with groups= it has no effect.")
    if not isinstance(finetuned, Sequence) or isinstance(finetuned, Mapping) or not finetuned:
        raise ValueError(f"{caller}: finetuned must be a non-empty sequence of parameter trees.")
    for name, data in (("calibration", calibration), ("heldout", heldout or ())):
        for k, batches in enumerate(data):
            if isinstance(batches, Iterator):
                raise TypeError(
                    f"{caller}: {name}[{k}] is a one-shot iterator; every pass reads the data "
                    "again: give a list or a re-iterable dataset."
                )

    def passes(plan):
        """The passes' group keys: ``groups`` checked, or planned under the budget."""
        units = {plan.key(g): g for g in plan.groups}
        owner = {p: key for key, g in units.items() for p in g}
        if groups is not None:
            out: list[list[str]] = []
            for i, group in enumerate(groups):
                unknown = [p for p in group if p not in owner]
                if isinstance(group, str) or unknown:
                    raise ValueError(
                        f"{caller}: groups[{i}] must be a list of layer paths; unknown: "
                        f"{unknown or group!r}. Layers: {list(owner)}."
                    )
                keys = list(dict.fromkeys(owner[p] for p in group))
                out.append([k for k in keys if not any(k in done for done in out)])
            missing = [p for p in owner if not any(owner[p] in done for done in out)]
            if missing:
                raise ValueError(
                    f"{caller}: layers in no group: {missing}; every layer needs a pass."
                )
            return out
        if rows is None:
            raise ValueError(f"{caller}: budget_bytes needs rows= (rows per layer and batch).")
        k = len(finetuned)
        costs = {
            key: _unit_bytes(plan.group_specs(g), k, _positive("rows", rows, caller), jnp.float32)
            for key, g in units.items()
        }
        shapes = {key: (plan.specs[g[0]].n_in, sum(plan.specs[p].n_out for p in g))
                  for key, g in units.items()}  # fmt: skip
        return _greedy(costs, _positive("budget_bytes", budget_bytes, caller), shapes, caller)

    return _internal.merge_in_passes(
        model, base, finetuned, calibration, algorithm="parallel", basis=basis, prior=prior,
        ridge=ridge, alpha=alpha, fallback=fallback, heldout=heldout, mask_key=mask_key,
        call_kwargs=call_kwargs, rcond=rcond, progress=progress, throw=throw, strict=strict,
        passes=passes, caller=caller,
    )  # fmt: skip
