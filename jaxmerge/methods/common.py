"""The pytree plumbing the methods share: flattening base and fine-tunes, task vectors in at
least float32, per-layer scales ``λ`` and the combination ``θ₀ + Σₖ λₖ Bₖ``."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from .._flax.fold import path_of

Scale = float | ArrayLike | Sequence[float | int] | Mapping[str, Any] | Callable[[str], Any]
"""``λ``: a number, one per task ``(K,)``, or per layer: a mapping or callable from layer path
to a number or ``(K,)`` array."""


# ---- pytree plumbing -----------------------------------------------------------------------


def flatten_params(fn: str, tree, what: str):
    """``(paths, leaves, treedef)`` of a parameter pytree whose leaves are floating arrays."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_of(kp) for kp, _ in flat]
    leaves = []
    for path, (_, leaf) in zip(paths, flat, strict=True):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{fn}: {what} parameter '{path}' has dtype {leaf.dtype}; parameters must be "
                "floating point (leave integer state such as step counters out of the tree)."
            )
        leaves.append(leaf)
    if not leaves:
        raise ValueError(f"{fn}: {what} has no parameters (an empty pytree).")
    return paths, leaves, treedef


def flatten_models(fn: str, base, finetuned):
    """Check ``finetuned`` against ``base``; return paths, base leaves, K leaf lists, treedef."""
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence) or not finetuned:
        raise ValueError(
            f"{fn}: finetuned must be a non-empty sequence (list or tuple) of parameter pytrees, "
            f"one per task; got {type(finetuned).__name__}."
        )
    paths, base_leaves, treedef = flatten_params(fn, base, "base")
    models = []
    for k, tree in enumerate(finetuned):
        other_paths, leaves, other_def = flatten_params(fn, tree, f"finetuned[{k}]")
        if other_def != treedef:
            missing = sorted(set(paths) - set(other_paths))[:5]
            extra = sorted(set(other_paths) - set(paths))[:5]
            raise ValueError(
                f"{fn}: finetuned[{k}] does not have the base's tree structure; missing "
                f"{missing}, unexpected {extra} (structures: {treedef} vs {other_def})."
            )
        for path, a, b in zip(paths, base_leaves, leaves, strict=True):
            if a.shape != b.shape:
                raise ValueError(
                    f"{fn}: finetuned[{k}] parameter '{path}' has shape {b.shape}; the base's "
                    f"has {a.shape}."
                )
        models.append(leaves)
    return paths, base_leaves, models, treedef


def work_dtype(leaf):
    return jnp.promote_types(leaf.dtype, jnp.float32)


def _deltas(base_leaves, models):
    """Task vectors ``τₖ = θₖ − θ₀`` as K leaf lists, in at least float32."""
    return [
        [
            t.astype(work_dtype(b)) - b.astype(work_dtype(b))
            for b, t in zip(base_leaves, m, strict=True)
        ]
        for m in models
    ]


def layer_of(path: str) -> str:
    """The layer path of a leaf path (its last key dropped)."""
    return path.rpartition("/")[0]


def check_scale_keys(fn: str, scale: Scale, layers) -> None:
    """Every key of a per-layer ``scale`` mapping must be a layer path of the tree (an entry
    naming no layer would be ignored)."""
    if not isinstance(scale, Mapping):
        return
    layers = sorted(set(layers))
    unknown = [key for key in scale if key not in layers]
    if unknown:
        raise ValueError(
            f"{fn}: scale has entries for no layer of the parameters: {unknown[:5]}; its keys "
            f"are layer paths (a leaf path without its last key), here {layers[:8]}."
        )


def scale_at(fn: str, scale: Scale, layer: str, num_tasks: int):
    """``λ`` for one layer, broadcast to ``(num_tasks,)``."""
    if isinstance(scale, Mapping):
        if layer not in scale:
            raise ValueError(
                f"{fn}: scale has no entry for layer '{layer}'; a per-layer scale needs one "
                f"entry per layer path (keys given: {sorted(scale)[:5]}...)."
            )
        value = scale[layer]
    elif callable(scale):
        value = scale(layer)
    else:
        value = scale
    try:
        value = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{fn}: scale for layer '{layer}' is {value!r:.60}; give numbers."
        ) from None
    if value.shape not in ((), (num_tasks,)):
        raise ValueError(
            f"{fn}: scale for layer '{layer}' has shape {value.shape}; expected a number or one "
            f"value per task, ({num_tasks},)."
        )
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(f"{fn}: scale for layer '{layer}' has dtype {value.dtype}; give numbers.")
    # on the host: one check per leaf, no device round trip or compiled program each
    if not isinstance(value, jax.core.Tracer) and not np.isfinite(np.asarray(value)).all():
        raise ValueError(
            f"{fn}: scale for layer '{layer}' is {value.tolist()}; it must be finite (a NaN or "
            "infinite λ makes the merged parameters NaN or infinite)."
        )
    return jnp.broadcast_to(value, (num_tasks,))


def _combine(fn, paths, base_leaves, directions, scale, treedef):
    """``θ₀ + Σₖ λₖ Bₖ`` leaf by leaf, cast back to the base dtypes."""
    check_scale_keys(fn, scale, [layer_of(p) for p in paths])
    out = []
    for i, (path, b) in enumerate(zip(paths, base_leaves, strict=True)):
        lam = scale_at(fn, scale, layer_of(path), len(directions))
        dtype = work_dtype(b)
        update = sum(lam[k].astype(dtype) * d[i] for k, d in enumerate(directions))
        out.append((b.astype(dtype) + update).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


def check_weights(fn: str, weights, num_tasks: int):
    """Model weights ``wₖ``: ``(K,)``, finite, nonnegative, a positive sum (unless traced);
    default uniform."""
    w = jnp.ones(num_tasks) if weights is None else jnp.asarray(weights)
    if w.shape != (num_tasks,):
        raise ValueError(
            f"{fn}: weights have shape {w.shape}; expected one per task, ({num_tasks},)."
        )
    if not isinstance(w, jax.core.Tracer) and not (
        bool(jnp.all(jnp.isfinite(w) & (w >= 0))) and float(w.sum()) > 0
    ):
        raise ValueError(
            f"{fn}: weights must be nonnegative and finite with a positive sum; got {w}."
        )
    return w


def _check_option(fn: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {list(allowed)}, got {value!r}.")


# ---- soups and task arithmetic -------------------------------------------------------------
