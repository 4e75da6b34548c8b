"""Layers under Flax's lifted transforms, merged like any other layer and checked against numpy
least squares on activations recorded with numpy (float64)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
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


def _check_stack(layer, merged, fts, xs, algorithm, n=3):
    """Each of ``n`` stacked tanh blocks (``layer(params, i)``: its augmented weight) against
    numpy least squares: inputs are each fine-tune's own activations (parallel) or the merged
    model's (sequential), targets the fine-tune's outputs."""
    own, mine = list(xs), list(xs)
    for i in range(n):
        targets = [augment(h) @ layer(f, i) for h, f in zip(own, fts, strict=True)]
        inputs = own if algorithm == "parallel" else mine
        np.testing.assert_allclose(layer(merged, i), _lstsq(inputs, targets), rtol=TOL, atol=TOL)
        own = [np.tanh(t) for t in targets]
        mine = [np.tanh(augment(h) @ layer(merged, i)) for h in mine]


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

    _check_stack(layer, merged, fts, xs, algorithm)


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


# ---- NNX ----------------------------------------------------------------------------------------


class NBlock(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 4, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.dense(x))


@nnx.jit  # decorated at import, as training code does
def _jitted(block, x):
    return block(x)


def _pure_remat(block, x):
    """MaxText's unscanned remat: ``jax.checkpoint`` of a function of the split state, the
    layer merged inside (a copy) and its state written back."""
    graphdef, state = nnx.split(block)

    def pure(state, x):
        copy = nnx.merge(graphdef, state)
        return copy(x), nnx.state(copy)

    y, state = jax.checkpoint(pure)(state, x)
    nnx.update(block, state)
    return y


class NTwo(nnx.Module):
    """Two blocks, the second reading the first's output, called through ``how``."""

    def __init__(self, how):
        self.how = how
        self.b0, self.b1 = NBlock(nnx.Rngs(0)), NBlock(nnx.Rngs(1))

    def __call__(self, x):
        if self.how == "nnx.jit":
            return _jitted(self.b1, _jitted(self.b0, x))
        if self.how == "nnx.remat":
            run = nnx.remat(lambda block, x: block(x))
            return run(self.b1, run(self.b0, x))
        if self.how == "jax.checkpoint":
            return _pure_remat(self.b1, _pure_remat(self.b0, x))
        graphdef, state = nnx.split(self.b0)  # a copy through nnx.merge
        return self.b1(nnx.merge(graphdef, state)(x))


def _nnx_dense(p):
    return np.vstack([np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)])


@pytest.mark.parametrize("how", ["nnx.jit", "nnx.remat", "jax.checkpoint", "nnx.merge copy"])
@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_nnx_layers_under_jit_remat_and_copies_are_solved(x64, how, algorithm):
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(6, 4)) for _ in range(3)]
    model = NTwo(how)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    assert [r.path for r in report.layers] == ["b0/dense", "b1/dense"] and not report.unsolved

    def block(p, x):
        return np.tanh(augment(x) @ _nnx_dense(p))

    w0 = _lstsq(xs, [augment(x) @ _nnx_dense(f["b0"]["dense"])
                     for x, f in zip(xs, fts, strict=True)])  # fmt: skip
    np.testing.assert_allclose(_nnx_dense(merged["b0"]["dense"]), w0, rtol=TOL, atol=TOL)
    hidden = [block(f["b0"]["dense"], x) for x, f in zip(xs, fts, strict=True)]
    inputs = hidden if algorithm == "parallel" else [block(merged["b0"]["dense"], x) for x in xs]
    targets = [augment(h) @ _nnx_dense(f["b1"]["dense"]) for h, f in zip(hidden, fts, strict=True)]
    np.testing.assert_allclose(_nnx_dense(merged["b1"]["dense"]), _lstsq(inputs, targets),
                               rtol=TOL, atol=TOL)  # fmt: skip


class NStack(nnx.Module):
    """Three blocks stacked on ``axis`` of their parameters, run in order by ``how``:
    ``nnx.scan`` (axis 0), or MaxText's ``scan_layers``: ``jax.lax.scan`` of a
    ``jax.checkpoint``-ed body over the split parameters, the layer axis moved to the front
    first (``param_scan_axis``, 1 by default in MaxText)."""

    def __init__(self, how, axis=0):
        self.how, self.axis = how, axis

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NBlock(rngs)

        self.blocks = make(nnx.Rngs(0))
        if axis:
            for var in jax.tree.leaves(nnx.state(self.blocks, nnx.Param),
                                       is_leaf=lambda v: isinstance(v, nnx.Variable)):  # fmt: skip
                var.set_value(jnp.moveaxis(var[...], 0, axis))

    def __call__(self, x):
        if self.how == "nnx.scan":

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        params = jax.tree.map(lambda a: jnp.moveaxis(a, self.axis, 0), params)

        def body(x, p):
            return nnx.merge(graphdef, p, rest)(x), None

        return jax.lax.scan(jax.checkpoint(body), x, params)[0]


@pytest.mark.parametrize(("how", "axis"), [("nnx.scan", 0), ("jax.lax.scan", 1)])
@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_nnx_scanned_layers_are_solved_per_slice(x64, how, axis, algorithm):
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(8, 4)) for _ in range(3)]
    model = NStack(how, axis)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert base["blocks"]["dense"]["kernel"].shape[axis] == 3
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    assert [r.path for r in report.layers] == [f"blocks/dense[{i}]" for i in range(3)]

    def layer(p, i):
        dense = p["blocks"]["dense"]
        return _nnx_dense({k: np.take(np.asarray(v), i, axis) for k, v in dense.items()})

    _check_stack(layer, merged, fts, xs, algorithm)


class NHeads(nnx.Module):
    """Two heads stacked on axis 0, applied to one input with ``nnx.vmap`` at call time."""

    def __init__(self):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(4, 3, param_dtype=jnp.float64, rngs=rngs)

        self.heads = make(nnx.Rngs(0))

    def __call__(self, x):
        return nnx.vmap(lambda head, x: head(x), in_axes=(0, None), out_axes=0)(self.heads, x)


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_nnx_vmapped_layers_are_solved_per_slice(x64, algorithm):
    rng = np.random.default_rng(5)
    xs = [rng.normal(size=(8, 4)) for _ in range(3)]
    model = NHeads()
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[x] for x in xs], algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    rows = {r.path: r for r in report.layers}
    assert set(rows) == {"heads[0]", "heads[1]"} and rows["heads[0]"].shared_input == ("heads[1]",)
    for i in range(2):
        targets = [augment(x) @ _nnx_dense({k: np.asarray(v)[i] for k, v in f["heads"].items()})
                   for x, f in zip(xs, fts, strict=True)]  # fmt: skip
        merged_i = _nnx_dense({k: np.asarray(v)[i] for k, v in merged["heads"].items()})
        np.testing.assert_allclose(merged_i, _lstsq(xs, targets), rtol=TOL, atol=TOL)


@functools.partial(jax.checkpoint, static_argnums=(0,))  # transformed at import
def _checkpointed_at_import(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


class NNotInline(nnx.Module):
    """A block whose call cannot be captured or located: under a ``jax.checkpoint`` applied at
    import, or through a copy whose kernel is the block's kernel scaled."""

    def __init__(self, how):
        self.how, self.block = how, NBlock(nnx.Rngs(0))

    def __call__(self, x):
        graphdef, state = nnx.split(self.block)
        if self.how == "scaled copy":
            state = jax.tree.map(lambda a: 2 * a, state)
            return nnx.merge(graphdef, state)(x)
        return _checkpointed_at_import(graphdef, state, x)


@pytest.mark.parametrize(
    ("how", "reason"),
    [("scaled copy", "called through a copy (nnx.merge, nnx.scan, jax.lax.scan, ...) and its "
                     "'kernel' is computed from it other than by slicing"),
     ("import", "runs inside a JAX transform applied before the merge began")],
)  # fmt: skip
def test_nnx_layers_that_cannot_be_located_are_reported(x64, how, reason):
    model = NNotInline(how)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fts = [jax.tree.map(lambda a, k=k: a + 0.1 * k, base) for k in (1, 2)]
    x = jnp.ones((3, 4))
    with pytest.raises(jm.UnsolvedParametersError) as info:
        jm.merge(model, base, fts, [[x], [x]], strict=True, progress=False)
    assert reason in info.value.unsolved["block/dense/kernel"]
