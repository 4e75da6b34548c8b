r"""jaxmerge on the JAX LLM libraries' own models: tiny gemma (Gemma 2- and Gemma 3-style, Flax
linen) and MaxText (Llama-style, Flax NNX, scanned and unscanned, and unscanned with
``logits_via_embedding``: a tied head the decoder computes itself) Transformers, merged layer by
layer and checked against numpy float64 least squares computed independently of jaxmerge.

For every model: random init in float64 (``jax_enable_x64``), ``K = 3`` fine-tunes made by adding
``0.05 · N(0, 1)`` to every parameter (fixed seed), calibration of a few batches of random token
ids per task (each task its own seeds), and ``jaxmerge.merge(..., algorithm=a)`` for
``a ∈ {"parallel", "sequential"}``. Per model and algorithm the results record the parameters
(total, solved, not solved with ``report.unsolved``'s reasons, ``report.fallbacks``), the wall
time of the merge (``time.perf_counter``, including tracing and XLA compilation: every merge call
compiles its own programs) and, for every solved layer, the reference:

* each layer's calls are recorded by the benchmark itself (``benchmarks/ecosystem/eco_gemma.py``:
  ``flax.linen.intercept_methods``; ``eco_maxtext.py``: the layer classes' ``__call__`` wrapped),
  on fine-tune ``k``'s own pass over task ``k``'s calibration (parallel inputs; the targets
  ``Yₖ`` of both algorithms) and on the merged model's pass over each task's calibration
  (sequential inputs: in the sequential algorithm a layer is solved on the partially merged
  model's activations, which at that layer are the merged model's; a tied table, read first by
  its lookups and last by its head, is solved from its lookups alone, the rest of the model on
  that table, and then from both uses, so the merged model is run with the table at its
  lookups-only least squares, ``eco_reference.lookup_table``);
* ``W_ref = argmin Σₖ ‖X̃ₖW − Yₖ‖² / Nₖ`` with ``np.linalg.lstsq`` (``eco_reference.py``: einsum
  layers transposed to ``(rows, contracted) @ (contracted, outputs)`` from their equation; norms
  per channel, on the effective scale, ``1 + scale`` for gemma's RMSNorm);
* relative errors ``max|W_merged − W_ref| / max|W_ref|`` (weights; unique only with a full-rank
  Gram matrix, which the calibration sizes are chosen to give, and each layer's rank and
  condition are recorded) and ``‖X̃(W_merged − W_ref)‖ / ‖X̃W_ref‖`` (predictions), with the same
  figures of the plain mean of the fine-tunes for scale. Goal: every solved error ≤ 1e-5.

The reference reads the rows of an eager run of the model, jaxmerge those of its compiled
programs: two float64 executions, which agree only as far as the model's own float32 arithmetic
lets them (gemma's RoPE angles are float32, MaxText's RMSNorm computes ``x̂`` in float32). Each
model's ``logits_eager_vs_jit`` (max relative difference of its logits run eagerly and under
``jax.jit``) measures that floor; a layer's error is about it times the layer's condition.

With several batches per task the sequential merge makes one pass per layer group; the run
repeats it on the same rows joined into one batch per task (``"sequential, one batch per
task"``), which takes jaxmerge's one-pass path, against the same reference.

EasyDeL is recorded as skipped (not installable here, see ``benchmarks/ecosystem/setup.sh``).

Run with the ecosystem environment (``bash benchmarks/ecosystem/setup.sh`` builds it; run with
another interpreter the script re-executes itself under it)::

    python benchmarks/ecosystem.py [--quick] [--out benchmarks/results/ecosystem.json]
"""

import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".ecosystem-venv"
RESULTS = HERE / "results" / "ecosystem.json"

if pathlib.Path(sys.prefix).resolve() != VENV.resolve():
    python = VENV / "bin" / "python"
    if python.exists():
        os.execv(str(python), [str(python), str(pathlib.Path(__file__).resolve()), *sys.argv[1:]])
    print(
        f"ecosystem.py needs the ecosystem environment {VENV} (Python 3.12 with gemma and\n"
        "maxtext); build it with:\n\n    bash benchmarks/ecosystem/setup.sh\n",
        file=sys.stderr,
    )
    sys.exit(1)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "ecosystem"))

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from eco_common import with_params  # noqa: E402
from eco_reference import embed_figures, layer_figures, lookup_table  # noqa: E402

import jaxmerge as jm  # noqa: E402

K = 3
SCALE = 0.05
TOL = 1e-5
ALGORITHMS = ("parallel", "sequential")
SIZES = {  # batches per task, examples per batch, tokens per example
    False: {"batches": 4, "batch": 4, "length": 16},
    True: {"batches": 1, "batch": 4, "length": 16},  # one batch: the one-pass sequential merge
}
EASYDEL = ("EasyDeL 0.3.0 is not installed: `easydel.modules` imports every model family at "
           "import time and its GLM4V-MoE config touches a transformers class that needs "
           "PyTorch, so `easydel.LlamaForCausalLM` fails without torch; its ejkernel 0.0.78 "
           "also pins jax ~= 0.9.0 (this environment has jax 0.11.1, which maxtext needs). "
           "See benchmarks/ecosystem/setup.sh.")  # fmt: skip


# ---- one model ----------------------------------------------------------------------------------


def perturbed(base, seed: int):
    """``K`` fine-tunes: ``base + 0.05·N(0, 1)`` on every floating-point parameter."""
    rng = np.random.default_rng(seed)

    def one(a):
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            return a
        return a + SCALE * rng.standard_normal(np.shape(a))

    return [jax.tree.map(one, base) for _ in range(K)]


def calibration(adapter, sizes: dict, seed: int):
    """Per task ``k``, ``batches`` batches of random token ids in ``[1, vocab)`` (0 is padding
    in gemma), each batch from its own seed ``(seed, k, b)``."""
    return [[adapter.batch(np.random.default_rng([seed, 7, k, b]).integers(
                 1, adapter.vocab, (sizes["batch"], sizes["length"])))
             for b in range(sizes["batches"])] for k in range(K)]  # fmt: skip


def _layer_of(report, weight: str):
    """jaxmerge's LayerReport of the layer holding parameter ``weight`` (its path is the
    parameter's module path, or the parameter's own path for layers sharing a module scope)."""
    best = None
    for layer in report.layers:
        if weight == layer.path or weight.startswith(layer.path + "/"):
            if best is None or len(layer.path) > len(best.path):
                best = layer
    return best


def _merge(adapter, fts, cal, algorithm):
    with warnings.catch_warnings(record=True) as caught, adapter.context():
        warnings.simplefilter("always")
        start = time.perf_counter()
        merged, report = jm.merge(adapter.model, adapter.base, fts, cal, algorithm=algorithm,
                                  call_kwargs=adapter.call_kwargs, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
    kinds = sorted({type(w.message).__name__ for w in caught})
    return merged, report, seconds, kinds


def _verdict(fig: dict) -> dict:
    """A checked layer's verdict: its weights are compared where least squares determines them
    (a full-rank Gram matrix; an embedding's seen rows, its unseen ones against the mean), its
    predictions always."""
    weights = fig["full_rank"] or fig["kind"].startswith("embed")
    unseen = fig.get("undetermined_rows_minus_mean")
    ok = (fig["prediction_rel_err"] <= TOL and (not weights or fig["weight_rel_err"] <= TOL)
          and (unseen is None or unseen <= TOL))  # fmt: skip
    return {"weights_compared": weights, "within_tolerance": bool(ok)}


def _figures(layer, inputs, targets, merged_flat, ft_flat) -> dict:
    fts = [layer.matrix(f) for f in ft_flat]
    if layer.kind == "embed":
        return embed_figures(inputs, targets, layer.matrix(merged_flat), fts, layer.scale)
    return layer_figures(inputs, targets, layer.matrix(merged_flat), fts)


def _sequential_rows(adapter, merged, own, ft_flat, cal) -> list:
    """Each task's calls on the merged model's pass, a tied table at its lookups-only least
    squares (the table the sequential algorithm runs the model with until the table's head,
    its last use, is solved on that pass; see the module docs)."""
    tied = {layer.weight: lookup_table([o[key].calls for o in own], layer.scale,
                                       [layer.matrix(f) for f in ft_flat])
            for key, layer in own[0].items()
            if layer.kind == "embed" and any(c.kind == "head" for c in layer.calls)}  # fmt: skip
    tree = with_params(merged, tied) if tied else merged
    return [adapter.record(tree, batches) for batches in cal]


def evaluate(adapter, algorithm, merged, report, own, ft_flat, cal, same_as=None) -> dict:
    """The figures of one merge (see the module docs). ``same_as``: ``(model, flat)``, another
    model's merge in this one's layout, which the parameters not recorded here must equal (to
    ``TOL``, relative to each parameter's largest entry)."""
    flat_merged = adapter.flat(merged)
    floats = [p for p, a in flat_merged.items() if np.issubdtype(np.asarray(a).dtype, np.floating)]
    solved = sorted(p for p in floats if p not in report.fallbacks)
    sequential = algorithm == "sequential"
    rows = _sequential_rows(adapter, merged, own, ft_flat, cal) if sequential else own
    layers, covered = [], set()
    for key, layer in own[0].items():
        if not all(p in solved for p in layer.params):
            continue
        covered.update(layer.params)
        inputs = [rec[key].calls if key in rec else None for rec in rows]
        if any(i is None for i in inputs):
            layers.append(
                {
                    "layer": key,
                    "params": layer.params,
                    "within_tolerance": False,
                    "error": "no recorded input on the merged model's pass",
                }
            )
            continue
        targets = [o[key].calls for o in own]
        fig = _figures(layer, inputs, targets, flat_merged, ft_flat)
        lr = _layer_of(report, layer.weight)
        fig = {
            "layer": lr.path if lr else None,
            "params": layer.params,
            **fig,
            "jaxmerge": None
            if lr is None
            else {"kind": lr.kind, "status": lr.status, "condition": lr.condition, "rho": lr.rho},
        }
        fig.update(_verdict(fig))
        layers.append(fig)
    missing = [p for p in solved if p not in covered]
    same = None
    if same_as is not None:
        other, want = same_as
        diffs = {p: float(np.max(np.abs(np.asarray(flat_merged[p]) - np.asarray(want[p])))
                          / np.max(np.abs(np.asarray(want[p])))) for p in missing}  # fmt: skip
        same = {"model": other, "parameters": len(diffs),
                "max_rel_err": max(diffs.values(), default=None),
                "worst": max(diffs, key=diffs.get, default=None)}  # fmt: skip
        missing = [p for p in missing if diffs[p] > TOL]
    good = [x for x in layers if "error" not in x]
    compared = [x for x in good if x["weights_compared"]]

    def worst(key, items):
        return max((x[key] for x in items), default=None)

    ok = bool(good) and not missing and all(x["within_tolerance"] for x in layers)
    return {
        "parameters_total": len(floats),
        "parameters_solved": len(solved),
        "solved": solved,
        "parameters_unsolved": len(report.unsolved),
        "unsolved": dict(report.unsolved),
        "fallbacks": dict(report.fallbacks),
        "layers_reported": len(report.layers),
        "rho": report.rho,
        "jaxmerge_seconds": report.seconds,
        "layers_checked": len(good),
        "layers_full_rank": sum(x["full_rank"] for x in good),
        "layers_within_tolerance": sum(x["within_tolerance"] for x in layers),
        "layers_off": [x["layer"] for x in layers if not x["within_tolerance"]],
        "solved_without_reference": missing,
        "unrecorded_against_other_merge": same,
        "worst_weight_rel_err": worst("weight_rel_err", compared),
        "worst_prediction_rel_err": worst("prediction_rel_err", good),
        "worst_weight_rel_err_of_layers_within": worst(
            "weight_rel_err", [x for x in compared if x["within_tolerance"]]
        ),
        "worst_rows_self_check": worst("rows_self_check", good),
        "mean_merge_worst_weight_rel_err": worst("mean_weight_rel_err", compared),
        "min_rows_over_n_in": min((x["rows"] / x["n_in"] for x in good), default=None),
        "max_gram_condition": worst("gram_condition", good),
        "checked_within_tolerance": ok,
        "layers": layers,
    }


def run_model(adapter, sizes: dict, seed: int, fts=None, same_as=None):
    """Merge ``adapter``'s model with both algorithms (and, with several batches per task, the
    sequential one again on the same rows as one batch per task) and check every solved layer.

    ``fts``: the fine-tunes (default: :func:`perturbed`); ``same_as``: ``(model, {run: flat
    merge})``, another model's merges in this model's layout for the parameters the recorder
    does not see (:func:`evaluate`). Returns the entry and ``{run: flat merge}``."""
    entry = {"model": adapter.name, "status": "ok", **adapter.describe(), "notes": adapter.notes}
    flat_base = adapter.flat(adapter.base)
    entry["parameters"] = {
        "arrays": len(flat_base),
        "scalars": int(sum(np.size(a) for a in flat_base.values())),
    }
    fts = perturbed(adapter.base, seed) if fts is None else fts
    cal = calibration(adapter, sizes, seed)
    start = time.perf_counter()
    own = [adapter.record(ft, batches) for ft, batches in zip(fts, cal, strict=True)]
    entry["record_seconds"] = time.perf_counter() - start
    ft_flat = [adapter.flat(ft) for ft in fts]
    try:  # how far two float64 executions of the model itself agree (see the module docs)
        eager, compiled = (adapter.logits(fts[0], cal[0][0], jit=j) for j in (False, True))
        entry["logits_eager_vs_jit"] = float(np.max(np.abs(eager - compiled))
                                             / np.max(np.abs(eager)))  # fmt: skip
    except Exception as error:
        entry["logits_eager_vs_jit"] = {"error": _error(error)}
    runs = [(a, a, cal) for a in ALGORITHMS]
    if len(cal[0]) > 1:
        # the same rows as one batch per task: the sequential merge's one-pass path
        joined = [[jax.tree.map(lambda *a: jnp.concatenate(a), *batches)] for batches in cal]
        runs.append(("sequential, one batch per task", "sequential", joined))
    entry["algorithms"], merges = {}, {}
    for name, algorithm, data in runs:
        try:
            merged, report, seconds, caught = _merge(adapter, fts, data, algorithm)
        except Exception as error:  # recorded, not hidden
            entry["algorithms"][name] = {"status": "failed", "error": _error(error)}
            entry["status"] = "failed"
            print(f"  {name}: FAILED {_error(error)['message'][:300]}", flush=True)
            continue
        merges[name] = adapter.flat(merged)
        other = None if same_as is None else (same_as[0], same_as[1][name])
        figures = evaluate(adapter, algorithm, merged, report, own, ft_flat, data, other)
        entry["algorithms"][name] = {"status": "ok", "algorithm": algorithm,
                                     "batches_per_task": len(data[0]), "merge_seconds": seconds,
                                     "warnings": caught, **figures}  # fmt: skip
        print(f"  {name}: {figures['parameters_solved']}/{figures['parameters_total']} "
              f"solved, worst weight err {_num(figures['worst_weight_rel_err'])}, worst "
              f"prediction err {_num(figures['worst_prediction_rel_err'])}, "
              f"{seconds:.1f} s", flush=True)  # fmt: skip
    return entry, merges


def _error(error: BaseException) -> dict:
    frames = traceback.extract_tb(error.__traceback__)
    return {"type": type(error).__name__, "message": str(error),
            "raised_at": [f"{f.filename}:{f.lineno}" for f in frames[-3:]]}  # fmt: skip


def _short(reason: str) -> str:
    """A reason without the layer's name and settings (the same for every layer)."""
    return "... was " + reason.split(" was ", 1)[1] if " was " in reason else reason


def _num(v) -> str:
    return "-" if v is None else f"{v:.2e}"


# ---- the models ---------------------------------------------------------------------------------


def gemma_entries(sizes, seed):
    from eco_gemma import GemmaModel

    for style in ("gemma2", "gemma3"):
        print(f"{style}:", flush=True)
        try:
            adapter = GemmaModel(style, seed)
        except Exception as error:
            yield {"model": f"{style}-tiny", "status": "failed", "stage": "build",
                   "error": _error(error)}  # fmt: skip
            continue
        yield run_model(adapter, sizes, seed)[0]


def maxtext_entries(sizes, seed):
    try:
        from eco_maxtext import MaxTextModel
    except Exception as error:
        yield {"model": "maxtext-llama2-tiny", "status": "failed", "stage": "import",
               "error": _error(error)}  # fmt: skip
        return
    unscanned = None
    for scan in (False, True):
        name = "scanned" if scan else "unscanned"
        print(f"maxtext llama2 ({name}):", flush=True)
        try:
            adapter = MaxTextModel(scan=scan, seed=seed)
        except Exception as error:
            yield {"model": f"maxtext-llama2-tiny-{name}", "status": "failed", "stage": "build",
                   "error": _error(error)}  # fmt: skip
            continue
        if not scan:
            fts = perturbed(adapter.base, seed)
            entry, merges = run_model(adapter, sizes, seed, fts)
            unscanned = (adapter, fts, merges)
            yield entry
            continue
        if unscanned is None:
            yield run_model(adapter, sizes, seed)[0]
            continue
        # the unscanned model's parameters stacked: the same merge, checked against it
        other, fts, merges = unscanned
        adapter.base = with_params(adapter.base, adapter.stacked(other.flat(other.base)))
        adapter.notes.append(
            "base and fine-tunes: the unscanned model's, stacked on the scan axis; the "
            "parameters inside nnx.scan (not recorded) are compared with the unscanned merge"
        )
        fts = [with_params(adapter.base, adapter.stacked(other.flat(f))) for f in fts]
        stacked = {run: adapter.stacked(flat) for run, flat in merges.items()}
        yield run_model(adapter, sizes, seed, fts, (other.name, stacked))[0]
    print("maxtext llama2 (unscanned, logits_via_embedding):", flush=True)
    try:
        adapter = MaxTextModel(scan=False, seed=seed, tied=True)
    except Exception as error:
        yield {"model": "maxtext-llama2-tiny-unscanned-tied", "status": "failed",
               "stage": "build", "error": _error(error)}  # fmt: skip
        return
    yield run_model(adapter, sizes, seed)[0]


# ---- results ------------------------------------------------------------------------------------


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "jaxmerge").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "jaxmerge_uncommitted": dirty}


def environment() -> dict:
    v = importlib.metadata.version
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "devices": [str(d) for d in jax.devices()],
        "versions": {p: v(p) for p in ("jax", "jaxlib", "flax", "numpy", "gemma", "maxtext")},
        "repository": _git(),
    }


def findings(models: list[dict]) -> list[str]:
    """What the run shows about jaxmerge, worded from the results."""
    out, off = [], {}
    for m in models:
        for algorithm, a in m.get("algorithms", {}).items():
            if a.get("status") != "ok":
                out.append(f"{m['model']} {algorithm}: merge failed: "
                           f"{a['error']['message'][:240]}")  # fmt: skip
                continue
            if a["unsolved"]:
                path, reason = next(iter(a["unsolved"].items()))
                out.append(f"{m['model']} {algorithm}: {len(a['unsolved'])} parameters not "
                           f"solved, e.g. {path}: {_short(reason)}")  # fmt: skip
            if a["solved_without_reference"]:
                out.append(
                    f"{m['model']} {algorithm}: solved parameters the benchmark could "
                    f"not check: {a['solved_without_reference']}"
                )
            for x in a["layers"]:
                if x["within_tolerance"]:
                    continue
                if "error" in x:
                    out.append(f"{m['model']} {algorithm}: layer {x['layer']}: {x['error']}")
                    continue
                off.setdefault((m["model"], x["layer"]), []).append((algorithm, x))
    for (model, layer), cases in off.items():
        x = cases[0][1]
        text = (
            f"{model}, {' and '.join(repr(a) for a, _ in cases)}: layer {layer} ({x['kind']}) "
            f"is off the float64 least-squares reference: weight error "
            f"{x['weight_rel_err']:.2e}, prediction error {x['prediction_rel_err']:.2e} (the "
            f"plain mean of the fine-tunes: {x['mean_weight_rel_err']:.2e} / "
            f"{x['mean_prediction_rel_err']:.2e})"
        )
        out.append(text)
    return out


def summary(result: dict) -> str:
    head = (
        "model",
        "algorithm",
        "solved",
        "worst W err",
        "worst pred err",
        "W err, ok layers",
        "mean W err",
        "rows/n_in",
        "max cond",
        "merge s",
        "layers ok",
    )
    rows = []
    for m in result["models"]:
        if m["status"] == "skipped" or "algorithms" not in m:
            rows.append((m["model"], "-", m["status"], "", "", "", "", "", "", "", ""))
            continue
        for algorithm, a in m["algorithms"].items():
            if a["status"] != "ok":
                rows.append((m["model"], algorithm, "failed", "", "", "", "", "", "", "", "no"))
                continue
            rows.append((m["model"], algorithm,
                         f"{a['parameters_solved']}/{a['parameters_total']}",
                         _num(a["worst_weight_rel_err"]), _num(a["worst_prediction_rel_err"]),
                         _num(a["worst_weight_rel_err_of_layers_within"]),
                         _num(a["mean_merge_worst_weight_rel_err"]),
                         "-" if a["min_rows_over_n_in"] is None
                         else f"{a['min_rows_over_n_in']:.1f}",
                         _num(a["max_gram_condition"]), f"{a['merge_seconds']:.1f}",
                         f"{a['layers_within_tolerance']}/{len(a['layers'])}"))  # fmt: skip
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        "errors: relative to numpy float64 least squares on the recorded inputs "
        f"(tolerance {TOL:g}) over the solved layers ('layers ok': checked layers within "
        "it; 'W err, ok layers': the worst weight error among those); 'mean W err' is "
        "the plain mean of the fine-tunes' error, for scale; "
        "merge s includes tracing and compilation"
    )
    for m in result["models"]:
        if m["status"] == "skipped":
            lines.append(f"{m['model']}: skipped: {m['reason']}")
        for a in m.get("algorithms", {}).values():
            if a.get("unsolved") and a is next(iter(m["algorithms"].values())):
                reasons = sorted({_short(r) for r in a["unsolved"].values()})
                lines.append(
                    f"{m['model']}: not solved: {len(a['unsolved'])} parameters ("
                    + ", ".join(sorted(a["unsolved"])[:3])
                    + ", ...): "
                    + " | ".join(reasons)
                )
        runs = m.get("algorithms", {}).items()
        same = {name: a["unrecorded_against_other_merge"] for name, a in runs
                if a.get("unrecorded_against_other_merge")}  # fmt: skip
        if same:
            first = next(iter(same.values()))
            lines.append(
                f"{m['model']}: the {first['parameters']} parameters the recorder does not see "
                f"(inside nnx.scan), against the {first['model']} merge: max relative "
                "difference " + ", ".join(f"{_num(x['max_rel_err'])} ({name})"
                                          for name, x in same.items())
            )  # fmt: skip
    if result["findings"]:
        lines.append("")
        lines.append("findings:")
        lines.extend(f"- {f}" for f in result["findings"])
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller calibration (~2 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results file")
    args = parser.parse_args(argv)
    sizes = SIZES[args.quick]
    start = time.perf_counter()
    env = environment()  # the code the run imports: the repository as it starts
    models = []
    for entries in (gemma_entries, maxtext_entries):
        for entry in entries(sizes, args.seed):
            models.append(entry)
    models.append({"model": "easydel", "status": "skipped", "reason": EASYDEL})
    result = {
        "benchmark": "jaxmerge.merge on gemma and MaxText models, every solved layer against "
        "numpy float64 least squares on its recorded inputs",
        "command": "python benchmarks/ecosystem.py"
        + (" --quick" if args.quick else "")
        + ("" if args.seed == 0 else f" --seed {args.seed}"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seed": args.seed,
        "setup": {
            "finetunes": K,
            "perturbation": f"{SCALE} * N(0, 1) on every parameter",
            "dtype": "float64 (jax_enable_x64)",
            "algorithms": list(ALGORITHMS),
            "calibration": {
                **sizes,
                "tokens": "uniform random ids in [1, vocab)",
                "rows_per_task": sizes["batches"] * sizes["batch"] * sizes["length"],
            },
            "tolerance": TOL,
            "merge_seconds": "time.perf_counter around jaxmerge.merge, including tracing "
            "and XLA compilation",
        },  # fmt: skip
        "environment": env,
        "models": models,
    }
    result["findings"] = findings(models)
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(summary(result))
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
