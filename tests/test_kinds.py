"""Layer kinds: a user's own layer class, registered from outside the package, is merged by
output matching exactly like the built-in kinds (checked against numpy least squares on the
activations recorded by hand), in linen and NNX, parallel and sequential."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import finetunes

import jaxmerge as jm


class ScaledLinear(nn.Module):
    """A user's layer that is linear in its parameters: ``y = 2 x w + shift``."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), (x.shape[-1], self.features))
        shift = self.param("shift", nn.initializers.normal(0.5), (self.features,))
        return 2.0 * x @ w + shift


class UnregisteredScaledLinear(ScaledLinear):
    """The same layer under a class no kind covers."""


class NnxScaledLinear(nnx.Module):
    def __init__(self, n_in, n_out, *, rngs):
        self.w = nnx.Param(0.5 * jax.random.normal(rngs.params(), (n_in, n_out)))
        self.shift = nnx.Param(0.5 * jax.random.normal(rngs.params(), (n_out,)))

    def __call__(self, x):
        return 2.0 * x @ self.w[...] + self.shift[...]


class ScaledKind(jm.AffineKind):
    """The user's kind: parameter names and the map to ``W̄ = [2w; shift]`` and back."""

    name = "scaled_linear"
    kernel, bias = "w", "shift"

    def to_matrix(self, spec, params):
        return 2.0 * jnp.asarray(params["w"]), jnp.asarray(params["shift"])

    def from_matrix(self, spec, kernel, bias, like):
        return {"w": (kernel / 2.0).reshape(like["w"].shape), "shift": bias}


jm.register_kind(ScaledKind(), linen=[ScaledLinear], nnx=[NnxScaledLinear])


class Linen(nn.Module):
    head: type = ScaledLinear

    @nn.compact
    def __call__(self, x):
        return self.head(3)(jnp.tanh(nn.Dense(6)(x)))


class Nnx(nnx.Module):
    def __init__(self, *, rngs):
        self.hidden = nnx.Linear(4, 6, rngs=rngs)
        self.head = NnxScaledLinear(6, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x)))


def _lstsq(inputs, targets):
    """``argmin Σₖ (1/Nₖ) ‖[Xₖ, 1] W̄ − Yₖ‖²`` by numpy least squares on stacked, weighted rows."""
    rows = [np.sqrt(1.0 / len(x)) * np.hstack([x, np.ones((len(x), 1))]) for x in inputs]
    ys = [np.sqrt(1.0 / len(x)) * y for x, y in zip(inputs, targets, strict=True)]
    return np.linalg.lstsq(np.vstack(rows), np.vstack(ys), rcond=None)[0]


def _data():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(n, 4)).astype(np.float32) for n in (48, 64)]


def _flat(tree):
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v, np.float64)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_registered_user_kind_is_solved_like_numpy_lstsq(api, algorithm):
    xs = _data()
    if api == "linen":
        model = Linen()
        base = model.init(jax.random.key(0), xs[0])["params"]
        hidden, head = "Dense_0", "ScaledLinear_0"
    else:
        model = Nnx(rngs=nnx.Rngs(0))
        base = nnx.state(model, nnx.Param)
        hidden, head = "hidden", "head"
    fts = finetunes(base, 2)
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              progress=False)  # fmt: skip
    got = _flat(merged)
    ft = [_flat(f) for f in fts]

    def hidden_out(x, p):
        return np.tanh(x @ p[f"{hidden}/kernel"] + p[f"{hidden}/bias"])

    # the hidden Dense layer: inputs are the data, targets each fine-tune's own outputs
    pre = [x @ f[f"{hidden}/kernel"] + f[f"{hidden}/bias"] for x, f in zip(xs, ft, strict=True)]
    w_hidden = _lstsq(xs, pre)
    np.testing.assert_allclose(got[f"{hidden}/kernel"], w_hidden[:-1], rtol=2e-4, atol=2e-4)
    # the user's layer: its inputs are each fine-tune's activations (parallel) or the merged
    # hidden layer's (sequential); its targets each fine-tune's outputs, 2 h w + shift
    h_own = [hidden_out(x, f) for x, f in zip(xs, ft, strict=True)]
    inputs = h_own if algorithm == "parallel" else [hidden_out(x, got) for x in xs]
    targets = [2 * h @ f[f"{head}/w"] + f[f"{head}/shift"] for h, f in zip(h_own, ft, strict=True)]
    w_bar = _lstsq(inputs, targets)
    np.testing.assert_allclose(got[f"{head}/w"], w_bar[:-1] / 2, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(got[f"{head}/shift"], w_bar[-1], rtol=2e-4, atol=2e-4)
    layer = next(r for r in report.layers if r.path == head)
    assert layer.kind == "scaled_linear" and layer.status == "CHOLESKY"
    assert not any(p.startswith(head) for p in report.fallbacks)
    # and the merge differs from the mean of the fine-tunes it would otherwise fall back to
    assert not np.allclose(got[f"{head}/w"], (ft[0][f"{head}/w"] + ft[1][f"{head}/w"]) / 2)


def test_an_unregistered_class_falls_back_and_is_reported():
    xs = _data()
    model = Linen(head=UnregisteredScaledLinear)
    base = model.init(jax.random.key(0), xs[0])["params"]
    fts = finetunes(base, 2)
    head = "UnregisteredScaledLinear_0"
    subclass = (f"'{head}' (UnregisteredScaledLinear) is a subclass of test_kinds.ScaledLinear "
                "(kind 'scaled_linear'); registered classes match exactly")  # fmt: skip
    with pytest.warns(jm.UnsolvedParametersWarning, match=re.escape(subclass)) as caught:
        merged, report = jm.merge(model, base, fts, [[x] for x in xs], progress=False)
    assert len(caught) == 1
    assert set(report.unsolved) == {f"{head}/w", f"{head}/shift"}
    assert all(reason.startswith(subclass) for reason in report.unsolved.values())
    assert report.fallbacks[f"{head}/w"] == "mean"
    assert [r.path for r in report.layers] == ["Dense_0"]
    np.testing.assert_allclose(merged[head]["w"], (fts[0][head]["w"] + fts[1][head]["w"]) / 2)


def test_statistics_of_a_user_kind_save_and_load(tmp_path):
    xs = _data()
    model = Linen()
    base = model.init(jax.random.key(0), xs[0])["params"]
    stats = jm.accumulate_model_stats(model, finetunes(base, 2), [[x] for x in xs],
                                      progress=False)  # fmt: skip
    back = jm.load_model_stats(jm.save_model_stats(tmp_path / "stats", stats))
    group = back.sums["ScaledLinear_0"]
    assert group.layers[0].kind == "scaled_linear"
    saved = stats.sums["ScaledLinear_0"].stats
    for a, b in zip(jax.tree.leaves(group.stats), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)


def test_registry_errors_name_the_problem():
    with pytest.raises(TypeError, match=r"LayerKind"):  # (jaxmerge's check, or the type checker)
        jm.register_kind("dense")
    with pytest.raises(TypeError, match=r"register_kind: linen= takes flax\.linen.*Module classes"):
        jm.register_kind(ScaledKind(), linen=[NnxScaledLinear])
    with pytest.raises(ValueError, match=r"unknown layer kind 'nope'; registered kinds: .*'dense'"):
        jm.kind_of("nope")
    assert {"dense", "dense_general", "conv", "embed", "norm"} <= set(jm.kinds())
    assert (
        jm.linen_kind(nn.Dense) is jm.kind_of("dense") and jm.nnx_kind(nnx.Linear).name == "dense"
    )
