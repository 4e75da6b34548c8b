"""DARE: drop each task-vector entry with probability ``p`` and rescale the rest by
``1/(1 − p)``, optionally then TIES' election (see :mod:`jaxmerge.methods`)."""

import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float, PyTree

from .common import Scale, _check_option, _combine, _deltas, flatten_models, flatten_params
from .ties import _disjoint

__all__ = ["dare_masks", "dare_task_vectors", "dare"]


def _check_drop_rate(fn: str, drop_rate) -> None:
    if not isinstance(drop_rate, jax.core.Tracer) and not 0 <= float(drop_rate) < 1:
        raise ValueError(f"{fn}: drop_rate p must lie in [0, 1), got {drop_rate}.")


def dare_masks(
    key: ArrayLike,
    base: PyTree,
    num_tasks: int,
    *,
    drop_rate: float | Float[ArrayLike, ""],
) -> list[PyTree]:
    """DARE's keep masks: ``mₖ ~ Bernoulli(1 − p)`` per entry, one pytree per task.

    The mask of task ``k`` at leaf path ``path`` is drawn from
    ``fold_in(fold_in(key, k), crc32(path))``: it depends only on the key, the task index, the
    leaf's path and its shape, so the same key gives the same masks bit for bit (on any backend,
    for a given JAX version and PRNG implementation), whatever else the tree holds.

    Args:
        key: a ``jax.random`` key (``jax.random.key(seed)``).
        base: parameters whose structure and shapes the masks take.
        num_tasks: ``K``.
        drop_rate: the drop probability ``p ∈ [0, 1)``.

    Returns:
        ``K`` pytrees of boolean masks (``True`` = kept) with the base's structure.

    Raises:
        TypeError: ``key`` is not a PRNG key.
        ValueError: ``drop_rate`` or ``num_tasks`` is out of range.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> masks = dare_masks(jax.random.key(0), {"w": jnp.zeros(1000)}, 2, drop_rate=0.9)
        >>> 0.05 < float(masks[0]["w"].mean()) < 0.15
        True
    """
    key_ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not key_ok:
        raise TypeError(
            f"dare_masks: key must be a jax.random key (jax.random.key(seed)); got {key!r:.60}."
        )
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape != ():
        raise ValueError(
            f"dare_masks: key must be one jax.random key, got an array of keys of shape "
            f"{key.shape}; the masks of every task are drawn from the one key."
        )
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"dare_masks: num_tasks must be a positive integer, got {num_tasks!r}.")
    _check_drop_rate("dare_masks", drop_rate)
    paths, leaves, treedef = flatten_params("dare_masks", base, "base")
    keep = 1 - jnp.asarray(drop_rate, jnp.float32)
    masks = []
    for k in range(num_tasks):
        task_key = jax.random.fold_in(key, k)
        masks.append(
            jax.tree.unflatten(
                treedef,
                [
                    jax.random.bernoulli(
                        jax.random.fold_in(task_key, zlib.crc32(path.encode())), keep, leaf.shape
                    )
                    for path, leaf in zip(paths, leaves, strict=True)
                ],
            )
        )
    return masks


def dare_task_vectors(
    base: PyTree,
    finetuned: Sequence[PyTree],
    masks: Sequence[PyTree],
    *,
    drop_rate: float | Float[ArrayLike, ""],
    merge: str = "task_arithmetic",
    aggregate: str = "mean",
    rescale: str = "expectation",
) -> list[PyTree]:
    """DARE's processed task vectors ``Bₖ``, so that DARE is ``θ₀ + λ Σₖ Bₖ``.

    Drop and rescale: ``τ̃ₖ = mₖ ⊙ τₖ / (1 − p)``, which keeps ``E[τ̃ₖ] = τₖ`` (the paper's
    ``rescale="expectation"``), or, ``rescale="l1"``, ``τ̃ₖ = mₖ ⊙ τₖ · ‖τₖ‖₁ / ‖mₖ ⊙ τₖ‖₁``
    per tensor, which keeps each tensor's L1 norm (mergekit's ``dare_linear`` and
    ``dare_ties``; a tensor whose kept entries are all zero stays zero). With
    ``merge="task_arithmetic"``, ``Bₖ = τ̃ₖ``; with ``merge="ties"`` the dropout replaces TIES'
    magnitude trim and ``Bₖ`` is TIES' sign election and disjoint merge of the ``τ̃ₖ`` (as
    mergekit's ``dare_ties``; see :func:`ties_task_vectors`, step 2 and 3).

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        masks: ``K`` pytrees of keep masks (boolean or 0/1) shaped like the base, e.g. from
            :func:`dare_masks`.
        drop_rate: the drop probability ``p ∈ [0, 1)`` the masks were drawn with.
        merge: ``"task_arithmetic"`` or ``"ties"`` (static).
        aggregate: ``"mean"`` or ``"sum"``, for ``merge="ties"`` only (static; ``"sum"`` with
            ``merge="task_arithmetic"`` is an error).
        rescale: ``"expectation"`` or ``"l1"`` (static).

    Returns:
        ``K`` pytrees ``Bₖ`` with the base's structure, in at least float32.

    Raises:
        ValueError: structures or shapes of the models or masks differ, a mask holds values
            other than 0 and 1, or an option is invalid (or, ``aggregate``, has no effect).

    References:
        Yu et al., "Language models are Super Mario: absorbing abilities from homologous models as
        a free lunch", ICML 2024.

    Examples:
        >>> import jax.numpy as jnp
        >>> base, fts = {"w": jnp.zeros(2)}, [{"w": jnp.array([1.0, 2.0])}]
        >>> dare_task_vectors(base, fts, [{"w": jnp.array([True, False])}],
        ...                   drop_rate=0.5)[0]["w"].tolist()
        [2.0, 0.0]
        >>> dare_task_vectors(base, fts, [{"w": jnp.array([True, False])}],
        ...                   drop_rate=0.5, rescale="l1")[0]["w"].tolist()
        [3.0, 0.0]
    """
    fn = "dare_task_vectors"
    _check_option(fn, "merge", merge, ("task_arithmetic", "ties"))
    _check_option(fn, "aggregate", aggregate, ("mean", "sum"))
    _check_option(fn, "rescale", rescale, ("expectation", "l1"))
    if merge != "ties" and aggregate != "mean":
        raise ValueError(
            f"{fn}: aggregate={aggregate!r} applies to merge='ties' only (the disjoint merge "
            f"after the sign election); merge={merge!r} adds the rescaled task vectors, so "
            "aggregate would be ignored."
        )
    _check_drop_rate(fn, drop_rate)
    paths, base_leaves, models, treedef = flatten_models(fn, base, finetuned)
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence) or len(masks) != len(models):
        raise ValueError(f"{fn}: give one mask pytree per fine-tune ({len(models)} of them).")
    flats = []
    for k, mask in enumerate(masks):
        flat, mask_def = jax.tree.flatten(mask)
        if mask_def != treedef:
            raise ValueError(
                f"{fn}: masks[{k}] does not have the base's structure ({mask_def} vs {treedef})."
            )
        for path, m, b in zip(paths, flat, base_leaves, strict=True):
            if jnp.shape(m) != b.shape:
                raise ValueError(
                    f"{fn}: masks[{k}] at '{path}' has shape {jnp.shape(m)}; the parameter's is "
                    f"{b.shape}."
                )
        flats.append(flat)
    for k, flat in enumerate(flats):  # values after every shape: a mask of another model first
        for path, m in zip(paths, flat, strict=True):
            if isinstance(m, jax.core.Tracer) or jnp.result_type(m) == jnp.bool_:
                continue
            if not bool(jnp.all((jnp.asarray(m) == 0) | (jnp.asarray(m) == 1))):
                raise ValueError(
                    f"{fn}: masks[{k}] at '{path}' holds values other than 0 and 1; a keep mask "
                    "is boolean or 0/1 (every nonzero entry would be kept, not weighted)."
                )
    rescaled = [
        [_drop(m, d, drop_rate, rescale) for m, d in zip(flat, delta, strict=True)]
        for flat, delta in zip(flats, _deltas(base_leaves, models), strict=True)
    ]
    if merge == "ties":
        rescaled = _disjoint(rescaled, aggregate)
    return [jax.tree.unflatten(treedef, b) for b in rescaled]


def _drop(mask, delta, drop_rate, rescale: str):
    """One tensor's ``τ̃ = m ⊙ τ``, rescaled by ``1/(1 − p)`` or to ``τ``'s L1 norm."""
    kept = jnp.where(jnp.asarray(mask).astype(bool), delta, 0)
    if rescale == "expectation":
        return kept / (1 - jnp.asarray(drop_rate, delta.dtype))
    after = jnp.sum(jnp.abs(kept))
    return kept * jnp.where(after > 0, jnp.sum(jnp.abs(delta)) / jnp.where(after > 0, after, 1), 1)


def dare(
    base: PyTree,
    finetuned: Sequence[PyTree],
    key: ArrayLike,
    *,
    drop_rate: float | Float[ArrayLike, ""],
    scale: Scale = 1.0,
    merge: str = "task_arithmetic",
    aggregate: str = "mean",
    rescale: str = "expectation",
) -> PyTree:
    """DARE: drop each task-vector entry with probability ``p``, rescale by ``1/(1 − p)``, merge.

    ``θ = θ₀ + Σₖ λₖ Bₖ`` with ``Bₖ`` from :func:`dare_task_vectors` and masks from
    :func:`dare_masks` (``key``): the same key gives the same merge bit for bit.

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        key: a ``jax.random`` key.
        drop_rate: the drop probability ``p ∈ [0, 1)``.
        scale: ``λ``, as in :func:`task_arithmetic`.
        merge: ``"task_arithmetic"`` or ``"ties"`` (static).
        aggregate: ``"mean"`` or ``"sum"``, for ``merge="ties"`` (static).
        rescale: ``"expectation"`` (``1/(1 − p)``) or ``"l1"`` (each tensor's L1 norm kept, as
            mergekit does; see :func:`dare_task_vectors`).

    Returns:
        The merged parameters, with the base's structure and dtypes.

    References:
        Yu et al., "Language models are Super Mario: absorbing abilities from homologous models as
        a free lunch", ICML 2024.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> base, fts = {"w": jnp.zeros(4)}, [{"w": jnp.ones(4)}, {"w": -jnp.ones(4)}]
        >>> a = dare(base, fts, jax.random.key(1), drop_rate=0.5)
        >>> b = dare(base, fts, jax.random.key(1), drop_rate=0.5)
        >>> bool((a["w"] == b["w"]).all()), set(a["w"].tolist()) <= {-2.0, 0.0, 2.0}
        (True, True)
    """
    directions = dare_directions(
        "dare", base, finetuned, key, drop_rate=drop_rate, merge=merge, aggregate=aggregate,
        rescale=rescale,
    )  # fmt: skip
    paths, base_leaves, treedef = flatten_params("dare", base, "base")
    leaves = [jax.tree.leaves(d) for d in directions]
    return _combine("dare", paths, base_leaves, leaves, scale, treedef)


def dare_directions(fn: str, base, finetuned, key, **options) -> list:
    """:func:`dare_task_vectors` with the masks :func:`dare_masks` draws from ``key``."""
    _, _, models, _ = flatten_models(fn, base, finetuned)
    masks = dare_masks(key, base, len(models), drop_rate=options["drop_rate"])
    return dare_task_vectors(base, finetuned, masks, **options)
