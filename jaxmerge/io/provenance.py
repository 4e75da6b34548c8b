"""Where statistics came from: fingerprints of parameter trees and of calibration batches, and the
comparison of a recorded source with the inputs at hand.

A fingerprint is the SHA-256 of every leaf's path, dtype, shape and bytes (leaves in path order),
so it changes with any bit of any parameter or batch and not with how the tree was loaded (an
Orbax checkpoint, a safetensors file, NNX or linen containers of the same leaves). Statistics
record the fingerprints of the fine-tuned trees and of each task's batches; a resume or a solve
compares them with its own inputs (:func:`differences`).
"""

import hashlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from .._flax.fold import flatten, to_pure


def _add_leaf(digest, name: str, leaf, what: str) -> None:
    array = np.asarray(jax.device_get(leaf))
    if array.dtype == object:
        raise TypeError(
            f"{what}: {name or 'the leaf'} is a {type(leaf).__name__}, which has no stable bytes "
            "to fingerprint; use arrays."
        )
    digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
    digest.update(np.ascontiguousarray(array).tobytes())


def tree_fingerprint(tree, what: str = "fingerprint") -> str:
    """Hex SHA-256 of a parameter tree (linen params or variables, an NNX state, nested dicts)."""
    flat, _ = flatten(to_pure(tree), what)
    digest = hashlib.sha256()
    for path in sorted(flat):
        _add_leaf(digest, path, flat[path], what)
    return digest.hexdigest()


def add_batch(digest, batch, what: str = "fingerprint") -> None:
    """Add one batch (a pytree of arrays or numbers) to a running ``hashlib`` digest."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    digest.update(f"{treedef}\0".encode())
    for path, leaf in leaves:
        _add_leaf(digest, jax.tree_util.keystr(path), leaf, what)


def short(fingerprint: str | None) -> str:
    """The first 12 hex digits (for messages)."""
    return "none" if fingerprint is None else fingerprint[:12]


def differences(recorded: Mapping[str, Any], actual: Mapping[str, Any]) -> list[str]:
    """``"key: recorded X, now Y"`` for every key whose values differ (fingerprints shortened)."""

    def show(value):
        return short(value) if isinstance(value, str) and len(value) == 64 else repr(value)

    return [
        f"{key}: recorded {show(recorded.get(key))}, now {show(actual.get(key))}"
        for key in sorted(set(recorded) | set(actual))
        if recorded.get(key) != actual.get(key)
    ]
