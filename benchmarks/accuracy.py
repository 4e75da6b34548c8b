"""Accuracy benchmark: ``python benchmarks/accuracy.py --suite images|text|llm [--quick]
[--no-pairs]``.

For every model of the suite (images: the MLP and the CNN trunks; text: MiniLM-L6; llm:
SmolLM2-135M-Instruct), every subset of tasks (all pairs, K = 2, and all tasks together) and
every merging method, the merged trunk is evaluated on each task's test split with that task's
own head. The language suite has no per-task heads: the four text tasks are asked as
instructions (``data.llm_prompt``) and every task reads the model's one tied head at its label
words' first tokens (restricted argmax); the merged trunk is the top four blocks and the final
norm, the rest of the model (the token embedding, so the head, included) stays frozen in
fine-tuning (``finetune.llm_models``). Per method:

* ``per_task``: accuracy of the merged model on each task of the subset;
* ``mean_accuracy``; ``mean_normalized``: the mean of merged / individual fine-tune accuracy;
  ``se_normalized``: its binomial standard error from the test sets' sizes;
  ``mean_normalized_val``: the same on the validation split (optimistic for the methods whose
  hyper-parameter was chosen there); per model, ``spearman_val_vs_test_normalized`` says how well
  the two splits agree on the ranking of the merges;
* ``paired_vs_best_baseline`` (QP methods): the difference from the subset's best baseline on
  the same test examples, with its paired standard error;
* ``rho_calib`` and ``rho_heldout``: the fraction of the fine-tunes' residual output energy the
  merge captures, ``ρ = 1 − Σ L / Σ E₀`` over the trunk's layers, on the calibration split and on
  a held-out calibration split disjoint from it. Every merge (baselines included) is scored the
  same way: the layer inputs are each fine-tuned model's own activations (the parallel
  statistics), and the merge is passed to ``jaxmerge.solve_stats`` as a one-direction custom
  basis with an infinite ridge, which returns it unchanged and reports its energies;
* ``rho_output_heldout``: the same fraction for the trunk's final output, the features the heads
  read, on the held-out split: ``1 − Σₖ mean‖f(θ; xₖ) − f(θₖ; xₖ)‖² / Σₖ mean‖f(θ₀; xₖ) −
  f(θₖ; xₖ)‖²``; ``rho_logits_heldout``: the same with each task's head applied (its logits);
  ``agreement_heldout``: the fraction of those held-out inputs on which the merge predicts the
  fine-tune's class (mean over tasks), which weighs the argmax rather than squared errors;
* ``perplexity_general`` (llm): the merged model's perplexity on general text, news articles'
  bodies packed into 16 × 128 tokens (``data.general_text``): whether the merge keeps the base's
  language ability (for ``individual``, the mean over the subset's fine-tunes);

Methods (hyper-parameters chosen on the validation split where marked):

=======================  =====================================================================
``base``                 the pretrained trunk (each task with its own head)
``individual``           each task's own fine-tune (the normalisation reference)
``soup``                 uniform average of the fine-tuned trunks
``task_arithmetic``      ``θ₀ + λ Σ τₖ``, λ on validation
``ties``                 TIES (density 0.2, per-tensor trim, disjoint mean), λ on validation
``dare``                 DARE (drop rate 0.5) + task arithmetic, λ on validation
``fisher``               Fisher-weighted average (diagonal empirical Fisher on calibration)
``regmean``              RegMean, α on validation (``jaxmerge.merge``, full basis, metric A_α)
``qp_<basis>_<alg>``     output-space projection, basis scalar / diagonal / full / lowrank(r),
                         algorithm parallel / sequential
``qp_full_ridge_ta``     full basis, parallel, with a ridge toward the task-arithmetic merge
                         above, ``(H + λD)c = f + λDc₀``: λ on validation (λ → ∞ would be
                         task arithmetic itself)
``qp_ties``              QP-reweighted TIES: TIES' directions, coefficients per output unit
                         solved by the QP
=======================  =====================================================================

A method whose jaxmerge function is missing is recorded as ``{"status": "unavailable"}``. The
Spearman correlation between held-out ρ and normalised accuracy is taken over every (model,
subset, method) point. The full basis' gain over the diagonal one, per pair of tasks, is set
against how different the two tasks' trunk inputs are: ``1 − cos(G₁, G₂)`` of their uncentred
second-moment matrices (Frobenius inner product); so is the full basis' gain over task
arithmetic (``full_minus_task_arithmetic``), to test whether the least-squares layer loses where
two tasks share their inputs and it must compromise between conflicting outputs on them.

``--quick`` (a smoke test): the MLP only, MiniLM's and SmolLM2's top block only, all tasks
together (no pairs), small data, few training steps, short hyper-parameter grids.
``--no-pairs``: every size as usual, all tasks together only.

Results: ``benchmarks/results/accuracy_<suite>.json`` and ``.png`` (``--quick``:
``accuracy_<suite>_quick.*``); while a run goes, the subsets finished so far are in
``accuracy_<suite>.partial.json``, removed when the results are written.
"""

import argparse
import functools
import itertools
import json
import pathlib
import sys
import time

import finetune
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
from flax import nnx
from scipy.stats import spearmanr

import jaxmerge as jm

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
TIES_LAMBDAS = (0.5, 1.0, 1.5, 2.0)
ALPHAS = (0.1, 0.5, 0.9, 1.0)
RIDGES = (0.3, 1.0, 3.0, 10.0)
LOWRANK = 16


class Suite:
    """One model of a suite: its trunk, base and fine-tuned parameters, tasks and evaluation."""

    def __init__(self, name, trunk, base, tuned, tasks, *, correct, loss, mask_key=None,
                 features_and_logits=None, perplexity=None):  # fmt: skip
        self.name = name
        self.trunk = trunk
        self.base = base
        self.tuned = tuned
        self.tasks = tasks
        self.correct = correct  # (trunk_params, head_params, (x, y)) -> bool per example
        self.loss = loss  # (trunk_params, head_params, batch) -> scalar
        self.mask_key = mask_key  # key of the padding mask in dict inputs
        # (trunk_params, head, x) -> (features, logits); by default a linen trunk and Dense head
        self.features_and_logits = features_and_logits or (
            lambda trunk_params, head, x: models.features_and_logits(
                trunk, {"trunk": trunk_params, "head": head}, x
            )
        )
        self.perplexity = perplexity  # trunk_params -> perplexity on general text, or None
        self.calib_batch = lambda t: t.calib[0]
        self.heldout_batch = lambda t: t.heldout[0]


# ---- scoring -------------------------------------------------------------------------------


def layer_paths(stats) -> list[str]:
    return [spec.path for g in stats.values() for spec in g.layers]


def subtree(tree, path: str):
    """The node of a parameter tree at a ``/``-joined layer path (an NNX state's list indices
    are integers)."""
    for key in path.split("/") if path else ():
        tree = tree[key] if key in tree else tree[int(key)]
    return tree


def score_rho(stats, heldout, base, tuned, merged) -> tuple[float | None, float | None]:
    """``(ρ_calib, ρ_heldout)`` of a given merge, from the parallel statistics.

    The merge's update at every layer is the one direction of a custom basis; an infinite ridge
    toward coefficient 1 returns exactly that merge and reports its energies.
    """

    def basis(path):
        delta = jax.tree.map(jnp.subtract, subtree(merged, path), subtree(base, path))
        return jm.Custom([delta])

    _, report = jm.solve_stats(
        stats,
        base,
        tuned,
        basis=basis,
        prior=1.0,
        ridge=float("inf"),
        heldout=heldout,
        progress=False,
    )
    return report.rho, report.rho_heldout


def heldout_outputs(suite: Suite, idx, trunk_params) -> list:
    """``(features, logits)`` of ``trunk_params`` with task ``k``'s head on its held-out
    calibration inputs, for every ``k`` in ``idx``."""
    return [
        suite.features_and_logits(
            trunk_params, suite.tuned[k]["head"], suite.heldout_batch(suite.tasks[k])
        )
        for k in idx
    ]


def output_errors(outputs, targets) -> np.ndarray:
    """``Σₖ mean‖f(θ; xₖ) − f(θₖ; xₖ)‖²`` for the trunk's features and for the logits, from
    :func:`heldout_outputs` of a merge and of the fine-tunes themselves (``targets``)."""
    return np.array(
        [
            sum(float(jnp.mean(jnp.sum(jnp.square(o[i] - t[i]), axis=-1)))
                for o, t in zip(outputs, targets, strict=True))
            for i in (0, 1)
        ]
    )  # fmt: skip


def hits(suite: Suite, idx, trunk_params, split: str = "test") -> list[np.ndarray]:
    """Per example, whether ``trunk_params`` classifies it right, on each task of ``idx`` with
    that task's own head."""
    return [
        suite.correct(trunk_params, suite.tuned[k]["head"], getattr(suite.tasks[k], split))
        for k in idx
    ]


def evaluate(suite: Suite, idx, trunk_params, split: str = "test") -> list[float]:
    """Accuracy of ``trunk_params`` on the tasks ``idx``, each with its own head."""
    return [float(np.mean(h)) for h in hits(suite, idx, trunk_params, split)]


def choose(suite: Suite, idx, candidates: dict):
    """The candidate merge with the best mean validation accuracy: ``(key, trunk)``."""
    best = max(candidates, key=lambda c: np.mean(evaluate(suite, idx, candidates[c], "val")))
    return best, candidates[best]


# ---- methods -------------------------------------------------------------------------------


def merges(suite: Suite, idx, stats, *, quick: bool):
    """Yield ``(method, trunk params or None, extra info)`` for the subset ``idx``."""
    base = suite.base["trunk"]
    tuned = [suite.tuned[k]["trunk"] for k in idx]
    calib = [[suite.calib_batch(suite.tasks[k])] for k in idx]
    lambdas = (0.3, 1.0) if quick else LAMBDAS
    ties_lambdas = (1.0,) if quick else TIES_LAMBDAS
    ta = None

    yield "base", base, {}
    if hasattr(jm, "soup"):
        yield "soup", jm.soup(base, tuned), {}
    if hasattr(jm, "task_arithmetic"):
        lam, merged = choose(
            suite, idx, {lam: jm.task_arithmetic(base, tuned, scale=lam) for lam in lambdas}
        )
        ta = lam, merged
        yield "task_arithmetic", merged, {"lambda": lam}
    if hasattr(jm, "ties"):
        lam, merged = choose(
            suite, idx, {lam: jm.ties(base, tuned, density=0.2, scale=lam) for lam in ties_lambdas}
        )
        yield "ties", merged, {"lambda": lam, "density": 0.2}
    if hasattr(jm, "dare"):
        key = jax.random.key(0)
        lam, merged = choose(
            suite,
            idx,
            {lam: jm.dare(base, tuned, key, drop_rate=0.5, scale=lam) for lam in lambdas},
        )
        yield "dare", merged, {"lambda": lam, "drop_rate": 0.5}
    if hasattr(jm, "empirical_fisher") and hasattr(jm, "fisher_average"):
        fishers = []
        for k, params in zip(idx, tuned, strict=True):
            head = suite.tuned[k]["head"]
            x, y = suite.tasks[k].calib
            batches = [
                {"x": models.take(x, slice(i, i + 64)), "y": y[i : i + 64]}
                for i in range(0, len(y), 64)
            ]
            fishers.append(
                jm.empirical_fisher(lambda p, b, h=head: suite.loss(p, h, b), params, batches)
            )
        yield "fisher", jm.fisher_average(tuned, fishers), {}
    if not hasattr(jm, "solve_stats"):
        return
    solve = lambda **kw: jm.solve_stats(stats, base, tuned, progress=False, **kw)[0]  # noqa: E731
    alphas = (0.5, 0.9) if quick else ALPHAS
    alpha, merged = choose(suite, idx, {a: solve(basis="full", alpha=a) for a in alphas})
    yield "regmean", merged, {"alpha": alpha}
    if ta is not None:  # ridge toward the task-arithmetic merge: λ = ∞ would return it exactly
        prior = lambda path: subtree(ta[1], path)  # noqa: E731
        ridges = (1.0,) if quick else RIDGES
        ridge, merged = choose(
            suite, idx, {r: solve(basis="full", prior=prior, ridge=r) for r in ridges}
        )
        yield "qp_full_ridge_ta", merged, {"ridge": ridge, "lambda": ta[0]}

    def lowrank(path):  # rank LOWRANK, or less where the layer's update cannot have it
        params = subtree(base, path)
        if "kernel" not in params:  # a norm: solved channel by channel whatever the rank
            return jm.LowRank(LOWRANK)
        kernel = params["kernel"]
        return jm.LowRank(min(LOWRANK, int(np.prod(kernel.shape[:-1])), kernel.shape[-1]))

    bases = {"scalar": "scalar", "diagonal": "diagonal", "full": "full", "lowrank": lowrank}
    for name, basis in bases.items():
        yield f"qp_{name}_parallel", solve(basis=basis), {}
        if hasattr(jm, "merge"):
            merged, _ = jm.merge(
                suite.trunk,
                base,
                tuned,
                calib,
                algorithm="sequential",
                basis=basis,
                mask_key=suite.mask_key,
                progress=False,
            )
            yield f"qp_{name}_sequential", merged, {}
    if hasattr(jm, "ties_basis"):
        basis, prior = jm.ties_basis(base, tuned, density=0.2, per_output=True)
        yield "qp_ties", solve(basis=basis, prior=prior), {"density": 0.2, "per_output": True}


ALL_METHODS = (
    ["base", "soup", "task_arithmetic", "ties", "dare", "fisher", "regmean"]
    + [
        f"qp_{b}_{a}"
        for b in ("scalar", "diagonal", "full", "lowrank")
        for a in ("parallel", "sequential")
    ]
    + ["qp_full_ridge_ta", "qp_ties"]
)


def run_subset(suite: Suite, idx, individual, individual_val, *, quick: bool) -> dict:
    """Every method on the tasks ``idx``: ``{method: result}``."""
    tuned = [suite.tuned[k]["trunk"] for k in idx]
    calib = [[suite.calib_batch(suite.tasks[k])] for k in idx]
    heldout = [[suite.heldout_batch(suite.tasks[k])] for k in idx]
    kw = {"mask_key": suite.mask_key, "progress": False}
    stats = jm.collect_stats(suite.trunk, tuned, calib, **kw)
    stats_heldout = jm.collect_stats(suite.trunk, tuned, heldout, **kw)
    out = {}
    ref = [individual[k] for k in idx]
    ref_val = [individual_val[k] for k in idx]
    tests = [len(suite.tasks[k].test[1]) for k in idx]
    targets = [heldout_outputs(suite, [k], suite.tuned[k]["trunk"])[0] for k in idx]
    base_errors = output_errors(heldout_outputs(suite, idx, suite.base["trunk"]), targets)
    correct = {}
    for method, merged, info in merges(suite, idx, stats, quick=quick):
        correct[method] = hits(suite, idx, merged)
        acc = [float(np.mean(h)) for h in correct[method]]
        rho, rho_heldout = score_rho(stats, stats_heldout, suite.base["trunk"], tuned, merged)
        outputs = heldout_outputs(suite, idx, merged)
        shares = 1.0 - output_errors(outputs, targets) / base_errors
        out[method] = {
            "per_task": dict(zip([suite.tasks[k].name for k in idx], acc, strict=True)),
            "mean_accuracy": float(np.mean(acc)),
            "mean_normalized": float(np.mean(np.divide(acc, ref))),
            "se_normalized": normalized_standard_error(acc, ref, tests),
            "mean_normalized_val": float(
                np.mean(np.divide(evaluate(suite, idx, merged, "val"), ref_val))
            ),
            "rho_calib": rho,
            "rho_heldout": rho_heldout,
            "rho_output_heldout": float(shares[0]),
            "rho_logits_heldout": float(shares[1]),
            "agreement_heldout": prediction_agreement(outputs, targets),
            **info,
        }
        if suite.perplexity is not None:
            out[method]["perplexity_general"] = suite.perplexity(merged)
    out["individual"] = {
        "per_task": {suite.tasks[k].name: individual[k] for k in idx},
        "mean_accuracy": float(np.mean(ref)),
        "mean_normalized": 1.0,
        "rho_calib": None,  # not one merged model: each task keeps its own trunk
        "rho_heldout": None,
    }
    if suite.perplexity is not None:  # the mean over the subset's fine-tunes
        out["individual"]["perplexity_general"] = float(
            np.mean([suite.perplexity(suite.tuned[k]["trunk"]) for k in idx])
        )
    paired_vs_best_baseline(out, correct, ref)
    for method in ALL_METHODS:
        out.setdefault(method, {"status": "unavailable"})
    return out


BASELINES = ("soup", "task_arithmetic", "ties", "dare", "fisher", "regmean")


def paired_vs_best_baseline(out: dict, correct: dict, ref) -> None:
    """Give every QP method of a subset ``paired_vs_best_baseline``: its mean normalised accuracy
    minus that of the subset's best baseline, ``diff``, with the standard error of that
    difference over the same test examples, ``se`` (per task the variance of the per-example
    differences over the test set's size, divided by the individual accuracy). Both merges see
    the same examples, so this error is smaller than either method's own ``se_normalized`` (the
    examples both get right or wrong cancel): it says whether the test sets can tell the two
    apart."""
    present = [b for b in BASELINES if b in correct]
    if not present:
        return
    best = max(present, key=lambda b: out[b]["mean_normalized"])
    for method in (m for m in correct if m.startswith("qp_")):
        per_task = [
            (a.astype(np.float64) - b.astype(np.float64)) / r
            for a, b, r in zip(correct[method], correct[best], ref, strict=True)
        ]
        out[method]["paired_vs_best_baseline"] = {
            "baseline": best,
            "diff": float(np.mean([d.mean() for d in per_task])),
            "se": float(np.sqrt(sum(d.var(ddof=1) / len(d) for d in per_task)) / len(per_task)),
        }


def prediction_agreement(outputs, targets) -> float:
    """The mean over tasks of the fraction of held-out inputs on which the merge predicts the
    class the task's fine-tune predicts (argmax of the logits, from :func:`heldout_outputs`)."""
    return float(
        np.mean(
            [
                np.mean(np.argmax(o[1], -1) == np.argmax(t[1], -1))
                for o, t in zip(outputs, targets, strict=True)
            ]
        )
    )


def normalized_standard_error(acc, ref, tests) -> float:
    """Binomial standard error of the mean normalised accuracy from the test sets' sizes,
    ``sqrt(Σₖ aₖ(1 − aₖ) / (nₖ rₖ²)) / K`` (the individual accuracies ``rₖ`` taken as fixed): how
    far apart two methods must be before the test sets can tell them apart."""
    acc, ref, tests = (np.asarray(v, np.float64) for v in (acc, ref, tests))
    return float(np.sqrt(np.sum(acc * (1 - acc) / (tests * ref**2))) / len(acc))


def input_dissimilarity(suite: Suite, i: int, j: int) -> float | None:
    """``1 − cos(G_i, G_j)`` of the two tasks' uncentred input second moments (calibration).

    The inputs are the trunk's: image arrays (flattened), or for the text suite the unmasked
    token rows of the hidden states entering the merged blocks. ``None`` for other inputs.
    """
    grams = []
    for k in (i, j):
        x = suite.calib_batch(suite.tasks[k])
        if isinstance(x, dict) and suite.mask_key in x:
            keep = np.asarray(x[suite.mask_key]).astype(bool)
            x = np.asarray(next(v for key, v in x.items() if key != suite.mask_key))[keep]
        if not isinstance(x, np.ndarray | jax.Array) or not jnp.issubdtype(x.dtype, jnp.floating):
            return None
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        grams.append(x.T @ x / len(x))
    a, b = grams
    return float(1 - np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def run_model(suite: Suite, *, quick: bool, pairs: bool = True, checkpoint=None) -> dict:
    """Every subset of ``suite`` (all tasks, then each pair unless ``quick`` or not ``pairs``);
    ``checkpoint(subsets)`` is called as each subset finishes, so that a long run that stops
    keeps what it measured."""
    individual, individual_val = (
        [
            float(np.mean(suite.correct(p["trunk"], p["head"], getattr(t, split))))
            for p, t in zip(suite.tuned, suite.tasks, strict=True)
        ]
        for split in ("test", "val")
    )
    k = len(suite.tasks)
    subsets = {"all": tuple(range(k))}
    pair_idx = list(itertools.combinations(range(k), 2)) if pairs and not quick else []
    subsets.update({"+".join(suite.tasks[i].name for i in pair): pair for pair in pair_idx})
    results = {}
    for name, idx in subsets.items():
        start = time.perf_counter()
        results[name] = run_subset(suite, idx, individual, individual_val, quick=quick)
        line = "  ".join(
            f"{m} {r['mean_normalized']:.3f}"
            for m, r in results[name].items()
            if "mean_normalized" in r
        )
        print(f"[{suite.name} {name}] ({time.perf_counter() - start:.0f} s) {line}", flush=True)
        if checkpoint is not None:
            checkpoint(results)
    pairs = [n for n in subsets if n != "all"]
    gain = {}
    for name in pairs:
        r = results[name]
        methods = ("qp_full_parallel", "qp_diagonal_parallel", "task_arithmetic")
        if all("mean_normalized" in r[m] for m in methods):
            full, diagonal, ta = (r[m]["mean_normalized"] for m in methods)
            gain[name] = {
                "full_minus_diagonal": full - diagonal,
                "full_minus_task_arithmetic": full - ta,
                "rho_heldout_full_minus_diagonal": _sub(
                    r["qp_full_parallel"]["rho_heldout"], r["qp_diagonal_parallel"]["rho_heldout"]
                ),
                "input_dissimilarity": input_dissimilarity(suite, *subsets[name]),
            }
    corr = {"full_minus_diagonal": None, "full_minus_task_arithmetic": None}
    if len(gain) >= 3 and all(g["input_dissimilarity"] is not None for g in gain.values()):
        dissimilarity = [g["input_dissimilarity"] for g in gain.values()]
        corr = {key: _spearman(dissimilarity, [g[key] for g in gain.values()]) for key in corr}
    pair_mean = {
        m: float(np.mean([results[n][m]["mean_normalized"] for n in pairs]))
        for m in results["all"]
        if pairs and all("mean_normalized" in results[n][m] for n in pairs)
    }
    points = [
        (r["mean_normalized_val"], r["mean_normalized"])
        for sub in results.values()
        for r in sub.values()
        if "mean_normalized_val" in r
    ]
    return {
        "individual_accuracy": dict(zip([t.name for t in suite.tasks], individual, strict=True)),
        "spearman_val_vs_test_normalized": _spearman(*zip(*points, strict=True)),
        "subsets": results,
        "pairs_mean_normalized": pair_mean,
        "full_vs_diagonal": {
            "pairs": gain,
            "spearman_gain_vs_input_dissimilarity": corr["full_minus_diagonal"],
            "spearman_full_minus_ta_vs_input_dissimilarity": corr["full_minus_task_arithmetic"],
        },
    }


def _sub(a, b):
    return None if a is None or b is None else a - b


def _spearman(x, y) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


# ---- suites ----------------------------------------------------------------------------------


def image_suites(seed: int, quick: bool):
    """The MLP and CNN suites (``quick``: the MLP only)."""
    for trunk_name in ("mlp",) if quick else ("mlp", "cnn"):
        base, tuned, tasks, _ = finetune.image_models(trunk_name, seed=seed, quick=quick)
        trunk = models.trunk_module(trunk_name)

        def correct(trunk_params, head, split, trunk=trunk):
            return models.correct(trunk, {"trunk": trunk_params, "head": head}, *split)

        def loss(trunk_params, head, batch, trunk=trunk):
            out = models.logits(trunk, {"trunk": trunk_params, "head": head}, batch["x"])
            return optax.softmax_cross_entropy_with_integer_labels(out, batch["y"]).mean()

        yield Suite(trunk_name, trunk, base, tuned, tasks, correct=correct, loss=loss)


def text_suites(seed: int, quick: bool):
    """MiniLM-L6 with its top two blocks (``quick``: one) fine-tuned per text task (see
    ``finetune.text_models``)."""
    trunk, base, tuned, tasks = finetune.text_models(seed=seed, quick=quick)

    def correct(trunk_params, head, split):
        return models.correct(trunk, {"trunk": trunk_params, "head": head}, *split, batch=256)

    def loss(trunk_params, head, batch):
        out = models.logits(trunk, {"trunk": trunk_params, "head": head}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(out, batch["y"]).mean()

    yield Suite(
        "minilm", trunk, base, tuned, tasks, correct=correct, loss=loss, mask_key="attention_mask"
    )


def llm_suites(seed: int, quick: bool):
    """SmolLM2-135M-Instruct with its top four blocks (``quick``: one) fine-tuned per text task
    asked as an instruction (see ``finetune.llm_models``). No task has a head of its own: every
    task reads the one tied head, the frozen token embedding, at its label words' first tokens
    (restricted argmax), so a task's "head" here is those rows of the table."""
    setup = finetune.llm_models(seed=seed, quick=quick)
    graphdef = nnx.graphdef(setup.top)
    heads = [setup.table[label] for label in setup.labels]
    tuned = [{"trunk": p, "head": h} for p, h in zip(setup.tuned, heads, strict=True)]

    @jax.jit
    def features_and_logits(trunk_params, head, x):
        features = nnx.merge(graphdef, trunk_params)(**x)
        return features, features @ head.T

    def correct(trunk_params, head, split, batch=100):
        x, y = split
        logits = [
            features_and_logits(trunk_params, head, models.take(x, slice(i, i + batch)))[1]
            for i in range(0, len(y), batch)
        ]
        return np.argmax(np.concatenate(logits), -1) == np.asarray(y)

    def loss(trunk_params, head, batch):
        logits = features_and_logits(trunk_params, head, batch["x"])[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    @jax.jit
    def _nll(trunk_params, x, ids):
        hidden = nnx.merge(graphdef, trunk_params).all_positions(**x)
        logits = hidden[:, :-1] @ setup.table.T
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def perplexity(trunk_params):
        x, ids = setup.general
        return float(jnp.exp(_nll(trunk_params, x, ids)))

    yield Suite(
        "smollm2",
        setup.top,
        {"trunk": setup.base, "head": None},
        tuned,
        setup.tasks,
        correct=correct,
        loss=loss,
        mask_key="attention_mask",
        features_and_logits=features_and_logits,
        perplexity=perplexity,
    )


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(6 * len(names) + 5, 5))
    for ax, name in zip(axes, names, strict=False):
        methods = result["models"][name]["subsets"]["all"]
        shown = [m for m, r in methods.items() if "mean_normalized" in r]
        ax.barh(shown, [methods[m]["mean_normalized"] for m in shown])
        ax.set_xlabel("mean normalised accuracy (K = all)")
        ax.set_title(name)
        ax.invert_yaxis()
    ax = axes[-1]
    for name in names:
        for sub in result["models"][name]["subsets"].values():
            pts = [
                (r["rho_heldout"], r["mean_normalized"])
                for m, r in sub.items()
                if m != "individual" and r.get("rho_heldout") is not None
            ]
            if pts:
                ax.scatter(*zip(*pts, strict=True), s=10, label=None)
    ax.set_xlabel("held-out ρ")
    ax.set_ylabel("normalised accuracy")
    corr = result["spearman_heldout_rho_vs_normalized"]  # None when it is undefined
    ax.set_title("Spearman " + ("n/a" if corr is None else f"{corr:.2f}"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(paths) -> str:
    """A Markdown table of mean normalised accuracy and held-out ρ per method, from result files.

    One column pair per (suite, model): K = all tasks, and the mean over all pairs (K = 2).
    """
    columns, rows = [], {}
    for path in paths:
        result = json.loads(pathlib.Path(path).read_text())
        for model, r in result["models"].items():
            columns.append(f"{result['suite']} {model}")
            for method, v in r["subsets"]["all"].items():
                cell = "unavailable"
                if "mean_normalized" in v:
                    pair = r["pairs_mean_normalized"].get(method)
                    rho = v.get("rho_heldout")
                    cell = f"{v['mean_normalized']:.3f}"
                    cell += f" ± {v['se_normalized']:.3f}" if "se_normalized" in v else ""
                    cell += f" / {pair:.3f}" if pair is not None else ""
                    cell += f" (ρ {rho:.2f})" if rho is not None else ""
                    ppl = v.get("perplexity_general")
                    cell += f" ppl {ppl:.1f}" if ppl is not None else ""
                rows.setdefault(method, {})[columns[-1]] = cell
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, cells in rows.items():
        lines.append(f"| {method} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print a Markdown table of "
        "result files (normalised accuracy K=all / mean over pairs, held-out ρ)",
    )
    parser.add_argument("--suite", choices=("images", "text", "llm"))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument(
        "--no-pairs", action="store_true", help="only the subset of all tasks, not every pair"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return {"table": True}
    if args.suite is None:
        parser.error("--suite is required (or --table)")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    out = args.out / f"accuracy_{args.suite}{suffix}.json"
    partial = out.with_suffix(".partial.json")
    make = {"images": image_suites, "text": text_suites, "llm": llm_suites}[args.suite]
    suites = list(make(args.seed, args.quick))
    finished = {}  # the models done so far and, as it runs, the current one's subsets

    def checkpoint(name, subsets):
        partial.write_text(json.dumps({**finished, name: {"subsets": subsets}}, indent=2))

    for s in suites:
        finished[s.name] = run_model(s, quick=args.quick, pairs=not args.no_pairs,
                                     checkpoint=functools.partial(checkpoint, s.name))  # fmt: skip
    result = {
        "suite": args.suite,
        "seed": args.seed,
        "quick": args.quick,
        "tasks": [t.name for t in suites[0].tasks],
        "models": finished,
    }
    correlations = {
        "rho_heldout": "spearman_heldout_rho_vs_normalized",
        "rho_output_heldout": "spearman_output_rho_vs_normalized",
        "rho_logits_heldout": "spearman_logits_rho_vs_normalized",
        "agreement_heldout": "spearman_agreement_vs_normalized",
    }
    for field, key in correlations.items():
        points = [
            (r[field], r["mean_normalized"])
            for m in result["models"].values()
            for sub in m["subsets"].values()
            for method, r in sub.items()
            if method != "individual" and r.get(field) is not None
        ]
        result[key] = _spearman(*zip(*points, strict=True))
    first = next(iter(result["models"].values()))
    result["methods"] = first["subsets"]["all"]  # the first model with every task, for tables
    result["seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(result, indent=2))
    partial.unlink(missing_ok=True)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
