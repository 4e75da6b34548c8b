"""Convolutions: the rows are the input's patches, ``n_in = prod(kernel_size) · C_in``, computed
by the layer itself with an identity kernel (so every padding mode, stride and dilation is
honoured exactly); the kernel ``(*kernel_size, C_in, C_out)`` reshapes to ``(n_in, C_out)``."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import AffineKind, CallShape
from .registry import register_kind

__all__ = ["ConvKind"]


class ConvKind(AffineKind):
    """``Conv`` with one feature group and no kernel mask."""

    name = "conv"

    def accepts(self, module):
        return module.feature_group_count == 1 and getattr(module, "mask", None) is None

    def describe(self, module, params, x, run):
        kernel = params.get(self.kernel)
        if kernel is None:
            return None
        n_in, n_out = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
        eye = jnp.eye(n_in, dtype=kernel.dtype).reshape(*kernel.shape[:-1], n_in)

        def rows():
            patches = run({"kernel": eye}, features=n_in)
            return patches.reshape(-1, n_in), patches.shape[:-1]

        bias = self.bias if params.get(self.bias) is not None else None
        return CallShape(n_in, n_out, bias, ("conv", id(module)), rows)


register_kind(ConvKind(), linen=[nn.Conv], nnx=[nnx.Conv])
