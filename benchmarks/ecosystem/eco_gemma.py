"""Tiny gemma Transformers (Gemma 2- and Gemma 3-style, Flax linen) for the ecosystem benchmark,
and the recorder of their layers' calls (``flax.linen.intercept_methods``).

``Transformer.__call__`` is decorated with ``nn.jit``, whose trace Flax caches: the recorder
applies the undecorated function (``__call__.__wrapped__``) through ``model.apply(...,
method=...)``, so the interceptor sees every call with concrete arrays. Gemma's ``Einsum`` is
called as ``(eqn, x)``, its weight named ``module.weight_name``; the feed-forward's two einsums
share the ``FeedForward``'s scope (``nn.share_scope``), so a weight's path is the module's scope
path and its ``weight_name`` (``layer_0/mlp/gating_einsum``, ``layer_0/attn/q_einsum/w``).
``RMSNorm`` is ``x̂ (1 + scale)`` with ``x̂ = x / √(mean(x²) + 1e-6)``. The ``Embedder``'s
table ``input_embedding`` is read by ``encode`` (``√d · E[t]``) and by ``decode`` (the tied
head, ``h Eᵀ``).
"""

import importlib.metadata
import importlib.util
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from eco_common import Layer, add_call, flat_params
from eco_reference import Call

__all__ = ["GemmaModel", "import_gemma"]

_GEMMA = None


def import_gemma():
    """gemma's model modules, imported with a stub ``tensorflow`` (kauldron.typing imports it for
    isinstance aliases only), removed again so that nothing else takes it for the real one."""
    global _GEMMA
    if _GEMMA is None:
        stub = importlib.util.find_spec("tensorflow") is None
        if stub:
            sys.modules["tensorflow"] = types.ModuleType("tensorflow")
            sys.modules["tensorflow"].Tensor = type("Tensor", (), {})
        try:
            from gemma.gm.nn import _config, _layers, _modules, _transformer
        finally:
            if stub:
                sys.modules.pop("tensorflow", None)
        _GEMMA = types.SimpleNamespace(config=_config, layers=_layers, modules=_modules,
                                       transformer=_transformer)  # fmt: skip
    return _GEMMA


def _configs():
    g = import_gemma()
    local, glob = g.modules.AttentionType.LOCAL_SLIDING, g.modules.AttentionType.GLOBAL
    common = dict(num_embed=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                  attention_types=(local, glob), use_post_attn_norm=True, use_post_ffw_norm=True,
                  sliding_window_size=4)  # fmt: skip
    return {
        # Gemma 2: grouped-query attention (4 query heads, 2 kv heads), attention-logit and
        # final-logit soft caps, pre/post norms, alternating local/global attention.
        "gemma2": dict(common, num_kv_heads=2, final_logit_softcap=30.0,
                       attn_logits_soft_cap=50.0),  # fmt: skip
        # Gemma 3: multi-query attention (1 kv head), q/k RMSNorm instead of soft caps, the
        # transposed gating einsum, separate local/global RoPE frequencies.
        "gemma3": dict(common, num_kv_heads=1, final_logit_softcap=None, use_qk_norm=True,
                       attn_logits_soft_cap=None, transpose_gating_einsum=True,
                       local_base_frequency=10_000, global_base_frequency=1_000_000),
    }  # fmt: skip


class GemmaModel:
    """A tiny random-init gemma ``Transformer`` in float64 (the adapter the benchmark drives)."""

    library = "gemma"
    call_kwargs = None

    def __init__(self, style: str, seed: int = 0):
        g = import_gemma()
        self.name = f"{style}-tiny"
        self.settings = _configs()[style]
        self.config = g.config.TransformerConfig(**self.settings)
        self.model = g.transformer.Transformer(config=self.config, dtype=jnp.float64)
        tokens = jnp.ones((1, 4), jnp.int32)
        params = self.model.init(jax.random.key(seed), tokens)["params"]
        self.base = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        self.vocab = self.config.num_embed
        self.notes = []

    def describe(self) -> dict:
        return {
            "library": "gemma " + importlib.metadata.version("gemma"),
            "class": "gemma.gm.nn._transformer.Transformer (Flax linen)",
            "config": {
                k: (str(v) if not isinstance(v, int | float | bool | None) else v)
                for k, v in self.settings.items()
            },  # fmt: skip
            "dtype": "float64 (Transformer(dtype=jnp.float64), parameters cast to float64)",
        }

    def batch(self, tokens: np.ndarray):
        return {"tokens": jnp.asarray(tokens, jnp.int32)}

    def context(self):
        import contextlib

        return contextlib.nullcontext()

    def flat(self, params) -> dict:
        return flat_params(params)

    def logits(self, params, batch, *, jit: bool):
        """The model's logits, run eagerly or compiled (``jax.jit``)."""
        undecorated = type(self.model).__call__.__wrapped__

        def run(params, tokens):
            return self.model.apply({"params": params}, tokens, method=undecorated).logits

        return np.asarray((jax.jit(run) if jit else run)(params, batch["tokens"]))

    def record(self, params, batches) -> dict[str, Layer]:
        """``{weight path: Layer}`` of every gemma ``Einsum`` and ``RMSNorm`` call on ``batches``
        with ``params``."""
        g = import_gemma()
        layers: dict[str, Layer] = {}

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            module = context.module
            scope = tuple(module.scope.path)
            if context.method_name == "__call__" and type(module) is g.layers.Einsum:
                eqn = kwargs["eqn"] if "eqn" in kwargs else args[0]
                x = kwargs["x"] if "x" in kwargs else args[1]
                path = "/".join(scope + (module.weight_name,))
                call = Call("einsum", np.asarray(x, np.float64), np.asarray(out, np.float64), eqn)
                add_call(layers, path, Layer("einsum", path), call)
            elif type(module) is g.modules.Embedder and context.method_name in ("encode", "decode"):
                x = np.asarray(args[0] if args else next(iter(kwargs.values())))
                path = "/".join(scope + ("input_embedding",))
                kind = "lookup" if context.method_name == "encode" else "head"
                call = Call(
                    kind,
                    x if kind == "lookup" else x.astype(np.float64),
                    np.asarray(out, np.float64),
                )
                add_call(layers, path, Layer("embed", path, scale=float(np.sqrt(
                    module.embed_dim))), call)  # fmt: skip
            elif context.method_name == "__call__" and type(module) is g.layers.RMSNorm:
                x = np.asarray(kwargs.get("x", args[0] if args else None), np.float64)
                xhat = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)
                path = "/".join(scope + ("scale",))
                call = Call("norm", xhat, np.asarray(out, np.float64))
                add_call(layers, path, Layer("norm", path, offset=1.0), call)
            return out

        undecorated = type(self.model).__call__.__wrapped__  # below nn.jit
        for batch in batches:
            with nn.intercept_methods(intercept):
                self.model.apply({"params": params}, batch["tokens"], method=undecorated)
        return layers
