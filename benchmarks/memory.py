"""Peak memory of sharded statistics accumulation against the formula of ``jaxmerge.scale.memory``.

``python benchmarks/memory.py [--devices N] [--quick]``

A model of ``L`` square layers (width ``w``, ``K`` tasks) is accumulated one group of ``g``
layers per pass, for several group sizes ``g`` and float32 or bfloat16 layer inputs (the sums
are float32 either way); each pass is one step of
``jaxmerge.sharded_update_stats_by_path`` on ``N`` rows per layer split over ``D`` devices. Each
group size runs in a fresh process and reports, per device:

* ``formula``: ``jaxmerge.accumulation_bytes`` (statistics ×3 plus the device's rows);
* ``xla``: XLA's own buffer assignment for the compiled step (arguments + outputs + temporaries);
* ``measured``: on accelerators, ``peak_bytes_in_use - bytes_in_use`` before the statistics and
  batch were allocated (per device, the largest); on CPU, where the ``D`` devices are emulated
  and share host memory, the rise of the process's peak resident memory (``VmHWM``, reset before
  the step) over its resident memory before allocation, divided by ``D``.

Nothing here assumes a CPU: on a GPU or TPU host the same command uses the first ``N`` local
devices (emulated CPU devices otherwise). Results go to ``benchmarks/results/memory.json``.
"""

import argparse
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    """One group size, measured in this (fresh) process."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxmerge as jm

    devices = jax.local_devices()[: args.devices]
    if len(devices) < args.devices:
        raise SystemExit(f"asked for {args.devices} devices, {len(jax.local_devices())} present")
    mesh = jax.make_mesh((args.devices,), ("data",), devices=devices)
    rows_spec = NamedSharding(mesh, P("data"))
    dtype = jnp.dtype(args.input_dtype)
    cpu = devices[0].platform == "cpu"
    paths = [f"layer{i}" for i in range(args.group)]
    shapes = {p: (args.width, args.width) for p in paths}

    def allocate():
        key = jax.random.key(0)
        stats = {p: jm.init_stats(args.width, args.width, args.tasks) for p in paths}
        stats = jax.device_put(stats, NamedSharding(mesh, P()))
        batches = {}
        with jax.set_mesh(mesh):  # generated in place, each device its own rows
            for i, p in enumerate(paths):
                kx, ky = jax.random.split(jax.random.fold_in(key, i))
                x = jax.random.normal(kx, (args.rows, args.width), dtype, out_sharding=rows_spec)
                y = jax.random.normal(ky, (args.rows, args.width), dtype, out_sharding=rows_spec)
                batches[p] = (x, y)
        return stats, batches

    def step(stats, batches):
        out = jm.sharded_update_stats_by_path(stats, batches, 0, mesh=mesh)
        jax.block_until_ready(out)
        return out

    # Warm up (compile, first run), and read XLA's buffer assignment of the compiled step.
    stats, batches = allocate()
    step(stats, batches)
    from jaxmerge._internal import sharded_step

    lowered = sharded_step.lower(
        [stats[p] for p in paths],
        [batches[p][0] for p in paths],
        [batches[p][1] for p in paths],
        [None] * len(paths),
        jnp.int32(0),
        [jnp.float32(1.0)] * len(paths),
        mesh=mesh,
        axis="data",
    )
    analysis = lowered.compile().memory_analysis()
    xla = analysis.argument_size_in_bytes + analysis.output_size_in_bytes
    xla += analysis.temp_size_in_bytes
    del stats, batches, lowered
    gc.collect()

    if cpu:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = _rss("VmRSS")
    else:
        before = [d.memory_stats()["bytes_in_use"] for d in devices]
    stats, batches = allocate()
    step(stats, batches)
    if cpu:
        measured = (_rss("VmHWM") - before) / args.devices
    else:
        peaks = [d.memory_stats()["peak_bytes_in_use"] for d in devices]
        measured = max(p - b for p, b in zip(peaks, before, strict=True))
    formula = jm.accumulation_bytes(
        shapes, num_tasks=args.tasks, rows=args.rows, devices=args.devices, input_dtype=dtype
    )
    return {
        "group": args.group,
        "formula_bytes": formula,
        "xla_bytes": int(xla),
        "measured_bytes": int(measured),
        "measured_over_formula": measured / formula,
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2, help="devices on the data axis")
    parser.add_argument("--quick", action="store_true", help="small widths, fewer group sizes")
    parser.add_argument(
        "--input-dtypes", nargs="+", default=["float32", "bfloat16"], help="layer input dtypes"
    )
    parser.add_argument("--input-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--group", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=int, default=None, help="layer width n = m")
    parser.add_argument("--rows", type=int, default=None, help="rows per layer and batch")
    parser.add_argument("--tasks", type=int, default=2)
    args = parser.parse_args()
    args.width = args.width or (512 if args.quick else 2048)
    args.rows = args.rows or (512 if args.quick else 2048)
    if args.child:
        print(json.dumps(child(args)))
        return

    groups = (1, 2, 4) if args.quick else (1, 2, 4, 8)
    env = dict(os.environ)
    # Emulated devices for a CPU host (ignored by GPU/TPU backends); no preallocation on GPUs, so
    # that the allocator's peak is the program's.
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large host buffers go back to the OS when freed
    rows = []
    for input_dtype in args.input_dtypes:
        for g in groups:
            cmd = [sys.executable, __file__, "--child", "--group", str(g), "--devices",
                   str(args.devices), "--width", str(args.width), "--rows", str(args.rows),
                   "--tasks", str(args.tasks), "--input-dtype", input_dtype]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"group {g} ({input_dtype}) failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(dict(row, input_dtype=input_dtype))
            print(
                f"{input_dtype:8s} group {g:2d}: formula {row['formula_bytes'] / 1e6:8.1f} MB  "
                f"xla {row['xla_bytes'] / 1e6:8.1f} MB  "
                f"measured {row['measured_bytes'] / 1e6:8.1f} MB  "
                f"measured/formula {row['measured_over_formula']:.2f}",
                flush=True,
            )
    result = {
        "command": " ".join(["python", "benchmarks/memory.py"] + sys.argv[1:]),
        "devices": args.devices,
        "width": args.width,
        "rows_per_layer": args.rows,
        "tasks": args.tasks,
        "accumulation_dtype": "float32",
        "machine": platform.platform(),
        "groups": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "memory_quick.json" if args.quick else "memory.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
