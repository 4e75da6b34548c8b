"""The ``jaxmerge`` command: merge/stats/report against the Python API, errors, kills."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli_fixtures as fx
import jax
import numpy as np
import pytest

import jaxmerge as jm
from jaxmerge.cli import main

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Checkpoints of the tiny model on disk (shared, read-only: every test checks hashes)."""
    d = tmp_path_factory.mktemp("inputs")
    base, finetuned = fx.make_params()
    jm.save_params(d / "base", base)
    for k, p in enumerate(finetuned):
        jm.save_params(d / f"ft{k}", p)
    return d


def _config(directory: Path, inputs: Path, merge: str = "", **top) -> Path:
    """Write a configuration; ``top`` overrides top-level keys (None drops one)."""
    keys = {
        "pythonpath": [str(TESTS)],
        "model": "cli_fixtures:model",
        "base": str(inputs / "base"),
        "finetuned": [str(inputs / "ft0"), str(inputs / "ft1")],
        "calibration": "cli_fixtures:calibration",
    }
    keys.update(top)
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items() if v is not None]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n[merge]\n" + merge)
    return path


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_merge_equals_python_api_bit_for_bit(inputs, tmp_path, capsys):
    config = _config(tmp_path, inputs, 'basis = "diagonal"\n', heldout="cli_fixtures:heldout")
    before = _hashes(inputs, config)
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 0
    assert "Dense_0" in capsys.readouterr().out
    assert _hashes(inputs, config) == before  # the inputs are only read
    base, finetuned = fx.make_params()
    expected, report = jm.merge(fx.model(), base, finetuned, fx.calibration(), basis="diagonal",
                                heldout=fx.heldout(), progress=False)  # fmt: skip
    _assert_trees_equal(jm.load_params(tmp_path / "out" / "params"), expected)
    saved = jm.MergeReport.from_json((tmp_path / "out" / "report.json").read_text())
    assert saved.rho == pytest.approx(report.rho, rel=1e-12)
    assert saved.rho_heldout == pytest.approx(report.rho_heldout, rel=1e-12)
    assert (tmp_path / "out" / "config.toml").read_text() == config.read_text()


@pytest.mark.parametrize(
    ("merge", "options"),
    [
        ('method = "regmean"\n', lambda b, f: dict(basis="full", alpha=0.9)),
        (
            'basis = { "Dense_0" = "scalar", "*" = "full" }\n'
            "ridge = { Dense_1 = 0.5 }\nfallback = 0.3\n",
            lambda b, f: dict(basis={"Dense_0": "scalar", "*": "full"}, ridge={"Dense_1": 0.5},
                              fallback=0.3),
        ),
        (
            'basis = "ties"\ndensity = 0.5\nridge = 1.0\n',
            lambda b, f: dict(zip(("basis", "prior"), jm.ties_basis(b, f, density=0.5),
                                  strict=True), ridge=1.0),
        ),
    ],
)  # fmt: skip
def test_merge_options_reach_the_python_api(inputs, tmp_path, merge, options):
    config = _config(tmp_path, inputs, merge)
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    base, finetuned = fx.make_params()
    expected, report = jm.merge(fx.model(), base, finetuned, fx.calibration(), progress=False,
                                **options(base, finetuned))  # fmt: skip
    _assert_trees_equal(jm.load_params(tmp_path / "out" / "params"), expected)
    saved = jm.MergeReport.from_json((tmp_path / "out" / "report.json").read_text())
    assert [r.basis for r in saved.layers] == [r.basis for r in report.layers]


def test_stats_then_merge_equals_merge_from_data(inputs, tmp_path):
    data = _config(tmp_path, inputs, 'basis = "lowrank:2"\nridge = 0.1\n')
    assert main(["merge", str(data), "--out", str(tmp_path / "from_data"), "--quiet"]) == 0
    assert main(["stats", str(data), "--out", str(tmp_path / "stats"), "--quiet"]) == 0
    assert not list(tmp_path.glob(".stats.resume")), "the resume directory is removed at the end"
    (tmp_path / "s").mkdir()
    saved = _config(tmp_path / "s", inputs, 'basis = "lowrank:2"\nridge = 0.1\n',
                    calibration=None, stats=str(tmp_path / "stats"))  # fmt: skip
    assert main(["merge", str(saved), "--out", str(tmp_path / "from_stats"), "--quiet"]) == 0
    _assert_trees_equal(
        jm.load_params(tmp_path / "from_stats" / "params"),
        jm.load_params(tmp_path / "from_data" / "params"),
    )
    stats = jm.load_model_stats(tmp_path / "stats")
    assert stats.tasks == ("task0", "task1")


def test_statistics_are_tied_to_their_checkpoints_and_data(inputs, tmp_path, capsys):
    """A merge from statistics with the fine-tunes swapped or repeated fails, naming the task
    (accepted with --accept-other-finetunes); a resume of partial sums with the fine-tunes
    swapped fails, naming what differs."""
    config = _config(tmp_path, inputs)
    assert main(["stats", str(config), "--out", str(tmp_path / "stats"), "--quiet"]) == 0
    (tmp_path / "s").mkdir()
    stats = str(tmp_path / "stats")
    for k, fts in enumerate(([inputs / "ft1", inputs / "ft0"], [inputs / "ft0", inputs / "ft0"])):
        bad = _config(tmp_path / "s", inputs, calibration=None, stats=stats,
                      finetuned=[str(p) for p in fts])  # fmt: skip
        capsys.readouterr()
        assert main(["merge", str(bad), "--out", str(tmp_path / f"m{k}"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "not those the statistics were computed from" in err, err
        assert ("task 0 ('task0')" in err) == (k == 0), err
        assert re.search(r"task 1 \('task1'\): recorded \w{12}, given \w{12} \(it is the tree "
                         r"of task 'task0': swapped\?\)", err), err  # fmt: skip
        assert not (tmp_path / f"m{k}").exists()
    args = ["merge", str(bad), "--out", str(tmp_path / "m"), "--quiet", "--accept-other-finetunes"]
    assert main(args) == 0

    base, finetuned = fx.make_params()
    partial = tmp_path / ".again.resume"
    heads = fx.calibration_head()
    jm.accumulate_model_stats(fx.model(), finetuned, heads, directory=partial, progress=False)
    swapped = _config(tmp_path / "s", inputs, finetuned=[str(inputs / "ft1"), str(inputs / "ft0")])
    before = _hashes(inputs, partial)
    capsys.readouterr()
    assert main(["stats", str(swapped), "--out", str(tmp_path / "again"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "task-0 holds a state computed from other inputs (finetuned: recorded" in err, err
    assert _hashes(inputs, partial) == before and not (tmp_path / "again").exists()


def test_merge_from_statistics_of_several_runs(inputs, tmp_path):
    """Two `stats` runs over disjoint batches, summed by the merge, equal one run over all."""
    for part in ("head", "tail"):
        (tmp_path / part).mkdir()
        config = _config(tmp_path / part, inputs, calibration=f"cli_fixtures:calibration_{part}")
        assert (
            main(["stats", str(config), "--out", str(tmp_path / f"{part}.stats"), "--quiet"]) == 0
        )
    parts = [str(tmp_path / "head.stats"), str(tmp_path / "tail.stats")]
    config = _config(tmp_path, inputs, 'basis = "full"\n', calibration=None, stats=parts)
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    base, finetuned = fx.make_params()
    expected, _ = jm.merge(fx.model(), base, finetuned, fx.calibration(), progress=False)
    got = jm.load_params(tmp_path / "out" / "params")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # sums regrouped: float rounding


@pytest.mark.parametrize(
    ("merge", "expected"),
    [
        ('method = "soup"\n', lambda b, f: jm.soup(b, f)),
        (
            'method = "task_arithmetic"\nscale = 0.4\n',
            lambda b, f: jm.task_arithmetic(b, f, scale=0.4),
        ),
        (
            'method = "ties"\ndensity = 0.5\nscale = 0.8\n',
            lambda b, f: jm.ties(b, f, density=0.5, scale=0.8),
        ),
        (
            'method = "dare"\ndrop_rate = 0.5\nseed = 3\n',
            lambda b, f: jm.dare(b, f, jax.random.key(3), drop_rate=0.5),
        ),
        (
            'method = "dare"\ndrop_rate = 0.5\nrescale = "l1"\n',
            lambda b, f: jm.dare(b, f, jax.random.key(0), drop_rate=0.5, rescale="l1"),
        ),
    ],
)
def test_data_free_methods_equal_the_baselines(inputs, tmp_path, merge, expected):
    config = _config(tmp_path, inputs, merge, calibration=None)
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    _assert_trees_equal(jm.load_params(tmp_path / "out" / "params"), expected(*fx.make_params()))
    assert not (tmp_path / "out" / "report.json").exists()


def test_refuses_to_overwrite_without_the_flag(inputs, tmp_path, capsys):
    config = _config(tmp_path, inputs, 'method = "soup"\n', calibration=None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["merge", str(config), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["merge", str(config), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "params").is_dir()


@pytest.mark.parametrize(
    ("merge", "top", "key"),
    [
        ("", {"finetune": ["x"]}, "'finetune': unknown key"),
        ("ridg = 1.0\n", {}, "'merge.ridg': unknown option"),
        ('method = "fisher"\n', {}, "'merge.method': expected one of"),
        ('basis = "lowrank:0"\n', {}, "'merge.basis': expected"),
        ('basis = { "Dense_*" = "ful" }\n', {}, "'merge.basis.Dense_*': expected"),
        ('method = "dare"\n', {"calibration": None}, "'merge.drop_rate': is required"),
        (
            'method = "dare"\ndrop_rate = 0.5\nrescale = "l2"\n',
            {"calibration": None},
            "'merge.rescale': expected 'expectation' or 'l1'",
        ),
        ('method = "soup"\ndensity = 0.5\n', {"calibration": None}, "'merge.density': applies to"),
        ("ridge = -1.0\n", {}, "'merge.ridge': expected a number >= 0"),
        ("alpha = 2.0\n", {}, "'merge.alpha': expected a number in [0, 1]"),
        ("", {"model": None}, "'model': is required"),
        ("", {"model": "cli_fixtures"}, "'model': expected 'module:attribute'"),
        ("", {"model": "cli_fixtures:nothing"}, "'model': module 'cli_fixtures' has no callable"),
        ("", {"calibration": None}, "'calibration': method 'qp' needs"),
        ("", {"tasks": ["a", "a"]}, "'tasks': expected 2 distinct names"),
        ('algorithm = "sequential"\n', {"stats": "s"}, "'stats': saved statistics are parallel"),
        ("", {"finetuned": ["nowhere"]}, "'finetuned[0]': no checkpoint directory"),
    ],
)
def test_bad_configuration_exits_2_naming_the_key(inputs, tmp_path, capsys, merge, top, key):
    config = _config(tmp_path, inputs, merge, **top)
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert key in err, err
    assert not (tmp_path / "out").exists()


def test_usage_errors_and_help(tmp_path, capsys):
    assert main(["merge"]) == 2  # CONFIG and --out missing
    assert main(["merge", str(tmp_path / "none.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text("model = \n")
    assert main(["merge", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out
    for command, options in {
        "merge": ["--out", "--overwrite", "--quiet", "method =", "fallback =", "drop_rate"],
        "stats": ["--out", "--overwrite", "--quiet", "--save-every", "resumes"],
        "report": ["--png", "--overwrite"],
        "demo": ["--quick", "--json", "--seed", "--quiet", "--overwrite"],
    }.items():
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text, (command, option)


def test_failed_run_exits_1(inputs, tmp_path, capsys):
    (tmp_path / "m.py").write_text("def calibration():\n    return [[]]\n")  # one task, empty
    config = _config(tmp_path, inputs, "", pythonpath=[str(TESTS), str(tmp_path)],
                     calibration="m:calibration")  # fmt: skip
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 1
    assert "2 fine-tuned models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_prints_the_table_and_writes_a_png(tmp_path, capsys):
    layer = jm.LayerReport("Dense_0", "dense", "full", 4.0, 1.0, 0.75, 3.0, "CHOLESKY")
    report = jm.MergeReport("parallel", 2, (layer,), {}, 0.5)
    (tmp_path / "r.json").write_text(report.to_json())
    assert main(["report", str(tmp_path / "r.json")]) == 0
    assert "Dense_0" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("{}")
    assert main(["report", str(tmp_path / "broken.json")]) == 2
    pytest.importorskip("matplotlib")
    png = tmp_path / "rho.png"
    assert main(["report", str(tmp_path / "r.json"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "r.json"), "--png", str(png)]) == 2
    assert main(["report", str(tmp_path / "r.json"), "--png", str(png), "--overwrite"]) == 0


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "jaxmerge", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _kill_when(proc, done, timeout=120.0):
    start = time.monotonic()
    while proc.poll() is None and not done() and time.monotonic() - start < timeout:
        time.sleep(0.01)
    ended = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return not ended


def test_killed_merge_leaves_inputs_and_previous_output_intact(inputs, tmp_path):
    """SIGKILL `jaxmerge merge --overwrite` at several points; then rerun to completion.

    Kill points: 0.3 s after the start (importing), 3 s after (accumulating; each calibration
    batch is slowed to 0.3 s), and as soon as the new output is being written next to the old
    one. After each kill the inputs are byte-identical and the output is the complete previous
    merge (or, should a run finish before its kill point, the complete new one).
    """
    config = _config(tmp_path, inputs, 'basis = "full"\n')
    out = tmp_path / "out"
    assert main(["merge", str(config), "--out", str(out), "--quiet"]) == 0
    previous = jm.load_params(out / "params")
    config.write_text(config.read_text().replace('"full"', '"scalar"'))
    base, finetuned = fx.make_params()
    expected, _ = jm.merge(fx.model(), base, finetuned, fx.calibration(), basis="scalar",
                           progress=False)  # fmt: skip
    before = _hashes(inputs, config)
    env = dict(os.environ, JAXMERGE_TEST_BATCH_DELAY="0.3")
    args = ["merge", str(config), "--out", str(out), "--overwrite", "--quiet"]
    started = [0.0]

    def after(seconds):
        return lambda: time.monotonic() - started[0] > seconds

    def writing():
        return any(tmp_path.glob(".out.tmp-*/*")) or any(tmp_path.glob(".out.old-*"))

    killed = []
    for done in (after(0.3), after(3.0), writing):
        started[0] = time.monotonic()
        killed.append(_kill_when(_start(args, env), done))
        assert _hashes(inputs, config) == before
        merged = jm.load_params(out / "params")
        _assert_trees_equal(merged, previous if killed[-1] else expected)
    assert killed[0], "the first run ended before it was killed"
    proc = subprocess.run([sys.executable, "-m", "jaxmerge", *args], capture_output=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert _hashes(inputs, config) == before
    _assert_trees_equal(jm.load_params(out / "params"), expected)
    assert not list(tmp_path.glob(".out.*")), "leftovers of killed runs are cleaned up"


def test_killed_stats_run_resumes_to_the_same_statistics(inputs, tmp_path):
    """SIGKILL `jaxmerge stats --overwrite` after the second saved batch of task 0 and after the
    first of task 1 (batches slowed to 0.2 s); the previous output stays intact; the rerun
    resumes and equals an uninterrupted accumulation bit for bit."""
    config = _config(tmp_path, inputs, calibration="cli_fixtures:calibration_head")
    out = tmp_path / "stats"
    assert main(["stats", str(config), "--out", str(out), "--quiet"]) == 0
    previous = jm.load_model_stats(out)
    config = _config(tmp_path, inputs)
    before = _hashes(inputs, config)
    env = dict(os.environ, JAXMERGE_TEST_BATCH_DELAY="0.2")
    args = ["stats", str(config), "--out", str(out), "--save-every", "1", "--overwrite", "--quiet"]
    resume = tmp_path / ".stats.resume"
    for step in ("task-0/2", "task-1/1"):
        assert _kill_when(_start(args, env), lambda step=step: (resume / step).is_dir())
        assert _hashes(inputs, config) == before
        _assert_trees_equal(jm.load_model_stats(out).sums, previous.sums)
    proc = subprocess.run([sys.executable, "-m", "jaxmerge", *args], capture_output=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert not resume.exists() and _hashes(inputs, config) == before
    base, finetuned = fx.make_params()
    expected = jm.accumulate_model_stats(fx.model(), finetuned, fx.calibration(), progress=False)
    _assert_trees_equal(jm.load_model_stats(out).sums, expected.sums)


# --- Outputs never destroy inputs ---------------------------------------------------------------


def _workspace(tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the checkpoints under ``ws/ck``, their statistics under ``ws/st`` and
    configurations ``ws/good.toml`` (calibration data, ``ws/src`` on its ``pythonpath``) and
    ``ws/from_stats.toml`` (``st``).

    Private because a failing test here may delete its inputs.
    """
    ws = tmp_path / "ws"
    ck = ws / "ck"
    base, finetuned = fx.make_params()
    jm.save_params(ck / "base", base)
    for k, p in enumerate(finetuned):
        jm.save_params(ck / f"ft{k}", p)
    jm.save_model_stats(
        ws / "st",
        jm.accumulate_model_stats(fx.model(), finetuned, fx.calibration(), progress=False),
    )
    _config(ws, ck, calibration=None, stats="st").rename(ws / "from_stats.toml")
    (ws / "src").mkdir()
    (ws / "src" / "helpers.py").write_text("# the user's code\n")
    config = _config(ws, ck, pythonpath=[str(TESTS), str(ws / "src")])
    return ws, config.rename(ws / "good.toml")


@pytest.mark.parametrize(
    ("command", "out", "overwrite", "message"),
    [
        ("merge", "ck/base", True, "is the base checkpoint"),
        ("merge", "ck/ft1", True, "is the fine-tuned checkpoint 1"),
        ("merge", "ck", True, "contains the base checkpoint"),
        ("merge", ".", True, "contains the configuration file"),
        ("merge", "ck/base/merged", False, "lies inside the base checkpoint"),
        ("merge", "ck/ft0/sub/merged", True, "lies inside the fine-tuned checkpoint 0"),
        ("merge", "good.toml", True, "is the configuration file"),
        ("merge", "good.toml/merged", False, "lies inside the configuration file"),
        ("merge", "link", True, "is the base checkpoint"),  # a link to ck/base
        ("merge", "st", True, "is the statistics directory 0"),
        ("merge", "st/merged", False, "lies inside the statistics directory 0"),
        ("merge", "src", True, "is the pythonpath directory 1"),
        ("stats", "ck/ft0", True, "is the fine-tuned checkpoint 0"),
        ("stats", "ck", True, "contains the base checkpoint"),
        ("stats", "ck/base/st", False, "lies inside the base checkpoint"),
    ],
)  # fmt: skip
def test_outputs_that_would_destroy_inputs_are_refused(tmp_path, monkeypatch, capsys, command,
                                                       out, overwrite, message):  # fmt: skip
    """Each case exits 2 before any work, naming the input; no file under the workspace (every
    input included) changes, and nothing new appears."""
    ws, config = _workspace(tmp_path)
    (ws / "link").symlink_to(ws / "ck" / "base")
    monkeypatch.chdir(ws)
    before = _hashes(ws)
    names = sorted(str(p) for p in ws.rglob("*"))
    name = "from_stats.toml" if out.startswith("st") else "good.toml"
    args = [command, name, "--out", out, *(["--overwrite"] if overwrite else []), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert _hashes(ws) == before
    assert sorted(str(p) for p in ws.rglob("*")) == names


def test_working_directory_is_never_an_output(tmp_path, monkeypatch, capsys):
    """`--out .` (or a parent of the working directory) from a directory that holds no input."""
    ws, config = _workspace(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "notes.txt").write_text("mine")
    monkeypatch.chdir(elsewhere / "sub")
    before = _hashes(ws, elsewhere)
    for out in (".", "..", str(elsewhere / "sub")):
        assert main(["merge", str(config), "--out", out, "--overwrite", "--quiet"]) == 2
        assert "working directory" in capsys.readouterr().err
    assert main(["demo", "--json", ".", "--overwrite", "--quiet"]) == 2
    assert "working directory" in capsys.readouterr().err
    assert _hashes(ws, elsewhere) == before


def test_report_png_never_replaces_the_report(tmp_path, capsys):
    layer = jm.LayerReport("Dense_0", "dense", "full", 4.0, 1.0, 0.75, 3.0, "CHOLESKY")
    report = tmp_path / "r.json"
    report.write_text(jm.MergeReport("parallel", 2, (layer,), {}, 0.5).to_json())
    before = _hashes(report)
    assert main(["report", str(report), "--png", str(report), "--overwrite"]) == 2
    assert "is the report" in capsys.readouterr().err
    assert _hashes(report) == before


def test_output_under_a_file_fails_before_the_merge(tmp_path, monkeypatch, capsys):
    ws, config = _workspace(tmp_path)
    (ws / "plain.txt").write_text("x")
    monkeypatch.chdir(ws)
    assert main(["merge", "good.toml", "--out", "plain.txt/merged", "--quiet"]) == 2
    assert "plain.txt is a file" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "link", "directory"])
def test_overwriting_leaves_nothing_behind(tmp_path, monkeypatch, kind):
    """Replacing an existing output (a file, a link to a directory elsewhere, a directory) leaves
    only the new output: no hidden ``.NAME.old-*`` or ``.NAME.tmp-*`` entries, and a link's
    target is left alone."""
    ws, config = _workspace(tmp_path)
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    out = ws / "out"
    if kind == "file":
        out.write_text("old")
    elif kind == "link":
        out.symlink_to(target)
    else:
        out.mkdir()
        (out / "old.txt").write_text("old")
    monkeypatch.chdir(ws)
    assert main(["merge", "good.toml", "--out", "out", "--overwrite", "--quiet"]) == 0
    assert out.is_dir() and not out.is_symlink() and (out / "params").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["config.toml", "params", "report.json"]
    assert not [p.name for p in ws.iterdir() if p.name.startswith(".out.")]
    assert (target / "keep.txt").read_text() == "mine"


def test_failed_run_prints_the_notes_of_the_error(inputs, tmp_path, monkeypatch, capsys):
    """Errors that carry jaxmerge's context as a note (their type cannot be rebuilt from one
    string) show it on stderr."""
    from jaxmerge.cli import command

    def fail(config, **options):
        error = RuntimeError("the original message")
        error.add_note("merge: layer 'Dense_0'")
        raise error

    monkeypatch.setattr(command, "_run_merge", fail)
    config = _config(tmp_path, inputs)
    assert main(["merge", str(config), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: the original message\n  merge: layer 'Dense_0'" in err, err
