"""``jaxmerge.io.gguf.load_llama_gguf`` on GGUF files written here the way llama.cpp's converter
writes a Hugging Face Llama (``gguf.GGUFWriter``; linear weights ``(out, in)``, query and key rows
permuted for interleaved RoPE): the loaded model gives the original's logits."""

import hashlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")

from jaxmerge.io.gguf import load_llama_gguf  # noqa: E402
from jaxmerge.models import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _permute(w, heads):
    """llama.cpp ``convert_hf_to_gguf`` ``LlamaModel.permute`` (rows for interleaved RoPE)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)  # fmt: skip


def _write(path, model, quantize=False):
    """``model`` written as llama.cpp writes a Hugging Face Llama (tied: no ``output.weight``)."""
    c = model.config
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(64)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)

    def add(name, a):
        a = np.ascontiguousarray(np.asarray(a, np.float32))
        if quantize and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    m = p["model"]
    add("token_embd.weight", m["embed_tokens"]["embedding"])
    add("output_norm.weight", m["norm"]["scale"])
    for i, block in m["layers"].items():
        a, mlp = block["self_attn"], block["mlp"]
        add(f"blk.{i}.attn_norm.weight", block["input_layernorm"]["scale"])
        add(f"blk.{i}.ffn_norm.weight", block["post_attention_layernorm"]["scale"])
        add(f"blk.{i}.attn_q.weight", _permute(np.asarray(a["q_proj"]["kernel"]).T,
                                               c.num_attention_heads))  # fmt: skip
        add(f"blk.{i}.attn_k.weight", _permute(np.asarray(a["k_proj"]["kernel"]).T,
                                               c.num_key_value_heads))  # fmt: skip
        add(f"blk.{i}.attn_v.weight", np.asarray(a["v_proj"]["kernel"]).T)
        add(f"blk.{i}.attn_output.weight", np.asarray(a["o_proj"]["kernel"]).T)
        for short, name in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"),
                            ("ffn_down", "down_proj")):  # fmt: skip
            add(f"blk.{i}.{short}.weight", np.asarray(mlp[name]["kernel"]).T)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)))


@pytest.fixture(scope="module")
def original():
    # width 64 (head 16): rows of 32 values, as Q8_0's blocks need
    return LlamaForCausalLM(LlamaConfig.tiny(hidden_size=64, intermediate_size=96),
                            rngs=nnx.Rngs(0))  # fmt: skip


def test_a_gguf_loads_as_the_model_it_was_written_from(original, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path, original)
    before = path.read_bytes()
    digest = hashlib.sha256(before).hexdigest()
    loaded = load_llama_gguf(path, sha256=digest)
    assert loaded.config == original.config
    np.testing.assert_array_equal(np.asarray(loaded(IDS)), np.asarray(original(IDS)))
    assert path.read_bytes() == before  # only read


def test_a_quantized_gguf_loads_within_its_rounding(original, tmp_path):
    path = tmp_path / "tiny-q8.gguf"
    _write(path, original, quantize=True)
    got, want = np.asarray(load_llama_gguf(path)(IDS)), np.asarray(original(IDS))
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert 0 < err < 2e-2  # Q8_0: 8-bit weights per block of 32


def test_bad_files_are_named(original, tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path, original)
    with pytest.raises(ValueError, match="has sha256 .*, expected 00"):
        load_llama_gguf(path, sha256="00" * 32)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_llama_gguf(tmp_path / "missing.gguf")
