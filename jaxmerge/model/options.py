"""Options of a whole-model merge: one value, ``{glob: value}`` or a callable of the path,
resolved and checked here for every layer (bases, priors, ridges) and parameter (fallbacks)."""

import dataclasses
import fnmatch
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from .._bases import Custom, LowRank
from .._errors import with_context


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


OptionPatternError.__module__ = "jaxmerge"  # its public path (exported by jaxmerge/__init__.py)


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
