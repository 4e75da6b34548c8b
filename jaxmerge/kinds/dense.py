"""Dense layers: ``Dense``/``Linear`` (rows: the input's last axis) and ``DenseGeneral`` /
``LinearGeneral`` (contracted axes moved last and flattened, the other axes rows: attention
projections with heads × head_dim outputs are one ``(n_in, heads · head_dim)`` matrix)."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import AffineKind, CallShape
from .registry import register_kind

__all__ = ["DenseKind", "DenseGeneralKind", "general_rows"]


class DenseKind(AffineKind):
    """``y = x @ kernel + bias`` over the last axis of ``x``."""

    name = "dense"


def general_rows(x, axes):
    """Rows of a contraction over ``axes`` (in kernel order): ``(rows, n)`` and the row shape."""
    axes = tuple(a % x.ndim for a in axes)
    free = tuple(a for a in range(x.ndim) if a not in axes)
    lead = tuple(x.shape[a] for a in free)
    n = int(np.prod([x.shape[a] for a in axes]))
    return jnp.transpose(x, free + axes).reshape(-1, n), lead


class DenseGeneralKind(AffineKind):
    """``DenseGeneral`` over ``axis`` (without batch axes): kernel ``(*in, *out)`` reshaped
    ``(Π in, Π out)``."""

    name = "dense_general"

    def accepts(self, module):
        return not (getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None))

    def describe(self, module, params, x, run):
        kernel = params.get(self.kernel)
        if kernel is None:
            return None
        axes = tuple(a % x.ndim for a in np.atleast_1d(module.axis).tolist())
        n_in = int(np.prod([x.shape[a] for a in axes]))
        n_out = int(np.prod(kernel.shape)) // n_in
        if tuple(kernel.shape[: len(axes)]) != tuple(x.shape[a] for a in axes):
            return None
        bias = self.bias if params.get(self.bias) is not None else None
        return CallShape(n_in, n_out, bias, ("affine", id(x), axes), lambda: general_rows(x, axes))


register_kind(DenseKind(), linen=[nn.Dense], nnx=[nnx.Linear])
register_kind(DenseGeneralKind(), linen=[nn.DenseGeneral], nnx=[nnx.LinearGeneral])
