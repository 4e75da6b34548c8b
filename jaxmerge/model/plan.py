"""The plan of a merge: the model traced once, its supported layers in call order, their
shared-input groups, and the compiled statistics programs it owns."""

import collections
import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import with_context
from .._flax.capture import as_model
from .._flax.fold import flatten, has_collections
from .._flax.provenance import locate
from ..kinds import LayerSpec, kind_of
from ..kinds.embed import EMBED, tied
from .heads import NotAHead, find_heads, run_with_heads, trace

# ---- the plan: which layers, grouped how -----------------------------------------------------


def _default_dtype():
    return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def _layer_params(flat: Mapping, spec: LayerSpec) -> dict:
    return {name: spec.take(flat[spec.leaf(name)]) for name in spec.param_names}


def write_params(merged_flat: dict, spec: LayerSpec, params: Mapping, fill: Mapping) -> None:
    """Write a layer's merged ``params`` into ``merged_flat``; the slice of a stacked leaf goes
    into that leaf (started from ``fill``, the fallback merge, for slices not yet written)."""
    for name, value in params.items():
        leaf = spec.leaf(name)
        if spec.slices:
            value = spec.put(merged_flat.get(leaf, fill[leaf]), value)
        merged_flat[leaf] = value


class _Plan:
    """The model, its supported layers (call order) and their shared-input groups."""

    def __init__(self, model, call_kwargs, tree, batch, mask_key, cache=None):
        self.model = as_model(model, call_kwargs)
        self.cache = cache
        self.linen_params_only = hasattr(self.model, "module") and not has_collections(tree)
        self.mask_key = mask_key
        flat, _ = flatten(tree)
        calls, alive = [], []
        self.modules: dict[str, list] = {}  # {module path: [SeenModule]} (see unsolved.py)
        self.copied: dict[str, str] = {}  # {parameter path: why its copied layer is unsolved}

        def hook(call):
            calls.append(call)
            alive.append(call.x)  # keep ids of inputs unique while tracing
            return call.default()

        def trace():
            calls.clear(), alive.clear(), self.modules.clear()
            return jax.make_jaxpr(lambda t, b: (self.apply(t, b, hook, self.modules),
                                                self.model.probed()))(tree, batch)  # fmt: skip

        try:
            traced = trace()
            if self.model.probed():  # NNX layers called through copies: locate, trace again
                located, self.copied = locate(traced, len(flat), list(flat), self.model.probes)
                self.model.located.update({n: located.get(n) for n, *_ in self.model.probes})
                traced = trace()
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
        self.used = _used_leaves(traced.jaxpr, list(flat), len(jax.tree.leaves(tree)))
        self.captured = {call.path for call in calls}
        # {parameter path: why its layer was dropped}
        self.lifted: dict[str, str] = dict(self.copied)
        self.disagree: dict[str, list] = {}  # {layer path: its calls' differing forms}
        counts = {}
        for call in calls:
            counts[call.path] = counts.get(call.path, 0) + 1
        self.specs: dict[str, LayerSpec] = {}
        per_path: dict[str, list[LayerSpec]] = {}
        for call in calls:
            spec = LayerSpec(call.path, call.kind, call.n_in, call.n_out, call.kernel, call.bias,
                             counts[call.path], call.form, call.scope, call.slices)  # fmt: skip
            per_path.setdefault(call.path, []).append(spec)
        for call in calls:
            if call.path in self.specs or call.path in self.disagree:
                continue
            spec = kind_of(call.kind).joint(per_path[call.path])
            if spec is None:  # e.g. an einsum called with two equations
                forms = sorted({s.form or f"{s.n_in} -> {s.n_out}" for s in per_path[call.path]})
                self.disagree[call.path] = forms
                first = per_path[call.path][0]
                for n in first.param_names:
                    self.lifted.setdefault(
                        first.leaf(n),
                        f"its layer is called with different configurations in one forward "
                        f"pass ({'; '.join(forms)}), which the {call.kind!r} kind does not "
                        "solve as one layer",
                    )
                continue
            ok = all(
                spec.leaf(n) in flat
                and spec.sliced_shape(np.shape(flat[spec.leaf(n)])) == np.shape(call.params[n])
                for n in spec.param_names
            )
            if ok:  # layers under lifted transforms (scan, vmap) have other shapes: fall back
                self.specs[call.path] = spec
                continue
            shapes = {n: (tuple(np.shape(call.params[n])), tuple(np.shape(flat[spec.leaf(n)])))
                      for n in spec.param_names if spec.leaf(n) in flat}  # fmt: skip
            other = ", ".join(f"{n} {a} against {b}" for n, (a, b) in shapes.items() if a != b)
            for n in shapes:
                self.lifted.setdefault(
                    spec.leaf(n),
                    f"its layer's parameters have other shapes in the traced call than in the "
                    f"tree ({other}): a lifted transform (nn.map_variables, nn.scan, nn.vmap, "
                    "...) maps them",
                )
        self.heads: dict[str, int] = {}  # {tied table: heads h Eᵀ the model computes itself}
        for path, reason in self._read_elsewhere(tree, batch, flat).items():
            spec = self.specs.pop(path)
            for n in spec.param_names:
                self.lifted.setdefault(spec.leaf(n), reason)
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
        self.fns = {}  # {key + (argument signature,): jitted function with one program}

    def _read_elsewhere(self, tree, batch, flat) -> dict[str, str]:
        """``{layer path: why it is not solved}`` of the layers whose parameters the forward
        pass reads outside their calls: traced with every layer's call run on stand-in
        parameters (zeros), a leaf the dead-code-eliminated pass still reads is read elsewhere
        too (a slice of stacked parameters taken for a call is not). A table read there only by
        heads ``h Eᵀ`` (:mod:`~jaxmerge.model.heads`) is a tied table instead, its heads
        counted in :attr:`heads`."""

        def hook(call):
            if call.path not in self.specs:
                return call.default()
            return call.run(jax.tree.map(jnp.zeros_like, call.params))

        traced = trace(lambda t, b: self.apply(t, b, hook), tree, batch)
        position = {p: i for i, p in enumerate(flat)}
        read = {p for p in flat if position[p] in traced.index}
        out = {}
        for path, spec in list(self.specs.items()):
            leaves = [spec.leaf(n) for n in spec.param_names if spec.leaf(n) in read]
            if not leaves:
                continue
            use = ""
            if spec.kind == EMBED.name and leaves == [spec.leaf(spec.kernel)] and not spec.slices:
                try:
                    heads = find_heads(traced.jaxpr, traced.index[position[leaves[0]]])
                    self.heads[path] = len(heads)
                    self.specs[path] = tied(spec)
                    continue
                except NotAHead as error:
                    use = f" ({error})"
            out[path] = (
                f"the forward pass also reads {', '.join(map(repr, leaves))} outside the calls "
                f"of its {spec.kind!r} layer{use}, which the layer's statistics do not see"
            )
        return out

    def program(self, key, make):
        """``jax.jit(make())`` as a function of its arguments, compiled once per argument
        signature (tree structure, shapes, dtypes) and kept in :attr:`fns` under
        ``key + (signature,)``, where the plan's :class:`PlanCache` counts and bounds it."""

        def call(*args):
            full = key + (_signature(args),)
            fn = self.fns.get(full)
            if fn is None:
                fn = self.fns[full] = jax.jit(make())
            if self.cache is not None:
                self.cache.used(self, full)
            return fn(*args)

        return call

    def stats_fn(self, groups, num_tasks, dtype, own=False):
        """The jitted :func:`_batch_stats` of ``groups`` (:meth:`program`)."""
        groups = tuple(groups)
        return self.program(
            (groups, num_tasks, jnp.dtype(dtype), own),
            lambda: functools.partial(_batch_stats, self, groups, num_tasks, dtype, own),
        )

    def apply(self, tree, batch, hook, modules=None):
        if self.linen_params_only:
            tree = {"params": tree}
        if modules is None:
            return self.model.apply(tree, batch, hook)
        return self.model.apply(tree, batch, hook, modules)

    def mask(self, batch):
        if self.mask_key is None or not isinstance(batch, Mapping) or self.mask_key not in batch:
            return None
        return jnp.asarray(batch[self.mask_key])

    def key(self, group) -> str:
        return "+".join(group)

    def group_specs(self, group):
        return tuple(self.specs[p] for p in group)

    def record(self, tree, batch, keep):
        """``{path: [(x rows, row shape, y rows) per call]}`` of one forward pass. The heads a
        tied table's model computes itself (:attr:`heads`) follow its own calls, as calls of its
        head: rows ``h`` and outputs ``h Eᵀ``."""
        heads = {p: self.specs[p] for p in self.heads if p in keep}
        out, own = {}, {}

        def hook(call):
            spec = heads.get(call.path)
            if spec is None:
                y = call.default()
            else:  # its own table, so that the tree's is read by the heads alone
                y = call.run({**call.params, spec.kernel: own[call.path]})
            if call.path in keep:
                x, lead = call.rows()
                out.setdefault(call.path, []).append((x, lead, call.output_rows(y)))
            return y

        if not heads:
            self.apply(tree, batch, hook)
            return out
        flat, _ = flatten(tree)
        tables = {p: flat[s.leaf(s.kernel)] for p, s in heads.items()}

        def forward(tree, batch, tables):
            out.clear()
            own.update(tables)
            y = self.apply(tree, batch, hook)
            return y, {p: [(x, z) for x, _, z in calls] for p, calls in out.items()}

        traced = trace(forward, tree, batch, tables)
        leads = {p: [lead for _, lead, _ in calls] for p, calls in out.items()}
        position = {p: i for i, p in enumerate(flat)}
        found = {}
        for path, spec in heads.items():
            found[path] = find_heads(traced.jaxpr, traced.index[position[spec.leaf(spec.kernel)]])
            if len(found[path]) != self.heads[path]:
                raise ValueError(
                    f"merge: the forward pass computes {len(found[path])} heads from the table "
                    f"of layer {path!r} on this batch but {self.heads[path]} on the first one."
                )
        values, inputs = run_with_heads(traced, [h for p in heads for h in found[p]])
        _, recorded = jax.tree.unflatten(jax.tree.structure(traced.shape), values)
        out = {p: [(x, lead, z) for (x, z), lead in zip(calls, leads[p], strict=True)]
               for p, calls in recorded.items()}  # fmt: skip
        inputs = iter(inputs)
        for path in heads:
            for head in found[path]:
                h = jnp.moveaxis(next(inputs), head.axis, -1)
                rows = h.reshape(-1, h.shape[-1])
                z = rows @ tables[path].astype(rows.dtype).T
                out.setdefault(path, []).append((rows, h.shape[:-1], z))
        return out


def _used_leaves(jaxpr, paths, count) -> set[str]:
    """The ``paths`` of the first ``count`` inputs of ``jaxpr`` (the tree's leaves, in
    :func:`flatten` order) that an equation or the output reads: the parameters the forward pass
    uses."""
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    read.update(id(v) for v in jaxpr.outvars)
    return {p for p, v in zip(paths, jaxpr.invars[:count], strict=True) if id(v) in read}


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(a), str(jnp.result_type(a))) for a in leaves)


class PlanCache:
    """The plans of recent merges, each with the compiled programs it owns (:attr:`_Plan.fns`),
    kept for the next merge of the same linen module, tree and batch signatures.

    Bounded twice, so that a process merging again and again (a sweep over calibration sizes,
    tasks, bases, ridges) keeps its memory and its count of memory mappings bounded: each
    compiled XLA program holds its own mappings (on CPU from about 60 for a small statistics
    program to hundreds for a one-pass sequential merge, more for large models), and the kernel
    stops a process at ``vm.max_map_count`` (65,530 by default). At most ``max_plans`` plans and
    ``max_programs`` compiled programs (over all plans; one per function and argument signature)
    are kept: beyond them the least recently used plan, or program, is dropped and its executable
    freed (:func:`_release`), to be compiled again when needed. The programs every plan shares
    (:func:`shared_program`: the per-task finish, the weighted sum and the group solves, one per
    layer structure and option set) are not counted one by one; they are freed whenever a plan
    is dropped. Linen modules are immutable, so a plan is keyed by the module's
    identity and kept with it; NNX modules are mutable and always get a new plan, whose programs
    live as long as it does (one merge).
    """

    def __init__(self, max_plans: int = 8, max_programs: int = 32):
        self.max_plans = max_plans
        self.max_programs = max_programs
        self._plans: collections.OrderedDict = collections.OrderedDict()
        self._programs: collections.OrderedDict = collections.OrderedDict()  # -> plan

    def get(self, model, call_kwargs, tree, batch, mask_key) -> "_Plan":
        """The cached plan for these arguments, or a new one (then cached)."""
        if not isinstance(model, nn.Module):
            return _Plan(model, call_kwargs, tree, batch, mask_key)
        key = (
            id(model),
            _signature(tree),
            _signature(batch),
            mask_key,
            repr(sorted((call_kwargs or {}).items())),
        )
        hit = self._plans.get(key)
        if hit is not None and hit[0] is model:
            self._plans.move_to_end(key)
            return hit[1]
        plan = _Plan(model, call_kwargs, tree, batch, mask_key, cache=self)
        self._plans[key] = (model, plan)
        while len(self._plans) > self.max_plans:
            self._drop(self._plans.popitem(last=False)[1][1])
        return plan

    def used(self, plan: "_Plan", key) -> None:
        """Mark ``plan.fns[key]`` as just used; drop the least recently used programs beyond
        ``max_programs``."""
        self._programs[(id(plan), key)] = plan
        self._programs.move_to_end((id(plan), key))
        while len(self._programs) > self.max_programs:
            (_, old), owner = self._programs.popitem(last=False)
            _release(owner.fns.pop(old, None))

    def _drop(self, plan: "_Plan") -> None:
        for entry in [e for e in self._programs if e[0] == id(plan)]:
            del self._programs[entry]
        _release(*plan.fns.values(), *_SHARED)
        plan.fns.clear()

    def plans(self) -> list["_Plan"]:
        """The cached plans, least recently used first."""
        return [plan for _, plan in self._plans.values()]

    def programs(self) -> int:
        """The number of compiled programs the cached plans hold."""
        return len(self._programs)

    def clear(self) -> None:
        """Drop every plan and its compiled programs."""
        for _, plan in self._plans.values():
            _release(*plan.fns.values())
            plan.fns.clear()
        _release(*_SHARED)
        self._plans.clear()
        self._programs.clear()


_SHARED: list = []  # module-level compiled functions shared by every plan (see shared_program)


def shared_program(fn):
    """Register a module-level jitted function whose programs every plan shares (the per-task
    finish, the weighted sum, the group solves): a plan dropped from :data:`PLANS` (and
    :meth:`PlanCache.clear`) frees them too, so that they stay bounded with the plans."""
    _SHARED.append(fn)
    return fn


def _release(*fns) -> None:
    """Free the executables of dropped jitted functions: JAX's tracing caches would otherwise
    keep them (and their memory mappings) alive after the function is gone."""
    for fn in fns:
        if fn is not None:
            fn.clear_cache()


PLANS = PlanCache()


def _plan(model, call_kwargs, tree, batch, mask_key) -> _Plan:
    """:meth:`PlanCache.get` of the process's plan cache :data:`PLANS`."""
    return PLANS.get(model, call_kwargs, tree, batch, mask_key)


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


def row_mask(mask, lead):
    """The 0/1 mask of rows with leading shape ``lead``, or ``None`` when the mask (over the
    batch's leading axes) does not index these rows (e.g. after pooling)."""
    if mask is None or tuple(lead[: mask.ndim]) != tuple(mask.shape):
        return None
    mask = mask.reshape(mask.shape + (1,) * (len(lead) - mask.ndim))
    return jnp.broadcast_to(mask, lead).reshape(-1)


def _describe(batch) -> str:
    shapes = jax.tree.map(lambda a: tuple(np.shape(a)), batch)
    return f"shapes {shapes}"
