r"""Norms: ``LayerNorm`` and ``RMSNorm`` with a scale, normalising the last axis.

The rows are the normalised input ``x̂`` (the layer run with a unit scale and a zero bias, so its
epsilon and dtype are honoured), and ``y_c = a_c x̂_c + b_c``: a set of independent per-channel
2×2 systems ``[x̂_c, 1] → y_c``. Written as a dense layer with kernel ``diag(scale)`` the scalar,
diagonal and custom bases are exact; the full basis (and :class:`~jaxmerge.LowRank`, since a
diagonal kernel has no low-rank structure to exploit) is solved channel by channel, because a
dense ``(C, C)`` kernel is not a norm.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..core.bases import LowRank
from ..core.qp import LayerSolution, solve_layer
from ..core.stats import LayerStats
from .base import AffineKind, CallShape, register_kind

__all__ = ["NormKind"]


def _is_axis_last(axes) -> bool:
    return tuple(np.atleast_1d(axes).tolist()) == (-1,)


def _channels(layer):
    kernel, bias = layer
    return jnp.diagonal(kernel)[:, None, None], None if bias is None else bias[:, None]


class NormKind(AffineKind):
    """``x̂ ⊙ scale + bias`` over the last axis."""

    name = "norm"
    kernel = "scale"

    def accepts(self, module):
        return _is_axis_last(module.feature_axes) and _is_axis_last(module.reduction_axes)

    def describe(self, module, params, x, run):
        scale = params.get(self.kernel)
        if scale is None or scale.ndim != 1 or x.shape[-1] != scale.shape[0]:
            return None
        bias = self.bias if params.get(self.bias) is not None else None
        c = scale.shape[0]
        unit = {"scale": jnp.ones_like(scale)}
        if bias:
            unit["bias"] = jnp.zeros_like(params["bias"])

        def rows():
            return run(unit).reshape(-1, c), x.shape[:-1]

        return CallShape(c, c, bias, ("norm", id(module), id(x)), rows)

    def to_matrix(self, spec, params):
        weight = jnp.asarray(params[spec.kernel])
        bias = params.get(spec.bias) if spec.bias is not None else None
        return jnp.diag(weight), None if bias is None else jnp.asarray(bias).reshape(-1)

    def from_matrix(self, spec, kernel, bias, like):
        return super().from_matrix(spec, jnp.diagonal(kernel), bias, like)

    def solve_in_basis(self, stats, start, finetuned, basis, prior, opt):
        if basis == "full" or isinstance(basis, LowRank):
            return _solve_channels(stats, start, finetuned, prior, opt)
        return super().solve_in_basis(stats, start, finetuned, basis, prior, opt)


def _solve_channels(stats: LayerStats, start, finetuned, prior, opt):
    """Per-channel 2×2 systems ``[x̂_c, 1] → y_c`` (the full basis), vmapped over channels."""
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

    sol = jax.vmap(one)(
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


register_kind(NormKind(), linen=[nn.LayerNorm, nn.RMSNorm], nnx=[nnx.LayerNorm, nnx.RMSNorm])
