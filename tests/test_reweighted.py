"""The merge QP subsumes the baselines: with the matching basis and ridge → ∞ it reproduces them,
with ridge 0 it never captures less energy than them; RegMean against a numpy formula."""

import jax
import numpy as np
import pytest
from flax import nnx
from reference import augment, layer_matrix

import jaxmerge as jm


def make_layer_problem(rng, k=3, n=6, m=4, rows=30, shared_inputs=False):
    """A Dense layer, K fine-tunes of it and per-task calibration inputs with their targets."""
    base = {"kernel": rng.normal(size=(n, m)), "bias": rng.normal(size=m)}
    fts = [
        {"kernel": base["kernel"] + 0.3 * rng.normal(size=(n, m)), "bias": base["bias"] + 0.1}
        for _ in range(k)
    ]
    x = rng.normal(size=(rows, n))
    xs = [x if shared_inputs else rng.normal(size=(rows + 5 * t, n)) * (1 + t) for t in range(k)]
    ys = [xi @ f["kernel"] + f["bias"] for xi, f in zip(xs, fts, strict=True)]
    return base, fts, jm.layer_stats(xs, ys), xs


def as_matrix(layer):
    if isinstance(layer, jm.LayerSolution):
        return layer_matrix(layer.kernel, layer.bias)
    return layer_matrix(layer["kernel"], layer["bias"])


def assert_same(got, want):
    """Equal up to a few roundings of the largest entry (float64)."""
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14 * np.abs(want).max())


TIES_OPTIONS = [
    {"trim": "tensor", "aggregate": "mean"},
    {"trim": "tensor", "aggregate": "sum"},
    {"trim": "model", "aggregate": "mean"},
    {"trim": "model", "aggregate": "sum"},
]


def approaches(solve, target):
    """Check ``solve(ridge)`` tends to ``target`` like 1/ridge as ridge → ∞."""
    gaps = [np.abs(as_matrix(solve(lam)) - target).max() for lam in (1e3, 1e5, 1e7)]
    assert gaps[0] > 10 * gaps[1] > 100 * gaps[2] > 0
    np.testing.assert_allclose(gaps[1] / gaps[2], 100, rtol=0.05)


# ---- ridge → ∞ reproduces the heuristics -------------------------------------------------------


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_qp_reproduces_soups(x64, rng, weights):
    base, fts, stats, _ = make_layer_problem(rng)
    w = np.ones(3) if weights is None else np.array(weights)
    soup = as_matrix(jm.soup(base, fts, weights=weights))
    qp = jm.solve_layer(stats, base, fts, basis="scalar", ridge=np.inf, prior=w / w.sum())
    assert_same(as_matrix(qp), soup)
    approaches(
        lambda r: jm.solve_layer(stats, base, fts, basis="scalar", ridge=r, prior=w / w.sum()),
        soup,
    )


@pytest.mark.parametrize("scale", [0.4, [0.2, -0.5, 1.5]])
@pytest.mark.parametrize("basis", ["scalar", "diagonal"])
def test_qp_reproduces_task_arithmetic(x64, rng, scale, basis):
    base, fts, stats, _ = make_layer_problem(rng)
    ta = as_matrix(jm.task_arithmetic(base, fts, scale=scale))
    qp = jm.solve_layer(stats, base, fts, basis=basis, ridge=np.inf, prior=np.asarray(scale))
    assert_same(as_matrix(qp), ta)
    approaches(
        lambda r: jm.solve_layer(stats, base, fts, basis=basis, ridge=r, prior=np.asarray(scale)),
        ta,
    )


@pytest.mark.parametrize("options", TIES_OPTIONS)
@pytest.mark.parametrize(("per_output", "scale"), [(False, 0.8), (True, [0.8, 0.3, 1.2])])
def test_qp_reproduces_ties(x64, rng, options, per_output, scale):
    base, fts, stats, _ = make_layer_problem(rng)
    ties = as_matrix(jm.ties(base, fts, density=0.3, scale=scale, **options))

    def solve(ridge):
        return jm.ties_layer(
            stats,
            base,
            fts,
            density=0.3,
            scale=scale,
            per_output=per_output,
            ridge=ridge,
            **options,
        )

    exact = solve(np.inf)
    assert_same(as_matrix(exact), ties)
    np.testing.assert_array_equal(
        exact.coefficients, np.broadcast_to(scale, exact.coefficients.shape)
    )
    approaches(solve, ties)
    # The same through solve_layer with the processed task vectors as a Custom basis.
    dirs = jm.ties_task_vectors(base, fts, density=0.3, **options)
    custom = jm.solve_layer(
        stats, base, fts, basis=jm.Custom(dirs, per_output), ridge=np.inf, prior=np.asarray(scale)
    )
    assert_same(as_matrix(custom), ties)


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("per_output", [False, True])
def test_qp_reproduces_dare(x64, rng, merge, per_output):
    base, fts, stats, _ = make_layer_problem(rng)
    key = jax.random.key(11)
    dare = as_matrix(jm.dare(base, fts, key, drop_rate=0.7, scale=0.5, merge=merge))

    def solve(ridge):
        return jm.dare_layer(
            stats,
            base,
            fts,
            key,
            drop_rate=0.7,
            scale=0.5,
            merge=merge,
            per_output=per_output,
            ridge=ridge,
        )

    assert_same(as_matrix(solve(np.inf)), dare)
    approaches(solve, dare)


def test_full_qp_with_a_shared_gram_is_the_soup(x64, rng):
    base, fts, stats, _ = make_layer_problem(rng, shared_inputs=True)
    full = jm.solve_layer(stats, base, fts, basis="full")
    np.testing.assert_allclose(as_matrix(full), as_matrix(jm.soup(base, fts)), rtol=1e-10)
    assert int(full.status) == jm.SolveStatus.CHOLESKY


# ---- RegMean -------------------------------------------------------------------------------


def regmean_numpy(xs, fts, alpha, weights=None):
    """W̄ = (Σₖ Gₖ^α)⁻¹ Σₖ Gₖ^α W̄ₖ, Gₖ = wₖ X̃ₖᵀX̃ₖ, G^α = αG + (1 − α)Diag(G)."""
    lhs, rhs = 0.0, 0.0
    for k, (x, f) in enumerate(zip(xs, fts, strict=True)):
        xa = augment(x)
        g = (1.0 / len(xa) if weights is None else weights[k]) * xa.T @ xa
        g = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        lhs, rhs = lhs + g, rhs + g @ as_matrix(f)
    return np.linalg.solve(lhs, rhs)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_regmean_matches_numpy(x64, rng, alpha):
    base, fts, stats, xs = make_layer_problem(rng, n=5, m=3)
    sol = jm.regmean_layer(stats, base, fts, alpha=alpha)
    np.testing.assert_allclose(as_matrix(sol), regmean_numpy(xs, fts, alpha), rtol=1e-10)
    # RegMean(α) is the full basis in the α metric.
    full = jm.solve_layer(stats, base, fts, basis="full", alpha=alpha)
    np.testing.assert_array_equal(sol.kernel, full.kernel)
    # The paper's token sums instead of per-task means: weights wₖ = 1.
    ys = [x @ f["kernel"] + f["bias"] for x, f in zip(xs, fts, strict=True)]
    summed = jm.layer_stats(xs, ys, weights=[1.0] * 3)
    np.testing.assert_allclose(
        as_matrix(jm.regmean_layer(summed, base, fts, alpha=alpha)),
        regmean_numpy(xs, fts, alpha, weights=[1.0] * 3),
        rtol=1e-10,
    )


def test_regmean_alpha_one_is_the_exact_projection(x64, rng):
    base, fts, stats, _ = make_layer_problem(rng)
    sol = jm.regmean_layer(stats, base, fts, alpha=1.0)
    other = jm.regmean_layer(stats, base, fts, alpha=0.5)
    assert float(sol.energy_fraction) > float(other.energy_fraction)
    with pytest.raises(ValueError, match="alpha must lie in"):
        jm.regmean_layer(stats, base, fts, alpha=1.5)


# ---- the QP over a heuristic's directions captures at least the heuristic's energy ----------


@pytest.mark.parametrize("seed", range(3))
def test_reweighting_never_loses_energy(x64, seed):
    rng = np.random.default_rng(seed)
    base, fts, stats, _ = make_layer_problem(rng)
    key = jax.random.key(seed)
    for per_output in (False, True):
        for options in TIES_OPTIONS:
            heuristic = jm.ties(base, fts, density=0.3, **options)
            rho_h = float(jm.energy_fraction(stats, base, heuristic))
            sol = jm.ties_layer(stats, base, fts, density=0.3, per_output=per_output, **options)
            assert float(sol.energy_fraction) >= rho_h - 1e-12
            assert float(sol.energy_fraction) > rho_h + 1e-3  # and here strictly better
        for merge in ("task_arithmetic", "ties"):
            heuristic = jm.dare(base, fts, key, drop_rate=0.5, merge=merge)
            rho_h = float(jm.energy_fraction(stats, base, heuristic))
            sol = jm.dare_layer(
                stats, base, fts, key, drop_rate=0.5, merge=merge, per_output=per_output
            )
            assert float(sol.energy_fraction) >= rho_h - 1e-12
        # A moderate ridge lies in between.
        mid = jm.ties_layer(stats, base, fts, density=0.3, per_output=per_output, ridge=1.0)
        rho_h = float(jm.energy_fraction(stats, base, jm.ties(base, fts, density=0.3)))
        assert float(mid.energy_fraction) >= rho_h - 1e-12


# ---- whole-model factories -----------------------------------------------------------------


def model_problem(rng):
    """A two-layer parameter tree and the calibration statistics of its first layer."""
    shapes = {"Dense_0": (5, 4), "Dense_1": (4, 3)}

    def tree(scale, offset=None):
        out = {"params": {}}
        for name, (n, m) in shapes.items():
            layer = {"kernel": scale * rng.normal(size=(n, m)), "bias": scale * rng.normal(size=m)}
            if offset is not None:
                layer = jax.tree.map(np.add, offset["params"][name], layer)
            out["params"][name] = layer
        return out

    base = tree(1.0)
    fts = [tree(0.3, base) for _ in range(3)]
    xs = [rng.normal(size=(20 + t, 5)) for t in range(3)]
    ys = [
        x @ f["params"]["Dense_0"]["kernel"] + f["params"]["Dense_0"]["bias"]
        for x, f in zip(xs, fts, strict=True)
    ]
    return base, fts, jm.layer_stats(xs, ys)


def layer(tree, path="Dense_0"):
    return tree["params"][path]


def test_ties_basis_gives_whole_model_ties(x64, rng):
    base, fts, stats = model_problem(rng)
    scale = {"Dense_0": 0.6, "Dense_1": [0.1, 0.2, 0.3]}
    basis, prior = jm.ties_basis(base, fts, density=0.25, scale=scale, trim="model")
    merged = jm.ties(base, fts, density=0.25, scale=scale, trim="model")
    sol = jm.solve_layer(
        stats,
        layer(base),
        [layer(f) for f in fts],
        basis=basis("Dense_0"),
        prior=prior("Dense_0"),
        ridge=np.inf,
    )
    assert_same(as_matrix(sol), as_matrix(layer(merged)))
    # Whole-model trimming ranks across layers, so the layer alone gives other directions.
    alone = jm.ties_task_vectors(layer(base), [layer(f) for f in fts], density=0.25, trim="model")
    assert not np.array_equal(basis("Dense_0").directions[0]["kernel"], alone[0]["kernel"])
    np.testing.assert_array_equal(prior("Dense_1"), [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(prior("Dense_0"), [0.6] * 3)
    assert jm.ties_basis(base, fts, per_output=True).basis("Dense_1").per_output


def test_dare_basis_gives_whole_model_dare(x64, rng):
    base, fts, stats = model_problem(rng)
    key = jax.random.key(5)
    factory = jm.dare_basis(base, fts, key, drop_rate=0.5, scale=0.7, merge="ties")
    merged = jm.dare(base, fts, key, drop_rate=0.5, scale=0.7, merge="ties")
    sol = jm.solve_layer(
        stats,
        layer(base),
        [layer(f) for f in fts],
        basis=factory.basis("Dense_0"),
        prior=factory.prior("Dense_0"),
        ridge=np.inf,
    )
    assert_same(as_matrix(sol), as_matrix(layer(merged)))
    # Paths without the leading "params" also find the layer when the tree has none.
    bare = jm.dare_basis(base["params"], [f["params"] for f in fts], key, drop_rate=0.5)
    assert len(bare.basis("Dense_1").directions) == 3


def test_bases_take_nnx_states(rng):
    """An NNX model's states (list indices in the layer paths) give the bases: merged with an
    infinite ridge toward their priors they return TIES and DARE of the whole model."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])

        def __call__(self, x):
            return self.layers[1](jax.nn.relu(self.layers[0](x)))

    model = Net(nnx.Rngs(0))
    base = nnx.state(model, nnx.Param)
    fts = [jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype), base)
           for _ in range(2)]  # fmt: skip
    calib = [[rng.normal(size=(16, 4)).astype(np.float32)] for _ in fts]
    key = jax.random.key(1)
    for factory, want in (
        (jm.ties_basis(base, fts, density=0.5), jm.ties(base, fts, density=0.5)),
        (jm.dare_basis(base, fts, key, drop_rate=0.5), jm.dare(base, fts, key, drop_rate=0.5)),
    ):
        merged, _ = jm.merge(model, base, fts, calib, basis=factory.basis, prior=factory.prior,
                             ridge=np.inf, progress=False)  # fmt: skip
        for got, ref in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_factory_errors_name_the_path(rng):
    base, fts, _ = model_problem(rng)
    basis, prior = jm.ties_basis(base, fts)
    with pytest.raises(ValueError, match=r"no layer at path 'Dense_7'.*'Dense_0', 'Dense_1'"):
        basis("Dense_7")
    with pytest.raises(ValueError, match="no layer at path 'Dense_0/kernel/x'"):
        prior("Dense_0/kernel/x")
    _, prior = jm.ties_basis(base, fts, scale={"Dense_0": 1.0})
    with pytest.raises(ValueError, match="scale has no entry for layer 'Dense_1'"):
        prior("Dense_1")
