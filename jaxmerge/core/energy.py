"""Residual energy of a merge, measured from calibration statistics alone.

With ``A = gram``, ``P = cross``, ``s = Σ out_sq``, base ``W̄₀`` and a merge ``W̄ = W̄₀ + U``::

    L(W̄) = Σₖ wₖ ‖X̃ₖW̄ − Yₖ‖² = tr(W̄ᵀAW̄) − 2 tr(W̄ᵀP) + s
    E₀    = L(W̄₀)                                  (what the fine-tunes add on top of the base)
    L     = E₀ − (2 tr(UᵀR) − tr(UᵀAU)),  R = P − AW̄₀
    ρ     = 1 − L / E₀                             (fraction of the residual energy captured)

For the QP optimum ``ρ ∈ [0, 1]``; for any other merge ``ρ ≤ 1`` and may be negative (worse than
the base). Scoring a merge on held-out statistics (calibration rows not used to solve it) gives an
honest estimate; the in-sample value is optimistic by construction.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .layers import as_layer, augmented, check_layer
from .stats import LayerStats

__all__ = ["energy_fraction"]


def energies(gram, cross, out_sq_total, w0, update):
    """``(E₀, L, ρ)`` of the merge ``w0 + update`` (augmented ``(p, m)`` matrices); ``gram`` may
    be a vector, the diagonal of a diagonal Gram matrix (an embedding's token counts)."""

    def times(x):
        return gram[:, None] * x if gram.ndim == 1 else gram @ x

    residual = cross - times(w0)
    e0 = out_sq_total - jnp.vdot(w0, cross + residual)
    gain = 2 * jnp.vdot(update, residual) - jnp.vdot(update, times(update))
    tol = 100 * jnp.finfo(gram.dtype).eps * jnp.maximum(out_sq_total, jnp.abs(jnp.vdot(w0, cross)))
    e0 = jnp.maximum(e0, 0.0)
    loss = jnp.maximum(e0 - gain, 0.0)
    rho = jnp.where(
        e0 > tol,
        1.0 - loss / jnp.where(e0 > tol, e0, 1.0),
        jnp.where(gain >= -tol, 1.0, -jnp.inf),
    )
    return e0, loss, rho


def energy_fraction(stats: LayerStats, base, merged) -> Float[Array, ""]:
    """The fraction ``ρ = 1 − L(merged) / L(base)`` of residual energy a merge captures.

    Args:
        stats: calibration statistics of the layer (possibly held out from the solve).
        base: the base layer: a kernel ``(n_in, n_out)``, a ``(kernel, bias)`` pair or a
            ``{"kernel", "bias"}`` dict.
        merged: the merged layer, in the same form.

    Returns:
        ``ρ`` as a scalar array: 1 when the merge reproduces every fine-tuned output, 0 for the
        base itself, negative when the merge is worse than the base. When the fine-tunes add no
        energy (``E₀ = 0``), 1 if the merge also reproduces them and ``-inf`` otherwise.

    Raises:
        ValueError: the layers' shapes do not match the statistics or each other, or (outside
            ``jax.jit``) the statistics or either layer hold NaN or Inf.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> w0, w1 = jnp.zeros((2, 1)), jnp.array([[2.0], [0.0]])
        >>> stats = layer_stats([x], [x @ w1])
        >>> float(energy_fraction(stats, w0, w1)), float(energy_fraction(stats, w0, w1 / 2))
        (1.0, 0.75)
    """
    k0, b0 = check_layer(as_layer(base, "base"), "base", stats)
    k1, b1 = check_layer(as_layer(merged, "merged"), "merged", stats)
    if (b0 is None) != (b1 is None):
        raise ValueError("energy_fraction: base and merged must both have a bias or both not.")
    has_bias = b0 is not None
    p = stats.n_in + 1 if has_bias else stats.n_in
    dtype = stats.gram.dtype
    w0 = augmented(k0, b0).astype(dtype)
    w1 = augmented(k1, b1).astype(dtype)
    named = [(f"stats.{f}", a) for f, a in zip(LayerStats._fields, stats, strict=True)]
    bad = [
        name
        for name, a in [*named, ("base", w0), ("merged", w1)]
        if not isinstance(a, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(a)))
    ]
    if bad:
        raise ValueError(
            f"energy_fraction: {', '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN or Inf; "
            "the energy of a non-finite merge or of non-finite statistics is undefined."
        )
    _, _, rho = energies(stats.gram[:p, :p], stats.cross[:p], jnp.sum(stats.out_sq), w0, w1 - w0)
    return rho
