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
from jaxmerge._internal import tree_fingerprint


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
    with pytest.raises(ValueError, match="not a jaxmerge statistics checkpoint"):
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


def test_statistics_record_their_source_and_a_solve_checks_it(setup, tmp_path):
    model, base, finetuned, calib = setup
    ms = jm.accumulate_model_stats(model, finetuned, calib, tasks=["a", "b"], progress=False)
    # the source is a fingerprint of exactly these trees and batches: any bit changes it
    assert ms.source["finetuned"] == [tree_fingerprint(t) for t in finetuned]
    nudged = jax.tree.map(lambda a: a, finetuned[1])
    nudged["Dense_1"]["bias"] = np.nextafter(nudged["Dense_1"]["bias"], np.float32(9))
    assert tree_fingerprint(nudged) != ms.source["finetuned"][1]
    again = jm.accumulate_model_stats(model, finetuned, calib, tasks=["a", "b"], progress=False)
    assert again.source == ms.source
    other = [[2 * x for x in c] for c in calib]
    changed = jm.accumulate_model_stats(model, finetuned, other, progress=False)
    pairs = zip(changed.source["calibration"], ms.source["calibration"], strict=True)
    assert [c != d for c, d in pairs] == [True, True]
    back = jm.load_model_stats(jm.save_model_stats(tmp_path / "s", ms))
    assert back.source == ms.source

    # a solve from the ModelStats is the solve from its normalised statistics, bit for bit
    merged, _ = jm.solve_stats(back, base, finetuned, progress=False)
    plain, _ = jm.solve_stats(ms.normalized(), base, finetuned, progress=False)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, merged, plain)))

    swapped = finetuned[::-1]
    with pytest.raises(ValueError, match=r"task 0 \('a'\): recorded \w{12}, given \w{12} \(it is "
                       r"the tree of task 'b': swapped\?\)"):  # fmt: skip
        jm.solve_stats(back, base, swapped, progress=False)
    with pytest.raises(ValueError, match=r"task 1 \('b'\): recorded \w{12}, given \w{12}\."):
        jm.solve_stats(back, base, [finetuned[0], nudged], progress=False)
    with pytest.raises(ValueError, match=r"hold 2 tasks \['a', 'b'\] but 1 fine-tuned"):
        jm.solve_stats(back, base, finetuned[:1], progress=False)
    # accepted when asked (every layer is solved, so the solution is the statistics' alone)
    accepted, _ = jm.solve_stats(back, base, swapped, check_source=False, progress=False)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, accepted, merged)))
    with pytest.raises(ValueError, match="record no source"):
        jm.solve_stats(ms._replace(source=None), base, finetuned, progress=False)


def test_combining_checks_the_sources(setup):
    model, _, finetuned, calib = setup
    batches = [list(c) for c in calib]
    first = jm.accumulate_model_stats(model, finetuned, [b[:2] for b in batches], progress=False)
    rest = jm.accumulate_model_stats(model, finetuned, [b[2:] for b in batches], progress=False)
    both = jm.combine_model_stats(first, rest)
    assert both.source["calibration"] == [
        f + r for f, r in zip(first.source["calibration"], rest.source["calibration"], strict=True)
    ]
    with pytest.raises(ValueError, match="same calibration batches of task 'task0'"):
        jm.combine_model_stats(first, rest, first)
    swapped = jm.accumulate_model_stats(
        model, finetuned[::-1], [b[2:] for b in batches], progress=False
    )
    with pytest.raises(ValueError, match="part 1 was computed from other finetuned"):
        jm.combine_model_stats(first, swapped)
    assert jm.combine_model_stats(first, rest._replace(source=None)).source is None


def test_a_resume_with_other_finetunes_or_data_is_refused(setup, tmp_path):
    model, _, finetuned, calib = setup
    batches = [list(c) for c in calib]
    jm.accumulate_model_stats(model, finetuned, [b[:2] for b in batches], directory=tmp_path,
                              save_every=1, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"task-0 holds a state computed from other inputs "
                       r"\(finetuned: recorded \w{12}, now \w{12}\)"):  # fmt: skip
        jm.accumulate_model_stats(model, finetuned[::-1], batches, directory=tmp_path,
                                  progress=False)  # fmt: skip
    other = [[b[0], 2 * b[1], *b[2:]] for b in batches]
    with pytest.raises(ValueError, match="the first 2 batches differ"):
        jm.accumulate_model_stats(model, finetuned, other, directory=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"mask_key: recorded 'mask', now None"):
        jm.accumulate_model_stats(model, finetuned, batches, directory=tmp_path, mask_key=None,
                                  progress=False)  # fmt: skip
    # the same inputs resume, to the statistics of an uninterrupted run
    resumed = jm.accumulate_model_stats(model, finetuned, batches, directory=tmp_path,
                                        progress=False)  # fmt: skip
    whole = jm.accumulate_model_stats(model, finetuned, batches, progress=False)
    assert resumed.source == whole.source
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, resumed.sums, whole.sums)))


# Orbax's noise on reading a corrupted checkpoint (see tests/test_bad_inputs.py)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_unreadable_model_statistics_are_named(setup, tmp_path):
    """The loader shares load_stats' handling of torn records and missing arrays."""
    import shutil

    model, _, finetuned, calib = setup
    ms = jm.accumulate_model_stats(model, finetuned, calib, progress=False)
    good = jm.save_model_stats(tmp_path / "good", ms)
    torn = shutil.copytree(good, tmp_path / "torn")
    record = torn / "metadata" / "metadata"
    record.write_bytes(record.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"load_model_stats: .*torn is incomplete or corrupted"):
        jm.load_model_stats(torn)
    partial = shutil.copytree(good, tmp_path / "partial")
    shutil.rmtree(partial / "stats" / "d")
    with pytest.raises(ValueError, match=r"load_model_stats: .*partial is incomplete or corr"):
        jm.load_model_stats(partial)
    layer = jm.save_stats(tmp_path / "layer", {"d": ms.normalized()["Dense_0"].stats},
                          tasks=ms.tasks)  # fmt: skip
    with pytest.raises(ValueError, match=r"layer holds per-layer statistics; read it with "
                       r"jaxmerge.load_stats"):  # fmt: skip
        jm.load_model_stats(layer)
    with pytest.raises(ValueError, match=r"good holds the per-task sums of a whole model; read "
                       r"it with jaxmerge.load_model_stats"):  # fmt: skip
        jm.load_stats(good)
