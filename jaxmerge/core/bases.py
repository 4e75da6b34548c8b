"""Bases of the merge QP: which updates ``U = W̄ − W̄₀`` a merge may choose from.

With ``A = gram`` and ``R = P − A W̄₀`` (``P = cross``) the loss of an update is
``L(U) = E₀ + tr(UᵀAU) − 2 tr(UᵀR)``. Restricting ``U = Σ_q c_q B_q`` gives the QP
``min_c cᵀHc − 2fᵀc`` with ``H_qr = ⟨B_q, A B_r⟩`` and ``f_q = ⟨B_q, R⟩``.

=============  ===============================================  =============================
basis          directions                                       system
=============  ===============================================  =============================
``"scalar"``   ``Δₖ = W̄ₖ − W̄₀`` (one coefficient per model)     one ``K × K``
``"diagonal"`` ``Δₖ`` restricted to output unit ``j``            ``m`` systems ``K × K``
``"full"``     every ``(n+1) × m`` matrix: ``A U = R``          one ``(n+1)²``, ``m`` columns
``LowRank(r)`` best rank-``r`` update in the ``A`` metric       full + SVD of ``LᵀU*``
``Custom``     user directions ``B_j``, one coefficient each    ``J × J`` or ``m`` × ``J × J``
               (or one per output unit)
=============  ===============================================  =============================

Each contains the previous in captured energy: scalar ⊆ diagonal ⊆ full.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax.numpy as jnp

__all__ = ["LowRank", "Custom", "Basis"]


@dataclasses.dataclass(frozen=True)
class LowRank:
    """The energy-optimal rank-``rank`` update.

    With ``A = LLᵀ`` and the full-basis update ``U*``, the SVD ``LᵀU* = Σᵢ σᵢ uᵢvᵢᵀ`` orders
    directions by the energy ``σᵢ²`` each captures (``Σᵢ σᵢ² = fᵀc* = ρ_full · E₀`` without
    ridge); keeping ``rank`` terms and mapping back with ``L⁻ᵀ`` minimises
    ``‖Lᵀ(U − U*)‖²`` over rank-``rank`` updates (Eckart–Young in the ``A`` metric). With a
    ridge, the full-basis solution that is truncated is the regularised one.

    Attributes:
        rank: number of directions kept, at least 1.

    Examples:
        >>> LowRank(4)
        LowRank(rank=4)
    """

    rank: int

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LowRank: rank must be a positive integer, got {self.rank!r}.")


@dataclasses.dataclass(frozen=True, eq=False)
class Custom:
    """User directions ``B_j`` (updates relative to the base), e.g. TIES- or DARE-processed
    task vectors.

    Each direction is a layer-like (a kernel array, a ``(kernel, bias)`` pair or a
    ``{"kernel", "bias"}`` dict; a missing bias means a zero bias update). With
    ``per_output=False`` the update is ``Σ_j c_j B_j`` (``J × J`` system); with
    ``per_output=True`` every output unit has its own coefficients, ``U[:, i] = Σ_j c_ij B_j[:, i]``
    (``m`` systems of ``J × J``). ``"scalar"`` and ``"diagonal"`` are ``Custom`` over the task
    vectors ``Δₖ``.

    Attributes:
        directions: a sequence of ``J ≥ 1`` layer-likes shaped like the base layer.
        per_output: one coefficient per direction (``False``) or per direction and output unit.

    Examples:
        >>> import jax.numpy as jnp
        >>> Custom([jnp.ones((3, 2))], per_output=True).per_output
        True
    """

    directions: Sequence[Any] = dataclasses.field(repr=False)
    per_output: bool = False

    def __repr__(self) -> str:
        return f"Custom(<{len(self.directions)} directions>, per_output={self.per_output})"


Basis = Literal["scalar", "diagonal", "full"] | LowRank | Custom
"""A basis of the merge QP: ``"scalar"``, ``"diagonal"``, ``"full"``, :class:`LowRank` or
:class:`Custom`."""


def check_basis(basis, where: str):
    """``basis`` if it is one (the one check of basis values, used by every solve entry point);
    otherwise a ``ValueError`` naming ``where`` (e.g. ``"merge: layer 'Dense_0'"``)."""
    if isinstance(basis, LowRank | Custom) or (
        isinstance(basis, str) and basis in ("scalar", "diagonal", "full")
    ):
        return basis
    raise ValueError(
        f"{where}: unknown basis {basis!r}; use 'scalar', 'diagonal', 'full', LowRank(r) or "
        "Custom(directions)."
    )


# ---- building the QP (private; shapes: B (J, p, m), A (p, p), R (p, m)) -------------------------


def directional_system(directions, gram, residual, per_output: bool):
    """``H`` and ``f`` for updates spanned by ``directions``.

    Returns ``H (J, J)``, ``f (J,)`` or, per output unit, ``H (m, J, J)``, ``f (m, J)``.
    """
    a_dirs = jnp.einsum("ij,qjm->qim", gram, directions)
    if per_output:
        h = jnp.einsum("qim,rim->mqr", directions, a_dirs)
        f = jnp.einsum("qim,im->mq", directions, residual)
    else:
        h = jnp.einsum("qim,rim->qr", directions, a_dirs)
        f = jnp.einsum("qim,im->q", directions, residual)
    return h, f


def combine_directions(coefficients, directions, per_output: bool):
    """The update ``U = Σ_q c_q B_q`` (per output unit: ``U[:, i] = Σ_q c_iq B_q[:, i]``)."""
    if per_output:
        return jnp.einsum("mq,qim->im", coefficients, directions)
    return jnp.einsum("q,qim->im", coefficients, directions)


def truncate_update(update, gram, rank: int, rcond):
    """Best rank-``rank`` approximation of ``update`` in the ``gram`` metric, and its spectrum.

    ``gram = V Λ Vᵀ`` gives the square root ``L = V Λ^½`` (a Cholesky factor up to rotation, and
    defined for singular ``gram``); ``M = LᵀU = Σ σᵢ uᵢ vᵢᵀ``; the truncation maps ``M_r`` back
    with ``(Lᵀ)⁺``. Returns the truncated update and ``σᵢ²`` in decreasing order.
    """
    w, v = jnp.linalg.eigh(0.5 * (gram + gram.T))
    keep = w > rcond * jnp.max(w)
    root = jnp.sqrt(jnp.where(keep, w, 0.0))
    inv_root = jnp.where(keep, 1.0 / jnp.where(keep, root, 1.0), 0.0)
    m = root[:, None] * (v.T @ update)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    s_kept = jnp.where(jnp.arange(s.shape[0]) < rank, s, 0.0)
    m_r = (u * s_kept) @ vt
    return v @ (inv_root[:, None] * m_r), jnp.square(s)
