"""Layer-likes: the kernel/bias pairs the single-layer API accepts, checked and augmented.

A layer-like is a kernel array ``(n_in, n_out)`` (no bias), a ``(kernel, bias)`` pair (``bias``
may be ``None``) or a mapping with ``"kernel"`` and optionally ``"bias"`` (a Flax ``Dense``'s
parameters). The augmented matrix is ``W̄ = [W; b]`` of shape ``(n_in + 1, n_out)``.
"""

from collections.abc import Mapping

import jax.numpy as jnp


def as_layer(obj, what: str):
    """``(kernel, bias | None)`` from a layer-like; ``what`` names it in errors."""
    if isinstance(obj, Mapping):
        if "kernel" not in obj:
            raise ValueError(f"{what}: a layer dict needs a 'kernel' entry; got keys {list(obj)}.")
        kernel, bias = obj["kernel"], obj.get("bias")
    elif isinstance(obj, tuple | list):
        if len(obj) != 2:
            raise ValueError(
                f"{what}: a layer given as a sequence must be a (kernel, bias) pair; got "
                f"{len(obj)} items."
            )
        kernel, bias = obj
    else:
        kernel, bias = obj, None
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{what}: kernel must be 2-D (n_in, n_out), got shape {kernel.shape}.")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"{what}: kernel must be floating point, got dtype {kernel.dtype}.")
    if bias is not None:
        bias = jnp.asarray(bias)
        if bias.shape != kernel.shape[1:]:
            raise ValueError(
                f"{what}: bias has shape {bias.shape}; expected ({kernel.shape[1]},) to match "
                f"the kernel {kernel.shape}."
            )
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"{what}: bias must be floating point, got dtype {bias.dtype}.")
    return kernel, bias


def check_layer(layer, what: str, stats):
    """Check a ``(kernel, bias)`` pair against the statistics' widths."""
    kernel, _ = layer
    expected = (stats.n_in, stats.n_out)
    if kernel.shape != expected:
        raise ValueError(
            f"{what}: kernel has shape {kernel.shape}; the statistics are of a layer with "
            f"(n_in, n_out) = {expected}."
        )
    return layer


def augmented(kernel, bias):
    """``W̄ = [W; b]`` (or ``W`` when there is no bias)."""
    if bias is None:
        return kernel
    return jnp.concatenate([kernel, bias[None, :].astype(kernel.dtype)], axis=0)
