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


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    import json

    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("soup", "task arithmetic", "TIES", "DARE", "RegMean", "QP full"):
        assert name in printed
    result = json.loads(out.read_text())
    methods, tasks = result["methods"], result["tasks"]
    assert len(tasks) == 3
    # Each fine-tune learned its own task.
    for k, task in enumerate(tasks):
        assert methods[f"finetune {task}"]["accuracy"][k] > 0.8
    # Bases are nested: scalar ⊆ diagonal ⊆ full, so the captured energy grows.
    rho = [methods[f"QP {b}"]["rho"] for b in ("scalar", "diagonal", "full")]
    assert 0 < rho[0] <= rho[1] <= rho[2] <= 1
    assert methods["soup"]["rho"] is None
    # The full projection keeps far more of the three tasks than a plain average.
    assert methods["QP full"]["mean"] > methods["soup"]["mean"] + 0.2
    assert main(["demo", "--quick", "--json", str(out)]) == 2  # refuses to overwrite
