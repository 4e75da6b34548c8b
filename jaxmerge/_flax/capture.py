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

Captured: the module classes registered with a layer kind (:func:`~jaxmerge.register_kind`;
the built-in kinds in :mod:`jaxmerge.kinds`), exact types only, so a subclass with its own
``__call__`` is never misread, and only calls whose configuration the kind accepts
(:meth:`~jaxmerge.LayerKind.accepts`, :meth:`~jaxmerge.LayerKind.describe`); every other module
runs unchanged, and its parameters take the fallback rule.
"""

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from ..kinds.base import linen_kind, nnx_classes, nnx_kind

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


def _describe(kind, module, params, args, kwargs, run, default, path):
    """A :class:`LayerCall` of ``kind``, or ``None`` for a call the kind does not cover."""
    x = args[0] if args else kwargs.get("inputs", kwargs.get("x"))
    if x is None or not hasattr(x, "shape"):
        return None
    shape = kind.describe(module, params, x, run)
    if shape is None:
        return None
    return LayerCall(path, kind.name, shape.n_in, shape.n_out, kind.kernel, shape.bias, params,
                     x, shape.signature, shape.rows, run, default)  # fmt: skip


# ---- linen --------------------------------------------------------------------------------------


def _linen_call(module, args, kwargs, next_fun):
    kind = linen_kind(type(module))
    if kind is None or not kind.accepts(module):
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


def _nnx_params(module, kind) -> dict:
    out = {}
    for name in (kind.kernel, kind.bias):
        var = getattr(module, name, None) if name else None
        if isinstance(var, nnx.Param):
            out[name] = var[...]
    return out


def _nnx_call(module, path, args, kwargs):
    kind = nnx_kind(type(module))
    original = _local.nnx_calls[type(module)]
    if not kind.accepts(module):
        return None
    params = _nnx_params(module, kind)

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


def _nnx_wrapper(cls, original):
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
        classes = nnx_classes()
        own = {cls: cls.__dict__.get("__call__") for cls in classes}  # None: inherited
        _local.nnx_calls = {cls: cls.__call__ for cls in classes}
        for cls in classes:
            cls.__call__ = _nnx_wrapper(cls, _local.nnx_calls[cls])
        _local.nnx = (paths, hook)
        try:
            yield
        finally:
            _local.nnx = (None, None)
            for cls, original in own.items():
                if original is None:
                    del cls.__call__
                else:
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
