"""Options of a whole-model merge: one value, ``{glob: value}`` or a callable of the path,
resolved and checked here for every layer (bases, priors, ridges) and parameter (fallbacks)."""

import dataclasses
import fnmatch
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._errors import with_context
from ..core.bases import Custom, LowRank, check_basis


@dataclasses.dataclass(frozen=True)
class _Options:
    """One layer's solve options (those of :func:`~jaxmerge.solve_layer`)."""

    basis: Any
    prior: Any
    ridge: float | Float[Array, ""]  # traced inside a compiled solve
    alpha: float | Float[Array, ""]
    rcond: float | None
    jitter: float = 0.0


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


def _check_keys(option, what: str) -> None:
    """The keys of a ``{glob: value}`` option are path patterns: strings."""
    if isinstance(option, Mapping):
        for key in option:
            if not isinstance(key, str):
                raise TypeError(
                    f"merge: {what} has the key {key!r} ({type(key).__name__}); the keys of a "
                    f"{{glob: value}} option are path patterns (str), e.g. {{'Dense_0': ...}}."
                )


def _check_patterns(option, what: str, paths, kind: str, hint=None) -> None:
    """Every glob of a ``{glob: value}`` option must match one of ``paths``, the ``kind``
    ("layer", "parameter") paths it applies to (typos are errors). ``hint(pattern)``: a sentence
    naming what such a glob matches instead and the pattern to use, or ``None``."""
    if not isinstance(option, Mapping):
        return
    _check_keys(option, what)
    earlier: list[str] = []
    for pattern in option:
        matched = [p for p in paths if fnmatch.fnmatchcase(p, pattern)]
        if not matched:
            why = hint(pattern) if hint else None
            raise OptionPatternError(
                f"merge: the {what} pattern {pattern!r} matches no {kind} path of the model; "
                + (why or f"{kind} paths include {sorted(paths)[:8]}")
                + ".",
                what,
            )
        # first match wins: a glob whose every path an earlier glob takes is never used
        first = {p: next((e for e in earlier if fnmatch.fnmatchcase(p, e)), None) for p in matched}
        if all(first.values()):
            shown = sorted(matched)[:3]
            raise OptionPatternError(
                f"merge: the {what} pattern {pattern!r} is never used: every {kind} path it "
                f"matches ({', '.join(map(repr, shown))}{', ...' if len(matched) > 3 else ''}) "
                f"is matched first by the earlier pattern {first[shown[0]]!r} (the first "
                "matching pattern wins); put the more specific pattern first.",
                what,
            )
        earlier.append(pattern)


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


def _real(value) -> bool:
    """A real number: a Python or numpy number or a 0-d integer or float array, not a bool."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, numbers.Real):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        dtype is not None
        and np.ndim(value) == 0
        and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    )


def _check_ridge(value, where: str) -> None:
    if not _real(value):
        raise TypeError(
            f"merge: ridge{where} must be a number ≥ 0 (inf allowed), got {value!r} "
            f"({type(value).__name__})."
        )
    if not value >= 0:  # also NaN
        raise ValueError(f"merge: ridge{where} must be a number ≥ 0, got {value!r}.")


def _check_prior(value, where: str) -> None:
    if isinstance(value, str | bytes):
        raise TypeError(
            f"merge: prior{where} must be coefficients (a number or an array) or the layer's "
            f"parameter dict, got the string {value!r}; a prior is a value, not a rule (e.g. "
            "basis='scalar' with prior=1/K pulls toward the mean of the fine-tunes)."
        )


def _check_scalars(alpha, rcond) -> None:
    """``alpha`` in [0, 1] and ``rcond`` ``None`` or a finite number ≥ 0."""
    if not _real(alpha):
        raise TypeError(
            f"merge: alpha must be a number in [0, 1], got {alpha!r} ({type(alpha).__name__})."
        )
    if not 0 <= alpha <= 1:
        raise ValueError(f"merge: alpha must lie in [0, 1], got {alpha}.")
    if rcond is not None and not (_real(rcond) and 0 <= rcond < math.inf):
        raise (ValueError if _real(rcond) else TypeError)(
            f"merge: rcond must be None or a finite number ≥ 0 (the relative eigenvalue "
            f"cut-off of the solver), got {rcond!r}."
        )


def _check_options(*, alpha, rcond, **options) -> None:
    """The options' forms, before the model is traced: ``alpha`` and ``rcond``, the keys of every
    ``{glob: value}`` option, and the ridges and priors given as values (callables' results are
    checked per layer by :func:`_options`)."""
    _check_scalars(alpha, rcond)
    checks = {"ridge": _check_ridge, "prior": _check_prior}
    for what, option in options.items():
        _check_keys(option, what)
        check = checks.get(what)
        if check is None:
            continue
        if isinstance(option, Mapping):
            for pattern, value in option.items():
                check(value, f" for {pattern!r}")
        elif not callable(option) or isinstance(option, str):
            check(option, "")


def _check_layer_patterns(layers, **options) -> None:
    """Every glob of the layer options (``basis``, ``prior``, ``ridge``) must match one of the
    model's ``layers`` (a glob naming only another module, or an unsupported layer, whose
    parameters take the fallback rule, would be ignored). Not for a solve of some layers only
    (:func:`~jaxmerge.solve_stats` of a part of the model), where the other globs apply to the
    other parts."""
    layers = list(layers)

    def hint(pattern):
        inside = any(fnmatch.fnmatchcase(p, f"{pattern}/*") for p in layers)
        return f"the layers merged by output matching are {layers[:8]}" + (
            f"; for the layers inside {pattern!r} use {pattern + '/*'!r}" if inside else ""
        )

    for what, option in options.items():
        _check_patterns(option, what, layers, "layer", hint)


def _check_prior_has_effect(prior, ridges) -> None:
    """A prior given as a value, or a glob of a ``{glob: value}`` prior, whose layers (``ridges``:
    each layer's resolved ridge) all have ridge 0 is never used: the ridge is what pulls toward
    it. A callable prior (a basis factory's, such as :func:`~jaxmerge.ties_basis`'s, unpacked
    beside its basis) is exempt."""
    if prior is None or (callable(prior) and not isinstance(prior, Mapping)):
        return
    fix = (
        "the ridge pulls the merge toward the prior (ridge=λ > 0; ridge=inf returns it): give "
        "those layers a ridge, or drop"
    )
    if not isinstance(prior, Mapping):
        if ridges and not any(ridges.values()):
            raise ValueError(
                f"merge: prior is given but ridge is 0 for every layer, so the prior has no "
                f"effect; {fix} prior."
            )
        return
    won: dict[str, list[str]] = {}
    for path in ridges:
        pattern = next((g for g in prior if fnmatch.fnmatchcase(path, g)), None)
        if pattern is not None:
            won.setdefault(pattern, []).append(path)
    for pattern, paths in won.items():
        if not any(ridges[p] for p in paths):
            raise ValueError(
                f"merge: the prior pattern {pattern!r} has no effect: ridge is 0 for every layer "
                f"it applies to ({', '.join(map(repr, paths[:3]))}"
                f"{', ...' if len(paths) > 3 else ''}); {fix} the pattern."
            )


def _options(plan_specs, basis, prior, ridge, alpha, rcond):
    """Every layer's :class:`_Options`, each value checked."""
    _check_scalars(alpha, rcond)
    out = {}
    for path in plan_specs:
        r = _resolve(ridge, path, 0.0, "ridge")
        _check_ridge(r, f" for layer {path!r}")
        b = check_basis(_resolve(basis, path, "full", "basis"), f"merge: layer {path!r}")
        p = _resolve(prior, path, None, "prior")
        _check_prior(p, f" for layer {path!r}")
        out[path] = _Options(basis=b, prior=p, ridge=float(r), alpha=alpha, rcond=rcond)
    _check_prior_has_effect(prior, {path: o.ridge for path, o in out.items()})
    return out
