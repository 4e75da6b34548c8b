"""Fisher merging on a tiny MLP against numpy: per-example gradients written out by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmerge as jm

N_IN, HIDDEN, CLASSES = 4, 5, 3


def init_mlp(rng, scale=1.0):
    return {
        "params": {
            "Dense_0": {
                "kernel": scale * rng.normal(size=(N_IN, HIDDEN)),
                "bias": scale * rng.normal(size=HIDDEN),
            },
            "Dense_1": {
                "kernel": scale * rng.normal(size=(HIDDEN, CLASSES)),
                "bias": scale * rng.normal(size=CLASSES),
            },
        }
    }


def loss_fn(params, batch):
    """Mean softmax cross-entropy of a tanh MLP."""
    p = params["params"]
    h = jnp.tanh(batch["x"] @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def numpy_fisher(params, batches):
    """(1/N) Σᵢ gᵢ², gᵢ the gradient of example i's cross-entropy, by the chain rule in numpy."""
    p = {name: {k: np.asarray(v) for k, v in d.items()} for name, d in params["params"].items()}
    total = {name: {k: np.zeros_like(v) for k, v in d.items()} for name, d in p.items()}
    count = 0
    for batch in batches:
        for x, y in zip(np.asarray(batch["x"]), np.asarray(batch["y"]), strict=True):
            h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
            logits = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
            prob = np.exp(logits - logits.max())
            prob /= prob.sum()
            d_logits = prob - np.eye(CLASSES)[y]
            d_pre = (p["Dense_1"]["kernel"] @ d_logits) * (1 - h**2)
            grads = {
                "Dense_0": {"kernel": np.outer(x, d_pre), "bias": d_pre},
                "Dense_1": {"kernel": np.outer(h, d_logits), "bias": d_logits},
            }
            for name in total:
                for k in total[name]:
                    total[name][k] += grads[name][k] ** 2
            count += 1
    return {"params": {n: {k: v / count for k, v in d.items()} for n, d in total.items()}}


def numpy_merge(models, fishers, weights, epsilon):
    """θ = Σₖ wₖ(Fₖ + δ)θₖ / Σₖ wₖ(Fₖ + δ), δ = ε · max(F) per tensor (1 if that max is 0)."""
    thetas, fs = [jax.tree.leaves(m) for m in models], [jax.tree.leaves(f) for f in fishers]
    out = []
    for i in range(len(thetas[0])):
        f = np.stack([np.asarray(fk[i]) for fk in fs])
        top = f.max()
        delta = epsilon * top if top > 0 else 1.0
        w = np.asarray(weights, np.float64).reshape(-1, *[1] * f[0].ndim) * (f + delta)
        out.append(np.sum(w * np.stack([t[i] for t in thetas]), 0) / np.sum(w, 0))
    return out


def task_data(rng, sizes, dead_input):
    batches = []
    for size in sizes:
        x = rng.normal(size=(size, N_IN))
        x[:, dead_input] = 0.0  # no gradient reaches row `dead_input` of Dense_0's kernel
        batches.append({"x": x, "y": rng.integers(0, CLASSES, size=size)})
    return batches


def test_empirical_fisher_is_per_example(x64, rng):
    params = init_mlp(rng)
    batches = task_data(rng, [3, 5, 1], dead_input=2)
    got = jm.empirical_fisher(loss_fn, params, batches)
    ref = numpy_fisher(params, batches)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(got["params"]["Dense_0"]["kernel"][2], 0.0)
    # Squared batch gradients would be a different quantity (the mean of per-example gradients).
    batch_grad = jax.grad(loss_fn)(params, batches[1])
    assert not np.allclose(
        got["params"]["Dense_1"]["bias"], batch_grad["params"]["Dense_1"]["bias"] ** 2
    )


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5]])
def test_fisher_merge_matches_numpy(x64, rng, weights):
    base = init_mlp(rng)
    models = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    data = [task_data(rng, sizes, dead_input=2) for sizes in ([4, 2], [6], [3, 3, 1])]
    merged = jm.fisher_merge(loss_fn, models, data, weights=weights)
    fishers = [numpy_fisher(m, d) for m, d in zip(models, data, strict=True)]
    w = np.ones(3) if weights is None else np.asarray(weights)
    ref = numpy_merge(models, fishers, w, 1e-8)
    for a, b in zip(jax.tree.leaves(merged), ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-11)
    # Where no model has Fisher information the merge is the plain weighted mean.
    dead = np.stack([m["params"]["Dense_0"]["kernel"][2] for m in models])
    np.testing.assert_allclose(
        merged["params"]["Dense_0"]["kernel"][2], w @ dead / w.sum(), rtol=1e-12
    )
    # Every entry is a convex combination of the fine-tunes' entries.
    for got, *thetas in zip(*map(jax.tree.leaves, [merged, *models]), strict=True):
        assert np.all(got >= np.min(thetas, 0) - 1e-12) and np.all(got <= np.max(thetas, 0) + 1e-12)


def test_fisher_average_jit_and_dtype(rng):
    models = [init_mlp(rng) for _ in range(2)]
    fishers = [jax.tree.map(lambda a: np.abs(a) ** 2, init_mlp(rng)) for _ in range(2)]
    f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    models, fishers = [f32(m) for m in models], [f32(f) for f in fishers]
    eager = jm.fisher_average(models, fishers, weights=[1.0, 2.0])
    jitted = jax.jit(jm.fisher_average)(models, fishers, weights=jnp.array([1.0, 2.0]))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6)
    ref = numpy_merge(models, fishers, [1.0, 2.0], 1e-8)
    for a, b in zip(jax.tree.leaves(eager), ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    bf16 = jm.fisher_average(
        [jax.tree.map(lambda a: a.astype(jnp.bfloat16), m) for m in models], fishers
    )
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(bf16))


def test_fisher_errors(rng):
    models = [init_mlp(rng) for _ in range(2)]
    data = [task_data(rng, [2], 0), task_data(rng, [2], 0)]
    with pytest.raises(ValueError, match="2 fine-tuned models but 1 sets of batches"):
        jm.fisher_merge(loss_fn, models, data[:1])
    with pytest.raises(ValueError, match="must return a scalar"):
        jm.empirical_fisher(lambda p, b: b["x"].sum(0), models[0], data[0])
    with pytest.raises(ValueError, match="no examples"):
        jm.empirical_fisher(loss_fn, models[0], [])
    with pytest.raises(ValueError, match="sharing a leading example axis"):
        jm.empirical_fisher(loss_fn, models[0], [{"x": np.zeros((2, N_IN)), "y": np.zeros(3)}])
    with pytest.raises(TypeError, match="'Dense_0/step' has dtype int"):
        jm.empirical_fisher(loss_fn, {"params": {"Dense_0": {"step": np.array(1)}}}, data[0])
    bad = [jax.tree.map(np.abs, m) for m in models]
    bad[1]["params"]["Dense_1"]["bias"] = np.array([1.0, np.nan, 0.0])
    with pytest.raises(ValueError, match=r"fishers\[1\] at 'Dense_1/bias' has negative or non"):
        jm.fisher_average(models, bad)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        jm.fisher_average(models, [jax.tree.map(np.abs, m) for m in models], epsilon=0.0)
