"""Where the parameters of an NNX layer called through a copy come from.

NNX code often calls a layer through a copy of it: ``nnx.merge(*nnx.split(layer))`` (MaxText's
decoder), the module an ``nnx.scan`` or ``nnx.vmap`` body merges from sliced state, a
``jax.lax.scan`` over split parameters (MaxText's ``scan_layers``, layer axis moved to the
front first). The copy is not a module of the model, so its path is unknown; its parameters
are, inside the capture's trace (the transforms run inline: :mod:`jaxmerge._flax.lifts`),
functions of the model's parameter leaves. :func:`locate` finds, for each such call, the one
leaf each of its parameters is computed from (dead-code elimination of the traced pass down to
that parameter) and checks that the parameter is a slice of it: the reduced program is run on
index codes of the leaf, and the codes it returns must be the leaf's elements at fixed indices
along some axes and in order along the others. Such a call is the layer at the leaf's module
path, taken along those axes (:attr:`~jaxmerge.LayerSpec.slices`); anything else (a parameter
computed from two leaves, scaled, transposed, or from the batch) is a reason for its leaves to
be reported unsolved.
"""

import dataclasses

import jax
import jax.extend as jex
import numpy as np
from jax._src.interpreters import partial_eval as pe


@dataclasses.dataclass(frozen=True)
class Located:
    """A copied layer's place: its ``module`` path and the ``slices``
    (``((axis, index), ...)``, taken in turn) of the module's parameter leaves."""

    module: str
    slices: tuple[tuple[int, int], ...] = ()


def locate(closed, n_params: int, leaf_paths: list[str], probes: list):
    """``({call number: Located}, {leaf path: reason})`` of the probed calls: the place of each
    call whose parameters are slices of one module's leaves, and why the leaves of the others
    are not solved.

    Args:
        closed: the traced pass (``jax.make_jaxpr``), its inputs the parameter leaves first
            (``n_params`` of them, paths ``leaf_paths``), its last outputs the probed calls'
            parameters in order.
        probes: ``[(call number, class name, {parameter name: value})]`` of the calls through
            copies.
    """
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    consts, n_out = list(closed.consts), len(jaxpr.outvars)
    position = {path: i for i, path in enumerate(leaf_paths)}
    out = n_out - sum(len(params) for _, _, params in probes)
    found, reasons = {}, {}
    for number, cls, params in probes:
        places, why = {}, {}
        for name, value in params.items():
            leaves, place = _place(jaxpr, consts, n_params, out, np.shape(value), leaf_paths,
                                   position)  # fmt: skip
            out += 1
            for leaf in leaves:
                module, _, own = leaf.rpartition("/")
                if isinstance(place, str):
                    why[leaf] = f"its {name!r} {place}"
                elif own != name:
                    why[leaf] = f"its {name!r} is this parameter, named otherwise"
                else:
                    places[name] = Located(module, place)
        if not why and len(set(places.values())) == 1 and len(places) == len(params):
            found[number] = places.popitem()[1]
            continue
        if not why:
            why = {leaf: "its parameters are slices of different modules' leaves"
                   for leaf in (f"{p.module}/{n}" for n, p in places.items())}  # fmt: skip
        for leaf, text in why.items():
            reasons.setdefault(leaf, f"a {cls} layer is called through a copy (nnx.merge, "
                                     f"nnx.scan, jax.lax.scan, ...) and {text}")  # fmt: skip
    return found, reasons


def _place(jaxpr, consts, n_params, index, shape, leaf_paths, position):
    """``(leaf paths, slices)`` of output ``index``, the slices ``((axis, i), ...)`` of its one
    leaf, or a text saying why it is not a slice of one leaf."""
    used_out = [i == index for i in range(len(jaxpr.outvars))]
    reduced, used = pe.dce_jaxpr(jaxpr, used_out)
    used_consts, used_inputs = used[: len(consts)], used[len(consts) :]
    leaves = [leaf_paths[i] for i in range(n_params) if used_inputs[i]]
    if any(used_inputs[n_params:]):
        return leaves, "is computed from the calibration batch"
    if len(leaves) != 1:
        return leaves, f"is computed from {len(leaves)} parameters"
    aval = jaxpr.invars[len(consts) + position[leaves[0]]].aval
    kept = [c for c, u in zip(consts, used_consts, strict=True) if u]
    index = _decode(reduced, kept, aval, shape)
    slices = None if index is None else _slices(index, aval.shape)
    return leaves, ("is computed from it other than by slicing" if slices is None else slices)


def _decode(reduced, consts, aval, shape):
    """The flat indices into the leaf of the reduced program's output elements (``None`` when
    they are not exact indices): the program is run on index codes in digits small enough
    for the leaf's dtype to hold exactly."""
    if not jax.numpy.issubdtype(aval.dtype, jax.numpy.inexact):
        return None
    size = int(np.prod(aval.shape))
    bits = min(int(jax.numpy.finfo(aval.dtype).nmant) + 1, 20)
    base, index, scale = 2**bits, np.zeros(shape, np.int64), 1
    flat = np.arange(size, dtype=np.int64)
    fun = jex.core.jaxpr_as_fun(jex.core.ClosedJaxpr(reduced, ()))
    while True:
        digit = (flat // scale) % base
        (value,) = fun(*consts, np.asarray(digit.reshape(aval.shape), aval.dtype))
        value = np.asarray(value, np.float64)
        if value.shape != tuple(shape) or not np.all((value == np.round(value)) & (value >= 0)
                                                     & (value < base)):  # fmt: skip
            return None
        index += value.astype(np.int64) * scale
        scale *= base
        if scale >= size:
            return index if np.all(index < size) else None


def _slices(index, shape):
    """``((axis, i), ...)`` such that ``index`` (flat indices into a leaf of ``shape``) are the
    indices of ``take(take(leaf, i₁, a₁), i₂, a₂)...`` (axes renumbered after each take), or
    ``None``: every leaf axis is either kept, in order and whole, or fixed at one index."""
    coords = np.unravel_index(index, shape)
    slices, kept = [], 0
    for axis, c in enumerate(coords):
        if kept < index.ndim and shape[axis] == index.shape[kept]:
            along = np.arange(shape[axis]).reshape(
                (1,) * kept + (-1,) + (1,) * (index.ndim - kept - 1)
            )
            if np.array_equal(c, np.broadcast_to(along, c.shape)):
                kept += 1
                continue
        values = np.unique(c)
        if len(values) != 1:
            return None
        slices.append((axis - len(slices), int(values[0])))
    return tuple(slices) if kept == index.ndim else None
