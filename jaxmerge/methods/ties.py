"""TIES merging: trim each task vector to its largest entries, elect a sign per entry, merge
the agreeing parts (see :mod:`jaxmerge.methods`)."""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import PyTree

from .common import Scale, _check_option, _combine, _deltas, flatten_models, flatten_params

__all__ = ["ties_task_vectors", "ties"]


def _kth_largest(magnitudes, density: float):
    """The ``r``-th largest entry of nonnegative arrays, ``r = max(1, round(density · n))``.

    That is the largest ``t`` with ``#{m ≥ t} ≥ r``, found by bisection on the bit patterns
    (ordered like the values for ``m ≥ 0``): one counting pass per bit instead of a sort, which
    is far slower on CPU for tensors of millions of entries.
    """
    dtype = jnp.result_type(*magnitudes)
    n = sum(m.size for m in magnitudes)
    if n >= 2**31:
        raise ValueError(
            f"ties: {n} entries to rank at once exceed 2**31 - 1; use trim='tensor' for a model "
            "this large."
        )
    keep = min(n, max(1, round(density * n)))
    itype = jnp.int64 if dtype.itemsize == 8 else jnp.int32
    bits = [lax.bitcast_convert_type(m.astype(dtype), itype) for m in magnitudes]

    def step(_, bounds):  # invariant: #{bits ≥ lo} ≥ keep > #{bits > hi}
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = sum(jnp.sum(b >= mid, dtype=jnp.int32) for b in bits) >= keep
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    top = jnp.max(jnp.stack([jnp.max(b) for b in bits]))
    lo, _ = lax.fori_loop(0, 8 * dtype.itemsize, step, (jnp.zeros((), itype), top))
    return lax.bitcast_convert_type(lo, dtype)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _trim(deltas, density: float, trim: str):
    """Keep the entries with ``|τ|`` at least the ``r``-th largest, per tensor or per model
    (one compiled program per model structure: the bisection's loop run eagerly would be traced
    and compiled again for every tensor of every call)."""
    if trim == "tensor":
        thresholds = [_kth_largest([jnp.abs(d)], density) for d in deltas]
    else:
        thresholds = [_kth_largest([jnp.abs(d) for d in deltas], density)] * len(deltas)
    return [jnp.where(jnp.abs(d) >= t, d, 0) for d, t in zip(deltas, thresholds, strict=True)]


def _disjoint(vectors, aggregate: str):
    """Sign election and disjoint merge: each model's part that agrees with the elected sign,
    divided by the number of agreeing models for ``"mean"``."""
    out = [[] for _ in vectors]
    for i in range(len(vectors[0])):
        stack = jnp.stack([v[i] for v in vectors])
        sign = jnp.sign(jnp.sum(stack, axis=0))
        agree = stack * sign > 0
        kept = jnp.where(agree, stack, 0)
        if aggregate == "mean":
            kept = kept / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(kept.dtype)
        for k in range(len(vectors)):
            out[k].append(kept[k])
    return out


def _check_ties(fn, density, trim, aggregate):
    _check_option(fn, "trim", trim, ("tensor", "model"))
    _check_option(fn, "aggregate", aggregate, ("mean", "sum"))
    if isinstance(density, jax.core.Tracer | bool) or not isinstance(density, float | int):
        raise TypeError(f"{fn}: density must be a Python number (it is static), got {density!r}.")
    if not 0 < density <= 1:
        raise ValueError(f"{fn}: density (the fraction of entries kept) must lie in (0, 1].")


def ties_task_vectors(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    density: float | int = 0.2,
    trim: str = "tensor",
    aggregate: str = "mean",
) -> list[PyTree]:
    """TIES' processed task vectors ``Bₖ``, so that TIES is ``θ₀ + λ Σₖ Bₖ``.

    1. **Trim**: ``τ̂ₖ`` keeps the entries of ``τₖ`` whose magnitude is at least the ``r``-th
       largest, ``r = max(1, round(density · size))``, zeroing the rest (ties at the threshold are
       all kept). ``trim="tensor"``: ranked within each parameter tensor; ``trim="model"``: ranked
       over the whole task vector (all tensors of the model together).
    2. **Elect**: the sign of the total trimmed mass, ``γ = sign(Σₖ τ̂ₖ)`` per entry.
    3. **Disjoint merge**: ``aₖ = [τ̂ₖ γ > 0]`` marks the models that agree;
       ``Bₖ = aₖ τ̂ₖ / max(1, Σⱼ aⱼ)`` for ``aggregate="mean"``, ``Bₖ = aₖ τ̂ₖ`` for ``"sum"``.

    Defaults: per-tensor trimming with a disjoint mean, as mergekit does. Ranking within each
    tensor keeps every tensor's own largest changes, so a tensor whose updates are small in
    absolute terms (a bias, a norm scale) is not wiped out by a larger one elsewhere, and each
    layer's result depends on that layer alone, which is what a layer-by-layer QP over these
    directions needs. ``trim="model", aggregate="mean"`` is the TIES paper's definition;
    ``trim="model", aggregate="sum"`` is FusionBench's. One detail differs from mergekit, which
    keeps exactly ``⌊density · size⌋`` entries and breaks ties at the threshold arbitrarily:
    rounding to the nearest count and keeping all tied entries makes the result independent of
    the order of the entries.

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        density: fraction of entries kept by the trim, in ``(0, 1]`` (static); 0.2 is the paper's
            recommended default.
        trim: ``"tensor"`` or ``"model"`` (static).
        aggregate: ``"mean"`` or ``"sum"`` (static).

    Returns:
        ``K`` pytrees ``Bₖ`` with the base's structure, in at least float32.

    Raises:
        ValueError, TypeError: structures or shapes differ, or an option is invalid.

    References:
        Yadav et al., "TIES-Merging: Resolving interference when merging models", NeurIPS 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros(3)}
        >>> fts = [{"w": jnp.array([4.0, -1.0, 2.0])}, {"w": jnp.array([2.0, 3.0, -0.5])}]
        >>> b = ties_task_vectors(base, fts, density=2 / 3)
        >>> b[0]["w"].tolist(), b[1]["w"].tolist()
        ([2.0, 0.0, 2.0], [1.0, 3.0, 0.0])
    """
    _check_ties("ties_task_vectors", density, trim, aggregate)
    _, base_leaves, models, treedef = flatten_models("ties_task_vectors", base, finetuned)
    trimmed = [_trim(d, density, trim) for d in _deltas(base_leaves, models)]
    return [jax.tree.unflatten(treedef, b) for b in _disjoint(trimmed, aggregate)]


def ties(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    density: float | int = 0.2,
    scale: Scale = 1.0,
    trim: str = "tensor",
    aggregate: str = "mean",
) -> PyTree:
    """TIES merging: ``θ = θ₀ + Σₖ λₖ Bₖ`` with ``Bₖ`` from :func:`ties_task_vectors`.

    With one ``λ`` this is ``θ₀ + λ · (disjoint mean or sum of the trimmed, sign-agreeing task
    vectors)``. See :func:`ties_task_vectors` for the steps and the defaults.

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        density: fraction of entries kept by the trim, in ``(0, 1]`` (static).
        scale: ``λ``, as in :func:`task_arithmetic`; 1 is the paper's default with the mean.
        trim: ``"tensor"`` or ``"model"`` (static).
        aggregate: ``"mean"`` or ``"sum"`` (static).

    Returns:
        The merged parameters, with the base's structure and dtypes.

    References:
        Yadav et al., "TIES-Merging: Resolving interference when merging models", NeurIPS 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros(3)}
        >>> fts = [{"w": jnp.array([4.0, -1.0, 2.0])}, {"w": jnp.array([2.0, 3.0, -0.5])}]
        >>> ties(base, fts, density=2 / 3)["w"].tolist()
        [3.0, 3.0, 2.0]
        >>> ties(base, fts, density=2 / 3, aggregate="sum")["w"].tolist()
        [6.0, 3.0, 2.0]
    """
    directions = ties_task_vectors(base, finetuned, density=density, trim=trim, aggregate=aggregate)
    paths, base_leaves, treedef = flatten_params("ties", base, "base")
    leaves = [jax.tree.leaves(d) for d in directions]
    return _combine("ties", paths, base_leaves, leaves, scale, treedef)


# ---- DARE -----------------------------------------------------------------------------------
