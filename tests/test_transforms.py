"""Layers under Flax's lifted transforms, merged like any other layer and checked against numpy
least squares on activations recorded with numpy (float64)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import augment

import jaxmerge as jm

TOL = 1e-6


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(x.shape[-1], param_dtype=jnp.float64, name="dense")(x))


RematBlock = nn.remat(Block)  # transformed before any merge runs


class JitMethod(nn.Module):
    """Two blocks in a ``__call__`` under ``nn.jit`` (as Gemma's ``Transformer.__call__`` is)."""

    @functools.partial(nn.jit, static_argnames=("self",))
    @nn.compact
    def __call__(self, x):
        return Block(name="b1")(Block(name="b0")(x))


class Remat(nn.Module):
    """Blocks under ``nn.remat``: a class transformed at import and one at call time."""

    @nn.compact
    def __call__(self, x):
        return nn.remat(Block)(name="b1")(RematBlock(name="b0")(x))


class JitClass(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.jit(Block)(name="b1")(nn.jit(Block)(name="b0")(x))


def _dense(p):
    return np.vstack([np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)])


def _lstsq(xs, ys):
    a = np.vstack([augment(x) / np.sqrt(len(x)) for x in xs])
    b = np.vstack([y / np.sqrt(len(x)) for x, y in zip(xs, ys, strict=True)])
    return np.linalg.lstsq(a, b, rcond=None)[0]


@pytest.mark.parametrize("model", [JitMethod(), Remat(), JitClass()], ids=type)
@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_layers_under_jit_and_remat_are_solved(x64, model, algorithm):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(6, 4)) for _ in range(3)]
    base = model.init(jax.random.key(0), xs[0])["params"]
    model.apply({"params": base}, xs[0])  # nn.jit caches its trace on a first call
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    assert len(report.layers) == 2 and not report.unsolved
    (b0,), (b1,) = [[k for k in base if k.endswith(n)] for n in ("b0", "b1")]

    def block(p, x):
        return np.tanh(augment(x) @ _dense(p["dense"]))

    w0 = _lstsq(xs, [augment(x) @ _dense(f[b0]["dense"]) for x, f in zip(xs, fts, strict=True)])
    np.testing.assert_allclose(_dense(merged[b0]["dense"]), w0, rtol=TOL, atol=TOL)
    hidden = [block(f[b0], x) for x, f in zip(xs, fts, strict=True)]
    inputs = hidden if algorithm == "parallel" else [block(merged[b0], x) for x in xs]
    targets = [augment(h) @ _dense(f[b1]["dense"]) for h, f in zip(hidden, fts, strict=True)]
    np.testing.assert_allclose(_dense(merged[b1]["dense"]), _lstsq(inputs, targets),
                               rtol=TOL, atol=TOL)  # fmt: skip


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block(name="block")(x), None


class Scanned(nn.Module):
    """Three blocks under ``nn.scan``, parameters stacked on axis 0 (MaxText's
    ``scan_layers`` layout, in linen)."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=3)  # fmt: skip
        return layers(name="layers")(x, None)[0]


class Vmapped(nn.Module):
    """Two heads under ``nn.vmap`` reading the same input, parameters stacked on axis 1."""

    @nn.compact
    def __call__(self, x):
        heads = nn.vmap(nn.Dense, variable_axes={"params": 1}, split_rngs={"params": True},
                        in_axes=None, out_axes=0, axis_size=2)  # fmt: skip
        return heads(3, param_dtype=jnp.float64, name="heads")(x)


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_scanned_layers_are_solved_per_slice_into_the_stacked_leaf(x64, algorithm):
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(8, 4)) for _ in range(3)]
    model = Scanned()
    base = model.init(jax.random.key(0), xs[0])["params"]
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    assert [r.path for r in report.layers] == [f"layers/block/dense[{i}]" for i in range(3)]

    def layer(p, i):
        return _dense({k: v[i] for k, v in p["layers"]["block"]["dense"].items()})

    own = [x for x in xs]  # each fine-tune's own activations
    mine = [x for x in xs]  # the merged model's
    for i in range(3):
        targets = [augment(h) @ layer(f, i) for h, f in zip(own, fts, strict=True)]
        inputs = own if algorithm == "parallel" else mine
        np.testing.assert_allclose(layer(merged, i), _lstsq(inputs, targets), rtol=TOL, atol=TOL)
        own = [np.tanh(t) for t in targets]
        mine = [np.tanh(augment(h) @ layer(merged, i)) for h in mine]


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_vmapped_layers_are_solved_per_slice(x64, algorithm):
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(8, 4)) for _ in range(3)]
    model = Vmapped()
    base = model.init(jax.random.key(0), xs[0])["params"]
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    rows = {r.path: r for r in report.layers}
    assert set(rows) == {"heads[0]", "heads[1]"} and rows["heads[0]"].shared_input == ("heads[1]",)
    assert merged["heads"]["kernel"].shape == (4, 2, 3)
    for i in range(2):

        def head(p, i=i):
            return _dense({"kernel": p["heads"]["kernel"][:, i], "bias": p["heads"]["bias"][:, i]})

        targets = [augment(x) @ head(f) for x, f in zip(xs, fts, strict=True)]
        np.testing.assert_allclose(head(merged), _lstsq(xs, targets), rtol=TOL, atol=TOL)
