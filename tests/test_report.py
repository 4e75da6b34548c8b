"""MergeReport's text form and JSON round trip, and the public names of jaxmerge's errors."""

import dataclasses
import json
import math
import traceback

import flax.linen as nn
import jax.numpy as jnp
import pytest

import jaxmerge as jm


def dense(path, rho=0.75, status="CHOLESKY", **kw):
    return jm.LayerReport(path, "dense", "full", 4.0, 4.0 * (1 - rho), rho, 3.0, status, **kw)


# ---- str(report) -----------------------------------------------------------------------------


def test_str_of_a_report_with_solved_layers():
    report = jm.MergeReport(
        "sequential",
        3,
        (
            dense("Dense_0", 0.75, seconds=0.25),
            dense("block/Dense_1", 0.5, energy_base_heldout=2.0, rho_heldout=0.25),
        ),
        {"Dense_0/bias": "mean"},
        1.5,
    )
    lines = str(report).splitlines()
    assert lines[0].split() == [
        "layer", "kind", "basis", "E0", "L*", "rho", "rho(held)", "cond", "status", "s"
    ]  # fmt: skip
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["Dense_0", "dense", "full", "4", "1", "0.7500", "-", "3",
                                "CHOLESKY", "0.250"]  # fmt: skip
    assert lines[3].split() == ["block/Dense_1", "dense", "full", "4", "2", "0.5000", "0.2500",
                                "3", "CHOLESKY", "-"]  # fmt: skip
    # Columns line up: every row's second column starts where the header's does.
    assert {line.index(" dense") for line in lines[2:4]} == {lines[0].index(" kind")}
    assert lines[4] == (
        "sequential merge of 3 models: rho 0.6250 (held-out 0.2500), 2 layers solved, "
        "1 parameters by fallback, 1.50 s"
    )
    assert len(lines) == 5


def test_model_rho_sums_losses_over_layers_whose_base_energy_is_unresolved():
    """The model's ρ is ``1 − Σ L / Σ E₀``. A layer whose ``E₀`` lies below the statistics'
    float32 resolution has ``ρ = −∞`` when the merge changes its outputs (as in the language
    suite, for task arithmetic and the sequential merges); it adds its loss instead of making
    the model's ρ infinite (before: ``Σ E₀ρ / Σ E₀ = −∞``)."""
    tiny = jm.LayerReport("norm", "norm", "full", 1e-9, 1.0, -math.inf, math.nan, "CHOLESKY",
                          energy_base_heldout=0.0, rho_heldout=-math.inf,
                          energy_merged_heldout=0.5)  # fmt: skip
    solved = dense("Dense_0", 0.75, energy_base_heldout=2.0, rho_heldout=0.25,
                   energy_merged_heldout=1.5)  # fmt: skip
    report = jm.MergeReport("parallel", 2, (tiny, solved), {}, 1.0)
    assert report.rho == pytest.approx(1 - (1.0 + 1.0) / (4.0 + 1e-9))
    assert report.rho_heldout == pytest.approx(1 - (0.5 + 1.5) / 2.0)
    # Without the held-out loss (a report written before it existed): L = E₀(1 − ρ).
    old = jm.MergeReport("parallel", 2, (dataclasses.replace(solved, energy_merged_heldout=None),),
                         {}, 1.0)  # fmt: skip
    assert old.rho_heldout == pytest.approx(0.25)


def test_str_of_a_report_without_layers():
    """No solved layer (everything by fallback) used to raise TypeError in __str__."""
    report = jm.MergeReport("parallel", 2, (), {"Dense_0/kernel": "mean", "Dense_0/bias": "base"},
                            0.5)  # fmt: skip
    assert report.rho is None and report.rho_heldout is None
    assert str(report).splitlines() == [
        "no layer solved by output matching",
        "parallel merge of 2 models: rho - (held-out -), 0 layers solved, "
        "2 parameters by fallback, 0.50 s",
    ]


def test_str_of_a_report_with_unchanged_layers_only():
    unchanged = [
        jm.LayerReport(p, "dense", "full", 0.0, 0.0, 1.0, math.nan, "UNCHANGED", 0.0)
        for p in ("Dense_0", "Dense_1")
    ]
    lines = str(jm.MergeReport("parallel", 2, tuple(unchanged), {}, 0.25)).splitlines()
    assert [line.split()[0] for line in lines[2:4]] == ["Dense_0", "Dense_1"]
    assert lines[2].split()[-2:] == ["UNCHANGED", "0.000"]
    assert lines[4:] == [
        "no layer solved by output matching (2 unchanged, kept at the base's values)",
        "parallel merge of 2 models: rho - (held-out -), 0 layers solved, 2 unchanged, "
        "0 parameters by fallback, 0.25 s",
    ]


def test_str_counts_unchanged_layers_apart_from_solved_ones():
    report = jm.MergeReport(
        "parallel",
        2,
        (
            dense("Dense_0"),
            jm.LayerReport("Dense_1", "dense", "full", 0.0, 0.0, 1.0, math.nan, "UNCHANGED"),
        ),  # fmt: skip
        {},
        0.5,
    )
    lines = str(report).splitlines()
    assert "no layer solved" not in str(report)
    assert lines[-1] == (
        "parallel merge of 2 models: rho 0.7500 (held-out -), 1 layers solved, 1 unchanged, "
        "0 parameters by fallback, 0.50 s"
    )


def test_str_of_a_merge_where_no_fine_tune_changed_anything():
    """End to end: fine-tunes identical to the base leave every layer UNCHANGED."""
    base = {"layers_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)}}
    model = nn.Sequential([nn.Dense(1)])
    stats = jm.collect_stats(model, [base, base], [[jnp.eye(2)], [jnp.eye(2)]], progress=False)
    merged, report = jm.solve_stats(stats, base, [base, base], progress=False)
    assert [r.status for r in report.layers] == ["UNCHANGED"]
    assert jnp.array_equal(merged["layers_0"]["kernel"], base["layers_0"]["kernel"])
    text = str(report)
    assert "no layer solved by output matching (1 unchanged" in text
    assert "0 layers solved, 1 unchanged" in text.splitlines()[-1]


# ---- JSON ------------------------------------------------------------------------------------


def test_json_round_trip_of_an_empty_report():
    report = jm.MergeReport("sequential", 4, (), {"head/bias": "task_arithmetic(0.3)"}, 2.0)
    text = report.to_json()
    back = jm.MergeReport.from_json(text)
    assert back == report
    assert back.layers == () and back.fallbacks == {"head/bias": "task_arithmetic(0.3)"}
    assert '"rho": null' in text
    assert str(back) == str(report)


def test_json_round_trip_keeps_nan_condition_and_shared_inputs():
    layer = dense("Dense_0", shared_input=("Dense_1",))
    layer = jm.LayerReport(**{**layer.__dict__, "condition": math.nan})
    back = jm.MergeReport.from_json(jm.MergeReport("parallel", 2, (layer,), {}, 0.5).to_json())
    assert back.layers[0].shared_input == ("Dense_1",)
    assert math.isnan(back.layers[0].condition)


def test_forms_are_a_column_of_their_own_and_round_trip():
    embed = jm.LayerReport("embed", "embed", "full", 4.0, 1.0, 0.75, 3.0, "CHOLESKY",
                           form="tied;scale=2.0")  # fmt: skip
    report = jm.MergeReport("sequential", 2, (embed, dense("Dense_0")), {}, 0.5)
    lines = str(report).splitlines()
    assert lines[0].split()[:4] == ["layer", "kind", "form", "basis"]
    assert lines[2].split()[:4] == ["embed", "embed", "tied;scale=2.0", "full"]
    assert lines[3].split()[:4] == ["Dense_0", "dense", "-", "full"]
    back = jm.MergeReport.from_json(report.to_json())
    assert back == report and back.layers[0].form == "tied;scale=2.0"
    # a report written before LayerReport.form existed reads with form ""
    data = json.loads(report.to_json())
    for row in data["layers"]:
        del row["form"]
    old = jm.MergeReport.from_json(json.dumps(data))
    assert [r.form for r in old.layers] == ["", ""]
    assert "form" not in str(old).splitlines()[0].split()


# ---- public names of the errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, base",
    [("SolveError", RuntimeError), ("OptionPatternError", ValueError), ("ConfigError", ValueError)],
)
def test_errors_are_exported_with_a_public_module_path(name, base):
    cls = getattr(jm, name)
    assert issubclass(cls, base)
    assert cls.__module__ == "jaxmerge" and cls.__qualname__ == name
    assert repr(cls) == f"<class 'jaxmerge.{name}'>"
    error = cls("bad", "merge.basis") if name == "OptionPatternError" else cls("bad")
    assert traceback.format_exception_only(error) == [f"jaxmerge.{name}: bad\n"]


def test_a_raised_solve_error_shows_its_public_name():
    stats = jm.layer_stats([jnp.array([[jnp.nan]])], [jnp.array([[1.0]])])
    with pytest.raises(jm.SolveError) as info:
        jm.solve_layer(stats, jnp.zeros((1, 1)), [jnp.ones((1, 1))])
    last = traceback.format_exception(info.value)[-1]
    assert last.startswith("jaxmerge.SolveError: solve_layer: the merge would not be finite")


def test_option_pattern_error_from_merge_shows_its_public_name():
    base = {"layers_0": {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)}}
    fts = [{"layers_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)}}]
    stats = jm.collect_stats(nn.Sequential([nn.Dense(1)]), fts, [[jnp.eye(2)]], progress=False)
    with pytest.raises(jm.OptionPatternError) as info:
        jm.solve_stats(stats, base, fts, basis={"no_such_layer*": "scalar"}, progress=False)
    assert traceback.format_exception_only(info.value)[0].startswith("jaxmerge.OptionPatternError")
