"""Observe and replace the calls of supported layers during a Flax forward pass.

A *hook* receives a :class:`LayerCall` for every call of a supported layer and returns the layer's
output: ``call.default()`` runs the layer as the model would, ``call.run(params)`` runs it with
other parameters (the sequential merge swaps in each merged layer as soon as it is solved) and
``call.rows()`` gives its inputs as rows of the affine map the core solves.

* **linen**: ``flax.linen.intercept_methods``; the layer's path is its scope path.
* **NNX**: NNX has no method interception, so the ``__call__`` of the supported NNX classes is
  replaced for the duration of one forward pass by a wrapper that dispatches on the instance
  (paths from ``nnx.iter_modules``). Only these exact classes are captured; subclasses and every
  other module run unchanged. Do not run other NNX code in another thread during a capture.

Supported (exact types, so a subclass with its own ``__call__`` is never misread): linen
``Dense``, ``DenseGeneral`` (without ``batch_dims``), ``Conv`` (one feature group, no kernel
mask), ``Embed``, ``LayerNorm`` and ``RMSNorm`` (with a scale, normalising the last axis); NNX
``Linear``, ``LinearGeneral`` (without ``batch_axis``), ``Conv``, ``Embed``, ``LayerNorm``,
``RMSNorm`` under the same conditions. Conv patches and normalised inputs are computed by the
layer itself with an identity kernel, a unit scale and a zero bias, so every padding mode, dtype
and epsilon is honoured exactly.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .adapters import general_rows

_local = threading.local()


@contextlib.contextmanager
def _bypass():
    """Calls made inside run the real layer, unobserved."""
    before = getattr(_local, "bypass", False)
    _local.bypass = True
    try:
        yield
    finally:
        _local.bypass = before


@dataclasses.dataclass
class LayerCall:
    """One call of a supported layer (see the module docs)."""

    path: str
    kind: str
    n_in: int
    n_out: int
    kernel: str
    bias: str | None
    params: Mapping
    x: Any
    signature: tuple
    rows: Callable
    run: Callable
    default: Callable


def _is_axis_last(axes) -> bool:
    return tuple(np.atleast_1d(axes).tolist()) == (-1,)


def _describe(kind, module, params, args, kwargs, run, default, path):
    """A :class:`LayerCall`, or ``None`` for a configuration the adapters do not cover."""
    x = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
    if x is None or not hasattr(x, "shape"):
        return None
    if kind in ("dense", "dense_general", "conv"):
        kernel = params.get("kernel")
        if kernel is None:
            return None
        bias = "bias" if params.get("bias") is not None else None
    if kind == "dense":
        n_in, n_out = kernel.shape
        if x.shape[-1] != n_in:
            return None

        def rows():
            return x.reshape(-1, n_in), x.shape[:-1]

        signature = ("affine", id(x), (x.ndim - 1,))
        return LayerCall(path, kind, n_in, n_out, "kernel", bias, params, x, signature, rows,
                         run, default)  # fmt: skip
    if kind == "dense_general":
        axes = tuple(a % x.ndim for a in np.atleast_1d(module.axis).tolist())
        n_in = int(np.prod([x.shape[a] for a in axes]))
        n_out = int(np.prod(kernel.shape)) // n_in
        if tuple(kernel.shape[: len(axes)]) != tuple(x.shape[a] for a in axes):
            return None

        def rows():
            return general_rows(x, axes)

        signature = ("affine", id(x), axes)
        return LayerCall(path, kind, n_in, n_out, "kernel", bias, params, x, signature, rows,
                         run, default)  # fmt: skip
    if kind == "conv":
        n_in, n_out = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
        eye = jnp.eye(n_in, dtype=kernel.dtype).reshape(*kernel.shape[:-1], n_in)

        def rows():
            patches = run({"kernel": eye}, features=n_in)
            return patches.reshape(-1, n_in), patches.shape[:-1]

        signature = ("conv", id(module))
        return LayerCall(path, kind, n_in, n_out, "kernel", bias, params, x, signature, rows,
                         run, default)  # fmt: skip
    if kind == "embed":
        table = params.get("embedding")
        if table is None or not jnp.issubdtype(x.dtype, jnp.integer):
            return None
        n_in, n_out = table.shape

        def rows():
            return x.reshape(-1), x.shape

        return LayerCall(path, kind, n_in, n_out, "embedding", None, params, x, ("embed", path),
                         rows, run, default)  # fmt: skip
    # norm
    scale = params.get("scale")
    if scale is None or scale.ndim != 1 or x.shape[-1] != scale.shape[0]:
        return None
    if not (_is_axis_last(module.feature_axes) and _is_axis_last(module.reduction_axes)):
        return None
    bias = "bias" if params.get("bias") is not None else None
    c = scale.shape[0]
    unit = {"scale": jnp.ones_like(scale)}
    if bias:
        unit["bias"] = jnp.zeros_like(params["bias"])

    def rows():
        return run(unit).reshape(-1, c), x.shape[:-1]

    return LayerCall(path, kind, c, c, "scale", bias, params, x, ("norm", path), rows, run,
                     default)  # fmt: skip


# ---- linen --------------------------------------------------------------------------------------

_LINEN = {
    nn.Dense: "dense",
    nn.DenseGeneral: "dense_general",
    nn.Conv: "conv",
    nn.Embed: "embed",
    nn.LayerNorm: "norm",
    nn.RMSNorm: "norm",
}


def _linen_call(module, args, kwargs, next_fun):
    kind = _LINEN.get(type(module))
    if kind is None or (kind == "conv" and (module.feature_group_count != 1 or module.mask)):
        return None
    if kind == "dense_general" and module.batch_dims:
        return None
    params = module.variables.get("params", {})

    def run(new_params, **overrides):
        if overrides:  # an identity-kernel pass: no bias
            overrides = {**overrides, "use_bias": False}
        clone = module.clone(parent=None, **overrides)
        with _bypass():
            return clone.apply({"params": new_params}, *args, **kwargs)

    def default():
        with _bypass():
            return next_fun(*args, **kwargs)

    path = "/".join(module.scope.path)
    return _describe(kind, module, params, args, kwargs, run, default, path)


class LinenModel:
    """A linen module applied to a pure variables dict with a hook on supported layers."""

    def __init__(self, module: nn.Module, call_kwargs: Mapping | None):
        self.module = module
        self.call_kwargs = dict(call_kwargs or {})

    def apply(self, variables, batch, hook):
        def interceptor(next_fun, args, kwargs, context):
            if getattr(_local, "bypass", False) or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            call = _linen_call(context.module, args, kwargs, next_fun)
            return next_fun(*args, **kwargs) if call is None else hook(call)

        with nn.intercept_methods(interceptor):
            if isinstance(batch, Mapping):
                return self.module.apply(variables, **batch, **self.call_kwargs)
            return self.module.apply(variables, batch, **self.call_kwargs)


# ---- NNX ----------------------------------------------------------------------------------------

_NNX = {
    nnx.Linear: "dense",
    nnx.LinearGeneral: "dense_general",
    nnx.Conv: "conv",
    nnx.Embed: "embed",
    nnx.LayerNorm: "norm",
    nnx.RMSNorm: "norm",
}
_NNX_CALLS = {cls: cls.__dict__["__call__"] for cls in _NNX}


def _nnx_params(module) -> dict:
    out = {}
    for name in ("kernel", "bias", "embedding", "scale"):
        var = getattr(module, name, None)
        if isinstance(var, nnx.Param):
            out[name] = var[...]
    return out


def _nnx_call(module, path, args, kwargs):
    cls = type(module)
    kind = _NNX[cls]
    original = _NNX_CALLS[cls]
    if kind == "conv" and (module.feature_group_count != 1 or module.mask is not None):
        return None
    if kind == "dense_general" and module.batch_axis:
        return None
    params = _nnx_params(module)

    def run(new_params, **overrides):
        saved = {name: getattr(module, name)[...] for name in params}
        try:
            for name in params:
                value = new_params.get(name)
                if value is None:  # an identity-kernel pass without bias
                    value = jnp.zeros((overrides["features"],), params[name].dtype)
                getattr(module, name).set_value(value)
            with _bypass():
                return original(module, *args, **kwargs)
        finally:
            for name, value in saved.items():
                getattr(module, name).set_value(value)

    def default():
        with _bypass():
            return original(module, *args, **kwargs)

    return _describe(kind, module, params, args, kwargs, run, default, path)


def _nnx_wrapper(cls):
    original = _NNX_CALLS[cls]

    def __call__(self, *args, **kwargs):
        paths, hook = getattr(_local, "nnx", (None, None))
        if (
            getattr(_local, "bypass", False)
            or hook is None
            or type(self) is not cls
            or id(self) not in paths
        ):
            return original(self, *args, **kwargs)
        call = _nnx_call(self, paths[id(self)], args, kwargs)
        return original(self, *args, **kwargs) if call is None else hook(call)

    return __call__


_NNX_LOCK = threading.Lock()


@contextlib.contextmanager
def _nnx_capture(paths, hook):
    with _NNX_LOCK:
        for cls in _NNX:
            cls.__call__ = _nnx_wrapper(cls)
        _local.nnx = (paths, hook)
        try:
            yield
        finally:
            _local.nnx = (None, None)
            for cls, original in _NNX_CALLS.items():
                cls.__call__ = original


class NnxModel:
    """An NNX module applied to a pure parameter dict with a hook on supported layers."""

    def __init__(self, module: nnx.Module, call_kwargs: Mapping | None):
        self.graphdef, self.params, self.rest = nnx.split(module, nnx.Param, ...)
        self.call_kwargs = dict(call_kwargs or {})

    def apply(self, params, batch, hook):
        state = jax.tree.map(lambda a: a, self.params)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self.graphdef, state, self.rest)
        paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(module)}
        with _nnx_capture(paths, hook):
            if isinstance(batch, Mapping):
                return module(**batch, **self.call_kwargs)
            return module(batch, **self.call_kwargs)


def as_model(model, call_kwargs: Mapping | None = None):
    """Wrap a linen or NNX module; anything else is a TypeError."""
    if isinstance(model, nn.Module):
        return LinenModel(model, call_kwargs)
    if isinstance(model, nnx.Module):
        return NnxModel(model, call_kwargs)
    raise TypeError(
        f"merge: model must be a flax.linen.Module or a flax.nnx.Module, got "
        f"{type(model).__name__}."
    )
