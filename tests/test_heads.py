"""Finding tied heads ``h Eᵀ`` in a traced pass (``jaxmerge.model.heads``): through casts,
transposes, placement and call jaxprs, the head's input read back exactly; other uses named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.model.heads import NotAHead, find_heads, run_with_heads, trace

H = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)))
E = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)))


@jax.custom_jvp
def _custom(h, e):
    return jnp.einsum("btd,vd->btv", h, e)


_custom.defjvp(lambda primals, tangents: (_custom(*primals), _custom(*tangents)))

HEADS = {
    "h @ E.T": lambda h, e: h @ e.T,
    "E @ h.T": lambda h, e: e @ jnp.swapaxes(h, -1, -2),  # the table the left operand
    "bfloat16 table": lambda h, e: jnp.dot(h, e.astype(jnp.bfloat16).T,
                                           preferred_element_type=jnp.float32),
    "device_put, remat": lambda h, e: jax.checkpoint(lambda a, b: a @ b.T)(*jax.device_put((h, e))),
    "jit, twice": lambda h, e: jax.jit(lambda a, b: (a @ b.T, 2 * a @ b.T))(h, e),
    "custom_jvp": _custom,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_are_found_and_their_inputs_read_back(name):
    fn = HEADS[name]
    traced = trace(fn, H, E)
    heads = find_heads(traced.jaxpr, traced.index[1])
    outs, inputs = run_with_heads(traced, heads)
    np.testing.assert_array_equal(jax.tree.leaves(outs)[0], jax.tree.leaves(fn(H, E))[0])
    assert len(heads) == (2 if name == "jit, twice" else 1)
    for scale, head, h in zip((1.0, 2.0), heads, inputs, strict=False):  # jit: h, then 2h
        rows = np.moveaxis(np.asarray(h), head.axis, -1).reshape(-1, 4)
        np.testing.assert_allclose(rows, scale * np.asarray(H).reshape(-1, 4), rtol=1e-6)


@pytest.mark.parametrize(
    "fn, primitive",
    [(lambda h, e: h @ (2.0 * e).T, "mul"), (lambda h, e: h + jnp.sum(e[:2]), "slice"),
     (lambda h, e: (h @ e.T, e), "the table is an output")],
)  # fmt: skip
def test_other_uses_are_named(fn, primitive):
    traced = trace(fn, H, E)
    with pytest.raises(NotAHead, match=primitive):
        find_heads(traced.jaxpr, traced.index[1])
