"""Speed benchmark: ``python benchmarks/speed.py [--llm] [--quick]``.

Measures, in one run on this machine (``--llm``: only the two language-model comparisons marked
below, written to ``speed_llm.json``):

* ``stats_over_matmul``: throughput of the statistics update (``update_stats``: the ``X̄ᵀX̄`` and
  ``X̄ᵀY`` products of a batch) over the throughput of one plain jitted matmul of the same FLOPs,
  ``X̄ᵀ[X̄, Y]`` (``2N(n+1)(n+1+m)`` FLOPs each). Warm-up, then the median of repeats, the two
  timed in turn (so are the other ratios).
* ``solve_cost``: one layer's diagonal-basis solve against its full-basis solve.
* ``scaling``: one layer's merge (statistics of ``K`` tasks + full solve) against calibration
  tokens, layer width and number of models, with the exponent of a least-squares line fitted on
  log-log axes.
* ``fusionbench``: an end-to-end merge in jaxmerge against FusionBench's ``RegMeanAlgorithm``
  (PyTorch, CPU, in ``benchmarks/.fusionbench-venv``; run ``bash benchmarks/fusionbench/setup.sh``
  once) on the same models and calibration inputs: the image-suite MLP, MiniLM-L6 fine-tuned on the
  text tasks, and (``--llm``) the real SmolLM2-135M-Instruct as Hugging Face's
  ``LlamaForCausalLM`` with four perturbed experts (:func:`smollm2_problem`). ``jaxmerge_s``
  times ``jaxmerge.merge`` (full basis, ``α = 1``, every supported layer solved, biases
  included); ``jaxmerge_regmean_s`` solves FusionBench's own problem (kernels from bias-free
  token-averaged Gram matrices, ``W = (Σₖ Gₖ)⁻¹ Σₖ GₖWₖ``, every other parameter averaged) from
  ``jaxmerge.collect_stats`` and ``jaxmerge.solve_layer``, and its merged kernels are compared
  with FusionBench's. ``jaxmerge_first_call_new_process_s`` is the merge's first call in a fresh
  process, XLA compilation included, and ``jaxmerge_first_call_cached_compilation_s`` the same
  with JAX's persistent compilation cache filled by an earlier process. ``floor_s`` /
  ``floor_ratio``: the least any RegMean merge of the layers jaxmerge solves costs here with XLA's
  matmul (the faster tool's forward passes plus the bare Gram products,
  ``jaxmerge_breakdown.gram_products_s``), alone and over FusionBench's time.
* ``mergekit`` (``--llm``): mergekit's TIES and DARE against jaxmerge's on the same safetensors
  checkpoints of the SmolLM2 problem (:func:`versus_mergekit`): wall times, their ratio and the
  weights' largest relative difference.
* ``sequential_over_parallel``: wall time of the sequential merge over the parallel one
  (``jaxmerge.merge``; reported as unavailable when that is not installed).

Results go to ``benchmarks/results/speed.json`` and ``speed.png`` (``--llm``:
``speed_llm.json``).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import data
import finetune
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
REPEATS_END_TO_END = 3  # timed runs of each whole merge (after one that compiles), median


def median_seconds(*fns, repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time of each ``fn()`` (which must block until its result is ready).

    The functions run in turn within each repeat, so a change of the machine's load during the
    measurement reaches all of them alike and their ratios stay comparable.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


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
    t_matmul, t_stats = median_seconds(
        lambda: matmul(xa, xy).block_until_ready(),
        lambda: jax.block_until_ready(jm.update_stats(stats, x, y, 0)),
        repeats=repeats,
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
    diagonal, full = median_seconds(
        *(
            lambda b=basis: jax.block_until_ready(
                jm.solve_layer(stats, base, tuned, basis=b).kernel
            )
            for basis in ("diagonal", "full")
        ),
        repeats=repeats,
    )
    return {
        "n_in": n,
        "n_out": m,
        "num_models": k,
        "diagonal_s": diagonal,
        "full_s": full,
        "diagonal_over_full": diagonal / full,
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
                median_seconds(lambda a=(xs, ys, base, tuned): merge_layer(*a), repeats=repeats)[0]
            )
        out[axis] = {
            "values": values,
            "seconds": seconds,
            "exponent": fit_exponent(values, seconds),
            "fixed": {k: v for k, v in fixed.items() if k != axis},
        }
    return out


# ---- end to end against FusionBench -----------------------------------------------------------


def get_path(tree, path: str):
    """The node at a ``/``-joined path (an NNX state's list indices as digits)."""
    for key in path.split("/"):
        tree = tree[key] if key in tree else tree[int(key)]
    return tree


def dense_paths(params) -> list[str]:
    """Paths of every layer with a ``kernel`` (the Dense layers FusionBench's RegMean merges)."""
    flat = traverse.flatten_dict(params, sep="/")
    return [p.rsplit("/", 1)[0] for p in flat if p.endswith("/kernel")]


def batches_of(inputs, batch: int) -> list:
    """A task's calibration (an array, or a dict of arrays for keyword inputs) in batches."""
    n = len(jax.tree.leaves(inputs)[0])
    return [jax.tree.map(lambda a, i=i: a[i : i + batch], inputs) for i in range(0, n, batch)]


def merge_end_to_end(module, base, tuned, calib, *, batch: int):
    """jaxmerge's own merge: ``jaxmerge.merge``, parallel, full basis, ``α = 1``, every supported
    layer solved (biases, norms and embeddings included: a superset of RegMean's work)."""
    merged, _ = jm.merge(
        module,
        base,
        tuned,
        [batches_of(c, batch) for c in calib],
        basis="full",
        alpha=1.0,
        mask_key=None,
        progress=False,
    )
    return jax.block_until_ready(merged)


def merge_breakdown(module, base, tuned, calib, *, batch: int) -> dict:
    """Where :func:`merge_end_to_end`'s time goes (warm): the forward passes alone, the
    statistics of the layers it solves (``collect_stats``: forward passes and Gram matrices;
    layers no fine-tune changed are neither collected nor solved), and the solves
    (``solve_stats``), those split by layer kind and solver status."""
    batches = [batches_of(c, batch) for c in calib]
    _, report = jm.merge(module, base, tuned, batches, mask_key=None, progress=False)
    solved = [layer.path for layer in report.layers if layer.status != "UNCHANGED"]

    forward = models.forward_fn(module)

    def forward_all():
        pairs = zip(tuned, batches, strict=True)
        return jax.block_until_ready([forward(p, b) for p, bs in pairs for b in bs])

    def collect():
        return jax.block_until_ready(
            jm.collect_stats(module, tuned, batches, paths=solved, mask_key=None, progress=False)
        )

    out = {"layers_solved": len(solved), "layers_unchanged": len(report.layers) - len(solved)}
    out["forward_s"], out["collect_stats_s"] = median_seconds(forward_all, collect, repeats=3)
    stats = collect()
    jm.solve_stats(stats, base, tuned, progress=False)  # compile
    start = time.perf_counter()
    _, report = jm.solve_stats(stats, base, tuned, progress=False)
    out["solve_stats_s"] = time.perf_counter() - start
    by, seen = {}, set()
    for layer in report.layers:  # layers sharing an input are solved (and timed) together
        group = frozenset((layer.path, *layer.shared_input))
        if group not in seen:
            seen.add(group)
            key = f"{layer.kind} {layer.status}"
            by[key] = by.get(key, 0.0) + (layer.seconds or 0.0)
    out["solve_s_by_kind_and_status"] = by
    out["gram_products_s"] = gram_products_seconds(stats, batches)
    return out


def gram_products_seconds(stats, batches) -> float:
    """Wall time of the bare matrix products ``X̃ᵀX̃`` behind the solved Dense groups' Gram
    matrices: for every task and batch, one product per group, of the batch's rows and the
    group's bias-augmented input width, on random data with XLA's matmul (median of three runs).
    No merge that forms these Gram matrices with XLA's matmul spends less on them."""
    widths = [g.stats.gram.shape[-1] for g in stats.values() if g.layers[0].kind == "dense"]
    rows = [
        int(np.prod(b["input_ids"].shape)) if isinstance(b, dict) else len(b)
        for task in batches
        for b in task
    ]
    key = jax.random.PRNGKey(0)
    inputs = {r: [jax.random.normal(key, (r, w)) for w in widths] for r in set(rows)}
    products = jax.jit(lambda xs: [x.T @ x for x in xs])
    return median_seconds(
        lambda: jax.block_until_ready([products(inputs[r]) for r in rows]), repeats=3
    )[0]


def regmean_merge(module, base, tuned, calib, *, batch: int):
    """FusionBench's RegMean problem (``α = 1``) solved from jaxmerge's statistics.

    RegMean solves the Dense kernels only, ``W = (Σₖ Gₖ)⁻¹ Σₖ GₖWₖ`` with ``Gₖ`` task ``k``'s
    token-averaged input Gram matrix, and averages every other parameter. The statistics are
    :func:`jaxmerge.collect_stats` of each task on its own (giving each ``Gₖ``, the input block
    of its bias-augmented Gram matrix); :func:`jaxmerge.solve_layer` with the full basis on
    kernel-only layers solves each group of Dense layers sharing an input (query/key/value).

    Returns the merged parameters and, per Dense path, the summed Gram matrix ``Σₖ G̃ₖ``.
    """
    paths = dense_paths(base)
    per_task = [
        jm.collect_stats(
            module, [p], [batches_of(c, batch)], paths=paths, mask_key=None, progress=False
        )
        for p, c in zip(tuned, calib, strict=True)
    ]
    merged = jax.tree.map(lambda *a: sum(a) / len(tuned), *tuned)
    gram = {}
    for key, group in per_task[0].items():
        members = [spec.path for spec in group.layers]

        def kernel(params, members=members):
            return jnp.concatenate([get_path(params, q)["kernel"] for q in members], axis=1)

        grams = [t[key].stats.gram for t in per_task]
        kernels = [kernel(p) for p in tuned]
        # targets X Wₖ (no bias): P = Σₖ X̃ₖᵀ X Wₖ / Nₖ, the kernel columns of each Gram matrix
        cross = [g[:, :-1] @ w for g, w in zip(grams, kernels, strict=True)]
        stats = jm.LayerStats(
            gram=sum(grams),
            cross=sum(cross),
            out_sq=sum(jnp.sum(w * c[:-1], axis=0) for w, c in zip(kernels, cross, strict=True)),
            task_diag=jnp.stack([jnp.diagonal(g) for g in grams]),
            count=jnp.stack([t[key].stats.count[0] for t in per_task]),
        )
        sol = jm.solve_layer(stats, kernel(base), kernels, basis="full")
        gram.update({q: stats.gram for q in members})
        start = 0
        for q in members:
            width = get_path(base, q)["kernel"].shape[1]
            get_path(merged, q)["kernel"] = sol.kernel[:, start : start + width]
            start += width
    return jax.block_until_ready(merged), gram


def determined(gram) -> tuple[np.ndarray, int]:
    """Which inputs of a Gram matrix ``Σₖ G̃ₖ`` carry calibration energy (a positive diagonal;
    kernel rows of the others are not determined by the data), and its numerical rank over them.
    """
    gram = np.asarray(gram)[:-1, :-1]
    alive = np.diagonal(gram) > 0
    eig = np.linalg.eigvalsh(gram[alive][:, alive])
    return alive, int(np.sum(eig > len(eig) * np.finfo(eig.dtype).eps * eig.max()))


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


def versus_fusionbench(name, module, base, tuned, calib, export_extra, *, batch, quick: bool):
    """Time jaxmerge and FusionBench's RegMean on the same models and calibration inputs.

    ``jaxmerge_s`` is :func:`merge_end_to_end` (the library's merge; ``ratio`` divides it by
    FusionBench's time), ``jaxmerge_regmean_s`` :func:`regmean_merge` (FusionBench's own problem,
    ``ratio_regmean``), each the median of :data:`REPEATS_END_TO_END` runs after one that
    compiles (FusionBench's too is the median of as many runs). The merged kernels of
    the same problem are compared in float32 and in float64 (both tools rerun in float64): there
    the difference measures the algorithms rather than float32 rounding in ill-conditioned Gram
    matrices. ``floor_s`` is the least any RegMean merge of the layers jaxmerge solves costs
    here with XLA's matmul (the faster tool's forward passes plus :func:`gram_products_seconds`),
    ``floor_ratio`` that over FusionBench's time. ``quick``: one run each (compilation
    included), no float64 comparison and no breakdown.
    """
    if not FB_PYTHON.exists():
        return {
            "status": "unavailable",
            "reason": f"no FusionBench environment at {FB_PYTHON.parent.parent}; run "
            "bash benchmarks/fusionbench/setup.sh",
        }
    times = {}
    for label, fn in (("merge", merge_end_to_end), ("regmean", regmean_merge)):
        seconds = []
        for _ in range(1 if quick else 1 + REPEATS_END_TO_END):
            start = time.perf_counter()
            out = fn(module, base, tuned, calib, batch=batch)
            seconds.append(time.perf_counter() - start)
        times[label] = float(np.median(seconds[1:] or seconds))
    merged, _ = out
    export = {
        "num_models": len(tuned),
        "batch": batch,
        "alpha": 1.0,
        "dtype": "float32",
        "repeats": 1 if quick else REPEATS_END_TO_END,
        **export_extra,
        **{f"base/{k}": v for k, v in torch_state(base).items()},
    }
    for k, params in enumerate(tuned):
        export.update({f"model{k}/{n}": v for n, v in torch_state(params).items()})
    fb = run_fusionbench(export)
    paths = dense_paths(base)
    rel, where = compare_kernels(merged, fb, paths)
    float64 = {}
    if not quick:
        fb64 = run_fusionbench({**export, "dtype": "float64", "repeats": 1})
        with jax.enable_x64(True):
            merged64, grams = regmean_merge(
                module, _f64(base), [_f64(p) for p in tuned], [_f64(c) for c in calib], batch=batch
            )
        info = {p: determined(g) for p, g in grams.items()}
        live = {p: alive for p, (alive, _) in info.items()}
        deficient = {
            p: {"rank": rank, "live_inputs": int(alive.sum())}
            for p, (alive, rank) in info.items()
            if rank < alive.sum()
        }
        posed = [p for p in paths if p not in deficient]
        rel64, where64 = compare_kernels(merged64, fb64, posed, live)
        float64 = {
            # Inputs with no calibration energy (dead ReLU units, blank pixels) leave their kernel
            # rows undetermined: jaxmerge keeps the fallback's rows (minimum-norm update),
            # FusionBench's pseudo-inverse zeroes them. And a layer fed fewer independent rows
            # than inputs (BERT's pooler sees one token per sequence) has a singular Gram matrix
            # and no unique RegMean solution; an explicit inverse does not detect it. The
            # headline compares the rows the data determines, on the layers where they are.
            "max_rel_diff": rel64,
            "max_rel_diff_layer": where64,
            "max_rel_diff_all_rows_all_layers": compare_kernels(merged64, fb64, paths)[0],
            "undetermined_rows": {p: int((~v).sum()) for p, v in live.items() if (~v).any()},
            "rank_deficient_layers": deficient,
            "rel_diff_per_layer": per_layer_diff(merged64, fb64, paths),
        }
    fb_s, fb_forward = float(fb["seconds"]), float(fb["forward_seconds"])
    breakdown = {} if quick else merge_breakdown(module, base, tuned, calib, batch=batch)
    floor = {}
    if breakdown:
        # The least any RegMean merge of these layers costs here with XLA's matmul: the forward
        # passes (the faster tool's) plus the bare Gram products; no solve, no overhead.
        floor_s = min(breakdown["forward_s"], fb_forward) + breakdown["gram_products_s"]
        floor = {"floor_s": floor_s, "floor_ratio": floor_s / fb_s}
    return {
        "model": name,
        "num_models": len(tuned),
        "calibration_rows_per_model": [len(jax.tree.leaves(c)[0]) for c in calib],
        "calibration_tokens_per_model": [int(np.prod(jax.tree.leaves(c)[0].shape)) for c in calib]
        if isinstance(calib[0], dict)
        else None,
        "dense_layers": len(paths),
        "jaxmerge_s": times["merge"],
        "jaxmerge_regmean_s": times["regmean"],
        "fusionbench_s": fb_s,
        "fusionbench_forward_s": fb_forward,
        "ratio": times["merge"] / fb_s,
        "ratio_regmean": times["regmean"] / fb_s,
        **floor,
        "jaxmerge_breakdown": breakdown,
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


def mlp_problem(quick: bool, seed: int) -> dict:
    """The image suite's four fine-tuned MLP trunks and their calibration rows."""
    base, tuned, tasks, _ = finetune.image_models("mlp", seed=seed, quick=quick)
    rows = 256 if quick else 2048
    calib = [
        jnp.asarray(np.concatenate([t.calib[0], t.heldout[0], t.train[0]])[:rows].reshape(-1, 784))
        for t in tasks
    ]
    export = {"kind": "mlp", "config": json.dumps({"n_in": 784, "width": 256})}
    export.update({f"calib{k}/x": np.asarray(x) for k, x in enumerate(calib)})
    trunks = [p["trunk"] for p in tuned]
    return dict(module=models.MLP(), base=base["trunk"], tuned=trunks, calib=calib,
                export=export, batch=256)  # fmt: skip


def minilm_problem(quick: bool, seed: int) -> dict:
    """MiniLM-L6 fine-tuned on the four text tasks, and the tasks' calibration tokens.

    The models are the whole MiniLM-L6 (embeddings, six blocks, pooler) with its top two blocks
    replaced by those the accuracy benchmark's text suite fine-tuned (``finetune.text_models``:
    cached, or trained on first use); the bottom blocks and the pooler are the base's in every
    model. The calibration tokens are each text task's calibration texts, packed into unpadded
    sequences. ``quick`` keeps the first block only and gives the models seeded Gaussian task
    vectors (1% of each tensor's standard deviation) instead of fine-tuning: the pipeline, not the
    figures. Raises ``data.DataUnavailable`` without the model or the texts.
    """
    module, base = models.load_minilm()
    tok = models.tokenizer()
    texts = [data.text_task(n, seed=seed).calib[0] for n in data.TEXT_TASKS]
    length, num_seqs = (32, 8) if quick else (128, 32)
    config = json.loads((models.minilm_dir() / "config.json").read_text())
    if quick:
        config["num_hidden_layers"] = 1
        module = type(module)(dataclasses.replace(module.config, num_hidden_layers=1))
        base = {**base, "encoder": {"layer": {"0": base["encoder"]["layer"]["0"]}}}
        tuned = [_perturbed(base, k) for k in jax.random.split(jax.random.PRNGKey(seed), 4)]
        origin = "seeded Gaussian task vectors (quick)"
    else:
        _, _, finetuned, _ = finetune.text_models(seed=seed, quick=False)
        layers = base["encoder"]["layer"]
        tuned = [{**base, "encoder": {"layer": {**layers, **f["trunk"]}}} for f in finetuned]
        origin = f"text-suite fine-tunes of blocks {sorted(finetuned[0]['trunk'])}"
    calib = []
    for t in texts:
        ids, mask = models.packed_tokens(t, tok, length=length, num_seqs=num_seqs)
        calib.append({"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)})
    export = {"kind": "bert", "config": json.dumps(config)}
    for k, c in enumerate(calib):
        export.update({f"calib{k}/{name}": np.asarray(a) for name, a in c.items()})
    return dict(module=module, base=base, tuned=tuned, calib=calib, export=export, batch=8,
                models=origin)  # fmt: skip


def smollm2_problem(quick: bool, seed: int) -> dict:
    """The real SmolLM2-135M-Instruct (``models.load_smollm2``) and four experts whose every
    parameter is perturbed by 1% of its tensor's standard deviation (seeded), so that every
    block differs and every layer is solved: a merge at language-model scale, not a fine-tune.
    Each expert's calibration is one text task's calibration texts, tokenized and packed into
    unpadded 8 × 128 token sequences. ``quick``: the bottom block only, 2 × 32 tokens. Raises
    ``data.DataUnavailable`` without the texts.
    """
    from flax import nnx

    from jaxmerge.models import LlamaForCausalLM

    model, tok = models.load_smollm2()
    if quick:
        config = dataclasses.replace(model.config, num_hidden_layers=1)
        small = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        full["model"]["layers"] = {0: full["model"]["layers"][0]}
        small_state = nnx.state(small, nnx.Param)
        nnx.replace_by_pure_dict(small_state, full)
        nnx.update(small, small_state)
        model = small
    base = models.state_to_dict(nnx.state(model, nnx.Param))
    tuned = [_perturbed(base, k) for k in jax.random.split(jax.random.PRNGKey(seed), 4)]
    num_seqs, length = (2, 32) if quick else (8, 128)
    calib = []
    for name in data.TEXT_TASKS:
        texts = data.text_task(name, seed=seed).calib[0]
        ids = np.concatenate([e.ids for e in tok.encode_batch(texts)])[: num_seqs * length]
        ids = ids.reshape(num_seqs, length).astype(np.int32)
        calib.append({"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids)})
    export = {"kind": "llama", "config": json.dumps(model.config.to_dict())}
    for k, c in enumerate(calib):
        export.update({f"calib{k}/{name}": np.asarray(a) for name, a in c.items()})
    return dict(module=model, base=base, tuned=tuned, calib=calib, export=export, batch=4,
                models="SmolLM2-135M-Instruct, four experts: every tensor + 1% of its std "
                "as seeded Gaussian noise")  # fmt: skip


PROBLEMS = {"mlp": mlp_problem, "minilm": minilm_problem, "smollm2": smollm2_problem}
LLM_PROBLEMS = ("smollm2",)  # run by ``--llm`` only


def first_call_seconds(name: str, quick: bool, seed: int, cache: str | None = None) -> float:
    """:func:`merge_end_to_end`'s first call in a new Python process: what a one-off merge
    (a script, the CLI) pays, XLA compilation included. The child builds the problem untimed,
    then times one merge. ``cache``: JAX's persistent compilation cache directory, keeping every
    program (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0``); ``None``: no persistent cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    argv = [sys.executable, __file__, "--first-call", name, "--seed", str(seed)]
    out = subprocess.run(argv + (["--quick"] if quick else []), env=env, capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"first-call child for {name} failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def first_calls(name: str, quick: bool, seed: int) -> dict:
    """The first merge in a new process without a persistent compilation cache, and (not
    ``quick``) in a second new process whose cache a first one filled."""
    out = {"jaxmerge_first_call_new_process_s": first_call_seconds(name, quick, seed)}
    if not quick:
        with tempfile.TemporaryDirectory() as cache:
            first_call_seconds(name, quick, seed, cache)
            out["jaxmerge_first_call_cached_compilation_s"] = first_call_seconds(
                name, quick, seed, cache
            )
    return out


def _first_call_child(name: str, quick: bool, seed: int) -> None:
    problem = PROBLEMS[name](quick, seed)
    start = time.perf_counter()
    merge_end_to_end(problem["module"], problem["base"], problem["tuned"], problem["calib"],
                     batch=problem["batch"])  # fmt: skip
    print(json.dumps({"seconds": time.perf_counter() - start}))


def fusionbench_comparison(name: str, quick: bool, seed: int) -> dict:
    """RegMean on :data:`PROBLEMS` ``name``, jaxmerge vs FusionBench (:func:`versus_fusionbench`),
    and jaxmerge's first call in a new process (:func:`first_calls`)."""
    try:
        problem = PROBLEMS[name](quick, seed)
    except data.DataUnavailable as e:
        return {"status": "unavailable", "reason": str(e)}
    result = versus_fusionbench(name, problem["module"], problem["base"], problem["tuned"],
                                problem["calib"], problem["export"], batch=problem["batch"],
                                quick=quick)  # fmt: skip
    if result.get("status") != "unavailable":
        result.update(first_calls(name, quick, seed))
    if "models" in problem:
        result["models"] = problem["models"]
    return result


def _perturbed(params, key):
    leaves, treedef = jax.tree.flatten(params)
    noisy = [
        leaf + 0.01 * jnp.std(leaf) * jax.random.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, jax.random.split(key, len(leaves)), strict=True)
    ]
    return jax.tree.unflatten(treedef, noisy)


# ---- mergekit: TIES and DARE on the same checkpoints ---------------------------------------------

MK_RUNNER = HERE / "fusionbench" / "run_mergekit.py"
MERGEKIT = {"ties": 0.2, "dare_linear": 0.5}  # method: density (DARE keeps half, drop_rate 0.5)


def _mergekit_missing() -> str | None:
    if not FB_PYTHON.exists():
        return f"no FusionBench environment at {FB_PYTHON.parent.parent}"
    probe = subprocess.run([str(FB_PYTHON), "-c", "import mergekit"], capture_output=True)
    return "mergekit is not installed there" if probe.returncode else None


def _hf_tensors(path: pathlib.Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def _masks_as_params(path: pathlib.Path, base: dict, k: int) -> dict:
    """Model ``k``'s keep masks recorded by ``run_mergekit.py``, as a parameter tree like
    ``base`` (Hugging Face ``(out, in)`` weights transposed back to kernels)."""
    with np.load(path) as f:

        def mask(path, leaf):
            *module, name = path.split("/")
            key = f"{k}/{'.'.join(module)}.weight"
            bits = np.unpackbits(f[key])[: int(np.prod(f[f"shape/{key}"]))]
            m = bits.reshape(f[f"shape/{key}"]).astype(bool)
            return m.T if name == "kernel" else m

        flat = traverse.flatten_dict(base, sep="/")
        return traverse.unflatten_dict({p: mask(p, v) for p, v in flat.items()}, sep="/")


def _max_rel_diff(ours: dict, theirs: dict) -> dict:
    """The largest ``max|a − b| / max|b|`` over the tensors both checkpoints hold, where, how
    many tensors were compared, and how many entries of them differ by more than ``1e-6 ·
    max|b|`` (float32 rounding is far below)."""
    common = sorted(set(ours) & set(theirs))
    diffs, differing = {}, 0
    for n in common:
        gap, top = np.abs(ours[n] - theirs[n]), np.max(np.abs(theirs[n]))
        diffs[n] = float(np.max(gap) / top)
        differing += int(np.sum(gap > 1e-6 * top))
    where = max(diffs, key=diffs.get)
    return {"max_rel_diff": diffs[where], "max_rel_diff_tensor": where,
            "tensors_compared": len(common), "entries_differing": differing,
            "entries_compared": int(sum(theirs[n].size for n in common))}  # fmt: skip


def _ties_tie_breaks(dirs, density: float, ours: dict, theirs: dict) -> dict:
    """Of the entries where the two TIES merges differ, how many are ties that the two tools
    break differently: ``at_zero_sign_sum``, where the trimmed task vectors (each model's top
    ``⌊density · n⌋`` by magnitude, per tensor) sum to zero within float32 rounding (at most
    ``8 eps Σ|τ|``: the elected sign is rounding's, the tools adding in different orders, or at
    an exact zero + for mergekit, ``sum ≥ 0``, and none for jaxmerge); and ``at_trim_threshold``,
    where a model's magnitude equals its tensor's threshold (mergekit keeps exactly
    ``⌊density · n⌋`` entries, jaxmerge every entry at or above the threshold)."""
    base = _hf_tensors(dirs[0])
    models_ = [_hf_tensors(d) for d in dirs[1:]]
    counts = {"at_zero_sign_sum": 0, "at_trim_threshold": 0}
    for name in set(ours) & set(theirs):
        gap, top = np.abs(ours[name] - theirs[name]), np.max(np.abs(theirs[name]))
        differ = (gap > 1e-6 * top).ravel()
        if not differ.any():
            continue
        total = np.zeros(differ.shape, np.float32)
        size = np.zeros(differ.shape, np.float32)
        at_threshold = np.zeros(differ.shape, bool)
        for m in models_:
            delta = (m[name] - base[name]).ravel()
            keep = max(1, int(density * delta.size))
            threshold = -np.partition(-np.abs(delta), keep - 1)[keep - 1]
            kept = np.where(np.abs(delta) >= threshold, delta, 0)
            total += kept
            size += np.abs(kept)
            at_threshold |= np.abs(delta) == threshold
        rounding = np.abs(total) <= 8 * np.finfo(np.float32).eps * size
        counts["at_zero_sign_sum"] += int(np.sum(differ & rounding))
        counts["at_trim_threshold"] += int(np.sum(differ & at_threshold & ~rounding))
    return counts


def versus_mergekit(model, base: dict, tuned: list, *, seed: int) -> dict:
    """mergekit's TIES and DARE (``dare_linear``) against jaxmerge's on the same safetensors
    checkpoints of a ``LlamaForCausalLM``.

    Each tool's wall time covers reading the ``K + 1`` checkpoints, the merge and writing the
    merged one. mergekit: ``run_mergekit.py`` (``weight = 1`` per model, ``--random-seed seed``).
    jaxmerge: ``load_llama_safetensors``, ``jaxmerge.ties`` (per-tensor trim, disjoint mean: the
    semantics of mergekit's ``ties``) or ``jaxmerge.dare`` (``rescale="l1"``: mergekit's rule; its
    own masks from ``jax.random.key(seed)``), ``save_llama_safetensors``; one run after one that
    compiles. Weight agreement: every tensor both files hold; for DARE, jaxmerge's DARE on the
    masks mergekit drew (the two tools' random streams differ). TIES differs only where the two
    tools break ties differently: ``entries_differing`` counts the entries that differ,
    ``entries_differing_as_ties`` those of them at a zero sign sum or at a trim threshold
    (:func:`_ties_tie_breaks`; the experts' Gaussian noise is drawn from a float32 grid, so
    equal and exactly opposite values occur).
    """
    from flax import nnx

    missing = _mergekit_missing()
    if missing:
        return {
            "status": "unavailable",
            "reason": missing + "; run bash benchmarks/fusionbench/setup.sh",
        }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        dirs = [tmp / "base", *(tmp / f"model{k}" for k in range(len(tuned)))]
        for d, params in zip(dirs, [base, *tuned], strict=True):
            nnx.update(model, models.dict_to_state(nnx.state(model, nnx.Param), params))
            jm.save_llama_safetensors(model, d)
        nnx.update(model, models.dict_to_state(nnx.state(model, nnx.Param), base))
        for method, density in MERGEKIT.items():
            args = {"method": method, "base": str(dirs[0]), "models": [str(d) for d in dirs[1:]],
                    "density": density, "seed": seed, "out": str(tmp / f"mk_{method}"),
                    "result": str(tmp / f"{method}.json"),
                    "masks": str(tmp / "masks.npz") if "dare" in method else None}  # fmt: skip
            (tmp / "args.json").write_text(json.dumps(args))
            proc = subprocess.run([str(FB_PYTHON), str(MK_RUNNER), str(tmp / "args.json")],
                                  capture_output=True, text=True, timeout=3600)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"mergekit runner failed:\n{proc.stderr[-3000:]}")
            mk = json.loads((tmp / f"{method}.json").read_text())

            def ours(dst, method=method, density=density):
                loaded = [jm.load_llama_safetensors(d) for d in dirs]
                states = [nnx.state(m, nnx.Param) for m in loaded]
                if method == "ties":
                    merged = jm.ties(states[0], states[1:], density=density)
                else:
                    merged = jm.dare(states[0], states[1:], jax.random.key(seed),
                                     drop_rate=1 - density, rescale="l1")  # fmt: skip
                nnx.update(loaded[0], merged)
                jm.save_llama_safetensors(loaded[0], dst, overwrite=True)

            ours(tmp / f"jm_{method}")  # compiles
            start = time.perf_counter()
            ours(tmp / f"jm_{method}")
            jm_s = time.perf_counter() - start
            theirs = _hf_tensors(tmp / f"mk_{method}")
            extra = {}
            if method == "ties":
                same = _hf_tensors(tmp / f"jm_{method}")
                extra["entries_differing_as_ties"] = _ties_tie_breaks(dirs, density, same, theirs)
            else:  # jaxmerge's DARE on mergekit's masks
                masks = [_masks_as_params(tmp / "masks.npz", base, k) for k in range(len(tuned))]
                dirs_ = jm.dare_task_vectors(base, tuned, masks, drop_rate=1 - density,
                                             rescale="l1")  # fmt: skip
                merged = jax.tree.map(lambda b, *d: b + sum(d), base, *dirs_)
                nnx.update(model, models.dict_to_state(nnx.state(model, nnx.Param), merged))
                jm.save_llama_safetensors(model, tmp / "jm_masks")
                same = _hf_tensors(tmp / "jm_masks")
                nnx.update(model, models.dict_to_state(nnx.state(model, nnx.Param), base))
            out[method] = {"density": density, "jaxmerge_s": jm_s, "mergekit_s": mk["seconds"],
                           "ratio": jm_s / mk["seconds"], **_max_rel_diff(same, theirs), **extra,
                           "torch_threads": mk["torch_threads"]}  # fmt: skip
    out["problem"] = (
        "weights 1 per model, float32; jaxmerge.ties (trim='tensor', "
        "aggregate='mean') and jaxmerge.dare (rescale='l1', drop_rate 1 - density)"
    )
    return out


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
        parallel, sequential = median_seconds(
            *(
                lambda a=algorithm, args=args: jax.block_until_ready(
                    jm.merge(*args, algorithm=a, progress=False)[0]
                )
                for algorithm in ("parallel", "sequential")
            ),
            repeats=repeats,
        )
        out[trunk_name] = {
            "parallel_s": parallel,
            "sequential_s": sequential,
            "sequential_over_parallel": sequential / parallel,
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
            + (f" (floor {v['floor_ratio']:.2f})" if "floor_ratio" in v else "")
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
    parser.add_argument("--llm", action="store_true", help="only the language-model comparisons")
    parser.add_argument("--first-call", choices=sorted(PROBLEMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_call:  # the child of first_call_seconds
        _first_call_child(args.first_call, args.quick, args.seed)
        return {"first_call": args.first_call}
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
    name = ("speed_llm" if args.llm else "speed") + ("_quick" if quick else "")
    if args.llm:
        return _write(result, llm_comparisons(quick, args.seed, args.skip_fusionbench), start,
                      args.out / f"{name}.json", plot_to=None)  # fmt: skip
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
        for problem in PROBLEMS:
            if problem not in LLM_PROBLEMS:
                result["fusionbench"][problem] = fusionbench_comparison(problem, quick, args.seed)
                print(f"fusionbench {problem}: {result['fusionbench'][problem]}", flush=True)
    result["sequential_over_parallel"] = sequential_over_parallel(quick, args.seed, repeats)
    print(f"sequential_over_parallel {result['sequential_over_parallel']}", flush=True)
    return _write(result, {}, start, args.out / f"{name}.json", plot_to=plot)


def llm_comparisons(quick: bool, seed: int, skip_fusionbench: bool) -> dict:
    """``--llm``: FusionBench's RegMean on each of :data:`LLM_PROBLEMS` and mergekit's TIES and
    DARE on SmolLM2's checkpoints (:func:`versus_mergekit`)."""
    out = {"fusionbench": {"status": "skipped"} if skip_fusionbench else {}}
    for problem in () if skip_fusionbench else LLM_PROBLEMS:
        out["fusionbench"][problem] = fusionbench_comparison(problem, quick, seed)
        print(f"fusionbench {problem}: {out['fusionbench'][problem]}", flush=True)
    try:
        problem = smollm2_problem(quick, seed)
        out["mergekit"] = {
            "smollm2": versus_mergekit(
                problem["module"], problem["base"], problem["tuned"], seed=seed
            )
        }
    except data.DataUnavailable as e:
        out["mergekit"] = {"smollm2": {"status": "unavailable", "reason": str(e)}}
    print(f"mergekit {out['mergekit']}", flush=True)
    return out


def _write(result: dict, extra: dict, start: float, path: pathlib.Path, *, plot_to) -> dict:
    result.update(extra)
    result["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    if plot_to is not None:
        plot_to(result, path.with_suffix(".png"))
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
