"""Layer kinds: the interface (:mod:`.base`) and the built-in kinds, one module each.

Importing this package registers the built-in kinds; a user's kind registers the same way
(:func:`register_kind`).
"""

from . import conv, dense, embed, norm  # noqa: F401  (registers the built-in kinds)
from .base import AffineKind, CallShape, LayerKind, LayerSpec, kind_of, kinds, register_kind
from .embed import EmbedStats

__all__ = [
    "AffineKind",
    "CallShape",
    "EmbedStats",
    "LayerKind",
    "LayerSpec",
    "kind_of",
    "kinds",
    "register_kind",
]
