r"""Einsum layers: ``y = einsum(eq, x, w) (+ b)``, one input and one weight.

Every index of ``eq`` is one of

* **row**: in ``x`` and ``y``, not in ``w`` (batch, tokens, ``...``): the examples;
* **in**: in ``x`` and ``w``, not in ``y``: contracted, ``n_in = Π in``;
* **out**: in ``w`` and ``y``, not in ``x``: ``n_out = Π out``;
* **group**: in all three (experts): a separate weight per index value.

Without group indices the layer is a dense layer on rows: ``x`` transposed to ``(row…, in…)``
and flattened to ``(N, n_in)``, the weight transposed to ``(in…, out…)`` and reshaped
``(n_in, n_out)`` (the in and out indices in the weight's order), the output transposed to
``(row…, out…)``. So q, k and v einsums reading one input share one Gram matrix with each other
and with ``Dense`` layers on it, and every basis of :func:`~jaxmerge.solve_layer` applies. The
bias has the output's weight indices in the output's order (Flax's ``Einsum`` convention).

With group indices (one weight per expert, ``"ecd,edf->ecf"``), each group value is its own
dense layer: the statistics are a stack of ``G`` Gram matrices (:class:`GroupedStats`) and the
solve runs group by group (:func:`~jaxmerge.core.systems.map_systems`).

The layer's equation, with ``...`` spelled out and the group sizes, is its
:attr:`~jaxmerge.LayerSpec.form` (``"btd,sndh->sbtnh"``), so saved statistics are solved
without the module. An index in one operand only, an index repeated in one operand, or an
ellipsis in the weight is a clear error naming the layer.

Layers are told to jaxmerge with :func:`register_layer` (the input argument, the weight and bias
names, the equation: a string, or a function of the call); ``nn.Einsum`` and ``nnx.Einsum`` are
registered here, the JAX LLM libraries' classes in :mod:`jaxmerge.kinds.library`; the
``"dense_general"`` kind (:mod:`jaxmerge.kinds.dense`) is an :class:`EinsumKind` too, whose
layers' batch axes are group indices.
"""

import dataclasses
import string
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from ..core.stats import LayerStats, affine_targets
from ..core.systems import map_systems
from .base import AffineKind, CallShape, call_input
from .registry import Rules, kinds, register_kind

__all__ = ["EinsumCall", "EinsumKind", "GroupedStats", "contraction_equation", "einsum_layout",
           "register_layer"]  # fmt: skip


# ---- equations ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """An equation's indices by role (each in its operand's order, see the module docs)."""

    x: str
    w: str
    y: str
    rows: str  # x's order
    ins: str  # w's order
    outs: str  # w's order
    groups: str  # w's order

    @property
    def equation(self) -> str:
        return f"{self.x},{self.w}->{self.y}"


def _expand(term: str, ndim: int, fill: str, what: str) -> str:
    """``term`` with ``...`` spelled out as the first letters of ``fill`` for ``ndim`` axes."""
    if "..." not in term:
        return term
    explicit = len(term) - 3
    if ndim < explicit:
        raise ValueError(f"the {what} {term!r} has more indices than the operand's {ndim} axes")
    return term.replace("...", fill[: ndim - explicit])


def einsum_layout(equation: str, x_ndim: int, w_ndim: int) -> _Layout:
    """Classify the indices of ``equation`` (``"x,w->y"``) for an input of ``x_ndim`` axes.

    Raises:
        ValueError: the equation is not ``x,w->y``, its operands disagree with the number of
            axes, an index is in one operand only or twice in one, or the weight has ``...``.
    """
    eq = equation.replace(" ", "")
    if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
        raise ValueError(f"einsum {equation!r}: expected an explicit 'input,weight->output'")
    lhs, y = eq.split("->")
    x, w = lhs.split(",")
    if "..." in w:
        raise ValueError(f"einsum {equation!r}: the weight's indices cannot hold '...'")
    used = set((x + w + y).replace(".", ""))
    fill = "".join(c for c in string.ascii_letters if c not in used)
    x = _expand(x, x_ndim, fill, f"input of einsum {equation!r}")
    y = y.replace("...", fill[: x_ndim - (len(lhs.split(",")[0]) - 3)] if "..." in lhs else "")
    for term, ndim, what in ((x, x_ndim, "input"), (w, w_ndim, "weight")):
        if len(term) != ndim:
            raise ValueError(
                f"einsum {equation!r}: the {what} has {ndim} axes but {len(term)} indices"
            )
    for term, what in ((x, "input"), (w, "weight"), (y, "output")):
        twice = sorted({c for c in term if term.count(c) > 1})
        if twice:
            raise ValueError(f"einsum {equation!r}: index {twice[0]!r} repeats in the {what}")
    alone = [c for c in used if (c in x) + (c in w) + (c in y) == 1]
    if alone:
        c = sorted(alone)[0]
        where = "input" if c in x else "weight" if c in w else "output"
        raise ValueError(
            f"einsum {equation!r}: index {c!r} is in the {where} only; an einsum layer's "
            "indices are rows (input, output), contracted (input, weight), outputs (weight, "
            "output) or groups (all three)"
        )
    return _Layout(
        x=x,
        w=w,
        y=y,
        rows="".join(c for c in x if c not in w),
        ins="".join(c for c in w if c in x and c not in y),
        outs="".join(c for c in w if c in y and c not in x),
        groups="".join(c for c in w if c in x and c in y),
    )


def contraction_equation(ndim: int, axes, n_out: int, batch: int = 0) -> str:
    """The einsum of a dense layer contracting ``axes`` (in the kernel's order) of an
    ``ndim``-axis input with a kernel ``(*batch, *in, *out)`` of ``n_out`` output axes, the
    input's first ``batch`` axes its batch axes, leading in the output too (Flax's and
    MaxText's ``DenseGeneral``)."""
    axes = [int(a) % ndim for a in np.atleast_1d(axes)]
    x = string.ascii_letters[:ndim]
    out = string.ascii_letters[ndim : ndim + n_out]
    w = x[:batch] + "".join(x[a] for a in axes) + out
    y = "".join(c for i, c in enumerate(x) if i not in axes) + out
    return f"{x},{w}->{y}"


def _perm(src: str, dst: str) -> tuple[int, ...]:
    return tuple(src.index(c) for c in dst)


def _parse_form(form: str) -> tuple[_Layout, dict[str, int]]:
    """The layout and group sizes of a form ``"x,w->y"`` or ``"x,w->y;e=4,…"``."""
    eq, _, sizes = form.partition(";")
    lhs, _ = eq.split("->")
    x, w = lhs.split(",")
    layout = einsum_layout(eq, len(x), len(w))
    groups = {k: int(v) for k, v in (kv.split("=") for kv in sizes.split(",") if kv)}
    return layout, groups


# ---- statistics of grouped layers ---------------------------------------------------------------


class GroupedStats(NamedTuple):
    """Statistics of an einsum layer with group indices: one :class:`~jaxmerge.LayerStats` per
    group value, stacked on the leading axis of each sum (``count`` is shared: every group sees
    every row).

    Attributes:
        gram: ``(G, n_in + 1, n_in + 1)``.
        cross: ``(G, n_in + 1, n_out)``.
        out_sq: ``(G, n_out)``.
        task_diag: ``(G, K, n_in + 1)``.
        count: rows per task, ``(K,)``.
    """

    gram: Float[Array, "G n1 n1"]
    cross: Float[Array, "G n1 m"]
    out_sq: Float[Array, "G m"]
    task_diag: Float[Array, "G K n1"]
    count: Float[Array, " K"]

    def group(self, g=None) -> LayerStats:
        """Group ``g``'s :class:`~jaxmerge.LayerStats` (``None``: every group, stacked, with
        ``count`` broadcast, to vmap over)."""
        if g is None:
            count = jnp.broadcast_to(self.count, (self.gram.shape[0],) + self.count.shape)
            return LayerStats(self.gram, self.cross, self.out_sq, self.task_diag, count)
        return LayerStats(self.gram[g], self.cross[g], self.out_sq[g], self.task_diag[g],
                          self.count)  # fmt: skip


def _stacked(stats: LayerStats) -> GroupedStats:
    return GroupedStats(stats.gram, stats.cross, stats.out_sq, stats.task_diag, stats.count[0])


# ---- the kind -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EinsumCall:
    """One call of a registered einsum layer, as an ``equation`` function sees it.

    Attributes:
        module: the Flax module.
        args: the call's positional arguments.
        kwargs: its keyword arguments.
        x: the input.
        weight: the weight parameter's value.
    """

    module: Any
    args: tuple
    kwargs: Mapping
    x: Any
    weight: Any


@dataclasses.dataclass(frozen=True)
class _Rule:
    input: int | str
    weight: str | Callable[[Any], str]
    bias: str | None
    equation: str | Callable[[EinsumCall], str | None]
    accepts: Callable[[Any], bool] | None

    def weight_name(self, module) -> str:
        return self.weight(module) if callable(self.weight) else self.weight


class EinsumKind(Rules, AffineKind):
    """Layers that are an einsum of their input and one weight (see the module docs).

    One instance, ``"einsum"``, serves every registered class without a parameter transform;
    each class's rule (input argument, parameter names, equation) is kept by class. A
    registration with a ``transform`` gets its own instance (the transform is needed to read
    saved statistics' parameters).
    """

    name = "einsum"

    def __init__(self, name: str = "einsum", transform=None):
        super().__init__()
        self.name = name
        self.transform = transform

    def accepts(self, module):
        test = self.rule(module).accepts
        return test is None or bool(test(module))

    def param_names(self, module):
        rule = self.rule(module)
        return tuple(n for n in (rule.weight_name(module), rule.bias) if n)

    def describe_call(self, module, params, args, kwargs, run, method="__call__"):
        rule = self.rule(module)
        name = rule.weight_name(module)
        x, weight = call_input(rule.input, module, args, kwargs), params.get(name)
        if x is None or not hasattr(x, "shape") or weight is None:
            return None
        if self.transform is not None:  # the equation reads the weight as the layer uses it
            weight = self.transform[0](weight)
        equation = rule.equation
        if callable(equation):
            equation = equation(EinsumCall(module, args, kwargs, x, weight))
            if equation is None:  # a configuration the rule does not cover
                return None
        if not isinstance(equation, str):
            raise ValueError(f"the layer's einsum equation is {equation!r}, not a string")
        lay = einsum_layout(equation, x.ndim, weight.ndim)
        size = dict(zip(lay.x, x.shape, strict=True))
        for c, n in zip(lay.w, weight.shape, strict=True):
            if c in size and size[c] != n:
                raise ValueError(
                    f"einsum {equation!r}: index {c!r} is {size[c]} in the input but {n} in "
                    f"the weight {tuple(weight.shape)}"
                )
            size[c] = n
        prod = lambda idx: int(np.prod([size[c] for c in idx]))  # noqa: E731
        n_in, n_out, n_groups = prod(lay.ins), prod(lay.outs), prod(lay.groups)
        bias = rule.bias if rule.bias and params.get(rule.bias) is not None else None
        form = lay.equation + (
            ";" + ",".join(f"{c}={size[c]}" for c in lay.groups) if lay.groups else ""
        )
        x_order = lay.rows + lay.groups + lay.ins
        y_order = "".join(c for c in lay.x if c in lay.rows) + lay.groups + lay.outs
        lead = tuple(size[c] for c in lay.rows)

        def rows():
            xt = jnp.transpose(x, _perm(lay.x, x_order))
            return xt.reshape(-1, n_groups * n_in), lead

        def outputs(y):
            return jnp.transpose(y, _perm(lay.y, y_order)).reshape(-1, n_groups * n_out)

        if lay.groups:  # one Gram matrix per group value: never shared with other layers
            signature = ("einsum_groups", id(x), _perm(lay.x, x_order))
        else:  # the signature of every affine kind's rows of x over these axes
            signature = ("affine", id(x), _perm(lay.x, lay.ins))
        return x, CallShape(n_in, n_out, bias, signature, rows, name, outputs, form)

    # -- parameters ↔ W̄ --
    def to_matrix(self, spec, params):
        weight = jnp.asarray(params[spec.kernel])
        if self.transform is not None:
            weight = self.transform[0](weight)
        bias = params.get(spec.bias) if spec.bias is not None else None
        if not spec.form:
            kernel = weight.reshape(spec.n_in, spec.n_out)
            return kernel, None if bias is None else jnp.asarray(bias).reshape(-1)
        lay, _ = _parse_form(spec.form)
        shape = (spec.n_in, spec.n_out)
        if self._groups(spec) > 1:  # groups of one value are a dense layer (``container``)
            shape = (self._groups(spec),) + shape
        kernel = jnp.transpose(weight, _perm(lay.w, lay.groups + lay.ins + lay.outs))
        kernel = kernel.reshape(shape)
        if bias is not None:
            b_order = "".join(c for c in lay.y if c in lay.w)
            bias = jnp.transpose(jnp.asarray(bias), _perm(b_order, lay.groups + lay.outs))
            bias = bias.reshape(shape[:-2] + shape[-1:])
        return kernel, bias

    def from_matrix(self, spec, kernel, bias, like):
        out = dict(like)
        w_like = jnp.shape(like[spec.kernel])
        if self.transform is not None:  # the shape of the weight as the layer uses it
            w_like = jax.eval_shape(self.transform[0], like[spec.kernel]).shape
        if spec.form:
            lay, _ = _parse_form(spec.form)
            order = lay.groups + lay.ins + lay.outs
            sizes = dict(zip(lay.w, w_like, strict=True))
            kernel = kernel.reshape([sizes[c] for c in order])
            kernel = jnp.transpose(kernel, _perm(order, lay.w))
            if bias is not None:
                b_order = "".join(c for c in lay.y if c in lay.w)
                bias = bias.reshape([sizes[c] for c in lay.groups + lay.outs])
                bias = jnp.transpose(bias, _perm(lay.groups + lay.outs, b_order))
        kernel = kernel.reshape(w_like)
        out[spec.kernel] = kernel if self.transform is None else self.transform[1](kernel)
        if spec.bias is not None:
            out[spec.bias] = bias.reshape(jnp.shape(like[spec.bias]))
        return out

    # -- grouped layers: everything per group (statistics vmapped, solves one group at a time) --
    @staticmethod
    def _groups(spec) -> int:
        return int(np.prod(list(_parse_form(spec.form)[1].values()))) if spec.form else 1

    def container(self, specs):
        return GroupedStats if self._groups(specs[0]) > 1 else LayerStats

    def matrix_shapes(self, spec):
        g = self._groups(spec)
        kernel, bias = super().matrix_shapes(spec)
        return ((g,) + kernel, (g,) + bias) if g > 1 else (kernel, bias)

    def init_stats(self, specs, num_tasks, dtype):
        g = self._groups(specs[0])
        if g == 1:
            return super().init_stats(specs, num_tasks, dtype)
        one = super().init_stats(specs, num_tasks, dtype)
        return _stacked(jax.tree.map(lambda a: jnp.broadcast_to(a, (g,) + a.shape), one))

    def update_stats(self, stats, x, y, task, mask, weight=1.0):
        if not isinstance(stats, GroupedStats):
            return super().update_stats(stats, x, y, task, mask, weight)
        g = stats.gram.shape[0]
        xg = jnp.moveaxis(x.reshape(x.shape[0], g, -1), 1, 0)
        yg = None if y is None else jnp.moveaxis(y.reshape(y.shape[0], g, -1), 1, 0)
        step = lambda st, xi, yi: super(EinsumKind, self).update_stats(  # noqa: E731
            st, xi, yi, task, mask, weight
        )
        return _stacked(jax.vmap(step)(stats.group(), xg, yg))

    def own_targets(self, stats, specs, layers):
        if not isinstance(stats, GroupedStats):
            return super().own_targets(stats, specs, layers)
        (spec,), (params,) = specs, layers
        kernel, bias = self.to_matrix(spec, params)
        if bias is None:
            bias = jnp.zeros(kernel.shape[:1] + kernel.shape[2:], kernel.dtype)
        columns = jnp.concatenate([kernel, bias.astype(kernel.dtype)[:, None]], axis=1)
        return _stacked(jax.vmap(affine_targets)(stats.group(), columns))

    def stats_bytes(self, specs, num_tasks, rows, dtype):
        return self._groups(specs[0]) * super().stats_bytes(specs, num_tasks, rows, dtype)

    def solve(self, spec, stats, base, finetuned, centre, opt):
        if not isinstance(stats, GroupedStats):
            return super().solve(spec, stats, base, finetuned, centre, opt)
        b0 = self.to_matrix(spec, base)
        fks = [self.to_matrix(spec, f) for f in finetuned]
        c0 = self.to_matrix(spec, centre)
        prior = opt.prior
        if isinstance(prior, Mapping):
            prior = self.to_matrix(spec, prior)

        def one(st, b, fs, c, pr):
            start = c if opt.basis == "full" else b
            sol = self.solve_in_basis(st, start, fs, opt.basis, pr, opt)
            e0, loss, _ = self.matrix_energy(st, b, sol[:2])
            return sol._replace(energy_base=e0, energy_merged=loss)

        sol = map_systems(one, stats.group(), b0, fks, c0, prior)
        e0, loss = jnp.sum(sol.energy_base), jnp.sum(sol.energy_merged)
        rho = jnp.where(e0 > 0, 1.0 - loss / jnp.where(e0 > 0, e0, 1.0), 1.0)
        sol = sol._replace(energy_base=e0, energy_merged=loss, energy_fraction=rho,
                           status=jnp.max(sol.status), condition=jnp.max(sol.condition),
                           spectrum=None)  # fmt: skip
        return self.from_matrix(spec, sol.kernel, sol.bias, base), sol

    def energy(self, spec, stats, base, merged):
        if not isinstance(stats, GroupedStats):
            return super().energy(spec, stats, base, merged)
        parts = jax.vmap(self.matrix_energy)(
            stats.group(), self.to_matrix(spec, base), self.to_matrix(spec, merged)
        )
        e0, loss = jnp.sum(parts[0]), jnp.sum(parts[1])
        rho = jnp.where(e0 > 0, 1.0 - loss / jnp.where(e0 > 0, e0, 1.0), 1.0)
        return e0, loss, rho


EINSUM = EinsumKind()


def register_layer(
    cls: type | str,
    *,
    equation: str | Callable[[EinsumCall], str | None],
    input: int | str = 0,
    weight: str | Callable[[Any], str] = "kernel",
    bias: str | None = "bias",
    accepts: Callable[[Any], bool] | None = None,
    transform: tuple[Callable, Callable] | None = None,
    name: str | None = None,
    api: str | None = None,
):
    """Tell jaxmerge that a Flax module class is an einsum layer ``y = einsum(eq, x, w) + b``.

    Args:
        cls: the ``flax.linen`` or ``flax.nnx`` module class, or its qualified name
            (``"package.module.ClassName"``; then ``api`` says which API it is written in),
            matched exactly (not its subclasses).
        equation: ``"input,weight->output"`` indices (``...`` allowed in the input and output),
            or a function of the :class:`EinsumCall` returning it (``None``: this call is not
            covered and its parameters fall back), e.g. ``lambda c: c.args[0]`` for a layer
            called as ``(eqn, x)``.
        input: the input argument of ``__call__``: a position (``0``: the first after
            ``self``) or a name (found by keyword, else by its position in the signature).
        weight: the weight parameter's name, or a function of the module returning it.
        bias: the bias parameter's name (``None``: no bias); its axes are the output's indices
            that are in the weight, in the output's order.
        accepts: ``module -> bool``: whether a module's configuration is covered.
        transform: ``(to_weight, from_weight)``: the weight in the einsum as a function of the
            stored parameter and its inverse (e.g. a stored transpose or scale); the layer then
            gets its own kind, called ``name``.
        name: the kind's name when ``transform`` is given (saved statistics refer to it).
        api: ``"linen"`` or ``"nnx"`` for a class given by name; ignored for a class.

    Returns:
        the layer's :class:`EinsumKind`.

    Raises:
        TypeError: ``cls`` is not a Flax module class or a name, or ``equation`` is neither a
            string nor a function.
        ValueError: a string ``equation`` is not ``x,w->y``; ``api`` is missing for a name;
            ``transform`` without ``name``.

    Examples:
        >>> import flax.linen as nn, jax.numpy as jnp, jaxmerge as jm
        >>> class HeadProjection(nn.Module):  # y[b, t, n, h] = Σ_d x[b, t, d] w[d, n, h]
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 2, 4))
        ...         return jnp.einsum("btd,dnh->btnh", x, w)
        >>> jm.register_layer(HeadProjection, equation="btd,dnh->btnh", weight="w", bias=None).name
        'einsum'
    """
    if not (isinstance(equation, str) or callable(equation)):
        raise TypeError(f"register_layer: equation must be a string or a function, got "
                        f"{type(equation).__name__}.")  # fmt: skip
    if isinstance(equation, str):
        lhs = equation.replace(" ", "").split("->")[0].split(",")
        if len(lhs) != 2:
            raise ValueError(f"register_layer: equation {equation!r} is not 'x,w->y'.")
        einsum_layout(equation, len(lhs[0].replace("...", "")), len(lhs[1]))
    if transform is not None and not name:
        raise ValueError("register_layer: a transform needs a name for its kind.")
    if transform is None:
        kind = EINSUM
    else:
        existing = kinds().get(name)
        kind = existing if isinstance(existing, EinsumKind) else EinsumKind(name, transform)
        kind.transform = transform
    return kind.cover(cls, _Rule(input, weight, bias, equation, accepts), api, "register_layer")


def _flax_einsum(call: EinsumCall) -> str | None:
    given = call.kwargs.get("einsum_str", call.args[1] if len(call.args) > 1 else None)
    return given or call.module.einsum_str


register_kind(EINSUM)
register_layer(nn.Einsum, input="inputs", equation=_flax_einsum)
register_layer(nnx.Einsum, input="inputs", equation=_flax_einsum)
