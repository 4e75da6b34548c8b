"""The real gemma and MaxText model classes: the mimics of ``tests/library_conventions.py``
against them, and their merges.

gemma 4.0.1 and MaxText 0.2.5 need Python 3.12 and their own environment
(``bash benchmarks/ecosystem/setup.sh``); run this file with it::

    benchmarks/.ecosystem-venv/bin/python -m pytest -p no:cacheprovider tests/test_real_libraries.py

Elsewhere (the project's environment, CI) it is skipped. The ecosystem benchmark checks the same
models layer by layer against numpy least squares; here the real gemma ``Transformer`` must give
the mimic's logits on the same parameters and the same merge, and the real MaxText decoder must
merge whole, its ``scan_layers`` layout to the unscanned layout's merge, and its tied head
(``logits_via_embedding``) against numpy least squares.
"""

import importlib.util
import pathlib
import sys

import pytest

if importlib.util.find_spec("gemma") is None or importlib.util.find_spec("maxtext") is None:
    pytest.skip("gemma and maxtext are not installed (their environment: "
                "bash benchmarks/ecosystem/setup.sh)", allow_module_level=True)  # fmt: skip

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import library_conventions as lc  # noqa: E402
import numpy as np  # noqa: E402

import jaxmerge as jm  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ecosystem"))
from eco_common import with_params  # noqa: E402
from eco_gemma import import_gemma  # noqa: E402  (gemma imported with a tensorflow stub)

TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 32, (2, 6)), jnp.int32)


def _perturbed(base, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(a.dtype), base)
            for _ in range(k)]  # fmt: skip


def _close(got, want, rtol):
    """Every leaf within ``rtol`` of its largest entry."""
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), np.max(np.abs(a - b))


# ---- gemma --------------------------------------------------------------------------------------


def _real_gemma(cfg: lc.GemmaConfig):
    """gemma's own ``Transformer`` for the mimic's config (its attention types by name)."""
    g = import_gemma()
    fields = dataclasses.asdict(cfg)
    fields["attention_types"] = tuple(g.modules.AttentionType[t.name] for t in cfg.attention_types)
    return g.transformer.Transformer(config=g.config.TransformerConfig(**fields))


@pytest.mark.parametrize("style", ["GEMMA2_TINY", "GEMMA3_TINY"])
def test_the_gemma_mimic_is_gemma(style):
    """Same parameter tree, and the same logits on gemma's own initial parameters. Both compute
    in gemma's default bfloat16 (8 bits of mantissa), where the order of roundings differs: the
    logits agree to 1/32 of the largest and on average to 1/64 of their mean size (a wrong
    convention, a missing offset or scale, is off by its own size); the merges below, which
    read every layer's activations, agree to 1e-4."""
    cfg = getattr(lc, style)
    real, mimic = _real_gemma(cfg), lc.GemmaTransformer(cfg)
    params = real.init(jax.random.key(0), TOKENS)["params"]
    ours = mimic.init(jax.random.key(0), TOKENS)["params"]
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, params)
    want = real.apply({"params": params}, TOKENS).logits
    got = np.asarray(mimic.apply({"params": params}, TOKENS), np.float64)
    want = np.asarray(want, np.float64)
    assert np.max(np.abs(got - want)) <= 2**-5 * np.max(np.abs(want))
    assert np.mean(np.abs(got - want)) <= 2**-6 * np.mean(np.abs(want))


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
@pytest.mark.parametrize("style", ["GEMMA2_TINY", "GEMMA3_TINY"])
def test_real_gemma_merges_whole_as_the_mimic(style, algorithm):
    cfg = getattr(lc, style)
    real = _real_gemma(cfg)
    base = real.init(jax.random.key(0), TOKENS)["params"]
    fts = _perturbed(base)
    cal = [[TOKENS + k] for k in range(2)]
    got, report = jm.merge(real, base, fts, cal, algorithm=algorithm, strict=True, progress=False)
    assert not report.unsolved and not report.fallbacks
    assert {"einsum", "norm", "embed"} <= {r.kind for r in report.layers}
    (embed,) = [r for r in report.layers if r.kind == "embed"]
    assert embed.form == "tied;scale=" + repr(float(np.sqrt(cfg.embed_dim)))
    want, _ = jm.merge(lc.GemmaTransformer(cfg), base, fts, cal, algorithm=algorithm,
                       strict=True, progress=False)  # fmt: skip
    _close(got, want, 1e-4)


# ---- MaxText ------------------------------------------------------------------------------------


# MaxText 0.2.5 calls flax APIs that flax 0.12.9 deprecates ('sharding', fork(split=), .value)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_real_maxtext_merges_whole_and_scanned_as_unscanned(x64):
    """MaxText's decoder as ``from_config`` builds it (after ``model.eval()``): unscanned, each
    layer called through an ``nnx.split``/``nnx.merge`` copy under ``jax.checkpoint``; scanned,
    ``nnx.scan`` over parameters stacked on axis 1. Every parameter is solved in both, and the
    scanned merge of the unscanned parameters stacked is the unscanned merge stacked."""
    from eco_maxtext import MaxTextModel  # the benchmark's tiny llama2 config, float64

    plain, scanned = MaxTextModel(scan=False), MaxTextModel(scan=True)
    fts = _perturbed(plain.base)
    cal = [[plain.batch(np.asarray(TOKENS) + k)] for k in range(2)]
    with plain.context():
        want, report = jm.merge(plain.model, plain.base, fts, cal, strict=True,
                                call_kwargs=plain.call_kwargs, progress=False)  # fmt: skip
    assert not report.unsolved and not report.fallbacks
    assert {"einsum", "norm", "embed"} <= {r.kind for r in report.layers}
    stack = lambda tree: with_params(scanned.base, scanned.stacked(plain.flat(tree)))  # noqa: E731
    with scanned.context():
        got, report = jm.merge(scanned.model, stack(plain.base), [stack(f) for f in fts], cal,
                               strict=True, call_kwargs=scanned.call_kwargs,
                               progress=False)  # fmt: skip
    assert not report.unsolved
    _close(scanned.flat(got), scanned.stacked(plain.flat(want)), 1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_real_maxtext_tied_head_is_least_squares(x64, monkeypatch):
    """MaxText with ``logits_via_embedding``: the decoder computes the head itself,
    ``attend_on_embedding(y, table)``. The table is solved from its lookups and that head,
    against numpy least squares over both uses, with the head inputs recorded from the real
    decoder (each fine-tune's own, as the parallel merge takes them); the sequential merge
    solves it too."""
    from eco_maxtext import MaxTextModel
    from maxtext.layers import nnx_decoders
    from reference import tied_lstsq

    tied = MaxTextModel(scan=False, tied=True)
    fts = _perturbed(tied.base)
    rng = np.random.default_rng(3)
    cal = [[tied.batch(rng.integers(0, tied.vocab, (4, 16)))] for _ in fts]
    with tied.context():
        merged, report = jm.merge(tied.model, tied.base, fts, cal, strict=True,
                                  call_kwargs=tied.call_kwargs, progress=False)  # fmt: skip
    (table,) = [p for p in tied.flat(tied.base) if p.endswith("token_embedder/embedding")]
    (embed,) = [r for r in report.layers if r.kind == "embed"]
    assert not report.unsolved and embed.form == "tied"
    with tied.context():
        _, report = jm.merge(tied.model, tied.base, fts, cal, strict=True, algorithm="sequential",
                             call_kwargs=tied.call_kwargs, progress=False)  # fmt: skip
    assert not report.unsolved
    assert [r.form for r in report.layers if r.kind == "embed"] == ["tied"]
    heads, original = [], nnx_decoders.attend_on_embedding
    monkeypatch.setattr(nnx_decoders, "attend_on_embedding",
                        lambda query, *a, **k: heads.append(np.asarray(query)) or original(
                            query, *a, **k))  # fmt: skip
    tasks = []
    for f, (batch,) in zip(fts, cal, strict=True):
        heads.clear()
        tied.logits(f, batch, jit=False)
        (h,) = heads
        e_k, t = np.asarray(tied.flat(f)[table], np.float64), np.asarray(
            batch["decoder_input_tokens"]).reshape(-1)  # fmt: skip
        h = h.reshape(-1, h.shape[-1]).astype(np.float64)
        tasks.append((t, e_k[t], h, h @ e_k.T))
    want = tied_lstsq(tasks, 1.0, *np.shape(tied.flat(tied.base)[table]))
    _close(tied.flat(merged)[table], want, 1e-6)
