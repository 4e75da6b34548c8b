"""The base and fine-tuned trees of a merge, flat and checked, with the fallback merge, and the
fold of merged leaves back into the base's containers, dtypes and shardings."""

import fnmatch
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .._flax.fold import cast_like, check_trees, flatten, from_pure, to_pure
from .options import _check_patterns, _fallback_rule, _fallback_value, _resolve


def check_host(*trees) -> None:
    """Raise unless called outside every JAX transformation: a merge is a host-level driver."""
    if isinstance(jnp.zeros(()), jax.core.Tracer) or any(
        isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees)
    ):
        raise TypeError(
            "merge: called inside a JAX transformation (jax.jit, vmap, grad, ...) or on traced "
            "parameters; merge is a host-level driver (it iterates over the calibration, checks "
            "values and compiles its own programs) and cannot be traced. Call it outside jit; "
            "to collect statistics inside a compiled loop of your own, jit the update of "
            "jm.stats_collector(model, finetuned, batch) and merge from its statistics with "
            "jm.solve_stats."
        )


def _check_nnx_params(tree, what: str) -> None:
    """An NNX state given as parameters holds ``nnx.Param`` variables only."""
    if not isinstance(tree, nnx.State):
        return
    other = [
        f"{type(v).__name__} at {'/'.join(map(str, path))!r}"
        for path, v in nnx.to_flat_state(tree)
        if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)
    ]
    if other:
        raise ValueError(
            f"merge: {what} is an nnx.State holding variables that are not parameters "
            f"({', '.join(other[:4])}{', ...' if len(other) > 4 else ''}); pass the parameters "
            "only, nnx.state(model, nnx.Param): the model's other state (RNG streams, batch "
            "statistics) is used as it is in the model."
        )


def _on_base_devices(flat, base_flat):
    """``flat`` with every array on other devices than the base's leaf moved to its sharding."""
    out = dict(flat)
    for path, leaf in flat.items():
        like = base_flat[path]
        if (
            isinstance(leaf, jax.Array)
            and isinstance(like, jax.Array)
            and leaf.sharding.device_set != like.sharding.device_set
        ):
            out[path] = jax.device_put(leaf, like.sharding)
    return out


class _Trees:
    """Base and fine-tunes as flat ``{path: leaf}`` dicts, checked, plus the fallback merge.

    Fine-tuned leaves on other devices than the base's are moved to the base's sharding (the
    merge is placed like the base)."""

    def __init__(self, base, finetuned, fallback):
        if not isinstance(finetuned, Sequence) or isinstance(finetuned, Mapping) or not finetuned:
            raise ValueError(
                "merge: finetuned must be a non-empty sequence of parameter trees (K ≥ 1)."
            )
        check_host(base, finetuned)
        _check_nnx_params(base, "base")
        for k, tree in enumerate(finetuned):
            _check_nnx_params(tree, f"finetuned[{k}]")
        self.like = base
        self.base = to_pure(base)
        self.finetuned = [to_pure(t) for t in finetuned]
        self.base_flat, self.treedef = flatten(self.base)
        flats = [flatten(t, f"finetuned[{k}]") for k, t in enumerate(self.finetuned)]
        check_trees(self.base_flat, self.treedef, flats)
        self.ft_flats = [_on_base_devices(f, self.base_flat) for f, _ in flats]
        for k, (flat, _) in enumerate(flats):
            if any(self.ft_flats[k][p] is not leaf for p, leaf in flat.items()):
                self.finetuned[k] = self.tree(self.ft_flats[k])
        # layer and module paths: every proper prefix of a parameter path ("" the root)
        self.modules = {"/".join(p.split("/")[:i]) for p in self.base_flat
                        for i in range(p.count("/") + 1)}  # fmt: skip
        floating = [p for p, leaf in self.base_flat.items()
                    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]  # fmt: skip
        _check_patterns(fallback, "fallback", floating, "floating-point parameter",
                        self._fallback_hint)  # fmt: skip
        same = jax.device_get(
            {p: [f[p] is leaf or jnp.array_equal(f[p], leaf) for f in self.ft_flats]
             for p, leaf in self.base_flat.items()}
        )  # fmt: skip
        self.unchanged = {p for p, s in same.items() if all(s)}  # bit-identical in every fine-tune
        # parameters whose fallback rule the caller chose by path (a glob, or a callable)
        self.chosen = (
            {p for p in self.base_flat if any(fnmatch.fnmatchcase(p, g) for g in fallback)}
            if isinstance(fallback, Mapping)
            else set(self.base_flat) if callable(fallback) and not isinstance(fallback, str)
            else set()
        )  # fmt: skip
        self.rules, self.centre = {}, {}
        for path, leaf in self.base_flat.items():
            rule = _resolve(fallback, path, "mean", "fallback")
            self.rules[path] = _fallback_rule(rule)
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                self.rules[path] = "base"  # integer parameters are never averaged
            tuned = [leaf] if path in self.unchanged else [f[path] for f in self.ft_flats]
            self.centre[path] = _fallback_value(rule, leaf, tuned)

    def _fallback_hint(self, pattern):
        integer = [p for p in self.base_flat if fnmatch.fnmatchcase(p, pattern)]
        if integer:  # only integer parameters, which always keep the base's value
            return (
                f"it matches only integer parameters ({integer[0]!r}), which always keep the "
                "base's value"
            )
        modules = sorted(m for m in self.modules if fnmatch.fnmatchcase(m, pattern))
        if not modules:
            return None
        prefix = f"{modules[0]}/" if modules[0] else ""
        inside = next(p for p in self.base_flat if p.startswith(prefix))
        return (
            f"it matches the layer or module path {modules[0]!r}, and fallback applies to "
            f"parameter paths (such as {inside!r}): use {pattern + '/*' if pattern else '*'!r}"
        )

    def check_patterns(self, **options) -> None:
        """Every glob of the layer options (``basis``, ``prior``, ``ridge``) must match a layer
        or module path of the base, not only parameter paths (``"Dense_0/kernel"``)."""
        for what, option in options.items():

            def hint(pattern, what=what):
                params = [p for p in self.base_flat if fnmatch.fnmatchcase(p, pattern)]
                if not params:
                    return f"layer paths include {sorted(m for m in self.modules if m)[:8]}"
                return (
                    f"it matches the parameter path {params[0]!r}, and {what} applies to layer "
                    f"paths: use {params[0].rpartition('/')[0]!r}"
                )

            _check_patterns(option, what, self.modules, "layer", hint)

    def tree(self, flat):
        """A pure tree of the base's structure from ``{path: leaf}`` (values not cast)."""
        return jax.tree_util.tree_unflatten(self.treedef, [flat[p] for p in self.base_flat])

    def fold(self, flat):
        """The merge in the base's container, dtypes and shardings."""
        leaves = {p: cast_like(flat[p], like) for p, like in self.base_flat.items()}
        return from_pure(self.like, self.tree(leaves))
