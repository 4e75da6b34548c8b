"""Fisher merging: a per-parameter average of fine-tunes weighted by their diagonal Fisher.

With the diagonal empirical Fisher of fine-tune ``k`` on its own task's data,
``Fₖ = (1/Nₖ) Σᵢ (∂ℓ(θₖ; zᵢ)/∂θ)²`` (one gradient per example ``zᵢ``, squared entrywise), the
merge is, entry by entry,

    θ = Σₖ wₖ F̃ₖ θₖ / Σₖ wₖ F̃ₖ,      F̃ₖ = Fₖ + δ,   δ = ε · max_{k, entries} Fₖ  (per tensor)

The floor ``δ`` makes the formula defined everywhere and scale free: where no model's Fisher
carries information (every ``Fₖ`` zero, or below ``ε`` times the tensor's largest entry) the merge
is the plain weighted mean ``Σₖ wₖθₖ / Σₖ wₖ``; elsewhere it changes the weights by at most a
relative ``ε``. A tensor whose Fisher is zero for every task (``max = 0``) gets the plain mean.
"""

import functools
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from jaxtyping import ArrayLike, Float, PyTree

from .common import check_weights, flatten_models, flatten_params, work_dtype

__all__ = ["empirical_fisher", "fisher_average", "fisher_merge"]


@functools.partial(jax.jit, static_argnums=0)
def _squared_gradients(loss_fn, params, batch):
    """``Σᵢ (∂ℓ(θ; zᵢ)/∂θ)²`` over the examples of one batch (per-example gradients by vmap)."""

    def one(example):
        return jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[None], example))

    grads = jax.vmap(one)(batch)
    return jax.tree.map(
        lambda g, p: jnp.sum(jnp.square(g.astype(work_dtype(p))), axis=0), grads, params
    )


def _batch_size(batch, index: int) -> int:
    sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"empirical_fisher: batch {index} must be a pytree of arrays sharing a leading "
            f"example axis; got leading sizes {sorted(sizes, key=str)}."
        )
    return sizes.pop()


def empirical_fisher(
    loss_fn: Callable[[PyTree, PyTree], ArrayLike],
    params: PyTree,
    batches: Iterable[PyTree],
) -> PyTree:
    """The diagonal empirical Fisher ``F = (1/N) Σᵢ (∂ℓ(θ; zᵢ)/∂θ)²`` over every example.

    Gradients are **per example** (``jax.vmap`` of ``jax.grad`` over the batch axis; the
    gradient of a batch's mean loss would be a different, smaller quantity), taken with the
    examples' own labels (the *empirical* Fisher, not the model-sampled one). The mean is over
    the ``N`` examples of all batches, whatever the batch sizes.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, the loss of a batch (a pytree of arrays
            with a leading example axis); it is called on batches of one example. Jitted once per
            batch shape.
        params: the parameters ``θ`` (for Fisher merging, fine-tune ``k``'s own).
        batches: an iterable of batches. Per-example gradients of a whole batch are held in
            memory at once (batch size × parameters): keep batches small for big models.

    Returns:
        ``F``, a pytree shaped like ``params`` in at least float32.

    Raises:
        ValueError: no examples, a batch without a common leading axis, or a loss that is not a
            scalar.
        TypeError: a parameter is not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> loss = lambda p, b: jnp.mean((b["x"] * p["w"] - b["y"]) ** 2)
        >>> batch = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([0.0, 0.0])}
        >>> float(empirical_fisher(loss, {"w": jnp.array(1.0)}, [batch])["w"])  # (4 + 64) / 2
        34.0
    """
    flatten_params("empirical_fisher", params, "params")
    total, count = None, 0
    for index, batch in enumerate(batches):
        size = _batch_size(batch, index)
        if size == 0:
            continue
        if total is None:
            single = jax.tree.map(lambda a: a[:1], batch)
            out = jax.eval_shape(loss_fn, params, single)
            if not hasattr(out, "shape") or out.shape != ():
                raise ValueError(
                    "empirical_fisher: loss_fn(params, batch) must return a scalar; got "
                    f"{getattr(out, 'shape', out)}."
                )
        part = _squared_gradients(loss_fn, params, batch)
        total = part if total is None else jax.tree.map(jnp.add, total, part)
        count += size
    if total is None:
        raise ValueError("empirical_fisher: batches hold no examples.")
    return jax.tree.map(lambda t: t / count, total)


def fisher_average(
    finetuned: Sequence[PyTree],
    fishers: Sequence[PyTree],
    *,
    weights: ArrayLike | Sequence[float | int] | None = None,
    epsilon: float | Float[ArrayLike, ""] = 1e-8,
) -> PyTree:
    """Fisher-weighted average ``θ = Σₖ wₖ F̃ₖ θₖ / Σₖ wₖ F̃ₖ`` (see the module docs for ``F̃``).

    Jittable (``epsilon`` and ``weights`` may be traced).

    Args:
        finetuned: the ``K`` fine-tuned parameter pytrees.
        fishers: their diagonal Fishers ``Fₖ ≥ 0``, shaped like the parameters.
        weights: nonnegative model weights ``wₖ`` (Matena & Raffel's ``λₖ``); default uniform.
        epsilon: the relative floor ``ε > 0``.

    Returns:
        The merged parameters, with the structure and dtypes of ``finetuned[0]``.

    Raises:
        ValueError: structures, shapes or the number of weights differ; weights are negative or
            not finite, or sum to zero; ``epsilon`` is not in ``(0, ∞)``; a Fisher holds a
            negative or non-finite entry.

    Examples:
        >>> import jax.numpy as jnp
        >>> fts = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 3.0])}]
        >>> fishers = [{"w": jnp.array([3.0, 0.0])}, {"w": jnp.array([1.0, 0.0])}]
        >>> fisher_average(fts, fishers)["w"].tolist()  # Fisher-weighted; no information: mean
        [1.5, 2.0]
    """
    fn = "fisher_average"
    if not isinstance(finetuned, Sequence) or not finetuned:
        raise ValueError(f"{fn}: finetuned must be a non-empty sequence of parameter pytrees.")
    paths, _, models, treedef = flatten_models(fn, finetuned[0], finetuned)
    if not isinstance(fishers, Sequence) or len(fishers) != len(models):
        raise ValueError(f"{fn}: give one Fisher pytree per fine-tune ({len(models)} of them).")
    _, _, fisher_leaves, _ = flatten_models(fn, finetuned[0], fishers)
    k = len(models)
    w = check_weights(fn, weights, k)
    if not isinstance(epsilon, jax.core.Tracer) and not 0 < float(epsilon) < float("inf"):
        raise ValueError(f"{fn}: epsilon must be positive and finite, got {epsilon}.")
    for j, leaves in enumerate(fisher_leaves):
        for path, f in zip(paths, leaves, strict=True):
            if not isinstance(f, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(f) & (f >= 0))):
                raise ValueError(
                    f"{fn}: fishers[{j}] at '{path}' has negative or non-finite entries; a "
                    "diagonal Fisher is a mean of squares (check the loss for NaN or Inf)."
                )
    out = []
    for i, leaf in enumerate(models[0]):
        dtype = work_dtype(leaf)
        f = jnp.stack([fl[i].astype(dtype) for fl in fisher_leaves])
        theta = jnp.stack([m[i].astype(dtype) for m in models])
        top = jnp.max(f)
        floor = jnp.where(top > 0, epsilon * top, 1.0)
        wf = w.astype(dtype).reshape((k,) + (1,) * leaf.ndim) * (f + floor)
        out.append((jnp.sum(wf * theta, axis=0) / jnp.sum(wf, axis=0)).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def fisher_merge(
    loss_fn: Callable[[PyTree, PyTree], ArrayLike],
    finetuned: Sequence[PyTree],
    batches_per_task: Sequence[Iterable[PyTree]],
    *,
    weights: ArrayLike | Sequence[float | int] | None = None,
    epsilon: float = 1e-8,
) -> PyTree:
    """Fisher merging (Matena & Raffel, 2022) with the diagonal empirical Fisher.

    ``Fₖ`` = :func:`empirical_fisher` of ``finetuned[k]`` on ``batches_per_task[k]`` (one
    per-example gradient pass per task), then :func:`fisher_average`:
    ``θ = Σₖ wₖ F̃ₖ θₖ / Σₖ wₖ F̃ₖ``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (see :func:`empirical_fisher`); one loss for
            every task (close over task-specific heads in the parameters, or merge those apart).
        finetuned: the ``K`` fine-tuned parameter pytrees.
        batches_per_task: ``K`` iterables of calibration batches, task ``k``'s for model ``k``.
        weights: nonnegative model weights ``wₖ``; default uniform.
        epsilon: relative Fisher floor ``ε`` (see the module docs).

    Returns:
        The merged parameters, with the structure and dtypes of ``finetuned[0]``.

    Raises:
        ValueError: the numbers of models and batch sets differ, or as the functions above.

    References:
        Matena & Raffel, "Merging models with Fisher-weighted averaging", NeurIPS 2022.

    Examples:
        >>> import jax.numpy as jnp
        >>> loss = lambda p, b: jnp.mean((b["x"] * p["w"] - b["y"]) ** 2)
        >>> fts = [{"w": jnp.array(1.0)}, {"w": jnp.array(2.0)}]
        >>> data = [[{"x": jnp.array([1.0]), "y": jnp.array([0.0])}],
        ...         [{"x": jnp.array([1.0]), "y": jnp.array([1.0])}]]
        >>> float(fisher_merge(loss, fts, data)["w"])  # F = (4, 4): the plain mean
        1.5
    """
    if not isinstance(finetuned, Sequence) or not finetuned:
        raise ValueError(
            "fisher_merge: finetuned must be a non-empty sequence of parameter pytrees."
        )
    flatten_models("fisher_merge", finetuned[0], finetuned)
    if not isinstance(batches_per_task, Sequence):
        raise ValueError("fisher_merge: batches_per_task must be a sequence, one entry per task.")
    if len(batches_per_task) != len(finetuned):
        raise ValueError(
            f"fisher_merge: {len(finetuned)} fine-tuned models but {len(batches_per_task)} sets "
            "of batches; give one set per task, in the same order."
        )
    fishers = [
        empirical_fisher(loss_fn, params, batches)
        for params, batches in zip(finetuned, batches_per_task, strict=True)
    ]
    return fisher_average(finetuned, fishers, weights=weights, epsilon=epsilon)
