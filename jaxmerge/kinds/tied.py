r"""The solve of a tied table ``E (V, d)``: read by lookups (rows ``s·E[t]``, ``s`` the lookup's
scale) and by a head ``z = h Eᵀ``, both uses output errors of the same rows (DESIGN §5), from
their sums (:class:`~jaxmerge.kinds.embed.TiedStats`)::

    L(E) = Σ‖s·E[t] − Y‖² + Σ‖h Eᵀ − Z‖²,    metric  s²·counts ⊗ I + I ⊗ A_h

with ``A_h`` the head inputs' Gram matrix. Any basis but low rank; RegMean's ``α`` must be 1.
"""

import jax.numpy as jnp

from ..core.bases import LowRank, combine_directions
from ..core.psd import SolveStatus
from ..core.qp import LayerSolution, ridged_solve

__all__ = ["check_tied_options", "solve_tied", "tied_energies"]


def check_tied_options(spec, opt) -> None:
    """Raise unless a tied table's options are ones it is solved with: any basis but
    :class:`~jaxmerge.LowRank`, RegMean's ``α = 1``."""
    if isinstance(opt.basis, LowRank) or opt.alpha != 1:
        what = f"basis={opt.basis!r}" if isinstance(opt.basis, LowRank) else f"alpha={opt.alpha!r}"
        raise ValueError(
            f"layer {spec.path!r} is a tied embedding (read by lookups and by the head); it is "
            f"not solved with {what} (a low-rank basis, or RegMean's alpha, needs a metric that "
            "its two uses do not share): give that layer another basis, or alpha=1 "
            f"(basis={{..., {spec.path!r}: 'full'}})."
        )


def _residual(stats, scale, table):
    """``-½ ∇L`` at ``table`` (``V × d``): both uses' target sums less their outputs' at
    ``table``, ``s·ΣY + ΣZᵀH − (s²·counts ⊙ E + E A_h)``."""
    return (scale * stats.cross + stats.head_cross.T
            - (scale**2 * stats.diag[:, None] * table + table @ stats.gram))  # fmt: skip


def solve_tied(stats, scale, base, start, directions, prior, opt):
    r"""``(merged table, LayerSolution)`` of a tied table (its energies measured from ``base``).

    ``directions``: ``None`` for the full basis, solved row by row from ``start`` (the fallback
    merge): ``(s²c_v I + A_h) E_vᵀ = s·Σₖ wₖ Σ_{i: v} Yₖ[i] + P_h[:, v]``; with
    ``A_h = QΛQᵀ`` every row is a diagonal solve in ``Q``'s coordinates, and the update is zero
    in directions neither use sees (an unseen token along ``A_h``'s null space), as the full
    basis does for a dense layer. The ridge's ``D = diag(metric)`` is ``s²c_v + (A_h)_jj``, so
    the ridged row system is ``s²c_v I + M`` with ``M = θA_h + (1−θ)Diag(A_h)``, ``θ = 1/(1+λ)``,
    diagonalised the same way; ``prior`` is then a table. Otherwise ``(D (J, V, d),
    per_output)``: the update ``Σ_q c_q D_q`` from ``base`` (per column ``j`` of the table with
    ``per_output``: ``dJ`` coefficients), its ``J × J`` (``dJ × dJ``) system formed from the
    metric and solved as :func:`~jaxmerge.solve_layer` does, ``prior`` coefficients.
    """
    dtype = stats.gram.dtype
    theta = 1.0 / (1.0 + opt.ridge)
    if directions is None:
        start = start.astype(dtype)
        u0 = jnp.zeros_like(start) if prior is None else prior.astype(dtype) - start
        update, status, cond = _full(stats, scale, start, u0, theta)
        merged, coefficients = start + update, None
    else:
        dirs, per_output = directions
        dirs = dirs.astype(dtype)
        coefficients, status, cond = _directional(stats, scale, base.astype(dtype), dirs,
                                                  per_output, prior, theta, opt)  # fmt: skip
        merged = base.astype(dtype) + combine_directions(coefficients, dirs, per_output)
    merged = merged.astype(base.dtype)
    e_0, loss, rho = tied_energies(stats, scale, base, merged)
    status = jnp.asarray(status, jnp.int32)
    return merged, LayerSolution(merged, None, coefficients, e_0, loss, rho, status, cond, None)


def _full(stats, scale, start, u0, theta):
    """The full basis's update from ``start``, row by row in ``M``'s eigenbasis (see
    :func:`solve_tied`), with its status and condition."""
    dtype, g = stats.gram.dtype, stats.gram
    lam, q = jnp.linalg.eigh(theta * g + (1 - theta) * jnp.diag(jnp.diagonal(g)))
    lam = jnp.maximum(lam, 0.0)
    counts = scale**2 * stats.diag[:, None]
    rhs = theta * _residual(stats, scale, start)
    rhs = rhs + (1 - theta) * (counts + jnp.diagonal(g)[None, :]) * u0
    denom = counts + lam[None, :]
    tol = (jnp.finfo(dtype).eps * max(g.shape[0], 1)
           * jnp.maximum(jnp.max(denom), jnp.finfo(dtype).tiny))  # fmt: skip
    coords = jnp.where(denom > tol, (rhs @ q) / jnp.where(denom > tol, denom, 1.0), 0.0)
    update = jnp.where(theta == 0, u0, coords @ q.T)
    singular = jnp.any((denom <= tol) & (stats.diag[:, None] > 0) | (lam[None, :] <= tol))
    status = jnp.where(singular, SolveStatus.PSEUDO_INVERSE, SolveStatus.CHOLESKY)
    cond = jnp.max(denom) / jnp.maximum(jnp.min(jnp.where(denom > tol, denom, jnp.inf)), tol)
    return update, status, cond


def _directional(stats, scale, base, dirs, per_output, prior, theta, opt):
    """The coefficients of the update ``Σ_q c_q D_q`` from ``base`` (see :func:`solve_tied`),
    with the solve's status and condition."""
    dtype = stats.gram.dtype
    j_dirs, d = dirs.shape[0], dirs.shape[2]
    counts = scale**2 * stats.diag
    residual = _residual(stats, scale, base)
    if per_output:  # coefficients (d, J): column j of the table is E0[:, j] + Σ c_jq D_q[:, j]
        head = jnp.einsum("qvj,rvi,ji->jqir", dirs, dirs, stats.gram)
        lookups = jnp.einsum("v,qvj,rvj->jqr", counts, dirs, dirs)
        eye = jnp.eye(d, dtype=dtype)[:, None, :, None]
        h = (head + eye * lookups[:, :, None, :]).reshape(d * j_dirs, d * j_dirs)
        f = jnp.einsum("qvj,vj->jq", dirs, residual).reshape(-1)
        shape = (d, j_dirs)
    else:
        h = (jnp.einsum("qvj,rvi,ji->qr", dirs, dirs, stats.gram)
             + jnp.einsum("v,qvj,rvj->qr", counts, dirs, dirs))  # fmt: skip
        f = jnp.einsum("qvj,vj->q", dirs, residual)
        shape = (j_dirs,)
    c0 = jnp.zeros(shape, dtype) if prior is None else jnp.broadcast_to(
        jnp.asarray(prior, dtype), shape)  # fmt: skip
    c, status, cond = ridged_solve(h, f, c0.reshape(-1), theta, rcond=opt.rcond,
                                   jitter=opt.jitter)  # fmt: skip
    return c.reshape(shape), status, cond


def tied_energies(stats, scale, e0, e1):
    """``(E₀, L, ρ)`` of the table ``e1`` against ``e0``: the lookups' output error (rows
    ``scale · E[t]``) plus the head's (``z = h Eᵀ``)."""
    dtype = stats.gram.dtype
    e0, e1 = e0.astype(dtype), e1.astype(dtype)

    def residual(e):  # Σ of both uses' squared output errors, from the sums
        lookups = (jnp.sum(stats.out_sq) - 2 * scale * jnp.vdot(e, stats.cross)
                   + scale**2 * jnp.vdot(stats.diag[:, None] * e, e))  # fmt: skip
        head = (jnp.sum(stats.head_out_sq) - 2 * jnp.vdot(e.T, stats.head_cross)
                + jnp.vdot(e @ stats.gram, e))  # fmt: skip
        return lookups + head

    b0, loss = jnp.maximum(residual(e0), 0.0), jnp.maximum(residual(e1), 0.0)
    rho = jnp.where(b0 > 0, 1.0 - loss / jnp.where(b0 > 0, b0, 1.0), 1.0)
    return b0, loss, rho
