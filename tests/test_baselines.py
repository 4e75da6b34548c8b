"""Soups, task arithmetic, TIES, DARE on whole pytrees: hand-worked cases, numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm


def random_model(rng, scale=1.0, dtype=np.float64):
    return {
        "params": {
            "Dense_0": {
                "kernel": (scale * rng.normal(size=(4, 3))).astype(dtype),
                "bias": (scale * rng.normal(size=3)).astype(dtype),
            },
            "Dense_1": {"kernel": (scale * rng.normal(size=(3, 2))).astype(dtype)},
        }
    }


def models(rng, k=3):
    base = random_model(rng)
    fts = [jax.tree.map(np.add, base, random_model(rng, 0.3)) for _ in range(k)]
    return base, fts


def leaves(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def assert_trees_close(a, b, **kw):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **kw)


# ---- soups and task arithmetic -------------------------------------------------------------


def test_soups_are_averages(x64, rng):
    base, fts = models(rng)
    assert_trees_close(jm.soup(base, fts), jax.tree.map(lambda *a: np.mean(a, 0), *fts), rtol=1e-14)
    w = np.array([1.0, 2.0, 5.0])
    ref = jax.tree.map(lambda *a: np.tensordot(w / w.sum(), np.stack(a), 1), *fts)
    assert_trees_close(jm.soup(base, fts, weights=w), ref, rtol=1e-14)
    tau = jm.task_vectors(base, fts)
    assert_trees_close(tau[1], jax.tree.map(np.subtract, fts[1], base), rtol=1e-14)


def test_task_arithmetic_scales(x64, rng):
    base, fts = models(rng)
    taus = [jax.tree.map(np.subtract, f, base) for f in fts]

    def ref(lam_of):  # θ₀ + Σₖ λₖ(layer) τₖ, leaf by leaf
        out = {"params": {}}
        for layer, params in base["params"].items():
            lam = np.broadcast_to(lam_of(layer), (3,))
            out["params"][layer] = {
                name: value + sum(lam[k] * taus[k]["params"][layer][name] for k in range(3))
                for name, value in params.items()
            }
        return out

    assert_trees_close(jm.task_arithmetic(base, fts, scale=0.4), ref(lambda _: 0.4), rtol=1e-14)
    per_task = np.array([0.2, -0.5, 1.5])
    assert_trees_close(
        jm.task_arithmetic(base, fts, scale=per_task), ref(lambda _: per_task), rtol=1e-14
    )
    per_layer = {"Dense_0": 0.3, "Dense_1": per_task}
    assert_trees_close(
        jm.task_arithmetic(base, fts, scale=per_layer), ref(per_layer.__getitem__), rtol=1e-14
    )
    assert_trees_close(
        jm.task_arithmetic(base, fts, scale=per_layer.__getitem__),
        ref(per_layer.__getitem__),
        rtol=1e-14,
    )
    # A soup is task arithmetic with λₖ = wₖ / Σw.
    assert_trees_close(
        jm.soup(base, fts, weights=[1, 1, 2]),
        jm.task_arithmetic(base, fts, scale=np.array([0.25, 0.25, 0.5])),
        rtol=1e-13,
    )


# ---- TIES: a hand-worked case -----------------------------------------------------------------

# Base b = [1, 1, 1, 1] and c = [0, 0]; task vectors with density 0.5:
TAUS = [
    {"a": [3.0, -1.0, 0.5, 2.0], "c": [0.2, -0.1]},
    {"a": [2.0, 4.0, 1.0, -1.0], "c": [-0.3, 0.1]},
    {"a": [1.0, -3.0, -2.0, 0.5], "c": [0.5, 0.4]},
]
# trim="tensor" keeps 2 of 4 entries of "a" and 1 of 2 of "c" per task:
#   a: [3, 0, 0, 2], [2, 4, 0, 0], [0, -3, -2, 0]   sum [5, 1, -2, 2] → signs + + − +
#   c: [0.2, 0], [-0.3, 0], [0.5, 0]                sum [0.4, 0]      → signs + 0
#   agreeing: a₀ {3, 2}, a₁ {4}, a₂ {-2}, a₃ {2}; c₀ {0.2, 0.5}, c₁ none.
# trim="model" keeps 3 of 6 entries per task (ties at the threshold kept: task 2 keeps 4):
#   a: [3, -1, 0, 2], [2, 4, 1, -1], [1, -3, -2, 0]   sum [6, 0, -1, 1] → signs + 0 − +
#   c: all trimmed away (small next to "a": the reason per-tensor is the default).
HAND_TIES = {
    ("tensor", "mean"): ({"a": [2.5, 4.0, -2.0, 2.0], "c": [0.35, 0.0]}),
    ("tensor", "sum"): ({"a": [5.0, 4.0, -2.0, 2.0], "c": [0.7, 0.0]}),
    ("model", "mean"): ({"a": [2.0, 0.0, -2.0, 2.0], "c": [0.0, 0.0]}),
    ("model", "sum"): ({"a": [6.0, 0.0, -2.0, 2.0], "c": [0.0, 0.0]}),
}


@pytest.mark.parametrize(("trim", "aggregate"), list(HAND_TIES))
def test_ties_hand_worked(x64, trim, aggregate):
    base = {"a": np.ones(4), "c": np.zeros(2)}
    fts = [{n: base[n] + np.array(t[n]) for n in base} for t in TAUS]
    merged = jm.ties(base, fts, density=0.5, scale=0.5, trim=trim, aggregate=aggregate)
    expected = HAND_TIES[trim, aggregate]
    np.testing.assert_allclose(merged["a"], 1 + 0.5 * np.array(expected["a"]), rtol=1e-15)
    np.testing.assert_allclose(merged["c"], 0.5 * np.array(expected["c"]), rtol=1e-15, atol=0)
    # The processed task vectors add up to the merge's update.
    b = jm.ties_task_vectors(base, fts, density=0.5, trim=trim, aggregate=aggregate)
    np.testing.assert_allclose(sum(np.asarray(v["a"]) for v in b), expected["a"], rtol=1e-15)


def ties_reference(base, fts, density, trim, aggregate, scale):
    """TIES in plain numpy over a flat list of tensors, written from the paper's steps."""
    base_l = leaves(base)
    taus = [[f - b for f, b in zip(leaves(ft), base_l, strict=True)] for ft in fts]

    def trimmed(vecs):
        if trim == "tensor":
            out = []
            for v in vecs:
                r = max(1, round(density * v.size))
                thr = np.sort(np.abs(v).ravel())[::-1][r - 1]
                out.append(np.where(np.abs(v) >= thr, v, 0.0))
            return out
        flat = np.concatenate([np.abs(v).ravel() for v in vecs])
        thr = np.sort(flat)[::-1][max(1, round(density * flat.size)) - 1]
        return [np.where(np.abs(v) >= thr, v, 0.0) for v in vecs]

    taus = [trimmed(t) for t in taus]
    merged = []
    for i, b in enumerate(base_l):
        stack = np.stack([t[i] for t in taus])
        total = np.zeros_like(b)
        for idx in np.ndindex(b.shape):
            column = stack[(slice(None), *idx)]
            sign = np.sign(column.sum())
            chosen = [v for v in column if v * sign > 0]
            if chosen:
                total[idx] = np.mean(chosen) if aggregate == "mean" else np.sum(chosen)
        merged.append(b + scale * total)
    return merged


@pytest.mark.parametrize("trim", ["tensor", "model"])
@pytest.mark.parametrize("aggregate", ["mean", "sum"])
def test_ties_matches_numpy_reference(x64, rng, trim, aggregate):
    base, fts = models(rng, k=4)
    got = jm.ties(base, fts, density=0.4, scale=0.7, trim=trim, aggregate=aggregate)
    ref = ties_reference(base, fts, 0.4, trim, aggregate, 0.7)
    for x, y in zip(leaves(got), ref, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)


def test_ties_density_one_without_conflicts_is_task_arithmetic(x64, rng):
    base, _ = models(rng)
    step = jax.tree.map(np.abs, random_model(rng))  # every task moves every entry upward
    fts = [jax.tree.map(lambda a, s, c=c: a + c * s, base, step) for c in (1.0, 2.0)]
    assert_trees_close(
        jm.ties(base, fts, density=1.0, aggregate="sum"),
        jm.task_arithmetic(base, fts),
        rtol=1e-14,
    )
    assert_trees_close(jm.ties(base, fts, density=1.0), jm.soup(base, fts), rtol=1e-14)


def test_unchanged_finetunes_give_the_base(x64, rng):
    """Zero task vectors: every threshold is 0, no sign is elected, nothing is divided by 0."""
    base, _ = models(rng)
    for merged in (
        jm.ties(base, [base, base], trim="model"),
        jm.ties(base, [base, base], aggregate="sum"),
        jm.dare(base, [base, base], jax.random.key(0), drop_rate=0.5, merge="ties"),
    ):
        for got, want in zip(leaves(merged), leaves(base), strict=True):
            np.testing.assert_array_equal(got, want)


# ---- DARE ---------------------------------------------------------------------------------


def test_dare_hand_worked_fixed_masks(x64):
    base = {"w": np.zeros(4)}
    fts = [{"w": np.array([1.0, 2.0, 3.0, 4.0])}, {"w": np.array([-1.0, 2.0, 3.0, 4.0])}]
    masks = [{"w": np.array([1, 0, 1, 0])}, {"w": np.array([True, True, True, False])}]
    # Drop and rescale by 1/(1 − 0.5): [2, 0, 6, 0] and [-2, 4, 6, 0].
    ta = jm.dare_task_vectors(base, fts, masks, drop_rate=0.5)
    np.testing.assert_array_equal(ta[0]["w"], [2.0, 0.0, 6.0, 0.0])
    np.testing.assert_array_equal(ta[1]["w"], [-2.0, 4.0, 6.0, 0.0])
    # Then TIES: entry 0 has total 0 (no elected sign), entry 2 has two agreeing models.
    mean = jm.dare_task_vectors(base, fts, masks, drop_rate=0.5, merge="ties")
    np.testing.assert_array_equal(mean[0]["w"], [0.0, 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(mean[1]["w"], [0.0, 4.0, 3.0, 0.0])
    total = jm.dare_task_vectors(base, fts, masks, drop_rate=0.5, merge="ties", aggregate="sum")
    np.testing.assert_array_equal(total[1]["w"], [0.0, 4.0, 6.0, 0.0])


def test_dare_l1_rescale_hand_worked(x64):
    """``rescale="l1"`` (mergekit's): each tensor's kept entries scaled to the whole task
    vector's L1 norm; a tensor with nothing kept stays zero; then the same TIES merge."""
    base = {"w": np.zeros(4), "v": np.zeros(2)}
    fts = [{"w": np.array([1.0, 2.0, 3.0, 4.0]), "v": np.array([5.0, 6.0])},
           {"w": np.array([-1.0, 2.0, 3.0, 4.0]), "v": np.array([1.0, 1.0])}]  # fmt: skip
    masks = [{"w": np.array([1, 0, 1, 0]), "v": np.array([0, 0])},
             {"w": np.array([True, True, True, False]), "v": np.array([1, 1])}]  # fmt: skip
    ta = jm.dare_task_vectors(base, fts, masks, drop_rate=0.5, rescale="l1")
    # |τ₀|₁ = 10 over kept 1 + 3 = 4: ×2.5; |τ₁|₁ = 10 over kept 1 + 2 + 3 = 6: ×5/3
    np.testing.assert_allclose(ta[0]["w"], [2.5, 0.0, 7.5, 0.0], rtol=1e-14)
    np.testing.assert_allclose(ta[1]["w"], [-5 / 3, 10 / 3, 5.0, 0.0], rtol=1e-14)
    np.testing.assert_array_equal(ta[0]["v"], [0.0, 0.0])
    np.testing.assert_array_equal(ta[1]["v"], [1.0, 1.0])
    mean = jm.dare_task_vectors(base, fts, masks, drop_rate=0.5, merge="ties", rescale="l1")
    # entry 0: 2.5 − 5/3 > 0 elects +, only model 0 agrees; entry 2: both agree, mean 7.5/2
    np.testing.assert_allclose(mean[0]["w"], [2.5, 0.0, 3.75, 0.0], rtol=1e-14)
    merged = jm.dare(base, fts, jax.random.key(0), drop_rate=0.5, rescale="l1")
    drawn = jm.dare_masks(jax.random.key(0), base, 2, drop_rate=0.5)
    dirs = jm.dare_task_vectors(base, fts, drawn, drop_rate=0.5, rescale="l1")
    assert_trees_close(merged, jax.tree.map(lambda b, *d: b + sum(d), base, *dirs), rtol=1e-14)
    with pytest.raises(ValueError, match="rescale"):
        jm.dare_task_vectors(base, fts, masks, drop_rate=0.5, rescale="L1")


@pytest.mark.parametrize("merge", ["task_arithmetic", "ties"])
def test_dare_is_its_masks_and_reproducible(x64, rng, merge):
    base, fts = models(rng)
    key = jax.random.key(7)
    merged = jm.dare(base, fts, key, drop_rate=0.6, scale=0.8, merge=merge)
    masks = jm.dare_masks(key, base, 3, drop_rate=0.6)
    dirs = jm.dare_task_vectors(base, fts, masks, drop_rate=0.6, merge=merge)
    ref = jax.tree.map(lambda b, *d: b + 0.8 * sum(d), base, *dirs)
    assert_trees_close(merged, ref, rtol=1e-14)
    again = jm.dare(base, fts, jax.random.key(7), drop_rate=0.6, scale=0.8, merge=merge)
    for x, y in zip(leaves(merged), leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit
    other = jm.dare(base, fts, jax.random.key(8), drop_rate=0.6, scale=0.8, merge=merge)
    assert any(not np.array_equal(x, y) for x, y in zip(leaves(merged), leaves(other), strict=True))
    if merge == "task_arithmetic":  # every kept entry is τ/(1 − p), every other one 0
        for d, f, b, m in zip(
            leaves(dirs[1]), leaves(fts[1]), leaves(base), leaves(masks[1]), strict=True
        ):
            np.testing.assert_allclose(d, np.where(m, (f - b) / 0.4, 0.0), rtol=1e-14)


def test_dare_masks_rate_and_locality():
    base = {"big": jnp.zeros((200, 100)), "small": jnp.zeros(3)}
    masks = jm.dare_masks(jax.random.key(0), base, 2, drop_rate=0.3)
    n = 20_000
    kept = float(np.sum(masks[0]["big"]))
    assert abs(kept - 0.7 * n) < 5 * np.sqrt(n * 0.3 * 0.7)  # binomial, 5 σ
    assert not np.array_equal(masks[0]["big"], masks[1]["big"])  # tasks draw independently
    # A leaf's mask depends on its path and shape only, not on the rest of the tree.
    alone = jm.dare_masks(jax.random.key(0), {"big": jnp.zeros((200, 100))}, 2, drop_rate=0.3)
    np.testing.assert_array_equal(alone[1]["big"], masks[1]["big"])
    assert masks[0]["small"].dtype == jnp.bool_
    none = jm.dare_masks(jax.random.key(0), base, 1, drop_rate=0.0)
    assert all(bool(np.all(m)) for m in jax.tree.leaves(none))


# ---- jit, dtypes ------------------------------------------------------------------------------


METHODS = {
    "soup": lambda b, f, w: jm.soup(b, f, weights=w),
    "task_arithmetic": lambda b, f, w: jm.task_arithmetic(b, f, scale=w),
    "ties": lambda b, f, w: jm.ties(b, f, density=0.3, scale=w[0], trim="model"),
    "dare": lambda b, f, w: jm.dare(b, f, jax.random.key(3), drop_rate=0.5, scale=w),
    "dare_ties": lambda b, f, w: jm.dare(
        b, f, jax.random.key(3), drop_rate=0.5, scale=w, merge="ties", aggregate="sum"
    ),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_methods_under_jit(rng, name):
    base, fts = jax.tree.map(lambda a: np.asarray(a, np.float32), models(rng))
    w = jnp.array([0.5, 0.3, 0.2])
    eager = METHODS[name](base, fts, w)
    jitted = jax.jit(METHODS[name])(base, fts, w)
    assert jax.tree.structure(jitted) == jax.tree.structure(base)
    assert_trees_close(jitted, eager, rtol=1e-6, atol=1e-6)


def test_bfloat16_leaves_keep_their_dtype(rng):
    base, fts = models(rng)
    bf16 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.bfloat16))
    merged = jm.ties(bf16(base), [bf16(f) for f in fts], density=0.5)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(merged))
    f32 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float32))
    ref = jm.ties(f32(bf16(base)), [f32(bf16(f)) for f in fts], density=0.5)
    assert_trees_close(merged, bf16(ref), rtol=0, atol=0)  # computed in float32, rounded once


# ---- errors ---------------------------------------------------------------------------------


def test_errors_name_the_problem(rng):
    base, fts = models(rng, k=2)
    wrong = jax.tree.map(lambda a: a, fts[1])
    wrong["params"]["Dense_1"]["kernel"] = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"finetuned\[1\] parameter 'Dense_1/kernel' has shape"):
        jm.task_arithmetic(base, [fts[0], wrong])
    missing = {"params": {"Dense_0": fts[1]["params"]["Dense_0"]}}
    with pytest.raises(ValueError, match=r"finetuned\[1\].*missing \['Dense_1/kernel'\]"):
        jm.soup(base, [fts[0], missing])
    ints = jax.tree.map(lambda a: a, base)
    ints["params"]["step"] = np.array(3)
    with pytest.raises(TypeError, match=r"'step' has dtype int"):
        jm.task_vectors(ints, [ints])
    with pytest.raises(ValueError, match="non-empty sequence"):
        jm.soup(base, [])
    with pytest.raises(ValueError, match="density"):
        jm.ties(base, fts, density=0.0)
    with pytest.raises(ValueError, match="trim must be one of"):
        jm.ties(base, fts, trim="layer")
    with pytest.raises(ValueError, match="aggregate must be one of"):
        jm.ties_task_vectors(base, fts, aggregate="median")
    with pytest.raises(ValueError, match="no entry for layer 'Dense_1'"):
        jm.task_arithmetic(base, fts, scale={"Dense_0": 1.0})
    with pytest.raises(ValueError, match=r"shape \(3,\); expected a number or one value per task"):
        jm.task_arithmetic(base, fts, scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="nonnegative"):
        jm.soup(base, fts, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"drop_rate p must lie in \[0, 1\)"):
        jm.dare(base, fts, jax.random.key(0), drop_rate=1.0)
    with pytest.raises(TypeError, match="jax.random key"):
        jm.dare(base, fts, 0, drop_rate=0.5)
    with pytest.raises(ValueError, match=r"masks\[0\] does not have the base's structure"):
        jm.dare_task_vectors(base, fts, [{"w": 1}, {"w": 1}], drop_rate=0.5)
