"""Stacks of independent systems (``map_systems``): the same answers as ``jax.vmap``, and no
batched LAPACK decomposition in any CPU program a merge compiles, since jaxlib 0.10's batched
CPU decompositions can deadlock XLA's intra-op thread pool when several run at once."""

import pathlib
import re
import tempfile

import distributed_worker as worker
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge as jm
from jaxmerge.core.psd import psd_solve
from jaxmerge.core.systems import map_systems
from jaxmerge.models import LlamaConfig, LlamaForCausalLM

_LAPACK = re.compile(r'custom_call @(lapack_\w+)\(.*?num_batch_dims = "(\d+)"')


def lapack_calls(run) -> list[tuple[str, int]]:
    """Every LAPACK custom call, with its number of batch dimensions, in the StableHLO of the
    programs ``run()`` lowers (JAX's ``jax_dump_ir_to``)."""
    with tempfile.TemporaryDirectory() as out:
        jax.config.update("jax_dump_ir_to", out)
        try:
            run()
        finally:
            jax.config.update("jax_dump_ir_to", "")
        text = "".join(p.read_text() for p in pathlib.Path(out).glob("*.mlir"))
    return [(name, int(dims)) for name, dims in _LAPACK.findall(text)]


def test_map_systems_equals_vmap_with_none_leaves():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(5, 3, 3))
    h = jnp.asarray(h @ np.swapaxes(h, 1, 2) + np.eye(3), jnp.float32)
    f = jnp.asarray(rng.normal(size=(5, 3, 2)), jnp.float32)

    def one(hf, extra):
        assert extra is None
        return {"x": jnp.linalg.solve(hf[0], hf[1]), "w": jnp.linalg.eigh(hf[0])[0]}

    got = jax.jit(lambda h, f: map_systems(one, (h, f), None))(h, f)
    want = jax.vmap(one)((h, f), None)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_the_check_sees_batched_decompositions():
    """The test below can fail: a vmapped eigendecomposition is one batched LAPACK call."""
    h = jnp.ones((4, 3, 3)) + jnp.eye(3)
    calls = lapack_calls(lambda: jax.jit(jax.vmap(jnp.linalg.eigh))(h))
    assert ("lapack_ssyevd_ffi", 1) in calls


class Block(nn.Module):
    """A norm (a system per channel), a grouped einsum (a system per expert), a dense layer."""

    @nn.compact
    def __call__(self, x):  # x (b, e, c, d)
        x = nn.LayerNorm(name="norm")(x)
        x = nn.Einsum((3, 4, 5), "becd,edf->becf", name="experts")(x)
        return nn.Dense(2, name="out")(x)


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
@pytest.mark.parametrize("basis", ["full", "diagonal"])
def test_merges_compile_no_batched_decomposition(algorithm, basis):
    rng = np.random.default_rng(1)
    model = Block()
    cal = [[jnp.asarray(rng.normal(size=(6, 3, 2, 4)), jnp.float32)] for _ in range(3)]
    base = model.init(jax.random.key(0), cal[0][0])["params"]
    fts = [jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(a.dtype), base)
           for _ in range(3)]  # fmt: skip
    reports = []

    def run():
        merged, report = jm.merge(model, base, fts, cal, algorithm=algorithm, basis=basis,
                                  progress=False)  # fmt: skip
        jax.block_until_ready(merged)
        reports.append(report)

    calls = lapack_calls(run)
    assert calls, "the merge factorised nothing: the check would be empty"
    assert all(dims == 0 for _, dims in calls), calls
    (report,) = reports
    assert {row.kind for row in report.layers} == {"norm", "einsum", "dense"}


def test_stacked_solves_compile_no_batched_decomposition():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(2, 3, 4, 4))
    h = jnp.asarray(h @ np.swapaxes(h, -1, -2) + np.eye(4), jnp.float32)
    f = jnp.asarray(rng.normal(size=(2, 3, 4, 1)), jnp.float32)
    x = []
    calls = lapack_calls(lambda: x.append(jax.jit(psd_solve)(h, f)))
    assert calls and all(dims == 0 for _, dims in calls), calls
    np.testing.assert_allclose(x[0][0], np.linalg.solve(h, f), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("basis", ["scalar", "diagonal"])
def test_solve_layers_compiles_no_batched_decomposition(basis):
    base, fts, data = worker.layer_problem(seed=3)
    stats = {p: jm.layer_stats(*data[p]) for p in worker.SOLVE_SHAPES}
    got = {}
    calls = lapack_calls(lambda: got.update(jm.solve_layers(stats, base, fts, basis=basis)))
    assert calls and all(dims == 0 for _, dims in calls), calls
    for path in stats:
        want = jm.solve_layer(stats[path], base[path], [f[path] for f in fts], basis=basis)
        np.testing.assert_allclose(got[path].kernel, want.kernel, rtol=1e-4, atol=1e-5)


def test_llama_sequential_merge_compiles_no_batched_decomposition():
    """The case that hung: a sequential merge of a Llama (norms, tied table, attention, MLP)."""
    model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(3)
    fts = [jax.tree.map(lambda a: a + 0.05 * rng.normal(size=a.shape).astype(a.dtype), state)
           for _ in range(4)]  # fmt: skip
    cal = [[jnp.asarray(rng.integers(0, 64, (4, 8)))] for _ in fts]
    calls = lapack_calls(
        lambda: jax.block_until_ready(
            jm.merge(model, state, fts, cal, algorithm="sequential", progress=False)[0]
        )
    )
    assert calls and all(dims == 0 for _, dims in calls), sorted(set(calls))
