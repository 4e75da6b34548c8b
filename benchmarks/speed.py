"""Speed benchmark: ``python benchmarks/speed.py [--quick]``.

Measures, in one run on this machine:

* ``stats_over_matmul``: throughput of the statistics update (``update_stats``: the ``X̄ᵀX̄`` and
  ``X̄ᵀY`` products of a batch) over the throughput of one plain jitted matmul of the same FLOPs,
  ``X̄ᵀ[X̄, Y]`` (``2N(n+1)(n+1+m)`` FLOPs each). Warm-up, then the median of repeats.
* ``solve_cost``: one layer's diagonal-basis solve against its full-basis solve.
* ``scaling``: one layer's merge (statistics of ``K`` tasks + full solve) against calibration
  tokens, layer width and number of models, with the exponent of a least-squares line fitted on
  log-log axes.
* ``fusionbench``: an end-to-end RegMean merge (statistics + solve + fold back) in jaxmerge against
  FusionBench's ``RegMeanAlgorithm`` (PyTorch, CPU, in ``benchmarks/.fusionbench-venv``; run
  ``bash benchmarks/fusionbench/setup.sh`` once) on the same models and calibration inputs: the
  image-suite MLP and MiniLM-L6. FusionBench's RegMean solves the kernels without a bias column
  (token-averaged Gram matrices per model, ``W = (Σₖ Gₖ)⁻¹ Σₖ Gₖ Wₖ``) and averages every other
  parameter; the jaxmerge side here solves that same problem (the full basis on bias-free
  statistics, biases averaged) so the merged weights are comparable, with ``α = 1``.
* ``sequential_over_parallel``: wall time of the sequential merge over the parallel one
  (``jaxmerge.merge``; reported as unavailable when that is not installed).

Results go to ``benchmarks/results/speed.json`` and ``speed.png``.
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import data
import finetune
import flax.linen as nn
import flax.traverse_util as traverse
import jax
import jax.numpy as jnp
import models
import numpy as np

import jaxmerge as jm

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"
FB_PYTHON = HERE / ".fusionbench-venv" / "bin" / "python"
FB_RUNNER = HERE / "fusionbench" / "run_regmean.py"


def median_seconds(fn, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def fit_exponent(x, seconds) -> float:
    """Slope of the least-squares line through ``(log x, log seconds)``."""
    return float(np.polyfit(np.log(x), np.log(seconds), 1)[0])


# ---- statistics throughput against matmul -----------------------------------------------------


def stats_over_matmul(tokens: int, n: int, m: int, repeats: int) -> dict:
    """Statistics-update throughput over plain-matmul throughput for the same FLOPs."""
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (tokens, n), jnp.float32)
    y = jax.random.normal(ky, (tokens, m), jnp.float32)
    stats = jm.init_stats(n, m, 1)
    xa = jnp.concatenate([x, jnp.ones((tokens, 1), x.dtype)], 1)
    xy = jnp.concatenate([xa, y], 1)
    matmul = jax.jit(lambda a, b: a.T @ b)
    flops = 2.0 * tokens * (n + 1) * (n + 1 + m)
    t_matmul = median_seconds(lambda: matmul(xa, xy).block_until_ready(), repeats=repeats)
    t_stats = median_seconds(
        lambda: jax.block_until_ready(jm.update_stats(stats, x, y, 0)), repeats=repeats
    )
    return {
        "tokens": tokens,
        "n_in": n,
        "n_out": m,
        "flops": flops,
        "matmul_s": t_matmul,
        "stats_s": t_stats,
        "matmul_gflops": flops / t_matmul / 1e9,
        "stats_gflops": flops / t_stats / 1e9,
        "stats_over_matmul": t_matmul / t_stats,
    }


# ---- one layer: solve cost and scaling --------------------------------------------------------


def synthetic_layer(tokens: int, n: int, m: int, k: int, seed: int = 0):
    """A base Dense layer, ``k`` fine-tunes of it, and per-task inputs (feature scales 1 to 0.1,
    a different mean per task: a Gram matrix of condition about 10⁴, solved by plain Cholesky)."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(1.0, 0.1, n, dtype=np.float32)
    xs = [
        jnp.asarray((rng.normal(size=(tokens, n)).astype(np.float32) + 0.1 * t) * scales)
        for t in range(k)
    ]
    base = (rng.normal(size=(n, m)).astype(np.float32) / np.sqrt(n), np.zeros(m, np.float32))
    tuned = [
        (base[0] + 0.1 * rng.normal(size=(n, m)).astype(np.float32) / np.sqrt(n), base[1] + 0.1)
        for _ in range(k)
    ]
    ys = [x @ w + b for x, (w, b) in zip(xs, tuned, strict=True)]
    return xs, ys, base, tuned


def merge_layer(xs, ys, base, tuned, basis="full"):
    """Statistics of every task and the solve of one layer; blocks on the result."""
    stats = jm.layer_stats(xs, ys)
    sol = jm.solve_layer(stats, base, tuned, basis=basis)
    if int(sol.status) != jm.SolveStatus.CHOLESKY:
        raise RuntimeError(f"synthetic layer solved with {jm.SolveStatus(int(sol.status))!r}")
    return jax.block_until_ready(sol.kernel)


def solve_cost(tokens: int, n: int, m: int, k: int, repeats: int) -> dict:
    """Diagonal-basis against full-basis solve time of one layer (statistics excluded)."""
    xs, ys, base, tuned = synthetic_layer(tokens, n, m, k)
    stats = jm.layer_stats(xs, ys)
    times = {}
    for basis in ("diagonal", "full"):
        times[basis] = median_seconds(
            lambda b=basis: jax.block_until_ready(
                jm.solve_layer(stats, base, tuned, basis=b).kernel
            ),
            repeats=repeats,
        )
    return {
        "n_in": n,
        "n_out": m,
        "num_models": k,
        "diagonal_s": times["diagonal"],
        "full_s": times["full"],
        "diagonal_over_full": times["diagonal"] / times["full"],
    }


def scaling(quick: bool, repeats: int) -> dict:
    """One-layer merge time against tokens per task, width (``n = m``) and number of models."""
    if quick:
        grid = {"tokens": [256, 512, 1024], "width": [64, 128, 256], "models": [2, 4, 8]}
        fixed = {"tokens": 512, "width": 128, "models": 2}
    else:
        grid = {
            "tokens": [1024, 2048, 4096, 8192, 16384],
            "width": [128, 256, 512, 1024],
            "models": [2, 4, 8, 16],
        }
        fixed = {"tokens": 2048, "width": 256, "models": 2}
    out = {}
    for axis, values in grid.items():
        seconds = []
        for v in values:
            size = {**fixed, axis: v}
            xs, ys, base, tuned = synthetic_layer(
                size["tokens"], size["width"], size["width"], size["models"]
            )
            seconds.append(
                median_seconds(lambda a=(xs, ys, base, tuned): merge_layer(*a), repeats=repeats)
            )
        out[axis] = {
            "values": values,
            "seconds": seconds,
            "exponent": fit_exponent(values, seconds),
            "fixed": {k: v for k, v in fixed.items() if k != axis},
        }
    return out


# ---- end to end against FusionBench -----------------------------------------------------------


def dense_inputs(module: nn.Module, *args, **kwargs) -> dict:
    """Inputs of every ``nn.Dense`` call in ``module.apply(*args, **kwargs)``.

    Returns ``{"path_a,path_b": x}``: Dense layers fed the same array (query/key/value) share one
    entry, so they share one Gram matrix.
    """
    groups = {}

    def interceptor(next_fun, a, kw, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            x = a[0]
            groups.setdefault(id(x), (x, []))[1].append("/".join(context.module.path))
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        module.apply(*args, **kwargs)
    return {",".join(paths): x for x, paths in groups.values()}


def get_path(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def set_path(tree, path: str, value):
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree[key]
    tree[leaf] = value


def regmean_merge(module, base_params, tuned_params, calib_inputs, *, batch: int):
    """RegMean (α = 1) with jaxmerge: statistics + full-basis solve + fold back.

    For every group of Dense layers sharing an input, the per-task statistics of the inputs and
    the kernels' outputs (bias-free, as in RegMean) are accumulated in batches, weighted ``1/Nₖ``,
    combined, and one full-basis solve gives the kernels; every other parameter is the mean of the
    fine-tunes. ``calib_inputs[k]`` is a tuple of positional arrays for ``module.apply``.

    Returns the merged parameters and, per Dense path, which input features carry calibration
    energy (a positive Gram diagonal); rows of the others are not determined by the data.
    """
    capture = _capture(module)
    k = len(tuned_params)
    merged = jax.tree.map(lambda *a: sum(a) / k, *tuned_params)
    total = None
    for t, (params, inputs) in enumerate(zip(tuned_params, calib_inputs, strict=True)):
        part = None
        for i in range(0, len(inputs[0]), batch):
            captured = capture(params, *(a[i : i + batch] for a in inputs))
            if part is None:
                part = {
                    g: jm.init_stats(x.shape[-1], _width(params, g), k) for g, x in captured.items()
                }
            for g, x in captured.items():
                kernel = jnp.concatenate([get_path(params, p)["kernel"] for p in g.split(",")], 1)
                part[g] = jm.update_stats(part[g], x, x @ kernel, t)
        part = {g: jm.normalize_stats(s) for g, s in part.items()}
        total = part if total is None else {g: jm.combine_stats(total[g], part[g]) for g in part}
    live = {}
    for g, stats in total.items():
        paths = g.split(",")
        live.update({q: np.asarray(jnp.diagonal(stats.gram)[:-1] > 0) for q in paths})
        kernels = [
            jnp.concatenate([get_path(p, q)["kernel"] for q in paths], 1) for p in tuned_params
        ]
        base = jnp.concatenate([get_path(base_params, q)["kernel"] for q in paths], 1)
        sol = jm.solve_layer(stats, base, kernels, basis="full")
        splits = np.cumsum([get_path(base_params, q)["kernel"].shape[1] for q in paths])[:-1]
        for q, kernel in zip(paths, jnp.split(sol.kernel, splits, axis=1), strict=True):
            set_path(merged, f"{q}/kernel", kernel)
    return jax.block_until_ready(merged), live


@functools.cache
def _capture(module: nn.Module):
    return jax.jit(lambda p, *a: dense_inputs(module, {"params": p}, *a))


def _width(params, group: str) -> int:
    return sum(get_path(params, p)["kernel"].shape[1] for p in group.split(","))


def torch_state(params) -> dict:
    """Flax parameters as a PyTorch state dict (``a/b/kernel`` → ``a.b.weight``, transposed)."""
    out = {}
    for path, value in traverse.flatten_dict(jax.device_get(params), sep="/").items():
        *module, leaf = path.split("/")
        name = ".".join(module)
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            out[f"{name}.weight"] = np.ascontiguousarray(value.T)
        elif leaf in ("scale", "embedding"):
            out[f"{name}.weight"] = value
        else:
            out[f"{name}.{leaf}"] = value
    return out


def run_fusionbench(export: dict) -> dict:
    """Run the FusionBench runner on ``export`` (arrays and scalars); its merged state dict."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = pathlib.Path(tmp) / "in.npz", pathlib.Path(tmp) / "out.npz"
        np.savez(src, **export)
        proc = subprocess.run(
            [str(FB_PYTHON), str(FB_RUNNER), str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"FusionBench runner failed:\n{proc.stderr[-3000:]}")
        with np.load(dst) as f:
            return {k: np.array(f[k]) for k in f.files}


def per_layer_diff(merged, fb_state, paths) -> dict:
    """``max|W_jaxmerge − W_fusionbench| / max|W_fusionbench|`` of every layer."""
    return {p: compare_kernels(merged, fb_state, [p])[0] for p in paths}


def compare_kernels(merged, fb_state, paths, rows=None) -> tuple[float, str]:
    """Largest ``max|W_jaxmerge − W_fusionbench| / max|W_fusionbench|`` over the given layers,
    over all kernel rows or only ``rows[path]``."""
    worst, where = 0.0, ""
    for path in paths:
        ours = np.asarray(get_path(merged, path)["kernel"])
        theirs = fb_state[path.replace("/", ".") + ".weight"].T
        if rows is not None:
            ours, theirs = ours[rows[path]], theirs[rows[path]]
        rel = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
        if rel > worst:
            worst, where = rel, path
    return worst, where


def versus_fusionbench(
    name, module, base, tuned, calib, export_extra, *, batch, rows, compare_float64
) -> dict:
    """Time jaxmerge's and FusionBench's RegMean on the same models and calibration inputs.

    The merged kernels are compared in float32 and, with ``compare_float64``, in float64 (both
    tools rerun in float64): there the difference measures the algorithms rather than float32
    rounding in ill-conditioned Gram matrices.
    """
    if not FB_PYTHON.exists():
        return {
            "status": "unavailable",
            "reason": f"no FusionBench environment at {FB_PYTHON.parent.parent}; run "
            "bash benchmarks/fusionbench/setup.sh",
        }
    start = time.perf_counter()
    regmean_merge(module, base, tuned, calib, batch=batch)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    merged, _ = regmean_merge(module, base, tuned, calib, batch=batch)
    warm = time.perf_counter() - start
    export = {
        "num_models": len(tuned),
        "batch": batch,
        "alpha": 1.0,
        "dtype": "float32",
        **export_extra,
        **{f"base/{k}": v for k, v in torch_state(base).items()},
    }
    for k, params in enumerate(tuned):
        export.update({f"model{k}/{n}": v for n, v in torch_state(params).items()})
    fb = run_fusionbench(export)
    paths = [p for g in _capture_paths(module, base, calib[0], batch) for p in g.split(",")]
    rel, where = compare_kernels(merged, fb, paths)
    float64 = {}
    if compare_float64:
        fb64 = run_fusionbench({**export, "dtype": "float64"})
        with jax.enable_x64(True):
            merged64, live = regmean_merge(
                module, _f64(base), [_f64(p) for p in tuned], [_f64(c) for c in calib], batch=batch
            )
        rel64, where64 = compare_kernels(merged64, fb64, paths)
        float64 = {
            "max_rel_diff": rel64,
            "max_rel_diff_layer": where64,
            # Inputs with no calibration energy (dead ReLU units, blank pixels) leave their kernel
            # rows undetermined: jaxmerge keeps the base's rows (minimum-norm update), FusionBench's
            # pseudo-inverse zeroes them. Compared on the rows the data determines:
            "max_rel_diff_determined_rows": compare_kernels(merged64, fb64, paths, live)[0],
            "undetermined_rows": {p: int((~v).sum()) for p, v in live.items() if (~v).any()},
            # A layer fed fewer calibration rows than inputs (BERT's pooler sees one token per
            # sequence) has a singular Gram matrix that an explicit inverse does not detect.
            "rel_diff_per_layer": per_layer_diff(merged64, fb64, paths),
        }
    return {
        "model": name,
        "num_models": len(tuned),
        "calibration_rows_per_model": rows,
        "dense_layers": len(paths),
        "jaxmerge_s": warm,
        "jaxmerge_cold_s": cold,
        "fusionbench_s": float(fb["seconds"]),
        "ratio": warm / float(fb["seconds"]),
        "max_rel_diff_float32": rel,
        "max_rel_diff_float32_layer": where,
        **float64,
        "torch_threads": int(fb["torch_threads"]),
        "fusionbench_pinv_fallbacks": int(fb["pinv_fallbacks"]),
        "problem": "RegMean alpha=1: kernels from bias-free token-averaged Gram matrices, "
        "other parameters averaged (FusionBench's definition)",
    }


def _f64(tree):
    return jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _capture_paths(module, params, inputs, batch) -> list[str]:
    shapes = jax.eval_shape(_capture(module), params, *(a[:batch] for a in inputs))
    return list(shapes)


def fusionbench_mlp(quick: bool, seed: int) -> dict:
    """RegMean on the image suite's four fine-tuned MLP trunks, jaxmerge vs FusionBench."""
    base, tuned, tasks, _ = finetune.image_models("mlp", seed=seed, quick=quick)
    rows = 256 if quick else 2048
    calib = []
    for t in tasks:
        x = np.concatenate([t.calib[0], t.heldout[0], t.train[0]])[:rows].reshape(-1, 784)
        calib.append((jnp.asarray(x),))
    config = {"n_in": 784, "width": 256}
    export = {"kind": "mlp", "config": json.dumps(config)}
    export.update({f"calib{k}/x": np.asarray(c[0]) for k, c in enumerate(calib)})
    return versus_fusionbench(
        "mlp",
        models.MLP(),
        base["trunk"],
        [p["trunk"] for p in tuned],
        calib,
        export,
        batch=256,
        rows=[len(c[0]) for c in calib],
        compare_float64=True,
    )


def fusionbench_minilm(quick: bool, seed: int) -> dict:
    """RegMean on MiniLM-L6 with K seeded task vectors, jaxmerge vs FusionBench.

    The K models are the real MiniLM-L6 plus seeded Gaussian task vectors (1% of each tensor's
    standard deviation): merge cost does not depend on the values, and the comparison of merged
    weights needs only that both tools see the same models and tokens. The calibration tokens are
    each text task's calibration texts, packed into unpadded sequences. ``quick`` keeps the first
    transformer block only.
    """
    try:
        module, base = models.load_minilm()
        tok = models.tokenizer()
        texts = [data.text_task(n, seed=seed).calib[0] for n in data.TEXT_TASKS]
    except data.DataUnavailable as e:
        return {"status": "unavailable", "reason": str(e)}
    length, num_seqs = (32, 8) if quick else (128, 32)
    config = json.loads((models.minilm_dir() / "config.json").read_text())
    if quick:  # the first block only: the pipeline, not the figures
        config["num_hidden_layers"] = 1
        module = type(module)(dataclasses.replace(module.config, num_hidden_layers=1))
        base = {**base, "encoder": {"layer": {"0": base["encoder"]["layer"]["0"]}}}
    calib = [
        tuple(
            jnp.asarray(a) for a in models.packed_tokens(t, tok, length=length, num_seqs=num_seqs)
        )
        for t in texts
    ]
    keys = jax.random.split(jax.random.PRNGKey(seed), len(calib))

    def perturbed(key):
        leaves, treedef = jax.tree.flatten(base)
        noise = [
            leaf + 0.01 * jnp.std(leaf) * jax.random.normal(k, leaf.shape, leaf.dtype)
            for leaf, k in zip(leaves, jax.random.split(key, len(leaves)), strict=True)
        ]
        return jax.tree.unflatten(treedef, noise)

    tuned = [perturbed(k) for k in keys]
    export = {"kind": "bert", "config": json.dumps(config)}
    for k, (ids, mask) in enumerate(calib):
        export[f"calib{k}/input_ids"] = np.asarray(ids)
        export[f"calib{k}/attention_mask"] = np.asarray(mask)
    return versus_fusionbench(
        "minilm",
        module,
        base,
        tuned,
        calib,
        export,
        batch=8,
        rows=[int(np.prod(c[0].shape)) for c in calib],
        compare_float64=not quick,
    )


# ---- sequential against parallel ---------------------------------------------------------------


def sequential_over_parallel(quick: bool, seed: int, repeats: int) -> dict:
    """Wall time of ``jaxmerge.merge``'s sequential algorithm over its parallel one.

    The image suite's MLP and CNN trunks, four fine-tunes, full basis, one calibration batch per
    task (the sequential merge is then one jitted pass); each timed after a warm-up run.
    """
    if not hasattr(jm, "merge"):
        return {"status": "unavailable", "reason": "jaxmerge.merge is not available"}
    out = {}
    for trunk_name in ("mlp",) if quick else ("mlp", "cnn"):
        base, tuned, tasks, _ = finetune.image_models(trunk_name, seed=seed, quick=quick)
        trunk = models.trunk_module(trunk_name)
        calib = [[jnp.asarray(t.calib[0])] for t in tasks]
        args = (trunk, base["trunk"], [p["trunk"] for p in tuned], calib)
        times = {
            algorithm: median_seconds(
                lambda a=algorithm, args=args: jax.block_until_ready(
                    jm.merge(*args, algorithm=a, progress=False)[0]
                ),
                repeats=repeats,
            )
            for algorithm in ("parallel", "sequential")
        }
        out[trunk_name] = {
            "parallel_s": times["parallel"],
            "sequential_s": times["sequential"],
            "sequential_over_parallel": times["sequential"] / times["parallel"],
            "calibration_rows_per_task": [len(c[0]) for c in calib],
        }
    return out


# ---- driver -------------------------------------------------------------------------------------


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (axis, series) in zip(axes, result["scaling"].items(), strict=False):
        ax.loglog(series["values"], series["seconds"], "o-")
        ax.set_xlabel(axis)
        ax.set_ylabel("one-layer merge (s)")
        ax.set_title(f"{axis}: exponent {series['exponent']:.2f}")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(
        f"stats/matmul throughput {result['stats_over_matmul']:.2f}; "
        f"diagonal/full solve {result['solve_cost']['diagonal_over_full']:.2f}; "
        + "; ".join(
            f"{k} jaxmerge/FusionBench {v['ratio']:.2f}"
            for k, v in result["fusionbench"].items()
            if "ratio" in v
        )
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
    parser.add_argument("--skip-fusionbench", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    repeats = 3 if quick else 7
    start = time.perf_counter()
    result = {
        "quick": quick,
        "seed": args.seed,
        "machine": {
            "platform": platform.platform(),
            "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()],
        },
    }
    size = (2048, 256, 256) if quick else (16384, 768, 768)
    result["matmul"] = stats_over_matmul(*size, repeats=repeats)
    result["stats_over_matmul"] = result["matmul"]["stats_over_matmul"]
    print(f"stats_over_matmul {result['stats_over_matmul']:.3f}  {result['matmul']}", flush=True)
    cost = (1024, 256, 256, 4) if quick else (4096, 1024, 1024, 4)
    result["solve_cost"] = solve_cost(*cost, repeats=repeats)
    print(f"solve_cost {result['solve_cost']}", flush=True)
    result["scaling"] = scaling(quick, repeats)
    for axis, series in result["scaling"].items():
        print(f"scaling {axis}: exponent {series['exponent']:.2f} {series}", flush=True)
    result["fusionbench"] = {}
    if args.skip_fusionbench:
        result["fusionbench"] = {"status": "skipped"}
    else:
        for name, fn in (("mlp", fusionbench_mlp), ("minilm", fusionbench_minilm)):
            result["fusionbench"][name] = fn(quick, args.seed)
            print(f"fusionbench {name}: {result['fusionbench'][name]}", flush=True)
    result["sequential_over_parallel"] = sequential_over_parallel(quick, args.seed, repeats)
    print(f"sequential_over_parallel {result['sequential_over_parallel']}", flush=True)
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    (args.out / f"speed{suffix}.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / f"speed{suffix}.png")
    print(f"wrote {args.out / f'speed{suffix}.json'} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
