"""Baselines inside the merge QP: RegMean, and TIES/DARE directions with QP-chosen coefficients.

TIES and DARE are ``θ₀ + λ Σₖ Bₖ`` for processed task vectors ``Bₖ`` (see
:func:`ties_task_vectors`, :func:`dare_task_vectors`). Keeping their directions but choosing the
coefficients by output matching is the QP with a :class:`Custom` basis::

    min_c  L(W̄₀ + Σₖ cₖ Bₖ) + ridge · ‖c − λ‖²_D          (one cₖ, or one per output unit)

``ridge = 0`` is the best merge the heuristic's directions allow, so it never captures less
residual energy than the heuristic itself (``c = λ`` is feasible); ``ridge = ∞`` returns the
heuristic exactly. RegMean is the full basis in the metric ``A_α = αA + (1 − α)Diag(A)``.

For whole models, :func:`ties_basis` and :func:`dare_basis` compute the ``Bₖ`` once over the
whole parameter tree and return per-layer factories ``basis(path) -> Custom`` and
``prior(path) -> λ`` for ``jaxmerge.merge``.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, PyTree

from .._flax.fold import path_of, to_pure
from ..core.bases import Custom
from ..core.qp import LayerSolution, solve_layer
from ..core.stats import LayerStats
from .common import Scale, check_scale_keys, layer_of, scale_at
from .dare import dare_directions
from .ties import ties_task_vectors

__all__ = [
    "BasisFactory",
    "regmean_layer",
    "ties_layer",
    "dare_layer",
    "ties_basis",
    "dare_basis",
]


class BasisFactory(NamedTuple):
    """Per-layer basis and prior for a whole-model merge (unpacks as ``basis, prior``).

    Attributes:
        basis: ``layer_path -> Custom``: the processed task vectors ``Bₖ`` at that layer (its
            parameter subtree, e.g. a ``{"kernel", "bias"}`` dict, shaped like the parameters).
        prior: ``layer_path -> λ``, shape ``(K,)``: the heuristic's own coefficients.

    Examples:
        See :func:`ties_basis`, which returns one.
    """

    basis: Callable[[str], Custom]
    prior: Callable[[str], Array]


# ---- single layers -------------------------------------------------------------------------


def regmean_layer(
    stats: LayerStats,
    base: Any,
    finetuned: Sequence[Any],
    *,
    alpha: float | Float[ArrayLike, ""],
    rcond: float | None = None,
    throw: bool = True,
) -> LayerSolution:
    """RegMean for one layer: ``W̄ = (Σₖ Gₖ^α)⁻¹ Σₖ Gₖ^α W̄ₖ`` with an exact bias.

    ``Gₖ = wₖ X̃ₖᵀX̃ₖ`` is task ``k``'s Gram matrix of bias-augmented inputs and
    ``G^α = αG + (1 − α)Diag(G)`` shrinks its off-diagonal entries. This is :func:`solve_layer`
    with the full basis and metric ``A_α``: ``A_α W̄ = P_α``. The two agree whenever each task's
    targets are its fine-tuned layer applied to the same inputs (``Yₖ = X̃ₖW̄ₖ``, the parallel
    algorithm); otherwise ``P`` holds the real targets. The task weights ``wₖ`` are the
    statistics' (``1/Nₖ`` by default; pass ``weights=[1.0] * K`` to :func:`layer_stats` for the
    paper's token sums).

    Args:
        stats: the layer's calibration statistics.
        base: the base layer (a kernel, a ``(kernel, bias)`` pair or a ``{"kernel", "bias"}``
            dict); only its shape and dtype matter.
        finetuned: the ``K`` fine-tuned layers, in task order.
        alpha: ``α ∈ [0, 1]``; 1 is the exact output-space solution, 0 an elementwise mean
            weighted by each task's input energy.
        rcond: relative eigenvalue cut-off of the solver.
        throw: raise ``SolveError`` instead of returning a non-finite merge.

    Returns:
        A :class:`LayerSolution` (energies measured in the true metric).

    References:
        Jin et al., "Dataless knowledge fusion by merging weights of language models", ICLR 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> x1, x2 = jnp.array([[1.0, 1.0]]), jnp.array([[1.0, -1.0]])
        >>> w1, w2 = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [1.0]])
        >>> stats = layer_stats([x1, x2], [x1 @ w1, x2 @ w2])
        >>> regmean_layer(stats, w1, [w1, w2], alpha=1.0).kernel.ravel().tolist()
        [0.0, 1.0]
        >>> regmean_layer(stats, w1, [w1, w2], alpha=0.0).kernel.ravel().tolist()
        [0.5, 0.5]
    """
    return solve_layer(stats, base, finetuned, basis="full", alpha=alpha, rcond=rcond, throw=throw)


def ties_layer(
    stats: LayerStats,
    base: Any,
    finetuned: Sequence[Any],
    *,
    density: float | int = 0.2,
    scale: float | ArrayLike | Sequence[float | int] = 1.0,
    trim: str = "tensor",
    aggregate: str = "mean",
    per_output: bool = False,
    ridge: float | Float[ArrayLike, ""] = 0.0,
    rcond: float | None = None,
    throw: bool = True,
) -> LayerSolution:
    """QP-reweighted TIES for one layer: TIES' directions, coefficients chosen by the QP.

    Solves ``min_c L(W̄₀ + Σₖ cₖ Bₖ) + ridge·‖c − λ‖²_D`` with ``Bₖ`` from
    :func:`ties_task_vectors` applied to the layer (``trim="model"`` ranks kernel and bias
    together) and ``λ = scale``. ``ridge=inf`` returns :func:`ties` of the layer exactly;
    ``ridge=0`` captures at least as much residual energy as it.

    Args:
        stats: the layer's calibration statistics.
        base: the base layer (kernel, ``(kernel, bias)`` or ``{"kernel", "bias"}``).
        finetuned: the ``K`` fine-tuned layers, in the same form.
        density, trim, aggregate: TIES' options (see :func:`ties_task_vectors`).
        scale: TIES' ``λ`` (a number or ``(K,)``): the prior of the ridge (with ``ridge=0``
            it has no effect).
        per_output: one coefficient per direction (``False``) or per direction and output unit.
        ridge: ``≥ 0``, pull toward ``λ`` (see :func:`solve_layer`).
        rcond, throw: as in :func:`solve_layer`.

    Returns:
        A :class:`LayerSolution`; ``coefficients`` are the ``cₖ``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> w0, w1, w2 = jnp.zeros((2, 1)), jnp.array([[2.0], [0.0]]), jnp.array([[0.0], [1.0]])
        >>> stats = layer_stats([x, x], [x @ w1, x @ w2])
        >>> sol = ties_layer(stats, w0, [w1, w2], density=0.5)
        >>> sol.coefficients.round(6).tolist(), sol.kernel.ravel().round(6).tolist()
        ([0.5, 0.5], [1.0, 0.5])
        >>> ties_layer(stats, w0, [w1, w2], density=0.5, ridge=float("inf")).kernel.ravel().tolist()
        [2.0, 1.0]
    """
    directions = ties_task_vectors(base, finetuned, density=density, trim=trim, aggregate=aggregate)
    return solve_layer(
        stats,
        base,
        finetuned,
        basis=Custom(directions, per_output=per_output),
        prior=scale,
        ridge=ridge,
        rcond=rcond,
        throw=throw,
    )


def dare_layer(
    stats: LayerStats,
    base: Any,
    finetuned: Sequence[Any],
    key: ArrayLike,
    *,
    drop_rate: float | Float[ArrayLike, ""],
    scale: float | ArrayLike | Sequence[float | int] = 1.0,
    merge: str = "task_arithmetic",
    aggregate: str = "mean",
    rescale: str = "expectation",
    per_output: bool = False,
    ridge: float | Float[ArrayLike, ""] = 0.0,
    rcond: float | None = None,
    throw: bool = True,
) -> LayerSolution:
    """QP-reweighted DARE for one layer: DARE's directions, coefficients chosen by the QP.

    As :func:`ties_layer` with ``Bₖ`` from :func:`dare_task_vectors` and masks from
    :func:`dare_masks` (``key``) drawn over the layer-like itself (so they differ from the masks
    the same key gives that layer inside a whole model; use :func:`dare_basis` for those).
    ``ridge=inf`` returns :func:`dare` of the layer exactly.

    Args:
        stats: the layer's calibration statistics.
        base: the base layer (kernel, ``(kernel, bias)`` or ``{"kernel", "bias"}``).
        finetuned: the ``K`` fine-tuned layers, in the same form.
        key: a ``jax.random`` key.
        drop_rate, merge, aggregate, rescale: DARE's options (see :func:`dare_task_vectors`).
        scale: DARE's ``λ`` (a number or ``(K,)``): the prior of the ridge (with ``ridge=0``
            it has no effect).
        per_output: one coefficient per direction (``False``) or per direction and output unit.
        ridge: ``≥ 0``, pull toward ``λ``.
        rcond, throw: as in :func:`solve_layer`.

    Returns:
        A :class:`LayerSolution`; ``coefficients`` are the ``cₖ``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> x = jnp.eye(3)
        >>> w0, w1 = jnp.zeros((3, 2)), jnp.ones((3, 2))
        >>> sol = dare_layer(layer_stats([x], [x @ w1]), w0, [w1], jax.random.key(0),
        ...                  drop_rate=0.5, ridge=float("inf"))
        >>> set(sol.kernel.ravel().tolist()) <= {0.0, 2.0}
        True
    """
    directions = dare_directions(
        "dare_layer", base, finetuned, key, drop_rate=drop_rate, merge=merge, aggregate=aggregate,
        rescale=rescale,
    )  # fmt: skip
    return solve_layer(
        stats,
        base,
        finetuned,
        basis=Custom(directions, per_output=per_output),
        prior=scale,
        ridge=ridge,
        rcond=rcond,
        throw=throw,
    )


# ---- whole models --------------------------------------------------------------------------


def _layer_paths(tree) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return sorted({layer_of(path_of(kp)) for kp, _ in flat})


def _subtree(fn: str, tree, path: str):
    """The subtree of ``tree`` at a layer path (a leading ``"params"`` key is skipped)."""
    node = tree
    if isinstance(node, Mapping) and "params" in node and path.split("/")[0] != "params":
        node = node["params"]
    for name in path.split("/") if path else []:
        if isinstance(node, Mapping) and name in node:
            node = node[name]
        elif isinstance(node, Mapping) and name.isdigit() and int(name) in node:
            node = node[int(name)]  # an NNX list's index in a pure dict
        elif isinstance(node, Sequence) and name.isdigit() and int(name) < len(node):
            node = node[int(name)]
        else:
            raise ValueError(
                f"{fn}: no layer at path '{path}'; the model's layer paths are "
                f"{_layer_paths(tree)[:8]}."
            )
    return node


def _factory(fn: str, directions, scale: Scale, per_output: bool) -> BasisFactory:
    directions = [to_pure(d) if isinstance(d, nnx.State) else d for d in directions]
    check_scale_keys(fn, scale, _layer_paths(directions[0]))

    def basis(path: str) -> Custom:
        return Custom([_subtree(fn, d, path) for d in directions], per_output=per_output)

    def prior(path: str):
        _subtree(fn, directions[0], path)
        return scale_at(fn, scale, path, len(directions))

    return BasisFactory(basis, prior)


def ties_basis(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    density: float | int = 0.2,
    scale: Scale = 1.0,
    trim: str = "tensor",
    aggregate: str = "mean",
    per_output: bool = False,
) -> BasisFactory:
    """QP-reweighted TIES for whole models: per-layer ``Custom`` bases and priors.

    The ``Bₖ`` are :func:`ties_task_vectors` of the whole model (so ``trim="model"`` ranks over
    every tensor), computed once; ``basis(path)`` returns the ``Bₖ`` at a layer path and
    ``prior(path)`` TIES' ``λ`` there. A merge with these, ``ridge=inf``, is :func:`ties`.

    Args:
        base: base parameters (a Flax-style nested dict; a leading ``"params"`` key is skipped).
        finetuned: the ``K`` fine-tuned parameter pytrees.
        density, trim, aggregate: TIES' options (see :func:`ties_task_vectors`).
        scale: ``λ``, as in :func:`task_arithmetic` (per-layer mappings and callables allowed;
            a mapping's keys must be layer paths of ``base``): the prior of the merge's ridge.
        per_output: one coefficient per direction, or per direction and output unit.

    Returns:
        A :class:`BasisFactory` ``(basis, prior)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"params": {"Dense_0": {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)}}}
        >>> ft = {"params": {"Dense_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}}
        >>> basis, prior = ties_basis(base, [ft, ft], density=1.0, scale=0.5)
        >>> basis("Dense_0"), prior("Dense_0").tolist()
        (Custom(<2 directions>, per_output=False), [0.5, 0.5])
    """
    directions = ties_task_vectors(base, finetuned, density=density, trim=trim, aggregate=aggregate)
    return _factory("ties_basis", directions, scale, per_output)


def dare_basis(
    base: PyTree,
    finetuned: Sequence[PyTree],
    key: ArrayLike,
    *,
    drop_rate: float | Float[ArrayLike, ""],
    scale: Scale = 1.0,
    merge: str = "task_arithmetic",
    aggregate: str = "mean",
    rescale: str = "expectation",
    per_output: bool = False,
) -> BasisFactory:
    """QP-reweighted DARE for whole models: per-layer ``Custom`` bases and priors.

    The ``Bₖ`` are :func:`dare_task_vectors` of the whole model with masks from
    :func:`dare_masks` (``key``), the same masks :func:`dare` draws; ``basis(path)`` returns the
    ``Bₖ`` at a layer path and ``prior(path)`` DARE's ``λ`` there. A merge with these,
    ``ridge=inf``, is :func:`dare` with the same key.

    Args:
        base: base parameters (a Flax-style nested dict; a leading ``"params"`` key is skipped).
        finetuned: the ``K`` fine-tuned parameter pytrees.
        key: a ``jax.random`` key.
        drop_rate, merge, aggregate, rescale: DARE's options (see :func:`dare_task_vectors`).
        scale: ``λ``, as in :func:`task_arithmetic`.
        per_output: one coefficient per direction, or per direction and output unit.

    Returns:
        A :class:`BasisFactory` ``(basis, prior)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> base = {"Dense_0": {"kernel": jnp.zeros((2, 1))}}
        >>> ft = {"Dense_0": {"kernel": jnp.ones((2, 1))}}
        >>> factory = dare_basis(base, [ft], jax.random.key(0), drop_rate=0.5)
        >>> factory.basis("Dense_0").directions[0]["kernel"].shape
        (2, 1)
    """
    directions = dare_directions(
        "dare_basis", base, finetuned, key, drop_rate=drop_rate, merge=merge, aggregate=aggregate,
        rescale=rescale,
    )  # fmt: skip
    return _factory("dare_basis", directions, scale, per_output)
