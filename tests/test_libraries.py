"""Whole models written as the JAX LLM libraries write them (the mimics of
``tests/library_conventions.py``: gemma, MaxText, EasyDeL) merge with every parameter the
fine-tunes change solved by output matching, in both algorithms; tied embeddings against numpy
least squares over both uses."""

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import library_conventions as lc
import numpy as np
import pytest
from flax import nnx
from reference import augment, tied_design, tied_lstsq
from test_merge_linen import regmean

import jaxmerge as jm

K = 2


def _perturbed(base, seed=0):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(a.dtype), base)
            for _ in range(K)]  # fmt: skip


def _tokens(seed, vocab=32):
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, (2, 6)), jnp.int32)


def _gemma(cfg, cls=lc.GemmaTransformer, **kwargs):
    model = cls(cfg, **kwargs)
    base = model.init(jax.random.key(0), _tokens(0))["params"]
    return model, base, [[_tokens(1 + k)] for k in range(K)]


def _maxtext(layers, cfg=lc.MAXTEXT_TINY):
    model = lc.MaxTextTransformer(cfg, layers=layers, rngs=nnx.Rngs(0))
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    cal = [[{"decoder_input_tokens": _tokens(1 + k), "decoder_positions": pos}] for k in range(K)]
    return model, base, cal


def _easydel(**kwargs):
    model = lc.EasyDeLForCausalLM(rngs=nnx.Rngs(0), **kwargs)
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return model, base, [[_tokens(1 + k)] for k in range(K)]


MODELS = {
    "gemma2": lambda: _gemma(lc.GEMMA2_TINY),
    "gemma3": lambda: _gemma(lc.GEMMA3_TINY),
    "gemma_mha_jit": lambda: _gemma(lc.GEMMA_MHA_TINY, lc.GemmaTransformerJit),
    "gemma3_remat": lambda: _gemma(lc.GEMMA3_TINY, remat=True),
    "gemma_mha_scan": lambda: _gemma(lc.GEMMA_MHA_TINY, scan=True),
    "maxtext": lambda: _maxtext("unscanned"),
    "easydel": lambda: _easydel(),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_library_models_are_solved_whole(name):
    model, base, cal = MODELS[name]()
    fts = _perturbed(base)
    merged, report = jm.merge(model, base, fts, cal, strict=True, progress=False)
    assert not report.unsolved and report.layers
    assert all(0.0 <= r.rho <= 1.0 + 1e-6 for r in report.layers if r.status != "UNCHANGED")
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(merged))
    kinds = {r.kind for r in report.layers}
    assert {"norm", "embed"} <= kinds and kinds & {"einsum", "dense"}


@pytest.mark.parametrize("name", ["gemma3", "gemma_mha_scan", "maxtext", "easydel"])
def test_library_models_sequential(name):
    model, base, cal = MODELS[name]()
    fts = _perturbed(base, seed=1)
    parallel, _ = jm.merge(model, base, fts, cal, strict=True, progress=False)
    merged, report = jm.merge(model, base, fts, cal, algorithm="sequential", strict=True,
                              progress=False)  # fmt: skip
    assert not report.unsolved
    assert jax.tree.structure(merged) == jax.tree.structure(parallel)


def _stacked_like(unscanned, mode):
    """The unscanned MaxText mimic's tree in ``mode``'s layout: ``layers_{i}`` stacked into
    ``layers`` (on ``param_scan_axis`` for ``"scan"``, on axis 0 for ``"nnx_scan"``)."""
    if mode not in ("scan", "nnx_scan"):
        return unscanned
    cfg = lc.MaxTextConfig()
    axis = cfg.param_scan_axis if mode == "scan" else 0
    decoder = dict(unscanned["decoder"])
    layers = [decoder.pop(f"layers_{i}") for i in range(cfg.num_decoder_layers)]
    decoder["layers"] = jax.tree.map(lambda *a: jnp.stack(a, axis=axis), *layers)
    return {**unscanned, "decoder": decoder}


@pytest.mark.parametrize(("mode", "algorithm"), [
    ("checkpoint", "parallel"), ("nnx_remat", "parallel"), ("nnx_scan", "parallel"),
    ("scan", "parallel"), ("scan", "sequential"),
])  # fmt: skip
def test_maxtext_layer_modes_merge_as_the_unscanned_model(x64, mode, algorithm):
    """MaxText's remat and scan layouts (jax.checkpoint of split state, nnx.remat, nnx.scan,
    scan_layers: jax.lax.scan over parameters stacked on axis 1) are the same function of the
    same weights as the unscanned model: merged with the same fine-tunes and calibration, every
    layer equals the unscanned merge's, each stacked slice written back into its leaf."""
    model, base, cal = _maxtext("unscanned")
    fts = _perturbed(base, seed=2)
    reference, ref_report = jm.merge(model, base, fts, cal, algorithm=algorithm, strict=True,
                                     progress=False)  # fmt: skip
    other = lc.MaxTextTransformer(layers=mode, rngs=nnx.Rngs(0))
    layout = nnx.to_pure_dict(nnx.state(other, nnx.Param))
    assert jax.tree.structure(layout) == jax.tree.structure(_stacked_like(base, mode))
    merged, report = jm.merge(other, _stacked_like(base, mode),
                              [_stacked_like(f, mode) for f in fts], cal, algorithm=algorithm,
                              strict=True, progress=False)  # fmt: skip
    assert not report.unsolved and len(report.layers) == len(ref_report.layers)
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(_stacked_like(reference, mode)),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


# ---- tied embeddings against least squares over both uses ---------------------------------


class TiedLM(nn.Module):
    """A table read by lookups and by the head, with a layer between. ``head``: ``"method"``
    (``nn.Embed.attend``; with ``gemma``, gemma's ``Embedder``: rows scaled by √d on lookup,
    ``decode`` the head), or a head the model computes itself from the table: ``"function"``
    (``h @ E.T``), ``"attend_on_embedding"`` (MaxText's function: the table cast to bfloat16,
    ``jnp.dot``), ``"jit"`` (``h @ E.T`` in a jitted function)."""

    gemma: bool = False
    head: str = "method"

    @nn.compact
    def __call__(self, ids):
        if self.gemma:
            emb = lc.GemmaEmbedder(vocab_size=11, embed_dim=4, name="embed")
            lookup, head = emb.encode, emb.decode
        else:
            emb = nn.Embed(11, 4, param_dtype=jnp.float64, name="embed")
            lookup, head = emb, {
                "method": emb.attend,
                "function": lambda h: h @ emb.embedding.T,
                "attend_on_embedding": lambda h: lc.attend_on_embedding(h, emb.embedding,
                                                                        jnp.float64),
                "jit": lambda h: jax.jit(lambda h, e: h @ e.T)(h, emb.embedding),
            }[self.head]  # fmt: skip
        h = jnp.tanh(nn.Dense(4, param_dtype=jnp.float64, name="mix")(lookup(ids)))
        return head(h)


def _table(p):
    return np.asarray(p["embed"]["input_embedding" if "input_embedding" in p["embed"] else
                                  "embedding"], np.float64)  # fmt: skip


HEADS = {"nn.Embed": (False, "method"), "gemma.Embedder": (True, "method"),
         "h @ E.T": (False, "function"), "attend_on_embedding": (False, "attend_on_embedding"),
         "jit": (False, "jit")}  # fmt: skip


@pytest.mark.parametrize("head", sorted(HEADS))
def test_tied_embedding_is_least_squares_over_lookups_and_head(x64, head):
    gemma = HEADS[head][0]
    model = TiedLM(*HEADS[head])
    rng = np.random.default_rng(0)
    ids = [jnp.asarray(rng.integers(0, 11, (4, 6))) for _ in range(3)]
    base = model.init(jax.random.key(0), ids[0])["params"]
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), base)
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[i] for i in ids], strict=True, progress=False)
    s = 2.0 if gemma else 1.0  # √embed_dim
    tasks = []
    for f, i in zip(fts, ids, strict=True):
        e_k, t = _table(f), np.asarray(i).reshape(-1)
        h = np.tanh(s * e_k[t] @ np.asarray(f["mix"]["kernel"]) + np.asarray(f["mix"]["bias"]))
        tasks.append((t, s * e_k[t], h, h @ e_k.T))
    np.testing.assert_allclose(_table(merged), tied_lstsq(tasks, s, 11, 4), rtol=1e-6, atol=1e-6)
    (embed,) = [r for r in report.layers if r.path == "embed"]
    assert (embed.kind, embed.form) == ("embed", "tied;scale=2.0" if gemma else "tied")


@pytest.mark.parametrize("head", ["gemma.Embedder", "h @ E.T"])
@pytest.mark.parametrize("passes", ["one pass", "per group"])
def test_sequential_tied_embedding_solves_its_head_on_the_merged_model(x64, passes, head):
    """The table solved from its lookups, the layer between solved on that table's lookups, and
    the table solved again from both uses with the head's inputs from that merged model."""
    gemma = HEADS[head][0]
    model = TiedLM(*HEADS[head])
    rng = np.random.default_rng(1)
    ids = [jnp.asarray(rng.integers(0, 11, (4, 6))) for _ in range(3)]
    base = model.init(jax.random.key(0), ids[0])["params"]
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), base)
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    cal = [[i] if passes == "one pass" else [i[:2], i[2:]] for i in ids]
    merged, report = jm.merge(model, base, fts, cal, algorithm="sequential", strict=True,
                              progress=False)  # fmt: skip
    s = 2.0 if gemma else 1.0  # √embed_dim
    mix = lambda p, x: x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])  # noqa: E731
    ts = [np.asarray(i).reshape(-1) for i in ids]
    lookups = [(t, s * _table(f)[t], None, None) for f, t in zip(fts, ts, strict=True)]
    first = tied_lstsq(lookups, s, 11, 4)
    xs = [s * first[t] for t in ts]
    ys = [mix(f["mix"], s * _table(f)[t]) for f, t in zip(fts, ts, strict=True)]
    want_mix = regmean(xs, ys)
    got_mix = merged["mix"]
    np.testing.assert_allclose(np.vstack([got_mix["kernel"], got_mix["bias"]]), want_mix,
                               rtol=1e-6, atol=1e-9)  # fmt: skip
    tasks = [(t, s * _table(f)[t], np.tanh(augment(x) @ want_mix), np.tanh(y) @ _table(f).T)
             for f, t, x, y in zip(fts, ts, xs, ys, strict=True)]  # fmt: skip
    want = tied_lstsq(tasks, s, 11, 4)
    np.testing.assert_allclose(_table(merged), want, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(want - first)) > 1e-2  # the head moves the table
    # the report is the joint solve's: its energies are both uses' (ρ of the lookups alone on
    # the lookups' own solution would be 1)
    (embed,) = [r for r in report.layers if r.path == "embed"]
    assert [r.path for r in report.layers].count("embed") == 1
    assert embed.rho < 1 - 1e-6


class ScaledLookupLM(nn.Module):
    """gemma's ``Embedder`` read by ``encode`` only (rows scaled by √d = 2), then a Dense."""

    @nn.compact
    def __call__(self, ids):
        emb = lc.GemmaEmbedder(vocab_size=11, embed_dim=4, name="embed")
        return nn.Dense(3, param_dtype=jnp.float64, name="out")(emb.encode(ids))


@pytest.mark.parametrize("basis", ["full", "scalar"])
def test_scaled_lookup_is_least_squares_of_its_rows(x64, basis):
    """The lookup's targets are its scaled rows ``s·Eₖ[t]``: the full basis is the
    token-count-weighted mean of the fine-tuned rows, the scalar basis numpy least squares
    over the task vectors' coefficients (``s`` cancels in both)."""
    model = ScaledLookupLM()
    rng = np.random.default_rng(2)
    ids = [jnp.asarray(rng.integers(0, 11, (4, 6))) for _ in range(3)]
    base = model.init(jax.random.key(0), ids[0])["params"]
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), base)
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    merged, report = jm.merge(model, base, fts, [[i] for i in ids], basis={"embed": basis},
                              progress=False)  # fmt: skip
    ts = [np.asarray(i).reshape(-1) for i in ids]
    tables, e0 = np.stack([_table(f) for f in fts]), _table(base)
    if basis == "full":
        counts = np.stack([np.bincount(t, minlength=11) / len(t) for t in ts])
        assert np.all(counts.sum(0) > 0)
        want = np.einsum("kv,kvd->vd", counts, tables) / counts.sum(0)[:, None]
    else:
        deltas = tables - e0
        design = np.vstack([np.stack([dj[t].ravel() for dj in deltas], 1) / np.sqrt(len(t))
                            for t in ts])  # fmt: skip
        rhs = np.concatenate([(e_k[t] - e0[t]).ravel() / np.sqrt(len(t))
                              for e_k, t in zip(tables, ts, strict=True)])  # fmt: skip
        c = np.linalg.lstsq(design, rhs, rcond=None)[0]
        want = e0 + np.einsum("k,kvd->vd", c, deltas)
    np.testing.assert_allclose(_table(merged), want, rtol=1e-6, atol=1e-9)

    def loss(e):  # Σₖ (1/nₖ) Σ ‖s·E[t] − s·Eₖ[t]‖²
        return sum(np.sum((2 * e[t] - 2 * e_k[t]) ** 2) / len(t)
                   for e_k, t in zip(tables, ts, strict=True))  # fmt: skip

    (layer,) = [r for r in report.layers if r.path == "embed"]
    np.testing.assert_allclose(layer.energy_base, loss(e0), rtol=1e-6)
    np.testing.assert_allclose(layer.rho, 1 - loss(_table(merged)) / loss(e0), rtol=1e-6)


@pytest.mark.parametrize(
    "name, table",
    [("maxtext", "token_embedder/embedding"), ("easydel", "model/embed_tokens/embedding")],
)
def test_library_heads_computed_from_the_table_are_solved(name, table):
    """MaxText's ``logits_via_embedding`` (``attend_on_embedding(y, table)``) and EasyDeL's
    ``tie_word_embeddings`` (``lm_head(h, w=table.T)``): heads the model computes itself from
    the table, found in the traced pass, so the table is a tied one solved from both uses
    (checked against least squares on ``TiedLM``'s heads above)."""
    model, base, cal = {
        "maxtext": lambda: _maxtext("unscanned", dataclasses.replace(
            lc.MAXTEXT_TINY, logits_via_embedding=True)),
        "easydel": lambda: _easydel(cfg=dataclasses.replace(lc.EASYDEL_TINY,
                                                            tie_word_embeddings=True)),
    }[name]()  # fmt: skip
    fts = _perturbed(base)
    # EasyDeL keeps an lm_head kernel that the tied head does not use
    unused = {"lm_head/kernel"} if name == "easydel" else set()
    for algorithm in ("parallel", "sequential"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged, report = jm.merge(model, base, fts, cal, algorithm=algorithm,
                                      progress=False)  # fmt: skip
        assert set(report.unsolved) == unused
        assert bool(caught) == bool(unused)
        assert all("not used in the forward pass" in report.unsolved[p] for p in unused)
        (embed,) = [r for r in report.layers if r.path == table.rsplit("/", 1)[0]]
        assert (embed.kind, embed.form) == ("embed", "tied")
        assert 0 < embed.rho < 1


class OtherReadLM(nn.Module):
    """An ``nn.Embed`` whose table the model also reads otherwise than as a head ``h Eᵀ``."""

    use: str = "scaled"

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 4, name="embed")
        h = jnp.tanh(nn.Dense(4, name="mix")(emb(ids)))
        if self.use == "scaled":  # a product: not the table itself
            return h @ (2.0 * emb.embedding).T
        return h + jnp.sum(emb.embedding[:2])  # a slice


@pytest.mark.parametrize("use, primitive", [("scaled", "mul"), ("slice", "slice")])
def test_a_table_read_otherwise_outside_its_layer_is_reported_not_solved(use, primitive):
    """A read of the table outside its layer that is not a head ``h Eᵀ`` is a use the table's
    statistics do not see: the table is reported unsolved with the primitive that reads it,
    and every other layer is solved."""
    ids = [jnp.asarray(np.random.default_rng(k).integers(0, 11, (2, 5))) for k in range(K)]
    model = OtherReadLM(use)
    base = model.init(jax.random.key(0), ids[0])["params"]
    fts = _perturbed(base)
    with pytest.warns(jm.UnsolvedParametersWarning):
        _, report = jm.merge(model, base, fts, [[i] for i in ids], progress=False)
    assert set(report.unsolved) == {"embed/embedding"}
    why = report.unsolved["embed/embedding"]
    assert "reads 'embed/embedding' outside the calls of its 'embed' layer" in why
    assert f"read by {primitive!r}, which is not a head" in why
    assert report.fallbacks["embed/embedding"] == "mean"
    assert [r.path for r in report.layers] == ["mix"]
    with pytest.raises(jm.UnsolvedParametersError, match="outside the calls"):
        jm.merge(model, base, fts, [[i] for i in ids], strict=True, progress=False)


def _tied_case(seed=0):
    """``TiedLM`` (gemma's scaled ``Embedder``), float64, its base, 3 fine-tunes, their ids and
    the tasks of :func:`reference.tied_design`."""
    model = TiedLM(gemma=True)
    rng = np.random.default_rng(seed)
    ids = [jnp.asarray(rng.integers(0, 11, (4, 6))) for _ in range(3)]
    base = model.init(jax.random.key(0), ids[0])["params"]
    base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), base)
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(3)]
    s, tasks = 2.0, []
    for f, i in zip(fts, ids, strict=True):
        e_k, t = _table(f), np.asarray(i).reshape(-1)
        h = np.tanh(s * e_k[t] @ np.asarray(f["mix"]["kernel"]) + np.asarray(f["mix"]["bias"]))
        tasks.append((t, s * e_k[t], h, h @ e_k.T))
    return model, base, fts, [[i] for i in ids], tied_design(tasks, s, 11, 4)


def _ridged(design, rhs, directions, start, ridge, c0):
    """numpy's ``min ‖A(start + B c) − b‖² + λ Σ_q D_qq (c_q − c0_q)²`` with ``D = diag(BᵀAᵀAB)``
    (:func:`jaxmerge.solve_layer`'s ridge), ``B``'s columns the ``directions``."""
    a = design @ directions
    h = a.T @ a
    dh = np.diag(np.diag(h))
    return np.linalg.solve(h + ridge * dh, a.T @ (rhs - design @ start) + ridge * dh @ c0)


@pytest.mark.parametrize("ridge", [0.0, 0.5])
@pytest.mark.parametrize("basis", ["scalar", "diagonal", "custom", "full"])
def test_tied_embedding_in_every_basis_is_least_squares(x64, basis, ridge):
    """A tied table in the scalar, diagonal (per column of the table), custom and full bases,
    with and without a ridge (toward a prior for the full basis), against numpy on the
    explicit design of both uses."""
    model, base, fts, cal, (design, rhs) = _tied_case()
    e0, tables = _table(base), [_table(f) for f in fts]
    v, d = e0.shape
    rng = np.random.default_rng(5)
    if basis == "full":
        start = np.mean(tables, axis=0)  # the fallback merge
        prior = start + 0.1 * rng.normal(size=e0.shape)
        directions = np.eye(v * d)
        c0 = (prior - start).ravel() if ridge else np.zeros(v * d)
        option = "full"
        prior_option = {"embed": {"input_embedding": prior}} if ridge else None
    else:
        start, prior_option = e0, None
        deltas = [t - e0 for t in tables]
        if basis == "custom":
            deltas = [rng.normal(size=e0.shape) for _ in range(2)]
            option = jm.Custom([{"input_embedding": x} for x in deltas])
        else:
            option = basis
        if basis == "diagonal":  # one coefficient per direction and column j of the table
            cols = [np.zeros((v, d)) for _ in range(d * len(deltas))]
            for j in range(d):
                for q, delta in enumerate(deltas):
                    cols[j * len(deltas) + q][:, j] = delta[:, j]
            directions = np.stack([c.ravel() for c in cols], 1)
        else:
            directions = np.stack([x.ravel() for x in deltas], 1)
        c0 = np.zeros(directions.shape[1])
    c = _ridged(design, rhs, directions, start.ravel(), ridge, c0)
    want = (start.ravel() + directions @ c).reshape(v, d)
    merged, report = jm.merge(model, base, fts, cal, basis={"embed": option, "mix": "full"},
                              ridge={"embed": ridge, "mix": 0.0}, prior=prior_option,
                              strict=True, progress=False)  # fmt: skip
    np.testing.assert_allclose(_table(merged), want, rtol=1e-6, atol=1e-8)
    (embed,) = [r for r in report.layers if r.path == "embed"]
    loss = lambda e: np.sum((design @ e.ravel() - rhs) ** 2)  # noqa: E731
    np.testing.assert_allclose(embed.rho, 1 - loss(want) / loss(e0), rtol=1e-6)


def test_tied_embedding_unsupported_options_are_named(x64):
    model, base, fts, cal, _ = _tied_case()
    with pytest.raises(ValueError, match="tied embedding.*basis=LowRank"):
        jm.merge(model, base, fts, cal, basis=jm.LowRank(2), progress=False)
    with pytest.raises(ValueError, match="tied embedding.*alpha=0.5"):
        jm.merge(model, base, fts, cal, alpha=0.5, progress=False)
