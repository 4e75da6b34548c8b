"""Miniatures of the layer classes of three JAX LLM libraries, for the test suite (read-only).

The real libraries are not installed in the project's environment (gemma and MaxText need Python
>= 3.12 and jax >= 0.11; EasyDeL pins jax ~= 0.9 and needs PyTorch for its model imports), so these
re-implement the classes a merge meets in their models:

* **gemma 4.0.1** (Google DeepMind, Flax linen, ``gemma.gm.nn``): ``_layers.Einsum`` (called as
  ``(eqn, x)``, weight ``w`` of shape ``shape``), ``_layers.RMSNorm`` (gain ``1 + scale``),
  ``_modules.Embedder`` (``encode`` scales by ``sqrt(embed_dim)``, ``decode`` is the tied head),
  ``_modules.Attention`` (``qkv_einsum`` or ``q_einsum`` + ``kv_einsum``, ``attn_vec_einsum``,
  optional query/key norms), ``_modules.FeedForward`` (``gating_einsum`` and ``linear`` sharing
  its scope through ``nn.share_scope``), ``_modules.Block``.
* **MaxText 0.2.5** (Flax NNX): ``layers.linears.DenseGeneral``, ``layers.normalizations.RMSNorm``
  (gain ``scale + scale_offset``), ``layers.embeddings.Embed`` (lookup, ``attend``).
* **EasyDeL 0.3.0** (Flax NNX): ``layers.linears._linear.{ParallelLinear, ColumnParallelLinear,
  RowParallelLinear}`` (kernel ``(in, out)``, optional bias, ``w=`` override),
  ``layers.norms._norms.RMSNorm`` (scale named ``kernel``), ``layers.embeddings._embeddings.Embed``.

Each mirrored class carries the real class's ``__module__``, ``__qualname__`` and ``__name__``,
so a registry that matches classes by qualified name sees them exactly as it would the real
ones (and linen names an unnamed ``Einsum`` ``Einsum_0`` as gemma does). Parameter names, shapes,
initialisers, call signatures and forward formulas are the real ones; left out: quantization,
sharding annotations and sharded-output arguments (accepted, ignored), KV caches, vision
towers, dropout, and gemma's bfloat16 parameter default (set by a patch of linen's
``Module.param`` that gemma installs on import; parameters here are float32). The composed
models (``GemmaTransformer``, ``MaxTextTransformer``, ``EasyDeLForCausalLM``) build their blocks
the way each library does and keep the real parameter trees, but their top-level call
signatures are simplified, so they are not mirrored.
The lifted transforms are opt-in: ``GemmaTransformerJit`` (``nn.jit`` on ``__call__``, as gemma's
``Transformer``), ``GemmaTransformer(remat=True | scan=True)``, ``MaxTextTransformer(layers=...)``
(MaxText's ``jax.checkpoint`` per layer, its ``scan_layers`` stack, or ``nnx.scan`` /
``nnx.remat``), ``EasyDeLForCausalLM(remat=True)`` (``nnx.remat`` on the decoder layer's
``__call__``, as EasyDeL's ``auto_remat``).

How they were checked (throwaway scripts, not in the suite): in a Python 3.12 environment with
the real gemma 4.0.1 and MaxText 0.2.5 (``benchmarks/ecosystem/setup.sh``; jax 0.11.1, flax
0.12.9) the real classes were run on fixed inputs and parameters and the results saved to
``.npz``; in the project's environment the mimics were given the same parameters and inputs
(float32, CPU), every parameter tree matched path for path and shape for shape. Layers, all
bit-identical: gemma ``Einsum`` (the six attention and feed-forward equations), ``RMSNorm`` (on
``[B, T, D]`` and ``[B, T, N, H]``), ``Embedder.encode``/``decode``; MaxText ``DenseGeneral``
(``axis=-1`` with one and two output axes, ``axis=(-2, -1)``, ``axis=(1, 2)``, with and without
bias; its initial kernel from the same key too), ``RMSNorm`` with ``scale_offset`` 0 and 1,
``Embed`` lookup and ``attend``. Models, relative error ≤ 3.3e-7: the tiny Gemma 2 (GQA, soft
caps, sliding window), Gemma 3 (MQA, query/key norms, transposed gating) and MHA
(``qkv_einsum``) ``Transformer`` on a batch with padding, against ``GemmaTransformer``,
``GemmaTransformerJit`` and ``remat=True``; the tiny ``decoder_block=llama2`` MaxText model
(unscanned with ``remat_policy`` ``full`` and ``none``, ``scan_layers=True``,
``logits_via_embedding=True``) against ``MaxTextTransformer`` in the matching layer modes
(``"checkpoint"`` and ``"nnx_remat"`` too). EasyDeL could not be installed there: its
``ParallelLinear.native_forward``, ``RMSNorm.__call__``/``_norm`` and ``Embed.__call__``/
``attend`` bodies, taken from the 0.3.0 wheel's source with ``ast``, were run on stand-in objects
against the mimics (bias or not, ``scale`` 1 and ``'fan_in'``, ``w=``, 1-D and 3-D inputs,
float32/bfloat16 norms): bit-identical. The composed EasyDeL blocks (attention, MLP, decoder
layer, causal LM) follow EasyDeL's Llama source but were not run against it.
"""

import dataclasses
import enum
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax


def _mirrors(qualified: str):
    """Give a class the module, qualified name and name of the library class it mirrors."""
    module, _, qualname = qualified.rpartition(".")

    def rename(cls):
        local = cls.__qualname__
        for value in vars(cls).values():
            fn = getattr(value, "__func__", value)
            if callable(fn) and getattr(fn, "__qualname__", "").startswith(local + "."):
                fn.__qualname__ = qualname + fn.__qualname__[len(local) :]
        cls.__module__, cls.__qualname__ = module, qualname
        cls.__name__ = qualname.rpartition(".")[2]
        return cls

    return rename


# ==== gemma 4.0.1 (Flax linen) =================================================================

K_MASK = -2.3819763e38  # gemma's masked-logit value


class AttentionType(enum.Enum):
    """``gemma.gm.nn._modules.AttentionType``."""

    GLOBAL = enum.auto()
    LOCAL_SLIDING = enum.auto()


@_mirrors("gemma.gm.nn._layers.Einsum")
class GemmaEinsum(nn.Module):
    """gemma ``Einsum``: ``jnp.einsum(eqn, x, w)``, ``w = param(weight_name, initializer, shape)``.

    The layer input is the second positional argument (``__call__(eqn, x)``); the kernel layout
    is whatever ``shape`` and ``eqn`` say (not ``(in, out)``); no bias.
    """

    shape: tuple[int, ...]
    weight_name: str = "w"
    initializer: nn.initializers.Initializer = nn.initializers.normal()
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param(self.weight_name, self.initializer, self.shape, self.dtype)
        return jnp.einsum(eqn, x, w)


@_mirrors("gemma.gm.nn._layers.RMSNorm")
class GemmaRMSNorm(nn.Module):
    """gemma ``RMSNorm``: ``x * rsqrt(mean(x², -1) + 1e-6) * (1 + scale)``, ``scale`` zeros-init.

    Epsilon fixed, reduction over the last axis, computed in the input's dtype.
    """

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1]))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        normed_inputs = x * jax.lax.rsqrt(var + 1e-06)
        scale = jnp.expand_dims(scale, axis=range(len(x.shape) - 1))
        return normed_inputs * (1 + scale)


@_mirrors("gemma.gm.nn._modules.Embedder")
class GemmaEmbedder(nn.Module):
    """gemma ``Embedder`` (text only): ``input_embedding (vocab_size, embed_dim)``.

    ``encode(x) = table[x] * sqrt(embed_dim)``; ``decode(x) = x @ table.T`` (the tied head).
    """

    vocab_size: int
    embed_dim: int

    def setup(self):
        self.input_embedding_table = self.param(
            "input_embedding", nn.initializers.normal(), (self.vocab_size, self.embed_dim)
        )

    def encode(self, x: jax.Array) -> jax.Array:
        x = self.input_embedding_table[(x,)]
        x *= jnp.sqrt(self.embed_dim).astype(x.dtype)
        return x

    def decode(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.input_embedding_table.T)


def apply_rope(inputs, positions, *, base_frequency, scale_factor=1.0):
    """gemma ``gm.math._positional_embeddings.apply_rope`` (split-halves rotation)."""
    head_dim = inputs.shape[-1]
    freq_exponents = (2.0 / head_dim) * jnp.arange(0, head_dim // 2, dtype=jnp.float32)
    timescale = base_frequency**freq_exponents
    sinusoid_inp = positions[..., jnp.newaxis] / timescale[jnp.newaxis, jnp.newaxis, :]
    sinusoid_inp = sinusoid_inp[..., jnp.newaxis, :] / scale_factor
    sin, cos = jnp.sin(sinusoid_inp), jnp.cos(sinusoid_inp)
    first_half, second_half = jnp.split(inputs, 2, axis=-1)
    first_part = first_half * cos - second_half * sin
    second_part = second_half * cos + first_half * sin
    return jnp.concatenate([first_part, second_part], axis=-1).astype(inputs.dtype)


def _sliding_mask(positions, sliding_window_size):
    cache_positions = positions[..., None, :]
    positions = positions[..., :, None]
    mask = cache_positions > positions - sliding_window_size
    return mask * (cache_positions < positions + sliding_window_size)


@_mirrors("gemma.gm.nn._modules.Attention")
class GemmaAttention(nn.Module):
    """gemma ``Attention`` without a KV cache (``cache`` must be ``None``).

    ``num_kv_heads == num_heads``: ``qkv_einsum (3, N, D, H)``, ``'BTD,SNDH->SBTNH'``; otherwise
    ``q_einsum (N, D, H)``, ``'BTD,NDH->BTNH'`` and ``kv_einsum (2, K, D, H)``,
    ``'BSD,CKDH->CBSKH'``; ``attn_vec_einsum (N, H, D)``, ``'BTNH,NHD->BTD'``. Query/key RMSNorms
    (``_query_norm``, ``_key_norm``) before RoPE; queries scaled by ``query_pre_attn_scalar``.
    gemma's parameter-free ``attention_weights`` (kauldron ``Identity``) on the probabilities is
    left out.
    """

    num_heads: int
    num_kv_heads: int
    features: int
    head_dim: int
    attn_type: AttentionType
    query_pre_attn_scalar: float
    rope_base_frequency: int = 10_000
    rope_scale_factor: float = 1.0
    attn_logits_soft_cap: float | None = None
    sliding_window_size: int | None = None
    use_qk_norm: bool = False

    @property
    def use_qkv_einsum(self):
        return self.num_kv_heads == self.num_heads

    @property
    def use_gqa(self):
        return self.num_kv_heads != self.num_heads and self.num_kv_heads > 1

    def setup(self):
        self.attn_vec_einsum = GemmaEinsum(shape=(self.num_heads, self.head_dim, self.features))
        if self.use_qkv_einsum:
            self.qkv_einsum = GemmaEinsum(shape=(3, self.num_heads, self.features, self.head_dim))
        else:
            self.q_einsum = GemmaEinsum(shape=(self.num_heads, self.features, self.head_dim))
            self.kv_einsum = GemmaEinsum(shape=(2, self.num_kv_heads, self.features, self.head_dim))
        if self.use_qk_norm:
            self._query_norm = GemmaRMSNorm()
            self._key_norm = GemmaRMSNorm()

    def __call__(self, x, segment_pos, cache, attn_mask):
        if cache is not None:
            raise NotImplementedError("GemmaAttention (test mimic) has no KV cache.")
        if self.use_qkv_einsum:
            query_proj, key_proj, value_proj = self.qkv_einsum("BTD,SNDH->SBTNH", x)
        else:
            query_proj = self.q_einsum("BTD,NDH->BTNH", x)
            key_proj, value_proj = self.kv_einsum("BSD,CKDH->CBSKH", x)
        if self.use_qk_norm:
            query_proj = self._query_norm(query_proj)
            key_proj = self._key_norm(key_proj)
        rope = functools.partial(
            apply_rope, base_frequency=self.rope_base_frequency, scale_factor=self.rope_scale_factor
        )
        query_scaled = rope(query_proj, segment_pos) * self.query_pre_attn_scalar
        key_proj = rope(key_proj, segment_pos)

        if self.use_gqa:
            b, t, kg, h = query_scaled.shape
            query_scaled = query_scaled.reshape(
                (b, t, self.num_kv_heads, kg // self.num_kv_heads, h)
            )
            logits = jnp.einsum("BTKGH,BSKH->BTKGS", query_scaled, key_proj)
            logits = logits.reshape((b, t, kg, logits.shape[-1]))
        else:
            logits = jnp.einsum("BTNH,BSNH->BTNS", query_scaled, key_proj)
        if self.attn_logits_soft_cap is not None:
            logits = jnp.tanh(logits / self.attn_logits_soft_cap) * self.attn_logits_soft_cap
        if self.attn_type == AttentionType.LOCAL_SLIDING:
            if self.sliding_window_size is None:
                raise ValueError("Sliding_window_size must be set if Local Sliding attention type")
            attn_mask = attn_mask * _sliding_mask(segment_pos, self.sliding_window_size)
        padded_logits = jnp.where(jnp.expand_dims(attn_mask, -2), logits, K_MASK)
        probs = jax.nn.softmax(padded_logits, axis=-1).astype(key_proj.dtype)
        if self.use_gqa:
            b, t, kg, s = probs.shape
            probs = probs.reshape((b, t, self.num_kv_heads, kg // self.num_kv_heads, s))
            encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, value_proj)
            encoded = encoded.reshape((b, t, kg, encoded.shape[-1]))
        else:
            encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, value_proj)
        return None, self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


@_mirrors("gemma.gm.nn._modules.FeedForward")
class GemmaFeedForward(nn.Module):
    """gemma ``FeedForward``: ``linear(gelu(g₀) * g₁)``, ``g = gating_einsum(x)``.

    Both Einsums share this module's scope (``nn.share_scope``), so the weights are
    ``gating_einsum`` (``(2, features, hidden)``, or ``(2, hidden, features)`` when
    ``transpose_gating_einsum``) and ``linear`` ``(hidden, features)`` directly under this module.
    """

    features: int
    hidden_dim: int
    transpose_gating_einsum: bool

    @nn.compact
    def __call__(self, x):
        if self.transpose_gating_einsum:
            eq = "...F,NHF->...NH"
            gating = GemmaEinsum(
                shape=(2, self.hidden_dim, self.features), weight_name="gating_einsum"
            )
        else:
            eq = "...F,NFH->...NH"
            gating = GemmaEinsum(
                shape=(2, self.features, self.hidden_dim), weight_name="gating_einsum"
            )
        nn.share_scope(self, gating)
        gate = gating(eq, x)
        activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = GemmaEinsum(shape=(self.hidden_dim, self.features), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", activations)


@_mirrors("gemma.gm.nn._modules.Block")
class GemmaBlock(nn.Module):
    """gemma ``Block``: ``h = x + post_attn_norm(attn(pre_attn_norm(x)))``, then
    ``h + post_ffw_norm(mlp(pre_ffw_norm(h)))`` (post norms optional)."""

    num_heads: int
    num_kv_heads: int
    embed_dim: int
    head_dim: int
    hidden_dim: int
    use_post_attn_norm: bool
    use_post_ffw_norm: bool
    attn_type: AttentionType
    query_pre_attn_scalar: float
    transpose_gating_einsum: bool
    rope_base_frequency: int = 10_000
    rope_scale_factor: float = 1.0
    attn_logits_soft_cap: float | None = None
    sliding_window_size: int | None = None
    use_qk_norm: bool = False

    def setup(self):
        self.pre_attention_norm = GemmaRMSNorm()
        self.attn = GemmaAttention(
            num_heads=self.num_heads,
            features=self.embed_dim,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            attn_type=self.attn_type,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            rope_base_frequency=self.rope_base_frequency,
            rope_scale_factor=self.rope_scale_factor,
            attn_logits_soft_cap=self.attn_logits_soft_cap,
            sliding_window_size=self.sliding_window_size,
            use_qk_norm=self.use_qk_norm,
        )
        self.post_attention_norm = GemmaRMSNorm() if self.use_post_attn_norm else None
        self.pre_ffw_norm = GemmaRMSNorm()
        self.mlp = GemmaFeedForward(
            features=self.embed_dim,
            hidden_dim=self.hidden_dim,
            transpose_gating_einsum=self.transpose_gating_einsum,
        )
        self.post_ffw_norm = GemmaRMSNorm() if self.use_post_ffw_norm else None

    def __call__(self, x, segment_pos, cache, attn_mask):
        cache, attn_output = self.attn(self.pre_attention_norm(x), segment_pos, cache, attn_mask)
        if self.post_attention_norm is not None:
            attn_output = self.post_attention_norm(attn_output)
        attn_output += x
        outputs = self.mlp(self.pre_ffw_norm(attn_output))
        if self.post_ffw_norm is not None:
            outputs = self.post_ffw_norm(outputs)
        return cache, outputs + attn_output


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """The fields of ``gemma.gm.nn._config.TransformerConfig`` the text model uses."""

    num_embed: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    final_logit_softcap: float | None
    use_post_attn_norm: bool
    use_post_ffw_norm: bool
    attention_types: tuple[AttentionType, ...]
    attn_logits_soft_cap: float | None = None
    sliding_window_size: int | None = None
    transpose_gating_einsum: bool = False
    use_qk_norm: bool = False
    local_base_frequency: int = 10_000
    global_base_frequency: int = 10_000

    def query_pre_attn_scalar(self) -> float:
        return self.head_dim**-0.5  # gemma's default BY_ONE_OVER_SQRT_HEAD_DIM

    def block_kwargs(self, attn_type: AttentionType) -> dict:
        local = attn_type == AttentionType.LOCAL_SLIDING
        return dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            embed_dim=self.embed_dim,
            head_dim=self.head_dim,
            hidden_dim=self.hidden_dim,
            sliding_window_size=self.sliding_window_size,
            use_post_attn_norm=self.use_post_attn_norm,
            use_post_ffw_norm=self.use_post_ffw_norm,
            attn_logits_soft_cap=self.attn_logits_soft_cap,
            attn_type=attn_type,
            query_pre_attn_scalar=self.query_pre_attn_scalar(),
            transpose_gating_einsum=self.transpose_gating_einsum,
            use_qk_norm=self.use_qk_norm,
            rope_base_frequency=self.local_base_frequency if local else self.global_base_frequency,
        )


_G, _L = AttentionType.GLOBAL, AttentionType.LOCAL_SLIDING
# Gemma 2 style: GQA (q_einsum + kv_einsum), logit soft caps, post norms, (local, global).
GEMMA2_TINY = GemmaConfig(
    num_embed=32, embed_dim=16, hidden_dim=32, num_heads=4, head_dim=4, num_kv_heads=2,
    final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True,
    attention_types=(_L, _G), attn_logits_soft_cap=50.0, sliding_window_size=4,
)  # fmt: skip
# Gemma 3 style: MQA (one kv head), query/key norms, transposed gating, no caps.
GEMMA3_TINY = GemmaConfig(
    num_embed=32, embed_dim=16, hidden_dim=32, num_heads=4, head_dim=4, num_kv_heads=1,
    final_logit_softcap=None, use_post_attn_norm=True, use_post_ffw_norm=True,
    attention_types=(_L, _G), sliding_window_size=4, transpose_gating_einsum=True,
    use_qk_norm=True, global_base_frequency=1_000_000,
)  # fmt: skip
# MHA (num_kv_heads == num_heads): the fused qkv_einsum; uniform layers, so it also scans.
GEMMA_MHA_TINY = GemmaConfig(
    num_embed=32, embed_dim=16, hidden_dim=32, num_heads=4, head_dim=4, num_kv_heads=4,
    final_logit_softcap=None, use_post_attn_norm=False, use_post_ffw_norm=False,
    attention_types=(_G, _G),
)  # fmt: skip


class _GemmaScanStep(nn.Module):
    """One ``nn.scan`` step: a ``Block`` named ``block``, the hidden state as the carry."""

    config: GemmaConfig
    attn_type: AttentionType

    @nn.compact
    def __call__(self, x, segment_pos, attn_mask):
        block = GemmaBlock(name="block", **self.config.block_kwargs(self.attn_type))
        _, x = block(x, segment_pos, None, attn_mask)
        return x, None


class GemmaTransformer(nn.Module):
    """gemma's text ``Transformer`` (``__call__(tokens) -> logits``), parameters as gemma's.

    ``embedder``, ``layer_{i}`` (``Block``), ``final_norm``; pad id 0 sets positions
    (``cumsum - 1``) and the causal mask; logits ``embedder.decode`` then ``final_logit_softcap``.
    No lifted transform by default (gemma wraps ``__call__`` in ``nn.jit``:
    :class:`GemmaTransformerJit`). ``remat=True`` applies ``nn.remat`` to each block;
    ``scan=True`` runs the blocks under ``nn.scan`` (``layers/block/...``, stacked on axis 0;
    needs one attention type) — neither is in gemma's text model.
    """

    config: GemmaConfig
    remat: bool = False
    scan: bool = False

    def setup(self):
        cfg = self.config
        self.embedder = GemmaEmbedder(vocab_size=cfg.num_embed, embed_dim=cfg.embed_dim)
        if self.scan:
            if len(set(cfg.attention_types)) != 1:
                raise ValueError("GemmaTransformer(scan=True) needs one attention type.")
            step = nn.remat(_GemmaScanStep) if self.remat else _GemmaScanStep
            scanned = nn.scan(
                step,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=len(cfg.attention_types),
            )
            self.layers = scanned(config=cfg, attn_type=cfg.attention_types[0])
        else:
            block = nn.remat(GemmaBlock) if self.remat else GemmaBlock
            self.blocks = [
                block(name=f"layer_{i}", **cfg.block_kwargs(attn_type))
                for i, attn_type in enumerate(cfg.attention_types)
            ]
        self.final_norm = GemmaRMSNorm()

    def __call__(self, tokens):
        return self.logits(tokens)

    def logits(self, tokens):
        inputs_mask = tokens != 0
        positions = jnp.cumsum(inputs_mask, axis=-1)
        positions = positions - (positions >= 1)
        length = tokens.shape[-1]
        attn_mask = inputs_mask[..., None, :] * jnp.tril(jnp.ones((length, length), bool))[None]
        x = self.embedder.encode(tokens)
        if self.scan:
            x, _ = self.layers(x, positions, attn_mask)
        else:
            for block in self.blocks:
                _, x = block(x, positions, None, attn_mask)
        logits = self.embedder.decode(self.final_norm(x))
        cap = self.config.final_logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap


class GemmaTransformerJit(GemmaTransformer):
    """:class:`GemmaTransformer` with ``__call__`` under ``nn.jit``, as gemma's ``Transformer``."""

    @functools.partial(nn.jit, static_argnames=("self",))
    def __call__(self, tokens):
        return self.logits(tokens)


# ==== MaxText 0.2.5 (Flax NNX) ===================================================================


def nd_dense_init(scale, mode, distribution):
    """MaxText ``initializers.nd_dense_init``: variance scaling with in/out axes given per call."""

    def init_fn(key, shape, dtype, in_axis, out_axis):
        fn = jax.nn.initializers.variance_scaling(scale, mode, distribution, in_axis, out_axis)
        return fn(key, shape, dtype)

    return init_fn


_DENSE_INIT = nd_dense_init(1.0, "fan_in", "truncated_normal")


def default_embed_init(key, shape, dtype=jnp.float32):
    """MaxText ``initializers.default_embed_init``."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)(
        key, shape, dtype
    )


def _canonicalize_tuple(x):
    return tuple(x) if isinstance(x, Iterable) else (x,)


def _normalize_axes(axes, ndim):
    return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


@_mirrors("maxtext.layers.linears.DenseGeneral")
class MaxTextDenseGeneral(nnx.Module):
    """MaxText ``DenseGeneral``: contracts ``inputs``' axes ``axis`` with the kernel's leading axes.

    ``kernel (*in_features_shape, *out_features_shape)``, init ``kernel_init(key, shape, dtype,
    in_axis, out_axis)``; ``bias (*out_features_shape,)`` zeros if ``use_bias`` (else ``None``).
    ``y = dot_general(inputs, kernel, ((axis, range(len(axis))), ((), ()))) + bias``, with inputs,
    kernel and bias cast to ``dtype``; outputs: the other input axes in order, then the out
    features. No quantization (``quant`` must be ``None``; ``kernel_scale`` is ``None``).
    """

    def __init__(
        self,
        in_features_shape,
        out_features_shape,
        axis=-1,
        weight_dtype=jnp.float32,
        dtype=jnp.float32,
        kernel_init=_DENSE_INIT,
        kernel_axes=(),
        quant=None,
        use_bias=False,
        shard_mode=None,
        matmul_precision="default",
        *,
        rngs: nnx.Rngs,
    ):
        if quant is not None:
            raise NotImplementedError("MaxTextDenseGeneral (test mimic) has no quantization.")
        self.in_features_shape = _canonicalize_tuple(in_features_shape)
        self.out_features_shape = _canonicalize_tuple(out_features_shape)
        self.axis = _canonicalize_tuple(axis)
        self.weight_dtype, self.dtype = weight_dtype, dtype
        self.kernel_axes, self.quant, self.use_bias = kernel_axes, quant, use_bias
        self.kernel_init, self.shard_mode, self.matmul_precision = (
            kernel_init,
            shard_mode,
            matmul_precision,
        )
        kernel_shape = self.in_features_shape + self.out_features_shape
        n_in, n_out = len(self.axis), len(self.out_features_shape)
        kernel = kernel_init(
            rngs.params(),
            kernel_shape,
            weight_dtype,
            np.arange(n_in),
            np.arange(n_in, n_in + n_out),
        )
        self.kernel = nnx.Param(kernel.astype(weight_dtype))
        if use_bias:
            self.bias = nnx.Param(jnp.zeros(self.out_features_shape, weight_dtype))
        else:
            self.bias = None
        self.kernel_scale = None

    def __call__(self, inputs, _initializing=False, out_sharding=None, slice_bounds=None):
        inputs = jnp.asarray(inputs, self.dtype)
        norm_axis = _normalize_axes(self.axis, inputs.ndim)
        for i, ax in enumerate(norm_axis):
            if inputs.shape[ax] != self.in_features_shape[i]:
                raise ValueError(
                    f"Input dimension {inputs.shape[ax]} at axis {ax} "
                    f"does not match expected input feature size {self.in_features_shape[i]}"
                )
        kernel = jnp.asarray(self.kernel[...], self.dtype)
        bias = None if self.bias is None else jnp.asarray(self.bias[...], self.dtype)
        if slice_bounds is not None:
            begin, end = slice_bounds
            kernel = kernel[..., begin:end]
            bias = None if bias is None else bias[..., begin:end]
        contract_ind = tuple(range(len(self.axis)))
        output = lax.dot_general(
            inputs,
            kernel,
            ((norm_axis, contract_ind), ((), ())),
            precision=lax.Precision(self.matmul_precision),
        )
        return output if bias is None else output + bias


@_mirrors("maxtext.layers.normalizations.RMSNorm")
class MaxTextRMSNorm(nnx.Module):
    """MaxText ``RMSNorm``: ``x̂ = x * rsqrt(mean(x², -1) + epsilon)`` in float32, times
    ``scale + scale_offset`` (``scale`` ones-init; ``with_scale=False``: no scale)."""

    def __init__(
        self,
        num_features,
        epsilon=1e-6,
        dtype=jnp.float32,
        weight_dtype=jnp.float32,
        shard_mode=None,
        kernel_axes=(),
        scale_init=jax.nn.initializers.ones,
        parameter_memory_host_offload=False,
        scale_offset=0.0,
        with_scale=True,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_features, self.epsilon = num_features, epsilon
        self.dtype, self.weight_dtype = dtype, weight_dtype
        self.shard_mode, self.kernel_axes, self.scale_init = shard_mode, kernel_axes, scale_init
        self.scale_offset, self.with_scale = scale_offset, with_scale
        if with_scale:
            self.scale = nnx.Param(scale_init(rngs.params(), (num_features,), weight_dtype))
        else:
            self.scale = None

    def __call__(self, x, out_sharding=None):
        x = jnp.asarray(x, jnp.float32)
        mean2 = jnp.mean(lax.square(x), axis=-1, keepdims=True)
        y = jnp.asarray(x * lax.rsqrt(mean2 + self.epsilon), self.dtype)
        if not self.with_scale:
            return y
        effective_scale = jnp.asarray(self.scale[...], jnp.float32) + self.scale_offset
        if self.scale_offset != 0.0:
            normed_fp32 = x * lax.rsqrt(mean2 + self.epsilon)
            y = jnp.einsum("...k,k->...k", normed_fp32, effective_scale)
            return jnp.asarray(y, self.dtype)
        return jnp.einsum("...k,k->...k", y, jnp.asarray(effective_scale, self.dtype))


def attend_on_embedding(query, embedding_table, attend_dtype, config=None, out_sharding=None):
    """MaxText ``embeddings.attend_on_embedding``: ``query @ bf16(table).T`` (table rounded to
    bfloat16 even in a float32 model), accumulated in ``attend_dtype``."""
    return jnp.dot(
        query, jnp.asarray(embedding_table, jnp.bfloat16).T, preferred_element_type=attend_dtype
    )


@_mirrors("maxtext.layers.embeddings.Embed")
class MaxTextEmbed(nnx.Module):
    """MaxText ``Embed``: ``embedding (num_embeddings, num_features)``; ``__call__`` looks rows up
    (no scaling), ``attend(query)`` is :func:`attend_on_embedding`. ``config`` and ``mesh`` are
    accepted and ignored (no offloading, iota embedding or explicit sharding)."""

    def __init__(
        self,
        num_embeddings,
        num_features,
        config=None,
        mesh=None,
        cast_input_dtype=None,
        dtype=jnp.float32,
        attend_dtype=None,
        embedding_init=default_embed_init,
        *,
        rngs: nnx.Rngs,
    ):
        self.num_embeddings, self.num_features = num_embeddings, num_features
        self.cast_input_dtype, self.dtype, self.attend_dtype = cast_input_dtype, dtype, attend_dtype
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, num_features), jnp.float32)
        )

    def __call__(self, inputs, model_mode="train"):
        if self.cast_input_dtype:
            inputs = inputs.astype(self.cast_input_dtype)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        embedding = jnp.asarray(self.embedding[...], self.dtype)
        return embedding.at[inputs].get()

    def attend(self, query, out_sharding=None):
        attend_dtype = self.attend_dtype if self.attend_dtype is not None else self.dtype
        return attend_on_embedding(query, self.embedding[...], attend_dtype)


@dataclasses.dataclass(frozen=True)
class MaxTextConfig:
    """The MaxText config keys a ``decoder_block=llama2`` model uses (float32, no dropout)."""

    vocab_size: int = 32
    emb_dim: int = 16
    num_query_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 4
    mlp_dim: int = 32
    num_decoder_layers: int = 2
    normalization_layer_epsilon: float = 1e-5
    logits_via_embedding: bool = False
    normalize_embedding_logits: bool = True
    rope_min_timescale: int = 1
    rope_max_timescale: int = 10_000
    param_scan_axis: int = 1


MAXTEXT_TINY = MaxTextConfig()


def _maxtext_rope(inputs, position, cfg: MaxTextConfig):
    """MaxText ``embeddings.RotaryEmbedding`` (``rope_type: default``)."""
    dims = inputs.shape[-1]
    fraction = 2 * jnp.arange(0, dims // 2) / dims
    timescale = (
        cfg.rope_min_timescale * (cfg.rope_max_timescale / cfg.rope_min_timescale) ** fraction
    )
    sinusoid_inp = position[:, :, jnp.newaxis, jnp.newaxis] / timescale
    sin = jnp.concatenate([jnp.sin(sinusoid_inp)] * 2, axis=-1).astype(inputs.dtype)
    cos = jnp.concatenate([jnp.cos(sinusoid_inp)] * 2, axis=-1).astype(inputs.dtype)
    x1, x2 = jnp.split(inputs, 2, axis=-1)
    return inputs * cos + jnp.concatenate((-x2, x1), axis=-1) * sin


class MaxTextAttention(nnx.Module):
    """MaxText ``Attention`` projections (dot-product path, no cache): ``query (emb, N, H)`` init
    divided by ``sqrt(head_dim)`` (T5-style; logits are not scaled), ``key``/``value (emb, K, H)``,
    ``out (N, H, emb)`` with ``axis=(-2, -1)``; RoPE on q and k; causal, segment-masked softmax."""

    def __init__(self, cfg: MaxTextConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kernel_init = nd_dense_init(1.0, "fan_in", "normal")
        depth_scaling = jnp.sqrt(cfg.head_dim).astype(jnp.float32)

        def query_init(*args):
            return kernel_init(*args) / depth_scaling

        heads, kv = (cfg.num_query_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)
        self.query = MaxTextDenseGeneral(cfg.emb_dim, heads, kernel_init=query_init, rngs=rngs)
        self.key = MaxTextDenseGeneral(cfg.emb_dim, kv, kernel_init=kernel_init, rngs=rngs)
        self.value = MaxTextDenseGeneral(cfg.emb_dim, kv, kernel_init=kernel_init, rngs=rngs)
        self.out = MaxTextDenseGeneral(
            heads, cfg.emb_dim, axis=(-2, -1), kernel_init=kernel_init, rngs=rngs
        )

    def __call__(self, inputs_q, inputs_kv, inputs_positions, decoder_segment_ids=None):
        cfg = self.cfg
        query = _maxtext_rope(self.query(inputs_q), inputs_positions, cfg)
        key = _maxtext_rope(self.key(inputs_kv), inputs_positions, cfg)
        value = self.value(inputs_kv)
        b, t, n, h = query.shape
        k = cfg.num_kv_heads
        query = query.reshape(b, t, k, n // k, h)
        logits = jnp.einsum("btkgd,bskd->bkgts", query, key)
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if decoder_segment_ids is not None:
            mask = mask & (decoder_segment_ids[:, :, None] == decoder_segment_ids[:, None, :])
        logits = jnp.where(mask[:, None, None], logits, -0.7 * float(np.finfo(np.float32).max))
        probs = jax.nn.softmax(logits, axis=-1)
        encoded = jnp.einsum("bkgts,bskd->btkgd", probs, value).reshape(b, t, n, h)
        return self.out(encoded), None


class MaxTextMlp(nnx.Module):
    """MaxText ``MlpBlock`` with ``mlp_activations: [silu, linear]``:
    ``wo(silu(wi_0(x)) * wi_1(x))``, kernels ``(emb, mlp)`` and ``(mlp, emb)``."""

    def __init__(self, cfg: MaxTextConfig, *, rngs: nnx.Rngs):
        self.wi_0 = MaxTextDenseGeneral(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.wi_1 = MaxTextDenseGeneral(cfg.emb_dim, cfg.mlp_dim, rngs=rngs)
        self.wo = MaxTextDenseGeneral(cfg.mlp_dim, cfg.emb_dim, rngs=rngs)

    def __call__(self, inputs):
        return self.wo(jax.nn.silu(self.wi_0(inputs)) * self.wi_1(inputs))


class MaxTextDecoderLayer(nnx.Module):
    """MaxText ``llama2.LlamaDecoderLayer``: ``h = x + attn(norm₁(x))``, ``h + mlp(norm₂(h))``;
    returns ``(out, None)`` as MaxText's layers do."""

    def __init__(self, cfg: MaxTextConfig, *, rngs: nnx.Rngs):
        eps = cfg.normalization_layer_epsilon
        self.pre_self_attention_layer_norm = MaxTextRMSNorm(cfg.emb_dim, epsilon=eps, rngs=rngs)
        self.self_attention = MaxTextAttention(cfg, rngs=rngs)
        self.post_self_attention_layer_norm = MaxTextRMSNorm(cfg.emb_dim, epsilon=eps, rngs=rngs)
        self.mlp = MaxTextMlp(cfg, rngs=rngs)

    def __call__(self, inputs, decoder_segment_ids, decoder_positions):
        lnx = self.pre_self_attention_layer_norm(inputs)
        attention_lnx, _ = self.self_attention(lnx, lnx, decoder_positions, decoder_segment_ids)
        intermediate = inputs + attention_lnx
        hidden = self.post_self_attention_layer_norm(intermediate)
        return self.mlp(hidden) + intermediate, None


MAXTEXT_LAYER_MODES = ("unscanned", "checkpoint", "scan", "nnx_scan", "nnx_remat")


class MaxTextDecoder(nnx.Module):
    """MaxText ``NNXDecoder`` for llama2: layers, ``decoder_norm``, ``logits_dense`` (untied).

    ``layers``: ``"unscanned"`` (``layers_{i}``, called directly: ``remat_policy: none``);
    ``"checkpoint"`` (``layers_{i}``, each run as ``jax.checkpoint`` of a pure function that
    ``nnx.merge``s the split layer, as MaxText's default ``remat_policy: full``); ``"scan"``
    (MaxText's ``scan_layers``: one ``layers`` module, parameters stacked on axis
    ``param_scan_axis`` = 1, run by ``jax.lax.scan`` of ``jax.checkpoint``ed merges);
    ``"nnx_scan"`` (``layers`` built by ``nnx.vmap``, stacked on axis 0, run by ``nnx.scan``);
    ``"nnx_remat"`` (``layers_{i}``, each called through ``nnx.remat``).
    """

    def __init__(self, cfg: MaxTextConfig, *, layers: str = "unscanned", rngs: nnx.Rngs):
        if layers not in MAXTEXT_LAYER_MODES:
            raise ValueError(f"layers must be one of {MAXTEXT_LAYER_MODES}, got {layers!r}.")
        self.cfg, self.mode = cfg, layers
        if layers in ("scan", "nnx_scan"):

            @nnx.split_rngs(splits=cfg.num_decoder_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs):
                return MaxTextDecoderLayer(cfg, rngs=rngs)

            self.layers = stacked(rngs)
            if layers == "scan":
                axis = cfg.param_scan_axis
                params = nnx.state(self.layers, nnx.Param)
                moved = jax.tree.map(lambda x: jnp.moveaxis(x, 0, axis), params)
                nnx.update(self.layers, moved)
        else:
            for i in range(cfg.num_decoder_layers):
                setattr(self, f"layers_{i}", MaxTextDecoderLayer(cfg, rngs=rngs))
        eps = cfg.normalization_layer_epsilon
        self.decoder_norm = MaxTextRMSNorm(cfg.emb_dim, epsilon=eps, rngs=rngs)
        if not cfg.logits_via_embedding:
            self.logits_dense = MaxTextDenseGeneral(cfg.emb_dim, cfg.vocab_size, rngs=rngs)

    def _apply_layers(self, y, segment_ids, positions):
        cfg, mode = self.cfg, self.mode
        if mode == "scan":
            graphdef, params, rest = nnx.split(self.layers, nnx.Param, ...)
            axis = cfg.param_scan_axis
            params = jax.tree.map(
                lambda x: jnp.moveaxis(x, axis, 0) if x.ndim > axis else x, params
            )

            def layer_fn(carry, layer_params):
                out, _ = nnx.merge(graphdef, layer_params, rest)(carry, segment_ids, positions)
                return out, None

            y, _ = jax.lax.scan(jax.checkpoint(layer_fn), y, params)
            return y
        if mode == "nnx_scan":

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def step(carry, layer):
                out, _ = layer(carry, segment_ids, positions)
                return out

            return step(y, self.layers)
        for i in range(cfg.num_decoder_layers):
            layer = getattr(self, f"layers_{i}")
            if mode == "checkpoint":
                graphdef, state = nnx.split(layer)

                def pure_layer_fn(state_in, y_in, graphdef=graphdef):
                    merged = nnx.merge(graphdef, state_in)
                    out, _ = merged(y_in, segment_ids, positions)
                    return out, nnx.state(merged)

                y, new_state = jax.checkpoint(pure_layer_fn)(state, y)
                nnx.update(layer, new_state)
            elif mode == "nnx_remat":
                y, _ = nnx.remat(lambda m, x: m(x, segment_ids, positions))(layer, y)
            else:
                y, _ = layer(y, segment_ids, positions)
        return y

    def __call__(self, shared_embedding, decoder_input_tokens, decoder_positions, segment_ids):
        cfg = self.cfg
        y = shared_embedding(decoder_input_tokens.astype("int32"))
        y = self.decoder_norm(self._apply_layers(y, segment_ids, decoder_positions))
        if cfg.logits_via_embedding:
            # MaxText reads the table and calls the function, not ``shared_embedding.attend``.
            logits = attend_on_embedding(y, shared_embedding.embedding[...], jnp.float32)
            if cfg.normalize_embedding_logits:
                logits = logits / jnp.sqrt(y.shape[-1])
            return logits
        return self.logits_dense(y)


class MaxTextTransformer(nnx.Module):
    """MaxText ``models.Transformer``: ``token_embedder`` (``Embed``, init ``normal(1.0)``) and
    ``decoder`` (:class:`MaxTextDecoder`); ``__call__(tokens, positions, segment_ids=None)``."""

    def __init__(self, cfg: MaxTextConfig = MAXTEXT_TINY, *, layers="unscanned", rngs: nnx.Rngs):
        self.token_embedder = MaxTextEmbed(
            cfg.vocab_size,
            cfg.emb_dim,
            dtype=jnp.float32,
            attend_dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(stddev=1.0),
            rngs=rngs,
        )
        self.decoder = MaxTextDecoder(cfg, layers=layers, rngs=rngs)

    def __call__(self, decoder_input_tokens, decoder_positions, decoder_segment_ids=None):
        return self.decoder(
            self.token_embedder, decoder_input_tokens, decoder_positions, decoder_segment_ids
        )


# ==== EasyDeL 0.3.0 (Flax NNX) ===================================================================


_LECUN_NORMAL = jax.nn.initializers.lecun_normal()
_EASYDEL_EMBED_INIT = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)


@_mirrors("easydel.layers.linears._linear.ParallelLinear")
class EasyDeLParallelLinear(nnx.Module):
    """EasyDeL ``ParallelLinear``: ``kernel (in_features, out_features)`` (lecun-normal),
    ``bias (out_features,)`` zeros if ``use_bias`` (else ``None``);
    ``y = scale · einsum('...ik,...kj->...ij', x, w) + bias`` with ``w = kernel`` unless the call
    passes ``w`` (how EasyDeL ties the LM head); inputs, kernel and bias promoted to ``dtype``.
    ``scale``: a float, ``'fan_in'`` (``in**-0.5``) or ``'fan_out'`` (``out**-0.5``).
    ``out_features`` is an int here (EasyDeL also accepts a sequence, summed)."""

    _direction = None

    def __init__(
        self,
        in_features,
        out_features,
        *,
        scale=1.0,
        use_bias=True,
        dtype=None,
        param_dtype=jnp.float32,
        precision=None,
        kernel_init=_LECUN_NORMAL,
        bias_init=jax.nn.initializers.zeros,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        if scale == "fan_in":
            scale = in_features**-0.5
        elif scale == "fan_out":
            scale = out_features**-0.5
        self._scale_operator = (lambda y: y) if scale == 1.0 else (lambda y: y * scale)
        self.in_features, self.out_features = in_features, out_features
        self.use_bias, self.dtype, self.param_dtype = use_bias, dtype, param_dtype
        self.precision, self.kernel_init, self.bias_init = precision, kernel_init, bias_init
        self.tp_merged = 1
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        )
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = None

    def native_forward(self, inputs, w=None):
        kernel = self.kernel[...] if w is None else w
        bias = self.bias[...] if self.use_bias and self.bias is not None else None
        if bias is not None:
            inputs, kernel, bias = nnx_dtypes.promote_dtype(
                (inputs, kernel, bias), dtype=self.dtype
            )
        else:
            inputs, kernel = nnx_dtypes.promote_dtype((inputs, kernel), dtype=self.dtype)
        subscript = "...ik,...kj->...ij" if inputs.ndim > 1 else "...k,...kj->...j"
        y = jnp.einsum(subscript, inputs, kernel, precision=self.precision, optimize=True)
        y = self._scale_operator(y)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y

    def __call__(self, inputs, w=None):
        return self.native_forward(inputs=inputs, w=w)


@_mirrors("easydel.layers.linears._linear.ColumnParallelLinear")
class EasyDeLColumnParallelLinear(EasyDeLParallelLinear):
    """EasyDeL ``ColumnParallelLinear`` (q/k/v, gate/up projections, LM head); as
    :class:`EasyDeLParallelLinear`, output axis sharded in EasyDeL."""

    _direction = "column"


@_mirrors("easydel.layers.linears._linear.RowParallelLinear")
class EasyDeLRowParallelLinear(EasyDeLParallelLinear):
    """EasyDeL ``RowParallelLinear`` (o/down projections); as :class:`EasyDeLParallelLinear`,
    input axis sharded in EasyDeL."""

    _direction = "row"


LOWFLOATS = (
    jnp.float4_e2m1fn,
    jnp.float8_e4m3b11fnuz,
    jnp.float8_e4m3fn,
    jnp.float8_e4m3fnuz,
    jnp.float8_e5m2fnuz,
    jnp.float8_e5m2,
    jnp.float8_e3m4,
    jnp.float8_e4m3,
    jnp.float8_e8m0fnu,
)


@_mirrors("easydel.layers.norms._norms.RMSNorm")
class EasyDeLRMSNorm(nnx.Module):
    """EasyDeL ``RMSNorm``: scale named ``kernel`` ``(dim,)``, ones-init, no offset;
    ``(kernel · (x * rsqrt(mean(x², -1) + eps)).astype(dtype)).astype(x.dtype)``, ``x`` first
    promoted with ``dtype`` (float32 for fp8/fp4). Defaults ``dtype = param_dtype = bfloat16``."""

    def __init__(
        self,
        dim,
        eps=1e-6,
        dtype=jnp.bfloat16,
        param_dtype=jnp.bfloat16,
        *,
        rngs: nnx.Rngs | None = None,
    ):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.dim, self.eps, self.dtype, self.param_dtype = dim, eps, dtype, param_dtype
        self.kernel = nnx.Param(jax.nn.initializers.ones(rngs.params(), (dim,), param_dtype))

    def _norm(self, x):
        return x * lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps)

    def __call__(self, x):
        org_dtype = x.dtype
        if self.param_dtype in LOWFLOATS or self.dtype in LOWFLOATS:
            x = x.astype(jnp.float32)
        else:
            x = x.astype(jnp.promote_types(self.dtype, x.dtype))
        output = self._norm(x).astype(self.dtype)
        weight = self.kernel[...].astype(self.dtype)
        return (weight * output).astype(org_dtype)


@_mirrors("easydel.layers.embeddings._embeddings.Embed")
class EasyDeLEmbed(nnx.Module):
    """EasyDeL ``Embed``: ``embedding (num_embeddings, features)``; ``take(embedding, inputs)``;
    ``attend(query) = query @ embedding.T``."""

    def __init__(
        self,
        num_embeddings,
        features,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        embedding_init=_EASYDEL_EMBED_INIT,
        rngs: nnx.Rngs,
    ):
        self.embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        )
        self.num_embeddings, self.features = num_embeddings, features
        self.dtype = dtype or self.embedding[...].dtype
        self.param_dtype = param_dtype

    def __call__(self, inputs):
        (embedding,) = nnx_dtypes.promote_dtype(
            (self.embedding[...],), dtype=self.dtype, inexact=False
        )
        if self.num_embeddings == 1:
            return jnp.broadcast_to(embedding, (*inputs.shape, self.features))
        return jnp.take(embedding, inputs, axis=0)

    def attend(self, query):
        query, embedding = nnx_dtypes.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        return jnp.dot(query, embedding.T)


@dataclasses.dataclass(frozen=True)
class EasyDeLConfig:
    """The ``LlamaConfig`` fields an EasyDeL Llama uses."""

    vocab_size: int = 32
    hidden_size: int = 16
    intermediate_size: int = 32
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    mlp_bias: bool = False
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


EASYDEL_TINY = EasyDeLConfig()


class EasyDeLMLP(nnx.Module):
    """EasyDeL ``LlamaMLP``: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, cfg: EasyDeLConfig, dtype=jnp.float32, param_dtype=jnp.float32, *, rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, use_bias=cfg.mlp_bias, kernel_init=init)
        self.gate_proj = EasyDeLColumnParallelLinear(
            cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **kw
        )
        self.down_proj = EasyDeLRowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, rngs=rngs, **kw
        )
        self.up_proj = EasyDeLColumnParallelLinear(
            cfg.hidden_size, cfg.intermediate_size, rngs=rngs, **kw
        )

    def __call__(self, hidden_states):
        gate = jax.nn.silu(self.gate_proj(hidden_states))
        return self.down_proj(gate * self.up_proj(hidden_states))


class EasyDeLAttention(nnx.Module):
    """EasyDeL ``UnifiedAttention`` (standard, causal): ``q_proj``/``k_proj``/``v_proj`` column,
    ``o_proj`` row; heads split from the flat outputs; RoPE; softmax(q kᵀ / sqrt(head_dim))."""

    def __init__(self, cfg: EasyDeLConfig, dtype=jnp.float32, param_dtype=jnp.float32, *, rngs):
        self.cfg = cfg
        init = jax.nn.initializers.normal(cfg.initializer_range)
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        h, n, k = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        bias = cfg.attention_bias
        self.q_proj = EasyDeLColumnParallelLinear(cfg.hidden_size, n * h, use_bias=bias, **kw)
        self.k_proj = EasyDeLColumnParallelLinear(cfg.hidden_size, k * h, use_bias=bias, **kw)
        self.v_proj = EasyDeLColumnParallelLinear(cfg.hidden_size, k * h, use_bias=bias, **kw)
        self.o_proj = EasyDeLRowParallelLinear(n * h, cfg.hidden_size, use_bias=bias, **kw)

    def __call__(self, hidden_states, positions):
        cfg = self.cfg
        b, t, _ = hidden_states.shape
        h, n, k = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = self.q_proj(hidden_states).reshape(b, t, n, h)
        key = self.k_proj(hidden_states).reshape(b, t, k, h)
        v = self.v_proj(hidden_states).reshape(b, t, k, h)
        q = apply_rope(q, positions, base_frequency=cfg.rope_theta)
        key = apply_rope(key, positions, base_frequency=cfg.rope_theta)
        q = q.reshape(b, t, k, n // k, h)
        logits = jnp.einsum("btkgd,bskd->bkgts", q, key) / jnp.sqrt(h).astype(q.dtype)
        mask = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
        encoded = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, n * h)
        return self.o_proj(encoded)


class EasyDeLDecoderLayer(nnx.Module):
    """EasyDeL ``LlamaDecoderLayer``: ``input_layernorm``, ``self_attn``,
    ``post_attention_layernorm``, ``mlp`` (pre-norm residual)."""

    def __init__(self, cfg: EasyDeLConfig, dtype=jnp.float32, param_dtype=jnp.float32, *, rngs):
        self.self_attn = EasyDeLAttention(cfg, dtype, param_dtype, rngs=rngs)
        self.mlp = EasyDeLMLP(cfg, dtype, param_dtype, rngs=rngs)
        norm = functools.partial(
            EasyDeLRMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()

    def __call__(self, hidden_states, positions):
        attn = self.self_attn(self.input_layernorm(hidden_states), positions)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class RematEasyDeLDecoderLayer(EasyDeLDecoderLayer):
    """The decoder layer after EasyDeL's ``auto_remat`` (a checkpointing policy set):
    ``__call__`` replaced by ``nnx.remat(__call__)``. EasyDeL assigns it on the class itself;
    this subclass keeps the mimic's other users untouched."""

    __call__ = nnx.remat(EasyDeLDecoderLayer.__call__)


class EasyDeLModel(nnx.Module):
    """EasyDeL ``LlamaModel``: ``embed_tokens`` (``Embed``, init ``normal(initializer_range)``),
    ``layers`` (an ``nnx.List`` of decoder layers, a python loop), ``norm``."""

    def __init__(self, cfg: EasyDeLConfig, *, remat: bool = False, rngs):
        self.embed_tokens = EasyDeLEmbed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=jnp.float32,
            embedding_init=jax.nn.initializers.normal(stddev=cfg.initializer_range),
            rngs=rngs,
        )
        layer = RematEasyDeLDecoderLayer if remat else EasyDeLDecoderLayer
        self.layers = nnx.List([layer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = EasyDeLRMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=jnp.float32, param_dtype=jnp.float32,
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, input_ids):
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        hidden = self.embed_tokens(input_ids.astype("i4"))
        for layer in self.layers:
            hidden = layer(hidden, positions)
        return self.norm(hidden)


class EasyDeLForCausalLM(nnx.Module):
    """EasyDeL ``LlamaForCausalLM``: ``model`` (``embed_tokens``, ``layers`` an ``nnx.List``,
    ``norm``) and ``lm_head`` (column-parallel, no bias); tied embeddings call
    ``lm_head(h, w=embed_tokens.embedding.T)``. ``remat=True`` uses
    :class:`RematEasyDeLDecoderLayer`."""

    def __init__(self, cfg: EasyDeLConfig = EASYDEL_TINY, *, remat: bool = False, rngs):
        self.cfg = cfg
        self.model = EasyDeLModel(cfg, remat=remat, rngs=rngs)
        self.lm_head = EasyDeLColumnParallelLinear(
            cfg.hidden_size,
            cfg.vocab_size,
            use_bias=False,
            dtype=jnp.float32,
            kernel_init=jax.nn.initializers.normal(stddev=cfg.initializer_range),
            rngs=rngs,
        )

    def __call__(self, input_ids):
        hidden = self.model(input_ids)
        w = self.model.embed_tokens.embedding[...].T if self.cfg.tie_word_embeddings else None
        return self.lm_head(hidden, w=w)
