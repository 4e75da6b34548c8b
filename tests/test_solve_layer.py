"""solve_layer against an independent brute force: explicit design matrices and numpy lstsq."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import layer_matrix, lstsq_merge, task_loss

import jaxmerge as jm


def make_problem(rng, k, n, m, rows=40, bias=True, scale=0.3, shift=True):
    """A random layer, K fine-tunes and per-task inputs with different statistics."""
    w0 = rng.normal(size=(n, m))
    b0 = rng.normal(size=m) if bias else None
    fts = []
    for _ in range(k):
        w = w0 + scale * rng.normal(size=(n, m))
        b = b0 + scale * rng.normal(size=m) if bias else None
        fts.append((w, b))
    xs = [rng.normal(size=(rows + 7 * t, n)) * (1 + t) + (t if shift else 0) for t in range(k)]
    ys = [x @ w + (0 if b is None else b) for x, (w, b) in zip(xs, fts, strict=True)]
    return (w0, b0), fts, xs, ys


def directions_for(basis, base, fts, m):
    """The basis directions in augmented coordinates, as the brute force sees them."""
    w0bar = layer_matrix(*base)
    deltas = [layer_matrix(*f) - w0bar for f in fts]
    if basis == "scalar":
        return deltas
    if basis == "diagonal":
        out = []
        for j, d in itertools.product(range(m), deltas):
            e = np.zeros_like(d)
            e[:, j] = d[:, j]
            out.append(e)
        return out
    if basis == "full":
        p = w0bar.shape[0]
        return [np.eye(p * m)[i].reshape(p, m) for i in range(p * m)]
    raise AssertionError(basis)


def as_pair(layer):
    return layer if layer[1] is not None else layer[0]


SHAPES = [(1, 4, 3), (2, 5, 3), (3, 6, 4), (4, 3, 7)]


@pytest.mark.parametrize("basis", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize(("k", "n", "m"), SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_bases_match_lstsq(x64, rng, basis, k, n, m, bias):
    base, fts, xs, ys = make_problem(rng, k, n, m, bias=bias)
    stats = jm.layer_stats(xs, ys)
    sol = jm.solve_layer(stats, as_pair(base), [as_pair(f) for f in fts], basis=basis)
    w0bar = layer_matrix(*base)
    c_ref, w_ref = lstsq_merge(xs, ys, w0bar, directions_for(basis, base, fts, m), bias=bias)
    got = layer_matrix(sol.kernel, sol.bias)
    np.testing.assert_allclose(got, w_ref, rtol=1e-6, atol=1e-9 * np.abs(w_ref).max())
    e0 = task_loss(xs, ys, w0bar, bias=bias)
    rho_ref = 1 - task_loss(xs, ys, w_ref, bias=bias) / e0
    np.testing.assert_allclose(float(sol.energy_base), e0, rtol=1e-6)
    np.testing.assert_allclose(float(sol.energy_fraction), rho_ref, rtol=1e-6, atol=1e-12)
    if basis == "scalar":
        np.testing.assert_allclose(sol.coefficients, c_ref, rtol=1e-6)
    if basis == "diagonal":
        np.testing.assert_allclose(np.asarray(sol.coefficients).ravel(), c_ref, rtol=1e-6)
    # Per output unit the K directions live in n (+1) dimensions: singular when K exceeds that.
    singular = basis == "diagonal" and k > n + bias
    expected = jm.SolveStatus.PSEUDO_INVERSE if singular else jm.SolveStatus.CHOLESKY
    assert int(sol.status) == expected


@pytest.mark.parametrize("per_output", [False, True])
def test_custom_matches_lstsq(x64, rng, per_output):
    base, fts, xs, ys = make_problem(rng, 3, 5, 4)
    dirs = [(rng.normal(size=(5, 4)), rng.normal(size=4)) for _ in range(2)]
    dirs.append(rng.normal(size=(5, 4)))  # a direction without a bias part
    sol = jm.solve_layer(
        jm.layer_stats(xs, ys), base, fts, basis=jm.Custom(dirs, per_output=per_output)
    )
    aug = [layer_matrix(*d) if isinstance(d, tuple) else layer_matrix(d, np.zeros(4)) for d in dirs]
    if per_output:
        ref_dirs = []
        for j, d in itertools.product(range(4), aug):
            e = np.zeros_like(d)
            e[:, j] = d[:, j]
            ref_dirs.append(e)
    else:
        ref_dirs = aug
    c_ref, w_ref = lstsq_merge(xs, ys, layer_matrix(*base), ref_dirs)
    np.testing.assert_allclose(layer_matrix(sol.kernel, sol.bias), w_ref, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sol.coefficients).ravel(), c_ref, rtol=1e-6)


def test_lowrank_is_optimal_rank_r(x64, rng):
    """LowRank(r) beats every other rank-r update (checked on the raw data) and its spectrum
    adds up to the full basis's captured energy."""
    base, fts, xs, ys = make_problem(rng, 3, 6, 5)
    stats = jm.layer_stats(xs, ys)
    full = jm.solve_layer(stats, base, fts, basis="full")
    w0bar = layer_matrix(*base)
    e0 = task_loss(xs, ys, w0bar)
    rhos = []
    for r in range(1, 6):
        sol = jm.solve_layer(stats, base, fts, basis=jm.LowRank(r))
        u = layer_matrix(sol.kernel, sol.bias) - w0bar
        assert np.linalg.matrix_rank(u, tol=1e-8) == r
        loss = task_loss(xs, ys, w0bar + u)
        np.testing.assert_allclose(float(sol.energy_fraction), 1 - loss / e0, rtol=1e-6)
        # Captured energy of the truncation is the sum of the r largest σᵢ².
        np.testing.assert_allclose(
            float(sol.energy_fraction) * e0, float(jnp.sum(sol.spectrum[:r])), rtol=1e-6
        )
        # Any other rank-r update — the truncated SVD in the plain metric, random ones — is worse.
        uf = layer_matrix(full.kernel, full.bias) - w0bar
        a, s, bt = np.linalg.svd(uf, full_matrices=False)
        plain = (a[:, :r] * s[:r]) @ bt[:r]
        assert task_loss(xs, ys, w0bar + plain) >= loss - 1e-9 * e0
        for _ in range(5):
            other = plain + 0.01 * rng.normal(size=(7, r)) @ rng.normal(size=(r, 5))
            assert task_loss(xs, ys, w0bar + other) >= loss - 1e-9 * e0
        rhos.append(float(sol.energy_fraction))
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(rhos))
    np.testing.assert_allclose(rhos[-1], float(full.energy_fraction), rtol=1e-9)
    np.testing.assert_allclose(
        float(jnp.sum(sol.spectrum)) / float(full.energy_base),
        float(full.energy_fraction),
        rtol=1e-9,
    )


@pytest.mark.parametrize("seed", range(5))
def test_energy_ordering(x64, seed):
    base, fts, xs, ys = make_problem(np.random.default_rng(seed), 3, 5, 4)
    stats = jm.layer_stats(xs, ys)
    rho = {
        b: float(jm.solve_layer(stats, base, fts, basis=b).energy_fraction)
        for b in ["scalar", "diagonal", "full"]
    }
    assert 0 <= rho["scalar"] <= rho["diagonal"] + 1e-12 <= rho["full"] + 2e-12 <= 1 + 3e-12
    assert rho["scalar"] < rho["full"]  # the problem is not degenerate


# ---- special cases ---------------------------------------------------------------------------


@pytest.mark.parametrize("basis", ["scalar", "diagonal", "full", jm.LowRank(4)])
def test_single_task_returns_the_finetune(x64, rng, basis):
    base, fts, xs, ys = make_problem(rng, 1, 6, 4)
    sol = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis=basis)
    np.testing.assert_allclose(sol.kernel, fts[0][0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sol.bias, fts[0][1], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(float(sol.energy_fraction), 1.0, atol=1e-9)


def test_shared_gram_gives_the_average(x64, rng):
    base, fts, _, _ = make_problem(rng, 3, 5, 4)
    x = rng.normal(size=(30, 5))
    xs = [x] * 3
    ys = [x @ w + b for w, b in fts]
    sol = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis="full")
    np.testing.assert_allclose(sol.kernel, np.mean([f[0] for f in fts], axis=0), rtol=1e-9)
    np.testing.assert_allclose(sol.bias, np.mean([f[1] for f in fts], axis=0), rtol=1e-9)


@pytest.mark.parametrize(("basis", "prior"), [("scalar", 0.3), ("diagonal", [0.2, 0.5, 0.9])])
def test_ridge_to_infinity_returns_the_prior(x64, rng, basis, prior):
    base, fts, xs, ys = make_problem(rng, 3, 5, 4)
    stats = jm.layer_stats(xs, ys)
    c0 = np.broadcast_to(prior, (4, 3) if basis == "diagonal" else (3,))
    exact = jm.solve_layer(stats, base, fts, basis=basis, ridge=np.inf, prior=prior)
    np.testing.assert_array_equal(exact.coefficients, c0)
    # The limit: ‖c(λ) − c₀‖ shrinks like 1/λ.
    gaps = [
        np.abs(
            jm.solve_layer(stats, base, fts, basis=basis, ridge=lam, prior=prior).coefficients - c0
        ).max()
        for lam in (1e2, 1e4, 1e6)
    ]
    assert gaps[0] > 10 * gaps[1] > 100 * gaps[2] > 0
    np.testing.assert_allclose(gaps[1] / gaps[2], 100, rtol=0.05)


def test_ridge_full_basis_toward_a_prior_layer(x64, rng):
    base, fts, xs, ys = make_problem(rng, 3, 5, 4)
    stats = jm.layer_stats(xs, ys)
    soup = (np.mean([f[0] for f in fts], 0), np.mean([f[1] for f in fts], 0))
    sol = jm.solve_layer(stats, base, fts, basis="full", ridge=np.inf, prior=soup)
    np.testing.assert_allclose(sol.kernel, soup[0], rtol=1e-12)
    near = jm.solve_layer(stats, base, fts, basis="full", ridge=1e8, prior=soup)
    np.testing.assert_allclose(near.kernel, soup[0], rtol=1e-6)
    # Ridge 0 is the projection; a moderate ridge lies in between in captured energy.
    rho = [
        float(jm.solve_layer(stats, base, fts, basis="full", ridge=r, prior=soup).energy_fraction)
        for r in (0.0, 1.0, np.inf)
    ]
    assert rho[0] >= rho[1] >= rho[2]


def test_regmean_alpha_matches_numpy(x64, rng):
    """α shrinks each task Gram's off-diagonal: W = (Σ Gₖ^α)⁻¹ Σ Gₖ^α Wₖ (RegMean, exact bias)."""
    base, fts, xs, ys = make_problem(rng, 3, 5, 4)
    stats = jm.layer_stats(xs, ys)
    for alpha in (0.0, 0.4, 1.0):
        lhs, rhs = 0, 0
        for x, f in zip(xs, fts, strict=True):
            xa = np.hstack([x, np.ones((len(x), 1))])
            g = xa.T @ xa / len(x)
            g = alpha * g + (1 - alpha) * np.diag(np.diag(g))
            lhs, rhs = lhs + g, rhs + g @ layer_matrix(*f)
        ref = np.linalg.solve(lhs, rhs)
        sol = jm.solve_layer(stats, base, fts, basis="full", alpha=alpha)
        np.testing.assert_allclose(layer_matrix(sol.kernel, sol.bias), ref, rtol=1e-9)
    # α = 0: the diagonal metric is an elementwise mean weighted by each task's input energy.
    g = np.stack([np.mean(np.hstack([x, np.ones((len(x), 1))]) ** 2, 0) for x in xs])
    w = np.stack([layer_matrix(*f) for f in fts])
    ref0 = np.einsum("ki,kim->im", g, w) / g.sum(0)[:, None]
    sol = jm.solve_layer(stats, base, fts, basis="full", alpha=0.0)
    np.testing.assert_allclose(layer_matrix(sol.kernel, sol.bias), ref0, rtol=1e-9)


# ---- singular problems: finite, minimum-norm, never NaN -------------------------------------


def assert_min_norm(sol, xs, ys, base, fts, basis, m, bias=True):
    c_ref, w_ref = lstsq_merge(
        xs, ys, layer_matrix(*base), directions_for(basis, base, fts, m), bias=bias
    )
    got = layer_matrix(sol.kernel, sol.bias)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, w_ref, rtol=1e-6, atol=1e-8)
    if basis != "full":
        np.testing.assert_allclose(
            np.asarray(sol.coefficients).ravel(), c_ref, rtol=1e-6, atol=1e-8
        )
    else:
        np.testing.assert_allclose(np.asarray(sol.coefficients).ravel(), c_ref, atol=1e-8)


@pytest.mark.parametrize("basis", ["scalar", "diagonal"])
def test_duplicate_finetunes(x64, rng, basis):
    base, fts, xs, ys = make_problem(rng, 2, 5, 4)
    fts = [fts[0], fts[0], fts[1]]
    xs, ys = [xs[0], xs[0] + 1, xs[1]], [ys[0], (xs[0] + 1) @ fts[0][0] + fts[0][1], ys[1]]
    sol = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis=basis)
    assert int(sol.status) == jm.SolveStatus.PSEUDO_INVERSE
    assert_min_norm(sol, xs, ys, base, fts, basis, 4)
    c = np.asarray(sol.coefficients).reshape(-1, 3)
    np.testing.assert_allclose(c[:, 0], c[:, 1], rtol=1e-9)  # min-norm splits evenly


@pytest.mark.parametrize("basis", ["scalar", "diagonal"])
def test_finetune_equal_to_base(x64, rng, basis):
    base, fts, xs, ys = make_problem(rng, 2, 5, 4)
    fts = [fts[0], base]
    ys[1] = xs[1] @ base[0] + base[1]
    sol = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis=basis)
    assert_min_norm(sol, xs, ys, base, fts, basis, 4)
    assert np.all(np.asarray(sol.coefficients).reshape(-1, 2)[:, 1] == 0)


def test_zero_input_columns(x64, rng):
    base, fts, xs, ys = make_problem(rng, 2, 5, 3)
    for x in xs:
        x[:, 2] = 0.0
    ys = [x @ w + b for x, (w, b) in zip(xs, fts, strict=True)]
    for basis in ("full", "diagonal", "scalar"):
        sol = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis=basis)
        assert_min_norm(sol, xs, ys, base, fts, basis, 3)
    # The unseen input row keeps the base's weights (its update has minimum norm: zero).
    np.testing.assert_allclose(
        jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis="full").kernel[2],
        base[0][2],
        rtol=1e-12,
    )


def test_fewer_samples_than_features(x64, rng):
    base, fts, _, _ = make_problem(rng, 2, 12, 3)
    xs = [rng.normal(size=(4, 12)), rng.normal(size=(3, 12))]  # 7 rows, 13 unknowns per output
    ys = [x @ w + b for x, (w, b) in zip(xs, fts, strict=True)]
    sol = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis="full")
    assert int(sol.status) == jm.SolveStatus.PSEUDO_INVERSE
    assert np.isinf(float(sol.condition))
    assert_min_norm(sol, xs, ys, base, fts, "full", 3)
    np.testing.assert_allclose(float(sol.energy_fraction), 1.0, atol=1e-9)
    low = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis=jm.LowRank(3))
    assert np.all(np.isfinite(low.kernel))


def test_all_identical_to_base_is_finite(x64, rng):
    base, _, xs, _ = make_problem(rng, 2, 4, 3)
    ys = [x @ base[0] + base[1] for x in xs]
    for basis in ("scalar", "diagonal", "full", jm.LowRank(2)):
        sol = jm.solve_layer(jm.layer_stats(xs, ys), base, [base, base], basis=basis)
        np.testing.assert_allclose(sol.kernel, base[0], rtol=1e-12)
        assert float(sol.energy_fraction) == 1.0 and float(sol.energy_base) == 0.0


def test_nonfinite_statistics_raise_or_report(rng):
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    xs[1][3, 2] = np.nan
    stats = jm.layer_stats(xs, ys)
    with pytest.raises(jm.SolveError, match=r"stats\.gram"):
        jm.solve_layer(stats, base, fts)
    sol = jm.solve_layer(stats, base, fts, throw=False)
    assert int(sol.status) == jm.SolveStatus.NONFINITE


def test_nonfinite_weights_named(rng):
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    stats = jm.layer_stats(xs, ys)
    fts[1] = (fts[1][0].copy(), fts[1][1])
    fts[1][0][0, 0] = np.inf
    with pytest.raises(jm.SolveError, match=r"finetuned\[1\]"):
        jm.solve_layer(stats, base, fts, basis="scalar")


# ---- dtypes, jit -----------------------------------------------------------------------------


@pytest.mark.parametrize("basis", ["scalar", "diagonal", "full", jm.LowRank(2)])
def test_float32_agrees_with_float64(rng, basis):
    base, fts, xs, ys = make_problem(rng, 3, 6, 4)
    with jax.enable_x64(True):
        ref = jm.solve_layer(jm.layer_stats(xs, ys), base, fts, basis=basis)
        ref_k = np.asarray(ref.kernel)
    f32 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)  # noqa: E731
    sol = jm.solve_layer(jm.layer_stats(f32(xs), f32(ys)), f32(base), f32(fts), basis=basis)
    assert sol.kernel.dtype == jnp.float32 and sol.energy_fraction.dtype == jnp.float32
    scale = np.abs(ref_k - base[0]).max()
    np.testing.assert_allclose(sol.kernel, ref_k, atol=1e-3 * scale)
    np.testing.assert_allclose(float(sol.energy_fraction), float(ref.energy_fraction), atol=1e-4)


@pytest.mark.parametrize("basis", ["scalar", "diagonal", "full", jm.LowRank(2)])
def test_solve_layer_under_jit(rng, basis):
    base, fts, xs, ys = make_problem(rng, 2, 5, 3)
    stats = jm.layer_stats(xs, ys)
    eager = jm.solve_layer(stats, base, fts, basis=basis)
    jitted = jax.jit(lambda s, b, f, r: jm.solve_layer(s, b, f, basis=basis, ridge=r))(
        stats, base, fts, 0.0
    )
    np.testing.assert_allclose(jitted.kernel, eager.kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jitted.energy_fraction, eager.energy_fraction, rtol=1e-5)


def test_flax_dense_params_are_layers(x64, rng):
    """A Flax Dense's {'kernel', 'bias'} dict is accepted as it is."""
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    as_dict = lambda w: {"kernel": w[0], "bias": w[1]}  # noqa: E731
    a = jm.solve_layer(jm.layer_stats(xs, ys), as_dict(base), [as_dict(f) for f in fts])
    b = jm.solve_layer(jm.layer_stats(xs, ys), base, fts)
    np.testing.assert_array_equal(a.kernel, b.kernel)


def test_energy_fraction_scores_any_merge(x64, rng):
    """ρ of arbitrary merges against the raw-data loss, including held-out data and ρ < 0."""
    base, fts, xs, ys = make_problem(rng, 3, 5, 4)
    half = [len(x) // 2 for x in xs]
    calib_x = [x[:h] for x, h in zip(xs, half, strict=True)]
    calib = jm.layer_stats(calib_x, [y[:h] for y, h in zip(ys, half, strict=True)])
    held_x = [x[h:] for x, h in zip(xs, half, strict=True)]
    held_y = [y[h:] for y, h in zip(ys, half, strict=True)]
    heldout = jm.layer_stats(held_x, held_y)
    sol = jm.solve_layer(calib, base, fts, basis="full")
    w0bar = layer_matrix(*base)
    e0 = task_loss(held_x, held_y, w0bar)
    merges = {
        "solved": (np.asarray(sol.kernel), np.asarray(sol.bias)),
        "soup": (np.mean([f[0] for f in fts], 0), np.mean([f[1] for f in fts], 0)),
        "far away": (base[0] + 5.0, base[1] - 5.0),
    }
    for name, merged in merges.items():
        want = 1 - task_loss(held_x, held_y, layer_matrix(*merged)) / e0
        got = float(jm.energy_fraction(heldout, base, merged))
        np.testing.assert_allclose(got, want, rtol=1e-9, err_msg=name)
    assert float(jm.energy_fraction(heldout, base, merges["far away"])) < 0
    assert float(jm.energy_fraction(heldout, base, base)) == 0.0
    # In-sample ρ of the solution is what solve_layer reported.
    np.testing.assert_allclose(
        float(jm.energy_fraction(calib, base, merges["solved"])),
        float(sol.energy_fraction),
        rtol=1e-9,
    )


# ---- throw=True on traced inputs -------------------------------------------------------------


def test_throw_eager_raises_public_solve_error(rng):
    """Outside jit, a NaN in the calibration raises jm.SolveError itself, naming the input."""
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    xs[0][1, 1] = np.nan
    stats = jm.layer_stats(xs, ys)
    with pytest.raises(jm.SolveError, match=r"NaN or Inf in stats\.gram") as info:
        jm.solve_layer(stats, base, fts, basis="full")
    assert type(info.value) is jm.SolveError
    assert info.value.__module__ == "jaxmerge"


@pytest.mark.parametrize("basis", ["scalar", "full"])
def test_throw_under_jit_raises_from_callback(rng, basis):
    """Under jit the check runs on the host: JAX raises a JaxRuntimeError with our message."""
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    xs[1][3, 2] = np.nan
    stats = jm.layer_stats(xs, ys)
    solve = jax.jit(lambda s, b, f: jm.solve_layer(s, b, f, basis=basis).kernel)
    with pytest.raises(
        jax.errors.JaxRuntimeError,
        match=r"SolveError: solve_layer: the merge would not be finite; NaN or Inf in "
        r"stats\.gram, stats\.cross, stats\.task_diag\. Check",
    ):
        jax.block_until_ready(solve(stats, base, fts))


def test_throw_under_jit_names_a_nonfinite_finetune(rng):
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    stats = jm.layer_stats(xs, ys)
    fts[1] = (fts[1][0].copy(), fts[1][1])
    fts[1][0][0, 0] = np.inf
    solve = jax.jit(lambda s, b, f: jm.solve_layer(s, b, f, basis="scalar").kernel)
    with pytest.raises(
        jax.errors.JaxRuntimeError, match=r"NaN or Inf in finetuned\[1\], directions\[1\]\. Check"
    ):
        jax.block_until_ready(solve(stats, base, fts))


def test_throw_under_jit_finite_inputs_unaffected(rng):
    """The traced check never fires on a finite problem, and the answer is the eager one."""
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    stats = jm.layer_stats(xs, ys)
    eager = jm.solve_layer(stats, base, fts)
    jitted = jax.jit(lambda s, b, f: jm.solve_layer(s, b, f))(stats, base, fts)
    np.testing.assert_allclose(jitted.kernel, eager.kernel, rtol=1e-5, atol=1e-6)
    assert int(jitted.status) == int(eager.status) == jm.SolveStatus.CHOLESKY


def test_throw_false_under_jit_returns_the_status(rng):
    base, fts, xs, ys = make_problem(rng, 2, 4, 3)
    xs[1][3, 2] = np.nan
    stats = jm.layer_stats(xs, ys)
    sol = jax.jit(lambda s, b, f: jm.solve_layer(s, b, f, throw=False))(stats, base, fts)
    assert int(sol.status) == jm.SolveStatus.NONFINITE
    assert not np.isfinite(np.asarray(sol.kernel)).any()


def test_throw_under_vmap_raises_solve_error(rng):
    """vmap without jit: the callback runs eagerly, so jm.SolveError itself comes out."""
    base, fts, xs, ys = make_problem(rng, 1, 3, 2)
    good = jm.layer_stats(xs, ys)
    bad = good._replace(gram=good.gram.at[0, 0].set(jnp.nan))
    batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), good, bad)
    solve = jax.vmap(lambda s: jm.solve_layer(s, base, fts).kernel)
    with pytest.raises(jm.SolveError, match=r"NaN or Inf in stats\.gram\. Check"):
        solve(batch)
    np.testing.assert_allclose(
        solve(jax.tree.map(lambda a: jnp.stack([a, a]), good))[1],
        jm.solve_layer(good, base, fts).kernel,
        rtol=1e-5,
        atol=1e-6,
    )
