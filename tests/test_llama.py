"""``jaxmerge.models.LlamaForCausalLM`` against a numpy forward written from the Hugging Face
Llama definition (float64), and merged whole: every parameter solved, the tied table from its
lookups and its head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge as jm
from jaxmerge.models import LlamaConfig, LlamaForCausalLM


def _np_forward(p, cfg, ids, mask):
    """Hugging Face ``LlamaForCausalLM`` in numpy: RMSNorm, rotate-half RoPE (angles in
    float32), grouped-query causal attention (query head i reads kv head i // group), SiLU-gated
    MLP, tied head."""
    m = p["model"]

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + cfg.rms_norm_eps) * scale

    def lin(x, q):
        return x @ np.asarray(q["kernel"], np.float64)

    b, t = ids.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    half = hd // 2
    inv = (1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float32) / half)).astype(np.float32)
    ang = np.arange(t, dtype=np.float32)[:, None] * inv  # cos, sin in float32 too
    cos = np.cos(ang).astype(np.float64)[None, :, None]
    sin = np.sin(ang).astype(np.float64)[None, :, None]

    def rot(x):
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = np.asarray(m["embed_tokens"]["embedding"], np.float64)[ids]
    allowed = np.tril(np.ones((t, t), bool))[None, None] & mask.astype(bool)[:, None, None, :]
    for layer in m["layers"].values():
        a = layer["self_attn"]
        y = rms(x, np.asarray(layer["input_layernorm"]["scale"]))
        q = rot(lin(y, a["q_proj"]).reshape(b, t, nh, hd))
        k = rot(lin(y, a["k_proj"]).reshape(b, t, nkv, hd))
        v = lin(y, a["v_proj"]).reshape(b, t, nkv, hd)
        kv = np.arange(nh) // (nh // nkv)
        s = np.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv]) / np.sqrt(hd)
        s = np.where(allowed, s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        x = x + lin(np.einsum("bhqk,bkhd->bqhd", w, v[:, :, kv]).reshape(b, t, -1), a["o_proj"])
        y = rms(x, np.asarray(layer["post_attention_layernorm"]["scale"]))
        mlp = layer["mlp"]
        g = lin(y, mlp["gate_proj"])
        x = x + lin(g / (1 + np.exp(-g)) * lin(y, mlp["up_proj"]), mlp["down_proj"])
    x = rms(x, np.asarray(m["norm"]["scale"]))
    return x @ np.asarray(m["embed_tokens"]["embedding"], np.float64).T


def _model(seed=0, **changes):
    model = LlamaForCausalLM(LlamaConfig.tiny(**changes), dtype=jnp.float64, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):  # norms away from 1, so that they matter
        if path[-1] == "scale":
            var.set_value(var[...] + 0.3 * rng.normal(size=var.shape))
    return model, state


def test_logits_equal_a_numpy_llama(x64):
    model, state = _model()
    ids = np.random.default_rng(1).integers(0, 64, (3, 7))
    mask = np.ones((3, 7), int)
    mask[1, 5:] = 0  # padding at the end of the second sequence
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    want = _np_forward(nnx.to_pure_dict(state), model.config, ids, mask)
    # the floor: float32 RoPE angles (numpy's and XLA's cos differ in the last float32 bits)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.max(np.abs(want)))


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_llama_merges_whole_with_its_tied_table(x64, algorithm):
    model, state = _model()
    rng = np.random.default_rng(2)
    fts = [jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape), state) for _ in range(3)]
    cal = [[jnp.asarray(rng.integers(0, 64, (8, 12)))] for _ in fts]
    merged, report = jm.merge(model, state, fts, cal, algorithm=algorithm, strict=True,
                              progress=False)  # fmt: skip
    assert not report.unsolved and not report.fallbacks
    kinds = {r.path: (r.kind, r.form) for r in report.layers}
    assert kinds["model/embed_tokens"] == ("embed", "tied")
    assert len(report.layers) == 1 + 2 * (2 + 7) + 1  # table; per block 2 norms, 7 linears; norm


@pytest.mark.parametrize(
    "changes, match",
    [(dict(num_attention_heads=3), "does not divide hidden_size"),
     (dict(num_key_value_heads=3), "does not divide num_attention_heads"),
     (dict(rope_theta=0.0), "rope_theta must be positive")],
)  # fmt: skip
def test_bad_configs_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.tiny(**changes)


def test_from_dict_refuses_what_the_model_does_not_have():
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 2.0}})


@pytest.mark.parametrize("tied", [True, False])
def test_safetensors_round_trip(tmp_path, tied):
    from safetensors.numpy import load_file

    model = LlamaForCausalLM(LlamaConfig.tiny(tie_word_embeddings=tied), rngs=nnx.Rngs(0))
    path = jm.save_llama_safetensors(model, tmp_path / "llama")
    names = set(load_file(path / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not tied)
    assert "model.layers.1.self_attn.q_proj.weight" in names
    loaded = jm.load_llama_safetensors(path)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 5)))
    assert loaded.config == model.config
    np.testing.assert_array_equal(np.asarray(loaded(ids)), np.asarray(model(ids)))
