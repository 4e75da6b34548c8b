"""Built-in registrations for the layer classes of the JAX LLM libraries, by qualified class name
(:func:`~jaxmerge.register_layer`, :func:`~jaxmerge.register_norm`), so that none of those
libraries is imported.

* **gemma** (Google DeepMind, Flax linen): ``_layers.Einsum``, called as ``(eqn, x)`` with the
  weight named by its ``weight_name`` (``"w"``; the feed-forward's ``gating_einsum`` and
  ``linear``, which share the module scope of their ``FeedForward``); ``_layers.RMSNorm``,
  ``x̂ ⊙ (1 + scale)``; ``_modules.Embedder``, a table ``input_embedding`` read by ``encode``
  (rows scaled by ``√embed_dim``) and by the tied head ``decode``.
* **MaxText** (Flax NNX): ``linears.DenseGeneral`` (``axis`` contracted with the kernel's
  leading ``in_features_shape`` axes, outputs ``out_features_shape``; not covered with
  quantization, a kernel scale or ``slice_bounds``); ``normalizations.RMSNorm``,
  ``x̂ ⊙ (scale + scale_offset)``; ``embeddings.Embed``, read by ``__call__`` and the tied head
  ``attend``.
* **EasyDeL** (Flax NNX): ``ColumnParallelLinear`` and ``RowParallelLinear``, kernel
  ``(in, out)`` and an optional bias over the input's last axis (not covered with an output
  ``scale`` or a weight passed as ``w=``: the tied head ``lm_head(h, w=table.T)`` is the
  embedding's, :mod:`jaxmerge.model.heads`); its ``RMSNorm``, whose scale is named ``kernel``; its
  ``Embed``, read by ``__call__`` and the tied head ``attend``.
"""

import math

from .einsum import EinsumCall, contraction_equation, register_layer
from .embed import register_embedding
from .norm import register_norm

# ---- gemma ----------------------------------------------------------------------------------

register_layer(
    "gemma.gm.nn._layers.Einsum",
    api="linen",
    input="x",
    weight=lambda module: module.weight_name,
    bias=None,
    equation=lambda call: call.kwargs.get("eqn", call.args[0] if call.args else None),
)
register_norm("gemma.gm.nn._layers.RMSNorm", api="linen", offset=1.0)
register_embedding(
    "gemma.gm.nn._modules.Embedder",
    api="linen",
    table="input_embedding",
    lookup="encode",
    head="decode",
    scale=lambda module: math.sqrt(module.embed_dim),
)


# ---- MaxText --------------------------------------------------------------------------------


def _maxtext_dense(call: EinsumCall) -> str | None:
    module = call.module
    if call.kwargs.get("slice_bounds") is not None or len(call.args) > 3:
        return None
    if getattr(module, "quant", None) is not None or getattr(module, "kernel_scale", None):
        return None
    return contraction_equation(call.x.ndim, module.axis, len(module.out_features_shape))


register_layer(
    "maxtext.layers.linears.DenseGeneral", api="nnx", input="inputs", equation=_maxtext_dense
)
register_embedding("maxtext.layers.embeddings.Embed", api="nnx", head="attend")
register_norm(
    "maxtext.layers.normalizations.RMSNorm",
    api="nnx",
    offset=lambda module: module.scale_offset,
    accepts=lambda module: module.with_scale,
)


# ---- EasyDeL --------------------------------------------------------------------------------


def _easydel_linear(call: EinsumCall) -> str | None:
    # a weight passed in (``w=``, how EasyDeL ties a head) or an output scale: not this layer's
    # own einsum of its kernel
    given = call.kwargs.get("w", call.args[1] if len(call.args) > 1 else None)
    scale = getattr(call.module, "_scale_operator", None)
    if given is not None or (scale is not None and scale(1.0) != 1.0):
        return None
    return "...i,io->...o"


for _name in ("ParallelLinear", "ColumnParallelLinear", "RowParallelLinear"):
    register_layer(
        f"easydel.layers.linears._linear.{_name}",
        api="nnx",
        input="inputs",
        equation=_easydel_linear,
    )
register_norm("easydel.layers.norms._norms.RMSNorm", api="nnx", scale="kernel")
register_embedding("easydel.layers.embeddings._embeddings.Embed", api="nnx", head="attend")
