r"""Embeddings: the rows are one-hot token ids, so the Gram matrix is diagonal (token counts).

The statistics are :class:`EmbedStats` (counts instead of a ``(V, V)`` Gram matrix), the
full-basis solve is closed-form row by row (a token-count-weighted mean of the fine-tuned rows,
:func:`_solve_full`), other bases solve a dense system over the seen tokens only, and rows no
calibration token reaches keep the fallback value. The solve reads which tokens were seen, so it
runs eagerly (``traceable = False``).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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
from .base import CallShape, LayerKind
from .registry import Rules, register_kind
from .tied import check_tied_options, solve_tied, tied_energies

__all__ = ["EmbedKind", "EmbedStats", "TiedStats", "register_embedding"]


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


class TiedStats(NamedTuple):
    """Statistics of a table read both by lookups and by a head (a tied embedding): the
    lookups' :class:`EmbedStats` sums and the head's dense sums, the head being a layer with
    input ``h`` (width ``d``) and kernel ``Eᵀ``.

    Attributes:
        diag: weighted token counts of the lookups, ``(V,)``.
        cross: weighted sums of the lookups' target rows per token, ``(V, d)``.
        out_sq: the lookups' ``Σₖ wₖ ‖Yₖ[:, j]‖²``, ``(d,)``.
        task_diag: per-task weighted token counts, ``(K, V)``.
        gram: the head inputs' ``Σₖ wₖ HₖᵀHₖ``, ``(d, d)``.
        head_cross: ``Σₖ wₖ HₖᵀZₖ`` with ``Zₖ`` fine-tune k's head outputs, ``(d, V)``.
        head_out_sq: ``Σₖ wₖ ‖Zₖ[:, v]‖²``, ``(V,)``.
        count: tokens looked up per task, ``(K,)``.
    """

    diag: Float[Array, " V"]
    cross: Float[Array, "V d"]
    out_sq: Float[Array, " d"]
    task_diag: Float[Array, "K V"]
    gram: Float[Array, "d d"]
    head_cross: Float[Array, "d V"]
    head_out_sq: Float[Array, " V"]
    count: Float[Array, " K"]

    def lookups(self) -> EmbedStats:
        """The lookups' statistics alone."""
        return EmbedStats(self.diag, self.cross, self.out_sq, self.task_diag, self.count)


@dataclasses.dataclass(frozen=True)
class _Rule:
    table: str
    lookup: str
    head: str | None
    scale: float | Callable[[Any], float]


def _lookup_scale(spec) -> float:
    return float(spec.form.partition("scale=")[2] or 1.0)


class EmbedKind(Rules, LayerKind):
    """A table ``(V, d)`` read by integer token ids (``Embed``), and, when it is tied, by a
    head ``z = h Eᵀ`` (``Embed.attend``, Gemma's ``Embedder.decode``): both uses are output
    errors of the same rows (:class:`TiedStats`), solved together (:mod:`~jaxmerge.kinds.tied`)."""

    name = "embed"
    kernel = "embedding"
    bias = None
    traceable = False
    stats_type = EmbedStats

    def methods(self, cls):
        rule = self.rule(cls)
        return (rule.lookup,) + ((rule.head,) if rule.head else ())

    def param_names(self, module):
        return (self.rule(module).table,)

    def describe_call(self, module, params, args, kwargs, run, method="__call__"):
        rule = self.rule(module)
        x = args[0] if args else next(iter(kwargs.values()), None)
        table = params.get(rule.table)
        if table is None or x is None or not hasattr(x, "shape") or table.ndim != 2:
            return None
        v, d = table.shape
        if method == rule.head:  # z = h Eᵀ: a dense layer (d -> V) whose kernel is the table
            if x.shape[-1] != d:
                return None
            return x, CallShape(d, v, None, ("embed", id(module)), lambda: (x.reshape(-1, d),
                                x.shape[:-1]), rule.table, lambda z: z.reshape(-1, v),
                                "head")  # fmt: skip
        if not jnp.issubdtype(x.dtype, jnp.integer):
            return None
        scale = float(rule.scale(module) if callable(rule.scale) else rule.scale)
        form = f"scale={scale!r}" if scale != 1.0 else ""
        return x, CallShape(v, d, None, ("embed", id(module)),
                            lambda: (x.reshape(-1), x.shape), rule.table, None,
                            form)  # fmt: skip

    def joint(self, specs):
        """A table's spec from its calls' specs: lookups and a head make it tied."""
        lookups = [s for s in specs if s.form != "head"]
        if not lookups or len({s.form for s in lookups}) != 1:
            return None
        return lookups[0] if len(lookups) == len(specs) else tied(lookups[0])

    def container(self, specs):
        return TiedStats if specs[0].form.startswith("tied") else EmbedStats

    def to_matrix(self, spec, params):
        return jnp.asarray(params[spec.kernel]), None

    def from_matrix(self, spec, kernel, bias, like):
        return {**like, spec.kernel: kernel.reshape(jnp.shape(like[spec.kernel]))}

    def init_stats(self, specs, num_tasks, dtype):
        v, m = specs[0].n_in, sum(s.n_out for s in specs)
        z = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
        if self.container(specs) is TiedStats:
            return TiedStats(z(v), z(v, m), z(m), z(num_tasks, v), z(m, m), z(m, v), z(v),
                             z(num_tasks))  # fmt: skip
        return EmbedStats(z(v), z(v, m), z(m), z(num_tasks, v), z(num_tasks))

    def update_stats(self, stats, x, y, task, mask, weight=1.0):
        if isinstance(stats, TiedStats):
            if jnp.issubdtype(x.dtype, jnp.integer):
                part = self.update_stats(stats.lookups(), x, y, task, mask, weight)
                return stats._replace(**part._asdict())
            dtype = stats.gram.dtype
            wm = weight * (jnp.ones(x.shape[:1], dtype) if mask is None else mask.astype(dtype))
            h, z = x.astype(dtype), y.astype(dtype)
            hw = h * wm[:, None]
            return stats._replace(gram=stats.gram + hw.T @ h,
                                  head_cross=stats.head_cross + hw.T @ z,
                                  head_out_sq=stats.head_out_sq + wm @ jnp.square(z))  # fmt: skip
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
        sums, a batch's update and the result), plus a batch's ids and targets; a tied table
        adds the head's ``m × m`` Gram matrix, ``m × V`` cross sums and its ``V``-wide rows."""
        v, m, b = specs[0].n_in, sum(s.n_out for s in specs), jnp.dtype(dtype).itemsize
        held = b * (v + v * m + m + num_tasks * v + num_tasks)
        if self.container(specs) is TiedStats:  # the head's Gram matrix, cross sums, squares
            held += b * (m * m + m * v + v)
            rows *= 1 + v  # a batch's head outputs are V wide
        return 3 * held + rows * (1 + m) * 3 * b

    def solve(self, spec, stats, base, finetuned, centre, opt):
        """Rows of the seen tokens solved; unseen rows keep the fallback (``centre``)."""
        if isinstance(stats, TiedStats):
            check_tied_options(spec, opt)
            table = lambda tree: jnp.asarray(tree[spec.kernel])  # noqa: E731
            prior = opt.prior
            if opt.basis == "full":
                directions = None
                prior = None if prior is None else table(prior)
            else:
                directions = _directions(self, spec, opt.basis, base, finetuned)
            merged, sol = solve_tied(stats, _lookup_scale(spec), table(base), table(centre),
                                     directions, prior, opt)  # fmt: skip
            return {spec.kernel: merged}, sol
        stats = _scaled(stats, _lookup_scale(spec))
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
            dirs, per_output = _directions(self, spec, basis, base, finetuned)
            restricted = basis
            if isinstance(basis, Custom):
                restricted = Custom(list(dirs[:, seen]), per_output)
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
        if isinstance(stats, TiedStats):
            k0, k1 = jnp.asarray(base[spec.kernel]), jnp.asarray(merged[spec.kernel])
            return tied_energies(stats, _lookup_scale(spec), k0, k1)
        stats = _scaled(stats, _lookup_scale(spec))
        seen = _seen(stats)
        k0 = jnp.asarray(base[spec.kernel])[seen].astype(stats.diag.dtype)
        k1 = jnp.asarray(merged[spec.kernel])[seen].astype(stats.diag.dtype)
        return energies(stats.diag[seen], stats.cross[seen], jnp.sum(stats.out_sq), k0, k1 - k0)


def _scaled(stats: EmbedStats, scale: float) -> EmbedStats:
    """A lookup ``s·E[t]``'s statistics as a layer's whose inputs are ``s`` times the one-hot
    ids (its targets ``Y`` are the scaled rows): Gram ``s²·counts``, cross sums ``s·ΣY``."""
    if scale == 1.0:
        return stats
    return stats._replace(diag=scale**2 * stats.diag, cross=scale * stats.cross,
                          task_diag=scale**2 * stats.task_diag)  # fmt: skip


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


def tied(spec):
    """The spec of a table read by lookups (``spec``) and by a head."""
    if is_tied(spec):
        return spec
    return dataclasses.replace(spec, form=("tied;" + spec.form).rstrip(";"))


def is_tied(spec) -> bool:
    """Whether a layer is a tied table (read by lookups and by a head)."""
    return spec.kind == EMBED.name and spec.form.startswith("tied")


def _directions(kind, spec, basis, base, finetuned):
    """``(directions (J, V, d), per_output)`` of a table's scalar, diagonal or custom basis."""
    if isinstance(basis, Custom):
        dirs = [kind.direction(spec, d) for d in basis.directions]
        dirs = jnp.stack([jnp.asarray(d[0] if isinstance(d, tuple) else d) for d in dirs])
        return dirs, basis.per_output
    e0 = jnp.asarray(base[spec.kernel])
    return jnp.stack([jnp.asarray(f[spec.kernel]) - e0 for f in finetuned]), basis == "diagonal"


EMBED = EmbedKind()


def register_embedding(
    cls: type | str,
    *,
    table: str = "embedding",
    lookup: str = "__call__",
    head: str | None = None,
    scale: float | Callable[[Any], float] = 1.0,
    api: str | None = None,
):
    """Tell jaxmerge that a Flax module class is an embedding table ``E (V, d)``: its
    ``lookup`` method maps integer ids ``t`` to ``scale · E[t]``, and its ``head`` method (when
    the table is tied to the output head) maps ``h`` to ``h Eᵀ``.

    Args:
        cls: the ``flax.linen`` or ``flax.nnx`` module class, or its qualified name (then
            ``api`` says which API), matched exactly.
        table: the table parameter's name.
        lookup: the method reading ids (its first argument).
        head: the method computing ``h Eᵀ`` (its first argument ``h``), or ``None``.
        scale: the factor the lookup applies to the rows (Gemma's ``√d``), or a function of the
            module returning it.
        api: ``"linen"`` or ``"nnx"`` for a class given by name.

    Returns:
        the embedding kind.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxmerge as jm
        >>> class ScaledEmbed(nn.Module):  # rows times √d on lookup; the head reads the table
        ...     vocab: int = 8
        ...     dim: int = 4
        ...     def setup(self):
        ...         self.table = self.param("table", nn.initializers.normal(),
        ...                                 (self.vocab, self.dim))
        ...     def encode(self, ids):
        ...         return self.table[ids] * jnp.sqrt(self.dim)
        ...     def decode(self, h):
        ...         return h @ self.table.T
        >>> jm.register_embedding(ScaledEmbed, table="table", lookup="encode", head="decode",
        ...                       scale=lambda module: module.dim**0.5).name
        'embed'
        >>> class TinyLM(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, ids):
        ...         embed = ScaledEmbed(name="embed")
        ...         return embed.decode(jnp.tanh(embed.encode(ids)))
        >>> ids = jnp.arange(8).reshape(2, 4)
        >>> base = TinyLM().init(jax.random.key(0), ids)["params"]
        >>> fts = [jax.tree.map(lambda a, s=s: a + s, base) for s in (0.1, -0.1)]
        >>> _, report = jm.merge(TinyLM(), base, fts, [[ids], [ids + 0]], progress=False)
        >>> report.layers[0].path, report.layers[0].form
        ('embed', 'tied;scale=2.0')
    """
    return EMBED.cover(cls, _Rule(table, lookup, head, scale), api, "register_embedding")


register_kind(EMBED)
for _cls in (nn.Embed, nnx.Embed):
    register_embedding(_cls, head="attend")


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
