"""Collecting calibration statistics: one pass per task over its batches, each task's plain sums
finished (own targets), checked and weighted ``1/Nₖ``; ``collect_stats``."""

import dataclasses
import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from .._flax.fold import flatten, to_pure
from ..core.stats import per_row
from ..kinds import LayerSpec, kind_of
from ..kinds.embed import checked_ids
from .plan import _default_dtype, _describe, _layer_params, _plan, shared_program


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

    stats: Any  # the kind's container: LayerStats, EmbedStats, GroupedStats, a user kind's
    layers: tuple[LayerSpec, ...]

    @property
    def key(self) -> str:
        """The group's key in a statistics dict: the member paths joined by ``+``."""
        return "+".join(s.path for s in self.layers)


def _own_layers(plan, groups, tree):
    """``{group key: [member parameter dicts]}`` of one task's parameters ``tree``."""
    flat, _ = flatten(tree)
    return {plan.key(g): [_layer_params(flat, s) for s in plan.group_specs(g)] for g in groups}


def _zero_sums(plan, groups, num_tasks, dtype):
    return {plan.key(g): _init_stats(plan.group_specs(g), num_tasks, dtype) for g in groups}


def _init_stats(specs, num_tasks, dtype):
    return kind_of(specs[0].kind).init_stats(specs, num_tasks, dtype)


def member_stats(stats, specs, index: int):
    """The statistics of one member of a shared-input group (its output columns)."""
    start = sum(s.n_out for s in specs[:index])
    cols = slice(start, start + specs[index].n_out)
    return stats._replace(cross=stats.cross[:, cols], out_sq=stats.out_sq[cols])


@shared_program
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


@shared_program
@jax.jit
def _add_normalized(total, sums, k):
    """``total + sums/Nₖ`` over ``{group key: statistics}`` (``Nₖ``: the group's row count of
    task ``k``; ``total`` zeros at first). One compiled program, so every caller rounds alike."""
    part = {key: per_row(s, s.count[k]) for key, s in sums.items()}
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


def _peek(calibration, num_tasks, *, mask_key=None, what="calibration", like=None):
    """Iterators over each task's batches (each batch checked by :func:`_check_batch` as it
    comes, and moved to the devices of the array ``like`` when it lies on others) and the first
    batch, with clear errors."""
    place = _placement(like)
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
    iters, heads, first = [], [], None
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
        head = _check_batch(head, f"{what}[{k}] batch 0", mask_key, place)  # now: before any work
        first = head if first is None else first
        rest = (_check_batch(b, f"{what}[{k}] batch {i}", mask_key, place)
                for i, b in enumerate(it, 1))  # fmt: skip
        iters.append(itertools.chain([head], rest))
        heads.append(head)
    if mask_key not in (None, "mask") and not any(
        isinstance(h, Mapping) and mask_key in h for h in heads
    ):
        raise ValueError(
            f"merge: mask_key={mask_key!r}, but no task's first {what} batch holds it "
            f"({'arrays' if not isinstance(first, Mapping) else 'keys ' + str(list(first))}), so "
            "no row would be masked; give dict batches with the mask under that key, or "
            "mask_key=None."
        )
    return iters, first


def _checked_ids(plan, iters, what: str = "calibration") -> list:
    """Every task's batches, the token ids its embeddings read checked against their vocabulary
    (:func:`~jaxmerge.kinds.embed.checked_ids`)."""
    return [checked_ids(it, plan.model.id_inputs, f"{what}[{k}]") for k, it in enumerate(iters)]


def _placement(like):
    """Where batches go to meet parameters like the array ``like``: its device, or replicated
    over its mesh; ``None`` (left where they are) when ``like`` is not a JAX array."""
    if not isinstance(like, jax.Array):
        return None
    sharding = like.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding if len(sharding.device_set) == 1 else None


def _check_batch(batch, where: str, mask_key, place=None):
    """``batch``, after checking its form: an array, or a dict whose mask (under ``mask_key``)
    has the leading shape of another entry (a mask that indexes no input would be ignored).
    Arrays on other devices than ``place``'s are moved there (a batch committed to another
    device than the parameters' cannot meet them in one program)."""
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
    if place is None:
        return batch
    return jax.tree.map(
        lambda a: (
            jax.device_put(a, place)
            if isinstance(a, jax.Array) and a.sharding.device_set != place.device_set
            else a
        ),
        batch,
    )


class CollectorState(NamedTuple):
    """The state of a :class:`StatsCollector` (a pytree).

    Attributes:
        total: ``{group key: statistics}``, ``Σ sumsₖ / Nₖ`` over the tasks finished so far.
        sums: ``{group key: statistics}``, the plain sums of the task being collected.
    """

    total: dict
    sums: dict


@dataclasses.dataclass(frozen=True, eq=False)
class StatsCollector:
    """Whole-model statistics as ``init`` / ``update`` / ``finish_task`` / ``finalize`` functions
    (the optax pattern), for a calibration loop of your own (:func:`stats_collector`).

    ``update`` is pure and traceable: call it inside your own ``jax.jit`` or ``lax.scan``.
    ``finish_task`` completes one task's sums (the layers' own targets in the parallel merge),
    checks them (non-finite values, layers without rows: a ``ValueError`` naming the layer, so it
    runs on the host) and adds them weighted ``1/Nₖ``; ``finalize`` returns what
    :func:`collect_stats` returns, which is built on these functions.
    """

    plan: Any
    groups: tuple
    num_tasks: int
    dtype: Any
    inputs: Any = None

    def init(self) -> CollectorState:
        """Zero statistics for every group."""
        zeros = _zero_sums(self.plan, self.groups, self.num_tasks, self.dtype)
        return CollectorState(total=zeros, sums=zeros)

    def update(self, state: CollectorState, params, batch, task) -> CollectorState:
        """Add one batch of task ``task``, run with that task's fine-tuned ``params``."""
        own = self.inputs is None
        fn = self.plan.stats_fn(self.groups, self.num_tasks, self.dtype, own)
        src, tgt = (params, None) if own else (self.inputs, params)
        return state._replace(sums=fn(state.sums, src, tgt, batch, task))

    def finish_task(self, state: CollectorState, params, task: int) -> CollectorState:
        """Complete, check and add task ``task``'s sums; the next task starts from zero."""
        own = params if self.inputs is None else None
        sums = _finished(self.plan, self.groups, state.sums, own, task)
        return CollectorState(
            total=_add_normalized(state.total, sums, task),
            sums=_zero_sums(self.plan, self.groups, self.num_tasks, self.dtype),
        )

    def finalize(self, state: CollectorState) -> dict[str, GroupStats]:
        """``{group key: GroupStats}`` of the finished tasks."""
        plan = self.plan
        return {plan.key(g): GroupStats(state.total[plan.key(g)], plan.group_specs(g))
                for g in self.groups}  # fmt: skip


def stats_collector(
    model,
    finetuned: Sequence[Any],
    batch,
    *,
    inputs=None,
    paths: Iterable[str] | None = None,
    mask_key: str | None = "mask",
    call_kwargs: Mapping[str, Any] | None = None,
    dtype=None,
) -> StatsCollector:
    """The :class:`StatsCollector` of a model: its statistics as functions you call in your loop.

    Args:
        model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
        finetuned: the ``K`` fine-tuned parameter trees (their structure and number are read).
        batch: one calibration batch (its structure and shapes are read: the model is traced on
            it to find its layers).
        inputs: as in :func:`collect_stats`: a parameter tree whose activations feed every layer.
        paths, mask_key, call_kwargs, dtype: as in :func:`collect_stats`.

    Returns:
        A :class:`StatsCollector`; for each task ``k`` call ``update`` with every batch and
        ``finetuned[k]``, then ``finish_task``; then ``finalize``.

    Examples:
        >>> import jax, jax.numpy as jnp, flax.linen as nn
        >>> model = nn.Dense(2)
        >>> xs = [jnp.ones((4, 3)), jnp.arange(12.0).reshape(4, 3)]
        >>> params = model.init(jax.random.key(0), xs[0])["params"]
        >>> fts = [params, params]
        >>> collector = stats_collector(model, fts, xs[0])
        >>> update = jax.jit(collector.update)  # inside your own compiled loop
        >>> state = collector.init()
        >>> for k, x in enumerate(xs):
        ...     state = collector.finish_task(update(state, fts[k], x, k), fts[k], k)
        >>> stats = collector.finalize(state)
        >>> ref = collect_stats(model, fts, [[x] for x in xs], progress=False)
        >>> bool(jnp.array_equal(stats[""].stats.gram, ref[""].stats.gram))
        True
    """
    finetuned = [to_pure(t) for t in finetuned]
    plan = _plan(model, call_kwargs, finetuned[0], batch, mask_key)
    groups = plan.groups
    if paths is not None:
        if isinstance(paths, str) or not isinstance(paths, Iterable):
            raise TypeError(
                f"collect_stats: paths must be an iterable of layer paths, got {paths!r}; wrap "
                "one path in a list."
            )
        wanted = list(paths)
        unknown = [p for p in wanted if p not in plan.specs]
        if unknown:
            raise ValueError(
                f"collect_stats: paths {unknown} name no layer merged by output matching; the "
                f"layers are {list(plan.specs)[:8]}{' ...' if len(plan.specs) > 8 else ''}."
            )
        groups = [g for g in groups if set(wanted) & set(g)]
    dtype = jnp.dtype(dtype) if dtype is not None else _default_dtype()
    return StatsCollector(plan, tuple(groups), len(finetuned), dtype,
                          None if inputs is None else to_pure(inputs))  # fmt: skip


def _collect(collector: StatsCollector, trees_tgt, iters, *, progress, label):
    """Normalised (``wₖ = 1/Nₖ``) statistics of the collector's groups over all tasks and
    batches (every task's ``iters[k]``, run with ``trees_tgt[k]``)."""
    if not collector.groups:
        return {}
    state = collector.init()
    with _progress(progress) as bar:
        job = bar.add_task(label, total=None)
        for k, batches in enumerate(iters):
            bar.update(job, description=f"{label}: task {k + 1}/{collector.num_tasks}")
            for i, batch in enumerate(batches):
                try:
                    state = collector.update(state, trees_tgt[k], batch, k)
                except flax.errors.FlaxError as error:
                    raise ValueError(
                        f"merge: the model cannot run on calibration[{k}] batch {i} "
                        f"({_describe(batch)}): {error}"
                    ) from None
                bar.advance(job)
            state = collector.finish_task(state, trees_tgt[k], k)
    return collector.finalize(state)


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
            layer), a layer without unmasked rows, ``paths`` naming no layer, or a ``mask_key``
            other than ``"mask"`` that no task's first batch holds.
        TypeError: ``paths`` a single string.

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
    like = jax.tree.leaves(finetuned[0])[0] if finetuned else None
    iters, first = _peek(calibration, len(finetuned), mask_key=mask_key, like=like)
    collector = stats_collector(
        model, finetuned, first, inputs=inputs, paths=paths, mask_key=mask_key,
        call_kwargs=call_kwargs, dtype=dtype,
    )  # fmt: skip
    iters = _checked_ids(collector.plan, iters)
    return _collect(collector, finetuned, iters, progress=progress, label="collecting statistics")
