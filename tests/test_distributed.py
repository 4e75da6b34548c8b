"""Scale-out: sharded statistics, device-parallel solves and several processes.

The multi-device and multi-process runs happen in subprocesses (``distributed_worker.py``): 8
emulated devices must be configured before JAX starts, and ``jax.distributed`` needs processes of
its own. Their results are compared here with single-device ``update_stats``/``solve_layer`` and
with float64 numpy sums.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import augment

import jaxmerge as jm

HERE = Path(__file__).parent


def numpy_stats(x, y, task, num_tasks, mask=None, weight=1.0):
    """Float64 sums of one batch, straight from the definitions."""
    xa = augment(x)
    y = np.asarray(y, np.float64).reshape(len(xa), -1)
    m = np.ones(len(xa)) if mask is None else np.asarray(mask, np.float64).reshape(-1)
    v = weight * m
    task_diag = np.zeros((num_tasks, xa.shape[1]))
    task_diag[task] = v @ xa**2
    count = np.zeros(num_tasks)
    count[task] = m.sum()
    return {
        "gram": xa.T @ (v[:, None] * xa),
        "cross": xa.T @ (v[:, None] * y),
        "out_sq": v @ y**2,
        "task_diag": task_diag,
        "count": count,
    }


def close(got, want, rtol=1e-5):
    """float32 agreement, relative to the largest entry."""
    want = np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * scale)


def run(args, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.Popen(
        [sys.executable, str(HERE / "distributed_worker.py"), *args],
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker {proc.args[2:]} failed:\n{out[-4000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def launched(request, tmp_path_factory):
    """All worker processes, started with the module's first test so that they run while the
    in-process tests do: 8 devices; 2 processes × 2 devices; 1 process × 4 devices."""
    if not any("workers" in getattr(t, "fixturenames", ()) for t in request.session.items):
        yield None  # no selected test needs them
        return
    out = tmp_path_factory.mktemp("workers")
    port = str(free_port())
    two = {"JAX_NUM_CPU_DEVICES": "2", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = []
    try:
        procs.append(
            run(["devices", str(out)], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
        )
        procs.append(run(["single", str(out)], {"JAX_NUM_CPU_DEVICES": "4"}))
        procs += [run(["host", str(i), port, str(out)], two) for i in range(2)]
        yield out, procs
    finally:
        # Every worker's stdout pipe is closed here, also those of workers that finished but
        # were never read (the session stopped early, or an earlier worker failed in `workers`):
        # left to the garbage collector, they were "unclosed file" ResourceWarnings.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with proc:  # closes the pipe, waits for the process
                pass


@pytest.fixture(scope="module")
def workers(launched):
    """The workers' results (waits for them)."""
    out, procs = launched
    for proc in procs:
        finish(proc)
    names = ("devices", "single", "host0", "host1", "global0", "global1")
    results = {}
    for name in names:
        with np.load(out / f"{name}.npz") as arrays:
            results[name] = dict(arrays)
    return results


# ---- one device, in process ---------------------------------------------------------------------


def test_solve_layers_mixed_bases_and_priors(rng):
    base, fts, data = worker.layer_problem(seed=3)
    stats = {p: jm.layer_stats(*data[p]) for p in worker.SOLVE_SHAPES}
    directions = [{"kernel": rng.normal(size=(5, 4)), "bias": rng.normal(size=4)}] * 2
    custom = jm.Custom(directions, per_output=True)
    basis = {"a": "scalar", "b": "scalar", "c": custom, "d": "full", "e": jm.LowRank(2)}
    prior = {"a": 0.5, "b": 0.5, "d": fts[0]["d"]}
    got = jm.solve_layers(stats, base, fts, basis=basis, prior=prior, ridge=0.3)
    assert list(got) == list(stats)
    for path in stats:
        want = jm.solve_layer(
            stats[path],
            base[path],
            [f[path] for f in fts],
            basis=basis.get(path, "full"),
            prior=prior.get(path),
            ridge=0.3,
        )
        for field in ("kernel", "bias", "coefficients", "energy_fraction", "condition"):
            close(getattr(got[path], field), getattr(want, field), 1e-5)
        assert int(got[path].status) == int(want.status)
        if path == "e":
            close(got[path].spectrum, want.spectrum, 1e-5)
        else:
            assert got[path].spectrum is None


def test_solve_layers_gives_the_merges_layers_on_its_statistics():
    """``solve_layers`` runs the merge's own group solve: on the statistics ``collect_stats``
    takes of a linen MLP it returns the layers ``solve_stats`` merges (the scalar and diagonal
    bases, which both start from the base), their ρ included, to float32 rounding (the stack
    is vmapped, the merge's solve is not, so the last bits may differ)."""

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(jnp.tanh(nn.Dense(3)(x)))

    rng = np.random.default_rng(7)
    xs = [jnp.asarray(rng.normal(size=(12, 4)), jnp.float32) for _ in range(3)]
    model = MLP()
    base = model.init(jax.random.key(0), xs[0])["params"]
    leaves, treedef = jax.tree.flatten(base)
    fts = [treedef.unflatten([a + 0.3 * rng.normal(size=a.shape).astype(np.float32)
                              for a in leaves]) for _ in range(3)]  # fmt: skip
    groups = jm.collect_stats(model, fts, [[x] for x in xs], progress=False)
    stats = {g.layers[0].path: g.stats for g in groups.values()}
    layers = [{p: dict(t[p]) for p in stats} for t in (base, *fts)]
    for basis in ("scalar", "diagonal"):
        merged, report = jm.solve_stats(groups, base, fts, basis=basis, progress=False)
        sols = jm.solve_layers(stats, layers[0], layers[1:], basis=basis)
        rhos = {r.path: r.rho for r in report.layers}
        for path, sol in sols.items():
            close(sol.kernel, merged[path]["kernel"], 1e-4)
            close(sol.bias, merged[path]["bias"], 1e-4)
            close(sol.energy_fraction, rhos[path], 1e-4)


def test_sharded_update_under_jit_with_traced_task():
    x, y, mask = worker.batch_data(5, seed=1)
    init = jm.init_stats(worker.N_IN, worker.N_OUT, worker.K)

    @jax.jit
    def step(stats, task, weight):
        return jm.sharded_update_stats(stats, x, y, task, mask=mask, weight=weight)

    got = step(init, jnp.int32(1), jnp.float32(0.25))
    ref = numpy_stats(x, y, 1, worker.K, mask=mask, weight=0.25)
    for field in jm.LayerStats._fields:
        close(getattr(got, field), ref[field])


def test_allreduce_stats_single_process_is_identity():
    s = jm.update_stats(jm.init_stats(2, 1, 1), np.ones((3, 2)), np.ones((3, 1)), 0)
    assert jm.allreduce_stats(s) is s


def test_bad_input_names_the_layer():
    s = jm.init_stats(2, 1, 1)
    x, y = np.ones((3, 2), np.float32), np.ones((3, 1), np.float32)
    with pytest.raises(ValueError, match="layer 'dec': update_stats: inputs x have shape"):
        jm.sharded_update_stats_by_path({"enc": s, "dec": s}, {"enc": (x, y), "dec": (y, x)}, 0)
    with pytest.raises(ValueError, match="only in stats: \\['dec'\\]"):
        jm.sharded_update_stats_by_path({"enc": s, "dec": s}, {"enc": (x, y)}, 0)
    with pytest.raises(ValueError, match="task 1 is out of range"):
        jm.sharded_update_stats(s, x, y, 1)
    with pytest.raises(TypeError, match="task must be an integer"):
        jm.sharded_update_stats(s, x, y, 0.0)
    mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match="not 'data'; pass axis="):
        jm.sharded_update_stats(s, x, y, 0, mesh=mesh)
    stats = {"enc": jm.layer_stats([x], [y])}
    with pytest.raises(ValueError, match="layer 'enc': missing from finetuned\\[0\\]"):
        jm.solve_layers(stats, {"enc": np.zeros((2, 1))}, [{"dec": np.zeros((2, 1))}])
    with pytest.raises(ValueError, match="layer 'enc': unknown basis 'rowwise'"):
        jm.solve_layers(
            stats, {"enc": np.zeros((2, 1))}, [{"enc": np.ones((2, 1))}], basis="rowwise"
        )
    with pytest.raises(ValueError, match="layer 'enc': finetuned\\[0\\]: kernel must be 2-D"):
        jm.solve_layers(stats, {"enc": np.zeros((2, 1))}, [{"enc": np.ones(2)}])
    with pytest.raises(ValueError, match="kernel has shape \\(3, 1\\)"):
        jm.solve_layers(stats, {"enc": np.zeros((3, 1))}, [{"enc": np.ones((3, 1))}])


def test_nonfinite_statistics_raise_naming_the_layer():
    x, y = np.ones((3, 2), np.float32), np.ones((3, 1), np.float32)
    good = jm.layer_stats([x], [y])
    bad = good._replace(gram=good.gram.at[0, 0].set(jnp.nan))
    stats = {"ok": good, "broken": bad}
    base = {p: np.zeros((2, 1), np.float32) for p in stats}
    fts = [{p: np.ones((2, 1), np.float32) for p in stats}]
    with pytest.raises(jm.SolveError, match="layer 'broken': .*NaN or Inf in stats.gram"):
        jm.solve_layers(stats, base, fts)
    sols = jm.solve_layers(stats, base, fts, throw=False)
    assert int(sols["broken"].status) == jm.SolveStatus.NONFINITE
    assert int(sols["ok"].status) != jm.SolveStatus.NONFINITE


# ---- memory formula and layer groups ------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "k", "dtype"), [(3, 2, 1, jnp.float32), (7, 5, 3, jnp.bfloat16)]
)
def test_stats_bytes_is_the_size_of_the_statistics(n, m, k, dtype):
    stats = jm.init_stats(n, m, k, dtype=dtype)
    assert jm.stats_bytes(n, m, k, dtype=dtype) == sum(a.nbytes for a in stats)


def test_accumulation_bytes_by_hand():
    # S = 4·(3² + 3·1 + 1 + 2·3 + 2) = 84 and a Gram matrix of 4·3² = 36 bytes. 5 rows do not
    # split evenly over 2 devices: the batch and its padded copy (5 + 2·3 rows) are on every
    # device, in bfloat16; each device's 3 rows have three float32 working copies (the inputs are
    # narrower than the sums); (2 + 1 + 1) columns each. 1024 bytes per layer.
    got = jm.accumulation_bytes(
        {"a": (2, 1)}, num_tasks=2, rows=5, devices=2, input_dtype=jnp.bfloat16
    )
    assert got == 3 * 84 + 36 + 4 * (11 * 2 + 3 * 3 * 4) + 1024
    # 4 rows split evenly: each device holds its 2 rows only.
    got = jm.accumulation_bytes({"a": (2, 1)}, num_tasks=2, rows=4, devices=2)
    assert got == 3 * 84 + 36 + 4 * 2 * (4 + 2 * 4) + 1024
    # The Gram term is the widest layer's, once for the group.
    two = jm.accumulation_bytes({"a": (2, 1), "b": (5, 1)}, num_tasks=2, rows=4, devices=2)
    alone = [jm.accumulation_bytes({p: s}, num_tasks=2, rows=4, devices=2)
             for p, s in {"a": (2, 1), "b": (5, 1)}.items()]  # fmt: skip
    assert two == sum(alone) - 36


@pytest.mark.parametrize(
    ("shapes", "rows", "input_dtype", "masked", "tight"),
    [
        ({"a": (64, 32), "b": (16, 48)}, 64, jnp.float32, False, True),
        # Rows dominate. The working copies are counted for masked or 16-bit rows; unmasked
        # float32 rows need about half of them, so only the masked batch is within 2×.
        ({"a": (32, 32)}, 2048, jnp.float32, False, False),
        ({"a": (32, 32)}, 2048, jnp.float32, True, True),
        # Uneven over 8 devices: the batch enters the step replicated and is padded there.
        ({"a": (32, 32)}, 2047, jnp.float32, True, True),
        # Layers of different widths: XLA holds a Gram matrix besides the partial sums.
        ({"a": (512, 256), "b": (16, 48)}, 16, jnp.float32, False, True),
        # Masked bfloat16 rows: three float32 working copies on CPU.
        ({"a": (256, 16)}, 1024, jnp.bfloat16, True, True),
        # A toy layer: the fixed 1 KiB per layer (alignment, tuple tables) dominates.
        ({"a": (1, 1)}, 8, jnp.float32, False, False),
    ],
)
def test_accumulation_bytes_bounds_the_compiled_step(shapes, rows, input_dtype, masked, tight):
    """The formula against XLA's buffer assignment of the step (arguments + outputs + temps) on
    the default mesh, every local device: one, or 8 under ``.ci/run``'s emulated devices. An
    upper bound always; within 2× too, except where most of the bound is rows counted for a worse
    case than the step's or the fixed allowance (see the cases' notes)."""
    from jaxmerge._internal import local_mesh, sharded_step

    mesh = local_mesh("data")
    stats = [jm.init_stats(n, m, 2) for n, m in shapes.values()]
    xs = [jnp.zeros((rows, n), input_dtype) for n, _ in shapes.values()]
    ys = [jnp.zeros((rows, m), input_dtype) for _, m in shapes.values()]
    masks = [jnp.ones(rows, bool) if masked else None for _ in shapes]
    weights = [jnp.float32(1.0)] * len(shapes)
    lowered = sharded_step.lower(
        stats, xs, ys, masks, jnp.int32(0), weights, mesh=mesh, axis="data"
    )
    analysis = lowered.compile().memory_analysis()
    xla = analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    xla += analysis.temp_size_in_bytes
    formula = jm.accumulation_bytes(
        shapes, num_tasks=2, rows=rows, devices=mesh.shape["data"], input_dtype=input_dtype
    )
    assert xla <= formula
    if tight:
        assert formula <= 2 * xla


def test_plan_layer_groups_greedy_in_order():
    shapes = {"l0": (3, 2), "l1": (3, 2), "l2": (7, 7), "l3": (3, 2)}
    one = {p: jm.accumulation_bytes({p: s}, num_tasks=1, rows=4) for p, s in shapes.items()}
    budget = one["l0"] + one["l1"]
    groups = jm.plan_layer_groups(shapes, max(budget, one["l2"]), num_tasks=1, rows=4)
    assert one["l2"] > budget  # so "l2" stands alone, and "l3" cannot join it
    assert groups == [["l0", "l1"], ["l2"], ["l3"]]
    for group in groups:
        need = jm.accumulation_bytes({p: shapes[p] for p in group}, num_tasks=1, rows=4)
        assert need <= max(budget, one["l2"])
    assert jm.plan_layer_groups({}, 10, num_tasks=1, rows=4) == []
    with pytest.raises(ValueError, match="layer 'l2' \\(7, 7\\) alone needs"):
        jm.plan_layer_groups(shapes, budget, num_tasks=1, rows=4)
    with pytest.raises(ValueError, match="layer 'x': expected an \\(n_in, n_out\\) pair"):
        jm.plan_layer_groups({"x": (3,)}, budget, num_tasks=1, rows=4)
    with pytest.raises(TypeError, match="dtype must be floating point"):
        jm.accumulation_bytes(shapes, num_tasks=1, rows=4, dtype=jnp.int32)


# ---- whole-model merges in layer-group passes ---------------------------------------------------


class SharedInputNet(nn.Module):
    """Four Dense layers; "left" and "right" read the same input (one shared statistics group)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8, name="inp")(x))
        a, b = nn.Dense(4, name="left")(h), nn.Dense(4, name="right")(h)
        return nn.Dense(3, name="out")(nn.relu(jnp.concatenate([a, b], axis=-1)))


@pytest.fixture(scope="module")
def model_problem():
    rng = np.random.default_rng(5)
    model = SharedInputNet()
    base = model.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    fts = [jax.tree.map(lambda a: a + 0.3 * rng.normal(size=a.shape), base) for _ in range(2)]
    calib = [[rng.normal(size=(6, 5)) + t for _ in range(2)] for t in range(2)]
    heldout = [[rng.normal(size=(6, 5)) + t] for t in range(2)]
    merged, report = jm.merge(model, base, fts, calib, heldout=heldout, progress=False)
    return model, base, fts, calib, heldout, merged, report


@pytest.mark.parametrize("how", ["groups", "budget"])
def test_layer_group_passes_equal_one_pass(model_problem, how):
    model, base, fts, calib, heldout, want, want_report = model_problem
    if how == "groups":  # "right" joins "left": they share an input
        options = {"groups": [["out"], ["left"], ["inp"]]}
    else:  # the largest single layer's need: one group per pass
        shapes = {"inp": (5, 8), "left+right": (8, 8), "out": (8, 3)}
        need = {p: jm.accumulation_bytes({p: s}, num_tasks=2, rows=6) for p, s in shapes.items()}
        budget = max(need.values())
        assert len(jm.plan_layer_groups(shapes, budget, num_tasks=2, rows=6)) == 3
        options = {"budget_bytes": budget, "rows": 6}
    got, report = jm.merge_in_groups(
        model, base, fts, calib, heldout=heldout, progress=False, **options
    )
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)  # the same stages as merge: bit for bit
    assert [r.path for r in report.layers] == [r.path for r in want_report.layers]
    assert report.fallbacks == want_report.fallbacks
    assert report.rho == want_report.rho
    assert report.rho_heldout == want_report.rho_heldout


def test_merge_in_groups_bad_input(model_problem):
    model, base, fts, calib, *_ = model_problem
    with pytest.raises(ValueError, match="exactly one of groups= and budget_bytes="):
        jm.merge_in_groups(model, base, fts, calib, progress=False)
    with pytest.raises(ValueError, match="unknown: \\['mid'\\]"):
        jm.merge_in_groups(model, base, fts, calib, groups=[["inp", "mid"]], progress=False)
    with pytest.raises(ValueError, match="layers in no group: \\['out'\\]"):
        jm.merge_in_groups(model, base, fts, calib, groups=[["inp", "left"]], progress=False)
    with pytest.raises(TypeError, match="calibration\\[1\\] is a one-shot iterator"):
        jm.merge_in_groups(
            model, base, fts, [calib[0], iter(calib[1])], groups=[["inp"]], progress=False
        )
    with pytest.raises(ValueError, match="layer 'left\\+right' \\(8, 8\\) alone needs"):
        jm.merge_in_groups(model, base, fts, calib, budget_bytes=4000, rows=6, progress=False)


# ---- 8 emulated devices -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "rows"), [(kind, r) for kind, rows in worker.BATCHES.items() for r in rows]
)
def test_sharded_stats_equal_single_device(workers, kind, rows):
    x, y, mask = worker.batch_data(rows, seed=rows)
    x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
    k = worker.K
    inputs = {"p": (x, y, mask), "q": (y, x, None), "bf16": (x16, y16, None)}
    for name, (n, m) in worker.UPDATES.items():
        xx, yy, mm = inputs[name]
        single = jm.update_stats(jm.init_stats(n, m, k), xx, yy, 1, mask=mm, weight=0.5)
        ref = numpy_stats(np.asarray(xx, np.float64), np.asarray(yy, np.float64), 1, k, mm, 0.5)
        for field in jm.LayerStats._fields:
            got = workers["devices"][f"stats/{kind}/{rows}/{name}/{field}"]
            assert got.dtype == np.float32
            close(got, getattr(single, field))
            close(got, ref[field])


@pytest.fixture(scope="module")
def one_by_one():
    """``solve_layer`` on each layer of the worker's problem, on one device."""
    base, fts, data = worker.layer_problem()
    stats = {p: jm.layer_stats(*data[p]) for p in worker.SOLVE_SHAPES}
    cache = {}

    def get(basis, path):
        if (basis, path) not in cache:
            cache[basis, path] = jm.solve_layer(
                stats[path], base[path], [f[path] for f in fts], basis=basis
            )
        return cache[basis, path]

    return get


@pytest.mark.parametrize(
    ("kind", "basis"), [(kind, b) for kind, bases in worker.SOLVES.items() for b in bases]
)
def test_device_parallel_solves_equal_solve_layer(workers, one_by_one, kind, basis):
    # 5 layers in two shape groups (4 + 1) on 8 (or 4) devices: both stacks are padded.
    for path in worker.SOLVE_SHAPES:
        want = one_by_one(basis, path)
        for field in ("kernel", "bias", "energy_fraction"):
            got = workers["devices"][f"solve/{kind}/{basis}/{path}/{field}"]
            close(got, getattr(want, field), 1e-4)
        assert workers["devices"][f"solve/{kind}/{basis}/{path}/status"] == int(want.status)


# ---- two processes joined by jax.distributed ----------------------------------------------------


def test_two_processes_equal_one_process(workers):
    single = workers["single"]
    for name in ("host0", "host1", "global0", "global1"):
        assert workers[name].keys() == single.keys()
        for key, want in single.items():
            # Exact: the data are dyadic, so every sum is exact whatever the reduction order, and
            # each device solves the same lanes as in the single process.
            np.testing.assert_array_equal(workers[name][key], want, err_msg=f"{name}: {key}")


def test_two_processes_statistics_are_the_data_sums(workers):
    _, _, rows = worker.host_problem()
    for path in rows[0]:
        want = None
        for k, layers in enumerate(rows):
            x, y = layers[path]
            part = numpy_stats(x, y, k, worker.K)
            part = {f: v / len(x) if f != "count" else v for f, v in part.items()}
            want = part if want is None else {f: want[f] + part[f] for f in part}
        for field, value in want.items():
            close(workers["host0"][f"stats/{path}/{field}"], value, 1e-6)
