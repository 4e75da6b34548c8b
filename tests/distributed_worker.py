"""Multi-device and multi-process runs of jaxmerge's scale-out API, launched by test_distributed.

Usage (each mode writes ``.npz`` files into OUT; the test compares them):

    python distributed_worker.py devices OUT          # needs 8 (emulated) devices
    python distributed_worker.py single OUT           # one process, 4 devices
    python distributed_worker.py host PID PORT OUT    # process PID of 2, 2 devices each

The problems are defined here (``layer_problem``, ``host_problem``) so that the test can rebuild
the same data for its single-device references.
"""

import os
import sys

import numpy as np

N_IN, N_OUT, K = 6, 3, 2
MESHES = ("explicit", "auto", "explicit2d")
# 16 rows × 2 tokens divide 8 devices evenly, 13 × 2 do not (nor 4 on the 2-D mesh).
BATCHES = {"explicit": (16, 13), "auto": (13,), "explicit2d": (13,)}
SOLVE_SHAPES = {"a": (5, 4), "b": (5, 4), "c": (5, 4), "d": (3, 6), "e": (5, 4)}
SOLVES = {"explicit": ("full", "diagonal"), "auto": ("full",), "explicit2d": ("full",)}
# The layers of the sharded update: "p" masked, "q" (inputs and outputs swapped) not, bf16 inputs.
UPDATES = {"p": (N_IN, N_OUT), "q": (N_OUT, N_IN), "bf16": (N_IN, N_OUT)}


def batch_data(rows: int, seed: int):
    """Inputs ``(rows, 2, N_IN)`` (token axis), targets, and a padding mask."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 2, N_IN)).astype(np.float32)
    y = (x @ rng.normal(size=(N_IN, N_OUT)) + 0.1 * rng.normal(size=(rows, 2, N_OUT))).astype(
        np.float32
    )
    mask = rng.random((rows, 2)) > 0.3
    return x, y, mask


def layer_problem(seed: int = 0):
    """Base, K fine-tunes and per-task calibration data for every path of SOLVE_SHAPES."""
    rng = np.random.default_rng(seed)
    base, fts, data = {}, [{} for _ in range(K)], {}
    for path, (n, m) in SOLVE_SHAPES.items():
        w0, b0 = rng.normal(size=(n, m)), rng.normal(size=m)
        base[path] = {"kernel": w0.astype(np.float32), "bias": b0.astype(np.float32)}
        xs, ys = [], []
        for k in range(K):
            w, b = w0 + 0.3 * rng.normal(size=(n, m)), b0 + 0.3 * rng.normal(size=m)
            fts[k][path] = {"kernel": w.astype(np.float32), "bias": b.astype(np.float32)}
            x = rng.normal(size=(30 + 5 * k, n)) * (1 + k) + k
            xs.append(x.astype(np.float32))
            ys.append((x @ w + b).astype(np.float32))
        data[path] = (xs, ys)
    return base, fts, data


def host_problem():
    """Dyadic data (every sum is exact in float32): half of each task's rows per process.

    Returns ``base, fts, rows`` with ``rows[k] = (x, y)`` of task ``k`` for layer ``"h"`` and
    ``"g"`` (``{path: (x, y)}``); process ``i`` takes rows ``i::2``.
    """
    rng = np.random.default_rng(7)
    base, fts, rows = {}, [{} for _ in range(K)], [{} for _ in range(K)]
    for path, (n, m) in {"h": (4, 3), "g": (4, 3), "f": (3, 5)}.items():
        w0 = rng.integers(-8, 9, size=(n, m)) / 8
        b0 = rng.integers(-8, 9, size=m) / 8
        base[path] = (w0.astype(np.float32), b0.astype(np.float32))
        for k in range(K):
            w = w0 + rng.integers(-4, 5, size=(n, m)) / 8
            b = b0 + rng.integers(-4, 5, size=m) / 8
            fts[k][path] = (w.astype(np.float32), b.astype(np.float32))
            x = rng.integers(-8, 9, size=(24, n)) / 4
            rows[k][path] = (x.astype(np.float32), (x @ w + b).astype(np.float32))
    return base, fts, rows


def _mesh(kind: str):
    import jax

    axis_type = jax.sharding.AxisType.Auto if kind == "auto" else jax.sharding.AxisType.Explicit
    if kind == "explicit2d":
        return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def run_devices(out: str) -> None:
    import jax
    import jax.numpy as jnp

    import jaxmerge as jm

    assert jax.device_count() == 8, jax.devices()
    results = {}
    base, fts, data = layer_problem()
    stats = {p: jm.layer_stats(*data[p]) for p in SOLVE_SHAPES}
    for kind in MESHES:
        mesh = _mesh(kind)
        for rows in BATCHES[kind]:
            x, y, mask = batch_data(rows, seed=rows)
            x16, y16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)
            updates = jm.sharded_update_stats_by_path(
                {p: jm.init_stats(n, m, K) for p, (n, m) in UPDATES.items()},
                {"p": (x, y), "q": (y, x), "bf16": (x16, y16)},
                1,
                mask={"p": mask},
                weight=0.5,
                mesh=mesh,
            )
            for name, st in updates.items():
                for field in jm.LayerStats._fields:
                    results[f"stats/{kind}/{rows}/{name}/{field}"] = np.asarray(getattr(st, field))
        for basis in SOLVES[kind]:
            for path, sol in jm.solve_layers(stats, base, fts, basis=basis, mesh=mesh).items():
                for field in ("kernel", "bias", "energy_fraction", "status"):
                    value = np.asarray(getattr(sol, field))
                    results[f"solve/{kind}/{basis}/{path}/{field}"] = value
    np.savez(os.path.join(out, "devices.npz"), **results)


def _merge(stats_rows, base, fts, local_mesh, solve_mesh, allreduce):
    """Per-task plain sums over this process's rows, reduced, normalised, combined, solved."""
    import jaxmerge as jm

    total = None
    for k, layers in enumerate(stats_rows):
        init = {p: jm.init_stats(x.shape[-1], y.shape[-1], K) for p, (x, y) in layers.items()}
        part = jm.sharded_update_stats_by_path(init, layers, k, mesh=local_mesh)
        part = allreduce(part)
        part = {p: jm.normalize_stats(s) for p, s in part.items()}
        total = part if total is None else {p: jm.combine_stats(total[p], part[p]) for p in part}
    sols = jm.solve_layers(total, base, fts, basis="full", mesh=solve_mesh)
    return total, sols


def _save(path: str, stats, sols) -> None:
    results = {}
    for p, s in stats.items():
        for field in s._fields:
            results[f"stats/{p}/{field}"] = np.asarray(getattr(s, field))
    for p, sol in sols.items():
        results[f"merged/{p}/kernel"] = np.asarray(sol.kernel)
        results[f"merged/{p}/bias"] = np.asarray(sol.bias)
    np.savez(path, **results)


def run_single(out: str) -> None:
    import jax

    assert jax.device_count() == 4, jax.devices()
    base, fts, rows = host_problem()
    mesh = jax.make_mesh((4,), ("data",))
    stats, sols = _merge(rows, base, fts, mesh, mesh, lambda s: s)
    _save(os.path.join(out, "single.npz"), stats, sols)


def run_host(pid: int, port: str, out: str) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid
    )
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxmerge as jm

    assert jax.process_count() == 2 and jax.local_device_count() == 2
    base, fts, rows = host_problem()
    mine = [{p: (x[pid::2], y[pid::2]) for p, (x, y) in layers.items()} for layers in rows]
    local = jax.make_mesh((2,), ("data",), devices=jax.local_devices())
    world = jax.make_mesh((4,), ("data",), devices=jax.devices())
    # Route 1: each process on its local devices, then allreduce_stats across processes; the
    # solves are spread over the 4 devices of both processes.
    stats, sols = _merge(mine, base, fts, local, world, jm.allreduce_stats)
    _save(os.path.join(out, f"host{pid}.npz"), stats, sols)
    # Route 2: one mesh over both processes, inputs as global arrays, psum over all 4 devices.
    sharding = NamedSharding(world, P("data"))

    def global_rows(layers):
        return {
            p: tuple(jax.make_array_from_process_local_data(sharding, a) for a in xy)
            for p, xy in layers.items()
        }

    init = {p: jm.init_stats(x.shape[-1], y.shape[-1], K) for p, (x, y) in mine[0].items()}
    try:  # process-local rows on a multi-process mesh would be summed as if global: refused
        jm.sharded_update_stats_by_path(init, mine[0], 0, mesh=world)
    except ValueError as e:
        assert "must be global jax.Arrays" in str(e), e
    else:
        raise AssertionError("process-local inputs on a multi-process mesh were accepted")
    stats2, sols2 = _merge(
        [global_rows(layers) for layers in mine], base, fts, world, world, lambda s: s
    )
    _save(os.path.join(out, f"global{pid}.npz"), stats2, sols2)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "devices":
        run_devices(sys.argv[2])
    elif mode == "single":
        run_single(sys.argv[2])
    elif mode == "host":
        run_host(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
