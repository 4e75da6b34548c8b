"""The registry of layer kinds: kinds by name, and the Flax module classes each covers (by class
or by qualified name, linen and NNX apart); :class:`Rules`, the per-class rules of the kinds that
read several classes (einsum layers, norms, embeddings)."""

from collections.abc import Iterable, Mapping
from typing import Any

from .base import LayerKind

__all__ = ["Rules", "api_of", "kind_of", "kinds", "linen_kind", "nnx_kind", "qualified_name",
           "register_kind", "rule_of"]  # fmt: skip

_KINDS: dict[str, LayerKind] = {}
_LINEN: dict[type | str, LayerKind] = {}
_NNX: dict[type | str, LayerKind] = {}


def qualified_name(cls: type) -> str:
    """``"module.QualName"`` of a class, the key of a class registered by name."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_kind(
    kind: LayerKind, *, linen: Iterable[type | str] = (), nnx: Iterable[type | str] = ()
):
    """Register a layer kind and the Flax module classes it covers.

    Classes match exactly (a subclass is not its parent's kind unless registered itself). A
    class may be given by its qualified name (``"gemma.gm.nn._layers.Einsum"``, as
    :func:`qualified_name` writes it), so that a library's classes are matched without
    importing the library. A class registered again moves to the new kind; a kind registered
    again under its name replaces the old one.

    Args:
        kind: a :class:`LayerKind` instance (usually of an :class:`AffineKind` subclass).
        linen: ``flax.linen.Module`` classes (or qualified names) whose ``__call__`` is one call
            of this kind.
        nnx: ``flax.nnx.Module`` classes (or qualified names), likewise.

    Returns:
        ``kind``.

    Raises:
        TypeError: ``kind`` is not a :class:`LayerKind`, or a class is not a Flax module of the
            named API.
        ValueError: the kind has no name, or a name is not a qualified class name.

    Examples:
        >>> import jaxmerge as jm, flax.linen as nn
        >>> jm.kind_of("dense").name, jm.linen_kind(nn.Dense).name
        ('dense', 'dense')
    """
    import flax.linen
    from flax import nnx as flax_nnx

    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_kind: kind must be a LayerKind, got {type(kind).__name__}.")
    if not isinstance(getattr(kind, "name", None), str) or not kind.name:
        raise ValueError(f"register_kind: {type(kind).__name__} needs a non-empty `name`.")
    linen, nnx = list(linen), list(nnx)
    for api, classes, module_type in (
        ("linen", linen, flax.linen.Module),
        ("nnx", nnx, flax_nnx.Module),
    ):
        for cls in classes:
            if isinstance(cls, str):
                if "." not in cls.strip("."):
                    raise ValueError(
                        f"register_kind: {api}= class name {cls!r} (kind {kind.name!r}) is not "
                        "qualified: give 'package.module.ClassName'."
                    )
            elif not (isinstance(cls, type) and issubclass(cls, module_type)):
                raise TypeError(
                    f"register_kind: {api}= takes {module_type.__module__}.Module classes or "
                    f"their qualified names, got {cls!r} (kind {kind.name!r})."
                )
    _KINDS[kind.name] = kind
    _LINEN.update(dict.fromkeys(linen, kind))
    _NNX.update(dict.fromkeys(nnx, kind))
    return kind


def kind_of(name: str) -> LayerKind:
    """The registered kind called ``name`` (a :class:`LayerSpec`'s ``kind``).

    Raises:
        ValueError: no kind of that name is registered (e.g. statistics saved with a user's
            kind, loaded before it was registered).
    """
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(
            f"unknown layer kind {name!r}; registered kinds: {sorted(_KINDS)}. Register it with "
            "jaxmerge.register_kind first."
        )
    return kind


def _lookup(table, cls):
    kind = table.get(cls)
    return table.get(qualified_name(cls)) if kind is None else kind


def rule_of(rules: Mapping, module):
    """The rule registered for ``module``'s class (or for ``module``, a class), by the class or
    by its qualified name."""
    cls = module if isinstance(module, type) else type(module)
    rule = rules.get(cls)
    return rules[qualified_name(cls)] if rule is None else rule


def api_of(cls, api: str | None, caller: str) -> str:
    """``"linen"`` or ``"nnx"``: the API of a module class, or ``api`` for a class given by
    name."""
    import flax.linen
    from flax import nnx as flax_nnx

    if isinstance(cls, str):
        if api not in ("linen", "nnx"):
            raise ValueError(f"{caller}: {cls!r} is a class name: say api='linen' or 'nnx'.")
        return api
    if isinstance(cls, type) and issubclass(cls, flax.linen.Module):
        return "linen"
    if isinstance(cls, type) and issubclass(cls, flax_nnx.Module):
        return "nnx"
    raise TypeError(f"{caller}: expected a Flax module class or its qualified name, got {cls!r}.")


def linen_kind(cls: type) -> LayerKind | None:
    """The kind registered for a linen module class (or its qualified name), or ``None``."""
    return _lookup(_LINEN, cls)


def nnx_kind(cls: type) -> LayerKind | None:
    """The kind registered for an NNX module class (or its qualified name), or ``None``."""
    return _lookup(_NNX, cls)


def kinds() -> dict[str, LayerKind]:
    """``{name: kind}`` of every registered kind."""
    return dict(_KINDS)


class Rules:
    """A kind's covered classes, each with its rule (what the kind needs to read that class:
    its input argument, parameter names, equation, offset, ...), by class or qualified name."""

    def __init__(self):
        self.rules: dict[type | str, Any] = {}

    def rule(self, module):
        """The rule of ``module``'s class (or of ``module``, a class)."""
        return rule_of(self.rules, module)

    def cover(self, cls: type | str, rule, api: str | None, caller: str):
        """Register ``cls`` (a Flax module class, or its qualified name with ``api``) as this
        kind's, read with ``rule``; returns the kind. ``caller``: the public function, for
        errors."""
        api = api_of(cls, api, caller)
        self.rules[cls] = rule
        return register_kind(self, **{api: [cls]})
