"""The sequential algorithm: each layer solved on the partially merged model's activations (see
:mod:`jaxmerge.model.merge`).

The one-pass path runs every task's examples through the merged model as one batch, which gives
each task's activations only when the model treats the examples of a batch independently; a model
that mixes them (subtracts the batch mean, normalises over the batch) would see the other tasks'
examples. That is checked on a few examples before the path is taken (:func:`_rows_independent`);
a model that fails gets the per-group passes over each task's own batches, the answer of either
path for a model whose examples are independent."""

import jax
import jax.numpy as jnp
import numpy as np

from ..kinds import kind_of
from ..kinds.embed import is_tied
from .collect import GroupStats, _progress
from .plan import _layer_params, row_mask, write_params
from .solve import _check_solved, _layer_report, _metrics, _solve_all, _solve_group

# ---- sequential ---------------------------------------------------------------------------------


def _lead(batch) -> int:
    return int(jax.tree.leaves(batch)[0].shape[0])


def _concatenable(batches) -> bool:
    structs = [jax.tree.structure(b) for b in batches]
    if any(s != structs[0] for s in structs):
        return False
    leaves = [jax.tree.leaves(b) for b in batches]
    return all(
        len({(np.shape(x)[1:], jnp.result_type(x)) for x in group}) == 1 and np.ndim(group[0]) > 0
        for group in zip(*leaves, strict=True)
    )


def _same_rows(x, lead, apart):
    """Whether a layer's input rows ``x`` (leading shape ``lead``) of a joined batch equal, to
    ``√ε`` of their size, its rows ``apart`` (``(x, lead)`` per part) of the parts alone."""
    sizes = [lead_k[0] if lead_k else None for _, lead_k in apart]
    if not lead or None in sizes or lead[0] != sum(sizes):
        return jnp.array(False)  # the examples are not on axis 0
    ref = jnp.concatenate([xk.reshape(n, -1) for (xk, _), n in zip(apart, sizes, strict=True)])
    eps = jnp.finfo(x.dtype).eps if jnp.issubdtype(x.dtype, jnp.inexact) else 0.0
    err = jnp.max(jnp.abs(x.reshape(ref.shape) - ref))
    return err <= float(np.sqrt(eps)) * jnp.max(jnp.abs(ref))


def _rows_independent(plan, tree, batches) -> bool:
    """Whether the model treats the examples of a batch independently, as the one-pass
    sequential merge assumes when it runs all tasks' examples as one batch: checked on up to two
    examples of the first and of the last task, whose inputs to every supported layer must be the
    same (to ``√ε`` of their size) in one batch as in two (a model that subtracts the batch mean,
    or mixes examples otherwise, fails)."""
    if len(batches) < 2:
        return True
    parts = [jax.tree.map(lambda a: a[:2], b) for b in (batches[0], batches[-1])]

    def make():
        solvable = set(plan.specs)

        def check(tree, parts):
            apart = [plan.record(tree, p, solvable) for p in parts]
            joined = plan.record(tree, jax.tree.map(lambda *a: jnp.concatenate(a), *parts),
                                 solvable)  # fmt: skip
            ok = [
                _same_rows(x, lead, [rec[path][i][:2] for rec in apart])
                for path, calls in joined.items()
                for i, (x, lead, _) in enumerate(calls)
            ]
            return jnp.all(jnp.stack([jnp.array(True), *ok]))

        return check

    return bool(plan.program(("rows independent",), make)(tree, parts))


def _sequential_pass(plan, options, trees, batches, embed_params, dtype):
    """The one-batch sequential merge, run as one jitted function (see the module docs).

    The compiled function is kept on the plan (:meth:`~jaxmerge.model.plan._Plan.program`) for
    the next merge with the same options, tree structure, number of tasks, dtype and batch
    shapes (options holding arrays, such as priors, are not hashable and compile afresh).
    """
    k_tasks = len(trees.ft_flats)
    key = ("sequential", k_tasks, jnp.dtype(dtype), trees.treedef, tuple(trees.base_flat),
           tuple(options.items()))  # fmt: skip

    def make():
        return _sequential_fn(plan, options, trees.treedef, tuple(trees.base_flat), dtype)

    try:
        hash(key)
        fn = plan.program(key, make)
    except TypeError:
        fn = jax.jit(make())
    return fn(trees.base_flat, trees.ft_flats, trees.centre, embed_params, batches)


def _sequential_fn(plan, options, treedef, paths, dtype):
    """The traceable sequential pass; it closes over no parameter values."""
    solvable = set(plan.specs)

    def tree(flat):
        return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])

    def run(base_flat, ft_flats, centre_flat, embed_params, batches):
        k_tasks = len(ft_flats)
        targets = [
            plan.record(tree(f), b, solvable) for f, b in zip(ft_flats, batches, strict=True)
        ]
        sizes = [_lead(b) for b in batches]
        masks = [plan.mask(b) for b in batches]
        xcat = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *batches)
        solved = dict(embed_params)
        metrics = {}

        def hook(call):
            path = call.path
            if path not in plan.specs:
                return call.default()
            if path not in solved:
                group = plan.group_of[path]
                specs = plan.group_specs(group)
                x, lead = call.rows()
                if lead[:1] != (sum(sizes),):
                    raise ValueError(
                        f"merge: layer {path!r} receives rows {lead}; the sequential merge needs "
                        "the examples on axis 0 of every layer input."
                    )
                kind = kind_of(specs[0].kind)
                stats = kind.init_stats(specs, k_tasks, dtype)
                start = 0
                for k in range(k_tasks):
                    lead_k = (sizes[k],) + tuple(lead[1:])
                    xk = x.reshape(*lead, -1)[start : start + sizes[k]]
                    start += sizes[k]
                    y = jnp.concatenate([targets[k][p][0][2] for p in group], axis=-1)
                    mask = row_mask(masks[k], lead_k)
                    rows = jnp.sum(mask) if mask is not None else float(np.prod(lead_k))
                    weight = jnp.where(rows > 0, 1.0 / jnp.maximum(rows, 1.0), 0.0)
                    stats = kind.update_stats(stats, xk.reshape(-1, x.shape[-1]), y, k, mask,
                                              weight)  # fmt: skip
                finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(a)) for a in stats]))
                result = _solve_group(
                    GroupStats(stats, specs), base_flat, ft_flats, centre_flat, options
                )
                for p, (params, m) in result.items():
                    solved[p] = params
                    metrics[p] = (m, finite)
            return call.run(solved[path])

        plan.apply(tree(centre_flat), xcat, hook)
        return {p: solved[p] for p in metrics}, metrics

    return run


def merge_sequential(plan, trees, options, iters, collect, merged_flat, dtype, *, throw, progress):
    """The sequential merge's layer reports; writes the merged leaves into ``merged_flat``.

    With one batch per task (of shapes that concatenate, and a model whose examples are
    independent: :func:`_rows_independent`) every layer but the non-traceable ones (embeddings,
    solved first from their own statistics) is solved in one jitted pass
    (:func:`_sequential_pass`); otherwise one pass over the calibration per layer group.

    A tied table is read first (its lookups) and last (the head): it is solved from its lookups
    alone, the rest of the model is merged on that table, and then it is solved again from both
    uses, the head's inputs taken from the merged model (with the lookups' table), which is its
    report.
    """
    batches = [list(it) for it in iters]
    reports = []
    single = (
        all(len(b) == 1 for b in batches)
        and _concatenable([b[0] for b in batches])
        and _rows_independent(plan, trees.tree(trees.centre), [b[0] for b in batches])
    )
    embeds = [g for g in plan.groups if not kind_of(plan.specs[g[0]].kind).traceable]
    tied = [g for g in embeds if is_tied(plan.specs[g[0]])]
    passes = embeds if single else plan.groups

    def solve(group, label, lookups=False):
        stats = collect([iter(b) for b in batches], groups=[group],
                        tree_in=trees.tree(merged_flat), label=label)  # fmt: skip
        if lookups:
            stats = {key: GroupStats(g.stats.lookups(), g.layers) for key, g in stats.items()}
        return _solve_all(stats, trees, options, throw=throw, progress=False,
                          merged_flat=merged_flat)  # fmt: skip

    with _progress(progress) as bar:
        job = bar.add_task("sequential merge", total=len(passes) + single + len(tied))
        for group in passes:  # one pass per group (or only the embeddings)
            reports += solve(group, f"layer {plan.key(group)}", lookups=group in tied)
            bar.advance(job)
        if single:
            embed_params = {p: _layer_params(merged_flat, plan.specs[p]) for g in embeds for p in g}
            solved, metrics = _sequential_pass(
                plan, options, trees, [b[0] for b in batches], embed_params, dtype
            )
            bar.advance(job)
            for group in plan.groups:
                for path in group if group not in embeds else ():
                    m, finite = metrics[path]
                    if not bool(finite):
                        raise ValueError(
                            f"merge: non-finite activations at layer {group[0]!r}: the "
                            "merged model's inputs or the fine-tuned outputs of this layer "
                            "hold NaN or Inf."
                        )
                    _check_solved(path, m, solved[path], throw)
                    write_params(merged_flat, plan.specs[path], solved[path], trees.centre)
                    reports.append(
                        _layer_report(plan.specs[path], options[path], _metrics(m), None, group)
                    )
        for group in tied:  # both uses, on the merged model
            (joint,) = solve(group, f"tied head {plan.key(group)}")
            reports = [joint if r.path == joint.path else r for r in reports]
            bar.advance(job)
    return reports
