"""Wall time of the sequential merge against the parallel one, as the model gets deeper.

A pre-LN linen transformer with ``depth`` blocks (each: LayerNorm, q/k/v/out DenseGeneral
projections, LayerNorm, a two-layer MLP), ``K`` perturbed fine-tunes and one calibration batch
per task. For each depth the script times, in the same process:

* ``parallel``: one forward pass per task, then every layer group solved;
* ``sequential``: the calibration fits in one batch per task, so the whole merge is one jitted
  function (targets from one pass per fine-tune, then one pass of the merged model that solves
  each group when it reaches it);
* ``sequential, 2 batches``: the same data split in two batches per task, which costs one pass
  over the calibration per layer group.

Every wall time includes tracing and XLA compilation (each merge call builds its own jitted
functions), which dominates on small CPU models; the tracing + compilation seconds are measured
with ``jax.monitoring`` and also reported subtracted. The output error ``Σₖ mean‖f(θ; xₖ) −
f(θₖ; xₖ)‖²`` on the calibration data says what the sequential time buys. Run::

    python benchmarks/sequential_vs_parallel.py [--depths 1 2 4 8] [--repeats 2]

and it prints a table and writes ``benchmarks/results/sequential_vs_parallel.json``.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxmerge import merge

DIM, HEADS, VOCAB, SEQ = 64, 4, 100, 32


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm()(x)
        shape = (HEADS, DIM // HEADS)
        q, k, v = (nn.DenseGeneral(shape, name=n)(h) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(shape[1])
        logits = jnp.where(mask[:, None, None, :] > 0, logits, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
        x = x + nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(o)
        h = nn.gelu(nn.Dense(4 * DIM, name="up")(nn.LayerNorm()(x)))
        return x + nn.Dense(DIM, name="down")(h)


class Transformer(nn.Module):
    depth: int

    @nn.compact
    def __call__(self, tokens, mask):
        x = nn.Embed(VOCAB, DIM)(tokens)
        for i in range(self.depth):
            x = Block(name=f"block_{i}")(x, mask)
        x = nn.LayerNorm()(x)
        return nn.Dense(8)((x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))


def batch(seed, n):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(n, SEQ)).astype(np.int32)
    mask = (np.arange(SEQ)[None] < rng.integers(SEQ // 2, SEQ + 1, size=(n, 1))).astype(np.float32)
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds = [0.0]


def _listen(event, seconds, **_):
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


jax.monitoring.register_event_duration_secs_listener(_listen)


def timed(fn, repeats):
    """Best wall time of ``repeats`` calls, the tracing + compilation part of that call, and the
    last result."""
    best = None
    for _ in range(repeats):
        _compile_seconds[0] = 0.0
        start = time.perf_counter()
        result = jax.block_until_ready(fn())
        wall = time.perf_counter() - start
        if best is None or wall < best[0]:
            best = (wall, _compile_seconds[0])
    return best, result


def output_error(model, params, fts, data):
    """``Σₖ mean ‖f(θ; xₖ) − f(θₖ; xₖ)‖²``: how far the merged model is from each fine-tune."""
    total = 0.0
    for f, d in zip(fts, data, strict=True):
        diff = model.apply({"params": params}, **d) - model.apply({"params": f}, **d)
        total += float(jnp.mean(jnp.sum(diff**2, -1)))
    return total


def split(data, parts):
    """Each task's batch as ``parts`` consecutive batches."""
    return [
        [jax.tree.map(lambda a, i=i: np.array_split(a, parts)[i], d) for i in range(parts)]
        for d in data
    ]


def finetunes(base, tasks):
    """``tasks`` fine-tunes: ``base + 0.05·N(0, 1)`` on every parameter, task ``t`` from key
    ``1 + t``."""
    leaves, treedef = jax.tree.flatten(base)
    fts = []
    for t in range(tasks):
        keys = jax.random.split(jax.random.key(1 + t), len(leaves))
        noisy = [
            a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)
        ]
        fts.append(jax.tree.unflatten(treedef, noisy))
    return fts


def measure(depth, args):
    model = Transformer(depth)
    base = model.init(jax.random.key(0), **batch(0, 2))["params"]
    fts = finetunes(base, args.tasks)
    data = [batch(10 + t, args.examples) for t in range(args.tasks)]

    def run(cal, algorithm):
        return merge(model, base, fts, cal, algorithm=algorithm, progress=False)

    one = split(data, 1)
    (par, par_c), (par_merged, par_report) = timed(lambda: run(one, "parallel"), args.repeats)
    (seq, seq_c), (seq_merged, seq_report) = timed(lambda: run(one, "sequential"), args.repeats)
    seq2 = (
        timed(lambda: run(split(data, 2), "sequential"), 1)[0] if depth <= args.max_multi else None
    )
    return {
        "depth": depth,
        "layers_solved": len(par_report.layers),
        "parallel_s": round(par, 3),
        "sequential_s": round(seq, 3),
        "ratio": round(seq / par, 3),
        "parallel_compile_s": round(par_c, 3),
        "sequential_compile_s": round(seq_c, 3),
        "ratio_excluding_compile": round((seq - seq_c) / (par - par_c), 3),
        "sequential_2_batches_s": None if seq2 is None else round(seq2[0], 3),
        "output_error_base": round(output_error(model, base, fts, data), 5),
        "output_error_parallel": round(output_error(model, par_merged, fts, data), 5),
        "output_error_sequential": round(output_error(model, seq_merged, fts, data), 5),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64, help="calibration examples per task")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--max-multi", type=int, default=4, help="largest depth timed with 2 batches per task"
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "sequential_vs_parallel.json"),
    )
    args = parser.parse_args()
    rows = []
    for depth in args.depths:
        row = measure(depth, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "sequential vs parallel merge wall time (seconds, best of repeats, "
        "including tracing and compilation)",
        "setup": {
            "dim": DIM,
            "heads": HEADS,
            "seq": SEQ,
            "tasks": args.tasks,
            "examples_per_task": args.examples,
            "repeats": args.repeats,
        },  # fmt: skip
        "machine": {
            "platform": platform.platform(),
            "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "rows": rows,
    }
    head = ("depth", "layers", "par s", "seq s", "ratio", "ratio w/o compile", "seq 2 batches s",
            "err par", "err seq")  # fmt: skip
    print("{:>5} {:>6} {:>7} {:>7} {:>6} {:>18} {:>16} {:>8} {:>8}".format(*head))
    for r in rows:
        s2 = "-" if r["sequential_2_batches_s"] is None else f"{r['sequential_2_batches_s']:.2f}"
        print(
            f"{r['depth']:>5} {r['layers_solved']:>6} {r['parallel_s']:>7.2f} "
            f"{r['sequential_s']:>7.2f} {r['ratio']:>6.2f} {r['ratio_excluding_compile']:>18.2f} "
            f"{s2:>16} {r['output_error_parallel']:>8.4f} {r['output_error_sequential']:>8.4f}"
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
