r"""The layer-kind interface: everything the merge needs to know about one kind of layer.

A *kind* is a family of Flax layers that are affine in their parameters: written as rows, each
call computes ``y = x̃ W̄`` with ``x̃ = [x, 1]`` the layer's input rows (width ``n_in``, plus the
bias column) and ``W̄ = [W; b]`` its parameters as an augmented ``(n_in + 1, n_out)`` matrix. One
:class:`LayerKind` object says, for its layers:

* **capture**: which module classes it covers (:func:`register_kind`), whether a given module's
  configuration is covered (:meth:`LayerKind.accepts`) and, for one call, the widths, the bias
  name, which calls share an input, and the call's rows (:meth:`LayerKind.describe`);
* **parameters ↔ W̄**: :meth:`LayerKind.to_matrix` and :meth:`LayerKind.from_matrix`;
* **statistics**: their container, zeros, the update with one batch of rows, and the targets of
  the parallel merge from the Gram matrix (:meth:`LayerKind.init_stats`,
  :meth:`LayerKind.update_stats`, :meth:`LayerKind.own_targets`) and their memory cost
  (:meth:`LayerKind.stats_bytes`); the statistics store records the container's fields, so a
  kind says nothing about how it is stored;
* **solve and score**: the merged parameters of one layer in a basis, with its
  :class:`~jaxmerge.LayerSolution`, and the residual energy of a merge (:meth:`LayerKind.solve`,
  :meth:`LayerKind.energy`).

:class:`AffineKind` implements all of it for layers whose rows are a reshape of their input and
whose statistics are dense :class:`~jaxmerge.LayerStats` (``Dense``, ``DenseGeneral``, ``Conv``,
``LayerNorm``, a user's own linear layer); a kind overrides what differs. The built-in kinds in
:mod:`jaxmerge.kinds` register exactly as a user's kind does::

    class ScaledDenseKind(jm.AffineKind):
        name = "scaled_dense"
        kernel, bias = "w", "b"                       # parameter names

        def to_matrix(self, spec, params):            # y = x (2 w) + b
            return 2 * params["w"], params["b"]

        def from_matrix(self, spec, kernel, bias, like):
            return {"w": kernel / 2, "b": bias}

    jm.register_kind(ScaledDenseKind(), linen=[ScaledDense])
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp

from ..core.bases import Custom, LowRank
from ..core.energy import energies
from ..core.layers import augmented
from ..core.qp import solve_layer
from ..core.stats import LayerStats, affine_targets, update_input_stats, update_stats

__all__ = [
    "AffineKind",
    "CallShape",
    "LayerKind",
    "LayerSpec",
    "call_input",
]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What the merge knows about one layer (static metadata).

    Attributes:
        path: '/'-joined keys of the layer's parameter dict in the params tree.
        kind: the name of its :class:`LayerKind` (``"dense"``, ``"dense_general"``, ``"conv"``,
            ``"embed"``, ``"norm"``, or a registered kind's).
        n_in: input width of the rows (patch size for convs, vocabulary size for embeddings).
        n_out: output width of the rows.
        kernel: name of the weight parameter (``"kernel"``, ``"embedding"`` or ``"scale"``).
        bias: name of the bias parameter, or ``None`` when the layer has none.
        calls: how many times the layer was called in one forward pass.
        form: what else the kind needs to read the layer's parameters as ``W̄`` (``""`` for
            most kinds; an einsum layer's equation, a norm's scale offset), recorded with its
            statistics.
        scope: the module path holding the layer's parameters when it is not ``path``: layers
            sharing one module scope (Flax's ``nn.share_scope``, e.g. Gemma's feed-forward
            einsums ``mlp/gating_einsum`` and ``mlp/linear``) are keyed by their weight's path.
        slices: ``((axis, index), ...)``: the layer is one slice of stacked parameters (a block
            under ``nn.scan`` or ``nn.vmap``, ``path`` ending in ``[index]``), taken from each
            of its leaves along ``axis``, then along the next pair's axis (nested transforms).

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
    form: str = ""
    scope: str | None = None
    slices: tuple[tuple[int, int], ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        """The layer's solved parameter names: the weight, then the bias if any."""
        return (self.kernel,) + ((self.bias,) if self.bias else ())

    @classmethod
    def from_record(cls, record: Mapping) -> "LayerSpec":
        """The spec from its fields as stored in JSON (``dataclasses.asdict`` read back)."""
        record = dict(record)
        record["slices"] = tuple(tuple(s) for s in record.get("slices", ()))
        return cls(**record)

    def leaf(self, name: str) -> str:
        """The path of the layer's parameter ``name`` in the parameter tree."""
        where = self.path if self.scope is None else self.scope
        return f"{where}/{name}" if where else name

    def take(self, leaf):
        """The layer's slice of one of its (stacked) leaves."""
        for axis, index in self.slices:
            leaf = jnp.take(jnp.asarray(leaf), index, axis=axis)
        return leaf

    def put(self, leaf, value):
        """``leaf`` with the layer's slice replaced by ``value``."""
        return _put(jnp.asarray(leaf), self.slices, value)

    def sliced_shape(self, shape) -> tuple[int, ...]:
        """The shape of the layer's slice of a leaf of shape ``shape``."""
        shape = tuple(shape)
        for axis, _ in self.slices:
            shape = shape[:axis] + shape[axis + 1 :] if axis < len(shape) else ()
        return shape


def _put(leaf, slices, value):
    if not slices:
        return jnp.asarray(value, leaf.dtype)
    (axis, index), rest = slices[0], slices[1:]
    inner = _put(jnp.take(leaf, index, axis=axis), rest, value)
    return leaf.at[(slice(None),) * axis + (index,)].set(inner)


@dataclasses.dataclass(frozen=True)
class CallShape:
    """What a kind reads off one call of one of its layers (:meth:`LayerKind.describe`).

    Attributes:
        n_in: width of the input rows.
        n_out: width of the output rows.
        bias: the bias parameter's name, or ``None``.
        signature: calls with equal signatures (and ``n_in``) read the same input and share one
            Gram matrix (q/k/v, gate/up); ``("affine", id(x), axes)`` for a reshape of ``x``.
        rows: ``() -> (rows (N, n_in), leading row shape)``: the call's input as rows, evaluated
            only when statistics are taken.
        kernel: the weight parameter's name (``None``: the kind's :attr:`LayerKind.kernel`).
        outputs: ``y -> (N, n_out)``, the call's output as rows in the order of ``rows``
            (``None``: ``y.reshape(-1, n_out)``).
        form: the layer's :attr:`LayerSpec.form`.
    """

    n_in: int
    n_out: int
    bias: str | None
    signature: tuple
    rows: Callable[[], tuple[Any, tuple[int, ...]]]
    kernel: str | None = None
    outputs: Callable[[Any], Any] | None = None
    form: str = ""


class LayerKind:
    """A kind of layer (see the module docs). Subclass :class:`AffineKind` for most layers.

    Attributes:
        name: the kind's name in :class:`LayerSpec` and reports (unique among registered kinds).
        kernel: the weight parameter's name.
        bias: the bias parameter's name (``None``: the kind has none).
        traceable: whether :meth:`solve` can run under ``jit`` (the one-pass sequential merge
            solves the other kinds beforehand, from their own statistics).
        affine_targets: whether the parallel merge takes the targets' statistics from the Gram
            matrix (:meth:`own_targets`) instead of accumulating the layers' outputs.
        stats_type: the statistics container (a NamedTuple of sums with a ``count`` field).

    Calls of one kind whose :class:`CallShape` signatures start with ``"affine"`` and agree
    share one Gram matrix (layers reading the same input; with the full basis they are solved
    with one factorisation).
    """

    name: ClassVar[str]
    kernel: ClassVar[str] = "kernel"
    bias: ClassVar[str | None] = "bias"
    traceable: ClassVar[bool] = True
    affine_targets: ClassVar[bool] = False
    stats_type: ClassVar[type]

    # -- capture --
    def accepts(self, module) -> bool:
        """Whether this module's configuration is covered (otherwise it falls back)."""
        return True

    def param_names(self, module) -> tuple[str, ...]:
        """The names of the module's parameters the kind reads (an NNX module's attributes)."""
        return tuple(name for name in (self.kernel, self.bias) if name)

    def methods(self, cls: type) -> tuple[str, ...]:
        """The methods of a registered class that are calls of the layer (``__call__``; an
        embedding's lookup and head)."""
        return ("__call__",)

    def describe_call(self, module, params: Mapping, args: tuple, kwargs: Mapping, run: Callable,
                      method: str = "__call__"):  # fmt: skip
        """``(x, CallShape)`` of one call of ``method`` with arguments ``args, kwargs``, or
        ``None`` when it is not covered. The default takes the input ``x`` as the first argument
        (or the keyword ``inputs`` or ``x``) and asks :meth:`describe`; a kind whose input or
        configuration comes from other call arguments (an einsum equation) or that has several
        methods (a tied embedding) overrides this instead."""
        x = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
        if x is None or not hasattr(x, "shape"):
            return None
        shape = self.describe(module, params, x, run)
        return None if shape is None else (x, shape)

    def describe(self, module, params: Mapping, x, run: Callable) -> CallShape | None:
        """The :class:`CallShape` of one call with input ``x``, or ``None`` when this call is
        not covered. ``run(params, **module_overrides)`` runs the layer with other parameters."""
        raise NotImplementedError

    def joint(self, specs: Sequence[LayerSpec]) -> LayerSpec | None:
        """One layer's spec from the specs of its calls in one forward pass (``None``: the
        calls disagree, and the layer is not covered). The default: all calls alike."""
        return specs[0] if len(set(specs)) == 1 else None

    # -- parameters ↔ W̄ --
    def to_matrix(self, spec: LayerSpec, params: Mapping):
        """``(kernel (n_in, n_out), bias (n_out,) | None)`` from the layer's parameter dict."""
        raise NotImplementedError

    def from_matrix(self, spec: LayerSpec, kernel, bias, like: Mapping) -> dict:
        """The layer's parameter dict from a merged ``(kernel, bias)``, shaped like ``like``."""
        raise NotImplementedError

    def matrix_shapes(self, spec: LayerSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of :meth:`to_matrix`'s kernel and bias."""
        return (spec.n_in, spec.n_out), (spec.n_out,)

    def direction(self, spec: LayerSpec, direction):
        """A :class:`~jaxmerge.Custom` direction given as the layer's own parameter dict, as
        :meth:`to_matrix` of it; other forms pass through unchanged."""
        if isinstance(direction, Mapping) and spec.kernel in direction:
            return self.to_matrix(spec, direction)
        return direction

    # -- statistics --
    def container(self, specs: Sequence[LayerSpec]) -> type:
        """The statistics container of a group of these layers (:attr:`stats_type`)."""
        return self.stats_type

    def init_stats(self, specs: Sequence[LayerSpec], num_tasks: int, dtype):
        """Zero statistics of a group of layers sharing one input (outputs concatenated)."""
        raise NotImplementedError

    def update_stats(self, stats, x, y, task, mask, weight=1.0):
        """Add rows ``x``, targets ``y`` (``None``: inputs only, see :meth:`own_targets`) and a
        0/1 row mask of task ``task``."""
        raise NotImplementedError

    def own_targets(self, stats, specs: Sequence[LayerSpec], layers: Sequence[Mapping]):
        """One task's input statistics completed with the layers' own outputs as targets (the
        parallel merge), for kinds with ``affine_targets``; ``layers`` are the members'
        parameter dicts of that task."""
        raise NotImplementedError

    def stats_bytes(self, specs: Sequence[LayerSpec], num_tasks: int, rows: int, dtype) -> int:
        """An upper bound of the bytes one accumulation step of a group holds."""
        raise NotImplementedError

    # -- solve and score --
    def solve(self, spec: LayerSpec, stats, base, finetuned, centre, opt):
        """``(merged parameter dict, LayerSolution)`` of one layer, for two or more fine-tunes
        or a ridge (the merge takes a single fine-tune without a ridge as it is).

        ``base``, ``finetuned`` and ``centre`` (the fallback merge, the full basis' start) are
        the layer's parameter dicts; ``opt`` has ``basis``, ``prior``, ``ridge``, ``alpha``,
        ``rcond`` and ``jitter``. The :class:`~jaxmerge.LayerSolution` holds the merge as
        ``(kernel, bias)`` in the kind's matrix form (``None`` where it has none), the
        coefficients where the kind has them (else ``None``), ``E₀, L, ρ`` against the base,
        the status and the condition estimate.
        """
        raise NotImplementedError

    def energy(self, spec: LayerSpec, stats, base: Mapping, merged: Mapping):
        """``(E₀, L, ρ)`` of the merged layer on statistics ``stats``."""
        raise NotImplementedError


class AffineKind(LayerKind):
    """A layer whose rows are its input reshaped to ``(-1, n_in)`` and whose kernel reshapes to
    ``(n_in, n_out)``: the defaults are those of ``Dense``. Statistics are
    :class:`~jaxmerge.LayerStats`; the solve is :func:`~jaxmerge.solve_layer`."""

    stats_type = LayerStats
    affine_targets = True

    def describe(self, module, params, x, run):
        kernel = params.get(self.kernel)
        if kernel is None or kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
            return None
        n_in, n_out = kernel.shape
        bias = self.bias if self.bias and params.get(self.bias) is not None else None

        def rows():
            return x.reshape(-1, n_in), x.shape[:-1]

        return CallShape(n_in, n_out, bias, ("affine", id(x), (x.ndim - 1,)), rows)

    def to_matrix(self, spec, params):
        weight = jnp.asarray(params[spec.kernel])
        bias = params.get(spec.bias) if spec.bias is not None else None
        bias = None if bias is None else jnp.asarray(bias).reshape(-1)
        return weight.reshape(spec.n_in, spec.n_out), bias

    def from_matrix(self, spec, kernel, bias, like):
        out = dict(like)
        out[spec.kernel] = kernel.reshape(jnp.shape(like[spec.kernel]))
        if spec.bias is not None:
            out[spec.bias] = bias.reshape(jnp.shape(like[spec.bias]))
        return out

    def init_stats(self, specs, num_tasks, dtype):
        n1, n_out = specs[0].n_in + 1, sum(s.n_out for s in specs)
        return LayerStats(
            jnp.zeros((n1, n1), dtype),
            jnp.zeros((n1, n_out), dtype),
            jnp.zeros((n_out,), dtype),
            jnp.zeros((num_tasks, n1), dtype),
            jnp.zeros((num_tasks,), dtype),
        )

    def update_stats(self, stats, x, y, task, mask, weight=1.0):
        if y is None:
            return update_input_stats(stats, x, task, mask)
        return update_stats(stats, x, y, task, mask=mask, weight=weight)

    def own_targets(self, stats, specs, layers):
        """``P = AW̄`` and ``s = diag(W̄ᵀAW̄)`` (:func:`~jaxmerge.core.stats.affine_targets`): equal
        to accumulating the layers' own outputs up to their rounding, without the
        ``N·(n+1)·m`` products."""
        columns = []
        for spec, params in zip(specs, layers, strict=True):
            kernel, bias = self.to_matrix(spec, params)
            bias = jnp.zeros(spec.n_out, kernel.dtype) if bias is None else bias
            columns.append(jnp.concatenate([kernel, bias.astype(kernel.dtype)[None]], axis=0))
        return affine_targets(stats, jnp.concatenate(columns, axis=1))

    def stats_bytes(self, specs, num_tasks, rows, dtype):
        from ..scale.memory import accumulation_bytes  # the formula lives with its bound's test

        n_out = sum(s.n_out for s in specs)
        return accumulation_bytes(
            {"": (specs[0].n_in, n_out)}, num_tasks=num_tasks, rows=rows, dtype=dtype
        )

    def solve(self, spec, stats, base, finetuned, centre, opt):
        sol = self.solve_matrix(spec, stats, base, finetuned, centre, opt)
        e0, loss, rho = self.matrix_energy(stats, self.to_matrix(spec, base), sol[:2])
        sol = sol._replace(energy_base=e0, energy_merged=loss, energy_fraction=rho)
        return self.from_matrix(spec, sol.kernel, sol.bias, base), sol

    def solve_matrix(self, spec, stats, base, finetuned, centre, opt):
        """The :class:`~jaxmerge.LayerSolution` of :func:`~jaxmerge.solve_layer` (see
        :meth:`solve`; its energies are those of the start)."""
        b0 = self.to_matrix(spec, base)
        fks = [self.to_matrix(spec, f) for f in finetuned]
        c0 = self.to_matrix(spec, centre)
        basis, prior = opt.basis, opt.prior
        if (basis == "full" or isinstance(basis, LowRank)) and isinstance(prior, Mapping):
            prior = self.to_matrix(spec, prior)
        if isinstance(basis, Custom):
            basis = Custom([self.direction(spec, d) for d in basis.directions], basis.per_output)
        return self.solve_in_basis(stats, c0 if basis == "full" else b0, fks, basis, prior, opt)

    def solve_in_basis(self, stats, start, finetuned, basis, prior, opt):
        """:func:`~jaxmerge.solve_layer` from ``start`` (the fallback merge for the full basis,
        the base otherwise), the layers as ``(kernel, bias)`` pairs."""
        return solve_layer(stats, start, finetuned, basis=basis, ridge=opt.ridge, prior=prior,
                           alpha=opt.alpha, rcond=opt.rcond, jitter=opt.jitter,
                           throw=False)  # fmt: skip

    @staticmethod
    def matrix_energy(stats: LayerStats, base, merged):
        """``(E₀, L, ρ)`` of ``merged = (kernel, bias)`` against ``base`` on ``stats``."""
        (k0, b0), (k1, b1) = base, merged
        dtype = stats.gram.dtype
        p = stats.n_in + (b0 is not None)
        w0 = augmented(k0, b0).astype(dtype)
        w1 = augmented(k1, b1).astype(dtype)
        return energies(stats.gram[:p, :p], stats.cross[:p], jnp.sum(stats.out_sq), w0, w1 - w0)

    def energy(self, spec, stats, base, merged):
        return self.matrix_energy(stats, self.to_matrix(spec, base), self.to_matrix(spec, merged))


# ---- the registry -------------------------------------------------------------------------------


def call_input(which: int | str, module, args: tuple, kwargs: Mapping):
    """The argument of a call that is the layer's input: position ``which`` (after ``self``),
    or the argument named ``which`` (by keyword, else by its place in ``__call__``'s
    signature); ``None`` when the call does not pass it."""
    import inspect

    if isinstance(which, str):
        if which in kwargs:
            return kwargs[which]
        names = list(inspect.signature(type(module).__call__).parameters)[1:]
        which = names.index(which) if which in names else len(args)
    return args[which] if which < len(args) else None
