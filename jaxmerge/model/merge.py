r"""Whole Flax models: ``merge`` and its steps ``collect_stats`` and ``solve_stats``.

Every supported layer (see :mod:`jaxmerge._flax.capture`) is merged by output matching: for
layer ``l`` and task ``k`` the calibration gives input rows ``X̃ₖ`` and the fine-tuned model's
outputs ``Yₖ`` of that layer, and :func:`~jaxmerge.solve_layer` picks the merged ``W̄`` in the
chosen basis minimising ``Σₖ wₖ‖X̃ₖW̄ − Yₖ‖²`` (``wₖ = 1/Nₖ``: every task counts equally, padding
rows masked out). Layers that read the same input tensor (q/k/v, gate/up) share one
:class:`~jaxmerge.LayerStats`, their outputs concatenated; with the full basis they are solved
with one Cholesky factor and all their columns as right-hand sides.

Algorithms:

* ``"parallel"`` (RegMean style): ``X̃ₖ`` are the fine-tuned model ``k``'s own activations; one
  forward pass per task and batch accumulates every layer's input statistics, then every layer is
  solved independently. The targets are then the layer's own outputs ``Yₖ = X̃ₖW̄ₖ``, so their
  statistics follow from each task's Gram matrix, ``X̃ₖᵀYₖ = (X̃ₖᵀX̃ₖ)W̄ₖ``, without the products
  over the rows (embeddings excepted). Layers that every fine-tune leaves bit-identical to the
  base (frozen during fine-tuning) have zero residual targets, so every basis returns the base
  there: they keep the base's values without statistics or a solve (unless a ridge pulls them
  toward a prior), and their reports say ``UNCHANGED`` with ``E₀ = 0``. Fine-tuning the top
  blocks of a transformer therefore costs the forward passes plus the statistics of those
  blocks only.
* ``"sequential"``: ``X̃ₖ`` are the activations of the partially merged model on task ``k``'s
  data, ``Yₖ`` still the fine-tuned model's outputs of the layer, so each layer corrects the error
  left upstream. When every task's calibration is one batch (of matching shapes) the whole merge
  is one jitted function: one forward pass per fine-tuned model records the targets, then one
  forward pass of the merged model over all tasks' examples (concatenated along axis 0) solves
  each layer group at the moment it is reached and continues with the merged layer. This needs a
  model that treats the examples of a batch independently; it is checked on two examples of the
  first and the last task, and a model that mixes them (subtracting the batch mean, normalising
  over the batch) gets the per-group passes over each task's own batches instead. Embeddings
  read token ids, which do not depend on the merge, so they are solved beforehand from their own
  (cheap) statistics; a tied table, whose head is its last use, is solved from its lookups
  first and again from both uses once the rest of the model is merged on that table. With
  several batches the statistics of a layer need every batch before it
  can be solved, so the merge makes one pass over the calibration data per layer group (each pass
  jitted; XLA drops the work after the group collected); concatenate the calibration into one
  batch per task when it fits in memory.

A layer called several times in one forward pass (a shared module) pools the rows of all its
calls, except in the one-pass sequential merge, which solves it at its first call from that call's
rows. Every layer input must keep the examples on axis 0 (the sequential merge splits the rows of
its concatenated batch by task there), and a padding mask applies to a layer whose row axes start
with the mask's shape (token-level layers; pooled layers use every row).

Parameters that are not solved by output matching (anything outside a supported layer, layers
with unsupported configurations, and other linen collections) take a **fallback** rule chosen per
parameter path: ``"mean"`` (of the fine-tunes, the default), ``"base"``, or a number ``λ`` for
task arithmetic ``θ₀ + λ Σₖ (θₖ − θ₀)``. Integer parameters keep the base's value. Those of
them that a fine-tune changed are never unsolved silently: the report's
:attr:`~jaxmerge.MergeReport.unsolved` lists them with the reason (:mod:`.unsolved`), and
``merge`` warns about them (:class:`~jaxmerge.UnsolvedParametersWarning`) unless a ``fallback``
glob or callable names them; ``strict=True`` raises :class:`~jaxmerge.UnsolvedParametersError`
instead, right after the plan.

The full basis starts from the fallback value: of all minimisers, it returns the one closest (in
the Frobenius norm) to the fallback merge, ``W̄ = C + A⁺(P − AC)``. Input directions the calibration
never excites (dead units, unseen embedding rows) therefore keep the fallback value rather than
the base's, the same rule as every other parameter without data. Scalar, diagonal, custom and
low-rank bases are updates of the base. With one fine-tune (and no ridge) the merge is that
fine-tune, the exact optimum of every basis.

Options ``basis``, ``prior``, ``ridge`` and ``fallback`` each take one value, a mapping from path
patterns (:mod:`fnmatch` globs, first match wins) to values, or a callable ``path -> value``
(e.g. a basis factory). ``basis``, ``prior`` and ``ridge`` are looked up with the layer path,
``fallback`` with the parameter path (``"Dense_0/kernel"``); every glob must match a path of its
kind (a glob that matches nothing, or only paths of the other kind, is an
:class:`~jaxmerge.OptionPatternError` naming the pattern to use). A ``prior`` for the full and
low-rank bases is the layer's own parameter dict (``{"kernel": ..., "bias": ...}``); a
:class:`~jaxmerge.Custom` direction may be given in that form too.
"""

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..kinds.embed import is_tied
from ..kinds.tied import check_tied_options
from .collect import StatsCollector, _checked_ids, _collect, _peek
from .options import _check_layer_patterns, _check_options, _options
from .plan import _default_dtype, _plan
from .report import MergeReport
from .sequential import merge_sequential
from .solve import _finish, _keep_base, _score, _solve_all, _unchanged
from .trees import _Trees, check_host
from .unsolved import check_unsolved, find_unsolved, plan_reasons, warn_unsolved


def merge(
    model,
    base,
    finetuned: Sequence[Any],
    calibration: Sequence[Iterable[Any]],
    *,
    algorithm: str = "parallel",
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
    r"""Merge fine-tuned Flax models by output-space projection, layer by layer.

    For every supported layer (``Dense``/``Linear``, ``DenseGeneral``/``LinearGeneral``, ``Conv``,
    ``Embed``, ``LayerNorm``, ``RMSNorm``, in linen or NNX) the merged parameters minimise

        ``Σₖ (1/Nₖ) ‖X̃ₖ W̄ − Yₖ‖²``  over ``W̄`` in the span of ``basis``,

    with ``X̃ₖ`` the layer's inputs on task ``k``'s calibration rows (the fine-tuned model's own,
    ``algorithm="parallel"``, or the partially merged model's, ``"sequential"``) and ``Yₖ`` the
    fine-tuned model ``k``'s outputs of the layer. Other parameters follow ``fallback``. See the
    module docs for the algorithms, shared inputs and the options' forms.

    Args:
        model: a ``flax.linen.Module`` or an ``flax.nnx.Module`` (for NNX, its non-parameter state
            is used as is).
        base: the base parameters: a linen params dict or variables dict
            (``{"params": ..., ...}``), or an NNX ``State`` of ``nnx.Param``.
        finetuned: the ``K`` fine-tuned trees, each shaped and typed like ``base`` (leaves on
            other devices than the base's are moved to the base's sharding).
        calibration: ``K`` iterables of batches, ``calibration[k]`` for fine-tune ``k``; a batch
            is an array (positional input) or a dict of keyword arguments, which may hold a
            padding mask under ``mask_key`` (arrays on other devices than the base's are moved
            to the base's device, or replicated over its mesh).
        algorithm: ``"parallel"`` or ``"sequential"``.
        basis: ``"scalar"``, ``"diagonal"``, ``"full"``, :class:`~jaxmerge.LowRank` or
            :class:`~jaxmerge.Custom`, per layer path (one value, ``{glob: value}`` or a callable).
        prior: ridge prior per layer path (coefficients, or the layer's parameter dict for the
            full and low-rank bases).
        ridge: ``λ ≥ 0`` per layer path.
        alpha: RegMean's ``α``.
        fallback: rule for parameters not solved: ``"mean"``, ``"base"`` or ``λ`` (task
            arithmetic), per parameter path.
        heldout: optional ``K`` iterables of held-out batches, scored with the merged model
            (``rho_heldout`` in the report).
        mask_key: key of the padding mask in dict batches (``None``: no mask).
        call_kwargs: static keyword arguments of every forward call.
        rcond: relative eigenvalue cut-off of the solver.
        progress: show progress bars (per task and per layer).
        throw: raise :class:`~jaxmerge.SolveError` when a layer would not be finite.
        strict: raise :class:`~jaxmerge.UnsolvedParametersError` (before any statistics are
            collected) instead of warning when parameters a fine-tune changed are not solved
            by output matching (see Warns).

    Returns:
        ``(merged, report)``: ``merged`` has exactly the base's tree structure, dtypes and
        shardings (an NNX ``State`` for an NNX base); ``report`` is a
        :class:`~jaxmerge.MergeReport`, whose ``unsolved`` lists every parameter a fine-tune
        changed that took its fallback rule, with the reason.

    Warns:
        UnsolvedParametersWarning: once, when parameters a fine-tune changed (not
            bit-identical to the base) are not solved by output matching: a module class that
            is no registered layer kind (or a subclass of one: classes match exactly), a
            configuration or call its kind does not cover, a layer under a lifted transform
            (``nn.scan``, ``nn.vmap``), a parameter the forward pass does not use, another
            linen collection. The message names the first paths and reasons. Parameters whose
            rule ``fallback`` chooses by path (a glob naming them, or a callable) are listed in
            the report without a warning; ``strict=True`` makes the warning an error.

    Raises:
        ValueError, TypeError: mismatched trees, shapes or dtypes (naming the parameter path),
            missing or empty calibration, non-finite activations (naming the layer), token ids
            outside an embedding's vocabulary, bad options, an NNX model left in training mode,
            a call under ``jax.jit`` (``merge`` is a host-level driver; jit the ``update`` of
            :func:`~jaxmerge.stats_collector` instead), a ``prior`` where every ridge is 0 (it
            would have no effect), a ``mask_key`` other than ``"mask"`` that no first batch holds.
        OptionPatternError: a glob matching no path of the kind its option applies to (layer
            paths for ``basis``, ``prior``, ``ridge``; parameter paths for ``fallback``), or one
            never used because an earlier glob matches all its paths.
        SolveError: a layer's solve is not finite and ``throw=True``.
        UnsolvedParametersError: ``strict=True`` and parameters a fine-tune changed are not
            solved by output matching (see Warns); raised before any statistics are collected.

    Examples:
        Two fine-tunes of a one-layer model, each changing the weight of the input its own task
        uses; the merge keeps both changes:

        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Dense(1, use_bias=False)
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> base = {"kernel": jnp.zeros((2, 1))}
        >>> fts = [{"kernel": jnp.array([[1.0], [0.0]])}, {"kernel": jnp.array([[0.0], [2.0]])}]
        >>> merged, report = merge(model, base, fts, [[x[:1]], [x[1:]]], progress=False)
        >>> merged["kernel"].ravel().round(4).tolist(), report.layers[0].status
        ([1.0, 2.0], 'CHOLESKY')
    """
    return _run(model, base, finetuned, calibration, algorithm=algorithm, basis=basis,
                prior=prior, ridge=ridge, alpha=alpha, fallback=fallback, heldout=heldout,
                mask_key=mask_key, call_kwargs=call_kwargs, rcond=rcond, progress=progress,
                throw=throw, strict=strict)  # fmt: skip


def _run(model, base, finetuned, calibration, *, algorithm, basis, prior, ridge, alpha, fallback,
         heldout, mask_key, call_kwargs, rcond, progress, throw, strict=False, passes=None,
         caller="merge"):  # fmt: skip
    """:func:`merge`; ``passes``: ``None``, or (for the parallel algorithm) a function of the
    plan giving lists of group keys, the groups collected and solved together in one pass over
    the data (:func:`~jaxmerge.merge_in_groups`). Called by the public function ``caller``
    (whose caller its warning names)."""
    started = time.perf_counter()
    check_host(base, finetuned, alpha, ridge)
    if algorithm not in ("parallel", "sequential"):
        raise ValueError(f"merge: algorithm must be 'parallel' or 'sequential', got {algorithm!r}.")
    _check_options(basis=basis, prior=prior, ridge=ridge, fallback=fallback, alpha=alpha,
                   rcond=rcond)  # fmt: skip
    trees = _Trees(base, finetuned, fallback)
    k_tasks = len(trees.ft_flats)
    like = next(iter(trees.base_flat.values()), None)
    iters, first = _peek(calibration, k_tasks, mask_key=mask_key, like=like)
    plan = _plan(model, call_kwargs, trees.base, first, mask_key)
    trees.check_patterns(basis=basis, prior=prior, ridge=ridge)
    _check_layer_patterns(plan.specs, basis=basis, prior=prior, ridge=ridge)
    options = _options(plan.specs, basis, prior, ridge, alpha, rcond)
    for path, spec in plan.specs.items():  # before any work
        if is_tied(spec):
            check_tied_options(spec, options[path])
    unsolved = find_unsolved(trees, plan.specs.values(), plan_reasons(plan, trees))
    check_unsolved(unsolved, trees, strict=strict, caller=caller)
    iters = _checked_ids(plan, iters)
    dtype = _default_dtype()

    def batches(data, what):
        """Fresh checked iterators over ``data`` (the first pass reuses the peeked ones)."""
        nonlocal iters
        if what == "calibration" and iters is not None:
            out, iters = iters, None
            return out
        fresh, _ = _peek(data, k_tasks, mask_key=mask_key, what=what, like=like)
        return _checked_ids(plan, fresh, what)

    def collect_iters(task_batches, *, groups, tree_in, label):
        collector = StatsCollector(plan, tuple(groups), k_tasks, dtype, tree_in)
        return _collect(collector, trees.finetuned, task_batches, progress=progress, label=label)

    def collect(data, what, *, groups, tree_in):
        label = "collecting statistics" if what == "calibration" else "held-out"
        return collect_iters(batches(data, what), groups=groups, tree_in=tree_in, label=label)

    merged_flat = dict(trees.centre)
    specs = list(plan.specs.values())
    scored = {}
    if algorithm == "parallel":
        keys = [[plan.key(g) for g in plan.groups]] if passes is None else passes(plan)
        reports = []
        skip = _unchanged(trees, plan.groups, plan.specs, options)
        for wanted in keys:
            groups = [g for g in plan.groups if plan.key(g) in wanted and g not in skip]
            if not groups:
                continue
            stats = collect(calibration, "calibration", groups=groups, tree_in=None)
            reports += _solve_all(stats, trees, options, throw=throw, progress=progress,
                                  merged_flat=merged_flat)  # fmt: skip
            del stats
            if heldout is not None:  # scored now: a pass's layers are final
                held = collect(heldout, "heldout", groups=groups, tree_in=None)
                scored.update(_score(held, trees, merged_flat))
        reports += _keep_base(skip, plan.specs, trees, options, heldout is not None, merged_flat)
    else:
        reports = merge_sequential(plan, trees, options, batches(calibration, "calibration"),
                                   collect_iters, merged_flat, dtype, throw=throw,
                                   progress=progress)  # fmt: skip
        if heldout is not None:
            held = collect(heldout, "heldout", groups=plan.groups, tree_in=trees.tree(merged_flat))
            scored = _score(held, trees, merged_flat)
    order = {p: i for i, p in enumerate(plan.specs)}
    reports.sort(key=lambda r: order[r.path])
    merged, report = _finish(trees, merged_flat, reports, specs, algorithm, started,
                             scored if heldout is not None else None, unsolved)  # fmt: skip
    warn_unsolved(unsolved, trees, caller=caller)
    return merged, report
