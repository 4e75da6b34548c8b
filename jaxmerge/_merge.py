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
  each layer group at the moment it is reached and continues with the merged layer. Embeddings
  read token ids, which do not depend on the merge, so they are solved beforehand from their own
  (cheap) statistics. With several batches the statistics of a layer need every batch before it
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
task arithmetic ``θ₀ + λ Σₖ (θₖ − θ₀)``. Integer parameters keep the base's value.

The full basis starts from the fallback value: of all minimisers, it returns the one closest (in
the Frobenius norm) to the fallback merge, ``W̄ = C + A⁺(P − AC)``. Input directions the calibration
never excites (dead units, unseen embedding rows) therefore keep the fallback value rather than
the base's, the same rule as every other parameter without data. Scalar, diagonal, custom and
low-rank bases are updates of the base. With one fine-tune (and no ridge) the merge is that
fine-tune, the exact optimum of every basis.

Options ``basis``, ``prior``, ``ridge`` and ``fallback`` each take one value, a mapping from path
patterns (:mod:`fnmatch` globs, first match wins) to values, or a callable ``path -> value``
(e.g. a basis factory). ``basis``, ``prior`` and ``ridge`` are looked up with the layer path,
``fallback`` with the parameter path (``"Dense_0/kernel"``). A ``prior`` for the full and
low-rank bases is the layer's own parameter dict (``{"kernel": ..., "bias": ...}``); a
:class:`~jaxmerge.Custom` direction may be given in that form too.
"""

import collections
import dataclasses
import fnmatch
import functools
import itertools
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._bases import Custom, LowRank
from ._errors import with_context
from ._flax.capture import as_model
from ._flax.fold import cast_like, check_trees, flatten, from_pure, has_collections, to_pure
from ._report import LayerReport, MergeReport
from ._solve import SolveStatus
from ._solve_layer import SolveError, solve_layer
from ._stats import LayerStats
from .kinds import EmbedStats, LayerSpec, kind_of

__all__ = ["GroupStats", "collect_stats", "solve_stats", "merge"]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["stats"], meta_fields=["layers"])
@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Statistics of a group of layers that read the same input (a pytree; ``layers`` is static).

    Add two with ``jax.tree.map(jnp.add, a, b)`` (or ``psum`` them): like
    :class:`~jaxmerge.LayerStats` they are sums.

    Attributes:
        stats: a :class:`~jaxmerge.LayerStats` whose output columns are the members' outputs
            concatenated in order, or an :class:`EmbedStats` for an embedding.
        layers: the members' :class:`LayerSpec` objects, in call order.

    Examples:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jaxmerge import collect_stats
        >>> fts = [{"layers_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}]
        >>> stats = collect_stats(nn.Sequential([nn.Dense(1)]), fts, [[jnp.eye(2)]],
        ...                       progress=False)
        >>> group = stats["layers_0"]  # rows [1, 0, 1] and [0, 1, 1], each weighted 1/2
        >>> group.key, group.stats.gram.tolist()
        ('layers_0', [[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.5, 0.5, 1.0]])
    """

    stats: LayerStats | EmbedStats
    layers: tuple[LayerSpec, ...]

    @property
    def key(self) -> str:
        """The group's key in a statistics dict: the member paths joined by ``+``."""
        return "+".join(s.path for s in self.layers)


@dataclasses.dataclass(frozen=True)
class _Options:
    basis: Any
    prior: Any
    ridge: float | Float[Array, ""]  # traced inside a compiled solve
    alpha: float | Float[Array, ""]
    rcond: float | None


# ---- options ------------------------------------------------------------------------------------


def _resolve(option, path: str, default, what: str):
    """One value, ``{glob: value}`` (first match) or ``path -> value``."""
    if isinstance(option, Mapping):
        for pattern, value in option.items():
            if fnmatch.fnmatchcase(path, pattern):
                return value
        return default
    if callable(option) and not isinstance(option, str | LowRank | Custom):
        try:
            return option(path)
        except Exception as error:
            raise with_context(error, f"merge: the {what} callable failed for {path!r}") from error
    return option


class OptionPatternError(ValueError):
    """A ``{glob: value}`` option whose glob matches no path of the model (``option`` names it)."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


def _check_patterns(option, paths, what: str) -> None:
    """Every glob of a ``{glob: value}`` option must match one of ``paths`` (typos are errors)."""
    if not isinstance(option, Mapping):
        return
    for pattern in option:
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            raise OptionPatternError(
                f"merge: the {what} pattern {pattern!r} matches no layer or parameter path of the "
                f"model; known paths include {sorted(paths)[:8]}.",
                what,
            )


def _basis_name(basis) -> str:
    return basis if isinstance(basis, str) else repr(basis)


def _fallback_rule(rule) -> str:
    if rule in ("mean", "base"):
        return rule
    if isinstance(rule, int | float) and not isinstance(rule, bool) and math.isfinite(rule):
        return f"task_arithmetic({rule:g})"
    raise ValueError(
        f"merge: fallback must be 'mean', 'base' or a number λ (task arithmetic), got {rule!r}."
    )


def _fallback_value(rule, base, finetuned):
    if not jnp.issubdtype(jnp.result_type(base), jnp.floating) or rule == "base":
        return base
    dtype = jnp.promote_types(jnp.result_type(base), jnp.float32)
    stack = jnp.stack([jnp.asarray(f, dtype) for f in finetuned])
    if rule == "mean":
        return jnp.mean(stack, axis=0)
    b = jnp.asarray(base, dtype)
    return b + rule * jnp.sum(stack - b, axis=0)


# ---- the plan: which layers, grouped how -----------------------------------------------------


def _default_dtype():
    return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def _param_names(spec: LayerSpec):
    return spec.param_names


def _leaf(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _layer_params(flat: Mapping, spec: LayerSpec) -> dict:
    return {name: flat[_leaf(spec.path, name)] for name in _param_names(spec)}


class _Plan:
    """The model, its supported layers (call order) and their shared-input groups."""

    def __init__(self, model, call_kwargs, tree, batch, mask_key):
        self.model = as_model(model, call_kwargs)
        self.linen_params_only = hasattr(self.model, "module") and not has_collections(tree)
        self.mask_key = mask_key
        flat, _ = flatten(tree)
        calls, alive = [], []

        def hook(call):
            calls.append(call)
            alive.append(call.x)  # keep ids of inputs unique while tracing
            return call.default()

        try:
            jax.eval_shape(lambda t, b: self.apply(t, b, hook), tree, batch)
        except jax.errors.ConcretizationTypeError as error:
            raise TypeError(
                "merge: the model branches in Python on a value computed from its input or "
                "parameters (an `if`, `bool()`, `int()` or a shape taken from an array), which "
                "cannot run under tracing; write the branch with jnp.where or jax.lax.cond, or "
                f"pass the deciding value as a static call_kwargs entry. JAX: {error}"
            ) from error
        except flax.errors.FlaxError as error:  # e.g. inputs of the wrong width
            raise ValueError(
                f"merge: the model cannot run on calibration[0] batch 0 ({_describe(batch)}) with "
                f"the base parameters: {error}"
            ) from error
        except (TypeError, ValueError) as error:
            raise with_context(
                error,
                "merge: the model does not run on the calibration batch with the base parameters",
            ) from error
        counts = {}
        for call in calls:
            counts[call.path] = counts.get(call.path, 0) + 1
        self.specs: dict[str, LayerSpec] = {}
        for call in calls:
            if call.path in self.specs:
                continue
            spec = LayerSpec(call.path, call.kind, call.n_in, call.n_out, call.kernel, call.bias,
                             counts[call.path])  # fmt: skip
            ok = all(
                _leaf(spec.path, n) in flat
                and np.shape(flat[_leaf(spec.path, n)]) == np.shape(call.params[n])
                for n in _param_names(spec)
            )
            if ok:  # layers under lifted transforms (scan, vmap) have other shapes: fall back
                self.specs[call.path] = spec
        groups: dict[Any, list[str]] = {}
        for call in calls:
            spec = self.specs.get(call.path)
            if spec is None or any(call.path in g for g in groups.values()):
                continue
            shared = spec.calls == 1 and call.signature[0] == "affine"
            key = (call.signature, spec.n_in) if shared else ("own", call.path)
            groups.setdefault(key, []).append(call.path)
        self.groups = [tuple(g) for g in groups.values()]
        self.group_of = {p: g for g in self.groups for p in g}
        self.fns = {}

    def stats_fn(self, groups, num_tasks, dtype, own=False):
        """The jitted :func:`_batch_stats` of ``groups``, built once per plan."""
        key = (tuple(groups), num_tasks, jnp.dtype(dtype), own)
        if key not in self.fns:
            self.fns[key] = jax.jit(
                functools.partial(_batch_stats, self, tuple(groups), num_tasks, dtype, own)
            )
        return self.fns[key]

    def apply(self, tree, batch, hook):
        if self.linen_params_only:
            tree = {"params": tree}
        return self.model.apply(tree, batch, hook)

    def mask(self, batch):
        if self.mask_key is None or not isinstance(batch, Mapping) or self.mask_key not in batch:
            return None
        return jnp.asarray(batch[self.mask_key])

    def key(self, group) -> str:
        return "+".join(group)

    def group_specs(self, group):
        return tuple(self.specs[p] for p in group)

    def record(self, tree, batch, keep):
        """``{path: [(x rows, row shape, y rows) per call]}`` of one forward pass."""
        out = {}

        def hook(call):
            y = call.default()
            if call.path in keep:
                x, lead = call.rows()
                out.setdefault(call.path, []).append((x, lead, y.reshape(-1, call.n_out)))
            return y

        self.apply(tree, batch, hook)
        return out


_PLANS: collections.OrderedDict = collections.OrderedDict()


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), str(jnp.result_type(a))) for a in leaves)


def _plan(model, call_kwargs, tree, batch, mask_key) -> _Plan:
    """A :class:`_Plan`, reused (with its compiled functions) for the same linen module, tree
    and batch signatures; linen modules are immutable, NNX modules are not and get a new plan."""
    if not isinstance(model, nn.Module):
        return _Plan(model, call_kwargs, tree, batch, mask_key)
    key = (
        id(model),
        _signature(tree),
        _signature(batch),
        mask_key,
        repr(sorted((call_kwargs or {}).items())),
    )
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is model:
        _PLANS.move_to_end(key)
        return hit[1]
    plan = _Plan(model, call_kwargs, tree, batch, mask_key)
    _PLANS[key] = (model, plan)
    while len(_PLANS) > 8:
        _PLANS.popitem(last=False)
    return plan


def _batch_stats(plan, groups, num_tasks, dtype, own, sums, tree_in, tree_tgt, batch, task):
    """Add one batch of one task to the plain sums of ``groups`` (traced). ``own``: the targets
    are the layers' own outputs (``tree_tgt`` is ``None``), so non-embedding groups add their
    input statistics only and :meth:`~jaxmerge.LayerKind.own_targets` completes them."""
    keep = {p for g in groups for p in g}
    mask = plan.mask(batch)
    rec_in = plan.record(tree_in, batch, keep)
    rec_tgt = rec_in if tree_tgt is None else plan.record(tree_tgt, batch, keep)
    out = {}
    for group in groups:
        key = plan.key(group)
        stats = sums[key]
        kind = kind_of(plan.specs[group[0]].kind)
        inputs_only = own and kind.affine_targets
        for i, (x, lead, _) in enumerate(rec_in[group[0]]):
            if inputs_only:
                stats = kind.update_stats(stats, x, None, task, row_mask(mask, lead))
                continue
            targets = [rec_tgt[p][i] for p in group]
            for p, (_, lead_t, _) in zip(group, targets, strict=True):
                if lead_t != lead:
                    raise ValueError(
                        f"merge: layer {p!r} sees rows {lead} in the input stream but {lead_t} "
                        "in the fine-tuned model; the two forward passes disagree."
                    )
            y = jnp.concatenate([t[2] for t in targets], axis=-1)
            stats = kind.update_stats(stats, x, y, task, row_mask(mask, lead))
        out[key] = stats
    return out


def _own_layers(plan, groups, tree):
    """``{group key: [member parameter dicts]}`` of one task's parameters ``tree``."""
    flat, _ = flatten(tree)
    return {plan.key(g): [_layer_params(flat, s) for s in plan.group_specs(g)] for g in groups}


def _zero_sums(plan, groups, num_tasks, dtype):
    return {plan.key(g): _init_stats(plan.group_specs(g), num_tasks, dtype) for g in groups}


def _init_stats(specs, num_tasks, dtype):
    return kind_of(specs[0].kind).init_stats(specs, num_tasks, dtype)


def row_mask(mask, lead):
    """The 0/1 mask of rows with leading shape ``lead``, or ``None`` when the mask (over the
    batch's leading axes) does not index these rows (e.g. after pooling)."""
    if mask is None or tuple(lead[: mask.ndim]) != tuple(mask.shape):
        return None
    mask = mask.reshape(mask.shape + (1,) * (len(lead) - mask.ndim))
    return jnp.broadcast_to(mask, lead).reshape(-1)


def scale_stats(stats, scale):
    """Multiply every sum but ``count`` by ``scale`` (task weight ``1/Nₖ``)."""
    scaled = jax.tree.map(lambda a: a * scale, stats)
    return scaled._replace(count=stats.count)


def member_stats(stats, specs, index: int):
    """The statistics of one member of a shared-input group (its output columns)."""
    start = sum(s.n_out for s in specs[:index])
    cols = slice(start, start + specs[index].n_out)
    return stats._replace(cross=stats.cross[:, cols], out_sq=stats.out_sq[cols])


@functools.partial(jax.jit, static_argnums=0)
def _finish_task(specs, sums, layers, k):
    """One task's plain sums, each group's finiteness and row count for :func:`_check_task`.

    ``specs``: ``((group key, member specs), ...)``. ``layers``: ``None``, or the task's
    :func:`_own_layers` when the sums hold input statistics only (its own activations): their
    targets, the layers' own outputs, are then completed from the Gram matrices.
    """
    specs = dict(specs)
    out = dict(sums)
    for key, params in (layers or {}).items():
        kind = kind_of(specs[key][0].kind)
        if kind.affine_targets:
            out[key] = kind.own_targets(sums[key], specs[key], params)
    finite = {key: jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(s)]))
              for key, s in out.items()}  # fmt: skip
    return out, finite, {key: s.count[k] for key, s in out.items()}


@jax.jit
def _add_normalized(total, sums, k):
    """``total + sums/Nₖ`` over ``{group key: statistics}`` (``Nₖ``: the group's row count of
    task ``k``; ``total`` zeros at first). One compiled program, so every caller rounds alike."""
    part = {key: scale_stats(s, 1.0 / s.count[k]) for key, s in sums.items()}
    return jax.tree.map(jnp.add, total, part)


def _finished(plan, groups, sums, tree, k):
    """Task ``k``'s plain sums, completed with its own targets when ``tree`` (its parameters) is
    given (:func:`_finish_task`), and checked (:func:`_check_task`)."""
    specs = tuple((plan.key(g), plan.group_specs(g)) for g in groups)
    layers = None if tree is None else _own_layers(plan, groups, tree)
    sums, finite, rows = _finish_task(specs, sums, layers, k)
    _check_task(plan, groups, finite, rows, k)
    return sums


def _check_task(plan, groups, finite, rows, k):
    """Raise for a group of task ``k`` with non-finite statistics or no rows."""
    finite, rows = jax.device_get((finite, rows))
    for group in groups:
        key = plan.key(group)
        if not finite[key]:
            raise ValueError(
                f"merge: non-finite activations at layer {group[0]!r} on task {k}: the inputs "
                "or the fine-tuned outputs of this layer hold NaN or Inf. Check the calibration "
                "data and the parameters feeding this layer."
            )
        if rows[key] == 0:
            raise ValueError(
                f"merge: layer {group[0]!r} saw no unmasked rows of task {k}; every task needs "
                "calibration rows at every layer."
            )


def _progress(enabled: bool):
    from rich.progress import Progress

    return Progress(transient=True, disable=not enabled)


def _peek(calibration, num_tasks, *, mask_key=None, what="calibration"):
    """Iterators over each task's batches (each batch checked by :func:`_check_batch` as it
    comes) and the first batch, with clear errors."""
    if isinstance(calibration, Mapping) or not isinstance(calibration, Sequence):
        raise TypeError(
            f"merge: {what} must be a sequence of K iterables of batches (one per "
            f"fine-tuned model), got {type(calibration).__name__}."
        )
    if len(calibration) != num_tasks:
        raise ValueError(
            f"merge: {len(calibration)} {what} iterables for {num_tasks} fine-tuned models; "
            "give one per model, in the same order."
        )
    iters, first = [], None
    for k, batches in enumerate(calibration):
        if not isinstance(batches, Iterable) or hasattr(batches, "shape"):
            raise TypeError(
                f"merge: {what}[{k}] must be an iterable of batches (e.g. a list), got "
                f"{type(batches).__name__}; wrap a single batch in a list."
            )
        it = iter(batches)
        head = next(it, None)
        if head is None:
            raise ValueError(f"merge: {what}[{k}] is empty; every task needs a batch.")
        first = head if first is None else first
        checked = (
            _check_batch(b, f"{what}[{k}] batch {i}", mask_key)
            for i, b in enumerate(itertools.chain([head], it))
        )
        _check_batch(head, f"{what}[{k}] batch 0", mask_key)
        iters.append(checked)
    return iters, first


def _check_batch(batch, where: str, mask_key):
    """``batch``, after checking its form: an array, or a dict whose mask (under ``mask_key``)
    has the leading shape of another entry (a mask that indexes no input would be ignored)."""
    if isinstance(batch, Mapping):
        if mask_key is not None and mask_key in batch:
            mask = np.shape(batch[mask_key])
            others = {k: np.shape(v) for k, v in batch.items() if k != mask_key}
            if not mask or not any(shape[: len(mask)] == mask for shape in others.values()):
                raise ValueError(
                    f"merge: {where}: the mask {mask_key!r} has shape {mask}, which is not the "
                    f"leading shape of any other entry ({others}); a padding mask covers the "
                    "leading (batch, token, ...) axes of the inputs, e.g. (batch, tokens)."
                )
    elif not hasattr(batch, "shape"):
        raise TypeError(
            f"merge: {where} is a {type(batch).__name__}; a batch is an array (the model's "
            "positional input) or a dict of keyword arguments (with an optional padding mask). "
            "For (inputs, labels) pairs pass the inputs alone."
        )
    return batch


def _describe(batch) -> str:
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), batch)
    return f"shapes {shapes}"


def _collect(plan, trees_tgt, iters, *, groups, tree_in, dtype, progress, label):
    """Normalised (``wₖ = 1/Nₖ``) statistics of ``groups`` over all tasks and batches."""
    if not groups:
        return {}
    k_tasks = len(trees_tgt)
    own = tree_in is None  # each task's own activations: targets follow from the Gram matrices
    fn = plan.stats_fn(groups, k_tasks, dtype, own)
    total = _zero_sums(plan, groups, k_tasks, dtype)
    with _progress(progress) as bar:
        job = bar.add_task(label, total=None)
        for k, batches in enumerate(iters):
            bar.update(job, description=f"{label}: task {k + 1}/{k_tasks}")
            sums = _zero_sums(plan, groups, k_tasks, dtype)
            for i, batch in enumerate(batches):
                src = trees_tgt[k] if tree_in is None else tree_in
                tgt = None if tree_in is None else trees_tgt[k]
                try:
                    sums = fn(sums, src, tgt, batch, k)
                except flax.errors.FlaxError as error:
                    raise ValueError(
                        f"merge: the model cannot run on calibration[{k}] batch {i} "
                        f"({_describe(batch)}): {error}"
                    ) from None
                bar.advance(job)
            sums = _finished(plan, groups, sums, trees_tgt[k] if own else None, k)
            total = _add_normalized(total, sums, k)
    return {plan.key(g): GroupStats(total[plan.key(g)], plan.group_specs(g)) for g in groups}


def collect_stats(
    model,
    finetuned: Sequence[Any],
    calibration: Sequence[Iterable[Any]],
    *,
    inputs: Any = None,
    paths: Iterable[str] | None = None,
    mask_key: str | None = "mask",
    call_kwargs: Mapping[str, Any] | None = None,
    dtype=None,
    progress: bool = True,
) -> dict[str, GroupStats]:
    """Calibration statistics of every supported layer of a Flax model.

    For task ``k`` the targets are the outputs of fine-tuned model ``k`` at each layer; the
    inputs are that model's own activations (``inputs=None``, the parallel merge) or those of the
    model with parameters ``inputs`` on the same examples (e.g. a merged model: scoring a
    sequential merge). Each task's plain sums are scaled by ``1/Nₖ`` (rows counted after the mask)
    and the tasks are added.

    Args:
        model: a ``flax.linen.Module`` or a ``flax.nnx.Module`` (its structure; for NNX the
            parameters come from the trees given here).
        finetuned: the ``K`` fine-tuned parameter trees (linen params or variables dicts, or
            NNX ``State`` objects of ``nnx.Param``).
        calibration: ``K`` iterables of batches; a batch is an array (the model's positional
            input) or a dict of keyword arguments.
        inputs: optional parameter tree whose activations feed every layer.
        paths: collect only the groups with a member among these layer paths (bounded memory:
            collect and solve a few layers at a time).
        mask_key: key of a 0/1 padding mask in dict batches, over the batch's leading axes; a
            layer's rows are masked when their leading axes start with the mask's shape.
        call_kwargs: static keyword arguments of every forward call (e.g. ``train=False``).
        dtype: accumulation dtype (float32; float64 under ``jax_enable_x64``).
        progress: show a progress bar.

    Returns:
        ``{group key: GroupStats}`` in call order; a key is the member paths joined by ``+``.
        Each task is normalised by its own row count here, so statistics of disjoint parts of
        one task's data do not add up to those of the whole; dicts of different layer groups
        (``paths``) simply merge.

    Raises:
        ValueError: an empty or missing calibration iterable, non-finite activations (naming the
            layer), or a layer without unmasked rows.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Dense(2)
        >>> x = jnp.ones((4, 3))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> stats = collect_stats(model, [params], [[x]], progress=False)
        >>> list(stats), stats[""].stats.gram.shape
        ([''], (4, 4))
    """
    finetuned = [to_pure(t) for t in finetuned]
    iters, first = _peek(calibration, len(finetuned), mask_key=mask_key)
    plan = _plan(model, call_kwargs, finetuned[0], first, mask_key)
    groups = plan.groups
    if paths is not None:
        wanted = set(paths)
        groups = [g for g in groups if wanted & set(g)]
    return _collect(
        plan,
        finetuned,
        iters,
        groups=groups,
        tree_in=None if inputs is None else to_pure(inputs),
        dtype=jnp.dtype(dtype) if dtype is not None else _default_dtype(),
        progress=progress,
        label="collecting statistics",
    )


# ---- solving ------------------------------------------------------------------------------------


def _solve_group(group: GroupStats, base_flat, ft_flats, centre_flat, options, *, jit=False):
    """``{path: (merged parameter dict, (E₀, L, ρ, status, condition))}`` (traceable except for
    embeddings). ``jit``: one compiled program per group structure, shared by every group of
    the same kinds, shapes and options whatever its paths (the solve's own operations then
    compile once instead of one small program each); options holding arrays (a prior, a custom
    basis) are solved eagerly."""
    specs, stats = group.layers, group.stats
    bases = [_layer_params(base_flat, s) for s in specs]
    fts = [[_layer_params(f, s) for f in ft_flats] for s in specs]
    centres = [_layer_params(centre_flat, s) for s in specs]
    opts = tuple(options[s.path] for s in specs)
    try:
        kind = kind_of(specs[0].kind)
        if not kind.traceable:  # reads its statistics' values (e.g. the seen tokens): eager
            return {specs[0].path: kind.solve(specs[0], stats, bases[0], fts[0], centres[0],
                                              opts[0])}  # fmt: skip
        together = _together(specs, opts, len(ft_flats))
        if jit and all(o.prior is None and not isinstance(o.basis, Custom) for o in opts):
            anonymous = tuple(dataclasses.replace(s, path="") for s in specs)
            # Nonzero ridges and every α are arguments, not constants: sweeping them (validation
            # searches) reuses the compiled program.
            static = tuple((o.basis, o.rcond, o.ridge == 0) for o in opts)
            knobs = [(o.ridge, o.alpha) for o in opts]
            solved = _solve_layers_jit(
                anonymous, static, together, knobs, stats, bases, fts, centres
            )
        else:
            solved = _solve_layers(specs, opts, together, stats, bases, fts, centres)
        return {s.path: r for s, r in zip(specs, solved, strict=True)}
    except (TypeError, ValueError) as error:
        raise with_context(error, f"merge: layer {group.key!r}") from error


def _together(specs, opts, num_models) -> bool:
    """Whether a shared-input group is solved as one system (every member's columns as
    right-hand sides of one factorisation)."""
    return (
        len(specs) > 1
        and num_models > 1
        and all(o.basis == "full" and o.prior is None for o in opts)
        and len({(o.ridge, o.alpha, o.rcond) for o in opts}) == 1
        and len({s.bias is None for s in specs}) == 1
    )


def _solve_layers(specs, opts, together, stats, bases, fts, centres):
    """``[(merged parameter dict, metrics)]`` of a non-embedding group, in member order."""
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
                          throw=False)  # fmt: skip
        start = 0
        for i, spec in enumerate(specs):
            kind = kind_of(spec.kind)
            cols = slice(start, start + spec.n_out)
            start += spec.n_out
            merged = (sol.kernel[:, cols], None if sol.bias is None else sol.bias[cols])
            b0 = kind.to_matrix(spec, bases[i])
            e0, loss, rho = kind.matrix_energy(member_stats(stats, specs, i), b0, merged)
            params = kind.from_matrix(spec, *merged, bases[i])
            out.append((params, (e0, loss, rho, sol.status, sol.condition)))
        return out
    for i, spec in enumerate(specs):
        st = member_stats(stats, specs, i)
        out.append(kind_of(spec.kind).solve(spec, st, bases[i], fts[i], centres[i], opts[i]))
    return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _solve_layers_jit(specs, static, together, knobs, stats, bases, fts, centres):
    """:func:`_solve_layers` for options without a prior or a custom basis, given as ``static``
    (``(basis, rcond, ridge == 0)`` per member) and ``knobs`` (``(ridge, α)``, traced)."""
    opts = tuple(
        _Options(basis, None, 0.0 if zero else ridge, alpha, rcond)
        for (basis, rcond, zero), (ridge, alpha) in zip(static, knobs, strict=True)
    )
    return _solve_layers(specs, opts, together, stats, bases, fts, centres)


def _heldout_metrics(group: GroupStats, base_flat, merged_flat):
    """``{path: (E₀, ρ)}`` of the merged layers on held-out statistics."""
    out = {}
    for i, spec in enumerate(group.layers):
        b0, b1 = _layer_params(base_flat, spec), _layer_params(merged_flat, spec)
        st = member_stats(group.stats, group.layers, i)
        e0, _, rho = kind_of(spec.kind).energy(spec, st, b0, b1)
        out[spec.path] = (float(e0), float(rho))
    return out


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
    )


def _check_solved(path, metrics, params, throw):
    status = int(np.asarray(metrics[3]))
    finite = all(bool(jnp.all(jnp.isfinite(v))) for v in params.values())
    if throw and (status == SolveStatus.NONFINITE or not finite):
        raise SolveError(
            f"merge: layer {path!r} would not be finite: its statistics (activations of the "
            "calibration data) or parameters hold NaN or Inf."
        )


class _Trees:
    """Base and fine-tunes as flat ``{path: leaf}`` dicts, checked, plus the fallback merge."""

    def __init__(self, base, finetuned, fallback):
        if not isinstance(finetuned, Sequence) or isinstance(finetuned, Mapping) or not finetuned:
            raise ValueError(
                "merge: finetuned must be a non-empty sequence of parameter trees (K ≥ 1)."
            )
        self.like = base
        self.base = to_pure(base)
        self.finetuned = [to_pure(t) for t in finetuned]
        self.base_flat, self.treedef = flatten(self.base)
        flats = [flatten(t, f"finetuned[{k}]") for k, t in enumerate(self.finetuned)]
        check_trees(self.base_flat, self.treedef, flats)
        self.ft_flats = [f for f, _ in flats]
        self.known = {"/".join(p.split("/")[:i]) for p in self.base_flat
                      for i in range(1, p.count("/") + 2)}  # fmt: skip
        _check_patterns(fallback, self.known, "fallback")
        same = jax.device_get(
            {p: [f[p] is leaf or jnp.array_equal(f[p], leaf) for f in self.ft_flats]
             for p, leaf in self.base_flat.items()}
        )  # fmt: skip
        self.unchanged = {p for p, s in same.items() if all(s)}  # bit-identical in every fine-tune
        self.rules, self.centre = {}, {}
        for path, leaf in self.base_flat.items():
            rule = _resolve(fallback, path, "mean", "fallback")
            self.rules[path] = _fallback_rule(rule)
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                self.rules[path] = "base"  # integer parameters are never averaged
            tuned = [leaf] if path in self.unchanged else [f[path] for f in self.ft_flats]
            self.centre[path] = _fallback_value(rule, leaf, tuned)

    def check_patterns(self, **options) -> None:
        """Every ``{glob: value}`` option must match a path of the base."""
        for what, option in options.items():
            _check_patterns(option, self.known, what)

    def tree(self, flat):
        """A pure tree of the base's structure from ``{path: leaf}`` (values not cast)."""
        return jax.tree_util.tree_unflatten(self.treedef, [flat[p] for p in self.base_flat])

    def fold(self, flat):
        """The merge in the base's container, dtypes and shardings."""
        leaves = {p: cast_like(flat[p], like) for p, like in self.base_flat.items()}
        return from_pure(self.like, self.tree(leaves))


_BASES = ("scalar", "diagonal", "full")


def _options(plan_specs, basis, prior, ridge, alpha, rcond):
    out = {}
    for path in plan_specs:
        r = _resolve(ridge, path, 0.0, "ridge")
        if not isinstance(r, int | float) or not r >= 0:
            raise ValueError(f"merge: ridge for layer {path!r} must be a number ≥ 0, got {r!r}.")
        b = _resolve(basis, path, "full", "basis")
        if not (isinstance(b, LowRank | Custom) or (isinstance(b, str) and b in _BASES)):
            raise ValueError(
                f"merge: unknown basis {b!r} for layer {path!r}; use 'scalar', 'diagonal', "
                "'full', LowRank(r) or Custom(directions)."
            )
        out[path] = _Options(
            basis=b,
            prior=_resolve(prior, path, None, "prior"),
            ridge=float(r),
            alpha=alpha,
            rcond=rcond,
        )
    return out


def _unchanged(trees: _Trees, groups, specs, options) -> set[tuple[str, ...]]:
    """Groups (tuples of layer paths) that every fine-tune leaves bit-identical to the base, with
    no prior to pull toward: every basis returns the base there (the residual targets are zero),
    so the parallel merge neither collects their statistics nor solves them."""
    return {
        g
        for g in groups
        if all(
            (options[p].prior is None or options[p].ridge == 0)
            and all(_leaf(p, n) in trees.unchanged for n in _param_names(specs[p]))
            for p in g
        )
    }


def _keep_base(groups, specs, trees: _Trees, options, heldout: bool, merged_flat):
    """Leave ``groups`` at the base's values (written to ``merged_flat``); their reports say
    ``E₀ = L* = 0``, ``ρ = 1``, status ``UNCHANGED``."""
    for p in (p for g in groups for p in g):
        for n in _param_names(specs[p]):
            merged_flat[_leaf(p, n)] = trees.base_flat[_leaf(p, n)]
    return [
        dataclasses.replace(
            _layer_report(specs[p], options[p], (0.0, 0.0, 1.0, 0, math.nan), 0.0, g),
            status="UNCHANGED",
            energy_base_heldout=0.0 if heldout else None,
            rho_heldout=1.0 if heldout else None,
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
                params, metrics = result[spec.path]
                _check_solved(spec.path, metrics, params, throw)
                for name, value in params.items():
                    merged_flat[_leaf(spec.path, name)] = value
                reports.append(_layer_report(spec, options[spec.path], metrics, seconds, paths))
            bar.advance(job)
    return reports


def _finish(trees, merged_flat, reports, solved_paths, algorithm, started, heldout):
    solved_leaves = set()
    for spec in solved_paths:
        solved_leaves.update(_leaf(spec.path, n) for n in _param_names(spec))
    fallbacks = {p: r for p, r in trees.rules.items() if p not in solved_leaves}
    if heldout is not None:
        scored = {}
        for group in heldout.values():
            scored.update(_heldout_metrics(group, trees.base_flat, merged_flat))
        reports = [
            dataclasses.replace(
                r, energy_base_heldout=scored[r.path][0], rho_heldout=scored[r.path][1]
            )
            if r.path in scored
            else r
            for r in reports
        ]
    report = MergeReport(
        algorithm, len(trees.ft_flats), tuple(reports), fallbacks, time.perf_counter() - started
    )
    return trees.fold(merged_flat), report


def solve_stats(
    stats: Mapping[str, GroupStats],
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
) -> tuple[Any, MergeReport]:
    """Merge a model from collected statistics: solve every group, fall back elsewhere, fold.

    Each group is solved with :func:`~jaxmerge.solve_layer` (see the module docs for the full
    basis' starting point, shared inputs, the fallback rules and the layers no fine-tune changed,
    which are not solved); the merged tree has exactly the base's structure, dtypes and
    shardings.

    Args:
        stats: ``{group key: GroupStats}`` from :func:`collect_stats` (possibly combined over
            devices, hosts or runs).
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

    Returns:
        ``(merged tree, MergeReport)``.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
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
            for name in _param_names(spec):
                if _leaf(spec.path, name) not in trees.base_flat:
                    raise ValueError(
                        f"solve_stats: the statistics hold layer {spec.path!r}, which is not in "
                        f"the base parameters (no {_leaf(spec.path, name)!r}): statistics of "
                        "another model?"
                    )
    trees.check_patterns(basis=basis, prior=prior, ridge=ridge)
    options = _options([s.path for s in specs], basis, prior, ridge, alpha, rcond)
    by_path = {s.path: s for s in specs}
    paths = {key: tuple(s.path for s in g.layers) for key, g in stats.items()}
    skip = _unchanged(trees, paths.values(), by_path, options)
    merged_flat = dict(trees.centre)
    reports = _solve_all({k: g for k, g in stats.items() if paths[k] not in skip}, trees, options,
                         throw=throw, progress=progress, merged_flat=merged_flat)  # fmt: skip
    reports += _keep_base(skip, by_path, trees, options, heldout is not None, merged_flat)
    order = {s.path: i for i, s in enumerate(specs)}
    reports.sort(key=lambda r: order[r.path])
    return _finish(trees, merged_flat, reports, specs, "parallel", started, heldout)


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
        finetuned: the ``K`` fine-tuned trees, each shaped and typed like ``base``.
        calibration: ``K`` iterables of batches, ``calibration[k]`` for fine-tune ``k``; a batch
            is an array (positional input) or a dict of keyword arguments, which may hold a
            padding mask under ``mask_key``.
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

    Returns:
        ``(merged, report)``: ``merged`` has exactly the base's tree structure, dtypes and
        shardings (an NNX ``State`` for an NNX base); ``report`` is a
        :class:`~jaxmerge.MergeReport`.

    Raises:
        ValueError, TypeError: mismatched trees, shapes or dtypes (naming the parameter path),
            missing or empty calibration, non-finite activations (naming the layer), bad options.
        SolveError: a layer's solve is not finite and ``throw=True``.

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
    started = time.perf_counter()
    if algorithm not in ("parallel", "sequential"):
        raise ValueError(f"merge: algorithm must be 'parallel' or 'sequential', got {algorithm!r}.")
    if not 0 <= alpha <= 1:
        raise ValueError(f"merge: alpha must lie in [0, 1], got {alpha}.")
    trees = _Trees(base, finetuned, fallback)
    k_tasks = len(trees.ft_flats)
    iters, first = _peek(calibration, k_tasks, mask_key=mask_key)
    plan = _plan(model, call_kwargs, trees.base, first, mask_key)
    trees.check_patterns(basis=basis, prior=prior, ridge=ridge)
    options = _options(plan.specs, basis, prior, ridge, alpha, rcond)
    dtype = _default_dtype()
    collect = functools.partial(_collect, plan, trees.finetuned, dtype=dtype, progress=progress)
    merged_flat = dict(trees.centre)
    specs = list(plan.specs.values())

    groups = plan.groups
    if algorithm == "parallel":
        skip = _unchanged(trees, plan.groups, plan.specs, options)
        groups = [g for g in plan.groups if g not in skip]
        stats = collect(iters, groups=groups, tree_in=None, label="collecting statistics")
        reports = _solve_all(stats, trees, options, throw=throw, progress=progress,
                             merged_flat=merged_flat)  # fmt: skip
        reports += _keep_base(skip, plan.specs, trees, options, heldout is not None, merged_flat)
    else:
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
                embed_params = {
                    p: _layer_params(merged_flat, plan.specs[p]) for g in embeds for p in g
                }
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
                        reports.append(
                            _layer_report(plan.specs[path], options[path], m, None, group)
                        )
    order = {p: i for i, p in enumerate(plan.specs)}
    reports.sort(key=lambda r: order[r.path])

    held = None
    if heldout is not None:
        held_iters, _ = _peek(heldout, k_tasks, mask_key=mask_key, what="heldout")
        tree_in = trees.tree(merged_flat) if algorithm == "sequential" else None
        held = collect(held_iters, groups=groups, tree_in=tree_in, label="held-out")
    return _finish(trees, merged_flat, reports, specs, algorithm, started, held)
