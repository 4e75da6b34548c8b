"""Whole-model statistics as init/update/finish_task/finalize functions inside a user's own
compiled loop, against ``collect_stats`` on the same data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import LinenTransformer, finetunes, token_batch

import jaxmerge as jm


@pytest.fixture(scope="module")
def problem():
    model = LinenTransformer()
    batches = [[token_batch(3 * k + i) for i in range(3)] for k in range(2)]
    base = model.init(jax.random.key(0), **batches[0][0])["params"]
    return model, base, finetunes(base, 2), batches


def _stack(batches):
    return jax.tree.map(lambda *a: jnp.stack(a), *batches)


@pytest.mark.parametrize("inputs", [False, True])
def test_a_scan_inside_jit_equals_collect_stats(problem, inputs):
    """Each task's batches go through ``lax.scan`` of ``update`` inside one ``jax.jit``; the
    finished statistics equal ``collect_stats``'s (own activations, or a given tree's)."""
    model, base, fts, batches = problem
    tree = base if inputs else None
    collector = jm.stats_collector(model, fts, batches[0][0], inputs=tree)

    @jax.jit
    def task_sums(state, params, stacked, task):
        def step(state, batch):
            return collector.update(state, params, batch, task), None

        return jax.lax.scan(step, state, stacked)[0]

    state = collector.init()
    for k, task_batches in enumerate(batches):
        state = task_sums(state, fts[k], _stack(task_batches), k)
        state = collector.finish_task(state, fts[k], k)
    got = collector.finalize(state)
    ref = jm.collect_stats(model, fts, batches, inputs=tree, progress=False)
    assert list(got) == list(ref)
    for key in ref:
        assert got[key].layers == ref[key].layers
        for a, b in zip(jax.tree.leaves(got[key].stats), jax.tree.leaves(ref[key].stats),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_finish_task_names_a_layer_with_nonfinite_statistics(problem):
    model, base, fts, batches = problem
    collector = jm.stats_collector(model, fts, batches[0][0])
    bad = jax.tree.map(lambda a: a, fts[0])
    bad["block"]["up"]["kernel"] = bad["block"]["up"]["kernel"].at[0, 0].set(jnp.nan)
    state = collector.update(collector.init(), bad, batches[0][0], 0)
    with pytest.raises(ValueError, match=r"non-finite activations at layer 'block/up' on task 0"):
        collector.finish_task(state, bad, 0)
