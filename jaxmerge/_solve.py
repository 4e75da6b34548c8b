"""Solving ``H x = f`` for a symmetric positive semi-definite ``H``: Cholesky with fallbacks.

The QP's normal equations ``H c = f`` have a PSD ``H`` (a Gram matrix of directions in the
calibration metric) and ``f ∈ range(H)``, so a solution always exists; when ``H`` is singular the
minimum-norm one ``H⁺f`` is the natural choice (directions in ``ker H`` change no calibration
output). :func:`psd_solve` tries, in order:

1. Cholesky of ``H / mean(diag H)`` (after symmetrising). Accepted when the factor is finite and
   the condition estimate (power and inverse iteration, a few ``O(p²)`` steps) is at most
   ``1/rcond``.
2. Cholesky of ``H / mean(diag H) + τI`` with the relative jitter ``τ = rcond / 100``, accepted on
   the same test. This rescues systems whose factorisation failed only through rounding; since the
   jittered matrix must still pass the condition test, the jitter moves the solution by at most
   about ``τ · cond ≤ 1 %`` and usually far less.
3. Eigendecomposition pseudo-inverse with eigenvalues below ``rcond · λ_max`` dropped: the
   minimum-norm solution of the (numerically) singular system.

The default ``rcond = 10 · p · eps`` (``p`` the system size, ``eps`` the dtype's machine epsilon)
sits just above the rounding noise of a Gram matrix, so a singular system is never solved through
its noise. Design note: a jitter retry alone cannot give the minimum-norm solution of a singular
system (it solves a ridge problem, and amplifies the rounding noise of ``f`` in ``ker H``), which
is why the jitter is kept small and every system that fails the condition test ends at step 3.
"""

import enum

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

__all__ = ["SolveStatus", "psd_solve"]


class SolveStatus(enum.IntEnum):
    """How a system was solved; larger is worse. Stored as ``int32`` in results.

    Attributes:
        CHOLESKY: plain Cholesky factorisation.
        JITTERED: Cholesky after a relative jitter (the plain factorisation failed by rounding).
        PSEUDO_INVERSE: singular or ill-conditioned; minimum-norm eigendecomposition solution.
        NONFINITE: the system contains NaN or Inf; the solution is NaN.
    """

    CHOLESKY = 0
    JITTERED = 1
    PSEUDO_INVERSE = 2
    NONFINITE = 3


def _chol(h, rcond, iters: int = 4):
    """Cholesky factor, whether it is usable, and a condition estimate ``λ_max / λ_min``.

    ``λ_max`` comes from power iteration with ``h``, ``λ_min`` from inverse iteration with the
    factor (a few ``O(p²)`` triangular solves; the pivot ratio alone can miss a singular ``h``).
    """
    factor = jnp.linalg.cholesky(h)
    p = h.shape[-1]
    start = 1.0 + 0.5 * jnp.sin(jnp.arange(1, p + 1, dtype=h.dtype))
    start = start / jnp.linalg.norm(start)
    up, down = start, start
    grow, shrink = jnp.ones((), h.dtype), jnp.ones((), h.dtype)
    for _ in range(iters):
        up = h @ up
        grow = jnp.linalg.norm(up)
        up = up / grow
        down = _cho_solve(factor, down)
        shrink = jnp.linalg.norm(down)
        down = down / shrink
    cond = grow * shrink
    ok = jnp.all(jnp.isfinite(factor)) & jnp.isfinite(cond) & (cond * rcond <= 1)
    return factor, ok, cond


def _cho_solve(factor, f):
    return jax.scipy.linalg.cho_solve((factor, True), f)


def _pinv_solve(h, f, rcond):
    w, v = jnp.linalg.eigh(h)
    top = jnp.max(w)
    keep = w > rcond * top
    winv = jnp.where(keep, 1.0 / jnp.where(keep, w, 1.0), 0.0)
    x = v @ (winv[:, None] * (v.T @ f))
    low = jnp.min(w)
    cond = jnp.where(low > 0, top / jnp.where(low > 0, low, 1.0), jnp.inf)
    return x, cond


def _solve_one(h, f, rcond):
    p = h.shape[-1]
    dtype = h.dtype
    if rcond is None:
        rcond = 10 * p * jnp.finfo(dtype).eps
    h = 0.5 * (h + h.T)
    finite = jnp.all(jnp.isfinite(h)) & jnp.all(jnp.isfinite(f))
    scale = jnp.mean(jnp.diagonal(h))
    usable = finite & (scale > 0)
    scale = jnp.where(usable, scale, 1.0)
    hn = jnp.where(usable, h / scale, jnp.eye(p, dtype=dtype))
    fn = jnp.where(finite, f / scale, 0.0)
    eye = jnp.eye(p, dtype=dtype)

    def chol_or_jitter(_):
        factor, ok, cond = _chol(hn, rcond)

        def jitter(_):
            return _chol(hn + (rcond / 100) * eye, rcond)

        jfactor, jok, jcond = lax.cond(ok, lambda _: (factor, ok, cond), jitter, None)
        status = jnp.where(ok, SolveStatus.CHOLESKY, SolveStatus.JITTERED)
        return jfactor, ok | jok, jnp.where(ok, cond, jcond), status

    factor, ok, cond, status = lax.cond(
        usable,
        chol_or_jitter,
        lambda _: (eye, jnp.array(False), jnp.array(jnp.inf, dtype), SolveStatus.CHOLESKY),
        None,
    )

    def by_cholesky(_):
        return _cho_solve(factor, fn), cond

    def by_pinv(_):
        return _pinv_solve(jnp.where(usable, hn, 0.0), fn, rcond)

    x, cond = lax.cond(ok, by_cholesky, by_pinv, None)
    status = jnp.where(ok, status, SolveStatus.PSEUDO_INVERSE)
    status = jnp.where(finite, status, SolveStatus.NONFINITE).astype(jnp.int32)
    x = jnp.where(finite, x, jnp.nan)
    cond = jnp.where(finite, cond, jnp.nan)
    return x, status, cond


def psd_solve(
    h: Float[ArrayLike, "*batch p p"],
    f: Float[ArrayLike, "*batch p r"],
    *,
    rcond: float | None = None,
) -> tuple[Float[Array, "*batch p r"], Int[Array, "*batch"], Float[Array, "*batch"]]:
    """Solve ``h x = f`` for symmetric PSD ``h``, batched over leading axes (see module docs).

    Args:
        h: symmetric positive semi-definite matrices ``(..., p, p)``.
        f: right-hand sides ``(..., p, r)``, all solved with one factorisation.
        rcond: relative eigenvalue cut-off; default ``10 · p · eps`` of the dtype.

    Returns:
        ``(x, status, cond)``: the solution, a :class:`SolveStatus` code per system (``int32``)
        and a condition-number estimate per system (``inf`` when singular).

    Examples:
        >>> import jax.numpy as jnp
        >>> x, status, cond = psd_solve(jnp.array([[2.0, 0.0], [0.0, 0.0]]),
        ...                             jnp.array([[4.0], [0.0]]))
        >>> x.ravel().tolist(), SolveStatus(int(status)).name
        ([2.0, 0.0], 'PSEUDO_INVERSE')
    """
    h, f = jnp.asarray(h), jnp.asarray(f)
    batch = h.shape[:-2]
    if f.shape[:-2] != batch or f.shape[-2] != h.shape[-1] or h.shape[-1] != h.shape[-2]:
        raise ValueError(f"psd_solve: incompatible shapes h {h.shape} and f {f.shape}.")
    solve = lambda a, b: _solve_one(a, b, rcond)  # noqa: E731
    for _ in batch:
        solve = jax.vmap(solve)
    return solve(h, f)
