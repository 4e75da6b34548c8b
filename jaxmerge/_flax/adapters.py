"""Layer adapters: a Flax layer's parameters and calls as the affine maps the core solves.

Every supported layer is affine in its parameters, ``y = x̃ W̄`` row by row, once its inputs are
written as rows ``x`` of width ``n_in`` and its outputs as rows ``y`` of width ``n_out``:

==================  ====================================================  =====================
kind                rows                                                  parameters ↔ ``W̄``
==================  ====================================================  =====================
``dense``           ``x.reshape(-1, n)``                                  ``kernel (n, m)``
``dense_general``   contracted axes last and flattened, the others rows   ``kernel (*in, *out)``
                    (attention projections: heads × head_dim flattened)   reshaped ``(n, m)``
``conv``            patches, ``n = prod(kernel_size) · C_in``              ``kernel (*ks, C, O)``
                                                                          reshaped ``(n, O)``
``embed``           one-hot token ids: ``A`` is diagonal (token counts)   ``embedding (V, m)``
``norm``            the normalised input ``x̂``; ``y_c = a_c x̂_c + b_c``   ``kernel = diag(scale)``
==================  ====================================================  =====================

A norm is a set of independent per-channel 2×2 systems (``[x̂_c, 1]`` against ``y_c``); written
as a dense layer with kernel ``diag(scale)`` its scalar, diagonal and custom bases are exact, and
the full basis is solved channel by channel (a dense ``(C, C)`` kernel is not a norm); so is
:class:`~jaxmerge.LowRank`, since a diagonal kernel has no low-rank structure to exploit.
"""

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._stats import LayerStats, affine_targets, update_input_stats, update_stats

KINDS = ("dense", "dense_general", "conv", "embed", "norm")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the merge knows about one layer (static metadata).

    Attributes:
        path: '/'-joined keys of the layer's parameter dict in the params tree.
        kind: one of ``"dense"``, ``"dense_general"``, ``"conv"``, ``"embed"``, ``"norm"``.
        n_in: input width of the rows (patch size for convs, vocabulary size for embeddings).
        n_out: output width of the rows.
        kernel: name of the weight parameter (``"kernel"``, ``"embedding"`` or ``"scale"``).
        bias: name of the bias parameter, or ``None`` when the layer has none.
        calls: how many times the layer was called in one forward pass.

    Examples:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jaxmerge import collect_stats
        >>> fts = [{"layers_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}]
        >>> stats = collect_stats(nn.Sequential([nn.Dense(1)]), fts, [[jnp.eye(2)]],
        ...                       progress=False)
        >>> spec = stats["layers_0"].layers[0]
        >>> spec.path, spec.kind, spec.n_in, spec.n_out, spec.kernel, spec.bias
        ('layers_0', 'dense', 2, 1, 'kernel', 'bias')
    """

    path: str
    kind: str
    n_in: int
    n_out: int
    kernel: str
    bias: str | None
    calls: int = 1


class EmbedStats(NamedTuple):
    """Statistics of an embedding (a pytree monoid like :class:`~jaxmerge.LayerStats`).

    The inputs are one-hot token ids, so the Gram matrix is diagonal: ``diag[v] = Σₖ wₖ Nₖ(v)``
    (weighted token counts) and ``cross[v] = Σₖ wₖ Σ_{i: token v} Yₖ[i]``. The merged row of a
    seen token under the full basis is the count-weighted mean of the fine-tuned models' rows.

    Attributes:
        diag: weighted token counts, ``(V,)``.
        cross: weighted sums of target rows per token, ``(V, m)``.
        out_sq: ``Σₖ wₖ ‖Yₖ[:, j]‖²`` per output column, ``(m,)``.
        task_diag: per-task weighted token counts, ``(K, V)``.
        count: tokens seen per task, ``(K,)``.

    Examples:
        >>> import flax.linen as nn, jax.numpy as jnp
        >>> from jaxmerge import collect_stats
        >>> fts = [{"layers_0": {"embedding": jnp.ones((4, 2))}}]
        >>> stats = collect_stats(nn.Sequential([nn.Embed(4, 2)]), fts,
        ...                       [[jnp.array([0, 0, 2])]], progress=False)
        >>> e = stats["layers_0"].stats  # tokens 0, 0, 2: weighted counts 2/3, 0, 1/3, 0
        >>> [round(float(v), 4) for v in e.diag], e.count.tolist()
        ([0.6667, 0.0, 0.3333, 0.0], [3.0])
    """

    diag: Float[Array, " V"]
    cross: Float[Array, "V m"]
    out_sq: Float[Array, " m"]
    task_diag: Float[Array, "K V"]
    count: Float[Array, " K"]


def init_group_stats(specs, num_tasks: int, dtype):
    """Zero statistics for a group of layers sharing one input (outputs concatenated)."""
    n_out = sum(s.n_out for s in specs)
    n_in = specs[0].n_in
    if specs[0].kind == "embed":
        z = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
        return EmbedStats(z(n_in), z(n_in, n_out), z(n_out), z(num_tasks, n_in), z(num_tasks))
    n1 = n_in + 1
    return LayerStats(
        jnp.zeros((n1, n1), dtype),
        jnp.zeros((n1, n_out), dtype),
        jnp.zeros((n_out,), dtype),
        jnp.zeros((num_tasks, n1), dtype),
        jnp.zeros((num_tasks,), dtype),
    )


def update_group_stats(stats, x, y, task, mask, weight=1.0):
    """Add rows ``x`` (ids for embeddings), targets ``y`` and a 0/1 row mask to the statistics;
    ``y=None`` (not for embeddings): the input statistics only, see :func:`own_targets`."""
    if isinstance(stats, LayerStats):
        if y is None:
            return update_input_stats(stats, x, task, mask)
        return update_stats(stats, x, y, task, mask=mask, weight=weight)
    dtype = stats.diag.dtype
    v = stats.diag.shape[0]
    m = jnp.ones(x.shape, dtype) if mask is None else mask.astype(dtype)
    wm = weight * m
    y = y.astype(dtype)
    counts = jax.ops.segment_sum(wm, x, num_segments=v)
    return EmbedStats(
        diag=stats.diag + counts,
        cross=stats.cross + jax.ops.segment_sum(wm[:, None] * y, x, num_segments=v),
        out_sq=stats.out_sq + wm @ jnp.square(y),
        task_diag=stats.task_diag.at[task].add(counts),
        count=stats.count.at[task].add(jnp.sum(m)),
    )


def own_targets(stats: LayerStats, specs, layers) -> LayerStats:
    """One task's group statistics with its targets the layers' own outputs on those rows.

    Every supported layer but the embedding computes ``y = x̃W̄`` from its rows, so when the rows
    are its own inputs (the parallel merge) the targets' statistics are ``P = AW̄`` and
    ``s = diag(W̄ᵀAW̄)`` (:func:`~jaxmerge._stats.affine_targets`): equal to accumulating the
    outputs up to the rounding of the layer's own computation, without the ``N·(n+1)·m`` products.
    ``layers`` are the members' parameter dicts of that task, in the order of ``specs``.
    """
    columns = []
    for spec, params in zip(specs, layers, strict=True):
        kernel, bias = to_layer(spec, params)
        bias = jnp.zeros(spec.n_out, kernel.dtype) if bias is None else bias.astype(kernel.dtype)
        columns.append(jnp.concatenate([kernel, bias[None]], axis=0))
    return affine_targets(stats, jnp.concatenate(columns, axis=1))


def scale_stats(stats, scale):
    """Multiply every sum but ``count`` by ``scale`` (task weight ``1/Nₖ``)."""
    scaled = jax.tree.map(lambda a: a * scale, stats)
    return scaled._replace(count=stats.count)


def member_stats(stats: LayerStats, specs, index: int) -> LayerStats:
    """The statistics of one member of a shared-input group (its output columns)."""
    start = sum(s.n_out for s in specs[:index])
    cols = slice(start, start + specs[index].n_out)
    return stats._replace(cross=stats.cross[:, cols], out_sq=stats.out_sq[cols])


def embed_restricted(stats: EmbedStats, seen: np.ndarray) -> LayerStats:
    """Dense :class:`LayerStats` of an embedding over its seen tokens (no bias column used)."""
    s = len(seen)
    gram = (
        jnp.zeros((s + 1, s + 1), stats.diag.dtype)
        .at[np.arange(s), np.arange(s)]
        .set(stats.diag[seen])
    )
    pad = lambda a: jnp.concatenate([a, jnp.zeros_like(a[..., :1, :])], -2)  # noqa: E731
    task_diag = jnp.concatenate(
        [stats.task_diag[:, seen], jnp.zeros_like(stats.task_diag[:, :1])], axis=1
    )
    return LayerStats(gram, pad(stats.cross[seen]), stats.out_sq, task_diag, stats.count)


# ---- parameters ↔ layer-likes -----------------------------------------------------------------


def to_layer(spec: LayerSpec, params: Mapping):
    """``(kernel (n_in, n_out), bias | None)`` from a layer's own parameter dict."""
    weight = jnp.asarray(params[spec.kernel])
    bias = params.get(spec.bias) if spec.bias is not None else None
    bias = None if bias is None else jnp.asarray(bias).reshape(-1)
    if spec.kind == "norm":
        return jnp.diag(weight), bias
    return weight.reshape(spec.n_in, spec.n_out), bias


def from_layer(spec: LayerSpec, kernel, bias, like: Mapping) -> dict:
    """A layer's parameter dict from a merged ``(kernel, bias)``, shaped like ``like``."""
    out = dict(like)
    weight = jnp.diagonal(kernel) if spec.kind == "norm" else kernel
    out[spec.kernel] = weight.reshape(jnp.shape(like[spec.kernel]))
    if spec.bias is not None:
        out[spec.bias] = bias.reshape(jnp.shape(like[spec.bias]))
    return out


def as_direction(spec: LayerSpec, direction):
    """A :class:`~jaxmerge.Custom` direction given in the layer's own parameter format (a dict
    with the layer's parameter names) as a layer-like; other forms pass through unchanged."""
    if isinstance(direction, Mapping) and spec.kernel in direction:
        return to_layer(spec, direction)
    return direction


# ---- rows ---------------------------------------------------------------------------------------


def general_rows(x, axes):
    """Rows of a contraction over ``axes`` (in kernel order): ``(rows, n)`` and the row shape."""
    axes = tuple(a % x.ndim for a in axes)
    free = tuple(a for a in range(x.ndim) if a not in axes)
    lead = tuple(x.shape[a] for a in free)
    n = int(np.prod([x.shape[a] for a in axes]))
    return jnp.transpose(x, free + axes).reshape(-1, n), lead


def row_mask(mask, lead):
    """The 0/1 mask of rows with leading shape ``lead``, or ``None`` when the mask (over the
    batch's leading axes) does not index these rows (e.g. after pooling)."""
    if mask is None or tuple(lead[: mask.ndim]) != tuple(mask.shape):
        return None
    mask = mask.reshape(mask.shape + (1,) * (len(lead) - mask.ndim))
    return jnp.broadcast_to(mask, lead).reshape(-1)
