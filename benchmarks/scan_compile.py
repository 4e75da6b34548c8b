"""What a scanned model costs a merge: wall and compile time of merging a linen transformer whose
blocks run under ``nn.scan`` (parameters stacked on axis 0, MaxText's and gemma's layout for deep
models) against the same blocks in a Python loop.

A merge's forward passes run ``nn.scan`` unrolled (each slice of the stacked parameters is its
own layer), so the scanned model compiles like the looped one plus the slicing; training gets
one compiled block from ``scan``, a merge does not. The blocks are those of
``sequential_vs_parallel.py`` (pre-LN attention and MLP, width 64), ``K = 3`` perturbed
fine-tunes, one calibration batch of 64 examples per task. Per depth and algorithm, for both
layouts: the wall seconds of a cold merge (jaxmerge's plan cache and JAX's caches cleared) and
the tracing + compilation seconds within it (``jax.monitoring``), the best of ``--repeats`` warm
merges (the programs kept by the plan cache), and the compile time of the model's own jitted
forward pass for scale. Both layouts get the same parameters (the loop's stacked), so their
merges are also compared (max relative difference). Run::

    python benchmarks/scan_compile.py [--depths 2 4 8] [--repeats 2]

It prints a table and writes ``benchmarks/results/scan_compile.json``.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import linen as nn
from sequential_vs_parallel import Block, batch, finetunes, timed

from jaxmerge import merge
from jaxmerge._internal import plan_cache


class _Step(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return Block(name="block")(x, mask), None


class Model(nn.Module):
    depth: int
    scan: bool

    @nn.compact
    def __call__(self, tokens, mask):
        x = nn.Embed(100, 64)(tokens)
        if self.scan:
            stack = nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=self.depth)  # fmt: skip
            x, _ = stack(name="blocks")(x, mask)
        else:
            for i in range(self.depth):
                x = Block(name=f"block_{i}")(x, mask)
        x = nn.LayerNorm()(x)
        return nn.Dense(8)((x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))


def stacked(params, depth):
    """The looped model's parameters in the scanned layout (blocks stacked on axis 0)."""
    params = dict(params)
    blocks = [params.pop(f"block_{i}") for i in range(depth)]
    params["blocks"] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}
    return params


def measure(depth, args):
    loop, scan = Model(depth, False), Model(depth, True)
    base = loop.init(jax.random.key(0), **batch(0, 2))["params"]
    fts = finetunes(base, args.tasks)
    cal = [[batch(10 + t, args.examples)] for t in range(args.tasks)]
    layouts = {
        "loop": (loop, base, fts),
        "scan": (scan, stacked(base, depth), [stacked(f, depth) for f in fts]),
    }
    row = {"depth": depth}
    for name, (model, b, f) in layouts.items():
        forward = jax.jit(lambda p, d, m=model: m.apply({"params": p}, **d))
        (_, compiled), _ = timed(lambda fw=forward, b=b: fw.lower(b, cal[0][0]).compile(), 1)
        row[f"{name}_forward_compile_s"] = round(compiled, 3)
        for algorithm in ("parallel", "sequential"):
            plan_cache.clear()  # a cold merge: nothing compiled by the other layout's
            jax.clear_caches()

            def run(m=model, b=b, f=f, a=algorithm):
                return merge(m, b, f, cal, algorithm=a, progress=False)

            (wall, comp), (merged, report) = timed(run, 1)
            (warm, _), _ = timed(run, args.repeats)
            row[f"{name}_{algorithm}_s"] = round(wall, 3)
            row[f"{name}_{algorithm}_compile_s"] = round(comp, 3)
            row[f"{name}_{algorithm}_warm_s"] = round(warm, 3)
            row[f"{name}_{algorithm}_layers"] = len(report.layers)
            row[f"{name}_{algorithm}_merged"] = merged
    for algorithm in ("parallel", "sequential"):
        got = row.pop(f"scan_{algorithm}_merged")
        want = stacked(row.pop(f"loop_{algorithm}_merged"), depth)
        row[f"{algorithm}_scan_vs_loop_max_rel_diff"] = max(
            float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        )
        row[f"{algorithm}_compile_ratio_scan_over_loop"] = round(
            row[f"scan_{algorithm}_compile_s"] / row[f"loop_{algorithm}_compile_s"], 3
        )
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "scan_compile.json")
    )
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    for depth in args.depths:
        rows.append(measure(depth, args))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "merge of nn.scan-stacked blocks against the same blocks in a loop "
        "(seconds, best of repeats, including tracing and compilation)",
        "command": "python benchmarks/scan_compile.py --depths "
        + " ".join(map(str, args.depths))
        + f" --repeats {args.repeats} --tasks {args.tasks} --examples {args.examples}",
        "setup": {"dim": 64, "tasks": args.tasks, "examples_per_task": args.examples},
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "devices": [str(d) for d in jax.devices()],
        },
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
    }
    print(f"{'depth':>5} {'algorithm':>10} {'loop s':>7} {'scan s':>7} {'loop compile':>12} "
          f"{'scan compile':>12} {'ratio':>6} {'warm loop/scan':>15} {'fwd compile loop/scan':>22} "
          f"{'max diff':>9}")  # fmt: skip
    for r in rows:
        for a in ("parallel", "sequential"):
            print(f"{r['depth']:>5} {a:>10} {r[f'loop_{a}_s']:>7.2f} {r[f'scan_{a}_s']:>7.2f} "
                  f"{r[f'loop_{a}_compile_s']:>12.2f} {r[f'scan_{a}_compile_s']:>12.2f} "
                  f"{r[f'{a}_compile_ratio_scan_over_loop']:>6.2f} "
                  f"{r[f'loop_{a}_warm_s']:>7.2f} / {r[f'scan_{a}_warm_s']:<5.2f} "
                  f"{r['loop_forward_compile_s']:>12.2f} / {r['scan_forward_compile_s']:<7.2f} "
                  f"{r[f'{a}_scan_vs_loop_max_rel_diff']:>9.1e}")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
