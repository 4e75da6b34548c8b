"""The sequential merge's two paths (one jitted pass over all tasks' examples as one batch, or
one pass per layer group over each task's batches) give the same merge, also for a model that
mixes the examples of a batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from reference import augment, layer_matrix

import jaxmerge
from jaxmerge import merge
from jaxmerge.model import sequential


class BatchCentred(nn.Module):
    """Subtracts the batch mean of its hidden layer: its examples are not independent."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(4)(x)
        return nn.Dense(2)(jnp.tanh(h - h.mean(0, keepdims=True)))


class Independent(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(4)(x)))


def _setup(model):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(12, 3)) + 1, rng.normal(size=(10, 3)) - 1]
    xs = [jnp.asarray(x, jnp.float32) for x in xs]
    base = model.init(jax.random.key(0), xs[0])["params"]
    fts = [
        jax.tree.map(lambda a: a + jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), base)
        for _ in range(2)
    ]
    return xs, base, fts


def _regmean(xs, ys):
    gram = sum(augment(x).T @ augment(x) / len(x) for x in xs)
    cross = sum(augment(x).T @ y / len(x) for x, y in zip(xs, ys, strict=True))
    return np.linalg.solve(gram, cross)


def _one_pass_programs(model):
    return [
        key
        for plan in jaxmerge.model.plan.PLANS.plans()
        if plan.model.module is model
        for key in plan.fns
        if key[0] == "sequential"
    ]


def test_batch_coupled_model_gets_the_per_task_sequential_merge(monkeypatch):
    """One batch per task would take the one-pass path, which runs both tasks' examples as one
    batch, so each task's hidden layer would be centred on the other task's examples too. The
    merge checks that the examples are independent and takes the per-task passes instead: the
    same merge as when the batches cannot be joined, and numpy's sequential RegMean."""
    model = BatchCentred()
    xs, base, fts = _setup(model)
    one, _ = merge(model, base, fts, [[x] for x in xs], algorithm="sequential", progress=False)
    with monkeypatch.context() as m:
        m.setattr(sequential, "_concatenable", lambda batches: False)
        apart, _ = merge(model, base, fts, [[x] for x in xs], algorithm="sequential",
                         progress=False)  # fmt: skip
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(apart), strict=True):
        np.testing.assert_array_equal(a, b)

    def hidden(w, x):  # the centred, squashed hidden layer of one batch
        h = augment(x) @ w
        return np.tanh(h - h.mean(0, keepdims=True))

    w0 = [layer_matrix(**f["Dense_0"]) for f in fts]
    w1 = [layer_matrix(**f["Dense_1"]) for f in fts]
    first = _regmean(xs, [augment(x) @ w for x, w in zip(xs, w0, strict=True)])
    np.testing.assert_allclose(layer_matrix(**one["Dense_0"]), first, rtol=1e-4, atol=1e-4)
    hs = [hidden(first, x) for x in xs]
    ys = [augment(hidden(w, x)) @ v for x, w, v in zip(xs, w0, w1, strict=True)]
    np.testing.assert_allclose(layer_matrix(**one["Dense_1"]), _regmean(hs, ys), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    assert not _one_pass_programs(model)


@pytest.mark.parametrize("model", [Independent()], ids=["independent"])
def test_independent_examples_keep_the_one_pass(model, monkeypatch):
    """A model whose examples are independent still takes the one jitted pass, and it agrees
    with the per-task passes."""
    xs, base, fts = _setup(model)
    one, _ = merge(model, base, fts, [[x] for x in xs], algorithm="sequential", progress=False)
    assert _one_pass_programs(model)
    with monkeypatch.context() as m:
        m.setattr(sequential, "_concatenable", lambda batches: False)
        apart, _ = merge(model, base, fts, [[x] for x in xs], algorithm="sequential",
                         progress=False)  # fmt: skip
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(apart), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
