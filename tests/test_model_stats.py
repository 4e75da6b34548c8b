"""Whole-model statistics artifacts: per-task sums, save/load, combine.

Killing an accumulation and resuming it is tested through the command line (tests/test_cli.py).
"""

import cli_fixtures as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jaxmerge as jm


@pytest.fixture(scope="module")
def setup():
    base, finetuned = fx.make_params()
    return fx.model(), base, finetuned, fx.calibration()


def _numpy_sums(base_params, batches):
    """Plain sums of the last layer of the tiny MLP, in numpy: x̄ = [tanh(x W0 + b0), 1]."""
    p = jax.tree.map(np.asarray, base_params)
    gram, cross = 0, 0
    for x in batches:
        h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        xa = np.concatenate([h, np.ones((len(h), 1))], axis=1)
        y = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
        gram, cross = gram + xa.T @ xa, cross + xa.T @ y
    return gram, cross


def test_sums_match_numpy_and_normalize_like_collect_stats(setup):
    model, _, finetuned, calib = setup
    ms = jm.accumulate_model_stats(model, finetuned, calib, tasks=["a", "b"], progress=False)
    assert ms.tasks == ("a", "b")
    for k in range(2):
        gram, cross = _numpy_sums(finetuned[k], list(calib[k]))
        s = ms.sums["Dense_1"].stats
        np.testing.assert_allclose(s.gram[k], gram, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s.cross[k], cross, rtol=1e-5, atol=1e-4)
        assert s.count[k].tolist() == [fx.ROWS * fx.BATCHES if j == k else 0 for j in range(2)]
    # The weighted statistics are those of collect_stats, bit for bit.
    expected = jm.collect_stats(model, finetuned, calib, progress=False)
    got = ms.normalized()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].layers == expected[key].layers
        for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(expected[key]), strict=True):
            np.testing.assert_array_equal(a, b)


def test_save_load_roundtrip_and_refuse_overwrite(setup, tmp_path):
    model, _, finetuned, calib = setup
    ms = jm.accumulate_model_stats(model, finetuned, calib, progress=False)
    path = jm.save_model_stats(tmp_path / "s", ms)
    back = jm.load_model_stats(path)
    assert back.tasks == ms.tasks and list(back.sums) == list(ms.sums)
    for key in ms.sums:
        assert back.sums[key].layers == ms.sums[key].layers
        chex_equal = jax.tree.map(np.array_equal, back.sums[key].stats, ms.sums[key].stats)
        assert all(jax.tree.leaves(chex_equal))
    with pytest.raises(FileExistsError, match="exists"):
        jm.save_model_stats(tmp_path / "s", ms)
    jm.save_model_stats(tmp_path / "s", ms, overwrite=True)
    with pytest.raises(ValueError, match="not a jaxmerge model-statistics checkpoint"):
        jm.load_model_stats(jm.save_params(tmp_path / "p", {"w": jnp.ones(2)}))


def test_embeddings_roundtrip(tmp_path):
    class Bag(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.Dense(2)(nn.Embed(7, 3)(tokens).mean(axis=1))

    model = Bag()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 7, (4, 5)))
    params = model.init(jax.random.key(0), tokens)["params"]
    ms = jm.accumulate_model_stats(model, [params], [[tokens]], progress=False)
    assert [g.layers[0].kind for g in ms.sums.values()] == ["embed", "dense"]
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=7)
    np.testing.assert_array_equal(ms.sums["Embed_0"].stats.diag[0], counts)
    back = jm.load_model_stats(jm.save_model_stats(tmp_path / "s", ms))
    for key in ms.sums:
        assert type(back.sums[key].stats) is type(ms.sums[key].stats)
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back.sums[key], ms.sums[key])))


def test_runs_over_disjoint_batches_and_tasks_combine_to_the_whole(setup):
    model, _, finetuned, calib = setup
    whole = jm.accumulate_model_stats(model, finetuned, calib, progress=False)
    batches = [list(c) for c in calib]
    first = jm.accumulate_model_stats(model, finetuned, [b[:2] for b in batches], progress=False)
    rest = jm.accumulate_model_stats(model, finetuned, [b[2:] for b in batches], progress=False)
    both = jm.combine_model_stats(first, rest)
    for key in whole.sums:
        for a, b in zip(jax.tree.leaves(both.sums[key]), jax.tree.leaves(whole.sums[key]),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tasks"):
        jm.combine_model_stats(first, first._replace(tasks=("x", "y")))


def test_task_without_rows_is_named(setup):
    model, _, finetuned, calib = setup
    ms = jm.accumulate_model_stats(model, finetuned, calib, progress=False)
    empty = jax.tree.map(lambda a: a.at[1].set(0), ms.sums["Dense_0"].stats)
    broken = ms._replace(
        sums={**ms.sums, "Dense_0": jm.GroupStats(empty, ms.sums["Dense_0"].layers)}
    )
    with pytest.raises(
        ValueError, match="'task1' has no calibration rows at layer group 'Dense_0'"
    ):
        broken.normalized()
