r"""Tied heads the model computes itself: ``z = h Eᵀ`` read from an embedding table ``E (V, d)``
outside its layer's calls (MaxText's ``attend_on_embedding(y, table)``, EasyDeL's
``lm_head(h, w=table.T)``), found in the traced forward pass and their inputs ``h`` read back.

:func:`find_heads` follows the table through the jaxpr: casts and copies, a transpose, and the
call jaxprs of ``jit``, ``remat`` and custom derivatives keep following it; a ``dot_general``
contracting the table's width ``d`` with one axis of another operand, without batch axes, is a
head, that operand its input. Any other use (a slice, a product, the table returned) is not, and
the table is then left unsolved by the plan. :func:`run_with_heads` evaluates the jaxpr and
returns the heads' inputs as well as its outputs; the statistics take the head's rows
``h`` and its outputs ``h Eᵀ`` (with ``E`` the pass's own table) as a call of the tied head.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax._src.interpreters import partial_eval as pe
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

__all__ = ["Head", "NotAHead", "Traced", "find_heads", "run_with_heads", "trace"]

# primitives that pass the table's values on unchanged in shape (casts, copies, placement)
_SAME = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                   "sharding_constraint", "reshard", "pvary", "device_put"})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Head:
    """One head ``h Eᵀ`` in a jaxpr.

    Attributes:
        where: the equation indices leading to the ``dot_general``: through the call
            equations whose jaxprs hold it, then the dot itself.
        operand: which operand of the dot is ``h`` (0 or 1).
        axis: the axis of ``h`` contracted with the table's width.
    """

    where: tuple[int, ...]
    operand: int
    axis: int


@dataclasses.dataclass(frozen=True)
class Traced:
    """A function traced to a jaxpr whose inputs are its constants and arguments, its dead code
    eliminated.

    Attributes:
        jaxpr: the jaxpr (no constants of its own).
        args: the values of its inputs (under the caller's trace, when there is one).
        shape: the function's output, as shapes and dtypes.
        index: ``{argument leaf number: input number}`` of the argument leaves it reads.
    """

    jaxpr: Jaxpr
    args: list
    shape: Any
    index: dict[int, int]


def trace(fn: Callable, *args) -> Traced:
    """:class:`Traced` of ``fn(*args)``."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    jaxpr = pe.convert_constvars_jaxpr(closed.jaxpr)
    jaxpr, used = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    values = [*closed.consts, *jax.tree.leaves(args)]
    kept = [i for i, u in enumerate(used) if u]
    n = len(closed.consts)
    index = {i - n: j for j, i in enumerate(kept) if i >= n}
    return Traced(jaxpr, [values[i] for i in kept], shape, index)


class NotAHead(ValueError):
    """A use of the table that is not a head ``h Eᵀ`` (the message names the primitive)."""


def _inner(eqn) -> tuple[Jaxpr, Sequence] | None:
    """``(jaxpr, consts)`` of a call equation whose operands are its jaxpr's inputs (``jit``,
    ``closed_call``, ``remat``, ``custom_jvp_call``, ``custom_vjp_call``), else ``None``."""
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr):
            sub, consts = sub.jaxpr, sub.consts
        elif isinstance(sub, Jaxpr):
            consts = ()
        else:
            continue
        if len(sub.invars) == len(eqn.invars):
            return sub, consts
    return None


def find_heads(jaxpr: Jaxpr, index: int) -> list[Head]:
    """The heads reading ``jaxpr``'s input ``index`` (a table ``(V, d)``), in evaluation order.

    Raises:
        NotAHead: the table has another use.
    """
    return _find(jaxpr, {jaxpr.invars[index]: False}, ())


def _find(jaxpr: Jaxpr, tracked: dict, where: tuple[int, ...]) -> list[Head]:
    """``tracked``: ``{var: transposed}`` of the variables holding the table (or its
    transpose)."""
    heads = []
    for i, eqn in enumerate(jaxpr.eqns):
        hits = [(j, tracked[v]) for j, v in enumerate(eqn.invars)
                if not isinstance(v, Literal) and v in tracked]  # fmt: skip
        if not hits:
            continue
        name = eqn.primitive.name
        (j, transposed), single = hits[0], len(hits) == 1
        if name in _SAME and len(eqn.outvars) == len(eqn.invars):  # operand i -> output i
            tracked.update((eqn.outvars[k], t) for k, t in hits)
            continue
        if name == "transpose" and single and tuple(eqn.params["permutation"]) == (1, 0):
            tracked[eqn.outvars[0]] = not transposed
            continue
        if name == "dot_general" and single:
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            table, other = (lc, rc) if j == 0 else (rc, lc)
            if not lb and not rb and tuple(table) == (0 if transposed else 1,) and len(other) == 1:
                heads.append(Head(where + (i,), 1 - j, int(other[0])))
                continue
        inner = _inner(eqn)
        if inner is not None:
            sub = inner[0]
            tracked_in = {sub.invars[k]: t for k, t in hits}
            heads += _find(sub, tracked_in, where + (i,))
            if any(not isinstance(v, Literal) and v in tracked_in for v in sub.outvars):
                raise NotAHead(f"the table is returned by a {name!r} call")
            continue
        raise NotAHead(f"the table is read by {name!r}, which is not a head h·Eᵀ")
    if any(not isinstance(v, Literal) and v in tracked for v in jaxpr.outvars):
        raise NotAHead("the table is an output of the forward pass")
    return heads


def run_with_heads(traced: Traced, heads: Sequence[Head]):
    """``(outputs, [h of each head])``: the traced function evaluated again (under the caller's
    trace), the call equations holding heads evaluated equation by equation."""
    found: dict[tuple[int, ...], object] = {}
    wanted = {h.where: h.operand for h in heads}
    outs = _run(traced.jaxpr, (), traced.args, wanted, (), found)
    return outs, [found[h.where] for h in heads]


def _run(jaxpr, consts, args, wanted, where, found):
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for i, eqn in enumerate(jaxpr.eqns):
        at = where + (i,)
        values = [read(v) for v in eqn.invars]
        if at in wanted:
            found[at] = values[wanted[at]]
        if any(w[: len(at)] == at and len(w) > len(at) for w in wanted):
            sub, sub_consts = _inner(eqn)
            outs = _run(sub, sub_consts, values, wanted, at, found)
        else:
            outs = eqn.primitive.bind(*values, **eqn.primitive.get_bind_params(eqn.params))
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]
