r"""Norms: ``LayerNorm`` and ``RMSNorm`` with a scale, normalising the last axis.

The rows are the normalised input ``x̂`` (the layer run with a unit scale and a zero bias, so its
epsilon and dtype are honoured), and ``y_c = a_c x̂_c + b_c``: a set of independent per-channel
2×2 systems ``[x̂_c, 1] → y_c``. Written as a dense layer with kernel ``diag(scale)`` the scalar,
diagonal and custom bases are exact; the full basis (and :class:`~jaxmerge.LowRank`, since a
diagonal kernel has no low-rank structure to exploit) is solved channel by channel, because a
dense ``(C, C)`` kernel is not a norm.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core.bases import LowRank
from ..core.qp import LayerSolution, solve_layer
from ..core.stats import LayerStats
from ..core.systems import map_systems
from .base import AffineKind, CallShape, call_input
from .registry import Rules, register_kind

__all__ = ["NormKind", "register_norm"]


def _is_axis_last(axes) -> bool:
    return tuple(np.atleast_1d(axes).tolist()) == (-1,)


def _channels(layer):
    kernel, bias = layer
    return jnp.diagonal(kernel)[:, None, None], None if bias is None else bias[:, None]


@dataclasses.dataclass(frozen=True)
class _Rule:
    input: int | str
    scale: str
    bias: str | None
    offset: float | Callable[[Any], float]
    accepts: Callable[[Any], bool] | None


def _offset(spec) -> float:
    return float(spec.form.partition("offset=")[2] or 0.0)


class NormKind(Rules, AffineKind):
    """``x̂ ⊙ (scale + offset) + bias`` over the last axis; each registered class's rule (input
    argument, parameter names, offset) is kept by class (:func:`register_norm`)."""

    name = "norm"
    kernel = "scale"

    def accepts(self, module):
        test = self.rule(module).accepts
        return test is None or bool(test(module))

    def param_names(self, module):
        rule = self.rule(module)
        return tuple(n for n in (rule.scale, rule.bias) if n)

    def describe_call(self, module, params, args, kwargs, run, method="__call__"):
        rule = self.rule(module)
        x, scale = call_input(rule.input, module, args, kwargs), params.get(rule.scale)
        if x is None or not hasattr(x, "shape") or scale is None:
            return None
        if scale.ndim != 1 or x.shape[-1] != scale.shape[0]:
            return None
        bias = rule.bias if rule.bias and params.get(rule.bias) is not None else None
        offset = float(rule.offset(module) if callable(rule.offset) else rule.offset)
        c = scale.shape[0]
        unit = {rule.scale: jnp.full_like(scale, 1.0 - offset)}  # an effective scale of one
        if bias:
            unit[bias] = jnp.zeros_like(params[bias])

        def rows():
            return run(unit).reshape(-1, c), x.shape[:-1]

        form = f"offset={offset!r}" if offset else ""
        return x, CallShape(c, c, bias, ("norm", id(module), id(x)), rows, rule.scale, None,
                            form)  # fmt: skip

    def to_matrix(self, spec, params):
        weight = jnp.asarray(params[spec.kernel]) + _offset(spec)
        bias = params.get(spec.bias) if spec.bias is not None else None
        return jnp.diag(weight), None if bias is None else jnp.asarray(bias).reshape(-1)

    def from_matrix(self, spec, kernel, bias, like):
        return super().from_matrix(spec, jnp.diagonal(kernel) - _offset(spec), bias, like)

    def solve_in_basis(self, stats, start, finetuned, basis, prior, opt):
        if basis == "full" or isinstance(basis, LowRank):
            return _solve_channels(stats, start, finetuned, prior, opt)
        return super().solve_in_basis(stats, start, finetuned, basis, prior, opt)


NORM = NormKind()


def register_norm(
    cls: type | str,
    *,
    input: int | str = 0,
    scale: str = "scale",
    bias: str | None = None,
    offset: float | Callable[[Any], float] = 0.0,
    accepts: Callable[[Any], bool] | None = None,
    api: str | None = None,
):
    r"""Tell jaxmerge that a Flax module class is a norm over the last axis:
    ``y = x̂ ⊙ (scale + offset) + bias``, with ``x̂`` the layer's normalised input (whatever its
    normalisation: the layer is run with an effective scale of one to compute it).

    Args:
        cls: the ``flax.linen`` or ``flax.nnx`` module class, or its qualified name (then
            ``api`` says which API), matched exactly.
        input: the input argument of ``__call__`` (a position or a name).
        scale: the scale parameter's name (EasyDeL's RMSNorm calls it ``"kernel"``).
        bias: the bias parameter's name, or ``None``.
        offset: a constant added to the stored scale (``1.0`` for Gemma's ``x̂ ⊙ (1 + scale)``),
            or a function of the module returning it (MaxText's ``scale_offset`` attribute).
        accepts: ``module -> bool``: whether a module's configuration is covered.
        api: ``"linen"`` or ``"nnx"`` for a class given by name.

    Returns:
        the norm kind.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxmerge as jm
        >>> class OffsetRMSNorm(nn.Module):  # x̂ ⊙ (1 + scale), as Gemma writes it
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],))
        ...         x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        ...         return x * (1 + scale)
        >>> jm.register_norm(OffsetRMSNorm, offset=1.0).name
        'norm'
    """
    return NORM.cover(cls, _Rule(input, scale, bias, offset, accepts), api, "register_norm")


def _solve_channels(stats: LayerStats, start, finetuned, prior, opt):
    """Per-channel 2×2 systems ``[x̂_c, 1] → y_c`` (the full basis), one per channel."""
    c = stats.n_in
    g, p, td = stats.gram, stats.cross, stats.task_diag
    a, b, d = jnp.diagonal(g)[:c], g[:c, c], jnp.broadcast_to(g[c, c], (c,))
    per_channel = LayerStats(
        gram=jnp.stack([jnp.stack([a, b], -1), jnp.stack([b, d], -1)], -2),
        cross=jnp.stack([jnp.diagonal(p[:c, :c]), p[c, :c]], -1)[..., None],
        out_sq=stats.out_sq[:, None],
        task_diag=jnp.stack([td[:, :c].T, jnp.broadcast_to(td[:, c], (c, td.shape[0]))], -1),
        count=jnp.broadcast_to(stats.count, (c, stats.count.shape[0])),
    )

    def one(st, s, fs, pr):
        return solve_layer(st, s, fs, basis="full", ridge=opt.ridge, prior=pr, alpha=opt.alpha,
                           rcond=opt.rcond, jitter=opt.jitter, throw=False)  # fmt: skip

    sol = map_systems(
        one,
        per_channel,
        _channels(start),
        [_channels(f) for f in finetuned],
        None if prior is None else _channels(prior),
    )
    bias = None if sol.bias is None else sol.bias[:, 0]
    # No coefficients (one small system per channel); the caller measures the layer's energies.
    nan = jnp.array(jnp.nan, stats.gram.dtype)
    return LayerSolution(jnp.diag(sol.kernel[:, 0, 0]), bias, None, nan, nan, nan,
                         jnp.max(sol.status), jnp.max(sol.condition), None)  # fmt: skip


def _last_axis(module) -> bool:
    return _is_axis_last(module.feature_axes) and _is_axis_last(module.reduction_axes)


register_kind(NORM)
for _cls, _bias in ((nn.LayerNorm, "bias"), (nn.RMSNorm, None), (nnx.LayerNorm, "bias"),
                    (nnx.RMSNorm, None)):  # fmt: skip
    register_norm(_cls, bias=_bias, accepts=_last_axis)
