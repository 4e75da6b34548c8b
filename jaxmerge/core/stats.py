"""Second-moment statistics of one layer's calibration data: a monoid of sums.

For task ``k`` with inputs ``X̃ₖ = [Xₖ, 1]`` (the constant column carries the bias) and targets
``Yₖ`` (the fine-tuned model's outputs of the layer), weighted by ``wₖ``::

    gram      A  = Σₖ wₖ X̃ₖᵀ X̃ₖ                (n+1, n+1)
    cross     P  = Σₖ wₖ X̃ₖᵀ Yₖ                 (n+1, m)
    out_sq    s  = Σₖ wₖ Σᵢ Yₖ[i, :]²          (m,)   per output column
    task_diag gₖ = wₖ diag(X̃ₖᵀ X̃ₖ)             (K, n+1)
    count     Nₖ = rows seen of task k          (K,)

Every field is a sum, so statistics of batches, devices, hosts and runs add
(:func:`combine_stats`). The loss of a merged layer ``W̄ = [W; b]`` is
``L(W̄) = tr(W̄ᵀAW̄) − 2 tr(W̄ᵀP) + Σ s``.

Task weights. :func:`update_stats` adds plain sums (``wₖ = 1`` per row, or the ``weight`` given).
The default weight of the merge is ``wₖ = 1/Nₖ``, so each task counts equally whatever its number
of tokens; since ``Nₖ`` is known only once a task's data has been seen, accumulate each task on its
own and call :func:`normalize_stats` before combining tasks (:func:`layer_stats` does this).
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Real

__all__ = [
    "LayerStats",
    "init_stats",
    "update_stats",
    "combine_stats",
    "normalize_stats",
    "layer_stats",
]


class LayerStats(NamedTuple):
    """Sufficient statistics of one layer's calibration data (a pytree; see the module docs).

    Attributes:
        gram: ``A = Σₖ wₖ X̃ₖᵀX̃ₖ`` over bias-augmented inputs, shape ``(n_in + 1, n_in + 1)``.
        cross: ``P = Σₖ wₖ X̃ₖᵀYₖ``, shape ``(n_in + 1, n_out)``.
        out_sq: ``Σₖ wₖ ‖Yₖ[:, j]‖²`` per output column ``j``, shape ``(n_out,)``.
        task_diag: ``gₖ = wₖ diag(X̃ₖᵀX̃ₖ)`` per task, shape ``(num_tasks, n_in + 1)``; RegMean's
            ``alpha`` needs it.
        count: rows (tokens) seen per task, shape ``(num_tasks,)``; masked rows do not count.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = layer_stats([jnp.array([[2.0]])], [jnp.array([[3.0]])])  # x̄ = [2, 1], y = 3
        >>> s.gram.tolist(), s.cross.tolist(), s.out_sq.tolist(), (s.n_in, s.n_out, s.num_tasks)
        ([[4.0, 2.0], [2.0, 1.0]], [[6.0], [3.0]], [9.0], (1, 1, 1))
    """

    gram: Float[Array, "n1 n1"]
    cross: Float[Array, "n1 m"]
    out_sq: Float[Array, " m"]
    task_diag: Float[Array, "K n1"]
    count: Float[Array, " K"]

    @property
    def n_in(self) -> int:
        """Input width ``n`` (the bias column excluded)."""
        return self.gram.shape[-1] - 1

    @property
    def n_out(self) -> int:
        """Output width ``m``."""
        return self.cross.shape[-1]

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``K``."""
        return self.count.shape[-1]


def _default_dtype() -> jnp.dtype:
    return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def init_stats(n_in: int, n_out: int, num_tasks: int, *, dtype=None) -> LayerStats:
    """Empty statistics (the monoid's identity).

    Args:
        n_in: input width ``n`` of the layer (without the bias column).
        n_out: output width ``m``.
        num_tasks: number of fine-tuned models ``K``.
        dtype: accumulation dtype; float32 by default, float64 when ``jax_enable_x64`` is set.

    Returns:
        A :class:`LayerStats` of zeros.

    Raises:
        ValueError: a size is not a positive integer, or ``dtype`` is not floating.

    Examples:
        >>> s = init_stats(3, 2, num_tasks=2)
        >>> s.gram.shape, s.cross.shape, s.task_diag.shape
        ((4, 4), (4, 2), (2, 4))
    """
    for name, value in (("n_in", n_in), ("n_out", n_out), ("num_tasks", num_tasks)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"init_stats: {name} must be a positive integer, got {value!r}.")
    dtype = _default_dtype() if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"init_stats: dtype must be floating, got {dtype}.")
    n1 = n_in + 1
    return LayerStats(
        gram=jnp.zeros((n1, n1), dtype),
        cross=jnp.zeros((n1, n_out), dtype),
        out_sq=jnp.zeros((n_out,), dtype),
        task_diag=jnp.zeros((num_tasks, n1), dtype),
        count=jnp.zeros((num_tasks,), dtype),
    )


def _check_batch(stats: LayerStats, x, y, mask) -> None:
    if x.ndim < 1 or x.shape[-1] != stats.n_in:
        raise ValueError(
            f"update_stats: inputs x have shape {x.shape}; expected (..., {stats.n_in}) "
            "to match the statistics' input width."
        )
    if y.ndim < 1 or y.shape[-1] != stats.n_out:
        raise ValueError(
            f"update_stats: targets y have shape {y.shape}; expected (..., {stats.n_out}) "
            "to match the statistics' output width."
        )
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError(
            f"update_stats: inputs x {x.shape} and targets y {y.shape} disagree on their leading "
            "(example/token) axes."
        )
    for name, a in (("x", x), ("y", y)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"update_stats: {name} must be floating point, got dtype {a.dtype}.")
    if mask is not None and mask.shape != x.shape[:-1]:
        raise ValueError(
            f"update_stats: mask has shape {mask.shape}; expected the leading axes of x, "
            f"{x.shape[:-1]}."
        )


@jax.jit
def _update(stats: LayerStats, x, y, task, mask, weight) -> LayerStats:
    """The update kernel; ``y=None`` adds the input statistics only (``cross``, ``out_sq`` kept)."""
    dtype = stats.gram.dtype
    x = x.reshape(-1, x.shape[-1])
    y = None if y is None else y.reshape(-1, y.shape[-1])
    # 16-bit inputs stay 16-bit in the matmuls, accumulated in float32 (fast on accelerators);
    # anything else is computed in the statistics' dtype.
    narrow = x.dtype.itemsize == 2 and (y is None or y.dtype.itemsize == 2)
    if not (narrow and dtype == jnp.float32):
        x = x.astype(dtype)
        y = None if y is None else y.astype(dtype)
    m = jnp.ones(x.shape[0], dtype) if mask is None else mask.reshape(-1).astype(dtype)
    xm = x if mask is None else x * m[:, None].astype(x.dtype)  # exact: mask is 0/1

    def dot(a, b):
        return jnp.matmul(a.T, b, preferred_element_type=dtype).astype(dtype)

    # The constant input enters through column sums, not a concatenated column of ones (which
    # would copy the batch): X̃ᵀX̃ = [[XᵀX, Xᵀ1], [1ᵀX, N]] and X̃ᵀY = [XᵀY; 1ᵀY], masked rows out.
    sx = jnp.sum(xm, axis=0, dtype=dtype)
    rows = jnp.sum(m)
    gram = jnp.block([[dot(xm, x), sx[:, None]], [sx[None, :], rows[None, None]]])
    cross, out_sq = stats.cross, stats.out_sq
    if y is not None:
        cross = cross + weight * jnp.concatenate([dot(xm, y), (m @ y.astype(dtype))[None]], 0)
        out_sq = out_sq + weight * (m @ jnp.square(y.astype(dtype)))
    return LayerStats(
        gram=stats.gram + weight * gram,
        cross=cross,
        out_sq=out_sq,
        task_diag=stats.task_diag.at[task].add(weight * jnp.diagonal(gram)),
        count=stats.count.at[task].add(rows),
    )


def update_input_stats(stats: LayerStats, x, task, mask=None) -> LayerStats:
    """:func:`update_stats` without targets: ``gram``, ``task_diag`` and ``count`` only.

    For targets that are an affine map of the inputs, ``Y = X̃W̄``, the target statistics follow
    from the Gram matrix afterwards (:func:`affine_targets`) at a cost independent of the rows.
    """
    x = jnp.asarray(x)
    mask = None if mask is None else jnp.asarray(mask)
    weight = jnp.asarray(1.0, stats.gram.dtype)
    return _update(stats, x, None, jnp.asarray(task, jnp.int32), mask, weight)


def affine_targets(stats: LayerStats, wbar) -> LayerStats:
    """Statistics whose targets are ``Y = X̃W̄`` on the rows of ``stats``'s Gram matrix.

    ``P = AW̄`` and ``s = diag(W̄ᵀAW̄)`` replace ``cross`` and ``out_sq``: exactly what
    :func:`update_stats` would add for those targets, without their ``N·(n+1)·m`` products.
    ``wbar`` is ``(n_in + 1, n_out)`` (kernel rows, then the bias row).
    """
    wbar = jnp.asarray(wbar, stats.gram.dtype)
    cross = stats.gram @ wbar
    return stats._replace(cross=cross, out_sq=jnp.sum(wbar * cross, axis=0))


def update_stats(
    stats: LayerStats,
    x: Real[ArrayLike, "*batch n_in"],
    y: Real[ArrayLike, "*rows n_out"],
    task: int | Int[ArrayLike, ""],
    *,
    mask: ArrayLike | None = None,
    weight: float | Float[ArrayLike, ""] = 1.0,
) -> LayerStats:
    """Add one batch of task ``task`` to the statistics (jitted kernel).

    With row weights ``vᵢ = weight · maskᵢ``: ``A += X̃ᵀ diag(v) X̃``, ``P += X̃ᵀ diag(v) Y``,
    ``s += Σᵢ vᵢ Yᵢ²``, ``g_task += Σᵢ vᵢ X̃ᵢ²``, ``N_task += Σᵢ maskᵢ``.

    Args:
        stats: the statistics so far.
        x: layer inputs, any leading axes (examples, tokens); bf16, f16, f32 or f64.
        y: the fine-tuned model's outputs of the layer for the same rows.
        task: index of the fine-tuned model ``k`` in ``[0, num_tasks)``; may be traced.
        mask: optional 0/1 or boolean array over the leading axes; padding rows get 0.
        weight: multiplies this batch's contribution (``wₖ`` when ``Nₖ`` is known in advance).

    Returns:
        The updated statistics, in the statistics' dtype.

    Raises:
        ValueError: shapes do not match the statistics or each other.
        TypeError: inputs are not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = init_stats(2, 1, num_tasks=1)
        >>> s = update_stats(s, jnp.array([[1.0, 2.0]]), jnp.array([[3.0]]), 0)
        >>> s.gram.tolist(), s.cross.tolist()
        ([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], [[3.0], [6.0], [3.0]])
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    mask = None if mask is None else jnp.asarray(mask)
    _check_batch(stats, x, y, mask)
    if isinstance(task, int | np.integer) and not 0 <= task < stats.num_tasks:
        raise ValueError(f"update_stats: task {task} is out of range for {stats.num_tasks} tasks.")
    weight = jnp.asarray(weight, stats.gram.dtype)
    return _update(stats, x, y, jnp.asarray(task, jnp.int32), mask, weight)


def combine_stats(a: LayerStats, b: LayerStats) -> LayerStats:
    """The monoid's sum: statistics of the union of two disjoint sets of rows.

    Every field adds: ``A = A_a + A_b``, ``P = P_a + P_b``, ``s = s_a + s_b``,
    ``gₖ = gₖ,a + gₖ,b``, ``Nₖ = Nₖ,a + Nₖ,b``; :func:`init_stats` is the identity. Use it to
    add batches, devices, hosts, runs or tasks. Both must have the same shapes and dtype.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = init_stats(1, 1, num_tasks=1)
        >>> a = update_stats(s, jnp.ones((2, 1)), jnp.ones((2, 1)), 0)
        >>> combine_stats(a, a).count.tolist()
        [4.0]
    """
    for name, u, v in zip(LayerStats._fields, a, b, strict=True):
        if u.shape != v.shape or u.dtype != v.dtype:
            raise ValueError(
                f"combine_stats: field {name!r} differs: {u.shape} {u.dtype} vs {v.shape} {v.dtype}"
                "; statistics of one layer must come from the same layer and accumulation dtype."
            )
    return jax.tree.map(jnp.add, a, b)


def normalize_stats(stats: LayerStats) -> LayerStats:
    """Scale one task's plain sums to task weight ``wₖ = 1/Nₖ`` (its per-row mean).

    ``stats`` must hold rows of a single task (accumulate each task on its own, combine the
    normalised results). ``count`` is left as the number of rows.

    Raises:
        ValueError: more than one task has rows, or none has.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = init_stats(1, 1, num_tasks=2)
        >>> s = update_stats(s, jnp.ones((4, 1)), jnp.ones((4, 1)), 1)
        >>> normalize_stats(s).gram.tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    seen = np.asarray(stats.count) > 0
    if seen.sum() != 1:
        raise ValueError(
            "normalize_stats: statistics must hold rows of exactly one task; tasks with rows: "
            f"{np.flatnonzero(seen).tolist()}. Accumulate each task separately, normalise, then "
            "combine_stats."
        )
    return per_row(stats, jnp.sum(stats.count))


def per_row(stats, rows):
    """The one ``1/Nₖ`` finalize: every sum of ``stats`` (any statistics container with a
    ``count`` field, e.g. an :class:`~jaxmerge.EmbedStats`) divided by ``rows``, ``count`` kept.
    Used by :func:`normalize_stats` and by the whole-model collection and saved statistics."""
    scale = 1.0 / rows
    scaled = jax.tree.map(lambda a: a * scale, stats)
    return scaled._replace(count=stats.count)


def layer_stats(
    xs: Sequence[Real[ArrayLike, "..."]],
    ys: Sequence[Real[ArrayLike, "..."]],
    *,
    masks: Sequence[ArrayLike | None] | None = None,
    weights: Sequence[float] | None = None,
    dtype=None,
) -> LayerStats:
    """Statistics of one layer from per-task arrays, each task weighted ``1/Nₖ`` by default.

    Args:
        xs: ``K`` arrays of layer inputs ``[..., n_in]``, one per task.
        ys: ``K`` arrays of the fine-tuned models' outputs ``[..., n_out]``, ``ys[k]`` from model k.
        masks: optional per-task masks over the leading axes (``None`` entries allowed).
        weights: per-task weights ``wₖ`` applied to plain sums; default ``1/Nₖ``.
        dtype: accumulation dtype (see :func:`init_stats`).

    Returns:
        The combined :class:`LayerStats`.

    Raises:
        ValueError: lengths or shapes disagree, or a task has no (unmasked) rows.

    Examples:
        >>> import jax.numpy as jnp
        >>> s = layer_stats([jnp.ones((2, 3)), jnp.zeros((5, 3))], [jnp.ones((2, 1))] * 2)
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: layer_stats: task 1: inputs (5, 3) and targets (2, 1) disagree ...
        >>> s = layer_stats([jnp.ones((2, 3)), jnp.zeros((5, 3))],
        ...                 [jnp.ones((2, 1)), jnp.ones((5, 1))])
        >>> s.count.tolist(), float(s.gram[-1, -1])  # each task weighs 1
        ([2.0, 5.0], 2.0)
    """
    xs, ys = [jnp.asarray(x) for x in xs], [jnp.asarray(y) for y in ys]
    k = len(xs)
    if k == 0:
        raise ValueError("layer_stats: no tasks given (xs is empty); K must be at least 1.")
    masks = [None] * k if masks is None else list(masks)
    if len(ys) != k or len(masks) != k or (weights is not None and len(weights) != k):
        raise ValueError(
            f"layer_stats: got {k} input arrays, {len(ys)} target arrays, {len(masks)} masks"
            + ("" if weights is None else f", {len(weights)} weights")
            + "; give one per task."
        )
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.ndim < 1 or y.ndim < 1 or x.shape[:-1] != y.shape[:-1]:
            raise ValueError(
                f"layer_stats: task {t}: inputs {x.shape} and targets {y.shape} disagree on their "
                "leading (example/token) axes."
            )
    total = init_stats(xs[0].shape[-1], ys[0].shape[-1], k, dtype=dtype)
    for t in range(k):
        part = update_stats(
            init_stats(total.n_in, total.n_out, k, dtype=total.gram.dtype),
            xs[t],
            ys[t],
            t,
            mask=masks[t],
        )
        if weights is None:
            if float(part.count[t]) == 0:
                raise ValueError(f"layer_stats: task {t} has no unmasked rows.")
            part = normalize_stats(part)
        else:
            scale = weights[t]
            part = jax.tree.map(lambda a, c=scale: a * c, part)._replace(count=part.count)
        total = combine_stats(total, part)
    return total
