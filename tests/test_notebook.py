"""Claim: the example notebook sizes one job end to end and runs clean, offline and without torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat and nbclient")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbformat and nbclient")
pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "size_a_job.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    env = {"HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        probe = "import sys; print('heavy modules:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
        notebook.cells.append(nbformat.v4.new_code_cell(probe))  # in memory only
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path_factory.mktemp("nb"))}})
        client.execute()
        return notebook
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def outputs(notebook):
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def test_the_example_notebook_runs_without_an_error(executed):
    errors = [o for o in outputs(executed) if o.output_type == "error"]
    assert errors == [], errors[0]["evalue"] if errors else ""


def test_the_notebook_prints_a_plan_summary_and_draws_its_plots(executed):
    text = "".join(o.get("text", "") for o in outputs(executed) if o.output_type == "stream")
    assert "GPU types fit qwen3-8b" in text and "catalogue:" in text
    images = [o for o in outputs(executed) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the breakdown and the plan


def test_the_notebook_never_imports_torch_or_transformers(executed):
    assert executed.cells[-1].outputs[0]["text"].strip() == "heavy modules: []"
