"""The README's commands are what CI runs, and the demo command works."""

import pathlib
import re

from jaxmerge.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.M)
    assert len(commands) == 2, "the README starts with two set-up commands"
    test_command = commands[1].rsplit("&&", 1)[1].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]
    assert "jaxmerge demo" in commands[0]


def test_demo_merges_better_than_either_finetune(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "QP full" in printed and "average" in printed
    import json

    methods = json.loads(out.read_text())["methods"]
    rho = [methods[f"QP {b}"]["rho"] for b in ("scalar", "diagonal", "full")]
    assert 0 < rho[0] <= rho[1] <= rho[2] <= 1
    # Each fine-tune forgets the other half; every QP merge keeps both.
    for name in ("QP scalar", "QP diagonal", "QP full"):
        assert (
            methods[name]["mean"]
            > max(methods["finetune 0-4"]["mean"], methods["finetune 5-9"]["mean"]) + 0.2
        )
