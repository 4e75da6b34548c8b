"""Hard numerics, property-based: random shapes, K, bases and conditioning.

For every problem drawn: results are finite, the captured energy of the solved merge is in
[0, 1], and the solution is optimal — the gradient of the QP objective, ``2(Hc − f)``, is zero
relative to the scale of its terms — or the status says why not (``PSEUDO_INVERSE``: the system
was singular or too ill-conditioned for the dtype and the minimum-norm truncated solution was
returned).
"""

import pathlib
import sys

import jax
import numpy as np
import pytest
from conftest import Job, fresh_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmerge as jm

SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def conditioned_inputs(rng, rows, n, cond, dtype):
    """Inputs whose Gram matrix XᵀX/rows has condition number ``cond`` (exactly, in float64)."""
    u, _ = np.linalg.qr(rng.normal(size=(rows, n)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.sqrt(np.logspace(0, -np.log10(cond), n)) * np.sqrt(rows)
    return ((u * s) @ v.T).astype(dtype)


@st.composite
def problems(draw):
    k = draw(st.integers(1, 4))
    n = draw(st.integers(2, 7))
    m = draw(st.integers(1, 5))
    basis = draw(st.sampled_from(["scalar", "diagonal", "full", "lowrank", "custom"]))
    seed = draw(st.integers(0, 2**31 - 1))
    log_cond = draw(st.floats(0, 1))  # fraction of the dtype's hardest condition number
    return k, n, m, basis, seed, log_cond


def numpy_stats(xs, ys, dtype):
    """``jm.layer_stats(xs, ys)`` (one task per pair, weights 1/Nₖ), summed in float64 numpy and
    cast to ``dtype``. The properties below are of the solve given statistics (``layer_stats``
    is checked against numpy in test_stats.py); numpy spares an XLA program for every row count
    drawn (about 30 s of compilation per test)."""
    k, n, m = len(xs), xs[0].shape[1], ys[0].shape[1]
    gram, cross, out_sq = np.zeros((n + 1, n + 1)), np.zeros((n + 1, m)), np.zeros(m)
    task_diag, count = np.zeros((k, n + 1)), np.zeros(k)
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        xa = np.hstack([np.asarray(x, np.float64), np.ones((len(x), 1))])
        y = np.asarray(y, np.float64)
        g = xa.T @ xa / len(x)
        gram, cross = gram + g, cross + xa.T @ y / len(x)
        out_sq = out_sq + (y**2).sum(0) / len(x)
        task_diag[t], count[t] = np.diag(g), len(x)
    fields = (gram, cross, out_sq, task_diag, count)
    return jm.LayerStats(*(jax.numpy.asarray(a.astype(dtype)) for a in fields))


def build(k, n, m, seed, cond, dtype):
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=(n, m)).astype(dtype)
    fts = [(w0 + 0.5 * rng.normal(size=(n, m))).astype(dtype) for _ in range(k)]
    xs = [conditioned_inputs(rng, n + 3 + t, n, cond, dtype) for t in range(k)]
    ys = [(x @ w).astype(dtype) for x, w in zip(xs, fts, strict=True)]
    return rng, w0, fts, numpy_stats(xs, ys, dtype)


def check(sol, stats, w0, fts, basis_obj, tol_grad, tol_rho):
    """Finite, ρ ∈ [0, 1], and zero QP gradient unless the status says the system was singular."""
    assert np.all(np.isfinite(np.asarray(sol.kernel)))
    rho = float(sol.energy_fraction)
    assert -tol_rho <= rho <= 1 + tol_rho, rho
    status = jm.SolveStatus(int(sol.status))
    assert status != jm.SolveStatus.NONFINITE
    if status == jm.SolveStatus.PSEUDO_INVERSE:
        return
    # The gradient of the QP objective in the basis coordinates, recomputed in float64 numpy.
    a = np.asarray(stats.gram, np.float64)[:-1, :-1]  # bias-free layers: drop the constant input
    p = np.asarray(stats.cross, np.float64)[:-1]
    w0 = np.asarray(w0, np.float64)
    u = np.asarray(sol.kernel, np.float64) - w0
    r = p - a @ w0
    if isinstance(basis_obj, jm.LowRank) and basis_obj.rank < min(u.shape):
        # Optimal among rank-r updates only: it cannot beat the full basis.
        full = jm.solve_layer(stats, w0, fts, basis="full")
        assert rho <= float(full.energy_fraction) + tol_rho
        return
    if basis_obj == "full" or isinstance(basis_obj, jm.LowRank):
        grad, scale = a @ u - r, np.abs(a).max() * np.abs(u).max() + np.abs(r).max()
    else:
        if isinstance(basis_obj, jm.Custom):
            dirs, per_output = np.asarray(basis_obj.directions, np.float64), basis_obj.per_output
        else:
            dirs = np.stack([np.asarray(f, np.float64) - w0 for f in fts])
            per_output = basis_obj == "diagonal"
        ad = np.einsum("ij,qjm->qim", a, dirs)
        if per_output:
            h, f = np.einsum("qim,rim->mqr", dirs, ad), np.einsum("qim,im->mq", dirs, r)
            c = np.asarray(sol.coefficients, np.float64)
            grad = np.einsum("mqr,mr->mq", h, c) - f
        else:
            h, f = np.einsum("qim,rim->qr", dirs, ad), np.einsum("qim,im->q", dirs, r)
            c = np.asarray(sol.coefficients, np.float64)
            grad = h @ c - f
        scale = np.abs(h).max() * np.abs(c).max() + np.abs(f).max()
    assert np.abs(grad).max() <= tol_grad * scale, (np.abs(grad).max(), scale, status)


def run_case(k, n, m, basis, seed, log_cond, dtype, max_cond, tol_grad, tol_rho):
    cond = 10 ** (log_cond * np.log10(max_cond))
    rng, w0, fts, stats = build(k, n, m, seed, cond, dtype)
    basis_obj = {
        "lowrank": jm.LowRank(min(n, m) if seed % 2 else 1),
        "custom": jm.Custom(
            [rng.normal(size=(n, m)).astype(dtype) for _ in range(2)], per_output=bool(seed % 2)
        ),
    }.get(basis, basis)
    sol = jm.solve_layer(stats, w0, fts, basis=basis_obj)
    check(sol, stats, w0, fts, basis_obj, tol_grad, tol_rho)


@SETTINGS
@given(problems())
def test_float64_up_to_cond_1e10(problem):
    with jax.enable_x64(True):
        run_case(*problem, np.float64, max_cond=1e10, tol_grad=1e-9, tol_rho=1e-9)


@SETTINGS
@given(problems())
def test_float32_up_to_cond_1e6(problem):
    run_case(*problem, np.float32, max_cond=1e6, tol_grad=1e-3, tol_rho=1e-3)


@SETTINGS
@given(st.integers(1, 30), st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_streaming_any_split_equals_one_shot(seed, sizes):
    with jax.enable_x64(True):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(sum(sizes), 3)), rng.normal(size=(sum(sizes), 2))
        s = jm.init_stats(3, 2, 1)
        for lo, hi in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True):
            s = jm.update_stats(s, x[lo:hi], y[lo:hi], 0)
        one = jm.layer_stats([x], [y])
        for a, b in zip(jm.normalize_stats(s), one, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_psd_solve_singular_matrices_give_min_norm(dtype):
    """Rank-deficient PSD systems of every rank, against numpy's pseudo-inverse."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(dtype == "float64"):
        for rank in range(0, 6):
            b = rng.normal(size=(6, rank))
            h = (b @ b.T).astype(dtype)
            f = (h @ rng.normal(size=(6, 2))).astype(dtype)
            x, status, _ = jm.psd_solve(h, f)
            ref = np.linalg.pinv(h.astype(np.float64), rcond=1e-6) @ f.astype(np.float64)
            tol = 1e-3 if dtype == "float32" else 1e-9
            np.testing.assert_allclose(x, ref, atol=tol * max(1, np.abs(ref).max()))
            expected = jm.SolveStatus.CHOLESKY if rank == 6 else jm.SolveStatus.PSEUDO_INVERSE
            assert int(status) == expected


SCRIPT = """
import numpy as np, jaxmerge as jm
rng = np.random.default_rng(7)
xs = [rng.normal(size=(50, 16)).astype(np.float32) for _ in range(3)]
w0 = rng.normal(size=(16, 8)).astype(np.float32)
fts = [(w0 + rng.normal(size=(16, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32))
       for _ in range(3)]
ys = [x @ w + b for x, (w, b) in zip(xs, fts)]
stats = jm.layer_stats(xs, ys)
out = []
for basis in ["scalar", "diagonal", "full", jm.LowRank(3)]:
    sol = jm.solve_layer(stats, (w0, np.zeros(8, np.float32)), fts, basis=basis)
    out.append(np.asarray(sol.kernel).tobytes().hex() + np.asarray(sol.bias).tobytes().hex())
print("solve_layer", "|".join(out))
"""


def _determinism_jobs(item, tmp_path_factory):
    """Background jobs (see conftest.py): :data:`DETERMINISM` in two fresh processes, each
    compiling everything itself (no compilation cache shared between them)."""
    argv = [sys.executable, "-c", DETERMINISM]
    return {f"determinism/{run}": Job(argv, env=fresh_env(), expected=30.0) for run in range(2)}


two_runs = pytest.mark.background.with_args(_determinism_jobs)


def outputs(background, name):
    """The line ``name`` printed, of each of the two processes."""
    runs = []
    for run in range(2):
        proc = background.result(f"determinism/{run}")
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith(f"{name} ")]
        assert len(lines) == 1, proc.stdout[-2000:]
        runs.append(lines[0].split(" ", 1)[1])
    return runs


@two_runs
def test_bit_identical_across_runs(background):
    """Same inputs, two fresh processes: bit-identical merged parameters on CPU."""
    runs = outputs(background, "solve_layer")
    assert runs[0] == runs[1] and len(runs[0]) > 1000


def test_jitter_is_an_explicit_ridge(x64):
    """With ``jitter`` the failed factorisation is retried as (H/s + jitter·I) x = f/s."""
    rng = np.random.default_rng(3)
    b = rng.normal(size=(5, 3))
    h = b @ b.T  # rank 3 of 5: the plain factorisation fails
    f = h @ rng.normal(size=(5, 1))
    x, status, _ = jm.psd_solve(h, f, jitter=1e-3)
    assert int(status) == jm.SolveStatus.JITTERED
    s = np.mean(np.diag(h))
    np.testing.assert_allclose(x, np.linalg.solve(h / s + 1e-3 * np.eye(5), f / s), rtol=1e-9)
    x0, status0, _ = jm.psd_solve(h, f)  # default: exact minimum norm
    assert int(status0) == jm.SolveStatus.PSEUDO_INVERSE
    np.testing.assert_allclose(x0, np.linalg.pinv(h) @ f, rtol=1e-9, atol=1e-12)
    # A well-conditioned system never uses the jitter.
    _, status1, _ = jm.psd_solve(h + np.eye(5), f, jitter=1e-3)
    assert int(status1) == jm.SolveStatus.CHOLESKY


MERGE_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import jax, jax.numpy as jnp, numpy as np, jaxmerge as jm
from models import LinenMLP, finetunes
model = LinenMLP()
base = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
fts = finetunes(base, 3)
cal = [[jax.random.normal(jax.random.key(1 + k), (32, 5))] for k in range(3)]
out = []
for algorithm in ("parallel", "sequential"):
    merged, _ = jm.merge(model, base, fts, cal, algorithm=algorithm, progress=False)
    out += [np.asarray(leaf).tobytes().hex() for leaf in jax.tree.leaves(merged)]
print("merge", "|".join(out))
"""
# Both scripts in one process, each printing one line ``NAME HEX``: two fresh processes in all,
# not four (a JAX start-up and the shared programs' compilation each).
DETERMINISM = SCRIPT + MERGE_SCRIPT.format(tests=str(pathlib.Path(__file__).parent))


@two_runs
def test_whole_model_merge_bit_identical_across_runs(background):
    """An MLP merged (parallel and sequential) in two fresh processes: identical bits."""
    runs = outputs(background, "merge")
    assert runs[0] == runs[1] and len(runs[0]) > 1000
