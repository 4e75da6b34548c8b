"""The classic merges over whole parameter pytrees: soups, task arithmetic, TIES and DARE.

Notation: base parameters ``θ₀``, fine-tuned parameters ``θₖ`` (``k = 1..K``), task vectors
``τₖ = θₖ − θ₀``. Every method here is ``θ = θ₀ + Σₖ λₖ Bₖ`` for *processed task vectors* ``Bₖ``:

==================  =============================================================  ===========
method              ``Bₖ``                                                          ``λₖ``
==================  =============================================================  ===========
soup                ``τₖ``                                                          ``wₖ / Σw``
task arithmetic     ``τₖ``                                                          ``scale``
TIES                trimmed, sign-agreeing part of ``τₖ`` (÷ count of agreeing     ``scale``
                    models for ``aggregate="mean"``)
DARE                ``mₖ ⊙ τₖ / (1 − p)``, Bernoulli masks ``mₖ`` (optionally then  ``scale``
                    TIES' sign election and disjoint merge)
==================  =============================================================  ===========

so each is the merge QP with ``Custom`` directions ``Bₖ`` at ridge ``∞`` and prior ``λ`` (see
``jaxmerge.ties_basis``, ``jaxmerge.dare_basis``). The helpers ``task_vectors``,
``ties_task_vectors`` and ``dare_task_vectors`` return the ``Bₖ``.

Parameter pytrees are Flax-style nested dicts (any JAX pytree works). A leaf's *path* is its
'/'-joined keys without a leading ``"params"`` (``"Dense_0/kernel"``); its *layer path* drops the
leaf name (``"Dense_0"``). Arithmetic runs in at least float32 and every merged leaf is cast back
to the base leaf's dtype, so the result has the base's tree structure and dtypes.

All functions are jittable: arrays, ``scale``, ``weights`` and ``drop_rate`` may be traced; the
string options and ``density`` are static (bind them with :func:`functools.partial`).
"""

import functools
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import ArrayLike, Float, PyTree

__all__ = [
    "task_vectors",
    "soup",
    "task_arithmetic",
    "ties_task_vectors",
    "ties",
    "dare_masks",
    "dare_task_vectors",
    "dare",
]

Scale = float | ArrayLike | Sequence[float | int] | Mapping[str, Any] | Callable[[str], Any]
"""``λ``: a number, one per task ``(K,)``, or per layer: a mapping or callable from layer path
to a number or ``(K,)`` array."""


# ---- pytree plumbing -----------------------------------------------------------------------


def key_names(keypath) -> list[str]:
    """The keys of a pytree key path as strings, a leading ``"params"`` dropped."""
    names = []
    for key in keypath:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        else:
            names.append(str(getattr(key, "key", key)))
    return names[1:] if names[:1] == ["params"] else names


def flatten_params(fn: str, tree, what: str):
    """``(paths, leaves, treedef)`` of a parameter pytree whose leaves are floating arrays."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(key_names(kp)) for kp, _ in flat]
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
    value = jnp.asarray(value)
    if value.shape not in ((), (num_tasks,)):
        raise ValueError(
            f"{fn}: scale for layer '{layer}' has shape {value.shape}; expected a number or one "
            f"value per task, ({num_tasks},)."
        )
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
        raise TypeError(f"{fn}: scale for layer '{layer}' has dtype {value.dtype}; give numbers.")
    return jnp.broadcast_to(value, (num_tasks,))


def _combine(fn, paths, base_leaves, directions, scale, treedef):
    """``θ₀ + Σₖ λₖ Bₖ`` leaf by leaf, cast back to the base dtypes."""
    out = []
    for i, (path, b) in enumerate(zip(paths, base_leaves, strict=True)):
        lam = scale_at(fn, scale, layer_of(path), len(directions))
        dtype = work_dtype(b)
        update = sum(lam[k].astype(dtype) * d[i] for k, d in enumerate(directions))
        out.append((b.astype(dtype) + update).astype(b.dtype))
    return jax.tree.unflatten(treedef, out)


def _check_option(fn: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{fn}: {name} must be one of {list(allowed)}, got {value!r}.")


# ---- soups and task arithmetic -------------------------------------------------------------


def task_vectors(base: PyTree, finetuned: Sequence[PyTree]) -> list[PyTree]:
    """The task vectors ``τₖ = θₖ − θ₀``, one pytree per fine-tune.

    Args:
        base: base parameters ``θ₀`` (a pytree of floating arrays).
        finetuned: the ``K`` fine-tuned parameter pytrees, each shaped like ``base``.

    Returns:
        ``K`` pytrees with the base's structure, in at least float32.

    Raises:
        ValueError: a fine-tune's structure or a leaf's shape differs from the base.
        TypeError: a leaf is not floating point.

    Examples:
        >>> import jax.numpy as jnp
        >>> tau = task_vectors({"w": jnp.array([1.0, 2.0])}, [{"w": jnp.array([1.5, 1.0])}])
        >>> tau[0]["w"].tolist()
        [0.5, -1.0]
    """
    _, base_leaves, models, treedef = flatten_models("task_vectors", base, finetuned)
    return [jax.tree.unflatten(treedef, d) for d in _deltas(base_leaves, models)]


def soup(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    weights: ArrayLike | Sequence[float | int] | None = None,
) -> PyTree:
    """Model soup: the (weighted) average ``θ = Σₖ ŵₖ θₖ``, ``ŵₖ = wₖ / Σⱼ wⱼ``.

    Equal to task arithmetic with ``λₖ = ŵₖ``: ``θ₀ + Σₖ ŵₖ τₖ``; the base only fixes the tree
    structure and the dtypes of the result. Uniform weights give the uniform soup
    (Wortsman et al., 2022).

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        weights: nonnegative ``wₖ`` (normalised to sum 1); default uniform.

    Returns:
        The merged parameters, with the base's structure and dtypes.

    Raises:
        ValueError: structures or shapes differ; weights have the wrong length, are negative or
            sum to zero.

    References:
        Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
        accuracy without increasing inference time", ICML 2022.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros(2)}
        >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([3.0, 4.0])}]
        >>> soup(base, fts)["w"].tolist(), soup(base, fts, weights=[3, 1])["w"].tolist()
        ([2.0, 2.0], [1.5, 1.0])
    """
    paths, base_leaves, models, treedef = flatten_models("soup", base, finetuned)
    k = len(models)
    w = jnp.ones(k) if weights is None else jnp.asarray(weights)
    if w.shape != (k,):
        raise ValueError(f"soup: weights have shape {w.shape}; expected one per task, ({k},).")
    if not isinstance(w, jax.core.Tracer) and not (bool(jnp.all(w >= 0)) and float(w.sum()) > 0):
        raise ValueError(f"soup: weights must be nonnegative with a positive sum; got {w}.")
    w = w / jnp.sum(w)
    out = []
    for i, b in enumerate(base_leaves):
        dtype = work_dtype(b)
        out.append(sum(w[j].astype(dtype) * m[i].astype(dtype) for j, m in enumerate(models)))
    return jax.tree.unflatten(
        treedef, [o.astype(b.dtype) for o, b in zip(out, base_leaves, strict=True)]
    )


def task_arithmetic(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    scale: Scale = 1.0,
) -> PyTree:
    """Task arithmetic: ``θ = θ₀ + Σₖ λₖ τₖ`` (Ilharco et al., 2023).

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        scale: ``λ``: one number for every task, one per task ``(K,)``, or per layer: a mapping
            from layer path (``"Dense_0"``) to a number or ``(K,)`` array, or a callable
            ``layer_path -> λ``. Leaves at the top of the tree have layer path ``""``.

    Returns:
        The merged parameters, with the base's structure and dtypes.

    Raises:
        ValueError: structures or shapes differ, or a scale has the wrong shape or a layer has no
            scale.

    References:
        Ilharco et al., "Editing models with task arithmetic", ICLR 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"a": {"kernel": jnp.zeros(2)}, "b": {"kernel": jnp.ones(1)}}
        >>> fts = [{"a": {"kernel": jnp.array([1.0, 2.0])}, "b": {"kernel": jnp.array([3.0])}}]
        >>> merged = task_arithmetic(base, fts, scale={"a": 0.5, "b": 2.0})
        >>> merged["a"]["kernel"].tolist(), merged["b"]["kernel"].tolist()
        ([0.5, 1.0], [5.0])
    """
    paths, base_leaves, models, treedef = flatten_models("task_arithmetic", base, finetuned)
    return _combine(
        "task_arithmetic", paths, base_leaves, _deltas(base_leaves, models), scale, treedef
    )


# ---- TIES -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="density")
def _kth_largest(magnitudes, density: float):
    """The ``r``-th largest entry of nonnegative arrays, ``r = max(1, round(density · n))``.

    That is the largest ``t`` with ``#{m ≥ t} ≥ r``, found by bisection on the bit patterns
    (ordered like the values for ``m ≥ 0``): one counting pass per bit instead of a sort, which
    is far slower on CPU for tensors of millions of entries.
    """
    dtype = jnp.result_type(*magnitudes)
    n = sum(m.size for m in magnitudes)
    if n >= 2**31:
        raise ValueError(
            f"ties: {n} entries to rank at once exceed 2**31 - 1; use trim='tensor' for a model "
            "this large."
        )
    keep = min(n, max(1, round(density * n)))
    itype = jnp.int64 if dtype.itemsize == 8 else jnp.int32
    bits = [lax.bitcast_convert_type(m.astype(dtype), itype) for m in magnitudes]

    def step(_, bounds):  # invariant: #{bits ≥ lo} ≥ keep > #{bits > hi}
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = sum(jnp.sum(b >= mid, dtype=jnp.int32) for b in bits) >= keep
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    top = jnp.max(jnp.stack([jnp.max(b) for b in bits]))
    lo, _ = lax.fori_loop(0, 8 * dtype.itemsize, step, (jnp.zeros((), itype), top))
    return lax.bitcast_convert_type(lo, dtype)


def _trim(deltas, density: float, trim: str):
    """Keep the entries with ``|τ|`` at least the ``r``-th largest, per tensor or per model."""
    if trim == "tensor":
        thresholds = [_kth_largest([jnp.abs(d)], density) for d in deltas]
    else:
        thresholds = [_kth_largest([jnp.abs(d) for d in deltas], density)] * len(deltas)
    return [jnp.where(jnp.abs(d) >= t, d, 0) for d, t in zip(deltas, thresholds, strict=True)]


def _disjoint(vectors, aggregate: str):
    """Sign election and disjoint merge: each model's part that agrees with the elected sign,
    divided by the number of agreeing models for ``"mean"``."""
    out = [[] for _ in vectors]
    for i in range(len(vectors[0])):
        stack = jnp.stack([v[i] for v in vectors])
        sign = jnp.sign(jnp.sum(stack, axis=0))
        agree = stack * sign > 0
        kept = jnp.where(agree, stack, 0)
        if aggregate == "mean":
            kept = kept / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(kept.dtype)
        for k in range(len(vectors)):
            out[k].append(kept[k])
    return out


def _check_ties(fn, density, trim, aggregate):
    _check_option(fn, "trim", trim, ("tensor", "model"))
    _check_option(fn, "aggregate", aggregate, ("mean", "sum"))
    if isinstance(density, jax.core.Tracer) or not isinstance(density, float | int):
        raise TypeError(f"{fn}: density must be a Python number (it is static), got {density!r}.")
    if not 0 < density <= 1:
        raise ValueError(f"{fn}: density (the fraction of entries kept) must lie in (0, 1].")


def ties_task_vectors(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    density: float | int = 0.2,
    trim: str = "tensor",
    aggregate: str = "mean",
) -> list[PyTree]:
    """TIES' processed task vectors ``Bₖ``, so that TIES is ``θ₀ + λ Σₖ Bₖ``.

    1. **Trim**: ``τ̂ₖ`` keeps the entries of ``τₖ`` whose magnitude is at least the ``r``-th
       largest, ``r = max(1, round(density · size))``, zeroing the rest (ties at the threshold are
       all kept). ``trim="tensor"``: ranked within each parameter tensor; ``trim="model"``: ranked
       over the whole task vector (all tensors of the model together).
    2. **Elect**: the sign of the total trimmed mass, ``γ = sign(Σₖ τ̂ₖ)`` per entry.
    3. **Disjoint merge**: ``aₖ = [τ̂ₖ γ > 0]`` marks the models that agree;
       ``Bₖ = aₖ τ̂ₖ / max(1, Σⱼ aⱼ)`` for ``aggregate="mean"``, ``Bₖ = aₖ τ̂ₖ`` for ``"sum"``.

    Defaults: per-tensor trimming with a disjoint mean, as mergekit does. Ranking within each
    tensor keeps every tensor's own largest changes, so a tensor whose updates are small in
    absolute terms (a bias, a norm scale) is not wiped out by a larger one elsewhere, and each
    layer's result depends on that layer alone, which is what a layer-by-layer QP over these
    directions needs. ``trim="model", aggregate="mean"`` is the TIES paper's definition;
    ``trim="model", aggregate="sum"`` is FusionBench's. One detail differs from mergekit, which
    keeps exactly ``⌊density · size⌋`` entries and breaks ties at the threshold arbitrarily:
    rounding to the nearest count and keeping all tied entries makes the result independent of
    the order of the entries.

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        density: fraction of entries kept by the trim, in ``(0, 1]`` (static); 0.2 is the paper's
            recommended default.
        trim: ``"tensor"`` or ``"model"`` (static).
        aggregate: ``"mean"`` or ``"sum"`` (static).

    Returns:
        ``K`` pytrees ``Bₖ`` with the base's structure, in at least float32.

    Raises:
        ValueError, TypeError: structures or shapes differ, or an option is invalid.

    References:
        Yadav et al., "TIES-Merging: Resolving interference when merging models", NeurIPS 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros(3)}
        >>> fts = [{"w": jnp.array([4.0, -1.0, 2.0])}, {"w": jnp.array([2.0, 3.0, -0.5])}]
        >>> b = ties_task_vectors(base, fts, density=2 / 3)
        >>> b[0]["w"].tolist(), b[1]["w"].tolist()
        ([2.0, 0.0, 2.0], [1.0, 3.0, 0.0])
    """
    _check_ties("ties_task_vectors", density, trim, aggregate)
    _, base_leaves, models, treedef = flatten_models("ties_task_vectors", base, finetuned)
    trimmed = [_trim(d, density, trim) for d in _deltas(base_leaves, models)]
    return [jax.tree.unflatten(treedef, b) for b in _disjoint(trimmed, aggregate)]


def ties(
    base: PyTree,
    finetuned: Sequence[PyTree],
    *,
    density: float | int = 0.2,
    scale: Scale = 1.0,
    trim: str = "tensor",
    aggregate: str = "mean",
) -> PyTree:
    """TIES merging: ``θ = θ₀ + Σₖ λₖ Bₖ`` with ``Bₖ`` from :func:`ties_task_vectors`.

    With one ``λ`` this is ``θ₀ + λ · (disjoint mean or sum of the trimmed, sign-agreeing task
    vectors)``. See :func:`ties_task_vectors` for the steps and the defaults.

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        density: fraction of entries kept by the trim, in ``(0, 1]`` (static).
        scale: ``λ``, as in :func:`task_arithmetic`; 1 is the paper's default with the mean.
        trim: ``"tensor"`` or ``"model"`` (static).
        aggregate: ``"mean"`` or ``"sum"`` (static).

    Returns:
        The merged parameters, with the base's structure and dtypes.

    References:
        Yadav et al., "TIES-Merging: Resolving interference when merging models", NeurIPS 2023.

    Examples:
        >>> import jax.numpy as jnp
        >>> base = {"w": jnp.zeros(3)}
        >>> fts = [{"w": jnp.array([4.0, -1.0, 2.0])}, {"w": jnp.array([2.0, 3.0, -0.5])}]
        >>> ties(base, fts, density=2 / 3)["w"].tolist()
        [3.0, 3.0, 2.0]
        >>> ties(base, fts, density=2 / 3, aggregate="sum")["w"].tolist()
        [6.0, 3.0, 2.0]
    """
    directions = ties_task_vectors(base, finetuned, density=density, trim=trim, aggregate=aggregate)
    paths, base_leaves, treedef = flatten_params("ties", base, "base")
    leaves = [jax.tree.leaves(d) for d in directions]
    return _combine("ties", paths, base_leaves, leaves, scale, treedef)


# ---- DARE -----------------------------------------------------------------------------------


def _check_drop_rate(fn: str, drop_rate) -> None:
    if not isinstance(drop_rate, jax.core.Tracer) and not 0 <= float(drop_rate) < 1:
        raise ValueError(f"{fn}: drop_rate p must lie in [0, 1), got {drop_rate}.")


def dare_masks(
    key: ArrayLike,
    base: PyTree,
    num_tasks: int,
    *,
    drop_rate: float | Float[ArrayLike, ""],
) -> list[PyTree]:
    """DARE's keep masks: ``mₖ ~ Bernoulli(1 − p)`` per entry, one pytree per task.

    The mask of task ``k`` at leaf path ``path`` is drawn from
    ``fold_in(fold_in(key, k), crc32(path))``: it depends only on the key, the task index, the
    leaf's path and its shape, so the same key gives the same masks bit for bit (on any backend,
    for a given JAX version and PRNG implementation), whatever else the tree holds.

    Args:
        key: a ``jax.random`` key (``jax.random.key(seed)``).
        base: parameters whose structure and shapes the masks take.
        num_tasks: ``K``.
        drop_rate: the drop probability ``p ∈ [0, 1)``.

    Returns:
        ``K`` pytrees of boolean masks (``True`` = kept) with the base's structure.

    Raises:
        TypeError: ``key`` is not a PRNG key.
        ValueError: ``drop_rate`` or ``num_tasks`` is out of range.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> masks = dare_masks(jax.random.key(0), {"w": jnp.zeros(1000)}, 2, drop_rate=0.9)
        >>> 0.05 < float(masks[0]["w"].mean()) < 0.15
        True
    """
    key_ok = isinstance(key, jax.Array) and (
        jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        or (key.dtype == jnp.uint32 and key.shape == (2,))
    )
    if not key_ok:
        raise TypeError(
            f"dare_masks: key must be a jax.random key (jax.random.key(seed)); got {key!r:.60}."
        )
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"dare_masks: num_tasks must be a positive integer, got {num_tasks!r}.")
    _check_drop_rate("dare_masks", drop_rate)
    paths, leaves, treedef = flatten_params("dare_masks", base, "base")
    keep = 1 - jnp.asarray(drop_rate, jnp.float32)
    masks = []
    for k in range(num_tasks):
        task_key = jax.random.fold_in(key, k)
        masks.append(
            jax.tree.unflatten(
                treedef,
                [
                    jax.random.bernoulli(
                        jax.random.fold_in(task_key, zlib.crc32(path.encode())), keep, leaf.shape
                    )
                    for path, leaf in zip(paths, leaves, strict=True)
                ],
            )
        )
    return masks


def dare_task_vectors(
    base: PyTree,
    finetuned: Sequence[PyTree],
    masks: Sequence[PyTree],
    *,
    drop_rate: float | Float[ArrayLike, ""],
    merge: str = "task_arithmetic",
    aggregate: str = "mean",
) -> list[PyTree]:
    """DARE's processed task vectors ``Bₖ``, so that DARE is ``θ₀ + λ Σₖ Bₖ``.

    Drop and rescale: ``τ̃ₖ = mₖ ⊙ τₖ / (1 − p)``, which keeps ``E[τ̃ₖ] = τₖ``. With
    ``merge="task_arithmetic"``, ``Bₖ = τ̃ₖ``; with ``merge="ties"`` the dropout replaces TIES'
    magnitude trim and ``Bₖ`` is TIES' sign election and disjoint merge of the ``τ̃ₖ`` (as
    mergekit's ``dare_ties``; see :func:`ties_task_vectors`, step 2 and 3).

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        masks: ``K`` pytrees of keep masks (boolean or 0/1) shaped like the base, e.g. from
            :func:`dare_masks`.
        drop_rate: the drop probability ``p ∈ [0, 1)`` the masks were drawn with.
        merge: ``"task_arithmetic"`` or ``"ties"`` (static).
        aggregate: ``"mean"`` or ``"sum"``, for ``merge="ties"`` (static).

    Returns:
        ``K`` pytrees ``Bₖ`` with the base's structure, in at least float32.

    Raises:
        ValueError: structures or shapes of the models or masks differ, or an option is invalid.

    References:
        Yu et al., "Language models are Super Mario: absorbing abilities from homologous models as
        a free lunch", ICML 2024.

    Examples:
        >>> import jax.numpy as jnp
        >>> base, fts = {"w": jnp.zeros(2)}, [{"w": jnp.array([1.0, 2.0])}]
        >>> dare_task_vectors(base, fts, [{"w": jnp.array([True, False])}],
        ...                   drop_rate=0.5)[0]["w"].tolist()
        [2.0, 0.0]
    """
    fn = "dare_task_vectors"
    _check_option(fn, "merge", merge, ("task_arithmetic", "ties"))
    _check_option(fn, "aggregate", aggregate, ("mean", "sum"))
    _check_drop_rate(fn, drop_rate)
    paths, base_leaves, models, treedef = flatten_models(fn, base, finetuned)
    if isinstance(masks, Mapping) or not isinstance(masks, Sequence) or len(masks) != len(models):
        raise ValueError(f"{fn}: give one mask pytree per fine-tune ({len(models)} of them).")
    rescaled = []
    for k, (delta, mask) in enumerate(zip(_deltas(base_leaves, models), masks, strict=True)):
        flat, mask_def = jax.tree.flatten(mask)
        if mask_def != treedef:
            raise ValueError(
                f"{fn}: masks[{k}] does not have the base's structure ({mask_def} vs {treedef})."
            )
        for path, m, d in zip(paths, flat, delta, strict=True):
            if jnp.shape(m) != d.shape:
                raise ValueError(
                    f"{fn}: masks[{k}] at '{path}' has shape {jnp.shape(m)}; the parameter's is "
                    f"{d.shape}."
                )
        rescaled.append(
            [
                jnp.where(jnp.asarray(m).astype(bool), d / (1 - jnp.asarray(drop_rate, d.dtype)), 0)
                for m, d in zip(flat, delta, strict=True)
            ]
        )
    if merge == "ties":
        rescaled = _disjoint(rescaled, aggregate)
    return [jax.tree.unflatten(treedef, b) for b in rescaled]


def dare(
    base: PyTree,
    finetuned: Sequence[PyTree],
    key: ArrayLike,
    *,
    drop_rate: float | Float[ArrayLike, ""],
    scale: Scale = 1.0,
    merge: str = "task_arithmetic",
    aggregate: str = "mean",
) -> PyTree:
    """DARE: drop each task-vector entry with probability ``p``, rescale by ``1/(1 − p)``, merge.

    ``θ = θ₀ + Σₖ λₖ Bₖ`` with ``Bₖ`` from :func:`dare_task_vectors` and masks from
    :func:`dare_masks` (``key``): the same key gives the same merge bit for bit.

    Args:
        base: base parameters ``θ₀``.
        finetuned: the ``K`` fine-tuned parameter pytrees.
        key: a ``jax.random`` key.
        drop_rate: the drop probability ``p ∈ [0, 1)``.
        scale: ``λ``, as in :func:`task_arithmetic`.
        merge: ``"task_arithmetic"`` or ``"ties"`` (static).
        aggregate: ``"mean"`` or ``"sum"``, for ``merge="ties"`` (static).

    Returns:
        The merged parameters, with the base's structure and dtypes.

    References:
        Yu et al., "Language models are Super Mario: absorbing abilities from homologous models as
        a free lunch", ICML 2024.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> base, fts = {"w": jnp.zeros(4)}, [{"w": jnp.ones(4)}, {"w": -jnp.ones(4)}]
        >>> a = dare(base, fts, jax.random.key(1), drop_rate=0.5)
        >>> b = dare(base, fts, jax.random.key(1), drop_rate=0.5)
        >>> bool((a["w"] == b["w"]).all()), set(a["w"].tolist()) <= {-2.0, 0.0, 2.0}
        (True, True)
    """
    directions = dare_directions(
        "dare", base, finetuned, key, drop_rate=drop_rate, merge=merge, aggregate=aggregate
    )
    paths, base_leaves, treedef = flatten_params("dare", base, "base")
    leaves = [jax.tree.leaves(d) for d in directions]
    return _combine("dare", paths, base_leaves, leaves, scale, treedef)


def dare_directions(fn: str, base, finetuned, key, **options) -> list:
    """:func:`dare_task_vectors` with the masks :func:`dare_masks` draws from ``key``."""
    _, _, models, _ = flatten_models(fn, base, finetuned)
    masks = dare_masks(key, base, len(models), drop_rate=options["drop_rate"])
    return dare_task_vectors(base, finetuned, masks, **options)
