"""The library mimics in ``tests/library_conventions.py`` build, run and keep the real layouts.

Their agreement with the real gemma / MaxText / EasyDeL classes was checked outside the suite
(see that module's docstring); these tests keep the mimics themselves working. Layouts and
output shapes of every model variant come from abstract evaluation (``jax.eval_shape``: the
forward is traced, not compiled); the layers run concretely against closed forms, and MaxText's
scanned stacks against its unscanned one on the same weights.
"""

import dataclasses

import jax
import jax.numpy as jnp
import library_conventions as lc
import numpy as np
import pytest
from flax import nnx

TOKENS = jnp.array([[1, 5, 7, 9, 3, 2], [4, 6, 8, 0, 0, 0]], jnp.int32)
POSITIONS = jnp.broadcast_to(jnp.arange(6), (2, 6))


def _paths(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p).removesuffix(".value"): x.shape for p, x in leaves}


def _key():
    # The RBG generator: threefry's programs compile far slower than these tiny models run.
    return jax.random.key(0, impl="unsafe_rbg")


def _stack(trees, axis=0):
    return jax.tree.map(lambda *xs: jnp.stack(xs, axis), *trees)


def _compiled(fn, *args):
    """``jax.jit(fn)(*args)`` compiled without LLVM's optimisations (compiling dominates here)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls, name",
    [
        (lc.GemmaEinsum, "gemma.gm.nn._layers.Einsum"),
        (lc.GemmaRMSNorm, "gemma.gm.nn._layers.RMSNorm"),
        (lc.GemmaEmbedder, "gemma.gm.nn._modules.Embedder"),
        (lc.GemmaFeedForward, "gemma.gm.nn._modules.FeedForward"),
        (lc.MaxTextDenseGeneral, "maxtext.layers.linears.DenseGeneral"),
        (lc.MaxTextRMSNorm, "maxtext.layers.normalizations.RMSNorm"),
        (lc.MaxTextEmbed, "maxtext.layers.embeddings.Embed"),
        (lc.EasyDeLColumnParallelLinear, "easydel.layers.linears._linear.ColumnParallelLinear"),
        (lc.EasyDeLRowParallelLinear, "easydel.layers.linears._linear.RowParallelLinear"),
        (lc.EasyDeLRMSNorm, "easydel.layers.norms._norms.RMSNorm"),
    ],
)
def test_mirrored_qualified_names(cls, name):
    assert f"{cls.__module__}.{cls.__qualname__}" == name  # as jaxmerge.qualified_name writes it
    assert cls.__name__ == name.rpartition(".")[2]


# ---- gemma ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [lc.GEMMA2_TINY, lc.GEMMA3_TINY, lc.GEMMA_MHA_TINY])
def test_gemma_transformer_layout(cfg):
    model = lc.GemmaTransformer(cfg)
    params = jax.eval_shape(model.init, _key(), TOKENS)
    paths = _paths(params)
    d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = "['params']['layer_1']"
    # nn.share_scope: both feed-forward weights sit directly under `mlp`.
    gating = (2, f, d) if cfg.transpose_gating_einsum else (2, d, f)
    assert paths[f"{layer}['mlp']['gating_einsum']"] == gating
    assert paths[f"{layer}['mlp']['linear']"] == (f, d)
    if k == n:
        assert paths[f"{layer}['attn']['qkv_einsum']['w']"] == (3, n, d, h)
    else:
        assert paths[f"{layer}['attn']['q_einsum']['w']"] == (n, d, h)
        assert paths[f"{layer}['attn']['kv_einsum']['w']"] == (2, k, d, h)
    assert (f"{layer}['attn']['_query_norm']['scale']" in paths) == cfg.use_qk_norm
    assert (f"{layer}['post_ffw_norm']['scale']" in paths) == cfg.use_post_ffw_norm
    assert paths["['params']['embedder']['input_embedding']"] == (cfg.num_embed, d)
    for variant in (model, lc.GemmaTransformerJit(cfg), lc.GemmaTransformer(cfg, remat=True)):
        logits = jax.eval_shape(variant.apply, params, TOKENS)
        assert (logits.shape, logits.dtype) == ((2, 6, cfg.num_embed), jnp.float32)


def test_gemma_scan_stacks_the_blocks():
    cfg = lc.GEMMA_MHA_TINY  # one attention type: it scans
    plain, scanned = lc.GemmaTransformer(cfg), lc.GemmaTransformer(cfg, scan=True)
    params = jax.eval_shape(plain.init, _key(), TOKENS)
    p = dict(params["params"])
    layers = [p.pop(f"layer_{i}") for i in range(len(cfg.attention_types))]
    stacked = {"params": {**p, "layers": {"block": jax.eval_shape(_stack, layers)}}}
    assert _paths(jax.eval_shape(scanned.init, _key(), TOKENS)) == _paths(stacked)
    assert jax.eval_shape(scanned.apply, stacked, TOKENS).shape == (2, 6, cfg.num_embed)
    with pytest.raises(ValueError, match="one attention type"):
        jax.eval_shape(lc.GemmaTransformer(lc.GEMMA2_TINY, scan=True).init, _key(), TOKENS)


def test_gemma_layer_formulas():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 16)), jnp.float32)
    norm, emb = lc.GemmaRMSNorm(), lc.GemmaEmbedder(vocab_size=8, embed_dim=16)

    def run(key):
        y = norm.apply(norm.init(key, x), x)  # scale 0: gain 1 + 0
        v = emb.init(key, jnp.array([1]), method="encode")
        enc = emb.apply(v, jnp.array([3]), method="encode")
        return y, v["params"]["input_embedding"], enc, emb.apply(v, x, method="decode")

    y, table, enc, dec = _compiled(run, _key())
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(enc, table[3:4] * 4.0, rtol=1e-6)  # sqrt(embed_dim) = 4
    np.testing.assert_allclose(dec, x @ table.T, rtol=1e-5, atol=1e-6)


# ---- MaxText ----------------------------------------------------------------------------------


def _maxtext(layers="unscanned", tied=False):
    cfg = dataclasses.replace(lc.MAXTEXT_TINY, logits_via_embedding=tied)
    return nnx.eval_shape(lambda: lc.MaxTextTransformer(cfg, layers=layers, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("layers", lc.MAXTEXT_LAYER_MODES)
def test_maxtext_transformer_layout(layers):
    model = _maxtext(layers)
    paths = _paths(nnx.state(model, nnx.Param))
    layer = "layers" if layers in ("scan", "nnx_scan") else "layers_1"
    query = paths[f"['decoder']['{layer}']['self_attention']['query']['kernel']"]
    # MaxText's scan_layers stacks on param_scan_axis 1; nnx.vmap on axis 0.
    assert query == {"scan": (16, 2, 4, 4), "nnx_scan": (2, 16, 4, 4)}.get(layers, (16, 4, 4))
    assert paths["['decoder']['logits_dense']['kernel']"] == (16, 32)
    assert paths["['token_embedder']['embedding']"] == (32, 16)
    logits = nnx.eval_shape(lambda m: m(TOKENS, POSITIONS), model)
    assert (logits.shape, logits.dtype) == ((2, 6, 32), jnp.float32)


def test_maxtext_tied_head_layout():
    model = _maxtext(tied=True)
    assert "['decoder']['logits_dense']['kernel']" not in _paths(nnx.state(model, nnx.Param))
    assert nnx.eval_shape(lambda m: m(TOKENS, POSITIONS), model).shape == (2, 6, 32)


def test_maxtext_scan_layers_computes_the_same_logits():
    """MaxText's ``scan_layers`` stack (layer axis at ``param_scan_axis`` 1) run on the
    unscanned model's weights gives the unscanned logits."""
    graphdef, template = nnx.split(_maxtext("scan"))
    axis, n = lc.MAXTEXT_TINY.param_scan_axis, lc.MAXTEXT_TINY.num_decoder_layers

    def run(key):
        plain = lc.MaxTextTransformer(rngs=nnx.Rngs(key))
        weights = nnx.to_pure_dict(nnx.state(plain))
        decoder = dict(weights["decoder"])
        layers = _stack([decoder.pop(f"layers_{i}") for i in range(n)], axis)
        state = jax.tree.map(lambda v: v, template)  # a fresh copy to fill
        nnx.replace_by_pure_dict(state, {**weights, "decoder": {**decoder, "layers": layers}})
        return plain(TOKENS, POSITIONS), nnx.merge(graphdef, state)(TOKENS, POSITIONS)

    want, got = _compiled(run, _key())
    assert bool(jnp.all(jnp.isfinite(want)))
    _close(got, want)


def test_maxtext_layer_formulas():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 4, 8)), jnp.float32)

    def run(key):
        rngs = nnx.Rngs(key)
        dense = lc.MaxTextDenseGeneral((4, 8), (5,), axis=(-2, -1), use_bias=True, rngs=rngs)
        dense.bias[...] = jnp.arange(5.0)
        want = jnp.einsum("btnh,nho->bto", x, dense.kernel[...]) + jnp.arange(5.0)
        norm = lc.MaxTextRMSNorm(
            8, scale_offset=1.0, scale_init=jax.nn.initializers.zeros, rngs=rngs
        )  # gemma-style zeros + 1
        embed = lc.MaxTextEmbed(6, 8, rngs=rngs)
        return dense(x), want, norm(x), embed(jnp.array([[1, 2]])), embed.attend(x)

    got, want, normed, looked_up, attended = _compiled(run, _key())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(normed**2, -1)), 1.0, rtol=1e-4)
    assert looked_up.shape == (1, 2, 8) and attended.shape == (2, 3, 4, 6)
    dense = nnx.eval_shape(
        lambda: lc.MaxTextDenseGeneral((4, 8), 5, axis=(-2, -1), rngs=nnx.Rngs(0))
    )
    assert dense.kernel.shape == (4, 8, 5) and dense.bias is None
    with pytest.raises(ValueError, match="does not match"):
        nnx.eval_shape(lambda m: m(x[..., :4]), dense)


# ---- EasyDeL ----------------------------------------------------------------------------------


def _easydel(remat=False, tied=False, rngs=None):
    cfg = dataclasses.replace(lc.EASYDEL_TINY, tie_word_embeddings=tied)
    return lc.EasyDeLForCausalLM(cfg, remat=remat, rngs=rngs or nnx.Rngs(0))


def test_easydel_causal_lm():
    model = nnx.eval_shape(_easydel)
    paths = _paths(nnx.state(model, nnx.Param))
    assert paths["['model']['layers'][0]['self_attn']['q_proj']['kernel']"] == (16, 16)
    assert paths["['model']['layers'][0]['self_attn']['k_proj']['kernel']"] == (16, 8)
    assert paths["['model']['layers'][1]['mlp']['down_proj']['kernel']"] == (32, 16)
    assert paths["['model']['norm']['kernel']"] == (16,)
    assert paths["['lm_head']['kernel']"] == (16, 32)  # present, unused when tied

    for remat, tied in ((False, False), (True, True)):
        variant = nnx.eval_shape(lambda r=remat, t=tied: _easydel(r, t))
        logits = nnx.eval_shape(lambda m: m(TOKENS), variant)
        assert (logits.shape, logits.dtype) == ((2, 6, 32), jnp.float32)


def test_easydel_layer_formulas():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 8)), jnp.float32)
    w = jnp.ones((8, 4))

    def run(key):
        lin = lc.EasyDeLRowParallelLinear(8, 4, scale="fan_in", rngs=nnx.Rngs(key))
        lin.bias[...] = jnp.arange(4.0)
        norm = lc.EasyDeLRMSNorm(8, rngs=nnx.Rngs(key))  # bfloat16 by default, as EasyDeL's
        return lin(x), lin.kernel[...], lin(x, w=w), norm(x), norm.kernel[...]

    y, kernel, y_w, normed, scale = _compiled(run, _key())
    np.testing.assert_allclose(y, x @ kernel / np.sqrt(8) + jnp.arange(4.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_w, x @ w / np.sqrt(8) + jnp.arange(4.0), rtol=1e-5, atol=1e-6)
    assert scale.dtype == jnp.bfloat16 and normed.dtype == x.dtype
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(normed**2, -1)), 1.0, rtol=2e-2)
    column = nnx.eval_shape(lambda: lc.EasyDeLColumnParallelLinear(8, 4, use_bias=False))
    assert column.kernel.shape == (8, 4) and column.bias is None
