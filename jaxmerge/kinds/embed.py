r"""Embeddings: the rows are one-hot token ids, so the Gram matrix is diagonal (token counts).

The statistics are :class:`EmbedStats` (counts instead of a ``(V, V)`` Gram matrix), the
full-basis solve is closed-form row by row (a token-count-weighted mean of the fine-tuned rows,
:func:`_solve_full`), other bases solve a dense system over the seen tokens only, and rows no
calibration token reaches keep the fallback value. The solve reads which tokens were seen, so it
runs eagerly (``traceable = False``).
"""

from collections.abc import Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from ..core.bases import Custom, LowRank, combine_directions
from ..core.energy import energies
from ..core.psd import SolveStatus
from ..core.qp import LayerSolution, solve_layer
from ..core.stats import LayerStats
from .base import CallShape, LayerKind, register_kind

__all__ = ["EmbedKind", "EmbedStats"]


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


def _restricted(stats: EmbedStats, seen: np.ndarray) -> LayerStats:
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


def _seen(stats: EmbedStats) -> np.ndarray:
    return np.flatnonzero(np.asarray(stats.diag) > 0)


class EmbedKind(LayerKind):
    """``Embed``: a table ``embedding (V, m)`` read by integer token ids."""

    name = "embed"
    kernel = "embedding"
    bias = None
    traceable = False
    stats_type = EmbedStats

    def describe(self, module, params, x, run):
        table = params.get(self.kernel)
        if table is None or not jnp.issubdtype(x.dtype, jnp.integer):
            return None
        n_in, n_out = table.shape
        return CallShape(n_in, n_out, None, ("embed", id(module)), lambda: (x.reshape(-1), x.shape))

    def to_matrix(self, spec, params):
        return jnp.asarray(params[spec.kernel]), None

    def from_matrix(self, spec, kernel, bias, like):
        return {**like, spec.kernel: kernel.reshape(jnp.shape(like[spec.kernel]))}

    def init_stats(self, specs, num_tasks, dtype):
        v, m = specs[0].n_in, sum(s.n_out for s in specs)
        z = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
        return EmbedStats(z(v), z(v, m), z(m), z(num_tasks, v), z(num_tasks))

    def update_stats(self, stats, x, y, task, mask, weight=1.0):
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

    def stats_bytes(self, specs, num_tasks, rows, dtype):
        """Diagonal Gram: ``V`` counts, ``V × m`` sums, per-task counts (held three times: the
        sums, a batch's update and the result), plus a batch's ids and targets."""
        v, m, b = specs[0].n_in, sum(s.n_out for s in specs), jnp.dtype(dtype).itemsize
        held = b * (v + v * m + m + num_tasks * v + num_tasks)
        return 3 * held + rows * (1 + m) * 3 * b

    def solve(self, spec, stats, base, finetuned, centre, opt):
        """Rows of the seen tokens solved; unseen rows keep the fallback (``centre``)."""
        e0 = jnp.asarray(base[spec.kernel])
        eks = [jnp.asarray(f[spec.kernel]) for f in finetuned]
        start = jnp.asarray(centre[spec.kernel])
        seen = _seen(stats)
        dtype = stats.diag.dtype
        nan = jnp.array(jnp.nan, dtype)
        if len(seen) == 0:
            zero = jnp.zeros((), dtype)
            return {spec.kernel: start}, LayerSolution(
                start, None, None, zero, zero, jnp.array(1.0, dtype), jnp.int32(0), nan, None
            )
        basis, prior = opt.basis, opt.prior
        if isinstance(prior, Mapping):
            prior = jnp.asarray(prior[spec.kernel])[seen]
        coefficients = spectrum = None
        if basis == "full":
            merged, status, cond = _solve_full(stats, seen, start, prior, opt)
        elif isinstance(basis, LowRank):
            sol = solve_layer(_restricted(stats, seen), e0[seen], [e[seen] for e in eks],
                              basis=basis, ridge=opt.ridge, prior=prior, alpha=opt.alpha,
                              rcond=opt.rcond, jitter=opt.jitter, throw=False)  # fmt: skip
            merged = start.at[seen].set(sol.kernel.astype(start.dtype))
            status, cond, coefficients, spectrum = (sol.status, sol.condition, sol.coefficients,
                                                    sol.spectrum)  # fmt: skip
        else:
            if isinstance(basis, Custom):
                dirs = [self.direction(spec, d) for d in basis.directions]
                dirs = jnp.stack([jnp.asarray(d[0] if isinstance(d, tuple) else d) for d in dirs])
                per_output = basis.per_output
                restricted = Custom(list(dirs[:, seen]), per_output)
            else:
                dirs = jnp.stack([e - e0 for e in eks])
                per_output = basis == "diagonal"
                restricted = basis
            sol = solve_layer(_restricted(stats, seen), e0[seen], [e[seen] for e in eks],
                              basis=restricted, ridge=opt.ridge, prior=prior, alpha=opt.alpha,
                              rcond=opt.rcond, jitter=opt.jitter, throw=False)  # fmt: skip
            merged = e0 + combine_directions(sol.coefficients, dirs.astype(dtype), per_output)
            status, cond, coefficients = sol.status, sol.condition, sol.coefficients
        e_0, loss, rho = energies(
            stats.diag[seen], stats.cross[seen], jnp.sum(stats.out_sq), e0[seen].astype(dtype),
            (merged[seen] - e0[seen]).astype(dtype),
        )  # fmt: skip
        return {spec.kernel: merged}, LayerSolution(
            merged, None, coefficients, e_0, loss, rho, status, cond, spectrum
        )

    def energy(self, spec, stats, base, merged):
        seen = _seen(stats)
        k0 = jnp.asarray(base[spec.kernel])[seen].astype(stats.diag.dtype)
        k1 = jnp.asarray(merged[spec.kernel])[seen].astype(stats.diag.dtype)
        return energies(stats.diag[seen], stats.cross[seen], jnp.sum(stats.out_sq), k0, k1 - k0)


def _solve_full(stats: EmbedStats, seen, start_table, prior, opt):
    """The full basis on an embedding's seen rows in closed form: its Gram matrix is diagonal
    (token counts ``d``), so :func:`~jaxmerge.solve_layer`'s ``(H + λD)c = f + λDc₀`` is
    ``c = (f/d + λc₀) / (1 + λ)`` row by row, the update ``c`` taken from the fallback rows.
    RegMean's ``α`` changes nothing here: a diagonal metric is its own diagonal, and an
    embedding's targets are its rows, so ``P_α = P``. No dense ``(s, s)`` system is formed."""
    dtype = stats.diag.dtype
    d = stats.diag[seen]
    start = start_table[seen].astype(dtype)
    f = stats.cross[seen] / d[:, None] - start
    c0 = jnp.zeros_like(f) if prior is None else prior.astype(dtype) - start
    update = c0 if opt.ridge == float("inf") else (f + opt.ridge * c0) / (1.0 + opt.ridge)
    merged = start_table.at[seen].set((start + update).astype(start_table.dtype))
    cond = jnp.max(d) / jnp.min(d)
    return merged, jnp.int32(SolveStatus.CHOLESKY), cond


register_kind(EmbedKind(), linen=[nn.Embed], nnx=[nnx.Embed])


# ---- token ids ----------------------------------------------------------------------------------


def checked_ids(batches, inputs, where: str):
    """One task's ``batches``, the token ids each embedding reads checked against its vocabulary
    (an id outside ``[0, V)`` gives a NaN row, or wraps around when negative, and is left out of
    the statistics). ``inputs``: ``{layer path: (key path of the batch entry it reads, V)}``.
    Host arrays are checked before their batch is used; device arrays (reduced asynchronously)
    once all the task's batches have been read, before its statistics are checked."""
    pending = []
    for i, batch in enumerate(batches):
        if inputs:
            entries = dict(jax.tree_util.tree_flatten_with_path(batch)[0])
            for layer, (entry, vocab) in inputs.items():
                ids = entries.get(entry)
                if ids is None or np.size(ids) == 0:
                    continue
                at = (f"{where} batch {i}", layer, entry, vocab)
                if isinstance(ids, jax.Array):
                    pending.append((at, (jnp.min(ids), jnp.max(ids))))
                else:
                    _check_id_range(*at, np.min(ids), np.max(ids))
        yield batch
    for at, (low, high) in jax.device_get(pending):
        _check_id_range(*at, low, high)


def _check_id_range(where, layer, entry, vocab, low, high):
    if low < 0 or high >= vocab:
        raise ValueError(
            f"merge: {where}: the token ids in batch{jax.tree_util.keystr(entry)} range over "
            f"[{low}, {high}], outside the vocabulary of embedding layer {layer!r} ({vocab} "
            f"rows: ids 0 to {vocab - 1})."
        )
