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
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from .._errors import with_context
from ..kinds.base import linen_kind, nnx_kind

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
    form: str = ""
    outputs: Callable | None = None
    scope: str | None = None

    def output_rows(self, y):
        """The call's output ``y`` as ``(N, n_out)`` rows, in the order of :meth:`rows`."""
        return y.reshape(-1, self.n_out) if self.outputs is None else self.outputs(y)


def _describe(kind, module, params, args, kwargs, run, default, path):
    """A :class:`LayerCall` of ``kind``, or ``None`` for a call the kind does not cover."""
    try:
        described = kind.describe_call(module, params, args, kwargs, run)
    except ValueError as error:  # e.g. an einsum equation the kind cannot solve
        raise with_context(error, f"layer {path!r} ({type(module).__name__})") from error
    if described is None:
        return None
    x, shape = described
    kernel, scope = shape.kernel or kind.kernel, None
    own = {kernel, shape.bias}
    if any(n not in own and not isinstance(v, Mapping) for n, v in params.items()):
        # several layers' weights in one module scope (nn.share_scope): keyed by the weight
        path, scope = (f"{path}/{kernel}" if path else kernel), path
    return LayerCall(path, kind.name, shape.n_in, shape.n_out, kernel, shape.bias, params, x,
                     shape.signature, shape.rows, run, default, shape.form, shape.outputs,
                     scope)  # fmt: skip


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

    def apply(self, variables, batch, hook, modules: dict | None = None):
        """Run the model; ``modules``: a dict to fill with ``{module path: [SeenModule]}`` of
        every module whose methods the pass calls (one per class, in call order: modules
        sharing a scope, ``nn.share_scope``, share a path)."""
        hook = _observing_ids(batch, hook, self.id_inputs)

        def interceptor(next_fun, args, kwargs, context):
            if getattr(_local, "bypass", False):
                return next_fun(*args, **kwargs)
            if (modules is not None and context.method_name != "setup"
                    and getattr(context.module, "scope", None) is not None):  # fmt: skip
                seen = modules.setdefault("/".join(context.module.scope.path), [])
                if all(type(context.module) is not m.cls for m in seen):
                    seen.append(seen_module(context.module, "linen", args, kwargs,
                                            context.method_name))  # fmt: skip
            if context.method_name != "__call__":
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
    for name in kind.param_names(module):
        var = getattr(module, name, None)
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
    @functools.wraps(original)  # its signature stays readable (kinds find arguments by name)
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
def _nnx_capture(paths, hook, classes):
    """Replace the ``__call__`` of ``classes`` (the registered classes found in the model)."""
    with _NNX_LOCK:
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

    def apply(self, params, batch, hook, modules: dict | None = None):
        """Run the model; ``modules``: a dict to fill with ``{module path: [SeenModule]}`` of
        every module of the model (NNX cannot tell which of them the pass calls)."""
        state = jax.tree.map(lambda a: a, self.params)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self.graphdef, state, self.rest)
        paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(module)}
        if modules is not None:
            for path, m in nnx.iter_modules(module):
                modules.setdefault("/".join(str(p) for p in path), [seen_module(m, "nnx")])
        classes = {type(m) for _, m in nnx.iter_modules(module) if nnx_kind(type(m))}
        try:
            with _nnx_capture(paths, _observing_ids(batch, hook, self.id_inputs), classes):
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


# ---- the modules a pass sees (for the reasons of parameters left unsolved) ---------------------


@dataclasses.dataclass(frozen=True)
class SeenModule:
    """A module of the traced model, as much as the reasons of unsolved parameters need.

    Attributes:
        cls: the module's class.
        api: ``"linen"`` or ``"nnx"``.
        kind: the name of the layer kind registered for ``cls``, or ``None``.
        accepts: whether that kind accepts the module's configuration (``None``: no kind).
        parent: the nearest base class of ``cls`` registered with a kind, when ``cls`` is not
            registered itself (registered classes match exactly), else ``None``.
        parent_kind: that base class's kind name.
        settings: the module's constructor arguments that differ from their defaults
            (``"batch_dims=(0,)"``), for a registered class.
        inputs: the shapes of the call's array arguments (linen), for a registered class.
        method: the method of the module's first call (linen; ``"__call__"`` in NNX).
    """

    cls: type
    api: str
    kind: str | None = None
    accepts: bool | None = None
    parent: type | None = None
    parent_kind: str | None = None
    settings: str = ""
    inputs: str = ""
    method: str = "__call__"


def seen_module(
    module, api: str, args: tuple = (), kwargs: Mapping | None = None, method: str = "__call__"
) -> SeenModule:
    """The :class:`SeenModule` of ``module`` (of ``api``), its ``method`` called with
    ``args, kwargs``."""
    lookup = linen_kind if api == "linen" else nnx_kind
    cls = type(module)
    kind = lookup(cls)
    if kind is None:
        for base in cls.__mro__[1:]:
            parent = lookup(base) if isinstance(base, type) else None
            if parent is not None:
                return SeenModule(cls, api, parent=base, parent_kind=parent.name)
        return SeenModule(cls, api)
    try:
        accepts = bool(kind.accepts(module))
    except Exception:  # a description only: the capture asks again
        accepts = None
    shapes = [tuple(a.shape) for a in jax.tree.leaves((args, dict(kwargs or {})))
              if hasattr(a, "shape")]  # fmt: skip
    inputs = ", ".join(map(str, shapes[:3])) + (", ..." if len(shapes) > 3 else "")
    return SeenModule(cls, api, kind.name, accepts, settings=_settings(module), inputs=inputs,
                      method=method)  # fmt: skip


def _settings(module, most: int = 4) -> str:
    """``"name=value, ..."`` of the constructor arguments of ``module`` whose values (its
    attributes of the same names) differ from their defaults; short values only."""
    import inspect

    try:
        parameters = inspect.signature(type(module).__init__).parameters.values()
    except (TypeError, ValueError):
        return ""
    out = []
    for p in parameters:
        if p.name in ("self", "parent", "name", "rngs") or p.default is inspect.Parameter.empty:
            continue
        try:
            value = getattr(module, p.name)
            if value is p.default or bool(value == p.default) or callable(value):
                continue
        except Exception:  # no such attribute, or no truth value
            continue
        text = repr(value)
        if len(text) <= 40:
            out.append(f"{p.name}={text}")
    return ", ".join(out[:most])


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
