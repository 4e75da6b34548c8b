"""Never silent: every parameter the fine-tunes changed that output matching did not solve is in
``report.unsolved`` with its reason; ``merge`` warns about them once, or raises with
``strict=True`` before collecting anything; a merge that solves nothing says so."""

import json
import math
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxmerge as jm

X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
IDS = jnp.array([[0, 1, 2], [3, 4, 5]])


def shifted(tree, *steps):
    """One fine-tune per step: every floating leaf plus the step (integers plus one)."""
    return [
        jax.tree.map(lambda a, s=s: a + (s if jnp.issubdtype(a.dtype, jnp.floating) else 1), tree)
        for s in steps
    ]


def merge_quietly(*args, **kwargs):
    """``jm.merge`` with its UnsolvedParametersWarning recorded: ``(merged, report, warnings)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", jm.UnsolvedParametersWarning)
        merged, report = jm.merge(*args, progress=False, **kwargs)
    unsolved = [w for w in caught if issubclass(w.category, jm.UnsolvedParametersWarning)]
    return merged, report, unsolved


# ---- a linen model with one module of every unsolved case ---------------------------------------


class Proj(nn.Module):
    """A projection with a kernel, of a class no layer kind is registered for."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 4))


class MyDense(nn.Dense):
    """A subclass of a registered class: classes match exactly, so it is not captured."""


def _transposed(tree):
    return jax.tree.map(lambda a: a.T if a.ndim == 2 else a, tree)


class Everything(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4)(x)  # solved
        x = Proj()(x)
        x = MyDense(4)(x)
        self.param("unused", nn.initializers.zeros, (3,))
        self.param("steps", lambda key: jnp.zeros((), jnp.int32))  # an integer parameter
        # a lifted transform that stores the kernel transposed: other shapes than the layer's
        mapped = nn.map_variables(nn.Dense, "params", trans_in_fn=_transposed,
                                  trans_out_fn=_transposed, init=True)  # fmt: skip
        y = mapped(3, name="mapped")(x)
        return nn.LayerNorm(reduction_axes=(-2, -1))(y)  # a configuration its kind refuses


@pytest.fixture(scope="module")
def everything():
    model = Everything()
    base = model.init(jax.random.key(0), X)["params"]
    fts = shifted(base, 0.1, 0.2)
    merged, report, caught = merge_quietly(model, base, fts, [[X], [X]])
    return model, base, fts, merged, report, caught


@pytest.mark.parametrize(
    "path, words",
    [
        ("Proj_0/kernel", ["module class 'Proj' (linen) is not a registered layer kind"]),
        ("MyDense_0/kernel", ["'MyDense_0' (MyDense) is a subclass of flax.linen.Dense",
                              "registered classes match exactly", "jaxmerge.register_kind"]),
        ("MyDense_0/bias", ["is a subclass of flax.linen.Dense"]),
        ("LayerNorm_0/scale", ["the 'norm' kind does not cover this configuration",
                               "'LayerNorm_0'", "reduction_axes=(-2, -1)"]),
        ("mapped/kernel", ["its layer's parameters have other shapes in the traced call than "
                           "in the tree (kernel (4, 3) against (3, 4)): a lifted transform "
                           "(nn.map_variables, nn.scan, nn.vmap, ...) maps them"]),
        ("mapped/bias", ["other shapes in the traced call than in the tree (kernel (4, 3)"]),
        ("unused", ["not used in the forward pass"]),
        ("steps", ["an integer parameter"]),
    ],
)  # fmt: skip
def test_linen_reasons(everything, path, words):
    report = everything[4]
    assert path in report.unsolved, sorted(report.unsolved)
    for word in words:
        assert word in report.unsolved[path]


def test_linen_unsolved_is_exactly_the_changed_fallbacks(everything):
    _, base, _, _, report, _ = everything
    assert [r.path for r in report.layers] == ["Dense_0"]
    solved = {"Dense_0/kernel", "Dense_0/bias"}
    paths = {"/".join(k.key for k in keys) for keys, _ in jax.tree_util.tree_leaves_with_path(base)}
    assert set(report.unsolved) == paths - solved
    assert set(report.unsolved) == set(report.fallbacks)  # every fallback here was changed
    assert report.fallbacks["steps"] == "base"


def test_one_warning_naming_the_count_paths_reasons_and_ways_out(everything):
    *_, report, caught = everything
    assert len(caught) == 1
    text = str(caught[0].message)
    assert text.startswith(f"merge: {len(report.unsolved)} parameters the fine-tunes changed")
    assert "'LayerNorm_0/bias', 'LayerNorm_0/scale' (mean: the 'norm' kind" in text
    assert "and 4 more" in text and "report.unsolved lists them all" in text
    for way in ("jaxmerge.register_kind", "fallback={'LayerNorm_0/bias': 'mean'}",
                "strict=True", "warnings.filterwarnings('ignore', "
                "category=jaxmerge.UnsolvedParametersWarning)"):  # fmt: skip
        assert way in text
    assert caught[0].filename == __file__  # attributed to the caller of merge


def test_the_report_lists_the_unsolved_parameters(everything):
    report = everything[4]
    lines = str(report).splitlines()
    start = lines.index(f"unsolved: {len(report.unsolved)} parameters the fine-tunes changed, "
                        "not solved by output matching")  # fmt: skip
    rows = lines[start + 1 : start + 1 + len(report.unsolved)]
    assert rows[0].split()[:2] == ["LayerNorm_0/bias", "mean"]
    assert [row.split()[0] for row in rows] == list(report.unsolved)
    assert lines[-1].endswith(
        f"{len(report.fallbacks)} parameters by fallback ({len(report.unsolved)} changed), "
        f"{report.seconds:.2f} s"
    )


# ---- changed by one fine-tune, or by none --------------------------------------------------------


class TwoProj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Proj(name="frozen")(x) + Proj(name="tuned")(x) + nn.Dense(4)(x)


def test_a_parameter_changed_by_one_fine_tune_is_listed_an_unchanged_one_is_not():
    model = TwoProj()
    base = model.init(jax.random.key(0), X)["params"]
    one = jax.tree.map(lambda a: a, base)
    one = {**base, "tuned": {"kernel": base["tuned"]["kernel"] + 1.0}}
    _, report, caught = merge_quietly(model, base, [base, one], [[X], [X]])
    assert set(report.fallbacks) == {"frozen/kernel", "tuned/kernel"}
    assert report.unsolved == {
        "tuned/kernel": "module class 'Proj' (linen) is not a registered layer kind"
    }
    assert len(caught) == 1 and "'tuned/kernel'" in str(caught[0].message)
    assert "frozen" not in str(caught[0].message)


def test_nothing_unsolved_no_warning():
    model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    base = model.init(jax.random.key(0), X)["params"]
    _, report, caught = merge_quietly(model, base, shifted(base, 0.1, 0.2), [[X], [X]])
    assert report.unsolved == {} and caught == []
    assert "unsolved" not in str(report)


# ---- strict --------------------------------------------------------------------------------------


def _boom_after_first(x):
    """A task's batches that fail if the merge reads past the first one (the plan's peek)."""
    yield x
    raise AssertionError("statistics were collected")


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_strict_raises_naming_them_before_collecting(algorithm):
    model = TwoProj()
    base = model.init(jax.random.key(0), X)["params"]
    fts = shifted(base, 0.1, 0.2)
    calibration = [_boom_after_first(X), _boom_after_first(X)]
    with pytest.raises(jm.UnsolvedParametersError) as info:
        jm.merge(model, base, fts, calibration, algorithm=algorithm, strict=True, progress=False)
    error = info.value
    assert isinstance(error, ValueError)
    assert set(error.unsolved) == {"frozen/kernel", "tuned/kernel"}
    text = str(error)
    assert text.startswith("merge: 2 parameters the fine-tunes changed were not solved")
    assert "'frozen/kernel' (mean: module class 'Proj' (linen) is not a registered" in text
    assert "'tuned/kernel' (mean: module class 'Proj'" in text
    assert "strict=True: nothing was merged" in text and "strict=False" in text


def test_strict_false_warns_and_strict_must_be_a_bool():
    model = TwoProj()
    base = model.init(jax.random.key(0), X)["params"]
    with pytest.warns(jm.UnsolvedParametersWarning):
        jm.merge(model, base, shifted(base, 0.1), [[X]], strict=False, progress=False)
    with pytest.raises(TypeError, match="strict"):  # beartype's check in the tests, else ours
        jm.merge(model, base, shifted(base, 0.1), [[X]], strict="yes", progress=False)


def test_a_fallback_chosen_by_path_is_listed_without_warning_or_error():
    model = TwoProj()
    base = model.init(jax.random.key(0), X)["params"]
    fts = shifted(base, 0.1, 0.3)
    chosen = {"frozen/*": "base", "tuned/kernel": "mean"}
    merged, report, caught = merge_quietly(model, base, fts, [[X], [X]], fallback=chosen,
                                           strict=True)  # fmt: skip
    assert caught == [] and set(report.unsolved) == {"frozen/kernel", "tuned/kernel"}
    np.testing.assert_array_equal(merged["frozen"]["kernel"], base["frozen"]["kernel"])
    # a glob for one of them only: the other is still warned about
    _, _, caught = merge_quietly(model, base, fts, [[X], [X]], fallback={"frozen/*": "base"})
    assert len(caught) == 1 and "1 parameter the fine-tunes changed was" in str(caught[0].message)
    assert "'tuned/kernel'" in str(caught[0].message) and "frozen" not in str(caught[0].message)
    with pytest.raises(jm.UnsolvedParametersError, match="'tuned/kernel'"):
        jm.merge(model, base, fts, [[X], [X]], fallback={"frozen/*": "base"}, strict=True,
                 progress=False)  # fmt: skip


# ---- a merge that solves nothing -----------------------------------------------------------------


class OnlyProj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Proj(name="b")(Proj(name="a")(x))


@pytest.mark.parametrize("heldout", [False, True])
def test_a_merge_that_solves_nothing_says_so(heldout, tmp_path):
    model = OnlyProj()
    base = model.init(jax.random.key(0), X)["params"]
    held = [[X], [X]] if heldout else None
    _, report, caught = merge_quietly(model, base, shifted(base, 0.1, 0.2), [[X], [X]],
                                      heldout=held)  # fmt: skip
    assert report.layers == () and len(caught) == 1
    text = str(report)
    assert (
        "no layer was solved by output matching: all 2 parameters the fine-tunes changed took "
        "the fallback 'mean' (reasons: module class 'Proj' (linen) is not a registered layer "
        "kind (×2))"
    ) in text
    assert report.rho is None and report.rho_heldout is None
    back = jm.MergeReport.from_json(report.to_json())
    assert back == report and str(back) == text
    report.plot(tmp_path / "r.png")
    back.plot()


class FrozenDenseAndProj(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Proj()(nn.Dense(4)(x))


@pytest.mark.parametrize("algorithm", ["parallel", "sequential"])
def test_only_unchanged_layers_and_unsolved_parameters(algorithm):
    """The Dense layer is frozen (UNCHANGED in the parallel merge), Proj is tuned."""
    model = FrozenDenseAndProj()
    base = model.init(jax.random.key(0), X)["params"]
    fts = [{**base, "Proj_0": {"kernel": base["Proj_0"]["kernel"] + s}} for s in (0.1, 0.2)]
    _, report, caught = merge_quietly(model, base, fts, [[X], [X]], algorithm=algorithm,
                                      heldout=[[X], [X]])  # fmt: skip
    assert set(report.unsolved) == {"Proj_0/kernel"} and len(caught) == 1
    text = str(report)
    if algorithm == "parallel":
        assert [r.status for r in report.layers] == ["UNCHANGED"]
        assert (
            "no layer was solved by output matching (1 unchanged, kept at the base's values): "
            "the 1 parameter the fine-tunes changed took the fallback 'mean'"
        ) in text
    back = jm.MergeReport.from_json(report.to_json())
    assert back.unsolved == report.unsolved and str(back) == text
    back.plot()


# ---- NNX -----------------------------------------------------------------------------------------


class NProj(nnx.Module):
    def __init__(self):
        self.kernel = nnx.Param(jnp.ones((4, 4)))

    def __call__(self, x):
        return x @ self.kernel[...]


class NSub(nnx.Linear):
    pass


class NEverything(nnx.Module):
    def __init__(self, rngs):
        self.solved = nnx.Linear(4, 4, rngs=rngs)
        self.proj = NProj()
        self.sub = NSub(4, 4, rngs=rngs)
        self.ln = nnx.LayerNorm(4, reduction_axes=(-2, -1), rngs=rngs)
        self.unused = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        y = self.sub(self.proj(self.solved(x)))
        return self.ln(y)


@pytest.fixture(scope="module")
def nnx_everything():
    model = NEverything(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    fts = shifted(state, 0.1, 0.2)
    return model, state, fts, *merge_quietly(model, state, fts, [[X], [X]])


@pytest.mark.parametrize(
    "path, words",
    [
        ("proj/kernel", ["module class 'NProj' (nnx) is not a registered layer kind"]),
        ("sub/kernel", ["'sub' (NSub) is a subclass of flax.nnx.Linear (kind 'dense')",
                        "registered classes match exactly: register it with "
                        "jaxmerge.register_kind"]),
        ("ln/scale", ["the 'norm' kind does not cover this configuration of 'ln' (LayerNorm",
                      "reduction_axes=(-2, -1)"]),
        ("unused/kernel", ["not used in the forward pass"]),
        ("unused/bias", ["not used in the forward pass"]),
    ],
)  # fmt: skip
def test_nnx_reasons(nnx_everything, path, words):
    report = nnx_everything[4]
    assert path in report.unsolved, sorted(report.unsolved)
    for word in words:
        assert word in report.unsolved[path]


def test_nnx_unsolved_set_and_warning(nnx_everything):
    *_, report, caught = nnx_everything
    assert [r.path for r in report.layers] == ["solved"]
    assert set(report.unsolved) == {
        "proj/kernel", "sub/kernel", "sub/bias", "ln/scale", "ln/bias",
        "unused/kernel", "unused/bias",
    }  # fmt: skip
    assert len(caught) == 1 and "7 parameters the fine-tunes changed" in str(caught[0].message)


# ---- other collections ---------------------------------------------------------------------------


class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))


def test_a_changed_leaf_of_another_linen_collection():
    model = Normed()
    variables = model.init(jax.random.key(0), X)
    fts = shifted(variables, 0.1, 0.2)
    _, report, caught = merge_quietly(model, variables, fts, [[X], [X]])
    stats = {p: r for p, r in report.unsolved.items() if p.startswith("batch_stats/")}
    assert set(stats) == {"batch_stats/BatchNorm_0/mean", "batch_stats/BatchNorm_0/var"}
    assert all("in the linen collection 'batch_stats', not 'params'" in r for r in stats.values())
    assert len(caught) == 1


# ---- both algorithms, the grouped merge, solve_stats ---------------------------------------------


def test_sequential_lists_the_same_unsolved_parameters(everything):
    model, base, fts, _, parallel, _ = everything
    _, sequential, caught = merge_quietly(model, base, fts, [[X], [X]], algorithm="sequential")
    assert sequential.algorithm == "sequential"
    assert sequential.unsolved == parallel.unsolved
    assert len(caught) == 1 and str(caught[0].message).startswith("merge: 9 parameters")


def test_merge_in_groups_lists_warns_once_and_is_strict():
    model = TwoProj()
    base = model.init(jax.random.key(0), X)["params"]
    fts = shifted(base, 0.1, 0.2)
    with pytest.warns(jm.UnsolvedParametersWarning, match=r"^merge_in_groups: 2 parameters"):
        _, report = jm.merge_in_groups(model, base, fts, [[X], [X]], groups=[["Dense_0"]],
                                       progress=False)  # fmt: skip
    assert set(report.unsolved) == {"frozen/kernel", "tuned/kernel"}
    with pytest.raises(jm.UnsolvedParametersError, match="^merge_in_groups: 2 parameters"):
        jm.merge_in_groups(model, base, fts, [[X], [X]], groups=[["Dense_0"]], strict=True,
                           progress=False)  # fmt: skip


def test_solve_stats_lists_parameters_without_statistics():
    model = TwoProj()
    base = model.init(jax.random.key(0), X)["params"]
    fts = shifted(base, 0.1, 0.2)
    stats = jm.collect_stats(model, fts, [[X], [X]], progress=False)
    with pytest.warns(jm.UnsolvedParametersWarning, match=r"^solve_stats: 2 parameters") as rec:
        _, report = jm.solve_stats(stats, base, fts, progress=False)
    assert len(rec) == 1
    assert set(report.unsolved) == {"frozen/kernel", "tuned/kernel"}
    assert all("no layer of the statistics holds it" in r for r in report.unsolved.values())
    with pytest.raises(jm.UnsolvedParametersError, match="^solve_stats: 2 parameters"):
        jm.solve_stats(stats, base, fts, strict=True, progress=False)


# ---- the report's text, JSON and plot ------------------------------------------------------------


def _report(layers=(), unsolved=None, n=None):
    unsolved = unsolved if unsolved is not None else {
        f"m{i}/kernel": "module class 'M' (linen) is not a registered layer kind"
        if i % 3 else "not used in the forward pass" for i in range(n or 0)
    }  # fmt: skip
    return jm.MergeReport("parallel", 2, tuple(layers), dict.fromkeys(unsolved, "mean"), 0.5,
                          unsolved)  # fmt: skip


def test_the_report_lists_at_most_ten_then_counts_the_rest():
    lines = str(_report(n=14)).splitlines()
    assert lines[0] == "unsolved: 14 parameters the fine-tunes changed, not solved by output " \
                       "matching"  # fmt: skip
    assert [line.split()[0] for line in lines[1:11]] == [f"m{i}/kernel" for i in range(10)]
    assert lines[11] == "  … and 4 more (report.unsolved lists them all)"
    assert lines[12] == (
        "no layer was solved by output matching: all 14 parameters the fine-tunes changed took "
        "the fallback 'mean' (reasons: module class 'M' (linen) is not a registered layer kind "
        "(×9); not used in the forward pass (×5))"
    )


UNCHANGED = jm.LayerReport("a", "dense", "full", 0.0, 0.0, 1.0, math.nan, "UNCHANGED", 0.0, (),
                           0.0, 1.0)  # fmt: skip
NAN_RHO = jm.LayerReport("b", "dense", "full", 0.0, 0.0, math.nan, math.nan, "CHOLESKY", 0.1)
HELD = jm.LayerReport("c", "dense", "full", 1.0, 0.5, 0.5, 3.0, "CHOLESKY", 0.1, (), 0.0, math.nan)


@pytest.mark.parametrize("layers", [(), (UNCHANGED,), (NAN_RHO,), (HELD, UNCHANGED),
                                    (UNCHANGED, NAN_RHO, HELD)])  # fmt: skip
@pytest.mark.parametrize("n", [0, 1, 12])
def test_str_and_plot_of_every_report_and_its_json(layers, n):
    """``plot`` of a report read back from JSON, whose nan ρ was null, used to raise TypeError."""
    report = _report(layers, n=n)
    back = jm.MergeReport.from_json(report.to_json())
    assert back.unsolved == report.unsolved and back.fallbacks == report.fallbacks
    for r in (report, back):
        assert str(r).splitlines()[-1].startswith("parallel merge of 2 models")
        r.plot()
    if NAN_RHO in layers:
        assert math.isnan(next(r for r in back.layers if r.path == "b").rho)


def test_plot_of_a_report_read_back_with_a_nan_rho():
    """A nan ρ is written as null; read back, it is nan again, and ``plot`` draws no bar for it
    (it raised TypeError on None)."""
    back = jm.MergeReport.from_json(jm.MergeReport("parallel", 2, (NAN_RHO, HELD), {}, 0.5)
                                    .to_json())  # fmt: skip
    assert math.isnan(back.layers[0].rho) and back.layers[1].rho == 0.5
    back.plot()
    assert "b      dense" in str(back)


def test_json_round_trip_and_an_old_report_without_unsolved():
    report = _report((HELD,), n=3)
    data = json.loads(report.to_json())
    assert data["unsolved"] == report.unsolved
    back = jm.MergeReport.from_json(report.to_json())
    assert back.unsolved == report.unsolved and back.layers[0].rho == 0.5
    del data["unsolved"]
    old = jm.MergeReport.from_json(json.dumps(data))
    assert old.unsolved == {} and old.fallbacks == report.fallbacks
    assert "unsolved" not in str(old)


def test_the_warning_and_the_error_are_public():
    assert issubclass(jm.UnsolvedParametersWarning, UserWarning)
    assert issubclass(jm.UnsolvedParametersError, ValueError)
    for cls in (jm.UnsolvedParametersWarning, jm.UnsolvedParametersError):
        assert repr(cls) == f"<class 'jaxmerge.{cls.__name__}'>"


# ---- the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offset_config(tmp_path_factory):
    """A configuration merging cli_fixtures' OffsetMLP, whose Offset_0/shift is unsolved."""
    import cli_fixtures as fx

    d = tmp_path_factory.mktemp("offset")
    base, finetuned = fx.make_offset_params()
    jm.save_params(d / "base", base)
    for k, p in enumerate(finetuned):
        jm.save_params(d / f"ft{k}", p)

    def write(merge="", name="config.toml", calibration=True):
        lines = [
            f"pythonpath = [{json.dumps(str(Path(fx.__file__).parent))}]",
            'model = "cli_fixtures:offset_model"',
            f"base = {json.dumps(str(d / 'base'))}",
            f"finetuned = {json.dumps([str(d / 'ft0'), str(d / 'ft1')])}",
        ] + ['calibration = "cli_fixtures:calibration"'] * calibration
        path = d / name
        path.write_text("\n".join(lines) + "\n[merge]\n" + merge)
        return path

    return write


def test_cli_merge_warns_on_stderr_and_reports_them(offset_config, tmp_path, capsys):
    from jaxmerge.cli import main

    out = tmp_path / "out"
    assert main(["merge", str(offset_config()), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("jaxmerge: warning: merge: 1 parameter the fine-tunes changed was not "
                          "solved by output matching")  # fmt: skip
    assert "'Offset_0/shift' (mean: module class 'Offset' (linen) is not a registered" in err
    assert "(command line: --strict, or `strict = true` in [merge], makes this an error)" in err
    report = jm.MergeReport.from_json((out / "report.json").read_text())
    assert list(report.unsolved) == ["Offset_0/shift"]
    assert main(["report", str(out)]) == 0
    assert "Offset_0/shift  mean  module class 'Offset'" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["flag", "config"])
def test_cli_strict_fails_and_writes_nothing(offset_config, tmp_path, capsys, how):
    from jaxmerge.cli import main

    out = tmp_path / "out"
    config = offset_config("strict = true\n" if how == "config" else "", f"{how}.toml")
    args = ["merge", str(config), "--out", str(out), "--quiet"] + (["--strict"] * (how == "flag"))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxmerge: merge failed: UnsolvedParametersError: merge: 1 parameter")
    assert "'Offset_0/shift'" in err and "without --strict and `strict = true`" in err
    assert not out.exists()


def test_cli_strict_of_the_wrong_type_or_method(offset_config, tmp_path, capsys):
    from jaxmerge.cli import main

    out = str(tmp_path / "out")
    assert main(["merge", str(offset_config('strict = "yes"\n', "a.toml")), "--out", out]) == 2
    assert "config key 'merge.strict': expected true or false" in capsys.readouterr().err
    soup = offset_config('method = "soup"\n', "b.toml", calibration=False)
    assert main(["merge", str(soup), "--out", out, "--strict"]) == 2
    assert "--strict applies to methods qp and regmean" in capsys.readouterr().err
    soup = offset_config('method = "soup"\nstrict = true\n', "c.toml", calibration=False)
    assert main(["merge", str(soup), "--out", out]) == 2
    assert "config key 'merge.strict': applies to method qp / regmean" in capsys.readouterr().err
