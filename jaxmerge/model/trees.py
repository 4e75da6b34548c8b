"""The base and fine-tuned trees of a merge, flat and checked, with the fallback merge, and the
fold of merged leaves back into the base's containers, dtypes and shardings."""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from .._flax.fold import cast_like, check_trees, flatten, from_pure, to_pure
from .options import _check_patterns, _fallback_rule, _fallback_value, _resolve


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
