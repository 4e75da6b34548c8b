"""Transforms run inline while a capture observes a forward pass.

A layer called under ``jit``, ``remat``, ``scan`` or ``vmap`` would be traced in an inner trace
(its inputs leak from it) or mapped (one call for all slices). During a capture these transforms
run inline instead, with the same values: ``jit`` and ``remat`` are identities of the forward
pass (the merge's passes are traced and compiled as a whole), ``scan`` and ``vmap`` are unrolled,
one call per index.

* **linen** (:func:`inline_lifts`): ``flax.core.lift``'s ``jax`` and ``axes_scan`` are swapped,
  so ``nn.jit``, ``nn.remat``, ``nn.scan`` and ``nn.vmap`` run inline, and each layer under a
  mapped ``params`` collection is a slice of stacked parameters (:func:`current_slices`).
* **NNX and plain JAX** (:func:`inline_jax`): the pass runs under ``jax.disable_jit()`` (so
  ``jax.jit`` and ``nnx.jit`` run their functions, and ``jax.lax.scan``, also under
  ``nnx.scan``, is unrolled), and ``jax.checkpoint`` / ``jax.remat`` / ``jax.vmap`` called during
  the pass (as ``nnx.remat``, ``nnx.vmap`` and MaxText's decoder call them) return the function
  itself or its unrolled map. Where each copied or sliced layer's parameters come from is found
  afterwards (:mod:`jaxmerge._flax.provenance`). Functions transformed before the pass began
  (a ``jax.checkpoint`` or ``jax.vmap`` decorating a function at import) still run transformed;
  a layer called inside one is reported, not captured.
"""

import contextlib
import functools
import threading
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

_local = threading.local()


def current_slices() -> tuple:
    """``((axis, index), ...)`` of the inlined linen ``scan``/``vmap`` iterations running now."""
    return tuple(getattr(_local, "slices", ()))


def _is_axis(axis, broadcast) -> bool:
    return axis is not None and axis is not broadcast


def _map_axes(fn, axes, tree, broadcast):
    """``fn(axis, subtree)`` over the prefix tree ``axes`` of ``tree`` (``None`` or
    ``broadcast``: the subtree as it is)."""
    return jax.tree.map(
        lambda axis, sub: fn(axis, sub) if _is_axis(axis, broadcast) else sub,
        axes,
        tree,
        is_leaf=lambda a: a is None or a is broadcast,
    )


def _sliced(axes, tree, i, broadcast):
    return _map_axes(lambda ax, sub: jax.tree.map(lambda a: jnp.take(a, i, axis=ax), sub), axes,
                     tree, broadcast)  # fmt: skip


def _stacked(axes, trees, broadcast):
    def stack(axis, *subs):
        if not _is_axis(axis, broadcast):
            return subs[0]
        return jax.tree.map(lambda *a: jnp.stack(a, axis=axis), *subs)

    return jax.tree.map(stack, axes, *trees, is_leaf=lambda a: a is None or a is broadcast)


def _axis_size(axes, tree, broadcast) -> int:
    """The length of the mapped axes (the first mapped leaf's)."""
    sizes = _map_axes(lambda ax, sub: [a.shape[ax] for a in jax.tree.leaves(sub)], axes, tree,
                      broadcast)  # fmt: skip
    return jax.tree.leaves(sizes)[0]


def _holds_params(group) -> bool:
    """Whether a lifted transform's variable group (per scope, ``{collection: variables}``)
    holds the ``params`` collection."""
    if isinstance(group, Mapping):
        return "params" in group
    return isinstance(group, tuple | list) and any(_holds_params(g) for g in group)


@contextlib.contextmanager
def _slice_of(axes, groups, i, broadcast):
    """While one iteration of an inlined ``scan`` or ``vmap`` runs: the layers it calls are the
    ``i``-th slices of stacked parameters when the ``params`` collection is mapped."""
    axis = next((ax for ax, g in zip(axes, groups, strict=False)
                 if _is_axis(ax, broadcast) and _holds_params(g)), None)  # fmt: skip
    stack = _local.__dict__.setdefault("slices", [])
    if axis is not None:
        stack.append((axis, i))
    try:
        yield
    finally:
        if axis is not None:
            stack.pop()


def _identity(fun=None, **_):
    """``jax.checkpoint`` / ``jax.jit`` inline: the function itself (also as a decorator)."""
    return (lambda f: f) if fun is None else fun


def _unrolled_vmap(fun=None, *, in_axes=0, out_axes=0, axis_size=None, linen=False, **_):
    """``jax.vmap(fun, in_axes, out_axes)`` unrolled: one call per index, outputs stacked
    (keyword arguments are mapped over axis 0, as ``jax.vmap`` maps them). ``linen``: called
    as Flax's lifted ``vmap`` calls it (``mapped(variable_groups, rng_groups, args)``), each
    iteration a slice of the stacked ``params`` (:func:`current_slices`)."""
    if fun is None:
        return functools.partial(_unrolled_vmap, in_axes=in_axes, out_axes=out_axes,
                                 axis_size=axis_size, linen=linen)  # fmt: skip

    def mapped(*args, **kwargs):
        axes = tuple(in_axes) if isinstance(in_axes, list | tuple) else (in_axes,) * len(args)
        tree, axes = (args, kwargs), (axes, jax.tree.map(lambda _: 0, kwargs))
        n = axis_size if axis_size is not None else _axis_size(axes, tree, None)
        outs = []
        for i in range(n):
            with _slice_of(axes[0][0], args[0], i, None) if linen else contextlib.nullcontext():
                a, k = _sliced(axes, tree, i, None)
                outs.append(fun(*a, **k))
        return _stacked(out_axes, outs, None)

    return mapped


class _InlineAxesScan:
    """``flax.core.axes_scan`` as Flax's lifted ``scan`` calls it
    (``scanned(broadcast_vars, carry, scan_variable_groups, rng_groups, args)``), unrolled."""

    def __init__(self, axes_scan):
        self.broadcast = axes_scan.broadcast

    def scan(self, fn, in_axes, out_axes, length=None, reverse=False, **_):
        broadcast = self.broadcast

        def scanned(broadcast_in, carry, *xs):
            n = length if length is not None else _axis_size(in_axes, xs, broadcast)
            ys = [None] * n
            broadcast_out = broadcast_in
            for i in reversed(range(n)) if reverse else range(n):
                with _slice_of(in_axes[0], xs[0], i, broadcast):
                    broadcast_out, carry, ys[i] = fn(
                        broadcast_in, carry, *_sliced(in_axes, xs, i, broadcast)
                    )
            return broadcast_out, carry, _stacked(out_axes, ys, broadcast)

        return scanned


class _InlineJax:
    """``jax`` as Flax's lifted transforms see it during a capture: ``jit`` and ``remat`` (and
    ``checkpoint``) return the function itself, ``vmap`` is unrolled; everything else is
    JAX's."""

    jit = remat = checkpoint = staticmethod(_identity)
    vmap = staticmethod(functools.partial(_unrolled_vmap, linen=True))

    def __getattr__(self, name):
        return getattr(jax, name)


_LIFT_LOCK = threading.RLock()
_lift_depth = 0
_jitted: list = []


@contextlib.contextmanager
def inline_lifts():
    """Run linen's lifted ``nn.jit``, ``nn.remat``, ``nn.scan`` and ``nn.vmap`` inline
    (``scan`` and ``vmap`` unrolled, one call per index: each layer under them is a slice of
    stacked parameters, :attr:`~jaxmerge.LayerSpec.slices`). ``jit`` and ``remat`` are
    identities of the forward pass, and the merge's passes are traced and compiled as a whole,
    so a layer under them is observed like any other: its inputs stay in the capture's trace
    instead of leaking from an inner one. ``flax.core.lift`` looks ``jax.jit``, ``jax.remat``,
    ``jax.vmap`` and ``axes_scan.scan`` up when a lifted call runs, so this holds for classes
    transformed before the capture too; methods decorated with ``nn.jit``, whose compiled trace
    Flax caches, are swapped for their bodies for the capture's duration. Other threads running
    lifted linen code at the same time run it inline as well (the same values, uncompiled)."""
    global _lift_depth, _jitted
    from flax.core import axes_scan, lift

    with _LIFT_LOCK:
        if _lift_depth == 0:
            lift.jax, lift.axes_scan = _InlineJax(), _InlineAxesScan(axes_scan)
            _jitted = _jit_methods()
            for cls, name, fn in _jitted:  # their traces are cached: run their bodies
                setattr(cls, name, fn.__wrapped__)
        _lift_depth += 1
    try:
        yield
    finally:
        with _LIFT_LOCK:
            _lift_depth -= 1
            if _lift_depth == 0:
                lift.jax, lift.axes_scan = jax, axes_scan
                for cls, name, fn in _jitted:
                    setattr(cls, name, fn)


def _cached_jit_code():
    """The code object of the methods linen's ``nn.jit`` decorates (their compiled trace is
    cached on first use, so a later capture's trace of them would see no layer call)."""

    class Probe(nn.Module):
        @nn.jit
        def __call__(self, x):
            return x

    return Probe.__call__.__code__


_JIT_CODE = _cached_jit_code()


def _jit_methods():
    """``(class, name, method)`` of every linen method decorated with ``nn.jit``."""
    found, stack, seen = [], [nn.Module], set()
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                found.extend((sub, name, fn) for name, fn in list(vars(sub).items())
                             if getattr(fn, "__code__", None) is _JIT_CODE)  # fmt: skip
    return found


# ---- NNX and plain JAX --------------------------------------------------------------------------


_JAX_LOCK = threading.RLock()
_jax_depth = 0
_JAX_INLINE = {"checkpoint": _identity, "remat": _identity,
               "vmap": _unrolled_vmap}  # fmt: skip
_jax_real: dict = {}


def _gated(name):
    real = _jax_real[name]

    @functools.wraps(real)
    def transform(*args, **kwargs):
        inline = getattr(_local, "inline_jax", False)
        return (_JAX_INLINE[name] if inline else real)(*args, **kwargs)

    return transform


@contextlib.contextmanager
def inline_jax():
    """Run an NNX (or plain JAX) forward pass with ``jit``, ``remat``, ``scan`` and ``vmap``
    inline (see the module docs); only this thread's calls of ``jax.checkpoint``,
    ``jax.remat`` and ``jax.vmap`` are inlined, other threads get JAX's."""
    global _jax_depth
    with _JAX_LOCK:
        if _jax_depth == 0:
            _jax_real.update({name: getattr(jax, name) for name in _JAX_INLINE})
            for name in _JAX_INLINE:
                setattr(jax, name, _gated(name))
        _jax_depth += 1
    before = getattr(_local, "inline_jax", False)
    _local.inline_jax = True
    try:
        with jax.disable_jit():
            yield
    finally:
        _local.inline_jax = before
        with _JAX_LOCK:
            _jax_depth -= 1
            if _jax_depth == 0:
                for name in _JAX_INLINE:
                    setattr(jax, name, _jax_real[name])


@contextlib.contextmanager
def not_inline():
    """jaxmerge's own work inside an inlined pass (a hook's statistics and solves) runs with
    JAX's transforms as they are."""
    before = getattr(_local, "inline_jax", False)
    _local.inline_jax = False
    try:
        with jax.disable_jit(False):
            yield
    finally:
        _local.inline_jax = before
