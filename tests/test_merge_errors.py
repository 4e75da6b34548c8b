"""Whole-model merges: bad input gives clear errors; dtypes, shardings and collections survive."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from models import LinenMLP, finetunes

from jaxmerge import UnsolvedParametersWarning, merge


@pytest.fixture(scope="module")
def mlp():
    model = LinenMLP(hidden=16, out=3)  # the shapes of the other MLP tests: compiled solves reused
    rng = np.random.default_rng(1)
    xs = [jnp.asarray(rng.normal(size=(64, 4)), jnp.float32) for _ in range(2)]
    base = model.init(jax.random.key(0), xs[0])["params"]
    return model, base, finetunes(base, 2), [[x] for x in xs]


def _replace(tree, path, value):
    tree = jax.tree.map(lambda a: a, tree)
    *head, last = path.split("/")
    node = tree
    for key in head:
        node = node[key]
    if value is None:
        del node[last]
    else:
        node[last] = value
    return tree


def test_mismatched_tree_names_the_parameter(mlp):
    model, base, fts, cal = mlp
    broken = _replace(fts[1], "Dense_1/bias", None)
    with pytest.raises(ValueError, match=r"finetuned\[1\].*Dense_1/bias"):
        merge(model, base, [fts[0], broken], cal, progress=False)


def test_mismatched_shape_names_the_parameter(mlp):
    model, base, fts, cal = mlp
    broken = _replace(fts[0], "Dense_0/kernel", jnp.zeros((5, 16)))
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' has shape \(5, 16\) in finetuned\[0\]"):
        merge(model, base, [broken, fts[1]], cal, progress=False)


def test_mismatched_dtype_names_the_parameter(mlp):
    model, base, fts, cal = mlp
    broken = _replace(fts[0], "Dense_1/bias", fts[0]["Dense_1"]["bias"].astype(jnp.float16))
    with pytest.raises(TypeError, match=r"'Dense_1/bias' has dtype float16 in finetuned\[0\]"):
        merge(model, base, [broken, fts[1]], cal, progress=False)


def test_empty_or_missing_calibration(mlp):
    model, base, fts, cal = mlp
    with pytest.raises(ValueError, match=r"calibration\[1\] is empty"):
        merge(model, base, fts, [cal[0], []], progress=False)
    with pytest.raises(ValueError, match="1 calibration iterables for 2 fine-tuned models"):
        merge(model, base, fts, cal[:1], progress=False)
    with pytest.raises(TypeError, match=r"calibration\[0\] must be an iterable of batches"):
        merge(model, base, fts, [cal[0][0], cal[1][0]], progress=False)


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_nonfinite_activations_name_the_layer(mlp, algorithm):
    model, base, fts, cal = mlp
    bad = cal[1][0].at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="non-finite activations at layer 'Dense_0'"):
        merge(model, base, fts, [cal[0], [bad]], algorithm=algorithm, progress=False)


def test_nonfinite_parameters_name_the_layer_they_reach(mlp):
    model, base, fts, cal = mlp
    # an Inf in a fine-tune's second layer shows up in that layer's targets
    broken = _replace(fts[1], "Dense_1/bias", fts[1]["Dense_1"]["bias"].at[0].set(jnp.inf))
    with pytest.raises(ValueError, match="non-finite activations at layer 'Dense_1' on task 1"):
        merge(model, base, [fts[0], broken], cal, progress=False)


def test_bad_options(mlp):
    model, base, fts, cal = mlp
    with pytest.raises(ValueError, match="algorithm must be"):
        merge(model, base, fts, cal, algorithm="greedy", progress=False)
    with pytest.raises(ValueError, match="fallback must be"):
        merge(model, base, fts, cal, fallback="median", progress=False)
    with pytest.raises(ValueError, match="layer 'Dense_1': unknown basis 'spectral'"):
        merge(model, base, fts, cal, basis={"Dense_1": "spectral"}, progress=False)
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
        merge(lambda x: x, base, fts, cal, progress=False)


def test_bf16_parameters_round_trip(mlp):
    model, base, fts, cal = mlp
    bf = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)  # noqa: E731
    merged, report = merge(model, bf(base), [bf(f) for f in fts], cal, progress=False)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(merged))
    ref, _ = merge(model, base, fts, cal, progress=False)  # float32 for comparison
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(np.float32(u), v, rtol=0.05, atol=0.05), merged, ref
    )
    assert report.layers[0].status == "CHOLESKY"


class _WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.BatchNorm(use_running_average=True)(nn.Dense(16)(x))
        return nn.Dense(3)(x)


def test_structure_dtypes_shardings_and_other_collections(rng):
    model = _WithBatchNorm()
    x = jnp.asarray(rng.normal(size=(64, 4)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    base = jax.tree.map(lambda a: jax.device_put(a, device), variables)
    base["params"]["Dense_1"]["bias"] = np.asarray(base["params"]["Dense_1"]["bias"])  # numpy leaf
    fts = finetunes(variables, 2)
    with pytest.warns(UnsolvedParametersWarning, match="^merge: 4 parameters the fine-tunes"):
        merged, report = merge(model, base, fts, [[x], [x + 1]], progress=False)
    assert report.unsolved == {
        **dict.fromkeys(("BatchNorm_0/bias", "BatchNorm_0/scale"),
                        "module class 'BatchNorm' (linen) is not a registered layer kind"),
        **dict.fromkeys(("batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"),
                        "in the linen collection 'batch_stats', not 'params': only parameters "
                        "of called layers are solved by output matching"),
    }  # fmt: skip
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    for got, like in zip(jax.tree.leaves(merged), jax.tree.leaves(base), strict=True):
        assert got.dtype == like.dtype and got.shape == like.shape
        assert isinstance(got, np.ndarray) == isinstance(like, np.ndarray)
        if isinstance(like, jax.Array):
            assert got.sharding == like.sharding
    assert set(report.fallbacks) == {
        "BatchNorm_0/scale", "BatchNorm_0/bias", "batch_stats/BatchNorm_0/mean",
        "batch_stats/BatchNorm_0/var",
    }  # fmt: skip
    np.testing.assert_allclose(
        merged["batch_stats"]["BatchNorm_0"]["mean"],
        (
            fts[0]["batch_stats"]["BatchNorm_0"]["mean"]
            + fts[1]["batch_stats"]["BatchNorm_0"]["mean"]
        )
        / 2,
        rtol=1e-6,
    )


class _TwoArgumentError(Exception):
    """A user's exception that cannot be rebuilt from one string."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code


class _TwoArgumentValueError(ValueError):
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


@pytest.mark.parametrize("kind", [_TwoArgumentError, _TwoArgumentValueError, ValueError])
def test_errors_of_a_callable_option_keep_the_original(mlp, kind):
    """An exception raised by a basis callable reaches the caller with its type and arguments
    and the layer added (as the message's prefix, or as a note where the type cannot be rebuilt
    from one string), never replaced by an error of jaxmerge's own error handling."""
    model, base, fts, cal = mlp

    def basis(path):
        raise kind("E42", "no basis here") if kind is not ValueError else kind("no basis here")

    with pytest.raises(kind) as info:
        merge(model, base, fts, cal, basis=basis, progress=False)
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", ())])
    assert "no basis here" in text and "basis callable failed for 'Dense_0'" in text, text
    if kind is _TwoArgumentError:
        assert info.value.code == "E42"
    if kind is ValueError:
        assert isinstance(info.value.__cause__, ValueError)  # the original, chained


def test_option_values_are_checked_before_the_model_runs(mlp):
    model, base, fts, cal = mlp
    wrong_width = [[jnp.ones((8, 5))], [jnp.ones((8, 5))]]  # would fail once the model runs
    for rcond in (-1.0, float("nan")):
        with pytest.raises(ValueError, match=r"merge: rcond must be None or a finite number ≥ 0"):
            merge(model, base, fts, wrong_width, rcond=rcond, progress=False)
    with pytest.raises(ValueError, match=r"merge: ridge for 'Dense_1' must be a number ≥ 0"):
        merge(model, base, fts, wrong_width, ridge={"Dense_1": float("nan")}, progress=False)


def test_a_numpy_scalar_ridge_is_a_number(mlp):
    model, base, fts, cal = mlp
    want, _ = merge(model, base, fts, cal, ridge={"Dense_0": 0.5}, progress=False)
    got, _ = merge(model, base, fts, cal, ridge={"Dense_0": np.float32(0.5)}, progress=False)
    jax.tree.map(np.testing.assert_array_equal, got, want)


_ON_TWO_DEVICES = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jaxmerge import merge
d0, d1 = jax.devices()
model, x = nn.Dense(2), jnp.arange(12.0).reshape(4, 3)
base = jax.device_put(model.init(jax.random.key(0), x)["params"], d0)
fts = [jax.tree.map(lambda a, s=s: a + s, base) for s in (0.1, -0.2)]
want, _ = merge(model, base, fts, [[x], [x + 1]], progress=False)
got, _ = merge(model, base, [fts[0], jax.device_put(fts[1], d1)], [[x], [x + 1]], progress=False)
assert all(a.devices() == {d0} for a in jax.tree.leaves(got)), got
jax.tree.map(np.testing.assert_array_equal, got, want)
far = [[jax.device_put(x, d1)], [jax.device_put(x + 1, d1)]]
for algorithm in ("parallel", "sequential"):
    want, _ = merge(model, base, fts, [[x], [x + 1]], algorithm=algorithm, progress=False)
    got, report = merge(model, base, fts, far, heldout=far, algorithm=algorithm, progress=False)
    assert all(a.devices() == {d0} for a in jax.tree.leaves(got)), got
    jax.tree.map(np.testing.assert_array_equal, got, want)
print("merged on", d0)
"""


def test_finetunes_and_batches_on_another_device_are_moved_to_the_base():
    """A fine-tune, or calibration and held-out batches, on another device than the base are
    merged as if they were on the base's: the merge is placed like the base, in both algorithms
    (two emulated CPU devices, in a subprocess)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2")
    out = subprocess.run([sys.executable, "-c", _ON_TWO_DEVICES], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "merged on" in out.stdout, out.stderr[-3000:]
