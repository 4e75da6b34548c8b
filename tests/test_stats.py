"""LayerStats: sums checked against numpy, streaming = one-shot, masks, dtypes, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import augment

import jaxmerge as jm


def numpy_stats(xs, ys, weights=None):
    """The statistics written out with numpy, each task weighted 1/Nₖ by default."""
    gram = cross = out_sq = 0
    diag, count = [], []
    for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
        xa = augment(x)
        y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
        w = 1.0 / len(xa) if weights is None else weights[k]
        gram = gram + w * xa.T @ xa
        cross = cross + w * xa.T @ y
        out_sq = out_sq + w * np.sum(y**2, 0)
        diag.append(w * np.sum(xa**2, 0))
        count.append(len(xa))
    return gram, cross, out_sq, np.stack(diag), np.array(count, float)


def assert_stats_close(stats, ref, rtol):
    for name, got, want in zip(jm.LayerStats._fields, stats, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=rtol * 1e-3, err_msg=name)


def test_layer_stats_matches_numpy(x64, rng):
    xs = [rng.normal(size=(11, 4)), rng.normal(size=(3, 5, 4))]  # leading axes are flattened
    ys = [rng.normal(size=(11, 2)), rng.normal(size=(3, 5, 2))]
    assert_stats_close(jm.layer_stats(xs, ys), numpy_stats(xs, ys), 1e-12)
    w = [0.5, 2.0]
    assert_stats_close(jm.layer_stats(xs, ys, weights=w), numpy_stats(xs, ys, w), 1e-12)


def test_streaming_equals_one_shot(x64, rng):
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 3))
    x2, y2 = rng.normal(size=(17, 5)), rng.normal(size=(17, 3))
    one_shot = jm.layer_stats([x, x2], [y, y2])

    def stream(xb, yb, task, sizes):
        s = jm.init_stats(5, 3, 2)
        for lo, hi in zip(np.cumsum([0, *sizes[:-1]]), np.cumsum(sizes), strict=True):
            s = jm.update_stats(s, xb[lo:hi], yb[lo:hi], task)
        return jm.normalize_stats(s)

    streamed = jm.combine_stats(stream(x, y, 0, [7, 13, 10]), stream(x2, y2, 1, [1, 16]))
    assert_stats_close(streamed, one_shot, 1e-12)
    # Known weights given up front give the same statistics without normalising.
    s = jm.init_stats(5, 3, 2)
    s = jm.update_stats(s, x[:9], y[:9], 0, weight=1 / 30)
    s = jm.update_stats(s, x2, y2, 1, weight=1 / 17)
    s = jm.update_stats(s, x[9:], y[9:], 0, weight=1 / 30)
    assert_stats_close(s, one_shot, 1e-12)


def test_masked_rows_are_ignored(x64, rng):
    x, y = rng.normal(size=(4, 6, 3)), rng.normal(size=(4, 6, 2))
    mask = rng.random(size=(4, 6)) > 0.4
    masked = jm.update_stats(jm.init_stats(3, 2, 1), x, y, 0, mask=mask)
    kept = jm.update_stats(jm.init_stats(3, 2, 1), x[mask], y[mask], 0)
    assert_stats_close(masked, kept, 1e-12)
    assert float(masked.count[0]) == mask.sum()
    # NaN-free garbage in padded rows changes nothing either.
    x[~mask] = 1e6
    assert_stats_close(jm.update_stats(jm.init_stats(3, 2, 1), x, y, 0, mask=mask), kept, 1e-12)


def test_task_index_may_be_traced(x64, rng):
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    step = jax.jit(lambda s, t: jm.update_stats(s, x, y, t))
    s = step(jm.init_stats(3, 2, 3), jnp.int32(2))
    np.testing.assert_array_equal(s.count, [0, 0, 5])
    np.testing.assert_allclose(s.task_diag[2], np.sum(augment(x) ** 2, 0), rtol=1e-12)
    assert np.all(s.task_diag[:2] == 0)


def test_update_under_jit_matches_eager(rng):
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
    s0 = jm.init_stats(3, 2, 1)
    eager = jm.update_stats(s0, x, y, 0)
    jitted = jax.jit(jm.update_stats)(s0, x, y, 0)
    assert_stats_close(jitted, eager, 1e-6)


def test_bf16_inputs_accumulate_in_float32(rng):
    x = rng.normal(size=(64, 8)).astype(jnp.bfloat16)
    y = rng.normal(size=(64, 4)).astype(jnp.bfloat16)
    s = jm.update_stats(jm.init_stats(8, 4, 1), x, y, 0)
    assert s.gram.dtype == jnp.float32
    ref = numpy_stats([np.asarray(x, np.float64)], [np.asarray(y, np.float64)], [1.0])
    assert_stats_close(s, ref, 1e-5)  # the bf16 values are exact; only the sums round


def test_float32_default_float64_when_enabled(rng):
    assert jm.init_stats(2, 2, 1).gram.dtype == jnp.float32
    with jax.enable_x64(True):
        assert jm.init_stats(2, 2, 1).gram.dtype == jnp.float64
        x, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
        s64 = jm.layer_stats([x], [y])
    s32 = jm.layer_stats([x.astype(np.float32)], [y.astype(np.float32)])
    assert_stats_close(s32, s64, 1e-5)


def test_combine_is_associative_and_commutative(x64, rng):
    parts = [
        jm.update_stats(
            jm.init_stats(3, 2, 2), rng.normal(size=(5, 3)), rng.normal(size=(5, 2)), t % 2
        )
        for t in range(3)
    ]
    a = jm.combine_stats(jm.combine_stats(parts[0], parts[1]), parts[2])
    b = jm.combine_stats(parts[2], jm.combine_stats(parts[1], parts[0]))
    assert_stats_close(a, b, 1e-12)
    assert_stats_close(jm.combine_stats(a, jm.init_stats(3, 2, 2)), a, 0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda s: jm.update_stats(s, np.ones((2, 4)), np.ones((2, 2)), 0), r"x have shape"),
        (lambda s: jm.update_stats(s, np.ones((2, 3)), np.ones((2, 5)), 0), r"y have shape"),
        (lambda s: jm.update_stats(s, np.ones((2, 3)), np.ones((3, 2)), 0), r"leading"),
        (lambda s: jm.update_stats(s, np.ones((2, 3)), np.ones((2, 2)), 5), r"task 5"),
        (
            lambda s: jm.update_stats(s, np.ones((2, 3)), np.ones((2, 2)), 0, mask=np.ones(3)),
            r"mask has shape",
        ),
        (lambda s: jm.combine_stats(s, jm.init_stats(4, 2, 1)), r"field 'gram'"),
        (lambda s: jm.normalize_stats(s), r"exactly one task"),
        (lambda s: jm.layer_stats([], []), r"no tasks"),
        (lambda s: jm.init_stats(0, 2, 1), r"n_in"),
    ],
)
def test_bad_input_names_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call(jm.init_stats(3, 2, 1))


def test_integer_inputs_are_rejected():
    with pytest.raises(TypeError, match="floating"):
        jm.update_stats(jm.init_stats(3, 2, 1), np.ones((2, 3), int), np.ones((2, 2)), 0)
