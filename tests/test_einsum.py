"""Einsum layers (``nn.Einsum``, ``nnx.Einsum``, registered layers, grouped einsums,
``DenseGeneral`` with and without batch axes) and norms with offsets, against numpy least squares
on activations recorded with numpy (float64)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import augment

import jaxmerge as jm

TOL = 1e-6


def lstsq(xs, ys, bias=True):
    """The full-basis parallel merge: Σₖ ‖X̃ₖ W̄ − Yₖ‖² / Nₖ minimised by numpy.linalg.lstsq
    (``bias=False``: ``X`` without the constant column)."""
    xs = [augment(x) if bias else np.reshape(x, (-1, np.shape(x)[-1])) for x in xs]
    a = np.vstack([x / np.sqrt(len(x)) for x in xs])
    b = np.vstack([np.reshape(y, (len(x), -1)) / np.sqrt(len(x))
                   for x, y in zip(xs, ys, strict=True)])  # fmt: skip
    return np.linalg.lstsq(a, b, rcond=None)[0]


def close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err <= TOL, err


def perturbed(base, k, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape), base) for _ in range(k)]


def calibration(shape, k, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=shape)] for _ in range(k)]


def f64(x):
    return np.asarray(x, np.float64)


# ---- nn.Einsum with head axes: q, k, v in one einsum (Gemma's qkv_einsum) --------------------


class QKV(nn.Module):
    """One einsum producing q, k and v (``BTD,SNDH->SBTNH``) and a Dense on the same input."""

    @nn.compact
    def __call__(self, x):
        qkv = nn.Einsum((3, 2, 4, 5), "BTD,SNDH->SBTNH", name="qkv", param_dtype=jnp.float64)(x)
        gate = nn.Dense(3, name="gate", param_dtype=jnp.float64)(x)
        return qkv.sum() + gate.sum()


def _qkv_matrix(p):
    w, b = f64(p["kernel"]), f64(p["bias"])  # w (S, N, D, H), b (S, N, H)
    return np.vstack([np.transpose(w, (2, 0, 1, 3)).reshape(4, -1), b.reshape(1, -1)])


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_head_axes_einsum_is_least_squares_and_shares_its_input(x64, algorithm):
    model = QKV()
    cal = calibration((3, 6, 4), 3)
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = perturbed(base, 3)
    merged, report = jm.merge(model, base, fts, cal, algorithm=algorithm, progress=False)
    xs = [b[0] for b in cal]
    ys = []
    for x, f in zip(xs, fts, strict=True):
        y = np.einsum("btd,sndh->sbtnh", x, f64(f["qkv"]["kernel"]))
        y = y + f64(f["qkv"]["bias"])[:, None, None]
        ys.append(np.transpose(y, (1, 2, 0, 3, 4)).reshape(18, -1))
    close(_qkv_matrix(merged["qkv"]), lstsq(xs, ys))
    rows = {r.path: r for r in report.layers}
    assert rows["qkv"].kind == "einsum" and rows["qkv"].shared_input == ("gate",)
    assert report.fallbacks == {}


# ---- nnx.Einsum -----------------------------------------------------------------------------


class NnxHeads(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Einsum("btd,dnh->btnh", (4, 2, 3), (2, 3), param_dtype=jnp.float64,
                               rngs=rngs)  # fmt: skip
        self.out = nnx.Einsum("btnh,nhd->btd", (2, 3, 4), None, param_dtype=jnp.float64,
                              rngs=rngs)  # fmt: skip

    def __call__(self, x):
        return self.out(jnp.tanh(self.proj(x)))


def test_nnx_einsum_parallel_and_sequential(x64):
    model = NnxHeads(nnx.Rngs(0))
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fts = perturbed(base, 2)
    cal = calibration((3, 5, 4), 2)
    xs = [b[0] for b in cal]
    par, _ = jm.merge(model, base, fts, cal, progress=False)
    seq, _ = jm.merge(model, base, fts, cal, algorithm="sequential", progress=False)

    def proj(p, x):
        return np.einsum("btd,dnh->btnh", x, f64(p["proj"]["kernel"])) + f64(p["proj"]["bias"])

    def mat(p):
        return np.vstack([f64(p["kernel"]).reshape(4, 6), f64(p["bias"]).reshape(1, 6)])

    want = lstsq(xs, [proj(f, x).reshape(-1, 6) for x, f in zip(xs, fts, strict=True)])
    close(mat(par["proj"]), want)
    close(mat(seq["proj"]), want)
    # the output projection (no bias): parallel on each fine-tune's own hidden rows, sequential
    # on the merged model's
    for merged, hidden in ((par, [np.tanh(proj(f, x)) for x, f in zip(xs, fts, strict=True)]),
                           (seq, [np.tanh(proj(seq, x)) for x in xs])):  # fmt: skip
        hs = [h.reshape(-1, 6) for h in hidden]
        ys = [
            np.einsum("btnh,nhd->btd", np.tanh(proj(f, x)), f64(f["out"]["kernel"])).reshape(-1, 4)
            for x, f in zip(xs, fts, strict=True)
        ]
        a = np.vstack([h / np.sqrt(len(h)) for h in hs])
        b = np.vstack([y / np.sqrt(len(y)) for y in ys])
        close(f64(merged["out"]["kernel"]).reshape(6, 4), np.linalg.lstsq(a, b, rcond=None)[0])


# ---- groups: one weight per expert ------------------------------------------------------------


class Experts(nn.Module):
    @nn.compact
    def __call__(self, x):  # x (b, e, c, d)
        h = nn.Einsum((3, 4, 5), "becd,edf->becf", name="experts", param_dtype=jnp.float64)(x)
        return h


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_group_indices_are_solved_per_group(x64, algorithm):
    model = Experts()
    cal = calibration((4, 3, 6, 4), 3)
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = perturbed(base, 3)
    merged, report = jm.merge(model, base, fts, cal, algorithm=algorithm, progress=False)
    xs = [b[0] for b in cal]
    for e in range(3):
        xe = [x[:, e].reshape(-1, 4) for x in xs]
        ys = [x @ f64(f["experts"]["kernel"][e]) + f64(f["experts"]["bias"][e])
              for x, f in zip(xe, fts, strict=True)]  # fmt: skip
        got = np.vstack([f64(merged["experts"]["kernel"][e]), f64(merged["experts"]["bias"][e])])
        close(got, lstsq(xe, ys))
    (row,) = report.layers
    assert row.kind == "einsum" and 0 < row.rho < 1


def test_group_einsum_statistics_save_and_solve(x64, tmp_path):
    model = Experts()
    cal = calibration((4, 3, 6, 4), 2)
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = perturbed(base, 2)
    stats = jm.accumulate_model_stats(model, fts, cal, progress=False)
    jm.save_model_stats(tmp_path / "stats", stats)
    loaded = jm.load_model_stats(tmp_path / "stats")
    got, _ = jm.solve_stats(loaded, base, fts, progress=False)
    want, _ = jm.merge(model, base, fts, cal, progress=False)
    close(got["experts"]["kernel"], want["experts"]["kernel"])


# ---- DenseGeneral / LinearGeneral: batch axes are groups, no batch axes a dense layer ---------


class BatchedGeneral(nn.Module):
    """A ``DenseGeneral`` with a batch axis (a kernel per index ``g``), its input ``(b, g, t, d)``
    moved to ``(g, b, t, d)`` (the merge keeps the examples on axis 0 of the model's input)."""

    bias: bool

    @nn.compact
    def __call__(self, x):
        general = nn.DenseGeneral((2, 3), axis=-1, batch_dims=(0,), use_bias=self.bias,
                                  param_dtype=jnp.float64, name="general")  # fmt: skip
        return general(jnp.swapaxes(x, 0, 1))


class NnxBatchedGeneral(nnx.Module):
    def __init__(self, bias, rngs):
        self.general = nnx.LinearGeneral(4, (2, 3), axis=-1, batch_axis={0: 3}, use_bias=bias,
                                         param_dtype=jnp.float64, rngs=rngs)  # fmt: skip

    def __call__(self, x):
        return self.general(jnp.swapaxes(x, 0, 1))


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_dense_general_batch_axes_are_solved_per_index(x64, api, bias, algorithm):
    cal = calibration((4, 3, 5, 4), 3)
    if api == "linen":
        model = BatchedGeneral(bias)
        base = model.init(jax.random.key(0), cal[0][0])["params"]
    else:
        model = NnxBatchedGeneral(bias, nnx.Rngs(0))
        base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    fts = perturbed(base, 3)
    merged, report = jm.merge(model, base, fts, cal, algorithm=algorithm, progress=False)
    xs = [b[0] for b in cal]
    for g in range(3):  # kernel (g, d, 2, 3), bias (g, 2, 3)
        xg = [x[:, g].reshape(-1, 4) for x in xs]
        ys = [x @ f64(f["general"]["kernel"][g]).reshape(4, 6)
              + (f64(f["general"]["bias"][g]).reshape(6) if bias else 0)
              for x, f in zip(xg, fts, strict=True)]  # fmt: skip
        got = f64(merged["general"]["kernel"][g]).reshape(4, 6)
        if bias:
            got = np.vstack([got, f64(merged["general"]["bias"][g]).reshape(1, 6)])
        close(got, lstsq(xg, ys, bias))
    (row,) = report.layers
    assert row.kind == "dense_general" and row.form == "abcd,adef->abcef;a=3"
    assert report.unsolved == {} and report.fallbacks == {}


class Generals(nn.Module):
    """``DenseGeneral`` without batch axes: over the last axis, sharing its input with a
    ``Dense``, and over two axes given out of order."""

    @nn.compact
    def __call__(self, x):  # x (b, 4, 4)
        h = nn.DenseGeneral((2, 3), param_dtype=jnp.float64, name="general")(x)
        d = nn.Dense(3, param_dtype=jnp.float64, name="dense")(x)
        s = nn.DenseGeneral(2, axis=(2, 1), param_dtype=jnp.float64, name="swapped")(x)
        return h.sum() + d.sum() + s.sum()


def _general_matrix(p, n_in):
    return np.vstack([f64(p["kernel"]).reshape(n_in, -1), f64(p["bias"]).reshape(1, -1)])


def test_dense_general_without_batch_axes_is_a_dense_layer(x64):
    model = Generals()
    cal = calibration((12, 4, 4), 2)
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = perturbed(base, 2)
    merged, report = jm.merge(model, base, fts, cal, progress=False)
    rows = {r.path: r for r in report.layers}
    assert {p: (r.kind, r.form) for p, r in rows.items() if p != "dense"} == {
        "general": ("dense_general", ""), "swapped": ("dense_general", "")
    }  # fmt: skip
    assert rows["general"].shared_input == ("dense",) and rows["swapped"].shared_input == ()
    xs = [b[0] for b in cal]
    for path, n_in in (("general", 4), ("swapped", 16)):  # rows: the contracted axes in order
        hs = [x.reshape(-1, n_in) for x in xs]
        ys = [augment(h) @ _general_matrix(f[path], n_in) for h, f in zip(hs, fts, strict=True)]
        close(_general_matrix(merged[path], n_in), lstsq(hs, ys))


# ---- a user's layer: called as (eqn, x), weight "w", a stored transform ---------------------


class EqnFirst(nn.Module):
    """A layer called as ``(eqn, x)`` with its weight named ``w`` (the calling convention of
    Gemma's ``Einsum``), registered by the user."""

    shape: tuple

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param("w", nn.initializers.normal(), self.shape, jnp.float64)
        return jnp.einsum(eqn, x, w)


class Transposed(nn.Module):
    """A projection storing its weight as ``(out, in)`` scaled by 2 (a stored transform)."""

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(), (3, x.shape[-1]), jnp.float64)
        return x @ (w.T / 2)


class UsesBoth(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = EqnFirst((4, 2, 3), name="gating")("...d,dnh->...nh", x)
        return Transposed(name="t")(h.reshape(*h.shape[:-2], 6))


def test_registered_layers_with_call_equation_and_transform(x64):
    jm.register_layer(EqnFirst, input="x", weight="w", bias=None, equation=lambda c: c.args[0])
    jm.register_layer(Transposed, input=0, weight="weight", bias=None, equation="...i,io->...o",
                      transform=(lambda w: w.T / 2, lambda m: 2 * m.T),
                      name="test_transposed")  # fmt: skip
    model = UsesBoth()
    cal = calibration((5, 4), 2)
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = perturbed(base, 2)
    merged, report = jm.merge(model, base, fts, cal, progress=False)
    assert {r.path: r.kind for r in report.layers} == {"gating": "einsum", "t": "test_transposed"}
    xs = [b[0] for b in cal]
    ys = [x @ f64(f["gating"]["w"]).reshape(4, 6) for x, f in zip(xs, fts, strict=True)]
    a = np.vstack([x / np.sqrt(len(x)) for x in xs])
    b = np.vstack([y / np.sqrt(len(y)) for y in ys])
    close(f64(merged["gating"]["w"]).reshape(4, 6), np.linalg.lstsq(a, b, rcond=None)[0])
    hs = [x @ f64(f["gating"]["w"]).reshape(4, 6) for x, f in zip(xs, fts, strict=True)]
    ys = [h @ (f64(f["t"]["weight"]).T / 2) for h, f in zip(hs, fts, strict=True)]
    want = np.linalg.lstsq(np.vstack([h / np.sqrt(5) for h in hs]),
                           np.vstack([y / np.sqrt(5) for y in ys]), rcond=None)[0]  # fmt: skip
    close(f64(merged["t"]["weight"]).T / 2, want)


@pytest.mark.parametrize(
    ("equation", "message"),
    [
        ("btd,dq->bt", "index 'q' is in the weight only"),
        ("btd,dd->bt", "index 'd' repeats in the weight"),
        ("btd,d...->bt", "cannot hold '...'"),
        ("btd->bt", "explicit 'input,weight->output'"),
    ],
)
def test_an_equation_it_cannot_solve_is_named(equation, message):
    class Bad(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(), (x.shape[-1], 2))
            return x @ w

    jm.register_layer(Bad, weight="w", bias=None, equation=lambda c: equation)
    model = nn.Sequential([Bad()])
    x = jnp.ones((2, 3, 4))
    base = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=message) as info:
        jm.merge(model, base, perturbed(base, 2), [[x], [x]], progress=False)
    assert "layers_0" in str(info.value)


def test_register_layer_checks_its_arguments():
    with pytest.raises(ValueError, match="not 'x,w->y'"):
        jm.register_layer(nn.Dense, equation="ab->b")
    with pytest.raises(ValueError, match="say api="):
        jm.register_layer("some.library.Proj", equation="...i,io->...o")
    with pytest.raises(TypeError, match="Flax module class"):
        jm.register_layer(int, equation="...i,io->...o")
    with pytest.raises(ValueError, match="needs a name"):
        jm.register_layer(Transposed, equation="...i,io->...o", transform=(abs, abs))


# ---- norms with offsets ---------------------------------------------------------------------


class OffsetNorm(nn.Module):
    """An RMSNorm computing ``x̂ ⊙ (1 + scale)`` (the convention of Gemma's ``RMSNorm``)."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), jnp.float64)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x * (1 + scale)


class KernelNorm(nnx.Module):
    """An NNX RMSNorm whose scale is named ``kernel`` (EasyDeL's convention), with a scale
    offset attribute (MaxText's ``scale_offset``)."""

    def __init__(self, dim, scale_offset=0.5):
        self.kernel = nnx.Param(jnp.ones(dim, jnp.float64))
        self.scale_offset = scale_offset

    def __call__(self, x):
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x * (self.kernel[...] + self.scale_offset)


def _normed(x):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _channel_fit(xs, scales):
    """Per channel c, ``min Σₖ ‖x̂ₖ,c s − x̂ₖ,c sₖ,c‖² / Nₖ`` (no bias): closed form."""
    num = sum(np.mean(x * x * s, axis=0) for x, s in zip(xs, scales, strict=True))
    den = sum(np.mean(x * x, axis=0) for x in xs)
    return num / den


def test_norm_offsets(x64):
    jm.register_norm(OffsetNorm, offset=1.0)
    jm.register_norm(KernelNorm, scale="kernel", offset=lambda m: m.scale_offset)
    cal = calibration((7, 4), 3)
    xs = [_normed(b[0]) for b in cal]

    model = nn.Sequential([OffsetNorm()])
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = perturbed(base, 3)
    merged, report = jm.merge(model, base, fts, cal, progress=False)
    want = _channel_fit(xs, [1 + f64(f["layers_0"]["scale"]) for f in fts])
    close(1 + f64(merged["layers_0"]["scale"]), want)
    assert report.layers[0].kind == "norm"

    nnx_model = KernelNorm(4)
    base = nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))
    fts = perturbed(base, 3)
    merged, _ = jm.merge(nnx_model, base, fts, cal, progress=False)
    close(f64(merged["kernel"]) + 0.5, _channel_fit(xs, [f64(f["kernel"]) + 0.5 for f in fts]))
    # every basis of the norm works in the effective scale
    for basis in ("scalar", "diagonal"):
        merged, _ = jm.merge(nnx_model, base, fts, cal, basis=basis, progress=False)
        assert np.all(np.isfinite(f64(merged["kernel"])))
