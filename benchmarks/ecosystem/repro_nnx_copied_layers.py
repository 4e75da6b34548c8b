"""Reproducer: jaxmerge sees no call of an NNX layer that its parent calls through a copy.

Run: python benchmarks/ecosystem/repro_nnx_copied_layers.py  (the project's venv or the ecosystem's)

MaxText's unscanned decoder calls each layer as ``nnx.merge(*nnx.split(layer))(x)`` (then writes
the state back with ``nnx.update``). jaxmerge's NNX capture knows modules by identity (their
``id`` in the merged model), so the copy's ``Linear`` is never captured: its parameters are
reported unsolved ("was not captured: ... an NNX transform (nnx.scan, nnx.vmap, ...) calls a copy
of it") and take the fallback, though no NNX transform is involved and the layer is an ordinary
``nnx.Linear`` called once per pass.
"""

import pathlib
import sys
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmerge as jm  # noqa: E402


class Model(nnx.Module):
    def __init__(self, copy: bool):
        self.copy = copy
        self.layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        if not self.copy:
            return self.layer(x)
        graphdef, state = nnx.split(self.layer)
        layer = nnx.merge(graphdef, state)  # a copy of self.layer
        y = layer(x)
        nnx.update(self.layer, nnx.state(layer))
        return y


x = jax.random.normal(jax.random.key(1), (16, 4))
for copy in (False, True):
    model = Model(copy)
    base = nnx.state(model, nnx.Param)
    fts = [jax.tree.map(lambda a, k=k: a + 0.1 * k * jnp.ones_like(a), base) for k in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = jm.merge(model, base, fts, [[x], [x]], progress=False)
    print(
        f"called {'through a copy' if copy else 'directly'}: {len(report.layers)} layers "
        f"solved, unsolved: {report.unsolved}"
    )
