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

import flax
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


def _observing_ids(batch, hook, found: dict):
    """``hook``, recording in ``found`` the batch entry each embedding reads as it is:
    ``{layer path: (the entry's key path in the batch, vocabulary size)}`` (ids computed inside
    the model are not recorded)."""
    entries = {id(leaf): path for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]}

    def observed(call):
        if call.kind == "embed" and id(call.x) in entries:  # the kind of jaxmerge.kinds.embed
            found[call.path] = (entries[id(call.x)], call.n_in)
        return hook(call)

    return observed


# linen layers that need to be told their mode: the attribute (or call argument) naming it
_LINEN_MODES = {nn.Dropout: "deterministic", nn.BatchNorm: "use_running_average"}


def _check_linen_mode(module, args, kwargs) -> None:
    """A linen ``Dropout`` or ``BatchNorm`` must run in inference mode: a merge's forward passes
    are traced, without dropout RNGs or mutable batch statistics."""
    name = _LINEN_MODES.get(type(module))
    if name is None:
        return
    value = kwargs.get(name, args[1] if len(args) > 1 else None)
    value = getattr(module, name) if value is None else value
    if value or (isinstance(module, nn.Dropout) and module.rate == 0):
        return
    path = "/".join(module.scope.path)
    state = f"is given no {name!r}" if value is None else f"runs in training mode ({name}=False)"
    raise ValueError(
        f"the {type(module).__name__} layer {path!r} {state}; a merge runs the model "
        f"in inference mode, without dropout RNGs or updates of batch statistics: pass "
        f"{name}=True, at construction or through a call_kwargs entry the model forwards to "
        "it (e.g. call_kwargs={'train': False})"
    )


class LinenModel:
    """A linen module applied to a pure variables dict with a hook on supported layers."""

    def __init__(self, module: nn.Module, call_kwargs: Mapping | None):
        self.module = module
        self.call_kwargs = dict(call_kwargs or {})
        self.id_inputs: dict = {}  # see _observing_ids

    def apply(self, variables, batch, hook):
        hook = _observing_ids(batch, hook, self.id_inputs)

        def interceptor(next_fun, args, kwargs, context):
            if getattr(_local, "bypass", False) or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            _check_linen_mode(context.module, args, kwargs)
            call = _linen_call(context.module, args, kwargs, next_fun)
            return next_fun(*args, **kwargs) if call is None else hook(call)

        try:
            with nn.intercept_methods(interceptor):
                if isinstance(batch, Mapping):
                    return self.module.apply(variables, **batch, **self.call_kwargs)
                return self.module.apply(variables, batch, **self.call_kwargs)
        except flax.errors.ScopeCollectionNotFound as error:
            raise ValueError(
                f"{error} A merge runs the model with the variables it is given: pass the base "
                "and every fine-tune as linen variables dicts holding that collection "
                "({'params': ..., 'batch_stats': ...}), not their params alone."
            ) from error


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
        self.id_inputs: dict = {}  # see _observing_ids

    def apply(self, params, batch, hook):
        state = jax.tree.map(lambda a: a, self.params)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self.graphdef, state, self.rest)
        paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(module)}
        try:
            with _nnx_capture(paths, _observing_ids(batch, hook, self.id_inputs)):
                if isinstance(batch, Mapping):
                    return module(**batch, **self.call_kwargs)
                return module(batch, **self.call_kwargs)
        except flax.errors.TraceContextError as error:
            training = [
                f"{'/'.join(map(str, path))!r} ({type(m).__name__}, {name}=False)"
                for path, m in nnx.iter_modules(module)
                for name in ("deterministic", "use_running_average")
                if getattr(m, name, None) is False
            ]
            if not training:
                raise
            raise ValueError(
                f"NNX modules left in training mode: {', '.join(training[:4])}; a merge runs "
                "the model in inference mode under tracing, where it can neither draw dropout "
                "RNGs nor update batch statistics: call model.eval() before merging (or merge "
                f"nnx.view(model, deterministic=True, ...)). Flax: {error}"
            ) from error


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
