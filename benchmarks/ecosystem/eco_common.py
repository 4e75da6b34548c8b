"""What the ecosystem benchmark's model adapters share: a recorded layer, flat parameter paths."""

import dataclasses

import jax
import numpy as np
from eco_reference import Call, einsum_matrix

__all__ = ["Layer", "add_call", "flat_params", "with_params"]


@dataclasses.dataclass
class Layer:
    """A layer as recorded on one pass: its kind, parameters and calls.

    Attributes:
        kind: ``"einsum"``, ``"norm"`` or ``"embed"``.
        weight: the weight's (einsum), scale's (norm) or table's (embed) parameter path.
        bias: the bias's parameter path, or ``None``.
        offset: a norm's effective scale is ``scale + offset``.
        scale: an embedding's lookup is ``scale · E[t]``.
        calls: the recorded calls, in order.
    """

    kind: str
    weight: str
    bias: str | None = None
    offset: float = 0.0
    scale: float = 1.0
    calls: list[Call] = dataclasses.field(default_factory=list)

    @property
    def params(self) -> list[str]:
        return [p for p in (self.weight, self.bias) if p]

    def matrix(self, flat: dict) -> np.ndarray:
        """This layer of the parameters ``flat`` (``{path: array}``) in matrix form: an einsum's
        ``(contracted[+1], outputs)``, a norm's effective scale."""
        w = np.asarray(flat[self.weight], np.float64)
        if self.kind == "norm":
            return w + self.offset
        if self.kind == "embed":
            return w
        call = self.calls[0]
        return einsum_matrix(call.equation, call.x.ndim, w,
                             None if self.bias is None else flat[self.bias])  # fmt: skip


def add_call(layers: dict, key: str, layer: Layer, call: Call) -> None:
    layers.setdefault(key, layer).calls.append(call)


def flat_params(tree, prefix: str = "") -> dict:
    """``{"a/b/c": array}`` of a nested mapping (a leading ``params`` level dropped)."""
    out = {}
    if hasattr(tree, "items"):
        for k, v in tree.items():
            if not prefix and str(k) == "params" and hasattr(v, "items"):
                out.update(flat_params(v, prefix))
                continue
            out.update(flat_params(v, f"{prefix}{k}/"))
        return out
    out[prefix[:-1]] = tree
    return out


def with_params(tree, values: dict):
    """``tree`` with the parameters at the :func:`flat_params` paths of ``values`` replaced."""
    used = set()

    def put(path, leaf):
        # dict keys and sequence indices (an nnx.State's Variable adds a GetAttrKey "value")
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", None))) for k in path
                       if not isinstance(k, jax.tree_util.GetAttrKey))  # fmt: skip
        key = key.removeprefix("params/") if key not in values else key
        if key in values:
            used.add(key)
            return values[key]
        return leaf

    out = jax.tree_util.tree_map_with_path(put, tree)
    assert used == set(values), f"no such parameters: {sorted(set(values) - used)}"
    return out
