"""A BERT encoder in Flax linen, parameter-compatible with Hugging Face ``BertModel``.

The architecture is the original post-LayerNorm BERT (Devlin et al., 2019). For token ids ``t``,
segment ids ``s`` and positions ``p``::

    h⁰ = LN(E_word[t] + E_pos[p] + E_type[s])
    a  = LN(hˡ + Attn(hˡ) W_o + b_o)                   multi-head softmax attention, padding masked
    hˡ⁺¹ = LN(a + GELU(a W_i + b_i) W_o' + b_o')      GELU is the exact erf form by default
    pooled = tanh(h[:, 0] W_p + b_p)                   (optional pooler)

LayerNorm uses ``layer_norm_eps`` (1e-12 for BERT). Every projection is an ``nn.Dense`` with a 2-D
``(in, out)`` kernel, so each one is a layer the merge can solve; modules are named like the
Hugging Face checkpoint (``encoder/layer/0/attention/self/query`` ↔
``encoder.layer.0.attention.self.query``). There is no dropout: the model is deterministic.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Real

from ._config import check_positive_ints

__all__ = ["BertConfig", "BertModel", "BertOutput", "mean_pool"]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder; field names and defaults follow Hugging Face (BERT-base).

    Attributes:
        vocab_size: number of token ids.
        hidden_size: width ``d`` of the residual stream.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: heads per block; must divide ``hidden_size``.
        intermediate_size: width of the feed-forward layer.
        max_position_embeddings: longest sequence.
        type_vocab_size: number of segment ids.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: ``"gelu"`` (exact erf), ``"gelu_new"``/``"gelu_pytorch_tanh"`` (tanh
            approximation) or ``"relu"``.
        add_pooler: whether the model has the ``pooler`` dense layer (``tanh`` on the first token).

    Examples:
        >>> cfg = BertConfig.tiny()
        >>> cfg.hidden_size // cfg.num_attention_heads
        8
        >>> BertConfig.from_dict({"hidden_size": 384, "num_attention_heads": 12,
        ...                       "model_type": "bert"}).head_dim
        32
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    add_pooler: bool = True

    def __post_init__(self):
        check_positive_ints(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig.hidden_act {self.hidden_act!r} is not supported; use one of "
                f"{sorted(_ACTIVATIONS)}."
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides) -> "BertConfig":
        """A 2-layer, 16-wide configuration for tests and examples."""
        fields = dict(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
        return cls(**(fields | overrides))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        """Read a Hugging Face ``config.json`` dictionary; keys this model does not use are ignored.

        Raises:
            ValueError: ``model_type`` is present and is not a BERT-family type, or
                ``position_embedding_type`` is not ``"absolute"``.
        """
        model_type = d.get("model_type", "bert")
        if model_type not in ("bert", "bert-generation"):
            raise ValueError(f"BertConfig.from_dict: model_type {model_type!r} is not BERT.")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                "BertConfig.from_dict: only absolute position embeddings are supported, got "
                f"{d['position_embedding_type']!r}."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dictionary of this configuration."""
        return {"model_type": "bert", "architectures": ["BertModel"]} | dataclasses.asdict(self)


class BertOutput(NamedTuple):
    """Outputs of :class:`BertModel`.

    Attributes:
        last_hidden_state: token representations ``(batch, seq, hidden)``.
        pooler_output: ``tanh(h[:, 0] W_p + b_p)``, ``(batch, hidden)``; ``None`` without pooler.
    """

    last_hidden_state: Float[Array, "batch seq hidden"]
    pooler_output: Float[Array, "batch hidden"] | None


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids):
        c = self.config
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
            + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embeddings")(
                position_ids
            )
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                token_type_ids
            )
        )
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x)


class _SelfAttention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        b, t, _ = x.shape

        def heads(name):  # (b, h, t, d): batch axes leading, the layout XLA's CPU dot is fast on
            y = nn.Dense(c.hidden_size, name=name)(x)
            return y.reshape(b, t, c.num_attention_heads, c.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads("query"), heads("key"), heads("value")
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(c.head_dim) + bias
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        return out.transpose(0, 2, 1, 3).reshape(b, t, c.hidden_size)


class _Output(nn.Module):
    """Dense, residual, LayerNorm: HF's ``BertSelfOutput`` and ``BertOutput``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, residual):
        c = self.config
        x = nn.Dense(c.hidden_size, name="dense")(x)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm")(x + residual)


class _Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        y = _SelfAttention(self.config, name="self")(x, bias)
        return _Output(self.config, name="output")(y, x)


class _Intermediate(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        return _ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name="dense")(x))


class _Layer(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        a = _Attention(self.config, name="attention")(x, bias)
        return _Output(self.config, name="output")(
            _Intermediate(self.config, name="intermediate")(a), a
        )


class _LayerStack(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        for i in range(self.config.num_hidden_layers):
            x = _Layer(self.config, name=str(i))(x, bias)
        return x


class _Encoder(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        return _LayerStack(self.config, name="layer")(x, bias)


class _Pooler(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.config.hidden_size, name="dense")(x[:, 0]))


class BertModel(nn.Module):
    """BERT encoder (see the module docs for the maths); parameters named like Hugging Face.

    Attributes:
        config: the :class:`BertConfig`.

    Call with ``input_ids (batch, seq)`` and optionally ``attention_mask`` (1 for tokens, 0 for
    padding; padded keys get no attention weight), ``token_type_ids`` (default 0) and
    ``position_ids`` (default ``0..seq-1``). Returns a :class:`BertOutput`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> model = BertModel(BertConfig.tiny())
        >>> ids = jnp.array([[2, 5, 7, 0]])
        >>> variables = jax.jit(model.init)(jax.random.key(0), ids)
        >>> out = jax.jit(model.apply)(variables, ids, attention_mask=jnp.array([[1, 1, 1, 0]]))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        ((1, 4, 16), (1, 16))
        >>> sorted(variables["params"]["encoder"]["layer"]["0"]["attention"]["self"])
        ['key', 'query', 'value']
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Int[ArrayLike, "batch seq"],
        attention_mask: Real[ArrayLike, "batch seq"] | None = None,
        token_type_ids: Int[ArrayLike, "batch seq"] | None = None,
        position_ids: Int[ArrayLike, "batch seq"] | None = None,
    ) -> BertOutput:
        c = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"BertModel: input_ids must be integer (batch, seq), got {input_ids.shape} "
                f"{input_ids.dtype}."
            )
        b, t = input_ids.shape
        if t > c.max_position_embeddings:
            raise ValueError(
                f"BertModel: sequence length {t} exceeds max_position_embeddings "
                f"{c.max_position_embeddings}."
            )
        attention_mask = jnp.ones((b, t)) if attention_mask is None else attention_mask
        token_type_ids = jnp.zeros((b, t), jnp.int32) if token_type_ids is None else token_type_ids
        position_ids = (
            jnp.broadcast_to(jnp.arange(t), (b, t)) if position_ids is None else position_ids
        )
        for name, a in (
            ("attention_mask", attention_mask),
            ("token_type_ids", token_type_ids),
            ("position_ids", position_ids),
        ):
            if jnp.shape(a) != (b, t):
                raise ValueError(f"BertModel: {name} has shape {jnp.shape(a)}; expected {(b, t)}.")
        x = _Embeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids)
        keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        bias = jnp.where(keep, 0.0, jnp.finfo(x.dtype).min).astype(x.dtype)
        x = _Encoder(c, name="encoder")(x, bias)
        pooled = _Pooler(c, name="pooler")(x) if c.add_pooler else None
        return BertOutput(x, pooled)


def mean_pool(
    hidden: Float[ArrayLike, "batch seq hidden"], attention_mask: Real[ArrayLike, "batch seq"]
) -> Float[Array, "batch hidden"]:
    """Sentence embeddings: the mean of the token vectors over unmasked tokens.

    ``e_b = Σₜ m_bt h_bt / max(Σₜ m_bt, 1e-9)`` (the sentence-transformers pooling).

    Examples:
        >>> import jax.numpy as jnp
        >>> h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
        >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
        [[2.0, 3.0]]
    """
    hidden = jnp.asarray(hidden)
    m = jnp.asarray(attention_mask).astype(hidden.dtype)
    if m.shape != hidden.shape[:2]:
        raise ValueError(
            f"mean_pool: attention_mask has shape {m.shape}; expected {hidden.shape[:2]}."
        )
    return (hidden * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1e-9)
