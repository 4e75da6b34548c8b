"""Whole NNX models: the same answers as for linen, on NNX modules and states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import POS_MEAN, POS_UNSOLVED, NnxCNN, NnxMLP, NnxTransformer, finetunes, token_batch
from reference import augment, layer_matrix
from test_merge_linen import im2col_same3, regmean

from jaxmerge import UnsolvedParametersWarning, merge


def _params(model):
    return nnx.state(model, nnx.Param)


def test_nnx_mlp_parallel_is_numpy_regmean_and_returns_a_state(rng):
    model = NnxMLP(n_in=4, hidden=16, out=3, rngs=nnx.Rngs(0))  # the linen MLP's shapes
    base = _params(model)
    fts = finetunes(base, 2, 0.5)
    xs = [jnp.asarray(rng.normal(size=(64, 4)) + s, jnp.float32) for s in (-1.0, 1.0)]
    merged, report = merge(model, base, fts, [[x] for x in xs], progress=False)
    assert isinstance(merged, nnx.State)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    pure = [nnx.to_pure_dict(f) for f in fts]
    got = nnx.to_pure_dict(merged)

    def mat(p, i):
        return layer_matrix(p["layers"][i]["kernel"], p["layers"][i]["bias"])

    ys = [augment(x) @ mat(p, 0) for x, p in zip(xs, pure, strict=True)]
    np.testing.assert_allclose(mat(got, 0), regmean(xs, ys), rtol=1e-4, atol=1e-4)
    hs = [np.tanh(augment(x) @ mat(p, 0)) for x, p in zip(xs, pure, strict=True)]
    ys = [augment(h) @ mat(p, 1) for h, p in zip(hs, pure, strict=True)]
    np.testing.assert_allclose(mat(got, 1), regmean(hs, ys), rtol=1e-4, atol=1e-4)
    assert [r.path for r in report.layers] == ["layers/0", "layers/1"]
    # the model object itself is left untouched
    np.testing.assert_array_equal(
        model.layers[0].kernel[...], nnx.to_pure_dict(base)["layers"][0]["kernel"]
    )


def test_nnx_conv_is_regmean_on_patches(rng):
    model = NnxCNN(rngs=nnx.Rngs(0))
    base = _params(model)
    fts = finetunes(base, 2)
    xs = [jnp.asarray(rng.normal(size=(3, 6, 6, 2)), jnp.float32) for _ in range(2)]
    merged, report = merge(model, base, fts, [[x] for x in xs], progress=False)
    pure = [nnx.to_pure_dict(f) for f in fts]
    patches = [im2col_same3(x) for x in xs]

    def mat(p):
        return layer_matrix(np.reshape(p["conv1"]["kernel"], (18, 4)), p["conv1"]["bias"])

    ys = [augment(x) @ mat(p) for x, p in zip(patches, pure, strict=True)]
    got = mat(nnx.to_pure_dict(merged))
    np.testing.assert_allclose(got, regmean(patches, ys), rtol=1e-4, atol=1e-4)
    assert [r.kind for r in report.layers] == ["conv", "conv", "dense"]


@pytest.fixture(scope="module")
def transformer():
    model = NnxTransformer(rngs=nnx.Rngs(0))
    base = _params(model)
    fts = finetunes(base, 2, 0.2)
    cal = [[token_batch(1)], [token_batch(2, low=3)]]
    return model, base, fts, cal


def test_nnx_transformer_layers_and_shared_inputs(transformer):
    model, base, fts, cal = transformer
    with pytest.warns(UnsolvedParametersWarning, match=POS_UNSOLVED) as caught:
        merged, report = merge(model, base, fts, cal, progress=False)
    assert len(caught) == 1
    kinds = {r.path: r.kind for r in report.layers}
    assert kinds == {
        "embed": "embed", "ln1": "norm", "query": "dense_general", "key": "dense_general",
        "value": "dense_general", "out": "dense_general", "ln2": "norm", "up": "dense",
        "down": "dense", "ln_f": "norm", "head": "dense",
    }  # fmt: skip
    assert {r.path: r.shared_input for r in report.layers}["key"] == ("query", "value")
    assert report.fallbacks == {"pos": "mean"} and list(report.unsolved) == ["pos"]
    assert 0 < report.rho <= 1
    assert jax.tree.structure(merged) == jax.tree.structure(base)


def test_nnx_one_finetune_is_returned_exactly_by_the_sequential_merge(transformer):
    model, base, fts, cal = transformer
    merged, _ = merge(model, base, fts[:1], cal[:1], algorithm="sequential", fallback=POS_MEAN,
                      progress=False)  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, merged, fts[0])


def test_nnx_identical_finetunes_sequential(transformer):
    model, base, fts, cal = transformer
    merged, report = merge(
        model, base, [fts[0], fts[0]], cal, algorithm="sequential", fallback=POS_MEAN,
        progress=False,
    )  # fmt: skip
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4), merged, fts[0]
    )
    assert report.algorithm == "sequential" and all(r.seconds is None for r in report.layers[1:])


class _PerCallDropout(nnx.Module):
    """Linear, Dropout, Linear with the mode passed per call (MaxText's and EasyDeL's
    ``self.dropout(x, deterministic=deterministic)``), the Dropout's own attribute left False."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x, deterministic=True):
        return self.out(self.drop(jnp.tanh(self.lin(x)), deterministic=deterministic))


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_nnx_dropout_made_deterministic_per_call_merges_as_in_eval_mode(rng, algorithm):
    model = _PerCallDropout(nnx.Rngs(0))
    base = _params(model)
    fts = finetunes(base, 2)
    batches = [[jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)] for _ in range(2)]
    got, _ = merge(model, base, fts, batches, algorithm=algorithm, progress=False)
    model.eval()
    want, _ = merge(model, base, fts, batches, algorithm=algorithm, progress=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    # the same model asked for training mode in the call is refused with the layer named
    model.drop.deterministic = False
    with pytest.raises(ValueError, match=r"training mode: 'drop' \(Dropout, deterministic=False\)"):
        merge(model, base, fts, batches, algorithm=algorithm, progress=False,
              call_kwargs={"deterministic": False})  # fmt: skip
