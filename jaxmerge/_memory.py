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
copies' memory when the statistics dominate, and ``benchmarks/memory.py`` measures 0.67–0.78 of
it on CPU (width 512 to 2048, one to eight layers per group, two devices), the measured peak
equal to XLA's own estimate. Statistics scale with the square of the width and do not shrink
with more devices, so a wide model is accumulated in several passes over the calibration data,
one group of layers per pass (:func:`plan_layer_groups`), solving each group before the next.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["stats_bytes", "accumulation_bytes", "plan_layer_groups"]


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
    budget = _positive("budget_bytes", budget_bytes, caller)
    options = dict(num_tasks=num_tasks, rows=rows, devices=devices)
    options.update(input_dtype=input_dtype, dtype=dtype)
    groups: list[list[str]] = []
    used = budget + 1
    for path, shape in shapes.items():
        need = accumulation_bytes({path: shape}, **options)
        if need > budget:
            raise ValueError(
                f"{caller}: layer {path!r} {tuple(shape)} alone needs {need:,} bytes, over the "
                f"budget of {budget:,}; raise the budget, lower rows per batch or add devices."
            )
        if used + need > budget:
            groups.append([])
            used = 0
        groups[-1].append(path)
        used += need
    return groups
