"""Observe and replace the calls of supported layers during a Flax forward pass.

A *hook* receives a :class:`LayerCall` for every call of a supported layer and returns the layer's
output: ``call.default()`` runs the layer as the model would, ``call.run(params)`` runs it with
other parameters (the sequential merge swaps in each merged layer as soon as it is solved) and
``call.rows()`` gives its inputs as rows of the affine map the core solves.

* **linen**: ``flax.linen.intercept_methods``; the layer's path is its scope path.
* **NNX**: NNX has no method interception, so the layer methods of the supported NNX classes
  are replaced for the duration of one forward pass by a wrapper that dispatches on the
  instance (paths from ``nnx.iter_modules``). A layer called through a copy (``nnx.merge``,
  ``nnx.scan``, a ``jax.lax.scan`` over split state) is known by its number among such calls
  in the pass, its place found once by the plan (:mod:`jaxmerge._flax.provenance`). Only these
  exact classes are captured; subclasses and every other module run unchanged. Do not run
  other NNX code in another thread during a capture.

Layers under ``jit``, ``remat``, ``scan`` and ``vmap`` are captured like any other: the
transforms run inline during a capture (:mod:`jaxmerge._flax.lifts`).

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
from jax._src import core as jax_core

from .._errors import with_context
from ..kinds.registry import linen_kind, nnx_kind
from .lifts import current_slices, inline_jax, inline_lifts, not_inline

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
    slices: tuple = ()

    def output_rows(self, y):
        """The call's output ``y`` as ``(N, n_out)`` rows, in the order of :meth:`rows`."""
        return y.reshape(-1, self.n_out) if self.outputs is None else self.outputs(y)


def _describe(
    kind, module, params, args, kwargs, run, default, path, method="__call__", slices=None
):
    """A :class:`LayerCall` of ``kind``, or ``None`` for a call the kind does not cover;
    ``slices``: the call's slices of stacked parameters (default: the inlined linen
    transforms')."""
    try:
        described = kind.describe_call(module, params, args, kwargs, run, method)
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
    slices = current_slices() if slices is None else slices
    if slices:  # one slice of stacked parameters (under an inlined scan or vmap)
        path, scope = path + "".join(f"[{i}]" for _, i in slices), scope or path
    return LayerCall(path, kind.name, shape.n_in, shape.n_out, kernel, shape.bias, params, x,
                     shape.signature, shape.rows, run, default, shape.form, shape.outputs,
                     scope, slices)  # fmt: skip


# ---- linen --------------------------------------------------------------------------------------


def _linen_call(module, args, kwargs, next_fun, method="__call__"):
    kind = linen_kind(type(module))
    if kind is None or method not in kind.methods(type(module)) or not kind.accepts(module):
        return None
    params = module.variables.get("params", {})

    def run(new_params, **overrides):
        if overrides:  # an identity-kernel pass: no bias
            overrides = {**overrides, "use_bias": False}
        clone = module.clone(parent=None, **overrides)
        with _bypass():
            return clone.apply({"params": new_params}, *args, method=method, **kwargs)

    def default():
        with _bypass():
            return next_fun(*args, **kwargs)

    path = "/".join(module.scope.path)
    return _describe(kind, module, params, args, kwargs, run, default, path, method)


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

    def probed(self) -> list:
        """Linen layers are known by their scopes: none is called through a copy."""
        return []

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
            if context.method_name == "__call__":
                _check_linen_mode(context.module, args, kwargs)
            call = _linen_call(context.module, args, kwargs, next_fun, context.method_name)
            return next_fun(*args, **kwargs) if call is None else hook(call)

        try:
            with nn.intercept_methods(interceptor), inline_lifts():
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


def _nnx_call(module, path, slices, args, kwargs, method):
    kind = nnx_kind(type(module))
    original = _local.nnx_calls[type(module), method]
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

    return _describe(kind, module, params, args, kwargs, run, default, path, method, slices)


@dataclasses.dataclass
class _NnxPass:
    """One NNX forward pass being captured: the model's modules (``{id: path}``), the hook, the
    places of layers called through copies (``{call number: Located or None}``, from the
    plan; ``None``: not located, the call runs unobserved), the copies' calls to locate
    (``[(call number, class name, params)]``), the model and the trace the pass runs in (a layer
    called in another one is under a transform that did not run inline)."""

    paths: dict
    hook: Callable
    located: Mapping
    probes: list
    root: nnx.Module
    copies: int = 0
    trace: Any = dataclasses.field(default_factory=lambda: jax_core.trace_ctx.trace)


def _nnx_wrapper(cls, method, original):
    @functools.wraps(original)  # its signature stays readable (kinds find arguments by name)
    def wrapper(self, *args, **kwargs):
        capture = getattr(_local, "nnx", None)
        if (getattr(_local, "bypass", False) or capture is None or type(self) is not cls
                or jax_core.trace_ctx.trace is not capture.trace):  # fmt: skip
            # (another trace: a JAX transform applied before the pass, which cannot run
            # inline; the layer is reported not captured)
            return original(self, *args, **kwargs)
        kind = nnx_kind(cls)
        accepts = kind.accepts(self)
        if id(self) in capture.paths:
            path, slices = capture.paths[id(self)], ()
        else:  # a copy of a layer of the model
            number, capture.copies = capture.copies, capture.copies + 1
            place = capture.located.get(number)
            if place is None:
                if number not in capture.located and accepts:
                    capture.probes.append((number, cls.__name__, _nnx_params(self, kind)))
                return original(self, *args, **kwargs)
            path, slices = place.module, place.slices
        call = _nnx_call(self, path, slices, args, kwargs, method) if accepts else None
        if call is None:
            return original(self, *args, **kwargs)
        with not_inline():
            return capture.hook(call)

    return wrapper


_NNX_MODES = {nnx.Dropout: "deterministic", nnx.BatchNorm: "use_running_average"}


def _nnx_mode_checked(cls, original):
    """``cls.__call__`` raising when the layer runs in training mode (the mode is decided per
    call: MaxText and EasyDeL pass ``deterministic`` to their Dropouts)."""
    name = _NNX_MODES[cls]

    @functools.wraps(original)
    def checked(self, *args, **kwargs):
        value = kwargs.get(name)
        value = getattr(self, name) if value is None else value
        if value is False and not (isinstance(self, nnx.Dropout) and self.rate == 0):
            capture = _local.nnx
            here = f"{capture.paths.get(id(self), '(a copy of a layer)')!r}"
            training = [f"{here} ({type(self).__name__}, {name}=False)"] + [
                f"{'/'.join(map(str, path))!r} ({type(m).__name__}, {attr}=False)"
                for path, m in nnx.iter_modules(capture.root)  # the others set so
                for attr in [_NNX_MODES.get(type(m))]
                if m is not self and attr and getattr(m, attr) is False
            ]
            raise ValueError(
                f"NNX modules left in training mode: {', '.join(training[:4])}; a merge runs "
                "the model in inference mode, without dropout RNGs or updates of batch "
                "statistics: call model.eval() before merging (or merge "
                f"nnx.view(model, deterministic=True, ...)), or pass {name}=True through "
                "call_kwargs"
            )
        return original(self, *args, **kwargs)

    return checked


_NNX_LOCK = threading.Lock()


@contextlib.contextmanager
def _nnx_capture(capture: _NnxPass, classes):
    """Replace the layer methods (:meth:`~jaxmerge.LayerKind.methods`) of ``classes`` (the
    registered classes found in the model)."""
    with _NNX_LOCK:
        methods = [(cls, m) for cls in classes for m in nnx_kind(cls).methods(cls)]
        checked = [(cls, "__call__") for cls in _NNX_MODES if cls not in classes]
        methods += checked
        own = {(cls, m): cls.__dict__.get(m) for cls, m in methods}  # None: inherited
        _local.nnx_calls = {(cls, m): getattr(cls, m) for cls, m in methods}
        for cls, m in methods:
            original = _local.nnx_calls[cls, m]
            setattr(cls, m, _nnx_mode_checked(cls, original) if (cls, m) in checked
                    else _nnx_wrapper(cls, m, original))  # fmt: skip
        _local.nnx = capture
        try:
            yield
        finally:
            _local.nnx = None
            for (cls, m), original in own.items():
                if original is None:
                    delattr(cls, m)
                else:
                    setattr(cls, m, original)


class NnxModel:
    """An NNX module applied to a pure parameter dict with a hook on supported layers.

    Attributes:
        located: ``{call number: Located or None}``: where the layers the model calls through
            copies are (see :mod:`jaxmerge._flax.provenance`; ``None``: they could not be
            located, and run unobserved), set by the plan.
        probes: the last pass's calls through copies not located yet
            (``[(call number, class name, {parameter name: value})]``).
    """

    def __init__(self, module: nnx.Module, call_kwargs: Mapping | None):
        self.graphdef, self.params, self.rest = nnx.split(module, nnx.Param, ...)
        self.call_kwargs = dict(call_kwargs or {})
        self.id_inputs: dict = {}  # see _observing_ids
        self.located: dict = {}
        self.probes: list = []

    def probed(self) -> list:
        """The parameters of the last pass's :attr:`probes`, in order."""
        return [v for _, _, params in self.probes for v in params.values()]

    def apply(self, params, batch, hook, modules: dict | None = None):
        """Run the model; ``modules``: a dict to fill with ``{module path: [SeenModule]}`` of
        every module of the model (NNX cannot tell which of them the pass calls)."""
        state = jax.tree.map(lambda a: a, self.params)
        nnx.replace_by_pure_dict(state, params)
        # the other state is copied as well: variables made in this trace, which a module
        # that writes state back (nnx.update, an nnx.Rngs' count) may set
        module = nnx.merge(self.graphdef, state, jax.tree.map(lambda a: a, self.rest))
        paths = {id(m): "/".join(str(p) for p in path) for path, m in nnx.iter_modules(module)}
        if modules is not None:
            for path, m in nnx.iter_modules(module):
                modules.setdefault("/".join(str(p) for p in path), [seen_module(m, "nnx")])
        classes = {type(m) for _, m in nnx.iter_modules(module) if nnx_kind(type(m))}
        self.probes = []
        capture = _NnxPass(paths, _observing_ids(batch, hook, self.id_inputs), self.located,
                           self.probes, module)  # fmt: skip
        with _nnx_capture(capture, classes), inline_jax():
            if isinstance(batch, Mapping):
                return module(**batch, **self.call_kwargs)
            return module(batch, **self.call_kwargs)


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
