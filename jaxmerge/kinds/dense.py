"""Dense layers: ``Dense``/``Linear`` (rows: the input's last axis) and ``DenseGeneral`` /
``LinearGeneral`` (contracted axes moved last and flattened, the other axes rows: attention
projections with heads × head_dim outputs are one ``(n_in, heads · head_dim)`` matrix).

A ``DenseGeneral`` with batch axes (``batch_dims``, NNX's ``batch_axis``: a separate kernel per
index of the input's leading axes) is the einsum whose group indices are those axes, solved per
group (:mod:`jaxmerge.kinds.einsum`)."""

import string

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import AffineKind, CallShape, LayerKind
from .einsum import EinsumCall, EinsumKind, _Rule, contraction_equation
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


def _contracted(module, ndim: int) -> tuple[int, ...]:
    """The contracted axes of an input of ``ndim`` axes, in the kernel's order (Flax sorts
    ``axis``)."""
    return tuple(sorted(a % ndim for a in np.atleast_1d(module.axis).tolist()))


def _batch_axes(module) -> int:
    """How many leading batch axes the layer has (``batch_dims``, NNX: ``batch_axis``)."""
    return len(module.batch_axis) if isinstance(module, nnx.Module) else np.size(module.batch_dims)


def _general_equation(call: EinsumCall) -> str | None:
    """The einsum of a call with batch axes (``dot_general`` with the batch axes leading in the
    input, kernel and output)."""
    nb, axes = _batch_axes(call.module), _contracted(call.module, call.x.ndim)
    features = call.weight.ndim - nb - len(axes)
    if features < 0 or call.x.ndim + features > len(string.ascii_letters):
        return None
    return contraction_equation(call.x.ndim, axes, features, batch=nb)


class DenseGeneralKind(EinsumKind):
    """``DenseGeneral`` over ``axis``: kernel ``(*in, *out)`` reshaped ``(Π in, Π out)``; with
    batch axes, the einsum of :func:`_general_equation` (kernel ``(*batch, *in, *out)``, bias
    ``(*batch, *out)``)."""

    def __init__(self):
        super().__init__("dense_general")

    def describe_call(self, module, params, args, kwargs, run, method="__call__"):
        if _batch_axes(module):
            return super().describe_call(module, params, args, kwargs, run, method)
        return LayerKind.describe_call(self, module, params, args, kwargs, run, method)

    def describe(self, module, params, x, run):
        kernel = params.get(self.kernel)
        if kernel is None:
            return None
        axes = _contracted(module, x.ndim)
        n_in = int(np.prod([x.shape[a] for a in axes]))
        n_out = int(np.prod(kernel.shape)) // n_in
        if tuple(kernel.shape[: len(axes)]) != tuple(x.shape[a] for a in axes):
            return None
        bias = self.bias if params.get(self.bias) is not None else None
        return CallShape(n_in, n_out, bias, ("affine", id(x), axes), lambda: general_rows(x, axes))


register_kind(DenseKind(), linen=[nn.Dense], nnx=[nnx.Linear])
DENSE_GENERAL = DenseGeneralKind()
for _cls in (nn.DenseGeneral, nnx.LinearGeneral):
    DENSE_GENERAL.cover(_cls, _Rule("inputs", "kernel", "bias", _general_equation, None), None,
                        "register_kind")  # fmt: skip
