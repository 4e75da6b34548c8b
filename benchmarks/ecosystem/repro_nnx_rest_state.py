"""Reproducer: jaxmerge cannot merge an NNX model that writes a child's state back.

Run: python benchmarks/ecosystem/repro_nnx_rest_state.py  (the project's venv or the ecosystem's)

jaxmerge's ``NnxModel.apply`` (``jaxmerge/_flax/capture.py``) closes over the model's non-Param
state (the third part of ``nnx.split(module, nnx.Param, ...)``, here an ``nnx.Rngs``'
``RngCount``) as constants of its traced function. A module that re-merges a child and writes its
state back (``nnx.split`` → ``nnx.merge`` → ``nnx.update``, the pattern of MaxText's decoder) then
fails with ``TraceContextError: Cannot mutate RngCount from a different trace level``. The same
function under ``jax.jit`` fails when it closes over that state and runs when it takes it as an
argument.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxmerge as jm  # noqa: E402


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.rngs = rngs  # MaxText's layers keep their nnx.Rngs (an RngCount)

    def __call__(self, x):
        return self.lin(x)


class Model(nnx.Module):
    def __init__(self):
        self.layer = Layer(nnx.Rngs(0))

    def __call__(self, x):
        graphdef, state = nnx.split(self.layer)
        layer = nnx.merge(graphdef, state)
        y, state = layer(x), nnx.state(layer)
        nnx.update(self.layer, state)  # writes the RngCount back
        return y


model = Model()
x = jnp.ones((8, 4))
print("eager:", model(x).shape)
base = nnx.state(model, nnx.Param)
fts = [jax.tree.map(lambda a, k=k: a + 0.1 * k, base) for k in (1, 2)]
try:
    jm.merge(model, base, fts, [[x], [x]], progress=False)
    print("merge: ok")
except Exception as error:
    print("merge FAILS:", type(error).__name__, str(error)[:300])

graphdef, params, rest = nnx.split(model, nnx.Param, ...)


def closing_over_rest(params):
    return nnx.merge(graphdef, params, rest)(x)


def rest_as_argument(params, rest):
    return nnx.merge(graphdef, params, rest)(x)


try:
    jax.jit(closing_over_rest)(params)
    print("jit closing over the rest: ok")
except Exception as error:
    print("jit closing over the rest FAILS:", type(error).__name__)
jax.jit(rest_as_argument)(params, rest)
print("jit with the rest as an argument: ok")
