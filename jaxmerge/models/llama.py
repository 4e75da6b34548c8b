r"""A Llama decoder in Flax NNX, parameter-compatible with Hugging Face ``LlamaForCausalLM``
(SmolLM2, Llama 2/3 without rope scaling).

Written as the JAX LLM libraries write theirs: pre-norm blocks, grouped-query attention with
rotary position embeddings (the rotate-half convention of Hugging Face), a SiLU-gated MLP,
RMSNorm, and the output head tied to the token embedding by default. For token ids ``t``::

    h⁰ = E[t]
    a  = hˡ + Attn(RMS(hˡ)) W_o          causal softmax attention, q/k rotated, kv heads shared
    hˡ⁺¹ = a + (SiLU(RMS(a) W_g) ⊙ RMS(a) W_u) W_d
    logits = RMS(hᴸ) Eᵀ                   (``tie_word_embeddings``; else ``RMS(hᴸ) W_lm``)

``RMS(x) = x / √(mean(x²) + ε) ⊙ scale`` (``nnx.RMSNorm``). Every projection is an
``nnx.Linear`` without bias, kernel ``(in, out)``; the embedding is ``nnx.Embed`` and the tied
head its ``attend``, so every parameter is a layer the merge solves. Modules are named like the
Hugging Face checkpoint (``model/layers/0/self_attn/q_proj`` ↔
``model.layers.0.self_attn.q_proj``). There is no dropout: the model is deterministic.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, ArrayLike, Float, Int, Real

from ._config import check_positive_ints

__all__ = ["LlamaConfig", "LlamaForCausalLM", "rope"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder; field names and defaults follow Hugging Face's
    ``LlamaConfig`` for SmolLM2-135M.

    Attributes:
        vocab_size: number of token ids.
        hidden_size: width ``d`` of the residual stream.
        num_hidden_layers: number of decoder blocks.
        num_attention_heads: query heads; must divide ``hidden_size``.
        num_key_value_heads: key/value heads; must divide ``num_attention_heads``.
        intermediate_size: width of the gated MLP.
        rms_norm_eps: RMSNorm epsilon.
        rope_theta: the rotary embedding's base.
        tie_word_embeddings: the head reads the token embedding (``Eᵀ``) instead of its own
            ``lm_head`` kernel.

    Examples:
        >>> cfg = LlamaConfig.tiny()
        >>> cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
        (8, 2)
        >>> LlamaConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4,
        ...                        "model_type": "llama"}).head_dim
        16
    """

    vocab_size: int = 49152
    hidden_size: int = 576
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_word_embeddings: bool = True

    def __post_init__(self):
        check_positive_ints(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads {self.num_attention_heads} does not divide "
                f"hidden_size {self.hidden_size}."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_key_value_heads {self.num_key_value_heads} does not divide "
                f"num_attention_heads {self.num_attention_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: the head width {self.head_dim} must be even (RoPE).")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **changes) -> "LlamaConfig":
        """A small config for tests: 2 blocks, width 32, 4 query and 2 key/value heads."""
        fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48)  # fmt: skip
        return cls(**{**fields, **changes})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """The config from a Hugging Face ``config.json`` dict (unknown keys ignored; a missing
        ``num_key_value_heads`` means one per query head, as in Hugging Face).

        Raises:
            ValueError: ``model_type`` is present and is not ``"llama"``, or the config sets a
                feature this model does not have (rope scaling, attention or MLP biases, a head
                width other than ``hidden_size / heads``, an activation other than SiLU).
        """
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"LlamaConfig.from_dict: model_type {d['model_type']!r} is not llama.")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"LlamaConfig.from_dict: hidden_act {d['hidden_act']!r} is not silu.")
        unsupported = [k for k in ("rope_scaling", "attention_bias", "mlp_bias") if d.get(k)]
        if "head_dim" in d and "hidden_size" in d and "num_attention_heads" in d:
            if d["head_dim"] * d["num_attention_heads"] != d["hidden_size"]:
                unsupported.append("head_dim")
        if unsupported:
            raise ValueError(f"LlamaConfig.from_dict: {unsupported} are not supported.")
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in names}
        fields.setdefault("num_key_value_heads", fields.get("num_attention_heads", 9))
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dictionary of this configuration."""
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                "hidden_act": "silu", "head_dim": self.head_dim, "attention_bias": False,
                "mlp_bias": False} | dataclasses.asdict(self)  # fmt: skip


def rope(x: Float[Array, "batch seq heads dim"], positions: Int[Array, "batch seq"], theta: float):
    """Rotary position embedding, rotate-half convention (Hugging Face Llama): the first and
    second halves of each head are the pairs ``(x_i, x_{i + dim/2})``, rotated by
    ``p · θ^(−2i/dim)``; the angles are computed in float32 as Hugging Face does.

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 2, 1, 2))
        >>> [[round(float(v), 4) for v in row]
        ...  for row in rope(x, jnp.array([[0, 1]]), 10000.0)[0, :, 0]]
        [[1.0, 1.0], [-0.3012, 1.3818]]
    """
    half = x.shape[-1] // 2
    inv = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv  # (batch, seq, half)
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _linear(n_in, n_out, dtype, rngs):
    return nnx.Linear(n_in, n_out, use_bias=False, param_dtype=dtype, dtype=dtype, rngs=rngs)


def _norm(c, dtype, rngs):
    return nnx.RMSNorm(c.hidden_size, epsilon=c.rms_norm_eps, param_dtype=dtype, dtype=dtype,
                       rngs=rngs)  # fmt: skip


class _Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, dtype, rngs):
        self.config = c
        d, hd = c.hidden_size, c.head_dim
        self.q_proj = _linear(d, c.num_attention_heads * hd, dtype, rngs)
        self.k_proj = _linear(d, c.num_key_value_heads * hd, dtype, rngs)
        self.v_proj = _linear(d, c.num_key_value_heads * hd, dtype, rngs)
        self.o_proj = _linear(c.num_attention_heads * hd, d, dtype, rngs)

    def __call__(self, x, positions, bias):
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        group = c.num_attention_heads // c.num_key_value_heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(c.head_dim, x.dtype))
        weights = jax.nn.softmax(scores + bias, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, -1)
        return self.o_proj(out)


class _MLP(nnx.Module):
    def __init__(self, c: LlamaConfig, dtype, rngs):
        self.gate_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs)
        self.up_proj = _linear(c.hidden_size, c.intermediate_size, dtype, rngs)
        self.down_proj = _linear(c.intermediate_size, c.hidden_size, dtype, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class _Block(nnx.Module):
    def __init__(self, c: LlamaConfig, dtype, rngs):
        self.input_layernorm = _norm(c, dtype, rngs)
        self.self_attn = _Attention(c, dtype, rngs)
        self.post_attention_layernorm = _norm(c, dtype, rngs)
        self.mlp = _MLP(c, dtype, rngs)

    def __call__(self, x, positions, bias):
        x = x + self.self_attn(self.input_layernorm(x), positions, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nnx.Module):
    def __init__(self, c: LlamaConfig, dtype, rngs):
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, param_dtype=dtype, dtype=dtype,
                                      rngs=rngs)  # fmt: skip
        self.layers = nnx.List([_Block(c, dtype, rngs) for _ in range(c.num_hidden_layers)])
        self.norm = _norm(c, dtype, rngs)

    def __call__(self, input_ids, positions, bias):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, bias)
        return self.norm(x)


class LlamaForCausalLM(nnx.Module):
    """Llama decoder with its language-model head (see the module docs for the maths);
    parameters named like Hugging Face's ``LlamaForCausalLM``.

    Args:
        config: the :class:`LlamaConfig`.
        dtype: the parameters' and computation's dtype.
        rngs: the initialisation's random streams (``nnx.Rngs``).

    Call with ``input_ids (batch, seq)`` and optionally ``attention_mask`` (1 for tokens, 0 for
    padding: padded keys get no attention weight) and ``position_ids`` (default ``0..seq-1``).
    Returns the logits ``(batch, seq, vocab)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> model(jnp.array([[2, 5, 7]])).shape
        (1, 3, 64)
        >>> sorted(nnx.to_pure_dict(nnx.state(model, nnx.Param))["model"]["layers"][0])
        ['input_layernorm', 'mlp', 'post_attention_layernorm', 'self_attn']
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"LlamaForCausalLM: config must be a LlamaConfig, got {config!r}.")
        self.config = config
        self.model = _Decoder(config, dtype, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, dtype, rngs)

    def __call__(
        self,
        input_ids: Int[ArrayLike, "batch seq"],
        attention_mask: Real[ArrayLike, "batch seq"] | None = None,
        position_ids: Int[ArrayLike, "batch seq"] | None = None,
    ) -> Float[Array, "batch seq vocab"]:
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"LlamaForCausalLM: input_ids must be integer (batch, seq), got "
                f"{input_ids.shape} {input_ids.dtype}."
            )
        b, t = input_ids.shape
        mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask)
        positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if position_ids is None else (
            jnp.asarray(position_ids))  # fmt: skip
        for name, a in (("attention_mask", mask), ("position_ids", positions)):
            if a.shape != (b, t):
                raise ValueError(
                    f"LlamaForCausalLM: {name} has shape {a.shape}; expected {(b, t)}."
                )
        dtype = self.model.embed_tokens.embedding.dtype
        keep = jnp.tril(jnp.ones((t, t), bool))[None, None] & mask.astype(bool)[:, None, None, :]
        bias = jnp.where(keep, 0.0, jnp.finfo(dtype).min).astype(dtype)
        h = self.model(input_ids, positions, bias)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)
