"""Layer kinds: the interface (:mod:`.base`), the registry (:mod:`.registry`) and the built-in
kinds, one module each.

Importing this package registers the built-in kinds; a user's kind registers the same way
(:func:`register_kind`).
"""

from . import conv, dense, einsum, embed, library, norm  # noqa: F401  (registers the built-in kinds)
from .base import AffineKind, CallShape, LayerKind, LayerSpec
from .einsum import EinsumCall, EinsumKind, GroupedStats, register_layer
from .embed import EmbedStats, TiedStats, register_embedding
from .norm import register_norm
from .registry import kind_of, kinds, register_kind

__all__ = [
    "AffineKind",
    "CallShape",
    "EinsumCall",
    "EinsumKind",
    "GroupedStats",
    "EmbedStats",
    "LayerKind",
    "LayerSpec",
    "TiedStats",
    "kind_of",
    "kinds",
    "register_embedding",
    "register_kind",
    "register_layer",
    "register_norm",
]
