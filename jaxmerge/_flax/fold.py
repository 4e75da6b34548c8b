"""Parameter trees: flatten to paths, check fine-tunes against the base, fold merged values back.

Trees are linen variable dicts (``{"params": ..., "batch_stats": ...}``), bare linen params, NNX
``State`` objects or nested dicts of arrays. A leaf's path is its '/'-joined keys with a leading
``params`` dropped, so ``"Dense_0/kernel"`` in linen and ``"layers/0/kernel"`` in NNX; leaves of
other linen collections keep their collection name (``"batch_stats/BatchNorm_0/mean"``).
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def to_pure(tree):
    """A nested dict of arrays (NNX states become their pure dicts)."""
    if isinstance(tree, nnx.State):
        return nnx.to_pure_dict(tree)
    if not isinstance(tree, Mapping):
        raise TypeError(
            f"merge: parameters must be a dict of arrays (linen), an nnx.State or a nested "
            f"mapping, got {type(tree).__name__}."
        )
    return tree


def has_collections(tree) -> bool:
    """Whether a (pure) tree is a linen variables dict with a ``params`` collection."""
    return "params" in tree and isinstance(tree["params"], Mapping)


def path_of(keys, *, params: bool = False) -> str:
    """The one tree-path convention: a pytree key path as its dict keys, attribute names and
    sequence indices joined by ``/``, a leading ``"params"`` dropped unless ``params``."""
    names = []
    for key in keys:
        if isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(getattr(key, "key", key)))
    return "/".join(names[1:] if names[:1] == ["params"] and not params else names)


def flatten(tree, what: str = "base"):
    """``({path: leaf}, treedef)`` of a pure tree (nested mappings only)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for keys, leaf in leaves:
        for key in keys:
            if not isinstance(key, jax.tree_util.DictKey):
                raise TypeError(
                    f"merge: {what} holds a {type(key).__name__} container at "
                    f"{jax.tree_util.keystr(keys)}; parameter trees must be nested mappings."
                )
        flat[path_of(keys, params=not has_collections(tree))] = leaf
    return flat, treedef


def unflatten(treedef, flat: Mapping, order) -> object:
    """The tree of ``treedef`` with leaves ``flat[path]`` in the order of ``order``."""
    return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in order])


def from_pure(like, pure):
    """``pure`` in the container type of ``like`` (an NNX state stays a state)."""
    if isinstance(like, nnx.State):
        state = jax.tree.map(lambda a: a, like)
        nnx.replace_by_pure_dict(state, pure)
        return state
    return pure


def check_trees(base_flat, base_def, finetuned_flats_defs) -> None:
    """Same paths, shapes and dtypes in every fine-tune as in the base, or a clear error."""
    for k, (flat, treedef) in enumerate(finetuned_flats_defs):
        if treedef != base_def or set(flat) != set(base_flat):
            missing = sorted(set(base_flat) - set(flat))
            extra = sorted(set(flat) - set(base_flat))
            raise ValueError(
                f"merge: finetuned[{k}] does not have the base's parameter tree; missing: "
                f"{missing[:5] or 'none'}, unexpected: {extra[:5] or 'none'}"
                + ("" if missing or extra else " (same paths, different containers)")
                + ". Every fine-tune must be a copy of the base's tree."
            )
        for path, leaf in base_flat.items():
            other = flat[path]
            if np.shape(other) != np.shape(leaf):
                raise ValueError(
                    f"merge: parameter {path!r} has shape {np.shape(other)} in finetuned[{k}] "
                    f"but {np.shape(leaf)} in the base."
                )
            if jnp.result_type(other) != jnp.result_type(leaf):
                raise TypeError(
                    f"merge: parameter {path!r} has dtype {jnp.result_type(other)} in "
                    f"finetuned[{k}] but {jnp.result_type(leaf)} in the base; cast the "
                    "fine-tunes to the base's dtypes."
                )


def cast_like(value, like):
    """``value`` with the dtype and sharding (or numpy-ness) of ``like``."""
    dtype = jnp.result_type(like)
    if isinstance(like, jax.Array):
        return jax.device_put(jnp.asarray(value).astype(dtype), like.sharding)
    if isinstance(like, np.ndarray):
        return np.asarray(value).astype(dtype)
    return jnp.asarray(value).astype(dtype)
