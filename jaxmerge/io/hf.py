"""Hugging Face safetensors ↔ Flax parameters: BERT-family encoders (linen) and Llama decoders
(NNX, :func:`load_llama_safetensors`, named as in the Hugging Face checkpoint, see there).

A Hugging Face ``BertModel`` checkpoint names a tensor
``encoder.layer.0.attention.self.query.weight``; :class:`jaxmerge.models.BertModel` names the same
parameter ``encoder/layer/0/attention/self/query/kernel``. The conversion is one rule per leaf:

- a Linear ``*.weight`` ``(out, in)`` ↔ ``*/kernel`` ``(in, out)``, transposed;
- ``*_embeddings.weight`` ↔ ``*_embeddings/embedding``, unchanged;
- ``LayerNorm.weight`` ↔ ``LayerNorm/scale`` (old checkpoints: ``gamma``), unchanged;
- ``*.bias`` ↔ ``*/bias`` (old LayerNorm checkpoints: ``beta``), unchanged.

A ``bert.`` prefix (task-head checkpoints) is dropped and the ``embeddings.position_ids`` buffer is
skipped; any other tensor the model does not have is an error. Arrays keep their dtype (float32 /
float16; bfloat16 needs ``ml_dtypes``, which JAX installs).
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..models.bert import BertConfig, BertModel
from ..models.llama import LlamaConfig, LlamaForCausalLM
from .checkpoint import atomic_directory

__all__ = ["load_bert_safetensors", "load_llama_safetensors", "save_bert_safetensors",
           "save_llama_safetensors"]  # fmt: skip

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_SKIPPED = ("embeddings.position_ids",)


def _leaf_names(module: str) -> dict[str, str]:
    """HF leaf name → Flax leaf name for the module whose last path part is ``module``."""
    if module == "LayerNorm":
        return {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}
    if module.endswith("_embeddings"):
        return {"weight": "embedding"}
    return {"weight": "kernel", "bias": "bias"}


def _expected_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(BertModel(config).init, jax.random.key(0), ids)["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): leaf.shape for path, leaf in flat}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def _name(key) -> str:
    return "/".join(map(str, key))


def _check_shapes(flat: dict, expected: dict, where: str, family: str = "BERT") -> None:
    problems = [f"missing {_name(k)}" for k in expected if k not in flat]
    problems += [f"unexpected {_name(k)}" for k in flat if k not in expected]
    problems += [
        f"{_name(k)} has shape {tuple(np.shape(flat[k]))}, the config needs {expected[k]}"
        for k in expected
        if k in flat and tuple(np.shape(flat[k])) != tuple(expected[k])
    ]
    if problems:
        shown = "; ".join(problems[:20]) + ("; ..." if len(problems) > 20 else "")
        raise ValueError(f"{where}: parameters do not match the {family} config: {shown}.")


def _weights_file(path: Path, caller: str) -> Path:
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{caller}: no safetensors file at {path}.")
    return path


def _read_config(weights: Path, config_type, caller: str):
    config_file = weights.parent / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{caller}: no {CONFIG_NAME} next to {weights}; pass config=.")
    try:
        return config_type.from_dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as error:
        raise ValueError(f"{caller}: {config_file} is not valid JSON: {error}.") from error


def _read_weights(weights: Path, caller: str) -> dict[str, np.ndarray]:
    try:
        return load_file(weights)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{caller}: {weights} is not a readable safetensors file (truncated or corrupted?): "
            f"{error}."
        ) from error


def _kernel(name: str, value, caller: str):
    """A Linear ``weight (out, in)`` as a Flax ``kernel (in, out)``."""
    if value.ndim != 2:
        raise ValueError(
            f"{caller}: {name} has shape {value.shape}; a Linear weight must be 2-D (out, in)."
        )
    return value.T


def load_bert_safetensors(
    path: str | os.PathLike, *, config: BertConfig | None = None
) -> tuple[BertConfig, dict]:
    """Read a Hugging Face BERT checkpoint into :class:`~jaxmerge.models.BertModel` variables.

    Args:
        path: a directory holding ``model.safetensors`` (and usually ``config.json``), or the
            ``.safetensors`` file itself (its directory is searched for ``config.json``).
        config: the model's configuration; by default read from ``config.json``.

    Returns:
        ``(config, variables)`` with ``variables = {"params": ...}`` ready for
        ``BertModel(config).apply(variables, input_ids)``. Arrays are ``jax.Array`` in the file's
        dtype. The file is only read.

    Raises:
        FileNotFoundError: no weights file, or no ``config.json`` and no ``config`` given.
        ValueError: a tensor is missing, unexpected or of the wrong shape for the configuration
            (all differences are listed), or the weights or ``config.json`` cannot be parsed.

    Examples:
        >>> import tempfile, jax, jax.numpy as jnp
        >>> cfg = BertConfig.tiny()
        >>> shapes = jax.eval_shape(BertModel(cfg).init, jax.random.key(0), jnp.zeros((1, 4), int))
        >>> v = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
        >>> d = save_bert_safetensors(v, f"{tempfile.mkdtemp()}/tiny", cfg)
        >>> cfg2, v2 = load_bert_safetensors(d)
        >>> cfg2 == cfg, v2["params"]["pooler"]["dense"]["kernel"].shape
        (True, (16, 16))
    """
    weights = _weights_file(Path(path), "load_bert_safetensors")
    if config is None:
        config = _read_config(weights, BertConfig, "load_bert_safetensors")
    tensors = _read_weights(weights, "load_bert_safetensors")
    flat = {}
    for name, value in tensors.items():
        name = name.removeprefix("bert.")
        if name in _SKIPPED:
            continue
        *module, leaf = name.split(".")
        new_leaf = _leaf_names(module[-1] if module else "").get(leaf, leaf)
        if new_leaf == "kernel":
            value = _kernel(name, value, "load_bert_safetensors")
        flat[(*module, new_leaf)] = value
    expected = _expected_shapes(config)
    _check_shapes(flat, expected, f"load_bert_safetensors({weights})")
    return config, {"params": _unflatten({k: jnp.asarray(v) for k, v in flat.items()})}


def save_bert_safetensors(
    params: Mapping, path: str | os.PathLike, config: BertConfig, *, overwrite: bool = False
) -> Path:
    """Write BERT parameters as a Hugging Face checkpoint directory, atomically.

    The inverse of :func:`load_bert_safetensors`: ``path/model.safetensors`` with HF tensor
    names (Linear kernels transposed back to ``(out, in)``) and ``path/config.json``. Loads with
    ``transformers.BertModel.from_pretrained(path)`` and with :func:`load_bert_safetensors`.

    Args:
        params: :class:`~jaxmerge.models.BertModel` variables ``{"params": ...}`` or the inner
            parameter tree.
        path: destination directory; must not exist unless ``overwrite``.
        config: the model's :class:`~jaxmerge.models.BertConfig`.
        overwrite: replace an existing directory at ``path``.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        ValueError: the parameters do not match ``config``.

    Examples:
        See :func:`load_bert_safetensors`.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"save_bert_safetensors: params must be a mapping, got {type(params).__name__}."
        )
    if set(params) == {"params"}:
        params = params["params"]
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    flat = {tuple(_key(k) for k in p): leaf for p, leaf in leaves}
    _check_shapes(flat, _expected_shapes(config), "save_bert_safetensors")
    tensors = {}
    for (*module, leaf), value in flat.items():
        inverse = {v: k for k, v in _leaf_names(module[-1]).items() if k in ("weight", "bias")}
        value = np.asarray(value)
        tensors[".".join([*module, inverse[leaf]])] = np.ascontiguousarray(
            value.T if leaf == "kernel" else value
        )
    with atomic_directory(path, overwrite=overwrite, what="save_bert_safetensors") as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    return Path(path).absolute()


def _key(k) -> str:
    return str(getattr(k, "key", k))


# ---- Llama (Flax NNX) ---------------------------------------------------------------------------

_LLAMA_SKIPPED = ("rotary_emb.inv_freq",)  # a buffer in older checkpoints


def _llama_leaf(module: str) -> dict[str, str]:
    """HF leaf name → Flax leaf name of a Llama module (its last path part)."""
    if module == "embed_tokens":
        return {"weight": "embedding"}
    if module.endswith("norm"):
        return {"weight": "scale"}
    return {"weight": "kernel"}


def load_llama_safetensors(
    path: str | os.PathLike, *, config: LlamaConfig | None = None, dtype=jnp.float32
) -> LlamaForCausalLM:
    """Read a Hugging Face ``LlamaForCausalLM`` checkpoint into
    :class:`~jaxmerge.models.LlamaForCausalLM`.

    The names map one to one (``model.layers.0.self_attn.q_proj.weight`` ↔
    ``model/layers/0/self_attn/q_proj/kernel``, transposed; ``*norm.weight`` ↔ ``scale``;
    ``embed_tokens.weight`` ↔ ``embedding``). With tied embeddings an ``lm_head.weight`` in the
    file must equal the embedding, and is not kept.

    Args:
        path: a directory holding ``model.safetensors`` (and usually ``config.json``), or the
            ``.safetensors`` file itself (its directory is searched for ``config.json``).
        config: the model's configuration; by default read from ``config.json``.
        dtype: the model's parameter and computation dtype.

    Returns:
        the model. The file is only read.

    Raises:
        FileNotFoundError: no weights file, or no ``config.json`` and no ``config`` given.
        ValueError: a tensor is missing, unexpected or of the wrong shape for the configuration
            (all differences are listed), a tied ``lm_head.weight`` differs from the embedding,
            or the files cannot be parsed.

    Examples:
        >>> import tempfile, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> d = save_llama_safetensors(model, f"{tempfile.mkdtemp()}/tiny")
        >>> loaded = load_llama_safetensors(d)
        >>> ids = jnp.array([[1, 2, 3]])
        >>> bool(jnp.all(loaded(ids) == model(ids)))
        True
    """
    caller = "load_llama_safetensors"
    weights = _weights_file(Path(path), caller)
    config = _read_config(weights, LlamaConfig, caller) if config is None else config
    tensors = _read_weights(weights, caller)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        if not np.array_equal(head, tensors.get("model.embed_tokens.weight")):
            raise ValueError(
                f"{caller}({weights}): lm_head.weight differs from model.embed_tokens.weight, "
                "but the config ties them (tie_word_embeddings)."
            )
    flat = {}
    for name, value in tensors.items():
        if name.endswith(_LLAMA_SKIPPED):
            continue
        *module, leaf = name.split(".")
        new_leaf = _llama_leaf(module[-1] if module else "").get(leaf, leaf)
        if new_leaf == "kernel":
            value = _kernel(name, value, caller)
        flat[(*(int(m) if m.isdigit() else m for m in module), new_leaf)] = value
    model = LlamaForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    variables = dict(nnx.to_flat_state(state))
    _check_shapes(flat, {k: v.shape for k, v in variables.items()}, f"{caller}({weights})",
                  "Llama")  # fmt: skip
    for key, value in flat.items():
        variables[key].set_value(jnp.asarray(value, dtype))
    nnx.update(model, state)
    return model


def save_llama_safetensors(
    model: LlamaForCausalLM, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a :class:`~jaxmerge.models.LlamaForCausalLM` as a Hugging Face checkpoint
    directory, atomically: ``path/model.safetensors`` (Linear kernels back to ``(out, in)``; no
    ``lm_head.weight`` when the head is tied, as Hugging Face saves tied models) and
    ``path/config.json``. The inverse of :func:`load_llama_safetensors`; loads with
    ``transformers.LlamaForCausalLM.from_pretrained(path)``.

    Args:
        model: the model (its current parameters are written).
        path: destination directory; must not exist unless ``overwrite``.
        overwrite: replace an existing directory at ``path``.

    Returns:
        The absolute path written.

    Raises:
        TypeError: ``model`` is not a ``LlamaForCausalLM``.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(
            f"save_llama_safetensors: model must be a LlamaForCausalLM, got {type(model).__name__}."
        )
    tensors = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        *module, leaf = map(str, key)
        inverse = {v: k for k, v in _llama_leaf(module[-1]).items()}
        value = np.asarray(var[...])
        tensors[".".join([*module, inverse[leaf]])] = np.ascontiguousarray(
            value.T if leaf == "kernel" else value
        )
    with atomic_directory(path, overwrite=overwrite, what="save_llama_safetensors") as tmp:
        tmp.mkdir()
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return Path(path).absolute()
