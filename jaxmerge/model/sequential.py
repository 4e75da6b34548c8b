"""The sequential algorithm: each layer solved on the partially merged model's activations (see
:mod:`jaxmerge.model.merge`)."""

import jax
import jax.numpy as jnp
import numpy as np

from ..kinds import kind_of
from .collect import GroupStats, _progress
from .plan import _layer_params, _leaf, row_mask
from .solve import _check_solved, _layer_report, _solve_all, _solve_group

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


def _sequential_pass(plan, options, trees, batches, embed_params, dtype):
    """The one-batch sequential merge, run as one jitted function (see the module docs).

    The compiled function is kept on the plan for the next merge with the same options, tree
    structure, number of tasks and dtype (options holding arrays, such as priors, are not
    hashable and compile afresh).
    """
    k_tasks = len(trees.ft_flats)
    key = ("sequential", k_tasks, jnp.dtype(dtype), trees.treedef, tuple(trees.base_flat),
           tuple(options.items()))  # fmt: skip
    try:
        fn = plan.fns.get(key)
    except TypeError:
        key, fn = None, None
    if fn is None:
        fn = jax.jit(_sequential_fn(plan, options, trees.treedef, tuple(trees.base_flat), dtype))
        if key is not None:
            plan.fns[key] = fn
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

    With one batch per task (of shapes that concatenate) every layer but the non-traceable ones
    (embeddings, solved first from their own statistics) is solved in one jitted pass
    (:func:`_sequential_pass`); otherwise one pass over the calibration per layer group.
    """
    batches = [list(it) for it in iters]
    reports = []
    single = all(len(b) == 1 for b in batches) and _concatenable([b[0] for b in batches])
    embeds = [g for g in plan.groups if not kind_of(plan.specs[g[0]].kind).traceable]
    passes = embeds if single else plan.groups
    with _progress(progress) as bar:
        job = bar.add_task("sequential merge", total=len(passes) + single)
        for group in passes:  # one pass per group (or only the embeddings)
            stats = collect(
                [iter(b) for b in batches],
                groups=[group],
                tree_in=trees.tree(merged_flat),
                label=f"layer {plan.key(group)}",
            )
            reports += _solve_all(stats, trees, options, throw=throw, progress=False,
                                  merged_flat=merged_flat)  # fmt: skip
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
                    for name, value in solved[path].items():
                        merged_flat[_leaf(path, name)] = value
                    reports.append(_layer_report(plan.specs[path], options[path], m, None, group))
    return reports
