"""Solving layer groups (through their kinds), keeping unchanged layers, assembling the report;
``solve_stats``."""

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import with_context
from ..core.bases import Custom
from ..core.psd import SolveStatus
from ..core.qp import LayerSolution, SolveError, solve_layer
from ..kinds import kind_of
from .collect import GroupStats, _progress, member_stats
from .options import _basis_name, _Options, _options
from .plan import _layer_params, shared_program, write_params
from .report import LayerReport, MergeReport
from .trees import _Trees
from .unsolved import check_unsolved, find_unsolved, stats_reasons, warn_unsolved

# ---- solving ------------------------------------------------------------------------------------


def _solve_group(group: GroupStats, base_flat, ft_flats, centre_flat, options, *, jit=False):
    """``{path: (merged parameter dict, LayerSolution)}`` (traceable except for embeddings).
    ``jit``: one compiled program per group structure (:func:`_structure`), shared by every
    group of the same kinds, shapes and options whatever its paths (the solve's own operations
    then compile once instead of one small program each); options holding arrays (a prior, a
    custom basis) are solved eagerly. A single fine-tune without a ridge is the merge."""
    specs, stats = group.layers, group.stats
    bases = [_layer_params(base_flat, s) for s in specs]
    fts = [[_layer_params(f, s) for f in ft_flats] for s in specs]
    centres = [_layer_params(centre_flat, s) for s in specs]
    opts = tuple(options[s.path] for s in specs)
    try:
        kind = kind_of(specs[0].kind)
        if len(ft_flats) == 1 and all(o.ridge == 0 for o in opts):
            return {s.path: _single(s, member_stats(stats, specs, i), bases[i], fts[i][0])
                    for i, s in enumerate(specs)}  # fmt: skip
        if not kind.traceable:  # reads its statistics' values (e.g. the seen tokens): eager
            return {specs[0].path: kind.solve(specs[0], stats, bases[0], fts[0], centres[0],
                                              opts[0])}  # fmt: skip
        together = _together(specs, opts, len(ft_flats))
        if jit and all(o.prior is None and not isinstance(o.basis, Custom) for o in opts):
            static, knobs = _structure(specs, opts)
            solved = _solve_layers_jit(static, together, knobs, stats, bases, fts, centres)
        else:
            solved = _solve_layers(specs, opts, together, stats, bases, fts, centres)
        return {s.path: r for s, r in zip(specs, solved, strict=True)}
    except (TypeError, ValueError) as error:
        raise with_context(error, f"merge: layer {group.key!r}") from error


def _single(spec, stats, base, finetuned):
    """The one fine-tune as the merge of a layer, with its energies."""
    e0, loss, rho = kind_of(spec.kind).energy(spec, stats, base, finetuned)
    nan = jnp.array(jnp.nan, jnp.result_type(e0))
    return dict(finetuned), LayerSolution(None, None, None, e0, loss, rho,
                                          jnp.int32(SolveStatus.CHOLESKY), nan, None)  # fmt: skip


def _together(specs, opts, num_models) -> bool:
    """Whether a shared-input group is solved as one system (every member's columns as
    right-hand sides of one factorisation)."""
    return (
        len(specs) > 1
        and num_models > 1
        and all(o.basis == "full" and o.prior is None for o in opts)
        and len({(o.ridge, o.alpha, o.rcond, o.jitter) for o in opts}) == 1
        and len({s.bias is None for s in specs}) == 1
    )


def _solve_layers(specs, opts, together, stats, bases, fts, centres):
    """``[(merged parameter dict, LayerSolution)]`` of a non-embedding group, in member order."""
    out = []
    if together:  # one factorisation, every member's columns as right-hand sides

        def cat(layers):
            kernel = jnp.concatenate([k for k, _ in layers], axis=1)
            bias = None if layers[0][1] is None else jnp.concatenate([b for _, b in layers])
            return kernel, bias

        def layers(subs):
            return [kind_of(s.kind).to_matrix(s, p) for s, p in zip(specs, subs, strict=True)]

        per_task = [layers([fts[i][k] for i in range(len(specs))]) for k in range(len(fts[0]))]
        o = opts[0]
        sol = solve_layer(stats, cat(layers(centres)), [cat(t) for t in per_task],
                          basis="full", ridge=o.ridge, alpha=o.alpha, rcond=o.rcond,
                          jitter=o.jitter, throw=False)  # fmt: skip
        start = 0
        for i, spec in enumerate(specs):
            kind = kind_of(spec.kind)
            cols = slice(start, start + spec.n_out)
            start += spec.n_out
            merged = (sol.kernel[:, cols], None if sol.bias is None else sol.bias[cols])
            b0 = kind.to_matrix(spec, bases[i])
            e0, loss, rho = kind.matrix_energy(member_stats(stats, specs, i), b0, merged)
            params = kind.from_matrix(spec, *merged, bases[i])
            out.append((params, LayerSolution(*merged, sol.coefficients[:, cols], e0, loss, rho,
                                              sol.status, sol.condition, None)))  # fmt: skip
        return out
    for i, spec in enumerate(specs):
        st = member_stats(stats, specs, i)
        out.append(kind_of(spec.kind).solve(spec, st, bases[i], fts[i], centres[i], opts[i]))
    return out


def _structure(specs, opts):
    """A group's solve split into what its compiled program is specialised on, ``static``
    (anonymous member specs; per member the basis, ``rcond``, ``jitter`` and whether the ridge
    is zero), and ``knobs``, what it takes as arguments (per member the ridge, ``α``, the
    prior and a custom basis' directions): one program serves every group with the same
    ``static`` and argument shapes. :func:`_from_structure` inverts it."""
    # where a layer is (its path, scope, slice of a stacked leaf) changes nothing in its solve
    anonymous = tuple(dataclasses.replace(s, path="", scope=None, slices=()) for s in specs)
    per_member, knobs = [], []
    for o in opts:
        custom = isinstance(o.basis, Custom)
        basis = ("custom", bool(o.basis.per_output)) if custom else o.basis
        per_member.append((basis, o.rcond, float(o.jitter), o.ridge == 0))
        knobs.append((o.ridge, o.alpha, o.prior, list(o.basis.directions) if custom else None))
    return (anonymous, tuple(per_member)), knobs


def _from_structure(static, knobs):
    """The member specs and options of a group from :func:`_structure`'s parts."""
    anonymous, per_member = static
    opts = []
    for (basis, rcond, jitter, zero), (ridge, alpha, prior, dirs) in zip(per_member, knobs,
                                                                         strict=True):  # fmt: skip
        if dirs is not None:
            basis = Custom(dirs, per_output=basis[1])
        opts.append(_Options(basis, prior, 0.0 if zero else ridge, alpha, rcond, jitter))
    return anonymous, tuple(opts)


def _solve_structured(static, together, knobs, stats, bases, fts, centres):
    """:func:`_solve_layers` of a group given as :func:`_structure`'s parts (traceable)."""
    specs, opts = _from_structure(static, knobs)
    return _solve_layers(specs, opts, together, stats, bases, fts, centres)


@shared_program
@functools.partial(jax.jit, static_argnums=(0, 1))
def _solve_layers_jit(static, together, knobs, stats, bases, fts, centres):
    """:func:`_solve_structured`, compiled; the merge's own use keeps only what it reports
    (the coefficients and spectra are dropped, so they are not computed for it)."""
    solved = _solve_structured(static, together, knobs, stats, bases, fts, centres)
    return [(p, sol._replace(coefficients=None, spectrum=None)) for p, sol in solved]


def _metrics(sol):
    """``(E₀, L, ρ, status, condition)`` of a :class:`~jaxmerge.LayerSolution`."""
    return (sol.energy_base, sol.energy_merged, sol.energy_fraction, sol.status, sol.condition)


def _layer_report(spec, opt, metrics, seconds, group):
    e0, loss, rho, status, cond = (np.asarray(m).item() for m in metrics)
    return LayerReport(
        path=spec.path,
        kind=spec.kind,
        basis=_basis_name(opt.basis),
        energy_base=float(e0),
        energy_merged=float(loss),
        rho=float(rho),
        condition=float(cond),
        status=SolveStatus(int(status)).name,
        seconds=seconds,
        shared_input=tuple(p for p in group if p != spec.path),
        form=spec.form,
    )


def _check_solved(path, sol, params, throw):
    status = int(np.asarray(sol.status))
    finite = all(bool(jnp.all(jnp.isfinite(v))) for v in params.values())
    if throw and (status == SolveStatus.NONFINITE or not finite):
        raise SolveError(
            f"merge: layer {path!r} would not be finite: its statistics (activations of the "
            "calibration data) or parameters hold NaN or Inf."
        )


def _unchanged(trees: _Trees, groups, specs, options) -> set[tuple[str, ...]]:
    """Groups (tuples of layer paths) that every fine-tune leaves bit-identical to the base, with
    no prior to pull toward: every basis returns the base there (the residual targets are zero),
    so the parallel merge neither collects their statistics nor solves them."""
    return {
        g
        for g in groups
        if all(
            (options[p].prior is None or options[p].ridge == 0)
            and all(specs[p].leaf(n) in trees.unchanged for n in specs[p].param_names)
            for p in g
        )
    }


def _keep_base(groups, specs, trees: _Trees, options, heldout: bool, merged_flat):
    """Leave ``groups`` at the base's values (written to ``merged_flat``); their reports say
    ``E₀ = L* = 0``, ``ρ = 1``, status ``UNCHANGED``."""
    for p in (p for g in groups for p in g):
        write_params(merged_flat, specs[p], _layer_params(trees.base_flat, specs[p]),
                     trees.centre)  # fmt: skip
    return [
        dataclasses.replace(
            _layer_report(specs[p], options[p], (0.0, 0.0, 1.0, 0, math.nan), 0.0, g),
            status="UNCHANGED",
            energy_base_heldout=0.0 if heldout else None,
            rho_heldout=1.0 if heldout else None,
            energy_merged_heldout=0.0 if heldout else None,
        )
        for g in groups
        for p in g
    ]


def _solve_all(stats, trees: _Trees, options, *, throw, progress, merged_flat):
    """Solve every group eagerly (parallel); returns layer reports, writes ``merged_flat``."""
    reports = []
    with _progress(progress) as bar:
        job = bar.add_task("solving layers", total=len(stats))
        for group in stats.values():
            start = time.perf_counter()
            result = _solve_group(
                group, trees.base_flat, trees.ft_flats, trees.centre, options, jit=True
            )
            jax.block_until_ready(result)
            seconds = time.perf_counter() - start
            paths = [s.path for s in group.layers]
            for spec in group.layers:
                params, sol = result[spec.path]
                _check_solved(spec.path, sol, params, throw)
                write_params(merged_flat, spec, params, trees.centre)
                reports.append(
                    _layer_report(spec, options[spec.path], _metrics(sol), seconds, paths)
                )
            bar.advance(job)
    return reports


def _score(heldout, trees: _Trees, merged_flat):
    """``{path: (E₀, L, ρ)}`` of the merged layers of every group of ``heldout`` statistics."""
    scored = {}
    for group in heldout.values():
        for i, spec in enumerate(group.layers):
            b0 = _layer_params(trees.base_flat, spec)
            b1 = _layer_params(merged_flat, spec)
            st = member_stats(group.stats, group.layers, i)
            e0, loss, rho = kind_of(spec.kind).energy(spec, st, b0, b1)
            scored[spec.path] = (float(e0), float(loss), float(rho))
    return scored


def _finish(trees, merged_flat, reports, solved_paths, algorithm, started, scored, unsolved):
    """The merged tree and its report; ``scored``: ``None``, or the held-out metrics
    (:func:`_score`) added to the reports; ``unsolved``: the report's
    :attr:`~jaxmerge.MergeReport.unsolved` (:func:`~jaxmerge.model.unsolved.find_unsolved`)."""
    solved_leaves = set()
    for spec in solved_paths:
        solved_leaves.update(spec.leaf(n) for n in spec.param_names)
    fallbacks = {p: r for p, r in trees.rules.items() if p not in solved_leaves}
    if scored is not None:
        reports = [
            dataclasses.replace(
                r,
                energy_base_heldout=scored[r.path][0],
                energy_merged_heldout=scored[r.path][1],
                rho_heldout=scored[r.path][2],
            )
            if r.path in scored
            else r
            for r in reports
        ]
    seconds = time.perf_counter() - started
    report = MergeReport(algorithm, len(trees.ft_flats), tuple(reports), fallbacks, seconds,
                         dict(unsolved))  # fmt: skip
    return trees.fold(merged_flat), report


def _check_fits(spec, base_flat) -> None:
    """Raise unless the base's parameters of ``spec`` are a ``(n_in, n_out)`` layer."""
    params = _layer_params(base_flat, spec)
    shapes = {name: tuple(np.shape(a)) for name, a in params.items()}
    kind = kind_of(spec.kind)
    want_kernel, want_bias = kind.matrix_shapes(spec)
    try:
        kernel, bias = jax.eval_shape(lambda p: kind.to_matrix(spec, p), params)
        fits = kernel.shape == want_kernel and (bias is None or bias.shape == want_bias)
    except (TypeError, ValueError):  # e.g. a reshape of another size
        fits = False
    if not fits:
        raise ValueError(
            f"solve_stats: the statistics of layer {spec.path!r} are for a {spec.n_in} × "
            f"{spec.n_out} kernel {want_kernel}, but the base's parameters there "
            f"have shapes {shapes}: statistics of another model?"
        )


def solve_stats(
    stats: Any,  # Mapping[str, GroupStats] | ModelStats
    base,
    finetuned: Sequence[Any],
    *,
    basis: Any = "full",
    prior: Any = None,
    ridge: Any = 0.0,
    alpha: float = 1.0,
    fallback: Any = "mean",
    rcond: float | None = None,
    heldout: Mapping[str, GroupStats] | None = None,
    progress: bool = True,
    throw: bool = True,
    check_source: bool = True,
    strict: bool = False,
) -> tuple[Any, MergeReport]:
    """Merge a model from collected statistics: solve every group, fall back elsewhere, fold.

    Each group is solved with :func:`~jaxmerge.solve_layer` (see the module docs for the full
    basis' starting point, shared inputs, the fallback rules and the layers no fine-tune changed,
    which are not solved); the merged tree has exactly the base's structure, dtypes and
    shardings.

    Args:
        stats: ``{group key: GroupStats}`` from :func:`collect_stats` (possibly combined over
            devices, hosts or runs), or a :class:`~jaxmerge.ModelStats` (per-task sums, e.g.
            loaded with :func:`~jaxmerge.load_model_stats`), whose recorded source is checked.
        base: the base parameter tree (linen params or variables, or an NNX ``State``).
        finetuned: the ``K`` fine-tuned trees, in the statistics' task order.
        basis, prior, ridge: options of :func:`~jaxmerge.solve_layer`, each one value, a
            ``{glob: value}`` mapping or a callable ``layer path -> value``.
        alpha: RegMean's ``α``.
        fallback: ``"mean"``, ``"base"`` or a number ``λ`` (task arithmetic) for parameters not
            solved; one value, a mapping or a callable of the parameter path.
        rcond: relative eigenvalue cut-off of the solver.
        heldout: statistics of held-out calibration data to score the merge on.
        progress: show a progress bar.
        throw: raise :class:`~jaxmerge.SolveError` when a layer would not be finite.
        check_source: with a :class:`~jaxmerge.ModelStats`, raise unless ``finetuned`` are the
            trees its statistics were computed from, in its task order
            (:meth:`~jaxmerge.ModelStats.check_source`). A dict from :func:`collect_stats`
            records no source and is not checked.
        strict: raise :class:`~jaxmerge.UnsolvedParametersError` instead of warning when
            parameters a fine-tune changed are in no layer of the statistics (as in
            :func:`~jaxmerge.merge`).

    Returns:
        ``(merged tree, MergeReport)``; the report's ``unsolved`` lists the parameters a
        fine-tune changed that no layer of the statistics holds.

    Warns:
        UnsolvedParametersWarning: such parameters exist (and ``strict`` is false), except
            those whose fallback rule ``fallback`` chooses by path.

    Raises:
        ValueError: statistics of another model (layers missing from the base), of another
            number of tasks, or (``check_source``) of other fine-tuned trees; a ``prior`` where
            every ridge is 0.
        OptionPatternError: a glob matching no path of its kind, or one never used because an
            earlier glob matches all its paths.
        UnsolvedParametersError: ``strict=True`` and parameters the fine-tunes changed are in
            no layer of the statistics (raised before any solve).

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> from jaxmerge import collect_stats
        >>> model = nn.Dense(1, use_bias=False)
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> base = {"kernel": jnp.zeros((2, 1))}
        >>> fts = [{"kernel": jnp.array([[1.0], [0.0]])}, {"kernel": jnp.array([[0.0], [2.0]])}]
        >>> stats = collect_stats(model, fts, [[x[:1]], [x[1:]]], progress=False)
        >>> merged, report = solve_stats(stats, base, fts, progress=False)
        >>> merged["kernel"].ravel().round(4).tolist(), round(report.rho, 4)
        ([1.0, 2.0], 1.0)
    """
    started = time.perf_counter()
    from ..io.model_stats import ModelStats  # it builds on this package

    if isinstance(stats, ModelStats):
        if check_source:
            stats.check_source(finetuned)
        stats = stats.normalized()
    trees = _Trees(base, finetuned, fallback)
    specs = [s for g in stats.values() for s in g.layers]
    for key, group in stats.items():
        tasks = group.stats.count.shape[-1]
        if tasks != len(finetuned):
            raise ValueError(
                f"solve_stats: the statistics of {key!r} hold {tasks} tasks but "
                f"{len(finetuned)} fine-tuned trees were given; give one per task, in order."
            )
        for spec in group.layers:
            for name in spec.param_names:
                if spec.leaf(name) not in trees.base_flat:
                    raise ValueError(
                        f"solve_stats: the statistics hold layer {spec.path!r}, which is not in "
                        f"the base parameters (no {spec.leaf(name)!r}): statistics of "
                        "another model?"
                    )
            _check_fits(spec, trees.base_flat)
    trees.check_patterns(basis=basis, prior=prior, ridge=ridge)
    options = _options([s.path for s in specs], basis, prior, ridge, alpha, rcond)
    unsolved = find_unsolved(trees, specs, stats_reasons(trees))
    check_unsolved(unsolved, trees, strict=strict, caller="solve_stats")
    by_path = {s.path: s for s in specs}
    paths = {key: tuple(s.path for s in g.layers) for key, g in stats.items()}
    skip = _unchanged(trees, paths.values(), by_path, options)
    merged_flat = dict(trees.centre)
    reports = _solve_all({k: g for k, g in stats.items() if paths[k] not in skip}, trees, options,
                         throw=throw, progress=progress, merged_flat=merged_flat)  # fmt: skip
    reports += _keep_base(skip, by_path, trees, options, heldout is not None, merged_flat)
    order = {s.path: i for i, s in enumerate(specs)}
    reports.sort(key=lambda r: order[r.path])
    scored = None if heldout is None else _score(heldout, trees, merged_flat)
    merged, report = _finish(trees, merged_flat, reports, specs, "parallel", started, scored,
                             unsolved)  # fmt: skip
    warn_unsolved(unsolved, trees, caller="solve_stats")
    return merged, report
