"""The exploration notebook executes end to end in quick mode and draws its figures.

The notebook is run by a Jupyter kernel on this interpreter (``nbclient`` + ``ipykernel``, driven
from a subprocess that runs in the background while the other tests do) with ``JAXMERGE_QUICK=1``;
the file itself is never modified. Its own cells assert what they show
(nested bases, the hand-written energy formula against ``energy_fraction``, the sequential
report's held-out ρ against an independent rescoring), so a silent wrong answer fails the run.
"""

import json
import os
import pathlib
import sys

import pytest
from conftest import Job, fresh_env

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel")
pytest.importorskip("matplotlib", reason="the notebook draws with matplotlib")

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "explore.ipynb"
FIGURES = {"rho_per_layer.png", "diagonal_vs_full.png", "rho_vs_accuracy.png"}

# Run by a separate interpreter (a background job, see conftest.py): executes the notebook with a
# Jupyter kernel and writes the executed copy to sys.argv[2].
EXECUTE = """
import sys, nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
client = nbclient.NotebookClient(nb, kernel_name="jaxmerge-test", timeout=600)
client.execute(cwd=sys.argv[3])
nbformat.write(nb, sys.argv[2])
"""


def notebook_job(item, tmp_path_factory):
    """The notebook run in quick mode, by a kernel of this very interpreter (so that it imports
    the jaxmerge under test), saving its figures in a folder of their own."""
    folder = tmp_path_factory.mktemp("notebook")
    figures = folder / "figures"
    figures.mkdir(exist_ok=True)  # every worker of a parallel run builds the same job
    spec = folder / "jupyter" / "kernels" / "jaxmerge-test"
    spec.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    written = spec / f"kernel.json.{os.getpid()}"  # then renamed: never read half written
    written.write_text(
        json.dumps({"argv": argv, "display_name": "jaxmerge test", "language": "python"})
    )
    written.replace(spec / "kernel.json")
    env = fresh_env(
        JUPYTER_PATH=str(folder / "jupyter"),
        JAXMERGE_QUICK="1",
        JAXMERGE_FIGURES=str(figures),
    )
    executed = folder / "executed.ipynb"
    run = [sys.executable, "-c", EXECUTE, str(NOTEBOOK), str(executed), str(figures)]
    data = {"before": NOTEBOOK.read_bytes(), "executed": executed, "figures": figures}
    return {"notebook": Job(run, env=env, timeout=1800, data=data, expected=120.0)}


pytestmark = pytest.mark.background.with_args(notebook_job)


@pytest.fixture(scope="module")
def executed(background):
    """The notebook run in quick mode: ``(notebook, folder of saved figures)``."""
    proc = background.result("notebook")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    data = background.job("notebook").data
    assert NOTEBOOK.read_bytes() == data["before"], "executing the notebook modified its file"
    return nbformat.read(data["executed"], as_version=4), data["figures"]


def _outputs(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


def test_runs_without_errors(executed):
    nb, _ = executed
    errors = [out for out in _outputs(nb) if out.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count is not None for c in nb.cells if c.cell_type == "code")


def test_draws_and_saves_its_figures(executed):
    nb, figures = executed
    images = [out for out in _outputs(nb) if "image/png" in out.get("data", {})]
    assert len(images) == len(FIGURES)
    assert {p.name for p in figures.iterdir()} == FIGURES
    for name in FIGURES:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_rho_ranks_merges_like_accuracy(executed):
    nb, _ = executed
    text = "".join(out.get("text", "") for out in _outputs(nb) if out.output_type == "stream")
    assert "quick mode: True" in text
    line = next(s for s in text.splitlines() if s.startswith("Spearman("))
    # The notebook's point: merges that keep more held-out energy are the more accurate ones.
    assert float(line.split("=")[1]) > 0.5
