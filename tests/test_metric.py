"""The QP in per-task output metrics (``jaxmerge.core.metric``) against a dense Kronecker solve.

``vec(A U G) = (Gᵀ ⊗ A) vec(U)`` (column-major ``vec``), so the matrix equation
``Σₖ wₖ Aₖ U Gₖ = Σₖ wₖ Rₖ Gₖ`` is the ``nm × nm`` linear system ``Σₖ wₖ (Gₖ ⊗ Aₖ) u = b``, solved
here by numpy's minimum-norm least squares in float64.
"""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from jaxmerge import layer_stats, solve_layer
from jaxmerge.core.metric import metric_solve


def _psd(rng, size, rank=None, cond=1e3):
    """A random PSD matrix with eigenvalues spread over ``cond`` (``rank`` of them nonzero)."""
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    lam = np.geomspace(1.0, 1.0 / cond, size)
    if rank is not None:
        lam[rank:] = 0.0
    return (q * lam) @ q.T


def _problem(seed, k, n, m, *, rank_a=None, rank_g=None):
    rng = np.random.default_rng(seed)
    a = np.stack([_psd(rng, n, rank_a) for _ in range(k)])
    g = np.stack([_psd(rng, m, rank_g) for _ in range(k)])
    deltas = rng.standard_normal((k, n, m))
    r = a @ deltas  # a linear layer's residual cross moments: Rₖ = Aₖ Δₖ
    w = rng.uniform(0.5, 2.0, k)
    return a, r, g, w, deltas


def _dense(a, r, g, w):
    k, n, m = r.shape
    system = sum(w[i] * np.kron(g[i].T, a[i]) for i in range(k))
    rhs = sum(w[i] * r[i] @ g[i] for i in range(k)).reshape(-1, order="F")
    u = np.linalg.lstsq(system, rhs, rcond=1e-12)[0]
    return u.reshape(n, m, order="F")


def _rel(x, y):
    return float(np.linalg.norm(np.asarray(x) - y) / np.linalg.norm(y))


@pytest.mark.parametrize(
    ("k", "method"), [(1, "exact"), (2, "exact"), (1, "cg"), (2, "cg"), (3, "cg"), (4, "cg")]
)
def test_matches_dense_kronecker_solve(x64, k, method):
    a, r, g, w, _ = _problem(k, k, 6, 4)
    sol = metric_solve(a, r, g, weights=w, method=method, rtol=1e-12)
    assert sol.update.dtype == jnp.float64
    assert _rel(sol.update, _dense(a, r, g, w)) < 1e-6
    assert bool(sol.converged) and float(sol.residual) < 1e-10
    if method == "cg" and k > 1:
        assert int(sol.iterations) > 0  # the warm start alone is not the answer


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_singular_inputs_give_the_minimum_norm_update(x64, method):
    """Inputs on a subspace (rank 4 of 6, the same for both tasks, as after a norm with the
    constant column): the update has no component in the inputs' null space, like numpy's
    minimum-norm solution of the dense system."""
    rng = np.random.default_rng(7)
    basis = np.linalg.qr(rng.standard_normal((6, 4)))[0]
    a = np.stack([basis @ _psd(rng, 4) @ basis.T for _ in range(2)])
    g = np.stack([_psd(rng, 3) for _ in range(2)])
    r = a @ rng.standard_normal((2, 6, 3))
    w = np.array([1.0, 0.7])
    sol = metric_solve(a, r, g, weights=w, method=method, rtol=1e-12)
    reference = _dense(a, r, g, w)
    assert _rel(sol.update, reference) < 1e-6
    null = np.linalg.svd(basis.T)[2][4:]  # the two directions orthogonal to the inputs
    assert np.max(np.abs(null @ np.asarray(sol.update))) < 1e-10


def test_one_task_returns_its_fine_tune(x64):
    a, r, g, _, deltas = _problem(3, 1, 5, 3)
    for method in ("exact", "cg"):
        sol = metric_solve(a, r, g, method=method)
        np.testing.assert_allclose(sol.update, deltas[0], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("k", [2, 4])
def test_identity_metric_is_the_full_basis_qp(x64, k):
    """``Gₖ = I``: today's full-basis QP, ``solve_layer`` on the same activations (bias-free
    layer), and no conjugate-gradient step is needed from its warm start."""
    rng = np.random.default_rng(k)
    x = [rng.standard_normal((40, 5)) for _ in range(k)]
    w0 = rng.standard_normal((5, 3))
    wk = [w0 + rng.standard_normal((5, 3)) for _ in range(k)]
    ys = [jnp.asarray(xi @ v) for xi, v in zip(x, wk, strict=True)]
    stats = layer_stats([jnp.asarray(xi) for xi in x], ys)
    qp = solve_layer(stats, jnp.asarray(w0), [jnp.asarray(v) for v in wk])
    a = np.stack([xi.T @ xi for xi in x])
    r = np.stack([xi.T @ (xi @ v - xi @ w0) for xi, v in zip(x, wk, strict=True)])
    sol = metric_solve(a, r, np.broadcast_to(np.eye(3), (k, 3, 3)))
    np.testing.assert_allclose(w0 + np.asarray(sol.update), qp.kernel, rtol=1e-8, atol=1e-10)
    if k > 2:
        assert int(sol.iterations) == 0


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_shared_metric_leaves_the_full_basis_solution_unchanged(x64, method):
    k = 2 if method == "exact" else 3
    a, r, g, w, _ = _problem(11, k, 5, 4)
    shared = np.broadcast_to(g[0], g.shape)
    identity = metric_solve(a, r, np.broadcast_to(np.eye(4), g.shape), weights=w, method=method)
    sol = metric_solve(a, r, shared, weights=w, method=method, rtol=1e-12)
    assert _rel(sol.update, np.asarray(identity.update)) < 1e-8
    if method == "cg":  # the preconditioner is exact for a shared metric
        assert int(sol.iterations) == 0
    assert _rel(metric_solve(a, r, g, weights=w, method=method).update, identity.update) > 1e-3


def test_disjoint_tasks_keep_their_own_changes(x64):
    """Task 1 sees inputs 0–1 and reads output 0, task 2 inputs 2–3 and output 1: each keeps its
    fine-tune's change where it reads it (the identity metric would average the outputs it does
    not read in), and no task depends on the cross entries, which stay at zero."""
    a = np.zeros((2, 4, 4))
    a[0, :2, :2], a[1, 2:, 2:] = np.eye(2), np.eye(2)
    g = np.zeros((2, 2, 2))
    g[0, 0, 0], g[1, 1, 1] = 1.0, 1.0
    deltas = np.arange(16.0).reshape(2, 4, 2) + 1
    sol = metric_solve(a, a @ deltas, g, method="exact")
    expected = np.zeros((4, 2))
    expected[:2, 0], expected[2:, 1] = deltas[0, :2, 0], deltas[1, 2:, 1]
    np.testing.assert_allclose(sol.update, expected, atol=1e-12)


def test_cg_reports_when_it_stops_short(x64):
    a, r, g, w, _ = _problem(5, 4, 8, 6)
    sol = metric_solve(a, r, g, weights=w, method="cg", rtol=1e-14, maxiter=2)
    assert int(sol.iterations) == 2 and not bool(sol.converged)
    assert float(sol.residual) > 1e-14


def test_float32_under_jit():
    a, r, g, w, _ = _problem(2, 3, 6, 4)
    a, r, g = (jnp.asarray(x, jnp.float32) for x in (a, r, g))
    sol = jax.jit(lambda *x: metric_solve(*x, rtol=1e-5))(a, r, g)
    assert sol.update.dtype == jnp.float32
    assert bool(sol.converged)
    with jax.enable_x64(True):
        reference = _dense(*(np.asarray(x, np.float64) for x in (a, r, g)), np.ones(3))
    assert _rel(sol.update, reference) < 1e-3


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_nonfinite_inputs_are_flagged_not_solved(method):
    a, r, g, _, _ = _problem(4, 2, 3, 2)
    g[1, 0, 0] = np.nan
    sol = metric_solve(a, r, g, method=method)
    assert not bool(sol.converged)
    assert np.all(np.isnan(np.asarray(sol.update))) and np.isnan(float(sol.residual))


@pytest.fixture
def unchecked_shapes():
    """The library's own shape errors, as users see them: the suite's run-time jaxtyping checks
    would reject these calls first."""
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", False)


def test_bad_inputs_are_named(unchecked_shapes):
    a, r, g, _, _ = _problem(0, 3, 4, 2)
    with pytest.raises(ValueError, match=r"gram must be \(3, 4, 4\)"):
        metric_solve(a[:, :3, :3], r, g)
    with pytest.raises(ValueError, match="expected gram \\(K, n, n\\)"):
        metric_solve(a[0], r, g)
    with pytest.raises(ValueError, match="K <= 2"):
        metric_solve(a, r, g, method="exact")
    with pytest.raises(ValueError, match="method 'newton'"):
        metric_solve(a, r, g, method="newton")
    with pytest.raises(ValueError, match=r"weights has shape \(2,\)"):
        metric_solve(a, r, g, weights=np.ones(2))
    with pytest.raises(TypeError, match="metric has dtype int"):
        metric_solve(a, r, np.ones((3, 2, 2), int))
