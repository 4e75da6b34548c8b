"""Task vectors, soups and task arithmetic (see :mod:`jaxmerge.methods`)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, PyTree

from .common import Scale, _combine, _deltas, check_weights, flatten_models, work_dtype

__all__ = ["task_vectors", "soup", "task_arithmetic"]


def task_vectors(base: PyTree, finetuned: Sequence[PyTree]) -> list[PyTree]:
    """The task vectors ``τₖ = θₖ − θ₀``, one pytree per fine-tune.

    Args:
        base: base parameters ``θ₀`` (a pytree of floating arrays).
        finetuned: the ``K`` fine-tuned parameter pytrees, each shaped like ``base``.

    Returns:
        ``K`` pytrees with the base's structure, in at least float32.

    Raises:
        ValueError: a fine-tune's structure or a leaf's shape differs from the base.
        TypeError: a leaf is not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> tau = task_vectors({"w": jnp.array([1.0, 2.0])}, [{"w": jnp.array([1.5, 1.0])}])
        >>> tau[0]["w"].tolist()
        [0.5, -1.0]
    """
    _, base_leaves, models, treedef = flatten_models("task_vectors", base, finetuned)
    return [jax.tree.unflatten(treedef, d) for d in _deltas(base_leaves, models)]


def soup(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    weights: ArrayLike | Sequence[float | int] | None = None,
) -> PyTree:
    """Model soup: the (weighted) average ``θ = Σₖ ŵₖ θₖ``, ``ŵₖ = wₖ / Σⱼ wⱼ``.

    Equal to task arithmetic with ``λₖ = ŵₖ``: ``θ₀ + Σₖ ŵₖ τₖ``; the base only fixes the tree
    structure and the dtypes of the result. Uniform weights give the uniform soup
    (Wortsman et al., 2022).

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        weights: finite nonnegative ``wₖ`` (normalised to sum 1); default uniform.

    Returns:
        The merged parameters, with the base's structure and dtypes.

    Raises:
        ValueError: structures or shapes differ; weights have the wrong length, are negative or
            not finite, or sum to zero.

    References:
        Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
        accuracy without increasing inference time", ICML 2022.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros(2)}
        >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([3.0, 4.0])}]
        >>> soup(base, fts)["w"].tolist(), soup(base, fts, weights=[3, 1])["w"].tolist()
        ([2.0, 2.0], [1.5, 1.0])
    """
    paths, base_leaves, models, treedef = flatten_models("soup", base, finetuned)
    w = check_weights("soup", weights, len(models))
    w = w / jnp.sum(w)
    out = []
    for i, b in enumerate(base_leaves):
        dtype = work_dtype(b)
        out.append(sum(w[j].astype(dtype) * m[i].astype(dtype) for j, m in enumerate(models)))
    return jax.tree.unflatten(
        treedef, [o.astype(b.dtype) for o, b in zip(out, base_leaves, strict=True)]
    )


def task_arithmetic(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: Scale = 1.0,
) -> PyTree:
    """Task arithmetic: ``θ = θ₀ + Σₖ λₖ τₖ`` (Ilharco et al., 2023).

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        scale: ``λ``: one number for every task, one per task ``(K,)``, or per layer: a mapping
            from layer path (``"Dense_0"``) to a number or ``(K,)`` array, or a callable
            ``layer_path -> λ``. Leaves at the top of the tree have layer path ``""``.

    Returns:
        The merged parameters, with the base's structure and dtypes.

    Raises:
        ValueError: structures or shapes differ, or a scale has the wrong shape, is not finite,
            a layer has no scale or a per-layer mapping names no layer.

    References:
        Ilharco et al., "Editing models with task arithmetic", ICLR 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"a": {"kernel": jnp.zeros(2)}, "b": {"kernel": jnp.ones(1)}}
        >>> fts = [{"a": {"kernel": jnp.array([1.0, 2.0])}, "b": {"kernel": jnp.array([3.0])}}]
        >>> merged = task_arithmetic(base, fts, scale={"a": 0.5, "b": 2.0})
        >>> merged["a"]["kernel"].tolist(), merged["b"]["kernel"].tolist()
        ([0.5, 1.0], [5.0])
    """
    paths, base_leaves, models, treedef = flatten_models("task_arithmetic", base, finetuned)
    return _combine(
        "task_arithmetic", paths, base_leaves, _deltas(base_leaves, models), scale, treedef
    )


# ---- TIES -----------------------------------------------------------------------------------
