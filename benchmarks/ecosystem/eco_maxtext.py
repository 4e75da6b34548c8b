"""A tiny MaxText Llama-style decoder (Flax NNX) for the ecosystem benchmark and the recorder of
its layers' calls.

The model: ``decoder_block="llama2"``, 2 layers, embedding 32, 4 query and 2 kv heads of 8,
MLP 64 (SiLU-gated), vocabulary 64, random init (``model_creation_utils.from_config`` with
``nnx.Rngs``), CPU, ``scan_layers`` as asked, then ``model.eval()``, as jaxmerge asks of NNX
models. MaxText's config admits no float64 (``dtype``/``weight_dtype`` are
bfloat16/float32/float16/fp8), so the validated config's ``dtype`` and ``weight_dtype`` are set to
float64 afterwards (``cfg._flat_config``), before the model is built. Its ``RMSNorm`` still
computes ``x̂`` in float32 (and rounds the scale to float32) by design; the recorder computes
``x̂`` the same way. The unscanned decoder calls every layer through ``nnx.split`` →
``nnx.merge`` (a copy) under ``jax.checkpoint``, the scanned one through ``nnx.scan`` over
stacked parameters: both as MaxText builds them, and so jaxmerge merges them.

The recorder (not the merge) runs the unscanned decoder with its layers called in place
(:func:`layers_in_place`: ``nnx.split`` gives the layer itself, ``nnx.merge`` returns it,
``jax.checkpoint`` is the identity), since it knows the layers by identity; that changes no
arithmetic. Inside the scanned decoder's ``nnx.scan`` the values are traced and nothing is
recorded: the benchmark checks the scanned merge against the unscanned one instead.
"""

import contextlib
import importlib.metadata
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from eco_common import Layer, add_call, flat_params
from eco_reference import Call
from flax import nnx

__all__ = ["MaxTextModel"]

SETTINGS = dict(
    decoder_block="llama2", base_emb_dim=32, base_num_query_heads=4, base_num_kv_heads=2,
    head_dim=8, base_mlp_dim=64, base_num_decoder_layers=2, vocab_size=64,
    max_target_length=16, max_prefill_predict_length=4, per_device_batch_size=1,
    attention="dot_product", hardware="cpu", skip_jax_distributed_system=True,
    enable_checkpointing=False, dtype="float32", weight_dtype="float32",
    tokenizer_type="sentencepiece", enable_dropout=False, run_name="ecosystem-tiny",
    cast_logits_to_fp32=False,  # float64 logits (the model's output only, no layer changes)
)  # fmt: skip


def _imports():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from maxtext.configs import pyconfig
    from maxtext.layers import embeddings, linears, nnx_decoders, normalizations
    from maxtext.utils import maxtext_utils, model_creation_utils

    return types.SimpleNamespace(pyconfig=pyconfig, linears=linears, norms=normalizations,
                                 embeddings=embeddings,
                                 decoders=nnx_decoders, utils=maxtext_utils,
                                 creation=model_creation_utils)  # fmt: skip


class _InPlace:
    """A graph definition standing for the layer object itself (no leaves, so it passes through
    ``jax`` transforms unchanged)."""

    def __init__(self, layer):
        self.layer = layer


_NO_STATE = types.SimpleNamespace(name="no state: the layer was called in place")


@contextlib.contextmanager
def layers_in_place():
    """Make MaxText's unscanned ``NNXDecoder`` call its layers in place (see the module docs):
    ``nnx.split(layer)`` in ``nnx_decoders`` gives the layer itself, ``nnx.merge`` of it returns
    it, ``nnx.state`` of it nothing, ``nnx.update`` with nothing does nothing, and
    ``jax.checkpoint`` there is the identity."""
    mt = _imports()
    real_nnx, real_jax = mt.decoders.nnx, mt.decoders.jax
    handed: set[int] = set()

    def split(node, *filters):
        if not filters and isinstance(node, nnx.Module):
            handed.add(id(node))
            return _InPlace(node), _NO_STATE
        return real_nnx.split(node, *filters)

    def merge(graphdef, *states, **kwargs):
        if isinstance(graphdef, _InPlace):
            return graphdef.layer
        return real_nnx.merge(graphdef, *states, **kwargs)

    def state(node, *filters):
        if not filters and id(node) in handed:
            return _NO_STATE
        return real_nnx.state(node, *filters)

    def update(node, *states):
        if states and all(s is _NO_STATE for s in states):
            return None
        return real_nnx.update(node, *states)

    fake_nnx = types.ModuleType("nnx (layers in place)")
    fake_nnx.__dict__.update(vars(real_nnx))
    fake_nnx.split, fake_nnx.merge, fake_nnx.state, fake_nnx.update = split, merge, state, update
    fake_jax = types.ModuleType("jax (no checkpoint)")
    fake_jax.__dict__.update(vars(real_jax))
    fake_jax.checkpoint = lambda fun, **_: fun
    mt.decoders.nnx, mt.decoders.jax = fake_nnx, fake_jax
    try:
        yield
    finally:
        mt.decoders.nnx, mt.decoders.jax = real_nnx, real_jax


class MaxTextModel:
    """A tiny MaxText Llama-style ``Transformer`` in float64 (the adapter the benchmark drives)."""

    library = "maxtext"
    call_kwargs = {"enable_dropout": False}

    def __init__(self, *, scan: bool, seed: int = 0, tied: bool = False):
        mt = _imports()
        self.scan = scan
        self.name = "maxtext-llama2-tiny-" + ("scanned" if scan else "unscanned")
        self.name += "-tied" * tied
        base_yml = os.path.join(os.path.dirname(mt.pyconfig.__file__), "base.yml")
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), "jaxmerge-ecosystem-maxtext")
        self.cfg = mt.pyconfig.initialize(["", base_yml], base_output_directory=out,
                                          scan_layers=scan, logits_via_embedding=tied,
                                          **SETTINGS)  # fmt: skip
        self.cfg._flat_config["dtype"] = jnp.dtype("float64")  # not admitted by the validator
        self.cfg._flat_config["weight_dtype"] = jnp.dtype("float64")
        self.mesh = mt.utils.get_mesh_from_config(self.cfg, jax.devices())
        self.model = mt.creation.from_config(
            self.cfg, mesh=self.mesh, rngs=nnx.Rngs(params=seed, dropout=seed + 1)
        )
        self.model.eval()  # as jaxmerge asks of NNX models with dropout
        self.notes = ["config dtype/weight_dtype set to float64 after validation "
                      "(cfg._flat_config); model.eval()"]  # fmt: skip
        self.base = nnx.state(self.model, nnx.Param)
        self.vocab = self.cfg.vocab_size
        self._mt = mt

    def describe(self) -> dict:
        return {
            "library": "maxtext " + importlib.metadata.version("maxtext"),
            "class": "maxtext.models.models.Transformer (Flax NNX), "
                     "model_creation_utils.from_config(cfg, mesh, rngs=nnx.Rngs(...))",
            "config": dict(SETTINGS, scan_layers=self.scan, dtype="float64 (set after "
                           "validation)", weight_dtype="float64 (set after validation)"),
            "dtype": "float64 (RMSNorm computes x̂ and rounds its scale in float32 by design)",
        }  # fmt: skip

    def batch(self, tokens: np.ndarray):
        tokens = jnp.asarray(tokens, jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return {"decoder_input_tokens": tokens, "decoder_positions": positions,
                "decoder_segment_ids": jnp.ones_like(tokens)}  # fmt: skip

    def context(self):
        return jax.set_mesh(self.mesh)

    def flat(self, params) -> dict:
        return flat_params(nnx.to_pure_dict(params))

    def stacked(self, flat: dict) -> dict:
        """The unscanned model's flat parameters in this scanned model's layout: each
        ``decoder/layers_{i}/…`` stacked on axis 1 (MaxText's ``param_scan_axis``) as
        ``decoder/layers/…``."""
        n = SETTINGS["base_num_decoder_layers"]
        return {p: np.stack([flat[p.replace("decoder/layers/", f"decoder/layers_{i}/")]
                             for i in range(n)], axis=1)
                if p.startswith("decoder/layers/") else flat[p]
                for p in self.flat(self.base)}  # fmt: skip

    def logits(self, params, batch, *, jit: bool):
        """The model's logits, run eagerly or compiled (``jax.jit``)."""
        graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)

        def run(params, batch):
            return nnx.merge(graphdef, params, rest)(**batch, **self.call_kwargs)

        with self.context():
            return np.asarray((jax.jit(run) if jit else run)(params, batch))

    def record(self, params, batches) -> dict[str, Layer]:
        """``{weight path: Layer}`` of every ``DenseGeneral``, ``RMSNorm`` and ``Embed`` call
        (``__call__``: lookups, ``attend`` or the decoder's ``attend_on_embedding``
        with ``logits_via_embedding``: a tied head, its targets ``h Eᵀ`` in float64) on
        ``batches``
        with ``params`` (a copy of the model, run eagerly with the classes' methods wrapped and
        the unscanned decoder's layers called in place, :func:`layers_in_place`; calls with
        traced values, as inside ``nnx.scan``, are not recorded)."""
        mt = self._mt
        graphdef, _, rest = nnx.split(self.model, nnx.Param, ...)
        model = nnx.merge(graphdef, params, rest)
        paths = {id(m): "/".join(map(str, p)) for p, m in nnx.iter_modules(model)}
        layers: dict[str, Layer] = {}
        dense, norm, embed = mt.linears.DenseGeneral, mt.norms.RMSNorm, mt.embeddings.Embed
        originals = {dense: dense.__call__, norm: norm.__call__, embed: embed.__call__,
                     "attend": embed.attend, "head": mt.decoders.attend_on_embedding}  # fmt: skip
        (table,) = ["/".join(map(str, p)) + "/embedding" for p, m in nnx.iter_modules(model)
                    if isinstance(m, embed)]  # fmt: skip

        def concrete(*arrays):
            return all(not isinstance(a, jax.core.Tracer) for a in arrays)

        def dense_call(module, inputs, *args, **kwargs):
            out = originals[dense](module, inputs, *args, **kwargs)
            path = paths.get(id(module))
            if path is not None and concrete(inputs, out):
                x = np.asarray(inputs, np.float64)
                axes = [a % x.ndim for a in np.atleast_1d(module.axis).tolist()]
                letters = "abcdefghijklmnopqrstuvwxyz"
                xs = letters[: x.ndim]
                outs = letters[x.ndim : x.ndim + len(module.out_features_shape)]
                ws = "".join(xs[a] for a in axes) + outs
                ys = "".join(c for i, c in enumerate(xs) if i not in axes) + outs
                bias = getattr(module, "bias", None) is not None
                call = Call("einsum", x, np.asarray(out, np.float64), f"{xs},{ws}->{ys}", bias)
                add_call(layers, path + "/kernel",
                         Layer("einsum", path + "/kernel", path + "/bias" if bias else None),
                         call)  # fmt: skip
            return out

        def norm_call(module, x, *args, **kwargs):
            out = originals[norm](module, x, *args, **kwargs)
            path = paths.get(id(module))
            if path is not None and concrete(x, out) and module.with_scale:
                x32 = np.asarray(x, np.float32)  # as RMSNorm computes x̂
                ms = np.mean(np.square(x32), axis=-1, keepdims=True)
                xhat = x32 * (np.float32(1) / np.sqrt(ms + np.float32(module.epsilon)))
                call = Call("norm", xhat.astype(np.float64), np.asarray(out, np.float64))
                add_call(layers, path + "/scale",
                         Layer("norm", path + "/scale", offset=float(module.scale_offset)),
                         call)  # fmt: skip
            return out

        def embed_call(module, inputs, *args, **kwargs):
            out = originals[embed](module, inputs, *args, **kwargs)
            path = paths.get(id(module))
            if path is not None and concrete(inputs, out):
                call = Call("lookup", np.asarray(inputs), np.asarray(out, np.float64))
                add_call(layers, path + "/embedding", Layer("embed", path + "/embedding"), call)
            return out

        def attend_call(module, query, *args, **kwargs):
            out = originals["attend"](module, query, *args, **kwargs)
            path = paths.get(id(module))
            if path is not None and concrete(query, out):
                call = Call("head", np.asarray(query, np.float64), np.asarray(out, np.float64))
                add_call(layers, path + "/embedding", Layer("embed", path + "/embedding"), call)
            return out

        def head_call(query, embedding_table, *args, **kwargs):  # logits_via_embedding
            out = originals["head"](query, embedding_table, *args, **kwargs)
            if concrete(query, embedding_table):  # targets h Eᵀ exactly (the head rounds E)
                q = np.asarray(query, np.float64)
                call = Call("head", q, q @ np.asarray(embedding_table, np.float64).T)
                add_call(layers, table, Layer("embed", table), call)
            return out

        dense.__call__, norm.__call__, embed.__call__ = dense_call, norm_call, embed_call
        embed.attend, mt.decoders.attend_on_embedding = attend_call, head_call
        try:
            with self.context(), layers_in_place():
                for batch in batches:
                    model(**batch, **self.call_kwargs)
        finally:
            dense.__call__, norm.__call__ = originals[dense], originals[norm]
            embed.__call__, embed.attend = originals[embed], originals["attend"]
            mt.decoders.attend_on_embedding = originals["head"]
        return layers
