"""``solve_layer``: the merged layer that best reproduces every fine-tuned model's outputs."""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .bases import (
    Basis,
    Custom,
    LowRank,
    check_basis,
    combine_directions,
    directional_system,
    truncate_update,
)
from .energy import energies
from .layers import as_layer, augmented, check_layer
from .psd import SolveStatus, psd_solve
from .stats import LayerStats

__all__ = ["LayerSolution", "SolveError", "solve_layer"]


class SolveError(RuntimeError):
    """A solve could not produce a finite merge (raised by ``throw=True``).

    Under ``jax.jit`` it is raised from a host callback while the computation runs, and JAX
    reports it as a ``jax.errors.JaxRuntimeError`` whose message ends with this error's (see
    :func:`solve_layer`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> stats = layer_stats([jnp.array([[jnp.nan]])], [jnp.array([[1.0]])])
        >>> solve_layer(stats, jnp.zeros((1, 1)), [jnp.ones((1, 1))])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jaxmerge.SolveError: solve_layer: the merge would not be finite; NaN ...
    """


SolveError.__module__ = "jaxmerge"  # the public path in reprs and tracebacks


class LayerSolution(NamedTuple):
    """The solution of one layer's merge QP (a pytree).

    Attributes:
        kernel: merged kernel ``(n_in, n_out)``, in the base kernel's dtype.
        bias: merged bias ``(n_out,)`` or ``None`` when the layer has none.
        coefficients: the QP variables: ``(K,)`` for ``"scalar"``, ``(n_out, K)`` for
            ``"diagonal"``, ``(J,)`` or ``(n_out, J)`` for :class:`Custom`, and the update
            ``U = W̄ − W̄₀`` itself (``(n_in + 1, n_out)`` with a bias) for ``"full"`` and
            :class:`LowRank`.
        energy_base: ``E₀``, the residual energy of the base layer.
        energy_merged: ``L``, the loss of the merged layer.
        energy_fraction: ``ρ = 1 − L/E₀``.
        status: :class:`SolveStatus` code (``int32``; the worst over a batch of systems).
        condition: condition-number estimate of the system (the largest over a batch).
        spectrum: for :class:`LowRank`, the energy ``σᵢ²`` of every direction of the full
            update in decreasing order (their sum is ``ρ_full · E₀`` without ridge); else ``None``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxmerge import LowRank, layer_stats
        >>> x = jnp.eye(3)
        >>> w0, w1 = jnp.zeros((3, 2)), jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
        >>> sol = solve_layer(layer_stats([x], [x @ w1]), w0, [w1], basis=LowRank(1))
        >>> [round(float(v), 4) for v in sol.spectrum], round(float(sol.energy_fraction), 4)
        ([1.3333, 0.3333], 0.8)
    """

    kernel: Float[Array, "n_in n_out"]
    bias: Float[Array, " n_out"] | None
    coefficients: Float[Array, "..."]
    energy_base: Float[Array, ""]
    energy_merged: Float[Array, ""]
    energy_fraction: Float[Array, ""]
    status: Int[Array, ""]
    condition: Float[Array, ""]
    spectrum: Float[Array, " r"] | None = None


def _broadcast_prior(prior, shape, what):
    given = prior
    prior = jnp.asarray(prior)
    try:
        if isinstance(given, jax.Array) or isinstance(prior, jax.core.Tracer):
            # Traced (also a constant under jit), or placed by the caller: keep it there.
            return jnp.broadcast_to(prior, shape)
        # A number or a host array: broadcast on the host (no XLA program for each shape).
        return jnp.asarray(np.broadcast_to(np.asarray(prior), shape))
    except ValueError:
        raise ValueError(
            f"solve_layer: prior has shape {prior.shape}; the {what} basis needs coefficients "
            f"broadcastable to {shape}."
        ) from None


def _floored(d):
    """The diagonal ``D`` of the ridge, floored at ``eps · mean(d)`` so that it is invertible."""
    mean = jnp.mean(d, axis=-1, keepdims=True)
    return jnp.maximum(d, jnp.finfo(d.dtype).eps * jnp.where(mean > 0, mean, 1.0))


def ridged_solve(h, f, prior, theta, *, rcond, jitter):
    """A directional QP ``H c = f`` with the ridge toward ``c₀ = prior``, batched over leading
    axes: ``(θH + (1−θ)D) c = θf + (1−θ)D c₀`` with ``D = diag(H)`` floored and
    ``θ = 1/(1+λ)``, so that ``λ = ∞`` (``θ = 0``) returns ``c₀`` exactly.

    Returns ``(c, status, cond)``: the coefficients, the worst :class:`SolveStatus` and the
    largest condition estimate over the batch.
    """
    d = _floored(jnp.diagonal(h, axis1=-2, axis2=-1))
    eye = jnp.eye(h.shape[-1], dtype=h.dtype)
    system = theta * h + (1 - theta) * d[..., None] * eye
    rhs = theta * f + (1 - theta) * d * prior
    c, status, cond = psd_solve(system, rhs[..., None], rcond=rcond, jitter=jitter)
    return jnp.where(theta == 0, prior, c[..., 0]), jnp.max(status), jnp.max(cond)


@functools.partial(jax.jit, static_argnames=("per_output", "rank", "rcond", "jitter", "full"))
def _solve_kernel(
    gram,
    cross,
    task_diag,
    out_sq,
    w0,
    wk,
    dirs,
    prior,
    ridge,
    alpha,
    *,
    full,
    per_output,
    rank,
    rcond,
    jitter,
):
    dtype = gram.dtype
    p = w0.shape[0]
    gram, cross, task_diag = gram[:p, :p], cross[:p], task_diag[:, :p]
    # RegMean's α as a change of metric: A_α = αA + (1−α)Diag(A), P_α = αP + (1−α)Σₖ Diag(gₖ)W̄ₖ.
    diag = jnp.diagonal(gram)
    gram_a = alpha * gram + (1 - alpha) * jnp.diag(diag)
    cross_a = alpha * cross + (1 - alpha) * jnp.einsum("ki,kim->im", task_diag, wk)
    residual = cross_a - gram_a @ w0
    # Ridge toward the prior, (H + λD)c = f + λDc₀, written with θ = 1/(1+λ) so that λ = ∞ is
    # exact: (θH + (1−θ)D)c = θf + (1−θ)Dc₀. D = diag(H), floored so that it is invertible.
    theta = 1.0 / (1.0 + ridge)
    spectrum = None

    if full:
        d = _floored(jnp.diagonal(gram_a))
        h = theta * gram_a + (1 - theta) * jnp.diag(d)
        f = theta * residual + (1 - theta) * d[:, None] * prior
        update, status, cond = psd_solve(h, f, rcond=rcond, jitter=jitter)
        update = jnp.where(theta == 0, prior, update)
        if rank is not None:
            cut = p * jnp.finfo(dtype).eps if rcond is None else rcond
            update, spectrum = truncate_update(update, gram_a, rank, cut)
        coefficients = update
    else:
        h, f = directional_system(dirs, gram_a, residual, per_output)
        coefficients, status, cond = ridged_solve(h, f, prior, theta, rcond=rcond, jitter=jitter)
        update = combine_directions(coefficients, dirs, per_output)
    e0, loss, rho = energies(gram, cross, jnp.sum(out_sq), w0, update)
    return w0 + update, coefficients, e0, loss, rho, status, cond, spectrum


def _is_scalar(value) -> bool:
    """A real number or a 0-d array, possibly traced."""
    if isinstance(value, jax.core.Tracer):
        return value.ndim == 0
    if isinstance(value, str) or jnp.ndim(value) != 0:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _all_finite(a) -> bool:
    """Whether a concrete array holds no NaN or Inf: with numpy for arrays on the host CPU (no XLA
    program for each shape), with JAX otherwise."""
    if isinstance(a, np.ndarray) or (
        isinstance(a, jax.Array)
        and a.is_fully_addressable
        and all(d.platform == "cpu" for d in a.devices())
    ):
        host = np.asarray(a)
        if host.dtype.kind in "fiub":
            return bool(np.isfinite(host).all())
    return bool(jnp.all(jnp.isfinite(a)))


def _named_inputs(stats, w0, wk, dirs) -> list[tuple[str, Any]]:
    named = [(f"stats.{f}", getattr(stats, f)) for f in LayerStats._fields]
    named += [("base", w0)] + [(f"finetuned[{k}]", w) for k, w in enumerate(wk)]
    if dirs is not None:
        named += [(f"directions[{j}]", b) for j, b in enumerate(dirs)]
    return named


def _solve_error(bad: Sequence[str]) -> SolveError:
    return SolveError(
        "solve_layer: the merge would not be finite; NaN or Inf in "
        + (", ".join(bad) if bad else "the solve (overflow)")
        + ". Check the calibration data and the parameters."
    )


def _raise_if_failed(failed, finite, names):
    """Host side of ``throw=True`` on traced values (``jax.debug.callback``).

    ``failed`` and ``finite`` may carry leading batch axes (``vmap`` calls once per element, but
    nothing here relies on it): any failed element raises, naming every input that was not
    finite in some element.
    """
    if np.any(failed):
        finite = np.asarray(finite).reshape(-1, len(names))
        raise _solve_error([n for n, ok in zip(names, finite.all(axis=0), strict=True) if not ok])


def solve_layer(
    stats: LayerStats,
    base: Any,
    finetuned: Sequence[Any],
    *,
    basis: Basis | str = "full",  # any str: an unknown name gets a clear ValueError
    ridge: float | Float[ArrayLike, ""] = 0.0,
    prior: Any = None,
    alpha: float | Float[ArrayLike, ""] = 1.0,
    rcond: float | None = None,
    jitter: float = 0.0,
    throw: bool = True,
) -> LayerSolution:
    r"""Merge one layer by output-space projection.

    Minimises the calibration loss over updates ``U = W̄ − W̄₀`` in the span of ``basis``::

        min_c  L(c) = E₀ + cᵀHc − 2fᵀc,   H_qr = ⟨B_q, A_α B_r⟩,  f_q = ⟨B_q, P_α − A_α W̄₀⟩
        (H + λD) c* = f + λD c₀,          D = diag(H),  λ = ridge,  c₀ = prior

    with ``A = gram``, ``P = cross`` and RegMean's metric ``A_α = αA + (1−α)Diag(A)``,
    ``P_α = αP + (1−α)Σₖ Diag(gₖ)W̄ₖ``. ``ridge = 0`` is the projection; ``ridge → ∞`` (``inf``
    allowed) returns the prior exactly. The bias is solved exactly through the constant input.
    Energies ``E₀, L, ρ`` are always measured in the true metric (``α = 1``).

    Args:
        stats: the layer's calibration statistics (see :func:`layer_stats`).
        base: the base layer: a kernel ``(n_in, n_out)``, a ``(kernel, bias)`` pair or a
            ``{"kernel", "bias"}`` dict.
        finetuned: the ``K`` fine-tuned layers, in the same form, in the statistics' task order.
        basis: ``"scalar"``, ``"diagonal"``, ``"full"``, :class:`LowRank` or :class:`Custom`.
        ridge: ``λ ≥ 0``; pulls the coefficients toward ``prior`` in the scale-free metric
            ``D = diag(H)``.
        prior: the coefficients ``c₀`` the ridge pulls toward (default 0, the base). For scalar,
            diagonal and custom bases, an array broadcastable to the coefficients' shape (e.g.
            ``1/K`` for the uniform soup, ``λ_TA`` for task arithmetic); for ``"full"`` and
            :class:`LowRank`, a merged layer-like.
        alpha: RegMean's ``α ∈ [0, 1]``; 1 is the exact output-space metric.
        rcond: relative eigenvalue cut-off of the solver (see :func:`psd_solve`).
        jitter: relative ridge the solver tries before an eigendecomposition when the plain
            Cholesky factorisation fails (see :func:`psd_solve`); 0 keeps the exact
            minimum-norm fallback.
        throw: raise :class:`SolveError` when the result would not be finite. On traced
            inputs (inside ``jax.jit``, ``vmap``, ``scan``, ``grad``) Python cannot read the
            status, so the check becomes a ``jax.debug.callback`` that raises
            :class:`SolveError` on the host while the computation runs. Under ``jax.jit`` JAX
            reports it as a ``jax.errors.JaxRuntimeError`` whose message ends with
            ``SolveError: solve_layer: the merge would not be finite; NaN or Inf in …`` (JAX
            also logs the callback's traceback), raised by the call or, with asynchronous
            dispatch, at the latest when a result is read (``block_until_ready``). Under
            ``vmap`` without ``jit`` the :class:`SolveError` itself is raised. The callback
            costs a device-to-host transfer of a few flags per call; ``throw=False`` never
            raises (nor calls back) and leaves the check to you: ``status`` is then an
            ``int32`` array equal to ``SolveStatus.NONFINITE`` for a non-finite merge.

    Returns:
        A :class:`LayerSolution`.

    Raises:
        ValueError, TypeError: shapes, dtypes or options that do not fit the layer.
        SolveError: ``throw=True`` and the statistics or weights hold NaN or Inf (under
            ``jax.jit``: a ``jax.errors.JaxRuntimeError`` carrying its message; see ``throw``).

    Examples:
        Two fine-tunes, each changing its own input's weight; the tasks see disjoint inputs, so
        the full basis recovers both updates exactly:

        >>> import jax.numpy as jnp
        >>> from jaxmerge import layer_stats
        >>> w0 = jnp.zeros((2, 1))
        >>> w1, w2 = jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [2.0]])
        >>> x1, x2 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
        >>> stats = layer_stats([x1, x2], [x1 @ w1, x2 @ w2])
        >>> sol = solve_layer(stats, w0, [w1, w2], basis="full")
        >>> sol.kernel.ravel().round(6).tolist(), round(float(sol.energy_fraction), 6)
        ([1.0, 2.0], 1.0)
        >>> round(float(solve_layer(stats, w0, [w1, w2], basis="scalar").energy_fraction), 6)
        1.0
    """
    if not isinstance(stats, LayerStats):
        raise TypeError(f"solve_layer: stats must be a LayerStats, got {type(stats).__name__}.")
    if not isinstance(finetuned, Sequence) or len(finetuned) == 0:
        raise ValueError(
            "solve_layer: finetuned must be a non-empty sequence of layers (K ≥ 1); got "
            f"{finetuned!r:.80}."
        )
    k0, b0 = check_layer(as_layer(base, "base"), "base", stats)
    layers = [
        check_layer(as_layer(t, f"finetuned[{k}]"), f"finetuned[{k}]", stats)
        for k, t in enumerate(finetuned)
    ]
    has_bias = b0 is not None
    for k, (_, b) in enumerate(layers):
        if (b is None) == has_bias:
            raise ValueError(
                f"solve_layer: finetuned[{k}] {'has no' if has_bias else 'has a'} bias but the "
                f"base {'has one' if has_bias else 'has none'}; give every layer a bias or none."
            )
    if len(layers) != stats.num_tasks:
        raise ValueError(
            f"solve_layer: {len(layers)} fine-tuned layers but the statistics hold "
            f"{stats.num_tasks} tasks; give one fine-tune per task, in task order."
        )
    dtype = stats.gram.dtype
    w0 = augmented(k0, b0).astype(dtype)
    wk = jnp.stack([augmented(k, b).astype(dtype) for k, b in layers])
    p, m = w0.shape
    for name, value in (("ridge", ridge), ("alpha", alpha)):
        if not _is_scalar(value):
            raise TypeError(f"solve_layer: {name} must be a number, got {value!r:.60}.")
    ridge_v, alpha_v = jnp.asarray(ridge, dtype), jnp.asarray(alpha, dtype)
    if not isinstance(ridge, jax.core.Tracer) and not float(ridge) >= 0:
        raise ValueError(f"solve_layer: ridge must be ≥ 0 (or inf), got {ridge}.")
    if not isinstance(alpha, jax.core.Tracer) and not 0 <= float(alpha) <= 1:
        raise ValueError(f"solve_layer: alpha must lie in [0, 1], got {alpha}.")

    full, rank, per_output, dirs = False, None, False, None
    if isinstance(basis, LowRank):
        full, rank = True, basis.rank
        if rank > min(p, m):
            raise ValueError(
                f"solve_layer: LowRank({rank}) exceeds the largest possible rank {min(p, m)} of "
                f"an update of shape ({p}, {m})."
            )
    elif isinstance(basis, Custom):
        per_output = bool(basis.per_output)
        if isinstance(basis.directions, dict) or not len(basis.directions):
            raise ValueError("solve_layer: Custom needs a non-empty sequence of directions.")
        dirs = []
        for j, d in enumerate(basis.directions):
            kd, bd = check_layer(
                as_layer(d, f"Custom.directions[{j}]"), f"Custom.directions[{j}]", stats
            )
            if has_bias and bd is None:
                bd = jnp.zeros((m,), dtype)
            elif not has_bias and bd is not None:
                raise ValueError(
                    f"solve_layer: Custom.directions[{j}] has a bias; the layer has none."
                )
            dirs.append(augmented(kd, bd).astype(dtype))
        dirs = jnp.stack(dirs)
    elif basis in ("scalar", "diagonal"):
        per_output = basis == "diagonal"
        dirs = wk - w0
    else:
        full = check_basis(basis, "solve_layer") == "full"

    if full:
        if prior is None:
            prior = jnp.zeros((p, m), dtype)
        else:
            kp, bp = check_layer(as_layer(prior, "prior"), "prior", stats)
            if (bp is None) == has_bias:
                raise ValueError("solve_layer: prior must have a bias exactly when the base has.")
            prior = augmented(kp, bp).astype(dtype) - w0
    else:
        shape = (m, dirs.shape[0]) if per_output else (dirs.shape[0],)
        name = "diagonal" if per_output else "scalar"
        prior = _broadcast_prior(0.0 if prior is None else prior, shape, name).astype(dtype)

    merged, coeff, e0, loss, rho, status, cond, spectrum = _solve_kernel(
        stats.gram,
        stats.cross,
        stats.task_diag,
        stats.out_sq,
        w0,
        wk,
        dirs,
        prior,
        ridge_v,
        alpha_v,
        full=full,
        per_output=per_output,
        rank=rank,
        rcond=rcond,
        jitter=float(jitter),
    )
    if throw:
        if isinstance(status, jax.core.Tracer) or isinstance(merged, jax.core.Tracer):
            # Traced (jit, vmap, scan, grad): Python cannot read the status, so the check runs
            # on the host when the computation does; see ``throw`` in the docstring.
            named = _named_inputs(stats, w0, wk, dirs)
            failed = (status == SolveStatus.NONFINITE) | ~jnp.all(jnp.isfinite(merged))
            finite = jnp.stack([jnp.all(jnp.isfinite(a)) for _, a in named])
            names = tuple(n for n, _ in named)
            jax.debug.callback(lambda f, ok: _raise_if_failed(f, ok, names), failed, finite)
        elif int(status) == SolveStatus.NONFINITE or not _all_finite(merged):
            named = _named_inputs(stats, w0, wk, dirs)  # only now: naming costs a program each
            raise _solve_error([n for n, a in named if not _all_finite(a)])
    kernel = merged[: k0.shape[0]].astype(k0.dtype)
    bias = merged[-1].astype(b0.dtype) if has_bias else None
    return LayerSolution(kernel, bias, coeff, e0, loss, rho, status, cond, spectrum)
