"""The full-basis QP of one layer in per-task output metrics (DESIGN.md §6).

Task ``k``'s output error is weighed by a PSD metric ``Gₖ`` (``m × m``) over the layer's outputs:

    L(U) = Σₖ wₖ tr((X̃ₖU − Eₖ) Gₖ (X̃ₖU − Eₖ)ᵀ),   Eₖ = Yₖ − X̃ₖW̄₀,

whose normal equations in the update ``U = W̄ − W̄₀`` (``n × m``) are the linear matrix equation

    T(U) = Σₖ wₖ Aₖ U Gₖ = B = Σₖ wₖ Rₖ Gₖ,   Aₖ = X̃ₖᵀX̃ₖ,  Rₖ = X̃ₖᵀEₖ.

``T`` is symmetric PSD in the trace inner product, and ``B`` lies in its range (each ``Rₖ`` lies
in the range of ``Aₖ``), so a solution always exists. ``Gₖ = I`` is the identity-metric QP,
``U = (Σₖ wₖAₖ)⁺ Σₖ wₖRₖ``; a metric shared by every task leaves that solution unchanged.

:func:`metric_solve` solves it

- exactly for ``K ≤ 2`` by simultaneous diagonalisation: with ``S_A = Σₖ wₖAₖ`` and
  ``S_G = Σₖ Gₖ`` whitened (eigendecompositions, eigenvalues below ``rcond`` times the largest
  dropped: the minimum-norm solution across ``ker S_A`` and ``ker S_G``), the whitened
  ``w₁A₁ = Q diag(a) Qᵀ`` and ``G₁ = S diag(g) Sᵀ`` diagonalise the other task's terms too
  (``1 − a``, ``1 − g``), and ``T`` becomes the entrywise scaling by
  ``dᵢⱼ = aᵢgⱼ + (1 − aᵢ)(1 − gⱼ)``;
- for any ``K`` by preconditioned conjugate gradients on ``T``, warm-started from the
  identity-metric solution, with the preconditioner ``Z ↦ S_A⁺ Z Ḡ⁺``, ``Ḡ = Σₖ wₖtr(Aₖ)Gₖ /
  Σₖ wₖtr(Aₖ)`` (exact when every task has the same metric: then no step is taken), to the
  relative residual ``‖B − T(U)‖_F ≤ rtol ‖B‖_F``. Each step costs ``O(K(n²m + nm²))``.

Where a pair of directions is seen by the inputs of one task only and read by the metric of
the other only (``dᵢⱼ = 0``: no task's output depends on that entry of ``U``), the exact solve
leaves it at zero; conjugate gradients leaves it at its warm start's value.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Bool, Float, Int

__all__ = ["MetricSolution", "metric_solve"]


class MetricSolution(NamedTuple):
    """The solution of :func:`metric_solve` (a pytree).

    Attributes:
        update: ``U`` (``n × m``).
        residual: the relative residual ``‖B − T(U)‖_F / ‖B‖_F`` (0 where ``B = 0``).
        iterations: conjugate-gradient steps taken (0 for the exact solve).
        converged: ``residual ≤ rtol`` (always ``True`` for the exact solve), and ``False``
            with ``update`` and ``residual`` NaN where an input is not finite.
    """

    update: Float[Array, "n m"]
    residual: Float[Array, ""]
    iterations: Int[Array, ""]
    converged: Bool[Array, ""]


def _operator(a, g, w):
    """``U ↦ Σₖ wₖ Aₖ U Gₖ``."""
    return lambda u: jnp.einsum("k,kij,jl,klm->im", w, a, u, g)


def _eig_range(s, rcond):
    """Eigenvalues, eigenvectors and numerical range (``λ > rcond · λ_max``) of symmetric ``s``."""
    lam, vecs = jnp.linalg.eigh(0.5 * (s + s.T))
    return lam, vecs, lam > rcond * jnp.max(lam)


def _whitening(s, rcond):
    """``(E diag(1/√λ), keep)`` over the numerical range of ``s`` (zero columns where not
    ``keep``): it maps ``s`` to the projector on its numerical range."""
    lam, vecs, keep = _eig_range(s, rcond)
    return vecs * jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0), keep


def _split(whiten, keep, part):
    """Eigenvalues and vectors of ``whitenᵀ part whiten`` in ``[0, 1]``; the directions outside
    ``keep`` get the eigenvalue 2 and their own unit vectors, so that they never mix with a
    kept direction of eigenvalue 0."""
    return jnp.linalg.eigh(whiten.T @ part @ whiten + jnp.diag(jnp.where(keep, 0.0, 2.0)))


def _pinv_apply(s, rcond):
    """``z ↦ s⁺ z`` from one eigendecomposition (eigenvalues below ``rcond · λ_max`` dropped)."""
    lam, vecs, keep = _eig_range(s, rcond)
    inv = jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)
    return lambda z: vecs @ (inv[:, None] * (vecs.T @ z))


def _relative(residual, b):
    norm_b = jnp.linalg.norm(b)
    return jnp.where(norm_b > 0, jnp.linalg.norm(residual) / jnp.where(norm_b > 0, norm_b, 1), 0)


def _exact(a, r, g, w, rcond):
    if a.shape[0] == 1:  # a second task with no inputs
        a, r, g, w = (jnp.concatenate([x, jnp.zeros_like(x)]) for x in (a, r, g, w))
    b = jnp.einsum("k,kij,kjl->il", w, r, g)
    wa, keep_a = _whitening(w[0] * a[0] + w[1] * a[1], rcond)
    wg, keep_g = _whitening(g[0] + g[1], rcond)
    alpha, q = _split(wa, keep_a, w[0] * a[0])
    gamma, s = _split(wg, keep_g, g[0])
    # U = wa Q V Sᵀ wgᵀ solves T(U) = B with V = C / d, C = Qᵀ waᵀ B wg S. d vanishes only where
    # T does (entries no task's output depends on), and those, like the dropped directions
    # (eigenvalue 2), are left at zero.
    d = alpha[:, None] * gamma[None, :] + (1 - alpha[:, None]) * (1 - gamma[None, :])
    kept = (alpha[:, None] <= 1.5) & (gamma[None, :] <= 1.5) & (jnp.abs(d) > rcond)
    c = q.T @ (wa.T @ b @ wg) @ s
    v = jnp.where(kept, c / jnp.where(kept, d, 1.0), 0.0)
    update = wa @ q @ v @ s.T @ wg.T
    residual = _relative(b - _operator(a, g, w)(update), b)
    return MetricSolution(update, residual, jnp.int32(0), jnp.array(True))


def _cg(a, r, g, w, rcond, rtol, maxiter):
    apply = _operator(a, g, w)
    b = jnp.einsum("k,kij,kjl->il", w, r, g)
    a_inv = _pinv_apply(jnp.einsum("k,kij->ij", w, a), rcond)
    trace = w * jnp.trace(a, axis1=1, axis2=2)
    g_bar = jnp.einsum("k,kij->ij", trace, g) / jnp.maximum(jnp.sum(trace), jnp.finfo(a.dtype).tiny)
    g_inv = _pinv_apply(g_bar, rcond)

    def precondition(z):
        return g_inv(a_inv(z).T).T

    start = a_inv(jnp.einsum("k,kij->ij", w, r))  # the identity-metric solution
    norm_b = jnp.linalg.norm(b)
    goal = rtol * norm_b
    res = b - apply(start)
    z = precondition(res)
    state = (start, res, z, z, jnp.vdot(res, z), jnp.int32(0))

    def cond(state):
        _, res, _, _, _, it = state
        return (jnp.linalg.norm(res) > goal) & (it < maxiter)

    def body(state):
        u, res, z, p, rz, it = state
        tp = apply(p)
        ptp = jnp.vdot(p, tp)
        step = jnp.where(ptp > 0, rz / jnp.where(ptp > 0, ptp, 1.0), 0.0)
        u = u + step * p
        res = res - step * tp
        z = precondition(res)
        rz_new = jnp.vdot(res, z)
        p = z + jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0) * p
        return u, res, z, p, rz_new, it + 1

    update, _, _, _, _, iterations = lax.while_loop(cond, body, state)
    residual = _relative(b - apply(update), b)  # the true residual, not the recursion's
    return MetricSolution(update, residual, iterations, residual <= rtol)


@functools.partial(jax.jit, static_argnames=("method", "maxiter", "rcond", "rtol"))
def _solve(a, r, g, w, *, method, rcond, rtol, maxiter):
    sol = _exact(a, r, g, w, rcond) if method == "exact" else _cg(a, r, g, w, rcond, rtol, maxiter)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in (a, r, g, w)]))
    return sol._replace(
        update=jnp.where(finite, sol.update, jnp.nan),
        residual=jnp.where(finite, sol.residual, jnp.nan),
        converged=sol.converged & finite,
    )


def metric_solve(
    gram: Float[ArrayLike, "K n n"],
    cross: Float[ArrayLike, "K n m"],
    metric: Float[ArrayLike, "K m m"],
    *,
    weights: Float[ArrayLike, " K"] | None = None,
    method: str = "auto",
    rtol: float = 1e-6,
    maxiter: int = 500,
    rcond: float | None = None,
) -> MetricSolution:
    """Solve ``Σₖ wₖ Aₖ U Gₖ = Σₖ wₖ Rₖ Gₖ`` for the update ``U`` (see the module docs).

    Args:
        gram: per-task input Gram matrices ``Aₖ = X̃ₖᵀX̃ₖ`` (``K × n × n``, PSD).
        cross: per-task residual cross moments ``Rₖ = X̃ₖᵀ(Yₖ − X̃ₖW̄₀)`` (``K × n × m``).
        metric: per-task output metrics ``Gₖ`` (``K × m × m``, PSD).
        weights: task weights ``wₖ ≥ 0`` (default all 1).
        method: ``"exact"`` (simultaneous diagonalisation, ``K ≤ 2``), ``"cg"``
            (preconditioned conjugate gradients, any ``K``) or ``"auto"`` (exact for ``K ≤ 2``).
        rtol: conjugate gradients' relative residual goal.
        maxiter: conjugate gradients' largest number of steps.
        rcond: relative eigenvalue cut-off of the whitenings and preconditioners; default
            ``max(n, m) · eps`` of the dtype.

    Returns:
        :class:`MetricSolution`; check ``converged`` (inputs with NaN or Inf never raise, also
        under ``jax.jit``: they give a NaN update that is not ``converged``).

    Raises:
        ValueError: shapes that do not fit, an unknown ``method``, or ``"exact"`` with
            ``K > 2``.
        TypeError: non-floating inputs.

    Examples:
        >>> import jax.numpy as jnp
        >>> a = jnp.stack([jnp.diag(jnp.array([1.0, 0.0])), jnp.diag(jnp.array([0.0, 1.0]))])
        >>> delta = jnp.array([[[1.0], [0.0]], [[0.0], [3.0]]])  # each task's own change
        >>> sol = metric_solve(a, a @ delta, jnp.ones((2, 1, 1)))
        >>> [round(float(u), 4) for u in sol.update.ravel()], bool(sol.converged)
        ([1.0, 3.0], True)
    """
    a, r, g = jnp.asarray(gram), jnp.asarray(cross), jnp.asarray(metric)
    for name, x in (("gram", a), ("cross", r), ("metric", g)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"metric_solve: {name} has dtype {x.dtype}; expected floating point.")
    if a.ndim != 3 or r.ndim != 3 or g.ndim != 3:
        raise ValueError(
            f"metric_solve: expected gram (K, n, n), cross (K, n, m), metric (K, m, m); got "
            f"{a.shape}, {r.shape}, {g.shape}."
        )
    k, n, m = r.shape
    if a.shape != (k, n, n) or g.shape != (k, m, m):
        raise ValueError(
            f"metric_solve: cross has shape {r.shape}, so gram must be {(k, n, n)} and metric "
            f"{(k, m, m)}; got {a.shape} and {g.shape}."
        )
    if method not in ("auto", "exact", "cg"):
        raise ValueError(f"metric_solve: method {method!r}; expected 'auto', 'exact' or 'cg'.")
    if method == "exact" and k > 2:
        raise ValueError(f"metric_solve: method 'exact' solves K <= 2 tasks; got K = {k}.")
    if method == "auto":
        method = "exact" if k <= 2 else "cg"
    dtype = jnp.result_type(a, r, g)
    w = jnp.ones(k, dtype) if weights is None else jnp.asarray(weights, dtype)
    if w.shape != (k,):
        raise ValueError(f"metric_solve: weights has shape {w.shape}; expected ({k},).")
    if rcond is None:
        rcond = float(max(n, m) * jnp.finfo(dtype).eps)
    a, r, g = a.astype(dtype), r.astype(dtype), g.astype(dtype)
    return _solve(a, r, g, w, method=method, rcond=rcond, rtol=float(rtol), maxiter=int(maxiter))
