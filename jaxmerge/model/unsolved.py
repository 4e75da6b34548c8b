"""What a merge left unsolved: every parameter that a fine-tune changed and that output matching
did not solve, with the reason, and the warning or error that says so.

A parameter is *unsolved* when at least one fine-tune changed it (it is not bit-identical to the
base) and no captured layer holds it: it takes its fallback rule (``"mean"``, ``"base"``, task
arithmetic), which does not look at the calibration data. Its reason is the most specific one the
plan's trace allows, checked in this order:

* an integer parameter (never merged; it keeps the base's value);
* a leaf of a linen collection other than ``params`` (``batch_stats``, ...);
* its layer was captured with other parameter shapes than the tree's (a lifted transform such
  as ``nn.map_variables`` maps them): the plan dropped it;
* the forward pass does not read it (no equation of the traced call uses it);
* its layer was called with configurations its kind cannot solve as one layer;
* its module's class is registered, but the kind refused the module's configuration
  (:meth:`~jaxmerge.LayerKind.accepts`) or the call (:meth:`~jaxmerge.LayerKind.describe`), or
  reads other parameters;
* its module's class is a subclass of a registered class (registered classes match exactly);
* its module's class is not a registered layer kind;
* no module the pass called holds it.

:func:`~jaxmerge.merge` warns about the unsolved parameters
(:class:`UnsolvedParametersWarning`), or raises :class:`UnsolvedParametersError` with
``strict=True`` before any statistics are collected; parameters whose fallback rule the caller
chose by path (a ``fallback`` glob naming them, or a callable) are listed in the report but
neither warned about nor refused.
"""

import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping

import jax.numpy as jnp

__all__ = [
    "UnsolvedParametersError",
    "UnsolvedParametersWarning",
    "check_unsolved",
    "find_unsolved",
    "plan_reasons",
    "stats_reasons",
    "warn_unsolved",
]

_SHOWN = 3  # paths named in the warning's and the error's message


class UnsolvedParametersWarning(UserWarning):
    """Parameters the fine-tunes changed were not solved by output matching.

    Emitted once per :func:`~jaxmerge.merge` (and :func:`~jaxmerge.merge_in_groups`,
    :func:`~jaxmerge.solve_stats`) whose :attr:`MergeReport.unsolved
    <jaxmerge.MergeReport.unsolved>` holds parameters whose fallback rule the caller did not
    choose by path. The message names how many, the first paths with their rules and reasons,
    and the ways out: register the layer's class (:func:`~jaxmerge.register_kind`), accept the
    fallback by naming the paths in ``fallback=``, make it an error with ``strict=True``, or
    silence it with :func:`warnings.filterwarnings`.

    Examples:
        A module class that is no registered layer kind: its parameter falls back to the mean.

        >>> import warnings, jax.numpy as jnp, flax.linen as nn, jaxmerge as jm
        >>> class Scale(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return x * self.param("w", nn.initializers.ones, (2,))
        >>> base, fts = {"w": jnp.ones(2)}, [{"w": jnp.full(2, 2.0)}, {"w": jnp.full(2, 4.0)}]
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     merged, report = jm.merge(Scale(), base, fts, [[jnp.ones((1, 2))]] * 2,
        ...                               progress=False)
        >>> [w.category.__name__ for w in caught], merged["w"].tolist()
        (['UnsolvedParametersWarning'], [3.0, 3.0])
        >>> report.unsolved
        {'w': "module class 'Scale' (linen) is not a registered layer kind"}
    """


UnsolvedParametersWarning.__module__ = "jaxmerge"  # its public path (exported by jaxmerge)


class UnsolvedParametersError(ValueError):
    """A ``strict=True`` merge left parameters the fine-tunes changed unsolved.

    Raised by :func:`~jaxmerge.merge`, :func:`~jaxmerge.merge_in_groups` and
    :func:`~jaxmerge.solve_stats` with ``strict=True`` before any statistics are collected or
    solved, with the message of :class:`UnsolvedParametersWarning`.

    Attributes:
        unsolved: ``{parameter path: reason}`` of the parameters refused.
    """

    def __init__(self, message: str, unsolved: Mapping[str, str]):
        super().__init__(message)
        self.unsolved = dict(unsolved)


UnsolvedParametersError.__module__ = "jaxmerge"


# ---- which parameters, and why ------------------------------------------------------------------


def find_unsolved(trees, specs: Iterable, reason: Callable[[str], str]) -> dict[str, str]:
    """``{path: reason(path)}`` (in the base's order) of the parameters of ``trees`` (a
    :class:`~jaxmerge.model.trees._Trees`) that a fine-tune changed and no layer of ``specs``
    holds."""
    solved = {spec.leaf(n) for spec in specs for n in spec.param_names}
    return {p: reason(p) for p in trees.base_flat if p not in solved and p not in trees.unchanged}


def _common_reason(trees, path: str) -> str | None:
    """The reasons that need no trace: an integer parameter, another linen collection."""
    if not jnp.issubdtype(jnp.result_type(trees.base_flat[path]), jnp.floating):
        return "an integer parameter: integer parameters are never merged (they keep the base's)"
    top = path.split("/")[0]
    if "params" in trees.base and top != "params" and top in trees.base and "/" in path:
        return (
            f"in the linen collection {top!r}, not 'params': only parameters of called layers "
            "are solved by output matching"
        )
    return None


def stats_reasons(trees) -> Callable[[str], str]:
    """The reasons of :func:`~jaxmerge.solve_stats`, which has statistics and no model."""

    def reason(path: str) -> str:
        return _common_reason(trees, path) or (
            "no layer of the statistics holds it (jaxmerge.merge of the model names the reason "
            "its layer was not captured)"
        )

    return reason


def plan_reasons(plan, trees) -> Callable[[str], str]:
    """The reasons of a merge traced by ``plan`` (:class:`~jaxmerge.model.plan._Plan`: its
    ``modules``, ``captured``, ``lifted`` and ``used``)."""
    linen = hasattr(plan.model, "module")

    def reason(path: str) -> str:
        common = _common_reason(trees, path)
        if common is not None:
            return common
        if path in plan.lifted:
            return plan.lifted[path]
        if path not in plan.used:
            return "not used in the forward pass (the traced call of the model does not read it)"
        owner = path.rpartition("/")[0]
        if not linen:  # an NNX parameter may sit in a container (a dict, a list) of its module
            while owner not in plan.modules and owner:
                owner = owner.rpartition("/")[0]
        seen = plan.modules.get(owner)
        if not seen:
            return "not a parameter of any called module"
        inner = any(p.startswith(f"{owner}/") or (p and not owner) for p in plan.modules)
        return _module_reason(owner, seen, owner in plan.captured, inner)

    return reason


def _module_reason(owner: str, seen: list, captured: bool, inner: bool) -> str:
    """The reason for a parameter of the module(s) ``seen`` at path ``owner``; ``captured``:
    a layer was captured there; ``inner``: the module holds other modules."""
    where = repr(owner) if owner else "the root module"
    registered = [m for m in seen if m.kind is not None]
    if registered:
        m = registered[-1]
        name = m.cls.__name__ + (f", {m.settings}" if m.settings else "")
        if captured:
            return f"the {m.kind!r} kind does not read this parameter of {where} ({name})"
        if m.accepts is False:
            return (
                f"the {m.kind!r} kind does not cover this configuration of {where} ({name}): "
                "its accepts() refuses it"
            )
        if m.api == "linen":
            inputs = f"; inputs {m.inputs}" if m.inputs else ""
            method = "" if m.method == "__call__" else f"; its {m.method}() method"
            return (
                f"the {m.kind!r} kind does not cover this call of {where} ({name}{method}"
                f"{inputs}): it found no layer it can solve there"
            )
        return (
            f"the {m.kind!r} layer {where} ({name}) was not captured: the kind does not cover "
            "its call, or it runs inside a JAX transform applied before the merge began (a "
            "function decorated with jax.checkpoint or jax.vmap at import), which cannot run "
            "inline: apply the transform at call time, or call the layer outside it"
        )
    subclasses = [m for m in seen if m.parent is not None]
    if subclasses:
        m = subclasses[-1]
        return (
            f"{where} ({m.cls.__name__}) is a subclass of {_public_name(m.parent)} (kind "
            f"{m.parent_kind!r}); registered classes match exactly: register it with "
            "jaxmerge.register_kind"
        )
    m = seen[-1]
    own = " (a parameter of the root module itself, not of a layer in it)" if (
        inner and not owner) else ""  # fmt: skip
    return f"module class {m.cls.__name__!r} ({m.api}) is not a registered layer kind{own}"


def _public_name(cls: type) -> str:
    """The shortest imported module path that exports ``cls``: ``flax.nnx.Linear``."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__name__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


# ---- saying so ----------------------------------------------------------------------------------


def _pending(unsolved: Mapping[str, str], trees) -> dict[str, str]:
    """The unsolved parameters whose fallback the caller did not choose by path."""
    return {p: r for p, r in unsolved.items() if p not in trees.chosen}


def _example_rule(rule: str) -> str:
    if rule.startswith("task_arithmetic("):
        return rule[len("task_arithmetic(") : -1]
    return repr(rule)


def _message(caller: str, pending: Mapping[str, str], trees, *, strict: bool) -> str:
    n = len(pending)
    groups: dict[tuple, list[str]] = {}  # the parameters of one module with one rule and reason
    for p, r in pending.items():
        groups.setdefault((p.rpartition("/")[0], trees.rules[p], r), []).append(p)
    shown = "; ".join(
        f"{', '.join(map(repr, paths))} ({rule}: {reason})"
        for (_, rule, reason), paths in list(groups.items())[:_SHOWN]
    )
    rest = n - sum(len(paths) for paths in list(groups.values())[:_SHOWN])
    more = f"; and {rest} more" if rest else ""
    first = next(iter(pending))
    example = f"fallback={{{first!r}: {_example_rule(trees.rules[first])}}}"
    head = (
        f"{caller}: {n} parameter{'' if n == 1 else 's'} the fine-tunes changed "
        f"{'was' if n == 1 else 'were'} not solved by output matching"
    )
    register = (
        "Register a layer's class with jaxmerge.register_kind (subclasses of registered classes "
        "too: classes match exactly)"
    )
    if strict:
        return (
            f"{head}: {shown}{more}. strict=True: nothing was merged. {register}; or accept "
            f"the fallback rule by naming the parameters in fallback= (e.g. {example}); or pass "
            "strict=False to merge with a warning instead."
        )
    return (
        f"{head} and took their fallback rule instead: {shown}{more} (report.unsolved lists "
        f"them all with their reasons). {register}; accept the fallback by naming the "
        f"parameters in fallback= (e.g. {example}); make this an error with strict=True; or "
        "silence it with warnings.filterwarnings('ignore', "
        "category=jaxmerge.UnsolvedParametersWarning)."
    )


def check_unsolved(unsolved: Mapping[str, str], trees, *, strict: bool, caller: str) -> None:
    """With ``strict``, raise :class:`UnsolvedParametersError` for the parameters of
    ``unsolved`` whose fallback the caller did not choose by path."""
    if not isinstance(strict, bool):
        raise TypeError(f"{caller}: strict must be True or False, got {strict!r}.")
    pending = _pending(unsolved, trees)
    if strict and pending:
        raise UnsolvedParametersError(_message(caller, pending, trees, strict=True), pending)


def warn_unsolved(unsolved: Mapping[str, str], trees, *, caller: str) -> None:
    """Emit one :class:`UnsolvedParametersWarning` for the parameters of ``unsolved`` whose
    fallback the caller did not choose by path, attributed to the innermost frame outside
    jaxmerge (the user's call of ``caller``)."""
    pending = _pending(unsolved, trees)
    if not pending:
        return
    # stacklevel 1 is this frame; skip jaxmerge's frames and those of the type-checking
    # wrappers that instrument it in the tests (jaxtyping, beartype)
    frame, level = sys._getframe(0), 1
    while frame is not None and (
        os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)
        or str(frame.f_globals.get("__name__", "")).split(".")[0] in ("jaxtyping", "beartype")
    ):
        frame, level = frame.f_back, level + 1
    message = _message(caller, pending, trees, strict=False)
    warnings.warn(message, UnsolvedParametersWarning, stacklevel=level)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
